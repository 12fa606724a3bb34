"""End-to-end checks of GRPOModule on a tiny random Qwen2 (CPU, a few seconds each)."""
from __future__ import annotations

import math

import warnings

import pytest
import torch

from lit_covrl.algorithms import compute_advantages, zero_variance_groups
from lit_covrl.data import PromptDataModule
from lit_covrl.module import GRPOModule
from lit_covrl.policy import load_policy
from lit_covrl.objectives import ASPO, CEGPPO, CISPO, GSPO, PPOClip
from lit_covrl.regularizers import (
    AEPO,
    AEnt,
    AdaptiveEntropyBonus,
    AdvantageReweighting,
    Archer,
    BAPO,
    ClipCov,
    EntroPIC,
    EntropyAdvantage,
    EntropyBonus,
    EntropyRatioClip,
    HighEntropyTokens,
    KLCov,
    Lopti,
    ReferenceKL,
    Regularizer,
    ERA,
    LpReg,
    SimKO,
    SIREN,
    SteerWeights,
    TrajectoryGTPO,
    WeightedReinforce,
)
from lit_covrl.types import TokenShaping
from tests.helpers import cli_fit_tags, fit, merge_settings, scalar_tags

REQUIRED_TAGS = [
    "rollout/reward_mean", "rollout/accuracy", "rollout/response_length", "rollout/truncated_frac",
    "policy/entropy", "policy/approx_kl", "policy/clip_frac", "policy/grad_norm", "policy/loss",
    "time/rollout_s", "time/update_s", "time/peak_mem_gib", "val/pass@1", "val/pass@k", "val/entropy",
]


class OnesReward:
    """Fraction of the completion's characters that are '1': a dense signal a random model can learn."""

    def __call__(self, completion: str, answer: str) -> float:
        return completion.count("1") / max(len(completion), 1)


def make_module(model_dir: str, **overrides) -> GRPOModule:
    kw = dict(
        model=model_dir, reward=OnesReward(), correct_threshold=0.5,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-2), rollout=dict(group_size=4, max_new_tokens=4),
        eval=dict(samples=4, k=2),
    )
    return GRPOModule(**merge_settings(kw, overrides))


def make_data(**overrides) -> PromptDataModule:
    kw = dict(task="arithmetic", batch_size=4, val_size=4, val_batch_size=4, seed=0)
    kw.update(overrides)
    return PromptDataModule(**kw)


def test_short_fit_changes_weights_and_writes_required_tags(tiny_model_dir, tmp_path):
    module = make_module(tiny_model_dir)
    module.configure_model()
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    fit(module, make_data(), steps=3, log_dir=tmp_path, val_check_interval=2)
    after = module.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "no weight changed"
    tags = scalar_tags(tmp_path)
    missing = [t for t in REQUIRED_TAGS if t not in tags]
    assert not missing, f"missing TensorBoard tags: {missing}"
    assert len(tags["policy/entropy"]) == 3  # one point per RL step
    assert [s for s, _ in tags["policy/loss"]] == sorted(s for s, _ in tags["policy/loss"])
    import resource

    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # this process's peak RSS
    mem = [v for _, v in tags["time/peak_mem_gib"]]
    assert all(0.05 < v <= rss_gib + 1e-6 for v in mem) and mem == sorted(mem), (mem, rss_gib)  # a running peak


def test_a_plateau_scheduler_is_refused_before_the_first_rollout(tiny_model_dir):
    """ReduceLROnPlateau.step() needs a metric: it crashed with a bare TypeError at the end of the
    first RL step, after that step's rollout and updates."""
    module = make_module(tiny_model_dir, lr_scheduler=lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o))
    module.training_step = lambda *a: pytest.fail("a rollout ran")
    with pytest.raises(ValueError, match="model.lr_scheduler: ReduceLROnPlateau is not supported"):
        fit(module, make_data(), steps=1, limit_val_batches=0)


def test_global_step_counts_rollouts_not_updates(tiny_model_dir):
    # 2 mini-batches x 2 epochs = 4 optimizer updates per rollout, still one global step
    module = make_module(tiny_model_dir, update=dict(mini_batch_size=2, ppo_epochs=2))
    trainer = fit(module, make_data(), steps=2, limit_val_batches=0)
    assert trainer.global_step == 2
    assert module.updates_per_rollout == 4


def test_training_raises_the_reward(tiny_model_dir, tmp_path):
    """The metric must actually move: GRPO on a learnable reward for 25 steps."""
    module = make_module(tiny_model_dir, rollout=dict(group_size=8, max_new_tokens=6))
    fit(module, make_data(batch_size=8), steps=25, log_dir=tmp_path, limit_val_batches=0)
    reward = [v for _, v in scalar_tags(tmp_path)["rollout/reward_mean"]]
    first, last = sum(reward[:5]) / 5, sum(reward[-5:]) / 5
    # a random 17-token model emits '1' ~6% of the time; learning should at least triple that
    assert last > max(3 * first, 0.3), (first, last)


def _one_rl_step_weights(model_dir: str, micro: int, regs_factory, **overrides) -> tuple[dict, dict]:
    torch.manual_seed(0)
    module = make_module(
        model_dir, optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        update=dict(micro_batch_size=micro, mini_batch_size=2, ppo_epochs=2, grad_clip=None, **overrides.pop("update", {})),
        **overrides,
    )
    trainer = fit(module, make_data(), steps=1, callbacks=regs_factory(), limit_val_batches=0)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if not k.startswith("time/") and "per_s" not in k}
    return {k: v.detach().clone() for k, v in module.policy.state_dict().items()}, metrics


@pytest.mark.parametrize("micro", [1, 3])
def test_update_is_invariant_to_micro_batch_size(tiny_model_dir, micro):
    """Selection over the whole mini-batch + global aggregation denominators: the weights after
    4 updates (2 mini-batches x 2 epochs) with Clip-Cov, KL-Cov and an entropy bonus are the
    same whether micro-batches hold 1, 3 or all 8 sequences of a mini-batch."""
    def regs():
        return [ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=3), KLCov(ratio=0.1, beta=1.0), EntropyBonus(coef=0.05)]

    ref_w, ref_m = _one_rl_step_weights(tiny_model_dir, 64, regs)
    w, m = _one_rl_step_weights(tiny_model_dir, micro, regs)
    assert ref_m["reg/clip_cov/selected_frac"] > 0 and ref_m["reg/kl_cov/selected_frac"] > 0
    for key in ("reg/clip_cov/selected_frac", "reg/kl_cov/selected_frac", "reg/clip_cov/selected_adv_mean"):
        assert m[key] == pytest.approx(ref_m[key], abs=1e-7), key
    assert m["policy/loss"] == pytest.approx(ref_m["policy/loss"], rel=1e-5, abs=1e-7)
    moved = max((ref_w[k] - load).abs().max().item() for k, load in _initial(tiny_model_dir).items())
    assert moved > 1e-3  # the updates did something
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-4, atol=1e-6)


def _entropic(alpha: float = -0.3, **kw) -> EntroPIC:
    """EntroPIC already applying `alpha` (as after some measured steps: a fresh one applies 0 in
    its first RL step); threshold 0.05 puts most, not all, of the tiny model's tokens above it."""
    reg = EntroPIC(**{"target": 50.0, "kp": 0.01, "ki": 0.01, "threshold": 0.05, **kw})
    reg.load_state_dict({"alpha": alpha, "integral": 0.0, "step": None, "sums": torch.zeros(2, dtype=torch.float64)})
    return reg


def _entropy_controls():
    # stacked: two selections (weights multiply), STEER's weights, a bonus whose coefficient
    # adapts (a target far above the entropy keeps it on and growing), an advantage shift,
    # EntroPIC's term on the high-probability tokens
    return [HighEntropyTokens(top_frac=0.5), EntropyRatioClip(low=0.02, high=0.02), SteerWeights(),
            AdaptiveEntropyBonus(target=50.0, delta=0.01, init_coef=0.02, max_coef=0.1), EntropyAdvantage(),
            WeightedReinforce(positive_weight=0.5, negative_weight=1.5), _entropic()]


def _covariance():
    return [ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=3), KLCov(ratio=0.1, beta=1.0)]


def _archer():
    # Archer's per-token clip range (narrow ranges, so that the tiny model's second update clips
    # on both), its KL scale applied by ReferenceKL, Clip-Cov drawing among the tokens left unclipped
    return [Archer(quantile=0.5, low_entropy_clip_low=0.01, low_entropy_clip_high=0.01, high_entropy_clip_low=0.05,
                   high_entropy_clip_high=0.05, high_entropy_kl_scale=0.25), ReferenceKL(beta=0.5),
            ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=3)]


def _bapo():
    # BAPO's mini-batch range (grids and a target at the tiny model's P / N: the search keeps the
    # start range on three updates and moves c_low to its max and c_high to 1.25 on one), Clip-Cov
    # drawing among the tokens that range leaves unclipped
    return [BAPO(target=0.88, low_start=0.9, low_max=0.99, low_step=0.03, high_start=1.05, high_max=1.3,
                 high_step=0.05), ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=3)]


def _simko():
    # SimKO with a large mix and penalty, so that both act on the tiny model; Clip-Cov (a weight
    # on top of SimKO's) and an entropy bonus (needs_entropy too) stacked with it
    return [SimKO(top_k=3, mix_topk_coef=0.5, tau=0.5, incorrect_top1_scale=2.0),
            ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=3), EntropyBonus(coef=0.05)]


def _lp_reg():
    # Lp-Reg (a threshold that filters the untrained model's near-uniform distributions, half of the
    # negative and a fifth of the positive tokens eligible) with SimKO (the top-k and the min-p proxy
    # from the same forward) and Clip-Cov
    return [LpReg(beta=1.0, min_p=0.5, neg_ratio=0.5, pos_ratio=0.2),
            SimKO(top_k=3, mix_topk_coef=0.5, tau=0.5, incorrect_top1_scale=2.0), ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=3)]


