"""What the regularizers ask of the training forward, as one `ForwardAsks` (`ForwardAsks.of`): each
request read from its `needs_*` flag, the largest top-k, two different requests of another kind
refused naming the regularizers and their values (also by `check_stack`), falsy when nothing is
asked; and `policy._token_stats` computing exactly the fields asked."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from lit_covrl.policy import _token_stats
from lit_covrl.regularizers import AEnt, ERA, SIREN, EntropyBonus, LpReg, Regularizer, SimKO
from lit_covrl.regularizers.checks import check_stack
from lit_covrl.types import ForwardAsks, PolicyBatch, TokenShaping, TokenStats


class _Asking(Regularizer):
    """Sets the given `needs_*` flags, shapes nothing."""

    def __init__(self, name: str, **flags) -> None:
        super().__init__(name=name)
        for flag, value in flags.items():
            setattr(self, flag, value)

    def shape(self, batch):
        return TokenShaping()


def test_nothing_asked_is_the_default_and_falsy():
    assert ForwardAsks.of([]) == ForwardAsks.of([EntropyBonus(coef=0.1)]) == ForwardAsks()
    assert ForwardAsks() == ForwardAsks(topk=0, min_p=0.0, topp=None, logit_scales=(), clamp_p=0.0)
    assert not ForwardAsks()
    for asked in (dict(topk=1), dict(min_p=0.1), dict(topp=(0.9, 8)), dict(logit_scales=(2.0,)), dict(clamp_p=0.3)):
        assert ForwardAsks(**asked), asked


def test_every_request_of_the_real_regularizers_in_one():
    """SimKO's top_k 3 next to a probe's 5: the largest; Lp-Reg's min_p, SIREN's nucleus (asked
    twice, the same), ERA's scales (k, 1 / k) and AEnt's clamp_p as given, in the types the forward
    reads (a tuple for a list)."""
    regs = [SimKO(top_k=3), _Asking("probe", needs_topk=5), LpReg(min_p=0.05), SIREN(top_p=0.9, top_k=8),
            SIREN(top_p=0.9, top_k=8, name="siren_2"), ERA(k=4.0), AEnt(clamp_p=0.25),
            _Asking("listed", needs_logit_scales=[4.0, 0.25])]
    asks = ForwardAsks.of(regs)
    assert asks == ForwardAsks(topk=5, min_p=0.05, topp=(0.9, 8), logit_scales=(4.0, 0.25), clamp_p=0.25)
    assert type(asks.topp) is tuple and type(asks.logit_scales) is tuple and asks
    check_stack(regs)  # the same requests: accepted


@pytest.mark.parametrize("flag,values,text", [
    ("needs_min_p", (0.1, 0.2, 0.1),
     "regularizers ask for min-p proxies of different thresholds ('a' (0.1), 'b' (0.2), 'c' (0.1)): the training "
     "forward computes one; give them the same min_p"),
    ("needs_topp_entropy", ((0.9, 8), (0.8, 8), (0.9, 8)),
     "regularizers ask for the entropy of different nuclei (top_p, top_k): 'a' (0.9, 8), 'b' (0.8, 8), "
     "'c' (0.9, 8); the training forward computes one: give them the same top_p and top_k"),
    ("needs_logit_scales", ((2.0, 0.5), (3.0,), (2.0, 0.5)),
     "regularizers ask for log-probs under different logit scales: 'a' (2.0, 0.5), 'b' (3.0,), 'c' (2.0, 0.5); "
     "the training forward computes one set: give them the same scales (ERA's: the same ERA.k)"),
    ("needs_clamped_entropy", (0.3, 0.4, 0.3),
     "regularizers ask for clamped entropies of different clamp_p ('a' (0.3), 'b' (0.4), 'c' (0.3)): the training "
     "forward computes one; give them the same clamp_p"),
])
def test_different_requests_of_one_kind_are_refused_naming_each_asker(flag, values, text):
    """Three askers, two of them alike, and one regularizer that does not ask (not named): refused
    by `ForwardAsks.of` and by `check_stack`, with every asker's name and value."""
    regs = [_Asking(name, **{flag: v}) for name, v in zip("abc", values)] + [_Asking("quiet")]
    for build in (ForwardAsks.of, check_stack):
        with pytest.raises(ValueError, match=f"^{re.escape(text)}$"):
            build(regs)
    assert getattr(ForwardAsks.of(regs[::2]), {"needs_min_p": "min_p", "needs_topp_entropy": "topp",
                                                "needs_logit_scales": "logit_scales",
                                                "needs_clamped_entropy": "clamp_p"}[flag]) == values[0]


def test_two_eras_of_different_k_are_refused_naming_era_k():
    """ERA's scales are (k, 1 / k): the refusal names the field the user set, ERA.k."""
    with pytest.raises(ValueError, match=r"'era' \(2.0, 0.5\), 'era_2' \(4.0, 0.25\); .*the same ERA\.k\)$"):
        check_stack([ERA(k=2.0), ERA(k=4.0, name="era_2")])


def test_different_topk_are_not_refused_the_largest_is_computed():
    regs = [_Asking("a", needs_topk=2), _Asking("b", needs_topk=7), _Asking("c")]
    check_stack(regs)
    assert ForwardAsks.of(regs) == ForwardAsks(topk=7)


def test_each_request_names_its_flag_and_the_field_it_fills():
    """Every field of ForwardAsks: a `Regularizer` flag that asks nothing by default and a
    `TokenStats` / `PolicyBatch` field of the same name (what `explained` names when it is read
    unasked)."""
    batch_fields = {f.name for f in dataclasses.fields(PolicyBatch)}
    flags = ForwardAsks.batch_flags()
    assert [flag for flag, _ in flags.values()] == ["needs_topk", "needs_min_p", "needs_topp_entropy",
                                                    "needs_logit_scales", "needs_clamped_entropy"]
    for stat, (flag, hint) in flags.items():
        assert stat in TokenStats._fields and stat in batch_fields and hint
        assert not getattr(Regularizer, flag)


@pytest.mark.parametrize("asked,filled", [
    (dict(), set()),
    (dict(topk=2), {"topk_logp", "top1"}),
    (dict(min_p=0.5), {"proxy_logp"}),
    (dict(topp=(0.9, 3)), {"topp_entropy"}),
    (dict(logit_scales=(2.0, 0.5)), {"scaled_logp"}),
    (dict(clamp_p=0.3), {"clamped_entropy"}),
    (dict(topk=2, min_p=0.5, topp=(0.9, 3), logit_scales=(2.0,), clamp_p=0.3),
     {"topk_logp", "top1", "proxy_logp", "topp_entropy", "scaled_logp", "clamped_entropy"}),
])
def test_the_forward_computes_exactly_what_is_asked(asked, filled):
    """`_token_stats` fills the asked fields (and the entropy with `with_entropy`), the others None;
    the log-probs are the same to the bit whatever is asked."""
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 3, 10), torch.randint(0, 10, (2, 3))
    plain = _token_stats(logits, labels, 0.7, 4, False, ForwardAsks())
    out = _token_stats(logits, labels, 0.7, 4, True, ForwardAsks(**asked))
    assert {k for k, v in out._asdict().items() if v is not None} == {"logp", "entropy", *filled}
    assert torch.equal(out.logp, plain.logp)
    if "scaled_logp" in filled:
        assert out.scaled_logp.shape == (2, 3, len(asked["logit_scales"]))
