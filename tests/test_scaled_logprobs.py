"""The log-probs under scaled logits of the training forward (`Regularizer.needs_logit_scales`,
ERA's activation z' = s z): against a naive float64 softmax one position at a time (dtypes,
temperatures, chunk sizes), value and gradient; the s = 1 column equal to `token_logprobs` to the
bit; through the plain and shared-prompt forwards at the rollout temperature; the flag named when a
regularizer reads batch.scaled_logp without asking; two different requests refused at start-up."""
from __future__ import annotations

import math

import pytest
import torch

from lit_covrl.algorithms import token_logprobs, token_scaled_logprobs
from lit_covrl.regularizers import Regularizer
from lit_covrl.regularizers.checks import check_stack
from lit_covrl.types import ForwardAsks, TokenShaping

F64 = torch.float64


def _naive_scaled(z: torch.Tensor, labels: torch.Tensor, scales, temperature: float) -> torch.Tensor:
    """float64, one position and one scale at a time: log softmax(s z / temperature)[y]."""
    flat_z, flat_y = z.reshape(-1, z.shape[-1]).double(), labels.reshape(-1)
    out = torch.empty(flat_z.shape[0], len(scales), dtype=F64)
    for i in range(flat_z.shape[0]):
        for j, s in enumerate(scales):
            p = torch.softmax(s * flat_z[i] / temperature, -1)
            out[i, j] = math.log(p[int(flat_y[i])])
    return out.view(*labels.shape, len(scales))


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_scaled_logprobs_match_a_naive_softmax(dtype, temperature, chunk):
    g = torch.Generator().manual_seed(0)
    z = (2.5 * torch.randn(3, 7, 11, generator=g, dtype=F64)).to(dtype)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    scales = (2.0, 1.0, 0.5)
    ours = token_scaled_logprobs(z, labels, scales, temperature=temperature, chunk_size=chunk)
    assert ours.shape == (3, 7, 3)
    ref = _naive_scaled(z.double(), labels, scales, temperature)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5 if dtype != F64 else 1e-12, atol=1e-6)
    # s = 1 is the plain log-prob, to the bit; s > 1 sharpens (the top token gains), s < 1 flattens
    assert torch.equal(ours[..., 1], token_logprobs(z, labels, temperature=temperature, chunk_size=chunk))
    top = labels == z.argmax(-1)
    assert top.any() and (ours[..., 0][top] >= ours[..., 1][top]).all() and (ours[..., 2][top] <= ours[..., 1][top]).all()


def test_scaled_logprobs_gradient_matches_the_naive_one():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 5, 9, generator=g, dtype=F64, requires_grad=True)
    labels = torch.randint(0, 9, (4, 5), generator=g)
    w = torch.randn(4, 5, 2, generator=g, dtype=F64)
    (token_scaled_logprobs(z, labels, (3.0, 0.25), temperature=0.9, chunk_size=3) * w).sum().backward()
    ours = z.grad.clone()
    z.grad = None
    naive = torch.stack([torch.log_softmax(s * z / 0.9, -1).gather(-1, labels[..., None]).squeeze(-1)
                         for s in (3.0, 0.25)], -1)
    (naive * w).sum().backward()
    torch.testing.assert_close(ours, z.grad, rtol=1e-12, atol=1e-12)
    # by hand: d/dz log softmax(s z)[y] = s (e_y - softmax(s z))
    z1 = torch.tensor([[0.0, math.log(3.0)]], dtype=F64, requires_grad=True)  # p = 1/4, 3/4
    token_scaled_logprobs(z1, torch.tensor([0]), (2.0,))[..., 0].sum().backward()  # softmax(2z) = 1/10, 9/10
    assert z1.grad[0].tolist() == pytest.approx([2 * (1 - 0.1), -2 * 0.9])


@pytest.mark.parametrize("scales", [(), (0.0,), (1.0, -2.0)])
def test_scaled_logprobs_refuse_bad_scales(scales):
    with pytest.raises(ValueError, match="scales must be"):
        token_scaled_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), scales)


def test_training_forward_fills_the_scaled_logprobs_in_every_path(tiny_model_dir):
    """response_logprobs and shared_prompt_logprobs with logit_scales: the log-probs are the plain
    pass's to the bit, the scaled ones the naive softmax's of the same logits at the rollout
    temperature (the tiny model's head spread out first: it is nearly uniform), with and without
    top-k and min-p asked too."""
    from transformers import AutoModelForCausalLM

    from lit_covrl.policy import response_logprobs, shared_prompt_logprobs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    V = model.config.vocab_size
    ids = torch.cat([torch.randint(1, V, (1, 5)).expand(4, 5), torch.randint(1, V, (4, 6))], 1)
    att = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att).logits[:, -7:-1]
    naive = _naive_scaled(logits.double(), ids[:, -6:], (2.0, 0.5), 0.6)
    assert (naive[..., 0] - naive[..., 1]).abs().max() > 1e-2  # the scale matters here
    plain = response_logprobs(model, ids, att, 6, temperature=0.6, chunk_size=5)
    assert plain.scaled_logp is None
    for fn, extra in ((response_logprobs, {}), (shared_prompt_logprobs, {"always_split": True})):
        for topk, min_p in ((0, 0.0), (2, 0.1)):
            out = fn(model, ids, att, 6, temperature=0.6, chunk_size=5,
                     asks=ForwardAsks(topk=topk, min_p=min_p, logit_scales=(2.0, 0.5)), **extra)
            if fn is response_logprobs:
                assert torch.equal(out.logp, plain.logp)
            torch.testing.assert_close(out.scaled_logp.double(), naive, rtol=1e-5, atol=1e-5)


def test_shape_reading_scaled_logprobs_without_asking_names_the_flag(tiny_model_dir):
    from tests.test_module import _one_rl_step_weights

    class Unasked(Regularizer):
        def shape(self, batch):
            return TokenShaping(penalty=batch.scaled_logp[..., 0] * 0.0)

    with pytest.raises(TypeError, match=r"batch.scaled_logp is None unless the class sets needs_logit_scales"):
        _one_rl_step_weights(tiny_model_dir, 64, lambda: [Unasked()])


def test_two_different_scale_requests_are_refused():
    class Asks(Regularizer):
        def __init__(self, scales, name):
            super().__init__(None, name)
            self.needs_logit_scales = scales

    check_stack([Asks((2.0, 0.5), "a"), Asks((2.0, 0.5), "b")])  # the same scales: one set computed
    with pytest.raises(ValueError, match=r"different logit scales: 'a' \(2.0, 0.5\), 'b' \(3.0, 0.5\)"):
        check_stack([Asks((2.0, 0.5), "a"), Asks((3.0, 0.5), "b")])