def _siren():
    # SIREN with a large coefficient (its anchor measured on the whole rollout, so every update
    # acts), Clip-Cov and an entropy bonus (the full entropy, besides the nucleus')
    return [SIREN(coef=5.0, top_p=0.9, top_k=8, quantile=0.5), ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=3),
            EntropyBonus(coef=0.05)]


def _siren_lp_reg_simko():
    # the three forward hooks at once: SIREN's nucleus entropy (with grad, and for prepare), Lp-Reg's
    # min-p proxy and SimKO's top-k, all from the same training forward
    return [SIREN(coef=5.0, top_p=0.9, top_k=8, quantile=0.5), LpReg(beta=1.0, min_p=0.5, neg_ratio=0.5, pos_ratio=0.2),
            SimKO(top_k=3, mix_topk_coef=0.5, tau=0.5, incorrect_top1_scale=2.0)]


def _era():
    # ERA with thresholds inside the tiny model's response entropies (~2.78 nats: some positive
    # responses sharpened, others flattened; the current entropy from a forward after the first
    # update), SimKO (a second logp_grad term, the top-k and the scaled log-probs from one forward)
    # and Clip-Cov
    return [ERA(low=2.75, high=2.8), SimKO(top_k=3, mix_topk_coef=0.5, tau=0.5, incorrect_top1_scale=2.0),
            ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=3)]


def _aent():
    # AEnt's clamped-entropy bonus with a large coefficient, next to the full entropy's bonus (both
    # entropies from the same training forward) and Clip-Cov
    return [AEnt(init_coef=0.5, clamp_p=0.3), EntropyBonus(coef=0.05), ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=3)]


def _gtpo():
    # GTPO with the entropy threshold inside the tiny model's response entropies (~2.78 nats: some
    # responses dropped, the others' advantages shifted; the current entropy from a forward after the
    # first update), conflict tokens among its 4-token responses, next to Clip-Cov and SimKO (a weight
    # and a logp_grad term on top of GTPO's weight and advantage shift)
    return [TrajectoryGTPO(entropy_threshold=2.815), ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=3),
            SimKO(top_k=3, mix_topk_coef=0.5, tau=0.5, incorrect_top1_scale=2.0)]


def _lopti():
    # Lopti (eta inside the tiny model's token probabilities, about 1 / 16: both phases train) with AR,
    # Clip-Cov (selecting over the whole mini-batch in each phase), an entropy bonus and a reference KL
    # (penalties the scope restricts to each phase's tokens)
    return [AdvantageReweighting(alpha=0.3), Lopti(eta=0.06), ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=3),
            EntropyBonus(coef=0.05), ReferenceKL(beta=0.5)]


INVARIANCE_CASES = {
    "lopti+ar+cov+kl": (_lopti, lambda: PPOClip(dual_clip=3.0)),
    # KL-Cov's selection and BAPO's range over each phase's tokens only (ctx.in_phase: phase means, N, P / N)
    "lopti+kl_cov+bapo": (lambda: [Lopti(eta=0.06), KLCov(ratio=0.1, beta=1.0), *_bapo()[:1]],
                          lambda: PPOClip(dual_clip=3.0)),
    "lopti+cispo": (lambda: [Lopti(eta=0.06, low_first=False), EntropyBonus(coef=0.05)], lambda: CISPO()),
    "gtpo+cov+simko": (_gtpo, lambda: PPOClip(dual_clip=3.0)),
    "gtpo+gspo": (lambda: [TrajectoryGTPO(entropy_threshold=2.815)], lambda: GSPO(clip_low=0.05, clip_high=0.05)),
    "era+simko+cov": (_era, lambda: PPOClip(dual_clip=3.0)),
    "era+gspo": (lambda: [ERA(low=2.75, high=2.8), ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=3)],
                 lambda: GSPO(clip_low=0.05, clip_high=0.05)),
    "aent+cov": (_aent, lambda: PPOClip(dual_clip=3.0)),
    # AEPO's extra responses (T_high at the first step) in the first rows with advantage 1, their
    # old log-probs from the training forward, next to Clip-Cov, under PPOClip with dual-clip and GSPO
    "aepo+cov": (lambda: [AEPO(), ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=3)], lambda: PPOClip(dual_clip=3.0)),
    "aepo+gspo": (lambda: [AEPO(), ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=3)],
                  lambda: GSPO(clip_low=0.05, clip_high=0.05)),
    # the two newest forward requests at once (scaled log-probs and the clamped entropy)
    "era+aent+cov": (lambda: [ERA(low=2.75, high=2.8), AEnt(init_coef=0.01, clamp_p=0.3),
                              ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=3)], lambda: PPOClip(dual_clip=3.0)),
    "siren+lp_reg+simko": (_siren_lp_reg_simko, lambda: PPOClip(dual_clip=3.0)),
    "lp_reg+simko": (_lp_reg, lambda: PPOClip(dual_clip=3.0)),
    "siren+cov": (_siren, lambda: PPOClip(dual_clip=3.0)),
    "siren+gspo": (_siren, lambda: GSPO(clip_low=0.05, clip_high=0.05)),
    "simko+cov": (_simko, lambda: PPOClip(dual_clip=3.0)),
    "simko+ce_gppo": (_simko, lambda: CEGPPO(clip_low=0.05, clip_high=0.05, beta1=0.5, beta2=1.5)),
    "entropy_controls": (_entropy_controls, None),
    "archer+ref_kl": (_archer, lambda: PPOClip(dual_clip=3.0)),
    "bapo+cov": (_bapo, lambda: PPOClip(dual_clip=3.0)),
    "gspo+cov": (_covariance, lambda: GSPO(clip_low=0.05, clip_high=0.05)),
    "cispo+cov": (_covariance, lambda: CISPO()),
    "ce_gppo+cov": (_covariance, lambda: CEGPPO(clip_low=0.05, clip_high=0.05, beta1=0.5, beta2=1.5)),
    # ASPO with a cap close to 1, so that its soft dual-clip acts too; under Archer's per-token range
    "aspo+cov": (_covariance, lambda: ASPO(clip_low=0.05, clip_high=0.05, dual_clip=1.05)),
    "archer+ref_kl+aspo": (_archer, lambda: ASPO(dual_clip=1.05)),
}
_REFERENCE: dict = {}


