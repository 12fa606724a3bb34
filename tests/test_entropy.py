"""Chunked log-probs and entropy against naive full-softmax versions (values and gradients)."""
import math

import pytest
import torch

from lit_covrl.algorithms import masked_entropy, masked_mean, token_entropy, token_logprobs, token_topk_logprobs

F64 = torch.float64


def _logits(seed=0, shape=(3, 5, 11), dtype=F64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=F64)).to(dtype)


def _naive_entropy(logits):
    p = torch.softmax(logits, -1)
    return -(p * torch.log(p)).sum(-1)


def test_entropy_hand_values():
    # uniform over V=8: log 8; two equal logits and the rest -inf-like: log 2; one dominant: ~0
    logits = torch.tensor([[0.0] * 8, [5.0, 5.0] + [-1e4] * 6, [1e4] + [0.0] * 7], dtype=F64)
    h = token_entropy(logits)
    torch.testing.assert_close(h, torch.tensor([math.log(8), math.log(2), 0.0], dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_entropy_matches_naive_value_and_grad(chunk_size):
    x = _logits().requires_grad_(True)
    y = x.detach().clone().requires_grad_(True)
    w = torch.randn(3, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    h = token_entropy(x, chunk_size=chunk_size)
    h_ref = _naive_entropy(y)
    assert h.shape == (3, 5)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-12)
    (gx,) = torch.autograd.grad((h * w).sum(), x)
    (gy,) = torch.autograd.grad((h_ref * w).sum(), y)
    torch.testing.assert_close(gx, gy, rtol=0, atol=1e-12)


def test_entropy_bf16_input_float32_output():
    x = _logits(dtype=torch.bfloat16).requires_grad_(True)
    h = token_entropy(x, chunk_size=4)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, _naive_entropy(x.detach().float()), rtol=0, atol=1e-5)
    h.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
    y = x.detach().float().requires_grad_(True)
    _naive_entropy(y).sum().backward()
    torch.testing.assert_close(x.grad.float(), y.grad, rtol=0.02, atol=1e-2)  # bf16 rounding of grad


def test_entropy_with_neg_inf_logits_is_finite():
    # masked vocab: entropy is that of the remaining entries (uniform over 3 -> log 3)
    x = torch.tensor([[0.0, 0.0, 0.0, float("-inf")]], requires_grad=True)
    h = token_entropy(x)
    assert h.item() == pytest.approx(math.log(3), abs=1e-6)
    h.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_no_grad_path_and_empty():
    x = _logits()
    with torch.no_grad():
        h = token_entropy(x.requires_grad_(True), chunk_size=2)
    assert not h.requires_grad
    assert token_entropy(torch.zeros(0, 7)).shape == (0,)
    with pytest.raises(ValueError, match="chunk_size"):
        token_entropy(x, chunk_size=0)


@pytest.mark.parametrize("temperature,chunk_size", [(1.0, 4096), (0.7, 4), (1.3, 1)])
def test_logprobs_match_log_softmax_gather(temperature, chunk_size):
    x = _logits(seed=2).requires_grad_(True)
    y = x.detach().clone().requires_grad_(True)
    labels = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(3))
    lp = token_logprobs(x, labels, temperature=temperature, chunk_size=chunk_size)
    ref = torch.log_softmax(y / temperature, -1).gather(-1, labels[..., None]).squeeze(-1)
    assert lp.shape == labels.shape
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-12)
    (gx,) = torch.autograd.grad(lp.sum(), x)
    (gy,) = torch.autograd.grad(ref.sum(), y)
    torch.testing.assert_close(gx, gy, rtol=0, atol=1e-12)


