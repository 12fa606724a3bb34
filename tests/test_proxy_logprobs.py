"""The min-p proxy log-probs of the training forward (`Regularizer.needs_min_p`, Lp-Reg's
proxy): against a naive full softmax in float64 (dtypes, temperatures, chunk sizes), by hand,
through the plain and shared-prompt forwards with and without top-k, and the flag named when a
regularizer reads batch.proxy_logp without asking."""
from __future__ import annotations

import math

import pytest
import torch

from lit_covrl.algorithms import token_logprobs, token_proxy_logprobs, token_topp_entropy
from lit_covrl.regularizers import Regularizer
from lit_covrl.types import ForwardAsks, TokenShaping

F64 = torch.float64


def _naive_proxy(z: torch.Tensor, labels: torch.Tensor, min_p: float, temperature: float = 1.0) -> torch.Tensor:
    """float64, one position at a time: keep p_v >= min_p max p (p = softmax(z), temperature 1, as
    the reference's apply_min_p), renormalise softmax(z / temperature) over the kept tokens."""
    out = torch.empty(labels.shape, dtype=F64)
    flat_z, flat_y, flat_out = z.reshape(-1, z.shape[-1]).double(), labels.reshape(-1), out.view(-1)
    for i in range(flat_z.shape[0]):
        p = torch.softmax(flat_z[i], -1)
        kept = p >= min_p * p.max()
        q = torch.softmax(flat_z[i] / temperature, -1) * kept
        y = int(flat_y[i])
        flat_out[i] = math.log(q[y] / q.sum()) if kept[y] else -math.inf
    return out


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_proxy_logprobs_match_a_naive_full_softmax(dtype, temperature, chunk):
    g = torch.Generator().manual_seed(0)
    z = (2.5 * torch.randn(3, 7, 11, generator=g, dtype=F64)).to(dtype)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    for min_p in (0.02, 0.3, 1.0):
        ours = token_proxy_logprobs(z, labels, min_p, temperature=temperature, chunk_size=chunk)
        ref = _naive_proxy(z.double(), labels, min_p, temperature)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref))
        finite = torch.isfinite(ref)
        torch.testing.assert_close(ours[finite].double(), ref[finite], rtol=1e-5 if dtype != F64 else 1e-12, atol=1e-6)
        assert not ours.requires_grad
    assert torch.isinf(_naive_proxy(z.double(), labels, 0.3)).any()  # some labels filtered at 0.3
    # nothing filtered: the proxy is the policy, to the bit
    assert torch.equal(token_proxy_logprobs(z, labels, 1e-30, temperature=temperature, chunk_size=chunk),
                       token_logprobs(z, labels, temperature=temperature, chunk_size=chunk))


def test_proxy_by_hand():
    # probabilities 0.5, 0.3, 0.15, 0.05: min_p 0.2 keeps >= 0.1 -> the first three, mass 0.95
    z = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=F64).log().expand(4, 4)
    out = token_proxy_logprobs(z, torch.arange(4), 0.2)
    assert out[:3].tolist() == pytest.approx([math.log(0.5 / 0.95), math.log(0.3 / 0.95), math.log(0.15 / 0.95)])
    assert out[3].item() == -math.inf


def test_training_forward_fills_the_proxy_in_every_path(tiny_model_dir):
    """response_logprobs and shared_prompt_logprobs with min_p: the log-probs are the plain pass's to
    the bit, the proxy is the naive full softmax's of the same logits (plain, shared-prompt, with
    and without top-k, with and without SIREN's nucleus entropy, which comes fifth and only when
    asked)."""
    from transformers import AutoModelForCausalLM

    from lit_covrl.policy import response_logprobs, shared_prompt_logprobs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    V = model.config.vocab_size
    prompt = torch.randint(1, V, (1, 5)).expand(4, 5)
    resp = torch.randint(1, V, (4, 6))
    ids = torch.cat([prompt, resp], 1)
    att = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att).logits[:, -7:-1]
    naive = _naive_proxy(logits.double(), resp, 0.8, 0.8)  # the untrained model is nearly uniform
    plain = response_logprobs(model, ids, att, 6, temperature=0.8, chunk_size=5)
    nucleus = token_topp_entropy(logits, top_p=0.9, top_k=3, temperature=0.8)
    for fn in (response_logprobs, shared_prompt_logprobs):
        for topk, topp in ((0, None), (2, None), (0, (0.9, 3)), (2, (0.9, 3))):
            kw = dict(temperature=0.8, chunk_size=5, asks=ForwardAsks(topk=topk, min_p=0.8, topp=topp))
            if fn is shared_prompt_logprobs:
                kw["always_split"] = True
            out = fn(model, ids, att, 6, **kw)
            assert (out.topk_logp is None) == (out.top1 is None) == (topk == 0) and (out.topp_entropy is None) == (topp is None)
            if topp is not None:
                torch.testing.assert_close(out.topp_entropy, nucleus, rtol=1e-5, atol=1e-6)
            if fn is response_logprobs:
                assert torch.equal(out.logp, plain.logp)
            assert torch.equal(torch.isinf(out.proxy_logp), torch.isinf(naive))
            fin = torch.isfinite(naive)
            torch.testing.assert_close(out.proxy_logp[fin].double(), naive[fin], rtol=1e-5, atol=1e-5)
    assert torch.isinf(naive).any() and torch.isfinite(naive).any()


def test_shape_reading_the_proxy_without_asking_names_the_flag(tiny_model_dir):
    from tests.test_module import _one_rl_step_weights

    class Unasked(Regularizer):
        def shape(self, batch):
            return TokenShaping(penalty=batch.proxy_logp * 0.0)

    with pytest.raises(TypeError, match=r"batch.proxy_logp is None unless the class sets needs_min_p = the proxy's"):
        _one_rl_step_weights(tiny_model_dir, 64, lambda: [Unasked()])


def test_training_forward_proxy_uses_the_rollout_temperature(tiny_model_dir):
    """The proxy is renormalised softmax(z / temperature): the training forwards must pass their
    temperature on. With min_p tiny nothing is filtered and the proxy equals the log-probs at that
    temperature (to the bit); the tiny model's logits are spread out first (its random head is
    nearly uniform, where every temperature gives almost the same log-probs)."""
    from transformers import AutoModelForCausalLM

    from lit_covrl.policy import response_logprobs, shared_prompt_logprobs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(50.0)
    V = model.config.vocab_size
    ids = torch.cat([torch.randint(1, V, (1, 5)).expand(4, 5), torch.randint(1, V, (4, 6))], 1)
    att = torch.ones_like(ids)
    for fn, extra in ((response_logprobs, {}), (shared_prompt_logprobs, {"always_split": True})):
        out = fn(model, ids, att, 6, temperature=0.5, chunk_size=5, asks=ForwardAsks(min_p=1e-30), **extra)
        plain = fn(model, ids, att, 6, temperature=0.5, chunk_size=5, **extra)
        at_one = fn(model, ids, att, 6, temperature=1.0, chunk_size=5, **extra)
        assert (plain.logp - at_one.logp).abs().max() > 1e-2  # the temperature matters here
        torch.testing.assert_close(out.proxy_logp, plain.logp, rtol=0, atol=1e-6)