@pytest.mark.parametrize("micro", [1, 3])
@pytest.mark.parametrize("case", sorted(INVARIANCE_CASES))
def test_entropy_controls_and_objectives_are_invariant_to_micro_batch_size(tiny_model_dir, case, micro):
    """Every new regularizer (stacked) and every objective (with Clip-Cov and KL-Cov): the
    weights after 4 updates and every logged policy/ and reg/ metric are the same for micro-
    batches of 1, 3 or all 8 sequences of a mini-batch (the selection, quantile, min/max and the
    current entropy are taken over the whole mini-batch)."""
    regs, objective = INVARIANCE_CASES[case]
    kw = {} if objective is None else {"objective": objective()}
    if case not in _REFERENCE:
        _REFERENCE[case] = _one_rl_step_weights(tiny_model_dir, 64, regs, **kw)
    ref_w, ref_m = _REFERENCE[case]
    w, m = _one_rl_step_weights(tiny_model_dir, micro, regs, **kw)
    keys = [k for k in ref_m if k.startswith(("policy/", "reg/")) and k != "policy/lr"]
    assert set(keys) <= set(m)
    for k in keys:
        assert m[k] == pytest.approx(ref_m[k], rel=1e-5, abs=1e-6), k
    if case == "entropy_controls":  # every control acted
        assert 0 < ref_m["reg/high_entropy_tokens/selected_frac"] < 1
        assert ref_m["reg/entropy_ratio_clip/clipped_frac"] > 0
        assert ref_m["reg/steer/weight_mean"] != 1.0 and ref_m["reg/adaptive_entropy/coef"] > 0
        assert ref_m["reg/entropy_advantage/shift_mean"] > 0 and ref_m["reg/entropy_advantage/loss"] != 0
        assert 0 < ref_m["reg/w_reinforce/positive_frac"] < 1
        assert 0 < ref_m["reg/entropic/high_frac"] < 1 and ref_m["reg/entropic/loss"] != 0
    elif case.startswith("simko"):  # both of SimKO's sets non-empty, its weight changed the loss
        assert 0 < ref_m["reg/simko/mixed_frac"] < 1 and 0 < ref_m["reg/simko/top1_penalized_frac"] < 1
        assert ref_m["reg/simko/loss"] != 0 and ref_m["reg/clip_cov/selected_frac"] > 0
    elif case == "lp_reg+simko":  # Lp-Reg selected and regularized tokens next to SimKO's sets
        assert 0 < ref_m["reg/lp_reg/selected_frac"] < 1 and 0 < ref_m["reg/lp_reg/regularized_frac"] < 1
        assert ref_m["reg/lp_reg/loss"] > 0 and ref_m["reg/simko/mixed_frac"] > 0
    elif case == "siren+lp_reg+simko":  # each of the three acted in the same fit
        assert ref_m["reg/siren/loss"] > 0 and ref_m["reg/siren/deviation"] != 0
        assert 0 < ref_m["reg/lp_reg/regularized_frac"] < 1 and ref_m["reg/lp_reg/loss"] > 0
        assert 0 < ref_m["reg/simko/mixed_frac"] < 1 and ref_m["reg/simko/loss"] != 0
    elif case.startswith("era"):  # both of ERA's modes acted and changed the loss
        assert 0 < ref_m["reg/era/sharpened_frac"] < 1 and 0 < ref_m["reg/era/flattened_frac"] < 1
        assert ref_m["reg/era/loss"] != 0 and ref_m["reg/clip_cov/selected_frac"] > 0
        if "aent" in case:
            assert ref_m["reg/aent/loss"] < 0 and 0 < ref_m["reg/aent/clamped_entropy"] < ref_m["policy/entropy"]
    elif case.startswith("siren"):  # the anchored term acted
        assert 0 < ref_m["reg/siren/selected_frac"] < 1 and ref_m["reg/siren/loss"] > 0
        assert ref_m["reg/siren/deviation"] != 0 and ref_m["reg/clip_cov/selected_frac"] > 0
    elif case.startswith("gtpo"):  # conflict tokens found, responses dropped and kept, the loss changed
        assert 0 < ref_m["reg/trajectory_gtpo/conflict_frac"] < 1 and 0 < ref_m["reg/trajectory_gtpo/filtered_frac"] < 1
        assert ref_m["reg/trajectory_gtpo/loss"] != 0
    elif case == "aent+cov":  # the clamped-entropy bonus acted next to the full one
        assert ref_m["reg/aent/loss"] < 0 and 0 < ref_m["reg/aent/clamped_entropy"] < ref_m["policy/entropy"]
        assert ref_m["reg/entropy_bonus/loss"] < 0 and ref_m["reg/clip_cov/selected_frac"] > 0
    elif case.startswith("aepo"):  # extra responses were trained on next to the selection
        assert ref_m["reg/aepo/samples"] > 0 and ref_m["reg/aepo/temperature"] == pytest.approx(1.2)
        assert ref_m["reg/clip_cov/selected_frac"] > 0
    elif case.startswith("archer+ref_kl"):  # the per-token range clipped tokens; the KL scale and Clip-Cov acted
        assert 0 < ref_m["reg/archer/high_entropy_frac"] < 1 and ref_m["reg/archer/loss"] != 0
        assert ref_m["policy/clip_frac"] > 0 and ref_m["reg/ref_kl/loss"] != 0 and ref_m["reg/clip_cov/selected_frac"] > 0
    elif case.startswith("lopti"):  # both phases trained; the scope changed the loss
        assert 0 < ref_m["reg/lopti/low_frac"] < 1 and ref_m["reg/lopti/loss"] != 0
        if "ar" in case:
            assert 0.7 < ref_m["reg/ar/weight_mean"] < 1 and ref_m["reg/ar/loss"] != 0 and ref_m["reg/ref_kl/loss"] != 0
    elif case == "bapo+cov":  # the search moved the bounds off their start, the range clipped tokens
        assert 0.9 < ref_m["reg/bapo/clip_low"] < 0.99 and 1.05 < ref_m["reg/bapo/clip_high"] < 1.3
        assert ref_m["policy/clip_frac"] > 0 and ref_m["reg/bapo/loss"] != 0 and ref_m["reg/clip_cov/selected_frac"] > 0
    else:
        assert ref_m["reg/clip_cov/selected_frac"] > 0 and ref_m["reg/kl_cov/selected_frac"] > 0
    if case == "ce_gppo+cov":  # tokens left the clip range on both sides: their kept gradients took part
        assert ref_m["policy/clip_frac_low"] > 0 and ref_m["policy/clip_frac_high"] > 0
    if "aspo" in case:  # ASPO's soft dual-clip capped weights (their gradient kept) besides its clip
        assert ref_m["policy/soft_clip_frac"] > 0 and ref_m["policy/clip_frac"] > 0
    moved = max((ref_w[k] - load).abs().max().item() for k, load in _initial(tiny_model_dir).items())
    assert moved > 1e-3
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-4, atol=1e-6)


def test_ce_gppo_fit_moves_the_weights_and_is_ppo_clip_at_zero_betas(tiny_model_dir):
    """A short fit (4 updates, one micro-batch each): CE-GPPO with beta1 = beta2 = 0 ends on
    PPOClip's weights exactly; with betas the tokens outside the clip range push too, so the
    weights move and differ from PPOClip's."""
    clip = dict(clip_low=0.05, clip_high=0.05)
    ppo_w, _ = _one_rl_step_weights(tiny_model_dir, 64, list, objective=PPOClip(**clip))
    zero_w, _ = _one_rl_step_weights(tiny_model_dir, 64, list, objective=CEGPPO(beta1=0.0, beta2=0.0, **clip))
    ce_w, m = _one_rl_step_weights(tiny_model_dir, 64, list, objective=CEGPPO(beta1=0.5, beta2=1.5, **clip))
    assert m["policy/clip_frac"] > 0
    for k in ppo_w:
        assert torch.equal(zero_w[k], ppo_w[k]), k
    start = _initial(tiny_model_dir)
    assert max((ce_w[k] - start[k]).abs().max().item() for k in ce_w) > 1e-3
    assert max((ce_w[k] - ppo_w[k]).abs().max().item() for k in ce_w) > 1e-4


class _EntropyProbe(Regularizer):
    """Records what the learner puts in ctx for a regularizer that needs the current entropy."""

    needs_current_entropy = True
    default_name = "probe"

    def __init__(self) -> None:
        super().__init__()
        self.seen = []

    def prepare(self, ctx) -> None:
        self.seen.append((ctx.on_policy, ctx.entropy.clone(), ctx.old_entropy.clone(), ctx.mask.clone()))

    def shape(self, batch):
        return TokenShaping()


@pytest.mark.parametrize("micro", [64, 3])
def test_learner_fills_the_current_entropy(tiny_model_dir, micro):
    """ctx.entropy is the rollout's entropy while on policy and the current policy's after a
    step: from the early training forward (one micro-batch) or a no-grad forward (several),
    the same values either way."""
    probe = _EntropyProbe()
    _one_rl_step_weights(tiny_model_dir, micro, lambda: [probe])
    seen = probe.seen
    assert [on for on, *_ in seen] == [True, False, False, False]  # 2 mini-batches x 2 epochs
    assert torch.equal(seen[0][1], seen[0][2])  # on policy: the rollout's, exactly
    for _, ent, old, mask in seen[1:]:
        assert (ent - old).abs().max() > 1e-4 and ((ent - old) * (1 - mask)).abs().max() == 0
    if micro == 3:
        for (_, e64, *_), (_, e3, *_) in zip(_learner_entropy_reference(tiny_model_dir), seen):
            torch.testing.assert_close(e3, e64, rtol=1e-5, atol=1e-6)


def _learner_entropy_reference(model_dir):
    probe = _EntropyProbe()
    _one_rl_step_weights(model_dir, 64, lambda: [probe])
    return probe.seen


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_single_micro_batch_selection_reuses_the_training_forward(tiny_model_dir, shared_prompt):
    """No wasted pass: when a mini-batch is one micro-batch, the covariance selection of later
    updates uses that micro-batch's training forward, not an extra no-grad forward (4 updates,
    one pass each). With several micro-batches the extra no-grad pass is still needed. A pass is
    one model forward, or two with shared_prompt (the groups' prompts, then the responses)."""
    per_pass = 2 if shared_prompt else 1

    def update_forwards(micro: int) -> int:
        module = make_module(
            tiny_model_dir, update=dict(micro_batch_size=micro, mini_batch_size=2, ppo_epochs=2),
            system=dict(shared_prompt=shared_prompt),
        )
        module.configure_model()
        calls = []
        module.policy.register_forward_pre_hook(lambda *_: calls.append(1))
        update = module.learner.update

        def counted(*a, **k):
            calls.clear()
            out = update(*a, **k)
            counted.n = len(calls)
            return out

        module.learner.update = counted
        fit(module, make_data(), steps=1, callbacks=[ClipCov(ratio=0.1, lb=-1e9, ub=1e9)], limit_val_batches=0)
        return counted.n

    assert update_forwards(64) == 4 * per_pass  # 4 updates x 1 micro-batch, no recomputation
    # 3 micro-batches each + a no-grad pass from update 2 on
    assert update_forwards(3) == (4 * 3 + 3 * 3) * per_pass


def _initial(model_dir: str) -> dict:
    return load_policy(model_dir).state_dict()


def test_saved_tiny_model_loads_like_a_hub_model(tiny_model_dir):
    model = load_policy(tiny_model_dir)
    module = make_module(tiny_model_dir)
    module.configure_model()
    for k, v in model.state_dict().items():
        assert torch.equal(v, module.policy.state_dict()[k])
    assert module.tokenizer.padding_side == "left"


