"""KL estimators: hand values, non-negativity, unbiasedness by Monte Carlo, clamp, gradients."""
import math

import pytest
import torch

from lit_covrl.algorithms import KL_ESTIMATORS, kl_penalty


def test_hand_values():
    # pi = 0.5, pi_ref = 0.25: d = log 2
    # k1 = log 2 = 0.693147; k2 = 0.5 log(2)^2 = 0.240227; k3 = 1/2 + log 2 - 1 = 0.193147
    logp = torch.tensor([math.log(0.5)], dtype=torch.float64)
    ref = torch.tensor([math.log(0.25)], dtype=torch.float64)
    l2 = math.log(2)
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(l2, abs=1e-12)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * l2 ** 2, abs=1e-12)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 + l2 - 1, abs=1e-12)
    # equal policies: all zero
    for est in KL_ESTIMATORS:
        assert kl_penalty(ref, ref, est).item() == 0.0


def test_k2_k3_nonnegative():
    g = torch.Generator().manual_seed(1)
    logp = -5 * torch.rand(1000, generator=g)
    ref = -5 * torch.rand(1000, generator=g)
    assert (kl_penalty(logp, ref, "k1") < 0).any()  # k1 can be negative
    assert (kl_penalty(logp, ref, "k2") >= 0).all()
    assert (kl_penalty(logp, ref, "k3") >= 0).all()


def test_k1_k3_unbiased_for_kl_pi_ref():
    # tokens sampled from pi: E[k1] = E[k3] = KL(pi || pi_ref) exactly
    pi = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    ref = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    kl = (pi * (pi / ref).log()).sum().item()  # 0.1957...
    g = torch.Generator().manual_seed(0)
    idx = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    for est in ("k1", "k3"):
        mc = kl_penalty(pi.log()[idx], ref.log()[idx], est).mean().item()
        assert mc == pytest.approx(kl, abs=0.01)


def test_huge_logratio_is_finite_and_k3_is_bounded_like_the_reference():
    logp = torch.tensor([-200.0, 0.0, -15.0, -2.0], requires_grad=True)
    ref = torch.tensor([0.0, -200.0, 0.0, 0.0])
    out = kl_penalty(logp, ref, "k3")
    assert torch.isfinite(out).all()
    # d = -200 and d = -15: exp(15) - 15 - 1 = 3.3e6 unbounded; verl bounds k3 to [-10, 10]
    assert out[0].item() == 10.0 and out[2].item() == 10.0
    # d = +200 -> -d clamped to -20: exp(-20) + 20 - 1 = 19.000000002 -> bounded to 10
    assert out[1].item() == 10.0
    # d = -2: exp(2) - 2 - 1 = 4.389 (inside the bound, unchanged, gradient 1 - e^2)
    assert out[3].item() == pytest.approx(math.exp(2) - 3, rel=1e-6)
    out.sum().backward()
    assert logp.grad[2].item() == 0.0  # was -3.3e6 before the bound
    assert logp.grad[3].item() == pytest.approx(1 - math.exp(2), rel=1e-6)


def test_gradient_through_logp_only():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    ref = torch.tensor([-1.5, -1.0], requires_grad=True)
    kl_penalty(logp, ref, "k3").sum().backward()
    assert ref.grad is None
    # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - exp(ref - logp)
    want = 1 - torch.exp(ref.detach() - logp.detach())
    torch.testing.assert_close(logp.grad, want)


def test_unknown_estimator():
    with pytest.raises(ValueError) as e:
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")
    assert all(k in str(e.value) for k in KL_ESTIMATORS)
