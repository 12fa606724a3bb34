"""Settings and metrics reach the code that uses them: each test here fails if one setting of a
control, objective or check stops being passed on (a schedule that no longer moves its coefficient,
a clamp the objective drops, a position-table offset added instead of taken off, a buffer the
finite-weights check skips), or if a logged metric reports something else than its name says. The
underlying tensor functions are tested elsewhere; these test the wiring."""
from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lit_covrl.algorithms import ppo_clipped_tokens, ppo_token_loss
from lit_covrl.objectives import ASPO, CEGPPO, CISPO, GSPO, PPOClip
from lit_covrl.regularizers import EntropyBonus, KLCov, ReferenceKL, Schedule
from lit_covrl.regularizers.base import MiniBatchContext
from lit_covrl.types import PolicyBatch


def _ctx(n=4, t=3, step=0, entropy=None, old_entropy=None, mask=None, on_policy=False):
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(n, t, dtype=torch.float64) if mask is None else mask
    logp = -torch.rand(n, t, generator=g, dtype=torch.float64)
    old = logp + 0.01 * torch.randn(n, t, generator=g, dtype=torch.float64)
    adv = torch.randn(n, 1, generator=g, dtype=torch.float64).expand(n, t).clone()
    clipped = torch.zeros(n, t, dtype=torch.bool)
    return MiniBatchContext(step, 1, on_policy, logp, old, adv, mask, clipped, old_entropy=old_entropy, entropy=entropy)


# --- schedules the coefficient metric must follow -----------------------------------
def test_kl_cov_schedule_anneals_beta_by_default():
    """KLCov's schedule moves beta by default, the ratio with schedule_on: ratio."""
    reg = KLCov(ratio=0.5, beta=1.0, schedule=Schedule(name="linear", final=0.0, steps=10))
    reg.prepare(_ctx(step=5))
    m = reg.pop_metrics()
    assert m["reg/kl_cov/coef"] == pytest.approx(0.5) and m["reg/kl_cov/ratio"] == pytest.approx(0.5)
    reg = KLCov(ratio=0.5, beta=1.0, schedule=Schedule(name="linear", final=0.0, steps=10), schedule_on="ratio")
    reg.prepare(_ctx(step=5))
    m = reg.pop_metrics()
    assert m["reg/kl_cov/coef"] == pytest.approx(1.0) and m["reg/kl_cov/ratio"] == pytest.approx(0.25)


def test_reference_kl_schedule_anneals_beta():
    """ReferenceKL's schedule moves its beta."""
    reg = ReferenceKL(beta=0.1, schedule=Schedule(name="linear", final=0.0, steps=10))
    reg.prepare(_ctx(step=5))
    assert reg.pop_metrics()["reg/ref_kl/coef"] == pytest.approx(0.05)


def test_entropy_advantage_schedule_anneals_alpha():
    """EntropyAdvantage's schedule moves its alpha."""
    from lit_covrl.regularizers import EntropyAdvantage

    reg = EntropyAdvantage(alpha=0.4, schedule=Schedule(name="linear", final=0.0, steps=10))
    reg.prepare(_ctx(step=5))
    assert reg.pop_metrics()["reg/entropy_advantage/coef"] == pytest.approx(0.2)


# --- metrics -----------------------------------------------------------
def test_adaptive_entropy_measures_every_mini_batch_of_the_step():
    """The measured entropy is the step's, over every mini-batch, not the last one's."""
    from lit_covrl.regularizers import AdaptiveEntropyBonus

    reg = AdaptiveEntropyBonus()
    for h in (1.0, 3.0):
        reg.prepare(_ctx(step=0, old_entropy=torch.full((4, 3), h, dtype=torch.float64)))
    assert reg.pop_metrics()["reg/adaptive_entropy/measured_entropy"] == pytest.approx(2.0)


def test_entropy_advantage_capped_frac_counts_the_capped_tokens():
    """capped_frac is the fraction of tokens whose entropy term was capped."""
    from lit_covrl.regularizers import EntropyAdvantage

    reg = EntropyAdvantage(alpha=1.0, kappa=2.0)
    reg.prepare(_ctx())
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    ent = torch.tensor([[0.1, 2.0], [2.0, 2.0]], dtype=torch.float64)  # capped where H > |A| / 2
    mask = torch.ones(2, 2, dtype=torch.float64)
    reg.shape(PolicyBatch(torch.arange(2), torch.zeros(2, 2), torch.zeros(2, 2), adv, mask, ent, None, None))
    assert reg.pop_metrics()["reg/entropy_advantage/capped_frac"] == pytest.approx(0.75)
    # a zero-advantage response (a group that scored alike) gets no shift and is not capped: 3 of 6
    adv0 = torch.cat([adv, torch.zeros(1, 2, dtype=torch.float64)])
    ent0, mask0 = torch.cat([ent, torch.full((1, 2), 2.0, dtype=torch.float64)]), torch.ones(3, 2, dtype=torch.float64)
    reg.shape(PolicyBatch(torch.arange(3), torch.zeros(3, 2), torch.zeros(3, 2), adv0, mask0, ent0, None, None))
    assert reg.pop_metrics()["reg/entropy_advantage/capped_frac"] == pytest.approx(0.5)