class FlakyReward:
    """Raises on every third call; returns NaN or a string on others."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, completion: str, answer: str):
        self.calls += 1
        if self.calls % 3 == 0:
            raise RuntimeError("boom")
        if self.calls % 3 == 1:
            return float("nan")
        return "not a number"


def test_a_failing_reward_never_kills_the_run(tiny_model_dir, tmp_path):
    module = make_module(tiny_model_dir, reward=FlakyReward())
    fit(module, make_data(), steps=2, log_dir=tmp_path, val_check_interval=2)
    tags = scalar_tags(tmp_path)
    assert all(v == 16 for _, v in tags["rollout/reward_errors"])  # every one of the 4x4 items failed
    assert all(v == 0.0 for _, v in tags["rollout/reward_mean"])
    # held-out: 4 prompts x model.eval.samples 4, every one failed (scored 0: pass@1 0 for a reason)
    assert tags["val/reward_errors"] == [(1, 16.0)] and tags["val/pass@1"] == [(1, 0.0)]


@pytest.mark.parametrize(
    "group,field,value,message",
    [
        ("loss", "advantage", "ppo", r"model\.loss\.advantage='ppo' is invalid: valid estimators"),
        ("rollout", "group_size", 1, r"model\.rollout\.group_size=1 is invalid: model\.loss\.advantage='grpo' needs >= 2"),
        ("rollout", "group_size", 0, r"model\.rollout\.group_size=0 is invalid: must be >= 1"),
        ("rollout", "top_p", 0.0, r"model\.rollout\.top_p=0\.0 is invalid: must be in \(0, 1\]"),
        ("rollout", "overlong", "drop", r"model\.rollout\.overlong='drop' is invalid"),
        ("loss", "loss_agg_mode", "mean", r"model\.loss\.loss_agg_mode='mean' is invalid: valid modes"),
        ("loss", "clip_low", 1.5, r"model\.loss\.clip_low=1\.5 is invalid: must be <= 1"),
        ("loss", "dual_clip", 0.5, r"model\.loss\.dual_clip=0\.5 is invalid: must be > 1"),
        ("loss", "logratio_clamp", 0.0, r"model\.loss\.logratio_clamp=0\.0 is invalid: must be > 0 or null"),
        ("loss", "baseline_quantile", 1.0, r"model\.loss\.baseline_quantile=1\.0 is invalid: must be in \(0, 1\)"),
        ("loss", "advantage", "passk", r"model\.loss\.pass_k=None is invalid: model\.loss\.advantage='passk' needs k"),
        ("loss", "pass_k", 2, r"model\.loss\.pass_k=2 is invalid: is the k of model\.loss\.advantage='passk', not of 'grpo'"),
        ("update", "micro_batch_size", 0, r"model\.update\.micro_batch_size=0 is invalid: must be >= 1"),
        ("update", "mini_batch_size", 0, r"model\.update\.mini_batch_size=0 is invalid: must be >= 1 or null"),
        ("update", "grad_clip", 0.0, r"model\.update\.grad_clip=0\.0 is invalid: must be > 0 or null"),
        ("eval", "k", 99, r"model\.eval\.k=99 is invalid: must be <= model\.eval\.samples=4"),
        ("eval", "temperature", 0.0, r"model\.eval\.temperature=0\.0 is invalid: must be a finite number > 0"),
        # a YAML .nan / .inf passed these (review newcomer24): NaN eval temperature scored every
        # validation 0, NaN grad_clip or rollout temperature stopped the run after start-up
        ("eval", "temperature", math.nan, r"model\.eval\.temperature=nan is invalid: must be a finite number > 0"),
        ("rollout", "temperature", math.nan, r"model\.rollout\.temperature=nan is invalid: must be a finite number > 0"),
        ("rollout", "temperature", math.inf, r"model\.rollout\.temperature=inf is invalid: must be a finite number > 0"),
        ("rollout", "overlong_reward", math.nan, r"model\.rollout\.overlong_reward=nan is invalid: must be a finite number"),
        ("update", "grad_clip", math.nan, r"model\.update\.grad_clip=nan is invalid: must be > 0 or null"),
        ("system", "rollout_gather", "never", r"model\.system\.rollout_gather='never' is invalid"),
        ("system", "fsdp_mixed_precision", "fp8", r"model\.system\.fsdp_mixed_precision='fp8' is invalid"),
    ],
)
def test_bad_settings_fail_at_construction_naming_the_full_key(tiny_model_dir, group, field, value, message):
    with pytest.raises(ValueError, match=message):
        make_module(tiny_model_dir, **{group: {field: value}})


@pytest.mark.parametrize("field, value, message", [
    ("correct_threshold", math.nan, r"model\.correct_threshold=nan is invalid: must be a finite number"),
    ("correct_threshold", math.inf, r"model\.correct_threshold=inf is invalid: must be a finite number"),
    ("reward_timeout_s", math.nan, r"model\.reward_timeout_s=nan is invalid: must be a finite number > 0, or null"),
    ("reward_timeout_s", math.inf, r"model\.reward_timeout_s=inf is invalid: must be a finite number > 0, or null"),
])
def test_bad_flat_settings_fail_at_construction(tiny_model_dir, field, value, message):
    """A NaN correct_threshold counted no response correct for the whole run (accuracy, pass@k 0)."""
    with pytest.raises(ValueError, match=message):
        make_module(tiny_model_dir, **{field: value})


def test_a_quantile_baseline_trains_on_the_quantile_advantages_and_needs_a_mean_to_replace(tiny_model_dir, monkeypatch):
    """model.loss.baseline_quantile (QAE) reaches the advantages the learner trains on; RLOO, whose
    baseline is the other samples' mean by definition, refuses it naming the setting."""
    import lit_covrl.step_batch as module_mod  # where the RL step calls compute_advantages, likelihood_ranks
    from lit_covrl.algorithms import group_advantages

    with pytest.raises(ValueError, match=r"model\.loss\.baseline_quantile=0\.4 is invalid: .*not 'rloo'"):
        make_module(tiny_model_dir, loss=dict(advantage="rloo", baseline_quantile=0.4))
    module = make_module(tiny_model_dir, loss=dict(baseline_quantile=0.25))
    module.configure_model()
    rewards_seen, trained_on = [], []
    real_advantages, real_update = module_mod.compute_advantages, module.learner.update
    monkeypatch.setattr(module_mod, "compute_advantages",
                        lambda r, *a, **kw: rewards_seen.append(r.clone()) or real_advantages(r, *a, **kw))
    monkeypatch.setattr(module.learner, "update",
                        lambda rollout, adv, *a, **kw: trained_on.append(adv.clone()) or real_update(rollout, adv, *a, **kw))
    fit(module, make_data(), steps=3, limit_val_batches=0)
    assert len(rewards_seen) == len(trained_on) == 3
    moved = False
    for rewards, advantages in zip(rewards_seen, trained_on):
        want = group_advantages(rewards, 4, baseline_quantile=0.25)
        torch.testing.assert_close(advantages, want)
        moved |= not torch.allclose(want, group_advantages(rewards, 4))
    assert moved  # the quantile changed some step's advantages (the test sees a difference)


class HasOneReward:
    """1 if the completion holds a '1', else 0: a 0/1 reward a random model scores mixed groups on."""

    def __call__(self, completion: str, answer: str) -> float:
        return 1.0 if "1" in completion else 0.0


@pytest.mark.parametrize(
    "loss,rollout,message",
    [
        (dict(advantage="passk", pass_k=0), {}, r"model\.loss\.pass_k=0 is invalid: must be an integer >= 1"),
        (dict(advantage="passk", pass_k=4), {}, r"model\.loss\.pass_k=4 is invalid: must be < model\.rollout\.group_size=4"),
        (dict(advantage="passk", pass_k=2, baseline_quantile=0.4), {},
         r"model\.loss\.baseline_quantile=0\.4 is invalid: .*not 'passk'"),
        (dict(advantage="passk", pass_k=2), dict(overlong="penalize", overlong_reward=-1.0),
         r"model\.rollout\.overlong_reward=-1\.0 is invalid: model\.loss\.advantage='passk' needs rewards in \{0, 1\}"),
    ],
)
def test_bad_pass_k_settings_fail_at_construction_naming_the_field(tiny_model_dir, loss, rollout, message):
    with pytest.raises(ValueError, match=message):
        make_module(tiny_model_dir, reward=HasOneReward(), loss=loss, rollout=rollout)


@pytest.mark.parametrize(
    "weights,n,message",
    [
        ([0.5], 1, r"model\.reward_weights\[0\]=0\.5 is invalid: model\.loss\.advantage='passk' needs rewards in \{0, 1\}"),
        ([1.0, -1.0], 2, r"model\.reward_weights\[1\]=-1\.0 is invalid: .*passk"),
        ([1.0, 1.0], 2, r"model\.reward_weights=\[1\.0, 1\.0\] is invalid: .*weight 1 for one 0/1 reward, 0 for the others$"),
        (None, 2, r"model\.reward_weights=None is invalid: .* \(null weighs each of the 2 rewards 1\)$"),
    ],
)
def test_pass_k_refuses_reward_weights_that_leave_0_1_at_construction(tiny_model_dir, weights, n, message):
    """A 0/1 reward of weight 0.5 (or two of weight 1, summing to 2) passed start-up and stopped the
    run at its first RL step with a traceback; only weights of 0 or 1, at most one 1, keep {0, 1}."""
    passk = dict(advantage="passk", pass_k=2)
    with pytest.raises(ValueError, match=message):
        make_module(tiny_model_dir, reward=[HasOneReward()] * n, reward_weights=weights, loss=passk)
    for ok in ([1.0], [1, 0], [0.0, 1.0]):
        make_module(tiny_model_dir, reward=[HasOneReward()] * len(ok), reward_weights=ok, loss=passk)
    make_module(tiny_model_dir, reward=[HasOneReward()] * 2, reward_weights=[0.5, 0.5])  # grpo: any weights


def test_pass_k_advantage_reaches_the_learner_and_a_non_binary_reward_stops_the_run(tiny_model_dir, monkeypatch):
    """model.loss.advantage: passk trains on Pass@k Training's advantages (not GRPO's); a reward
    other than 0 or 1 stops the run at its first step, naming the setting."""
    import lit_covrl.step_batch as module_mod  # where the RL step calls compute_advantages, likelihood_ranks
    from lit_covrl.algorithms import group_advantages, passk_advantages

    module = make_module(tiny_model_dir, reward=HasOneReward(), loss=dict(advantage="passk", pass_k=2))
    module.configure_model()
    rewards_seen, trained_on = [], []
    real_advantages, real_update = module_mod.compute_advantages, module.learner.update
    monkeypatch.setattr(module_mod, "compute_advantages",
                        lambda r, *a, **kw: rewards_seen.append(r.clone()) or real_advantages(r, *a, **kw))
    monkeypatch.setattr(module.learner, "update",
                        lambda rollout, adv, *a, **kw: trained_on.append(adv.clone()) or real_update(rollout, adv, *a, **kw))
    fit(module, make_data(), steps=3, limit_val_batches=0)
    assert len(rewards_seen) == len(trained_on) == 3
    moved = False
    for rewards, advantages in zip(rewards_seen, trained_on):
        want = passk_advantages(rewards, 4, 2)
        torch.testing.assert_close(advantages, want)
        moved |= not torch.allclose(want, group_advantages(rewards, 4))
    assert moved  # some step's pass@k advantages differ from GRPO's (the test sees a difference)
    module = make_module(tiny_model_dir, loss=dict(advantage="passk", pass_k=2))  # OnesReward: fractions
    with pytest.raises(ValueError, match=r"model\.loss\.advantage='passk' needs rewards in \{0, 1\}.*RL step 0 scored"):
        fit(module, make_data(), steps=1, limit_val_batches=0)


