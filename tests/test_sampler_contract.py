"""Contract between the sampler and the training forward: the old log-probs that
`lit_covrl.rollout.sample_responses` records are the log-probs that `lit_covrl.policy.response_logprobs`
computes for the same tokens at the same temperature, on the response mask.

PPO's ratio exp(logp - old_logp) is 1 on the first update of a rollout only if both sides score
the sampled token under the same distribution, log softmax(z / temperature). Top-p only decides
which tokens can be drawn; neither side renormalizes over the nucleus. Checked on the shipped
policy at a temperature != 1 and top_p < 1, where a sampler that scored at temperature 1 or over
the truncated nucleus would differ by far more than float32 rounding."""
from __future__ import annotations

import pytest
import torch

from lit_covrl.policy import load_policy, load_tokenizer, response_logprobs
from lit_covrl.prompts import encode_prompts
from lit_covrl.rollout import sample_responses

MODEL = "lit_covrl:tiny-arith"
PROMPTS = ["47+85=", "3+4=", "12-7+9=", "8*6="]  # different lengths: different left padding
G = 4  # samples per prompt


@pytest.fixture(scope="module")
def model_tok():
    return load_policy(MODEL).eval(), load_tokenizer(MODEL)


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.5), (1.3, 0.9)])
def test_recorded_logprobs_equal_the_training_forward(model_tok, temperature, top_p):
    model, tok = model_tok
    ids, mask = encode_prompts(tok, PROMPTS, chat_template=False)
    ids, mask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
    with torch.no_grad():
        ro = sample_responses(model, ids, mask, max_new_tokens=8, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, temperature=temperature, top_p=top_p,
                              generator=torch.Generator().manual_seed(0))
        T = ro.response_mask.shape[1]
        train = response_logprobs(model, ro.input_ids, ro.attention_mask, T, temperature=temperature).logp
        at_t1 = response_logprobs(model, ro.input_ids, ro.attention_mask, T, temperature=1.0).logp
    m = ro.response_mask.bool()
    assert m.sum() >= len(PROMPTS) * G  # at least one scored token per row
    assert (ro.logp[~m] == 0).all()  # nothing recorded outside the mask
    torch.testing.assert_close(ro.logp[m], train[m], rtol=0, atol=1e-5)
    # the comparison is sensitive: scoring at temperature 1 instead would be far off
    assert (ro.logp[m] - at_t1[m]).abs().max() > 1e-2