def test_steer_omega_max_is_the_largest_omega():
    """omega_max is the largest |Omega|."""
    from lit_covrl.algorithms import steer_metric
    from lit_covrl.regularizers import SteerWeights

    ent = torch.rand(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    ctx = _ctx(old_entropy=ent)  # STEER reads the rollout entropy
    reg = SteerWeights()
    reg.prepare(ctx)
    metric = steer_metric(ctx.advantages, ent, ctx.logp, ctx.old_logp, ctx.mask)
    assert reg.pop_metrics()["reg/steer/omega_max"] == pytest.approx(float(metric.max()))


@pytest.mark.parametrize("objective", [PPOClip(), GSPO(), CISPO(), CEGPPO(), ASPO(dual_clip=1.01)],
                         ids=["ppo", "gspo", "cispo", "ce_gppo", "aspo"])
def test_objective_stats_use_the_given_token_count(objective):
    """The learner sums micro-batch stats with the
    mini-batch's token count as denominator; a local denominator inflates policy/* by the number of
    micro-batches."""
    ctx = _ctx()
    own = objective.stats(ctx.logp, ctx.old_logp, ctx.advantages, ctx.mask)
    half = objective.stats(ctx.logp, ctx.old_logp, ctx.advantages, ctx.mask, num_tokens=2 * ctx.mask.sum())
    assert any(float(v) != 0 for v in own.values())
    for k in own:
        assert float(half[k]) == pytest.approx(float(own[k]) / 2), k


# --- objectives honour their settings -----------------------------------------------
def test_ppoclip_passes_logratio_clamp_and_dual_clip_through():
    """PPOClip passes logratio_clamp to its loss and dual_clip to its clipped-token mask (Clip-Cov
    leaves clipped tokens out of its selection)."""
    logp = torch.tensor([[0.0, -5.0, -1.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-3.0, 0.0, -1.0]], dtype=torch.float64)
    adv = torch.tensor([[-1.0, -1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.float64)
    obj = PPOClip(clip_low=0.2, clip_high=0.2, dual_clip=3.0, logratio_clamp=1.0)
    kw = dict(clip_low=0.2, clip_high=0.2, dual_clip=3.0, logratio_clamp=1.0)
    assert torch.equal(obj.token_loss(logp, old, adv, mask), ppo_token_loss(logp, old, adv, mask, **kw))
    obj = PPOClip(clip_low=0.2, clip_high=0.2, dual_clip=3.0, logratio_clamp=None)
    kw["logratio_clamp"] = None
    got = obj.clipped_tokens(logp.detach(), old, adv, mask)
    assert torch.equal(got, ppo_clipped_tokens(logp.detach(), old, adv, mask, **kw)) and bool(got[0, 0])


def test_gspo_clamps_the_sequence_logratio_by_default():
    """Every objective clamps the log-ratio at 20 by default."""
    assert GSPO().logratio_clamp == 20.0
    assert PPOClip().logratio_clamp == 20.0 and CISPO().logratio_clamp == 20.0 and CEGPPO().logratio_clamp == 20.0


# --- boundary validation ---------------------------------------------------
@pytest.mark.parametrize("build", [
    lambda: __import__("lit_covrl.regularizers", fromlist=["ClipCov"]).ClipCov(lb=1.0, ub=1.0),  # selects nothing, ever
    lambda: __import__("lit_covrl.regularizers", fromlist=["EntropyRatioClip"]).EntropyRatioClip(low=1.5),
    lambda: __import__("lit_covrl.regularizers", fromlist=["AdaptiveEntropyBonus"]).AdaptiveEntropyBonus(min_coef=0.004, init_coef=0.0),
    lambda: __import__("lit_covrl.regularizers", fromlist=["AdaptiveEntropyBonus"]).AdaptiveEntropyBonus(delta=-1e-4),
    lambda: PPOClip(logratio_clamp=0.0),
    lambda: PPOClip(dual_clip=1.0),
], ids=["clip_cov_lb_eq_ub", "erc_low_over_1", "adaptive_min_over_init", "adaptive_negative_delta", "zero_clamp", "dual_clip_1"])
def test_boundary_settings_are_refused(build):
    with pytest.raises(ValueError):
        build()


def test_boundary_settings_that_are_legal_are_accepted():
    """Clip ranges at their legal ends are accepted."""
    PPOClip(clip_low=0.0, clip_high=0.0)
    PPOClip(clip_low=1.0)
    CISPO(clip_low=1.0, clip_high=0.0)


# --- policy.py -------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = nn.Linear(2, 2)
        self.register_buffer("scale", torch.ones(3))


def test_check_finite_weights_sees_inf_only_parameters_buffers_and_names_the_first():
    """An inf-only parameter is caught, buffers are checked, and the first bad tensor is named."""
    from lit_covrl.policy import check_finite_weights, first_nonfinite

    net = _Net()
    with torch.no_grad():
        net.a.weight[0, 0] = float("inf")
    assert first_nonfinite(net.named_parameters()) == "a.weight"
    with torch.no_grad():
        net.b.bias[0] = float("nan")
    assert first_nonfinite(net.named_parameters()) == "a.weight"
    net = _Net()
    net.scale[1] = float("nan")
    with pytest.raises(ValueError, match="buffer 'scale'"):
        check_finite_weights(net, "x")


def test_non_binary_reward_check_is_one_decision_of_every_rank(monkeypatch):
    """Under DDP a rank whose own rewards are all 0 / 1 stops too when another rank's are not:
    going on alone, it would wait forever at the next collective. The check asks every rank
    (distributed.all_true); here another rank answers no."""
    from lit_covrl import distributed, guards

    asked = []
    monkeypatch.setattr(distributed, "all_true", lambda flag: asked.append(flag) or False)
    with pytest.raises(ValueError, match="RL step 3 scored one on another rank"):
        guards.stop_on_non_binary_rewards(torch.tensor([0.0, 1.0, 1.0, 0.0]), step=3, rank=0, trainer=None)
    assert asked == [True]


def test_non_binary_reward_stop_gives_each_setting_its_reason_and_remedy():
    """The unlikeliness reward's stop said Pass@k's 'it counts correct responses ... or another
    advantage', which does not turn it off."""
    from lit_covrl import guards

    with pytest.raises(ValueError) as err:
        guards.stop_on_non_binary_rewards(torch.tensor([0.0, 0.5]), step=0, rank=0, trainer=None,
                                          setting="model.loss.unlikeliness=0.25")
    text = str(err.value)
    assert text.startswith("model.loss.unlikeliness=0.25 needs rewards in {0, 1} (it ranks the correct responses")
    assert "--model.loss.unlikeliness null" in text and "another advantage" not in text and "counts" not in text
    with pytest.raises(ValueError, match=r"\(it counts correct responses\).* or another advantage\. "):
        guards.stop_on_non_binary_rewards(torch.tensor([0.0, 0.5]), step=0, rank=0, trainer=None)


def test_learned_position_limit_of_an_opt_table_takes_off_its_offset():
    """OPT's embed_positions holds max_position_embeddings + 2 rows (an offset of 2)."""
    from transformers import OPTConfig, OPTForCausalLM

    from lit_covrl.policy import learned_position_limit

    model = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                     num_attention_heads=2, max_position_embeddings=8, word_embed_proj_dim=16))
    assert learned_position_limit(model) == 8


# --- rollout_rng.py -----------------------------------------------------------------------------
def test_a_resume_on_fewer_ranks_reseeds(caplog):
    """2 saved sampler states resumed by 1 rank reseed (and say so), as for any other world size."""
    from lit_covrl.rollout_rng import RolloutRNG

    rng = RolloutRNG(7)
    states = torch.stack([torch.Generator().manual_seed(s).get_state() for s in (1, 2)])
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        rng.load({"rollout_generators": states, "global_step": 3}, rank=0, world_size=1)
    assert "reseeded" in caplog.text
    rng.apply_pending()
    assert torch.equal(rng.generator.get_state(), torch.Generator().manual_seed(rng.resumed_seed(0, 3)).get_state())



def test_a_normal_resume_of_a_whole_run_schedule_does_not_warn(caplog):
    """Resuming a whole-run schedule with the same max_steps says nothing."""
    reg = EntropyBonus(schedule=Schedule(name="linear", final=0.0))
    trainer = SimpleNamespace(max_steps=10)
    reg.setup(trainer, None, "fit")
    ckpt = {}
    reg.on_save_checkpoint(trainer, None, ckpt)
    reg2 = EntropyBonus(schedule=Schedule(name="linear", final=0.0))
    reg2.setup(trainer, None, "fit")
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        reg2.on_load_checkpoint(trainer, None, ckpt)
    assert caplog.text == "" and reg2.schedule.steps == 9


def test_a_time_based_validation_interval_gets_no_never_validates_warning(tiny_model_dir):
    """A timedelta validation interval does validate: no warning that it never will."""
    from datetime import timedelta

    from tests.helpers import fit
    from tests.test_module import make_data, make_module

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fit(make_module(tiny_model_dir), make_data(), steps=1, val_check_interval=timedelta(hours=1))
    assert not [w for w in seen if "validation will not run" in str(w.message)]