@pytest.mark.parametrize("micro", [1, 3])
def test_pass_k_update_is_invariant_to_micro_batch_size(tiny_model_dir, micro):
    """Pass@k Training's advantages with Clip-Cov and KL-Cov: the weights after 4 updates and the
    policy/ and reg/ metrics are the same for micro-batches of 1, 3 or all 8 sequences."""
    kw = dict(reward=HasOneReward(), loss=dict(advantage="passk", pass_k=2))
    ref_w, ref_m = _one_rl_step_weights(tiny_model_dir, 64, _covariance, **kw)
    w, m = _one_rl_step_weights(tiny_model_dir, micro, _covariance, **kw)
    assert 0 < ref_m["rollout/accuracy"] < 1 and ref_m["rollout/zero_var_group_frac"] < 1  # mixed groups
    for k in [k for k in ref_m if k.startswith(("policy/", "reg/")) and k != "policy/lr"]:
        assert m[k] == pytest.approx(ref_m[k], rel=1e-5, abs=1e-6), k
    moved = max((ref_w[k] - load).abs().max().item() for k, load in _initial(tiny_model_dir).items())
    assert moved > 1e-3
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "loss,rollout,weights,message",
    [
        (dict(unlikeliness=0.0), {}, None, r"model\.loss\.unlikeliness=0\.0 is invalid: must be in \(0, 1\]"),
        (dict(unlikeliness=1.5), {}, None, r"model\.loss\.unlikeliness=1\.5 is invalid: must be in \(0, 1\]"),
        (dict(unlikeliness=True), {}, None, r"model\.loss\.unlikeliness=True is invalid: must be in \(0, 1\]"),
        (dict(unlikeliness=0.25, advantage="passk", pass_k=2), {}, None,
         r"model\.loss\.unlikeliness=0\.25 is invalid: scales the rewards .*'passk' needs them in \{0, 1\}"),
        (dict(unlikeliness=0.25), dict(overlong="penalize", overlong_reward=-1.0), None,
         r"model\.rollout\.overlong_reward=-1\.0 is invalid: model\.loss\.unlikeliness=0\.25 needs rewards in \{0, 1\}"),
        (dict(unlikeliness=0.25), {}, [0.5],
         r"model\.reward_weights\[0\]=0\.5 is invalid: model\.loss\.unlikeliness=0\.25 needs rewards in \{0, 1\}"),
    ],
)
def test_bad_unlikeliness_settings_fail_at_construction_naming_the_field(tiny_model_dir, loss, rollout, weights, message):
    with pytest.raises(ValueError, match=message):
        make_module(tiny_model_dir, reward=HasOneReward(), reward_weights=weights, loss=loss, rollout=rollout)
    make_module(tiny_model_dir, reward=HasOneReward(), loss=dict(unlikeliness=1))  # the bound is allowed
    make_module(tiny_model_dir, reward=HasOneReward(), loss=dict(unlikeliness=0.25, advantage="rloo", baseline_quantile=None))


def _record_advantages(module, monkeypatch):
    """(rewards, old log-probs and response mask at the update, advantages) of every RL step."""
    seen = []
    real_update = module.learner.update
    monkeypatch.setattr(module.learner, "update", lambda rollout, adv, *a, **kw: seen.append(
        (None, rollout.logp.clone(), rollout.response_mask.clone(), adv.clone())) or real_update(rollout, adv, *a, **kw))
    import lit_covrl.step_batch as module_mod  # where the RL step calls compute_advantages, likelihood_ranks

    real_advantages = module_mod.compute_advantages

    def advantages(r, *a, **kw):
        seen.append(r.clone())
        return real_advantages(r, *a, **kw)

    monkeypatch.setattr(module_mod, "compute_advantages", advantages)
    return seen


def test_unlikeliness_reward_reaches_the_learner_and_logs_its_metrics(tiny_model_dir, tmp_path, monkeypatch):
    """model.loss.unlikeliness: the learner trains on GRPO advantages of the rewards scaled by their
    likelihood rank under the old log-probs it trains against (not GRPO's); adv/unlikeliness_*
    are logged every step and move; a reward other than 0 or 1 stops the run naming the setting."""
    from lit_covrl.algorithms import likelihood_ranks, sequence_logprob_means

    module = make_module(tiny_model_dir, reward=HasOneReward(), loss=dict(unlikeliness=0.5))
    module.configure_model()
    seen = _record_advantages(module, monkeypatch)
    fit(module, make_data(), steps=3, log_dir=tmp_path, limit_val_batches=0)
    assert len(seen) == 6
    differs, penalties = False, []
    for rewards, (_, logp, mask, adv) in zip(seen[0::2], seen[1::2]):
        s = sequence_logprob_means(logp, mask)
        want = compute_advantages(rewards, 4, "grpo", unlikeliness=0.5, seq_logp=s)
        torch.testing.assert_close(adv, want)
        differs |= not torch.allclose(want, compute_advantages(rewards, 4, "grpo"))
        mixed = (rewards == 1) & ~zero_variance_groups(rewards, 4)
        penalties.append(float((0.5 * likelihood_ranks(s, 4) / 4)[mixed].mean()) if mixed.any() else 0.0)
    assert differs  # some step's advantages differ from GRPO's (the test sees a difference)
    tags = scalar_tags(tmp_path)
    got = [v for _, v in tags["adv/unlikeliness_penalty"]]
    assert got == pytest.approx(penalties, abs=1e-6) and max(got) > 0 and len(set(got)) > 1, (got, penalties)
    assert len(tags["adv/unlikeliness_correct_seq_logp"]) == 3
    assert all(v < 0 for _, v in tags["adv/unlikeliness_correct_seq_logp"] if v != 0)
    module = make_module(tiny_model_dir, loss=dict(unlikeliness=0.5))  # OnesReward: fractions
    with pytest.raises(ValueError, match=r"model\.loss\.unlikeliness=0\.5 needs rewards in \{0, 1\}.*RL step 0 scored"):
        fit(module, make_data(), steps=1, limit_val_batches=0)


def test_unlikeliness_ranks_are_computed_once_per_rl_step(tiny_model_dir, tmp_path, monkeypatch):
    """The advantages and the adv/unlikeliness_* metrics share one likelihood_ranks per RL step (it
    was computed twice, once for each); given ranks give the same bits as ranks computed inside."""
    import lit_covrl.algorithms as algorithms
    import lit_covrl.algorithms.advantages as advantages_mod
    import lit_covrl.step_batch as module_mod  # where the RL step calls compute_advantages, likelihood_ranks
    from lit_covrl.algorithms import likelihood_ranks, unlikeliness_rewards
    from lit_covrl.metrics import unlikeliness_metrics

    calls = []

    def counted(seq_logp, group_size):
        calls.append(seq_logp.shape)
        return likelihood_ranks(seq_logp, group_size)
    for mod in (algorithms, advantages_mod, module_mod):
        monkeypatch.setattr(mod, "likelihood_ranks", counted, raising=False)
    module = make_module(tiny_model_dir, reward=HasOneReward(), loss=dict(unlikeliness=0.5))
    fit(module, make_data(), steps=2, log_dir=tmp_path, limit_val_batches=0)
    assert len(calls) == 2, calls
    monkeypatch.undo()
    g = torch.Generator().manual_seed(0)
    rewards, s = (torch.rand(12, generator=g) > 0.5).float(), -torch.rand(12, generator=g, dtype=torch.float64)
    s[1] = s[0]  # a tie
    ranks = likelihood_ranks(s, 4)
    assert torch.equal(unlikeliness_rewards(rewards, s, 4, 0.5, ranks), unlikeliness_rewards(rewards, s, 4, 0.5))
    assert torch.equal(compute_advantages(rewards, 4, "grpo", unlikeliness=0.5, seq_logp=s, ranks=ranks),
                       compute_advantages(rewards, 4, "grpo", unlikeliness=0.5, seq_logp=s))
    given, inside = unlikeliness_metrics(rewards, s, 4, 0.5, ranks), unlikeliness_metrics(rewards, s, 4, 0.5)
    assert given.keys() == inside.keys() and all(torch.equal(given[k], inside[k]) for k in given)


def test_unlikeliness_ranks_by_the_recomputed_old_logprobs(tiny_model_dir, monkeypatch):
    """With model.update.recompute_logprobs the ranks come from the recomputed log-probs (those
    the update's ratio uses), so the advantages are computed after the recomputation: here it
    reverses every response's likelihood order, and the trained advantages follow it (Dr.GRPO:
    a group's only correct response keeps its scaled reward, which GRPO's std would cancel)."""
    module = make_module(tiny_model_dir, reward=HasOneReward(), loss=dict(unlikeliness=1.0, advantage="drgrpo"),
                         update=dict(recompute_logprobs=True))
    module.configure_model()
    real = module.learner.recompute_old_logprobs

    def reversed_order(rollout, keep):
        real(rollout, keep)
        rollout.logp = -10.0 - rollout.logp * 0.5  # order of the means reversed, still negative
    monkeypatch.setattr(module.learner, "recompute_old_logprobs", reversed_order)
    seen = _record_advantages(module, monkeypatch)
    fit(module, make_data(), steps=2, limit_val_batches=0)
    from lit_covrl.algorithms import sequence_logprob_means

    differs = False
    for rewards, (_, logp, mask, adv) in zip(seen[0::2], seen[1::2]):
        want = compute_advantages(rewards, 4, "drgrpo", unlikeliness=1.0, seq_logp=sequence_logprob_means(logp, mask))
        torch.testing.assert_close(adv, want)
        sampler_order = compute_advantages(rewards, 4, "drgrpo", unlikeliness=1.0,
                                           seq_logp=sequence_logprob_means((-10.0 - logp) * 2, mask))
        differs |= not torch.allclose(want, sampler_order)
    assert differs