def test_logprobs_hand_value_and_bf16():
    # logits [0, log 3] -> softmax [1/4, 3/4]; at T = 2 logits [0, log(3)/2] -> [1/(1+sqrt3), sqrt3/(1+sqrt3)]
    x = torch.tensor([[0.0, math.log(3)]], dtype=F64)
    assert token_logprobs(x, torch.tensor([1])).item() == pytest.approx(math.log(0.75), abs=1e-12)
    s3 = math.sqrt(3)
    assert token_logprobs(x, torch.tensor([0]), temperature=2.0).item() == pytest.approx(
        math.log(1 / (1 + s3)), abs=1e-12)
    xb = _logits(seed=5, dtype=torch.bfloat16)
    labels = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(6))
    lp = token_logprobs(xb, labels, chunk_size=3)
    assert lp.dtype == torch.float32
    ref = torch.log_softmax(xb.float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(xb, labels, temperature=0.0)


def test_masked_mean_and_entropy():
    x = torch.tensor([[1.0, 3.0, float("nan")], [5.0, float("inf"), 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # (1 + 3 + 5) / 3 = 3; per row: 2, 5
    assert masked_mean(x, mask).item() == pytest.approx(3.0)
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor([2.0, 5.0]))
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0
    logits = _logits(seed=7, shape=(2, 3, 6))
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    h = _naive_entropy(logits)
    want = (h[0, 0] + h[0, 1] + h[1, 0]) / 3  # token-mean over the 3 valid tokens
    assert masked_entropy(logits, m, chunk_size=2).item() == pytest.approx(want.item(), abs=1e-12)


def _saved_float32_elements(fn):
    """Elements of float32 tensors that autograd keeps for backward while running ``fn``."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() if t.dtype == torch.float32 else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes)


def test_chunks_are_checkpointed_no_float32_kept_for_backward():
    # bf16 logits [64, 1000]: without per-chunk checkpointing autograd would keep float32 copies
    # (softmax, upcast logits: > 64k elements); with it only the bf16 chunk inputs are saved.
    x = _logits(seed=8, shape=(64, 1000), dtype=torch.bfloat16).requires_grad_(True)
    labels = torch.zeros(64, dtype=torch.long)
    assert _saved_float32_elements(lambda: token_entropy(x, chunk_size=8)) == 0
    assert _saved_float32_elements(lambda: token_logprobs(x, labels, chunk_size=8)) == 0
    # the probe itself can see float32 saves (so the assertion above can fail)
    assert _saved_float32_elements(lambda: torch.softmax(x.float(), -1).sum()) >= 64_000


def test_entropy_is_that_of_the_sampled_distribution_at_temperature():
    """H(softmax(z / tau)), as verl and the paper's code compute it (logits divided by the
    temperature first). Hand values for z = [3, 2.5, 0, -1], tau = 0.6:
    z / tau = [5, 4.1667, 0, -1.6667]; p = softmax = [0.6922, 0.3007, 0.0047, 0.0013];
    H = -sum p log p = 0.6467 (vs 0.8296 for the softmax of z itself)."""
    z = torch.tensor([[3.0, 2.5, 0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    h = token_entropy(z, temperature=0.6)
    assert h.item() == pytest.approx(0.6467, abs=1e-4)
    assert token_entropy(z).item() == pytest.approx(0.8296, abs=1e-4)
    (g,) = torch.autograd.grad(h.sum(), z)
    p = torch.softmax(z.detach() / 0.6, -1)
    naive = lambda x: -(torch.softmax(x / 0.6, -1) * torch.log_softmax(x / 0.6, -1)).sum()  # noqa: E731
    (g_naive,) = torch.autograd.grad(naive(z), z)
    torch.testing.assert_close(g, g_naive)
    assert p.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="temperature"):
        token_entropy(z, temperature=0.0)


def test_training_forward_entropy_uses_the_training_temperature():
    from lit_covrl.policy import load_policy, response_logprobs

    torch.manual_seed(0)
    model = load_policy("lit_covrl:tiny-arith").eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 7))
    att = torch.ones_like(ids)
    with torch.no_grad():
        ent = response_logprobs(model, ids, att, 4, temperature=0.7, with_entropy=True).entropy
        logits = model(input_ids=ids, attention_mask=att).logits[:, -5:-1].float()
    expected = -(torch.softmax(logits / 0.7, -1) * torch.log_softmax(logits / 0.7, -1)).sum(-1)
    torch.testing.assert_close(ent, expected, rtol=1e-5, atol=1e-5)


def test_confident_tokens_entropy_matches_the_samplers_and_float64():
    """A trained LLM's tokens are mostly confident (H ~ 1e-4 .. 1e-12). The training forward's
    entropy must match the sampler's (EntropyRatioClip divides the two: noise in either clips a
    token whose distribution has not moved) and float64 to well below H itself. The formula
    logsumexp(z) - sum p z had an absolute error of ~1e-5 over a 151,936-token vocabulary, so ERC
    clipped most tokens with H < 1e-4 with the policy unchanged."""
    from lit_covrl.algorithms.entropy_controls import entropy_ratio_keep
    from lit_covrl.sampling.base import token_distribution

    V, n = 151_936, 48
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, V, generator=g) * 2.0
    z[torch.arange(n), torch.randint(V, (n,), generator=g)] += torch.linspace(12, 45, n)  # H ~ 1e-2 .. 1e-12
    logp64 = torch.log_softmax(z.double(), -1)
    h64 = -(logp64.exp() * logp64).sum(-1)
    confident = h64 < 1e-4
    assert int(confident.sum()) >= 20
    for dtype in (torch.float32, torch.bfloat16):
        zz = z.to(dtype)
        h_train = token_entropy(zz, chunk_size=16)
        h_sampler = token_distribution(zz, 1.0, 1.0)[1]
        ref = -(torch.log_softmax(zz.double(), -1).exp() * torch.log_softmax(zz.double(), -1)).sum(-1)
        assert (h_train.double() - ref)[confident].abs().max() < 1e-6
        assert (h_train >= 0).all()
        keep = entropy_ratio_keep(h_train[None], h_sampler[None], torch.ones(1, n), low=0.05, high=0.05)
        assert keep.all(), f"{int((~keep).sum())} of {n} tokens clipped with the policy unchanged"


def test_topk_logprobs_hand_values():
    # logits [log 1, log 2, log 3, log 4] / 10 -> p = [.1, .2, .3, .4]; label 2 is p .3, not the top-1
    x = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=F64))
    lp, top, top1 = token_topk_logprobs(x, torch.tensor([2]), 2)
    assert lp.item() == pytest.approx(math.log(0.3), abs=1e-12)
    assert top.tolist()[0] == pytest.approx([math.log(0.4), math.log(0.3)], abs=1e-12)
    assert top1.tolist() == [False]
    lp, top, top1 = token_topk_logprobs(x, torch.tensor([3]), 1, temperature=0.5)  # p ~ [1, 4, 9, 16] / 30
    assert lp.item() == pytest.approx(math.log(16 / 30), abs=1e-12) and top.item() == pytest.approx(lp.item())
    assert top1.tolist() == [True]
    # d log p_top / d z = onehot(top) - p: the top-1 of [.1 .2 .3 .4] pulls its own logit up by .6
    z = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(token_topk_logprobs(z, torch.tensor([0]), 1)[1].sum(), z)
    assert g.tolist()[0] == pytest.approx([-0.1, -0.2, -0.3, 0.6], abs=1e-12)
    for k in (0, 5):
        with pytest.raises(ValueError, match="k must be"):
            token_topk_logprobs(x, torch.tensor([0]), k)


@pytest.mark.parametrize("temperature,chunk_size,dtype", [(1.0, 4096, F64), (0.7, 4, F64), (1.3, 1, torch.float32),
                                                          (1.0, 3, torch.bfloat16)])
def test_topk_logprobs_against_a_float64_loop(temperature, chunk_size, dtype):
    """The label's log-prob is token_logprobs' to the bit (values and gradients); the top-k
    log-probs and their gradients match a per-position float64 loop over sorted log-softmaxes."""
    x = _logits(seed=7, dtype=dtype).requires_grad_(True)
    labels = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(8))
    lp, top, top1 = token_topk_logprobs(x, labels, 3, temperature=temperature, chunk_size=chunk_size)
    plain = token_logprobs(x, labels, temperature=temperature, chunk_size=chunk_size)
    assert torch.equal(lp, plain)
    (g_lp,) = torch.autograd.grad(lp.sum(), x, retain_graph=True)
    (g_plain,) = torch.autograd.grad(plain.sum(), x)
    assert torch.equal(g_lp, g_plain)
    w = torch.tensor([1.0, -0.5, 2.0], dtype=top.dtype)  # distinct weights per rank: the order matters
    (g_top,) = torch.autograd.grad((top * w).sum(), x)
    ref_top, ref_g = torch.zeros(3, 5, 3, dtype=F64), torch.zeros(3, 5, 11, dtype=F64)
    for i in range(3):
        for t in range(5):
            z = x.detach()[i, t].double().requires_grad_(True)
            ls = torch.log_softmax(z / temperature, -1)
            order = sorted(range(11), key=lambda v: -float(z[v]))[:3]
            assert bool(top1[i, t]) == (order[0] == int(labels[i, t]))
            vals = torch.stack([ls[v] for v in order])
            ref_top[i, t] = vals.detach()
            (ref_g[i, t],) = torch.autograd.grad((vals * w.double()).sum(), z)
    tol = dict(rtol=0, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(top.double(), ref_top, **tol)
    if dtype == torch.bfloat16:  # the gradient w.r.t. bf16 logits is rounded to bf16 (8 bits of mantissa)
        tol = dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(g_top.double(), ref_g, **tol)
