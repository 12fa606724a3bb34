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


def _learned_position_model(tok):
    """A random GPT-2 (a learned position table): a token's logits depend on its absolute position,
    so a forward whose positions counted the left padding would score another distribution. The
    shipped Qwen2's rotary positions are relative: there such a bug changes nothing (1e-6)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()


def test_left_padding_changes_nothing_on_a_learned_position_model(model_tok):
    """On a model whose logits depend on absolute positions, the sampler's recorded log-probs, the
    training forward and the shared-prompt forward agree with each other and with each prompt
    sampled alone without padding: every path numbers positions from the first real token."""
    from lit_covrl.policy import shared_prompt_logprobs

    _, tok = model_tok
    model = _learned_position_model(tok)
    ids, mask = encode_prompts(tok, PROMPTS, chat_template=False)
    ids, mask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
    with torch.no_grad():
        ro = sample_responses(model, ids, mask, max_new_tokens=6, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, temperature=1.0, top_p=1.0,
                              generator=torch.Generator().manual_seed(0))
        T = ro.response_mask.shape[1]
        plain = response_logprobs(model, ro.input_ids, ro.attention_mask, T).logp
        shared = shared_prompt_logprobs(model, ro.input_ids, ro.attention_mask, T, always_split=True).logp
        # each row alone, its left padding cut off: the positions its tokens would have unpadded
        alone = torch.zeros_like(plain)
        for i in range(len(ro.input_ids)):
            keep = ro.attention_mask[i].bool()
            keep[-T:] = True  # the response columns (right padding masked out by the response mask)
            alone[i] = response_logprobs(model, ro.input_ids[i:i + 1, keep], ro.attention_mask[i:i + 1, keep], T).logp[0]
        # the bug this guards against: positions that count the padding
        padded_positions = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                                 position_ids=torch.arange(ro.input_ids.shape[1]).expand_as(ro.input_ids)).logits
    m = ro.response_mask.bool()
    assert (ro.attention_mask[:, :ids.shape[1]] == 0).any()  # some prompts are left-padded
    for name, logp in (("plain", plain), ("shared prompt", shared), ("alone", alone)):
        torch.testing.assert_close(ro.logp[m], logp[m], rtol=0, atol=1e-5, msg=name)
    wrong = torch.log_softmax(padded_positions[:, -T - 1:-1].float(), -1).gather(-1, ro.input_ids[:, -T:, None])[..., 0]
    assert (wrong[m] - plain[m]).abs().max() > 1e-2  # the check is sensitive to the positions