@pytest.mark.parametrize("micro", [1, 3])
def test_unlikeliness_update_is_invariant_to_micro_batch_size(tiny_model_dir, micro):
    """The unlikeliness reward (ranks from recomputed old log-probs, forwarded in the update's
    micro-batches) with Clip-Cov and KL-Cov: the weights after 4 updates and the policy/, reg/ and
    adv/ metrics are the same for micro-batches of 1, 3 or all 8 sequences."""
    kw = dict(reward=HasOneReward(), loss=dict(unlikeliness=0.5), update=dict(recompute_logprobs=True))
    ref_w, ref_m = _one_rl_step_weights(tiny_model_dir, 64, _covariance, **kw)
    w, m = _one_rl_step_weights(tiny_model_dir, micro, _covariance, **kw)
    assert ref_m["adv/unlikeliness_penalty"] > 0  # mixed groups: it scaled some correct response
    for k in [k for k in ref_m if k.startswith(("policy/", "reg/", "adv/")) and k != "policy/lr"]:
        assert m[k] == pytest.approx(ref_m[k], rel=1e-5, abs=1e-6), k
    moved = max((ref_w[k] - load).abs().max().item() for k, load in _initial(tiny_model_dir).items())
    assert moved > 1e-3
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-4, atol=1e-6)


def test_settings_groups_as_dicts_or_dataclasses(tiny_model_dir):
    """A group is the dataclass or a plain dict of its keys; hparams hold plain dicts (what
    checkpoints store and `load_from_checkpoint` passes back)."""
    from lit_covrl.settings import RolloutSettings

    a = make_module(tiny_model_dir, rollout=dict(group_size=2, max_new_tokens=3))
    b = make_module(tiny_model_dir, rollout=RolloutSettings(group_size=2, max_new_tokens=3))
    assert a.settings == b.settings and a.settings.rollout.group_size == 2
    assert a.hparams.rollout == b.hparams.rollout and type(a.hparams.rollout) is dict
    assert a.hparams.rollout["max_new_tokens"] == 3 and a.hparams.eval == {"samples": 4, "k": 2, "temperature": 1.0}
    assert GRPOModule().settings.rollout == RolloutSettings()  # defaults unchanged: G = 8, 16 new tokens
    assert (GRPOModule().settings.rollout.group_size, GRPOModule().settings.rollout.max_new_tokens) == (8, 16)
    with pytest.raises(ValueError, match=r"model\.rollout\.val_k is not a setting \(val_k is model\.eval\.k\)"):
        make_module(tiny_model_dir, rollout=dict(val_k=2))
    with pytest.raises(TypeError, match="model.update must be a UpdateSettings or a dict"):
        make_module(tiny_model_dir, update=[1])


def test_mini_batch_must_divide_batch(tiny_model_dir):
    module = make_module(tiny_model_dir, update=dict(mini_batch_size=3))
    with pytest.raises(ValueError, match="mini_batch_size=3 must divide data.batch_size=4"):
        fit(module, make_data(), steps=1)


def test_dynamic_sampling_needs_a_datamodule_that_draws_fresh_prompts():
    from lit_covrl.settings import RolloutSettings, UpdateSettings
    from lit_covrl.settings_checks import check_fit_plan

    dynamic = RolloutSettings(filter_groups=True, max_gen_rounds=3)

    class Fixed:  # no regen_batch
        pass

    class Fresh:
        def regen_batch(self, index, round, rounds):
            return None

    with pytest.raises(ValueError, match=r"model\.rollout\.max_gen_rounds=3 \(dynamic sampling\) needs a datamodule"):
        check_fit_plan(dynamic, UpdateSettings(), prompts_per_step=4, datamodule=Fixed(), stage="fit")
    check_fit_plan(dynamic, UpdateSettings(), prompts_per_step=4, datamodule=Fresh(), stage="fit")
    check_fit_plan(dynamic, UpdateSettings(), prompts_per_step=4, datamodule=Fixed(), stage="validate")
    check_fit_plan(RolloutSettings(filter_groups=True), UpdateSettings(), prompts_per_step=4, datamodule=Fixed(),
                   stage="fit")  # one round: nothing to draw


def test_reference_model_only_when_a_regularizer_needs_it(tiny_model_dir, tmp_path):
    from lit_covrl.regularizers import ReferenceKL

    plain = make_module(tiny_model_dir)
    fit(plain, make_data(), steps=1, limit_val_batches=0, log_dir=tmp_path / "plain")
    assert plain._reference is None
    assert "time/ref_logp_s" not in scalar_tags(tmp_path / "plain")  # no phase, no tag

    module = make_module(tiny_model_dir, update=dict(mini_batch_size=2))
    trainer = fit(module, make_data(), steps=2, callbacks=[ReferenceKL(beta=0.1, estimator="k3")],
                  log_dir=tmp_path / "ref", limit_val_batches=0)
    assert module._reference is not None
    assert not any(p.requires_grad for p in module._reference.parameters())
    tags = scalar_tags(tmp_path / "ref")
    kl = [v for _, v in tags["reg/ref_kl/kl"]]
    assert all(v > 0 for _, v in tags["time/ref_logp_s"])
    assert kl[0] >= 0 and kl[-1] > 0  # k3 >= 0; the policy moved away from the reference
    ckpt = tmp_path / "c.ckpt"
    trainer.save_checkpoint(ckpt)
    keys = torch.load(ckpt, weights_only=False)["state_dict"]
    assert keys and all(k.startswith("policy.") for k in keys)  # frozen reference is never saved


@pytest.mark.parametrize("policy", ["penalize", "mask"])
def test_truncated_responses_follow_the_overlong_policy(tiny_model_dir, tmp_path, policy):
    # one new token: a random 17-token model almost never emits EOS first, so ~94% are truncated
    module = make_module(tiny_model_dir, rollout=dict(max_new_tokens=1, overlong=policy, overlong_reward=-1.0))
    fit(module, make_data(), steps=2, log_dir=tmp_path, limit_val_batches=0)
    tags = scalar_tags(tmp_path)
    truncated = [v for _, v in tags["rollout/truncated_frac"]]
    assert min(truncated) > 0.5
    if policy == "penalize":
        for (_, r), t in zip(tags["rollout/reward_mean"], truncated):
            assert r <= -t + (1 - t) + 1e-6  # every truncated response scored exactly -1
    else:
        kept = [v for _, v in tags["policy/kept_frac"]]
        assert kept == pytest.approx([1 - t for t in truncated], abs=1e-6)


def always_right(completion: str, answer: str) -> float:
    return 1.0


def test_accuracy_judges_truncated_responses_by_their_score_under_overlong_penalize(tiny_model_dir, tmp_path):
    """rollout/accuracy is correctness (the score before the overlong penalty, as val/pass@1
    judges it); rollout/reward_mean is what was trained on, the penalty included."""
    module = make_module(tiny_model_dir, reward=always_right,
                         rollout=dict(max_new_tokens=1, overlong="penalize", overlong_reward=-1.0))
    fit(module, make_data(), steps=2, log_dir=tmp_path, limit_val_batches=0)
    tags = scalar_tags(tmp_path)
    truncated = [v for _, v in tags["rollout/truncated_frac"]]
    assert min(truncated) > 0.5
    assert [v for _, v in tags["rollout/accuracy"]] == [1.0, 1.0]  # every response scored 1.0
    # a truncated response trains on -1, the others on 1: mean = 1 - 2 t
    assert [v for _, v in tags["rollout/reward_mean"]] == pytest.approx([1 - 2 * t for t in truncated], abs=1e-6)


def flat_for_odd_answers(completion: str, answer: str) -> float:
    """0 for every response to a prompt whose answer is odd (a zero-variance group), else OnesReward."""
    return 0.0 if int(answer) % 2 else OnesReward()(completion, answer)


def test_adaptive_entropy_measures_the_tokens_trained_on(tiny_model_dir, tmp_path, monkeypatch):
    """reg/adaptive_entropy/measured_entropy is the token-mean entropy of the rows kept for the
    update (here the groups dropped by filter_groups left out), not policy/entropy's whole rollout."""
    from lit_covrl.learner import Learner

    kept, every = [], []  # per step: the token-mean entropy of the kept rows, of every row
    update = Learner.update

    def recording(self, rollout, advantages, keep, *args, **kwargs):
        for out, m in ((kept, rollout.response_mask * keep[:, None]), (every, rollout.response_mask)):
            out.append(float((rollout.entropy.double() * m).sum() / m.sum()))
        return update(self, rollout, advantages, keep, *args, **kwargs)

    monkeypatch.setattr(Learner, "update", recording)
    module = make_module(tiny_model_dir, reward=flat_for_odd_answers, rollout=dict(group_size=4, filter_groups=True))
    fit(module, make_data(), steps=2, log_dir=tmp_path, limit_val_batches=0,
        callbacks=[AdaptiveEntropyBonus(target=50.0, delta=0.01)])
    tags = scalar_tags(tmp_path)
    kept_frac = [v for _, v in tags["policy/kept_frac"]]
    assert all(0 < f < 1 for f in kept_frac), kept_frac  # some groups left out, some kept
    measured = [v for _, v in tags["reg/adaptive_entropy/measured_entropy"]]
    assert measured == pytest.approx(kept, rel=1e-6) and measured != pytest.approx(every, rel=1e-6)
    assert [v for _, v in tags["policy/entropy"]] == pytest.approx(every, rel=1e-6)


@pytest.mark.parametrize("micro", [1, 3])
def test_entropic_under_seq_mean_token_mean_is_invariant_to_micro_batch_size(tiny_model_dir, micro):
    """EntroPIC's term divides by the high-probability tokens' own counts (per row and the rows
    holding one, for seq-mean-token-mean): taken over the whole mini-batch, the weights after 4
    updates and its metrics are the same for micro-batches of 1, 3 or all 8 sequences."""
    kw = dict(loss=dict(loss_agg_mode="seq-mean-token-mean"))
    if "entropic/seq" not in _REFERENCE:
        _REFERENCE["entropic/seq"] = _one_rl_step_weights(tiny_model_dir, 64, lambda: [_entropic(alpha=0.5)], **kw)
    ref_w, ref_m = _REFERENCE["entropic/seq"]
    w, m = _one_rl_step_weights(tiny_model_dir, micro, lambda: [_entropic(alpha=0.5)], **kw)
    assert 0 < ref_m["reg/entropic/high_frac"] < 1 and ref_m["reg/entropic/loss"] != 0
    for k in [k for k in ref_m if k.startswith(("policy/", "reg/")) and k != "policy/lr"]:
        assert m[k] == pytest.approx(ref_m[k], rel=1e-5, abs=1e-6), k
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-4, atol=1e-6)


def test_regularizers_see_the_loss_aggregation(tiny_model_dir):
    """MiniBatchContext.agg_mode is the run's model.loss.loss_agg_mode (EntroPIC divides by the
    high-probability tokens' counts of that mode; the default token-mean would be wrong silently)."""
    seen = []

    class Spy(Regularizer):
        def prepare(self, ctx):
            seen.append(ctx.agg_mode)

        def shape(self, batch):
            return TokenShaping()

    fit(make_module(tiny_model_dir, loss=dict(loss_agg_mode="seq-mean-token-sum")), make_data(), steps=1,
        callbacks=[Spy()], limit_val_batches=0)
    assert seen and set(seen) == {"seq-mean-token-sum"}


def test_entropic_fit_moves_alpha_by_the_measured_entropy(tiny_model_dir, tmp_path):
    """Through the module: step 0 runs with alpha 0 (nothing measured yet, no term); from step 1
    alpha = clip(kp e + ki integral) of the previous step's logged error and integral, e = the
    step's token-mean rollout entropy (policy/entropy: no group is filtered here) - target, and
    the term acts (reg/entropic/loss != 0)."""
    reg = EntroPIC(target=50.0, kp=0.001, ki=0.002, threshold=0.05)
    fit(make_module(tiny_model_dir), make_data(), steps=3, log_dir=tmp_path, limit_val_batches=0, callbacks=[reg])
    tags = {k: [v for _, v in series] for k, series in scalar_tags(tmp_path).items()}
    alpha, error, integral = (tags[f"reg/entropic/{k}"] for k in ("alpha", "error", "integral"))
    assert tags["reg/entropic/measured_entropy"] == pytest.approx(tags["policy/entropy"], rel=1e-6)
    assert error == pytest.approx([h - 50.0 for h in tags["policy/entropy"]], rel=1e-6)
    assert integral == pytest.approx([0.0, error[0], error[0] + error[1]], rel=1e-6)
    assert alpha == pytest.approx([0.0, *(0.001 * e + 0.002 * i for e, i in zip(error[:2], integral[:2]))], rel=1e-5)
    assert alpha[2] < alpha[1] < 0  # entropy far below the target: more negative each step
    assert tags["reg/entropic/loss"][0] == 0 and all(v != 0 for v in tags["reg/entropic/loss"][1:])
    assert all(0 < f < 1 for f in tags["reg/entropic/high_frac"])


def test_entropic_config_runs_through_the_cli(tiny_model_dir, tmp_path):
    """configs/cpu/entropic.yaml on the quickstart, through `lit-covrl fit`: the callback is built
    from the YAML and its reg/entropic/ tags are written; alpha moves once a step is measured."""
    tags = cli_fit_tags(tmp_path, "configs/cpu/entropic.yaml", "--model.model", tiny_model_dir,
                        "--model.rollout.group_size", "2", "--model.rollout.max_new_tokens", "3", "--data.batch_size", "2",
                        "--model.update.mini_batch_size", "null", steps=2)
    assert {"reg/entropic/alpha", "reg/entropic/error", "reg/entropic/high_frac", "reg/entropic/loss"} <= set(tags)
    assert tags["reg/entropic/alpha"][0] == 0 and tags["reg/entropic/alpha"][1] != 0


def test_archer_config_runs_through_the_cli(tiny_model_dir, tmp_path):
    """configs/cpu/archer.yaml on the quickstart, through `lit-covrl fit` with two updates per
    rollout: Archer and its ReferenceKL are built from the YAML and their tags are written, the
    high-entropy share every step from that step's responses (under the top 20 % of each response's
    tokens: a token equal to the quantile is low-entropy)."""
    tags = cli_fit_tags(tmp_path, "configs/cpu/archer.yaml", "--model.model", tiny_model_dir,
                        "--model.rollout.group_size", "2", "--model.rollout.max_new_tokens", "6", "--data.batch_size", "8",
                        "--model.update.mini_batch_size", "4", "--model.rollout.filter_groups", "false", steps=2)
    assert {"reg/archer/high_entropy_frac", "reg/archer/loss", "reg/ref_kl/kl", "reg/ref_kl/loss"} <= set(tags)
    assert all(0 < f < 0.5 for f in tags["reg/archer/high_entropy_frac"])
    frac = tags["reg/archer/high_entropy_frac"]
    assert frac[0] != frac[1]  # each step's own responses (the clip and KL acting: the invariance case "archer+ref_kl")


def test_sampler_runs_the_prompt_forward_once_per_group(tiny_model_dir):
    """GRPO's G identical prompt rows share one prompt forward (its KV cache rows are repeated):
    the same samples and log-probs as G separate prompt forwards, with 1/G of the prompt rows."""
    import lit_covrl.sampling.kv_cache as R
    from lit_covrl.policy import load_tokenizer
    from lit_covrl.prompts import encode_prompts

    model, tok = load_policy(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    ids, mask = encode_prompts(tok, ["12+3=", "4+5=", "7+80="], chat_template=False)
    ids, mask = ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0)
    kw = {"max_new_tokens": 4, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    rows = []  # rows of every model forward, counted on the model itself
    hook = model.register_forward_pre_hook(lambda m, a, k: rows.append(k["input_ids"].shape[0]), with_kwargs=True)
    try:
        shared = R.KVCacheSampler().sample(model, ids, mask, generator=torch.Generator().manual_seed(1), **kw)
    finally:
        hook.remove()
    assert rows[0] == 3 and all(r == 12 for r in rows[1:])  # prompt forward on the 3 distinct prompts
    orig = R.forward_with_cache

    def plain_prefill(model, prompt_ids, m):
        return orig(model, None, input_ids=prompt_ids, attention_mask=m,
                    position_ids=R.position_ids_from_mask(m), logits_to_keep=1)

    R.prefill, saved = plain_prefill, R.prefill
    try:
        plain = R.KVCacheSampler().sample(model, ids, mask, generator=torch.Generator().manual_seed(1), **kw)
    finally:
        R.prefill = saved
    assert torch.equal(shared.input_ids, plain.input_ids)
    assert torch.equal(shared.response_mask, plain.response_mask)
    torch.testing.assert_close(shared.logp, plain.logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared.entropy, plain.entropy, atol=1e-5, rtol=0)


def test_step_metrics_reach_loggers_at_lightnings_cadence_and_callbacks_every_step(tiny_model_dir, tmp_path):
    """Metrics are published in one batch (not one `self.log` each): the TensorBoard steps are
    what `self.log(on_step=True)` gives (RL step index, every log_every_n_steps-th step) and every
    metric of the last step is in trainer.callback_metrics (checkpoint monitors, recorders)."""
    import lightning as L

    module = make_module(tiny_model_dir)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=5, log_every_n_steps=2, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        logger=L.pytorch.loggers.TensorBoardLogger(str(tmp_path), name="t"),
    )
    seen = []

    class Seen(L.Callback):
        def on_train_batch_end(self, trainer, *a) -> None:
            seen.append(float(trainer.callback_metrics["rollout/reward_mean"]))

    trainer.callbacks.append(Seen())
    trainer.fit(module, make_data())
    tags = scalar_tags(tmp_path)
    for tag in ("rollout/reward_mean", "policy/loss", "policy/entropy", "cov/top0.2pct", "time/update_s"):
        assert [s for s, _ in sorted(tags[tag])] == [1, 3], tag  # steps 0..4, every 2nd, 0-based
    assert [v for _, v in sorted(tags["rollout/reward_mean"])] == pytest.approx([seen[1], seen[3]])
    assert len(seen) == 5 and {"time/rollout_s", "cov/mean", "policy/grad_norm"} <= set(trainer.callback_metrics)
    bar = trainer.progress_bar_metrics  # short names, so that the bar shows them whole
    assert bar["reward"] == pytest.approx(seen[-1]) and bar["entropy"] == pytest.approx(float(trainer.callback_metrics["policy/entropy"]))


def test_as_floats_keeps_order_and_values():
    from lit_covrl.metrics import as_floats

    got = as_floats({"b": torch.tensor(2.5), "a": 1, "c": torch.tensor([3.0]), "d": 0.25})
    assert list(got) == ["b", "a", "c", "d"] and got == {"b": 2.5, "a": 1.0, "c": 3.0, "d": 0.25}


def test_two_regularizers_with_one_name_are_refused_at_setup(tiny_model_dir):
    from lit_covrl.regularizers import EntropyBonus

    dm = PromptDataModule(task="arithmetic", batch_size=2, val_size=0, seed=0)
    with pytest.raises(ValueError, match="two regularizers are named 'entropy_bonus'.*init_args.name"):
        fit(make_module(tiny_model_dir), dm, steps=1, callbacks=[EntropyBonus(0.01), EntropyBonus(0.02)])
    # distinct names stack (one step runs)
    fit(make_module(tiny_model_dir), dm, steps=1, callbacks=[EntropyBonus(0.01), EntropyBonus(0.02, name="eb2")])


def test_extra_generation_rounds_without_filtering_are_refused():
    from lit_covrl.settings import RolloutSettings

    with pytest.raises(ValueError, match=r"model\.rollout\.max_gen_rounds=3 is invalid: .*filter_groups: true"):
        RolloutSettings(max_gen_rounds=3)  # would be silently ignored
    RolloutSettings(max_gen_rounds=3, filter_groups=True)


def test_a_fit_without_max_steps_is_refused_and_validation_that_cannot_run_is_warned(tiny_model_dir):
    # the prompt stream is endless: max_epochs alone would train forever
    dm = PromptDataModule(task="arithmetic", batch_size=2, val_size=0, seed=0)
    with pytest.raises(ValueError, match=r"trainer\.max_steps=-1 is invalid: the prompt stream is endless"):
        fit(make_module(tiny_model_dir), dm, steps=-1, max_epochs=1, max_time={"seconds": 20})  # (old code: ran on)
    dm = PromptDataModule(task="arithmetic", batch_size=2, val_size=2, seed=0)
    with pytest.warns(UserWarning, match=r"trainer\.val_check_interval=1\.0 .* validation will not run"):
        fit(make_module(tiny_model_dir), dm, steps=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*validation will not run")
        fit(make_module(tiny_model_dir), dm, steps=1, val_check_interval=1)
    for data in (dm, PromptDataModule(task="arithmetic", batch_size=2, val_size=0, seed=0)):
        module = make_module(tiny_model_dir)
        module.training_step = lambda *a: pytest.fail("a rollout ran")  # Lightning divided by it after step 1
        with pytest.raises(ValueError, match=r"trainer\.val_check_interval=0 is invalid: must be >= 1 RL step"):
            fit(module, data, steps=2, val_check_interval=0)


def test_a_negative_val_check_interval_is_refused():
    """Lightning divides by val_check_interval after step 1: a negative one (an int or a fraction)
    is refused at start-up like 0, naming the setting."""
    from lit_covrl.settings_checks import check_run_length

    for v in (-1, -0.5, 0):
        with pytest.raises(ValueError, match=rf"trainer\.val_check_interval={v} is invalid: must be >= 1 RL step"):
            check_run_length(10, v, None, True)


def test_the_reference_model_gets_the_policys_true_half_precision(tiny_model_dir, tmp_path):
    """`trainer.precision: bf16-true` casts the policy (a child module) after configure_model; the
    reference (a plain attribute) must get the same cast, or ReferenceKL at step 0, where the
    policy still equals the reference, is not 0 (1.2e-7 on the tiny model) and the reference
    takes twice the memory."""
    from lit_covrl.regularizers import ReferenceKL

    module = make_module(tiny_model_dir, update=dict(mini_batch_size=None, ppo_epochs=1))
    fit(module, make_data(), steps=1, callbacks=[ReferenceKL(beta=0.1)], log_dir=tmp_path, limit_val_batches=0,
        precision="bf16-true")
    assert next(module.policy.parameters()).dtype == torch.bfloat16
    assert {p.dtype for p in module._reference.parameters()} == {torch.bfloat16}
    assert scalar_tags(tmp_path)["reg/ref_kl/kl"][0][1] == 0.0


def test_callback_metrics_keep_their_precision_under_bf16_true(tiny_model_dir, tmp_path):
    """Inside a bf16-true training step the default dtype is bfloat16: the step metrics that
    checkpoint monitors, early stopping and user callbacks read were rounded to bf16 (an anchor of
    2.462673 read 2.46875), while the logger files had the exact values."""
    module = make_module(tiny_model_dir, update=dict(mini_batch_size=None, ppo_epochs=1))
    trainer = fit(module, make_data(), steps=1, log_dir=tmp_path, limit_val_batches=0, precision="bf16-true")
    value = trainer.callback_metrics["policy/entropy"]
    assert value.dtype == torch.float64
    assert float(value) == pytest.approx(scalar_tags(tmp_path)["policy/entropy"][0][1], rel=1e-6)


class _SolutionReward:
    """A TRL-style batched reward naming the data's answer field (`solution`)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, completions, solution, **kwargs):
        self.seen += solution
        return [1.0 for _ in completions]


def test_a_reward_gets_the_answers_under_the_data_answer_fields_name(tiny_model_dir, tmp_path):
    """answer_field: solution -> a reward `f(completions, solution, **kwargs)` gets the answers as
    `solution` (the reader takes the answer out of the row's columns; before, every call raised a
    TypeError and the whole batch scored 0)."""
    import json

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"q": f"{i}+1=", "solution": str(i + 1)}) + "\n" for i in range(8)))
    reward = _SolutionReward()
    module = make_module(tiny_model_dir, reward=reward)
    data = PromptDataModule(task=None, train_files=[str(rows)], prompt_field="q", answer_field="solution",
                            batch_size=4, seed=0)
    fit(module, data, steps=1, log_dir=tmp_path, limit_val_batches=0)
    assert len(reward.seen) == 4 * 4 and set(reward.seen) <= {str(i + 1) for i in range(8)}
    assert scalar_tags(tmp_path)["rollout/reward_errors"][0][1] == 0


@pytest.mark.parametrize("extra,message", [
    # and it said the hub id was malformed, not that the folder does not exist
    (["--model.model", "/no/such/model"], "OSError: model.model='/no/such/model' could not be loaded: no such model folder"),
    (["--model.tokenizer", "/no/such/tok"], "OSError: model.tokenizer='/no/such/tok' could not be loaded: no such model folder"),
    (["--model.model", "./models/nope"], "model.model='./models/nope' could not be loaded: no such model folder: ./models/nope"),
    (["--data.batch_size", "0"], "data.batch_size must be >= 1, got 0"),
    (["--model.dtype", "float64"], "model.dtype='float64' is not supported"),
])
def test_start_up_errors_name_the_setting(extra, message, tmp_path, capsys):
    """Hugging Face's "Repo id must be in the form ..." named neither model.model nor
    model.tokenizer; the data and dtype checks gave the key without its group."""
    from lit_covrl.cli import main
    from tests.test_configs import QUICK

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(QUICK), *extra, "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lit-covrl: error: ") and message in err, err


def test_the_end_of_fit_message_offers_tensorboard_only_for_its_logs(tiny_model_dir, tmp_path, capsys):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    L.Trainer(accelerator="cpu", max_steps=1, logger=CSVLogger(str(tmp_path)), enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
              ).fit(make_module(tiny_model_dir), make_data())
    out = capsys.readouterr().out
    assert "logs:" in out and "tensorboard --logdir" not in out
    fit(make_module(tiny_model_dir), make_data(), steps=1, limit_val_batches=0, log_dir=tmp_path)
    assert "tensorboard --logdir" in capsys.readouterr().out


def test_a_fit_samples_in_batches(tiny_model_dir, tmp_path):
    """model.rollout.sampling_batch_size through a real RL step: 16 rows sampled 5 at a time."""
    module = make_module(tiny_model_dir, rollout=dict(sampling_batch_size=5))
    fit(module, make_data(), steps=2, log_dir=tmp_path)
    tags = scalar_tags(tmp_path)
    assert len(tags["policy/entropy"]) == 2 and all(v == v for _, v in tags["policy/loss"])


def test_a_time_based_validation_interval_is_accepted(tiny_model_dir):
    """`trainer.val_check_interval` as a timedelta (Lightning validates every so much time): the
    run-length check read `trainer.val_check_interval`, which such a trainer lacks (AttributeError)."""
    from datetime import timedelta

    from tests.helpers import fit

    trainer = fit(make_module(tiny_model_dir), make_data(), steps=2, val_check_interval=timedelta(hours=1))
    assert trainer.global_step == 2


def test_unlikeliness_metrics_by_hand_and_over_ranks(monkeypatch):
    """adv/unlikeliness_* cover the correct responses of mixed groups only, summed over ranks.
    Group A (mixed): ranks 3, 2, 1, 0 by seq log-prob; its correct responses 0 (rank 3, cut
    0.5 * 3/4) and 2 (rank 1, cut 0.5 * 1/4). Group B (all correct, advantage 0) is left out."""
    import pytest

    from lit_covrl import distributed
    from lit_covrl.metrics import unlikeliness_metrics

    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    seq = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0])
    m = unlikeliness_metrics(rewards, seq, 4, 0.5)
    assert m["adv/unlikeliness_penalty"].item() == pytest.approx(0.25)
    assert m["adv/unlikeliness_correct_seq_logp"].item() == pytest.approx(-2.0)
    # another rank: one more correct response of a mixed group, cut 0.125, seq log-prob -10
    monkeypatch.setattr(distributed, "all_sum", lambda x: x + torch.tensor([0.125, -10.0, 1.0], dtype=x.dtype))
    m = unlikeliness_metrics(rewards, seq, 4, 0.5)
    assert m["adv/unlikeliness_penalty"].item() == pytest.approx(0.625 / 3)
    assert m["adv/unlikeliness_correct_seq_logp"].item() == pytest.approx(-14.0 / 3)
