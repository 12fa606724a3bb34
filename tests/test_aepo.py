"""AEPO (Wang et al. 2025, arXiv 2510.08141; 597358816/AEPO): the temperature rule and the choice of
the extra responses by hand and against a float64 loop of the reference's `fit`, the controller's
timing (the entropy of step k decides step k + 1, the first step at T_high), the token-weighted
measurement, the module's splice (extra responses at the chosen temperature in the first rows,
advantage 1, old log-probs of the training forward), an exact resume, start-up refusals and a CLI
fit whose reg/aepo/ tags move. Micro-batch 1 / 3 / all: tests/test_module.py's invariance stacks;
2 gloo processes vs 1: tests/test_distributed_selection.py."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lit_covrl.algorithms import aepo_choose, aepo_temperature
from lit_covrl.regularizers import AEPO
from lit_covrl.regularizers.base import MiniBatchContext, check_stack

F64 = torch.float64


# --- the rules -----------------------------------------------------------------------------------
def test_temperature_by_hand():
    rule = dict(target=0.5, high=1.2, low=0.8)
    assert aepo_temperature(None, **rule) == 1.2  # nothing measured: the reference's entropy starts at 0
    assert aepo_temperature(0.0, **rule) == 1.2
    assert aepo_temperature(0.5, **rule) == 1.2  # at the target: T_high (`entropy <= entropy_base`)
    assert aepo_temperature(0.5000001, **rule) == 0.8
    assert aepo_temperature(3.0, target=0.5, high=2.0, low=0.1) == 0.1


def test_prompts_drawing_extras_are_the_floor_of_the_written_fraction():
    """floor(prompt_frac * B) of the decimal the user wrote: 0.29 * 100 is 28.999999999999996 in
    floating point, which int() made 28 (review newest21)."""
    from lit_covrl.algorithms import aepo_prompts

    cases = {(100, 0.29): 29, (100, 0.57): 57, (50, 0.58): 29, (200, 0.29): 58, (16, 0.25): 4, (7, 0.25): 1,
             (3, 0.25): 0, (10, 1.0): 10, (9, 1 / 3): 2}
    assert {k: aepo_prompts(*k) for k in cases} == cases


def test_choice_by_hand():
    adv = torch.tensor([0.5, -1.0, 0.04, 0.06, 1.0, 2.0, 0.05])  # candidates (> 0.05): rows 0, 3, 4, 5
    pick = lambda **kw: aepo_choose(adv, threshold=0.05, **kw).nonzero().flatten().tolist()  # noqa: E731
    assert pick(sample_num=60, halve=False) == [0, 3, 4, 5]
    assert pick(sample_num=60, halve=True) == [0, 3]  # min(60, 4) // 2
    assert pick(sample_num=2, halve=False) == [0, 3]
    assert pick(sample_num=3, halve=True) == [0]  # min(3, 4) // 2
    assert pick(sample_num=1, halve=True) == []  # 1 // 2
    assert aepo_choose(adv, threshold=1.5, sample_num=60, halve=False).nonzero().flatten().tolist() == [5]
    assert not aepo_choose(torch.zeros(8), threshold=0.05, sample_num=60, halve=False).any()  # all-equal groups


def _reference_choice(adv: list[float], sample_num: int, above: bool, threshold: float = 0.05) -> list[int]:
    """597358816/AEPO ray_trainer.py `fit` as a loop: `_select_by_advantage(threshold=0.05,
    absolute=False)` keeps the rows with advantage > 0.05 in order, then `controller[:sample_num]`
    with sample_num = min(reinforce_sample_num, len(controller)), `// 2` while entropy > base."""
    controller = [i for i, a in enumerate(adv) if a > threshold]
    n = min(sample_num, len(controller))
    if above:
        n = n // 2
    return controller[:n]


@pytest.mark.parametrize("seed", range(6))
def test_choice_matches_a_float64_loop_of_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    G, groups = 5, 4
    rewards = (torch.rand(groups, G, generator=g, dtype=F64) < 0.5).to(F64)
    rewards[0] = 1.0  # an all-correct group: advantage 0, never a candidate
    mean, std = rewards.mean(1, keepdim=True), rewards.std(1, keepdim=True)
    adv = ((rewards - mean) / (std + 1e-6)).flatten()  # GRPO's
    for sample_num in (1, 2, 3, 5, 60):
        for above in (False, True):
            got = aepo_choose(adv, threshold=0.05, sample_num=sample_num, halve=above).nonzero().flatten().tolist()
            assert got == _reference_choice(adv.tolist(), sample_num, above), (sample_num, above)


# --- the controller ------------------------------------------------------------------------------
def _ctx(step: int, entropy: torch.Tensor, mask: torch.Tensor) -> MiniBatchContext:
    z = torch.zeros_like(mask)
    return MiniBatchContext(step, 0, True, z, z, z, mask, None, entropy)


def _measure(reg: AEPO, step: int, value: float, tokens: int = 6) -> None:
    mask = torch.ones(2, tokens // 2)
    reg.prepare(_ctx(step, torch.full_like(mask, value), mask))


def test_controller_follows_the_reference_timing():
    """The reference's `fit`: entropy = 0 before the first step; each step draws at T_high if
    entropy <= entropy_base else T_low, trains, then entropy = the update's measurement. The same
    sequence of temperatures and halvings through the regularizer."""
    measured = [0.7, 0.3, 0.5, 0.9, 0.2]
    reg, entropy, base = AEPO(target_entropy=0.5), 0.0, 0.5
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0])
    for step, h in enumerate(measured):
        expect_t = 1.2 if entropy <= base else 0.8
        n, t = reg.rollout_request(step, num_prompts=8)
        assert (n, t) == (2, expect_t)
        chosen = reg.choose_extra(adv)
        assert int(chosen.sum()) == (2 if entropy > base else 4)  # min(60, 4) // 2 above the target
        _measure(reg, step, h)
        metrics = reg.pop_metrics()
        assert metrics["reg/aepo/temperature"] == expect_t and metrics["reg/aepo/samples"] == int(chosen.sum())
        assert metrics["reg/aepo/candidate_frac"] == pytest.approx(0.8)
        assert ("reg/aepo/measured_entropy" in metrics) == (step > 0)
        if step > 0:
            assert metrics["reg/aepo/measured_entropy"] == pytest.approx(measured[step - 1])
        entropy = h


def test_measurement_weighs_every_token_of_the_step():
    """Two mini-batches of one step (3 and 12 valid tokens, entropies 1 and 2): the step's entropy
    is (3 + 24) / 15 = 1.8, not the mini-batch mean 1.5; it decides the next step only."""
    reg = AEPO(target_entropy=1.6)
    reg.rollout_request(0, 4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    reg.prepare(_ctx(0, torch.ones(1, 4), mask))
    reg.prepare(_ctx(0, torch.full((3, 4), 2.0), torch.ones(3, 4)))
    assert reg.measured_entropy is None  # the step is still open
    assert reg.rollout_request(1, 4) == (1, 0.8)  # 1.8 > 1.6
    assert reg.measured_entropy == pytest.approx(1.8, rel=1e-12)
    assert reg.rollout_request(1, 4) == (1, 0.8)  # the same step asked again: nothing closes
    reg.rollout_request(2, 4)  # step 1 measured nothing (every group filtered out): the last measurement stays
    assert reg.measured_entropy == pytest.approx(1.8, rel=1e-12)


def test_few_prompts_draw_nothing(caplog):
    reg = AEPO()
    with caplog.at_level("WARNING", logger="lit_covrl"):
        assert reg.rollout_request(0, 3) is None  # 3 // 4 = 0 prompts (the reference's `len // 4`)
        assert reg.rollout_request(1, 3) is None
    assert [r.getMessage() for r in caplog.records] == [
        "aepo: 3 prompts per step x prompt_frac 0.25 draw no extra response: AEPO does nothing (raise "
        "data.batch_size or prompt_frac)"]
    assert reg.rollout_request(0, 4) == (1, 1.2)
    assert AEPO(prompt_frac=1.0).rollout_request(0, 3) == (3, 1.2)
    assert AEPO(prompt_frac=0.5).rollout_request(0, 7) == (3, 1.2)


def test_state_round_trip_and_settings_refused():
    reg = AEPO()
    state = reg.state_dict()
    assert (state["measured"], state["step"], state["sums"].tolist()) == (None, None, [0.0, 0.0])
    reg.rollout_request(0, 4)
    _measure(reg, 0, 0.9)
    state = reg.state_dict()
    other = AEPO()
    other.load_state_dict(state)
    assert other.rollout_request(1, 4) == reg.rollout_request(1, 4) == (1, 0.8)
    assert other.measured_entropy == reg.measured_entropy == pytest.approx(0.9)
    bad = {
        "target_entropy": (-0.1, "AEPO.target_entropy=-0.1 is invalid: must be a finite number >= 0"),
        "temperature_high": (0.0, "AEPO.temperature_high=0.0 is invalid: must be a finite number > 0"),
        "temperature_low": (math.nan, "AEPO.temperature_low=nan is invalid: must be a finite number > 0"),
        "sample_num": (0, "AEPO.sample_num=0 is invalid: must be an integer >= 1"),
        "prompt_frac": (1.5, "AEPO.prompt_frac=1.5 is invalid: must be a finite number in (0, 1]"),
        "adv_threshold": (math.inf, "AEPO.adv_threshold=inf is invalid: must be a finite number >= -inf"),
    }
    for field, (value, message) in bad.items():
        with pytest.raises(ValueError) as err:
            AEPO(**{field: value})
        assert str(err.value) == message
    with pytest.raises(ValueError, match=r"2 regularizers draw extra responses \('aepo', 'b'\)"):
        check_stack([AEPO(), AEPO(name="b")])


# --- the module ----------------------------------------------------------------------------------
def test_module_trains_the_chosen_responses_in_the_first_rows(tiny_model_dir, monkeypatch):
    """One RL step through the module: the extra responses are drawn for the first quarter of the
    prompts at T_high, scored and given GRPO advantages; the chosen ones (reward 1 in a mixed
    group) take the place of the first rollout rows with advantage 1 and kept, the rest of the
    rollout as sampled; the old log-probs of the update are the training forward's of the
    spliced batch; the rollout metrics stay the rollout's own."""
    from lit_covrl.learner import Learner
    from tests.helpers import fit
    from tests.test_module import HasOneReward, make_data, make_module

    module = make_module(tiny_model_dir, reward=HasOneReward(), rollout=dict(group_size=4, max_new_tokens=4))
    seen: dict = {"temperatures": []}
    generate, update = module.generate, Learner.update

    def spy_generate(prompts, n, *, temperature, generator):
        out = generate(prompts, n, temperature=temperature, generator=generator)
        seen["temperatures"].append((len(prompts), temperature))
        seen.setdefault("rollouts", []).append(out)
        return out

    def spy_update(self, rollout, advantages, keep, ref_logp, *, step):
        fresh = self.logprobs(self.policy, rollout.input_ids, rollout.attention_mask, rollout.response_mask)
        seen.update(trained=rollout, advantages=advantages.clone(), keep=keep.clone(), fresh=fresh)
        return update(self, rollout, advantages, keep, ref_logp, step=step)

    monkeypatch.setattr(module, "generate", spy_generate)
    monkeypatch.setattr(Learner, "update", spy_update)
    reg = AEPO(target_entropy=0.5)
    trainer = fit(module, make_data(batch_size=8, val_size=0), steps=1, callbacks=[reg], limit_val_batches=0)
    assert seen["temperatures"] == [(8, 1.0), (2, 1.2)]  # the rollout, then 8 // 4 prompts at T_high
    main, extra = seen["rollouts"]
    rewards = torch.tensor([1.0 if "1" in c else 0.0 for c in extra.completions]).view(2, 4)
    mixed = (rewards.std(1) > 0)[:, None].expand(2, 4).flatten()
    chosen = (rewards.flatten() == 1) & mixed
    k = int(chosen.sum())
    assert 0 < k < len(extra.completions)  # some extra responses chosen, some not
    trained = seen["trained"]
    assert trained.completions[:k] == [c for c, pick in zip(extra.completions, chosen) if pick]
    assert trained.completions[k:] == main.completions[k:]
    assert seen["advantages"][:k].tolist() == [1.0] * k and seen["keep"][:k].all()
    torch.testing.assert_close(trained.logp, seen["fresh"], rtol=0, atol=1e-6)  # the training forward's
    m = {k_: float(v) for k_, v in trainer.callback_metrics.items()}
    assert m["reg/aepo/samples"] == k and m["reg/aepo/temperature"] == pytest.approx(1.2)
    main_acc = sum("1" in c for c in main.completions) / len(main.completions)
    assert m["rollout/accuracy"] == pytest.approx(main_acc)  # the rollout's, not the spliced batch's


def test_splice_with_group_filter_overlong_mask_and_reference_kl(tiny_model_dir, monkeypatch):
    """AEPO stacked with filter_groups, `overlong: mask` and ReferenceKL through the module: the
    chosen extra responses are trained although the rollout rows they replace were filtered
    (a zero-variance group or a truncated response), no truncated extra response is chosen, and
    ReferenceKL's reference log-probs are those of the spliced batch, not of the rollout's."""
    import lit_covrl.control_rows as control_rows
    from lit_covrl.learner import Learner
    from lit_covrl.regularizers import ReferenceKL
    from tests.helpers import fit
    from tests.test_module import HasOneReward, make_data, make_module

    module = make_module(tiny_model_dir, reward=HasOneReward(),
                         rollout=dict(group_size=4, max_new_tokens=6, filter_groups=True, overlong="mask"))
    steps: dict = {}
    splice, update = control_rows._splice, Learner.update

    def spy_splice(module_, extra, chosen, rollout, advantages, keep, timer):
        steps[module.global_step] = dict(extra=extra, k=int(chosen.sum()), rollout_keep=keep.clone())
        return splice(module_, extra, chosen, rollout, advantages, keep, timer)

    def spy_update(self, rollout, advantages, keep, ref_logp, *, step):
        if step in steps:
            steps[step].update(trained=rollout, keep=keep.clone(), ref_logp=ref_logp,
                               ref=module._reference_logprobs(rollout))
        return update(self, rollout, advantages, keep, ref_logp, step=step)

    monkeypatch.setattr(control_rows, "_splice", spy_splice)
    monkeypatch.setattr(Learner, "update", spy_update)
    aepo = AEPO(target_entropy=5.0, prompt_frac=1.0)
    fit(module, make_data(batch_size=8, val_size=0), steps=3, callbacks=[aepo, ReferenceKL(beta=0.1)],
        limit_val_batches=0)
    assert steps, "AEPO chose no extra response"
    replaced_filtered = truncated_positive = 0
    for s in steps.values():
        k, extra, trained = s["k"], s["extra"], s["trained"]
        assert s["keep"][:k].all()  # the chosen extra responses are trained
        assert not trained.truncated[:k].any()  # never a truncated extra response
        assert torch.equal(s["ref_logp"], s["ref"])  # the reference forward of the spliced batch
        replaced_filtered += int((~s["rollout_keep"][:k]).sum())
        rewards = torch.tensor([1.0 if "1" in c else 0.0 for c in extra.completions]).view(-1, 4)
        positive = ((rewards > 0) & (rewards.std(1, keepdim=True) > 0)).flatten()  # GRPO advantage > 0
        truncated_positive += int((positive & extra.truncated).sum())
    # the cases these checks decide came up: replaced rows that were filtered, truncated extra
    # responses that their advantage alone would have had chosen
    assert replaced_filtered > 0 and truncated_positive > 0


@pytest.mark.parametrize("unlikeliness", [None, 0.5])
def test_recompute_logprobs_forwards_the_rollout_once_with_the_splice(tiny_model_dir, monkeypatch, unlikeliness):
    """With recompute_logprobs (the default under bf16) the splice's recompute of the spliced batch
    is the step's one pass: the rollout rows it keeps take their values from it, the k rows it
    replaced are forwarded alone, so N + k rows go through the policy's no-grad forward before the
    update where it forwarded the whole rollout, then the whole spliced batch (2N; review
    session20); the rollout's log-probs and entropies (its metrics') are still the training
    forward's, none the sampler's. The unlikeliness reward ranks by the rollout's recomputed
    log-probs before the splice: there the rollout's first pass stays (2N)."""

    import lit_covrl.control_rows as control_rows
    import lit_covrl.step_batch as module_file  # where the RL step calls splice_control_rows
    from lit_covrl.learner import Learner
    from tests.helpers import fit
    from tests.test_module import HasOneReward, make_data, make_module

    module = make_module(tiny_model_dir, reward=HasOneReward(), rollout=dict(group_size=4, max_new_tokens=6),
                         loss=dict(unlikeliness=unlikeliness), update=dict(recompute_logprobs=True))
    count = {"rows": 0}
    steps: list = []
    forward, splice_rows, splice, update = (Learner._nograd_forward, module_file.splice_control_rows,
                                            control_rows._splice, Learner.update)
    generate = module.generate

    def spy_generate(prompts, n, *, temperature, generator):  # the sampler's values off by 1: none may stay
        out = generate(prompts, n, temperature=temperature, generator=generator)
        mask = out.response_mask.to(out.logp.dtype)
        return dataclasses.replace(out, logp=out.logp + mask, entropy=out.entropy + mask)

    def spy_forward(self, model, input_ids, attention_mask, mask, *args, **kw):
        count["rows"] += len(mask) if model is self.policy else 0
        return forward(self, model, input_ids, attention_mask, mask, *args, **kw)

    def spy_splice_rows(module_, reg, batch, rollout, *args, **kw):
        steps.append(dict(rollout=rollout, k=0))
        return splice_rows(module_, reg, batch, rollout, *args, **kw)

    def spy_splice(module_, extra, chosen, *args):
        steps[-1]["k"] = int(chosen.sum())
        return splice(module_, extra, chosen, *args)

    def spy_update(self, *args, step):
        steps[-1]["rows"] = count["rows"]
        rollout = steps[-1]["rollout"]
        steps[-1]["fresh"] = forward(self, self.policy, rollout.input_ids, rollout.attention_mask,
                                     rollout.response_mask, True)
        out = update(self, *args, step=step)
        count["rows"] = 0  # the update's own forwards are not counted
        return out

    monkeypatch.setattr(module, "generate", spy_generate)
    monkeypatch.setattr(Learner, "_nograd_forward", spy_forward)
    monkeypatch.setattr(module_file, "splice_control_rows", spy_splice_rows)
    monkeypatch.setattr(control_rows, "_splice", spy_splice)
    monkeypatch.setattr(Learner, "update", spy_update)
    fit(module, make_data(batch_size=8, val_size=0), steps=3, callbacks=[AEPO(target_entropy=5.0, prompt_frac=1.0)],
        limit_val_batches=0)
    assert len(steps) == 3 and any(s["k"] for s in steps)
    for s in steps:
        n = len(s["rollout"].completions)
        assert s["rows"] <= (2 * n if unlikeliness else n + s["k"]), (s["rows"], n, s["k"])
        rollout, fresh = s["rollout"], s["fresh"]
        torch.testing.assert_close(rollout.logp, fresh.logp, rtol=0, atol=1e-6)
        torch.testing.assert_close(rollout.entropy, fresh.entropy, rtol=0, atol=1e-5)


def _splice_with_group_reader(tiny_model_dir, monkeypatch, **update):
    """One RL step of AEPO (extra responses for all 8 prompts, 4 per group) stacked with
    TrajectoryGTPO, a reader of ctx.groups: (trainer, the rollout the update trained on, the groups
    each mini-batch's context held)."""
    from lit_covrl.learner import Learner
    from lit_covrl.regularizers import TrajectoryGTPO
    from tests.helpers import fit
    from tests.test_module import HasOneReward, make_data, make_module

    module = make_module(tiny_model_dir, reward=HasOneReward(), rollout=dict(group_size=4, max_new_tokens=4),
                         **({"update": update} if update else {}))
    seen: dict = {"groups": []}
    learner_update, prepare = Learner.update, TrajectoryGTPO.prepare

    def spy_update(self, rollout, advantages, keep, ref_logp, *, step):
        seen["trained"] = rollout
        return learner_update(self, rollout, advantages, keep, ref_logp, step=step)

    def spy_prepare(self, ctx):
        seen["groups"].append(ctx.groups.tolist())
        return prepare(self, ctx)

    monkeypatch.setattr(Learner, "update", spy_update)
    monkeypatch.setattr(TrajectoryGTPO, "prepare", spy_prepare)
    trainer = fit(module, make_data(batch_size=8, val_size=0), steps=1, limit_val_batches=0,
                  callbacks=[AEPO(target_entropy=5.0, prompt_frac=1.0), TrajectoryGTPO(entropy_threshold=50.0)])
    return trainer, seen["trained"], seen["groups"]


def test_spliced_rows_keep_the_prompt_they_answer_for_the_group_readers(tiny_model_dir, monkeypatch):
    """The extra responses take the first rows, which belonged to other prompts: the spliced batch
    says which prompt each row answers (`Rollout.prompt_index`), and a regularizer reading
    `ctx.groups` (TrajectoryGTPO, whose conflict tokens are within a prompt's responses) sees each
    row's prompt. It saw row // group_size, which put an extra response of prompt 1 into prompt
    0's group (review session20)."""
    trainer, trained, groups = _splice_with_group_reader(tiny_model_dir, monkeypatch)
    k = int(trainer.callback_metrics["reg/aepo/samples"])
    assert trained.prompt_index is not None
    T = trained.response_mask.shape[1]
    prompts = [tuple(ids[m.bool()].tolist()) for ids, m in zip(trained.input_ids[:, :-T], trained.attention_mask[:, :-T])]
    index = trained.prompt_index.tolist()
    assert 0 < k and index[:k] != [n // 4 for n in range(k)]  # the first rows answer other prompts
    assert index[k:] == [n // 4 for n in range(k, 32)]  # the rollout's own rows
    assert all(prompts[i] == prompts[j] for i in range(32) for j in range(32) if index[i] == index[j])
    assert groups == [index]  # one mini-batch of all 32 rows, in row order


def test_mini_batches_keep_each_prompt_s_responses_together_after_a_splice(tiny_model_dir, monkeypatch):
    """Two prompts per mini-batch, extra responses for all 8 prompts: the spliced first rows answer
    prompts of every mini-batch, and each joins its own prompt's mini-batch (mini-batch j: prompts
    2j and 2j + 1, all their rows), so a group reader sees whole groups. Row slices put every
    extra response into mini-batch 0, away from the rest of its group (review newest21)."""
    trainer, trained, groups_seen = _splice_with_group_reader(tiny_model_dir, monkeypatch, mini_batch_size=2)
    k, index = int(trainer.callback_metrics["reg/aepo/samples"]), trained.prompt_index.tolist()
    assert max(index[:k]) >= 2, index[:k]  # extra responses of prompts beyond the first mini-batch
    assert len(groups_seen) == 4
    for j, groups in enumerate(groups_seen):
        assert set(groups) <= {2 * j, 2 * j + 1}, (j, groups)
        assert sorted(groups) == sorted(p for p in index if p // 2 == j)  # every row of its prompts


def test_a_state_saved_mid_step_measures_the_redone_step_alone():
    """A state saved inside step 1 (nonfinite-stop.ckpt is written mid-step) holds two of its
    mini-batches' entropy sums; the resumed run redoes step 1 with a new rollout, and its
    measurement is that rollout's alone (0.6), as uninterrupted, not mixed with the aborted one's
    (0.1; review newest21). A state saved after step 1 still closes step 1 with its own sums.
    The same StepEntropy measures for AdaptiveEntropyBonus and EntroPIC."""

    def ctx(step, value):
        mask = torch.ones(2, 3)
        zero = torch.zeros_like(mask)
        return MiniBatchContext(step, 0, True, zero, zero, zero, mask, None, torch.full_like(mask, value, dtype=F64))

    def measured(reg, *batches):
        for step, value, n in batches:
            reg.rollout_request(step, 8)
            for _ in range(n):
                reg.prepare(ctx(step, value))
        return reg

    aborted = measured(AEPO(target_entropy=0.5), (0, 0.4, 4), (1, 0.1, 2))
    resumed = AEPO(target_entropy=0.5)
    resumed.load_state_dict(aborted.state_dict())
    _, temperature = measured(resumed, (1, 0.6, 4)).rollout_request(2, 8)
    assert resumed.measured_entropy == pytest.approx(0.6, abs=1e-12) and temperature == 0.8
    finished = measured(AEPO(target_entropy=0.5), (0, 0.4, 4), (1, 0.3, 4))
    after = AEPO(target_entropy=0.5)
    after.load_state_dict(finished.state_dict())
    _, temperature = after.rollout_request(2, 8)
    assert after.measured_entropy == pytest.approx(0.3, abs=1e-12) and temperature == 1.2


def test_aepo_measurement_resumes_exactly(tiny_model_dir, tmp_path):
    """The measured entropy travels in the checkpoint: with target 0 every measurement is above it,
    so steps 1-3 draw at T_low and take half as many; a resume at step 2 that lost the measurement
    would draw at T_high there."""
    from tests.test_module import make_data, make_module
    from tests.test_resume import _series, _trainer

    def regs():
        return [AEPO(target_entropy=0.0, temperature_low=0.7)]

    compared = ["reg/aepo/temperature", "reg/aepo/measured_entropy", "reg/aepo/samples", "policy/loss",
                "policy/grad_norm"]
    _trainer(tmp_path / "full", 4, regs()).fit(make_module(tiny_model_dir), make_data(batch_size=8))
    first = _trainer(tmp_path / "a", 2, regs())
    first.fit(make_module(tiny_model_dir), make_data(batch_size=8))
    ckpt = tmp_path / "step2.ckpt"
    first.save_checkpoint(ckpt)
    saved = [v for k, v in torch.load(ckpt, weights_only=False)["callbacks"].items() if k.startswith("AEPO")]
    _trainer(tmp_path / "b", 4, regs()).fit(make_module(tiny_model_dir), make_data(batch_size=8), ckpt_path=str(ckpt))
    a, b = _series(tmp_path / "full", compared), _series(tmp_path / "b", compared)
    assert [round(a["reg/aepo/temperature"][s], 6) for s in range(4)] == [1.2, 0.7, 0.7, 0.7]
    assert sorted(a["reg/aepo/measured_entropy"]) == [1, 2, 3] and min(a["reg/aepo/samples"].values()) > 0
    assert len(saved) == 1 and saved[0]["measured"] == pytest.approx(a["reg/aepo/measured_entropy"][1], rel=1e-6)
    assert saved[0]["step"] == 1 and saved[0]["sums"][1] > 0  # step 1's sums, closed by step 2
    for tag in compared:
        assert sorted(b[tag]) == [2, 3], tag
        for s in (2, 3):
            assert abs(a[tag][s] - b[tag][s]) <= 1e-5 * max(1.0, abs(a[tag][s])), (tag, s, a[tag][s], b[tag][s])


def test_aepo_config_runs_through_the_cli(tmp_path):
    """configs/cpu/aepo.yaml on the quickstart through `lit-covrl fit`: AEPO is built from the YAML,
    its tags are written every step, each step's temperature follows the previous step's
    measurement against the 0.5 target, extra responses are trained on."""
    from tests.helpers import cli_fit_tags

    tags = cli_fit_tags(tmp_path, "configs/cpu/aepo.yaml")
    assert all(len(tags[f"reg/aepo/{k}"]) == 3 for k in ("temperature", "samples", "candidate_frac"))
    measured, temps = tags["reg/aepo/measured_entropy"], tags["reg/aepo/temperature"]
    assert len(measured) == 2 and measured[0] != measured[1]  # steps 1 and 2 (step 0's T_high decided by none)
    assert temps[0] == pytest.approx(1.2)
    for h, t in zip(measured, temps[1:]):
        assert t == pytest.approx(1.2 if h <= 0.5 else 0.8)
    assert sum(tags["reg/aepo/samples"]) > 0 and tags["time/control_rollout_s"][0] > 0


def test_a_bad_setting_is_refused_at_start_up_naming_the_field(tmp_path, capsys):
    """configs/cpu/aepo.yaml with a negative target on the command line: exit 2, one line naming
    AEPO.target_entropy, before the first rollout."""
    from tests.helpers import cli_start_up_error

    err = cli_start_up_error(tmp_path, capsys, "configs/cpu/aepo.yaml", "--trainer.callbacks.init_args.target_entropy", "-1")
    assert "AEPO.target_entropy=-1.0 is invalid: must be a finite number >= 0" in err


def test_extra_responses_get_the_overlong_penalty(tiny_model_dir, monkeypatch):
    """Under `overlong: penalize` with a penalty below every reward, a truncated extra response is
    never chosen (its group advantage is not positive), while its raw score would choose some: the
    extra responses are scored like the rollout, penalty included (review mutation20)."""
    import lit_covrl.control_rows as control_rows
    from tests.helpers import fit
    from tests.test_module import HasOneReward, make_data, make_module

    module = make_module(tiny_model_dir, reward=HasOneReward(),
                         rollout=dict(group_size=4, max_new_tokens=6, overlong="penalize", overlong_reward=-10.0))
    seen, splice = [], control_rows._splice

    def spy(module_, extra, chosen, rollout, advantages, keep, timer):
        seen.append((extra, chosen.clone()))
        return splice(module_, extra, chosen, rollout, advantages, keep, timer)

    monkeypatch.setattr(control_rows, "_splice", spy)
    fit(module, make_data(batch_size=8, val_size=0), steps=3, callbacks=[AEPO(target_entropy=5.0, prompt_frac=1.0)],
        limit_val_batches=0)
    assert seen, "AEPO chose no extra response"
    raw_positive_truncated = 0
    for extra, chosen in seen:
        assert not (chosen & extra.truncated).any()
        rewards = torch.tensor([1.0 if "1" in c else 0.0 for c in extra.completions]).view(-1, 4)
        positive = ((rewards > rewards.mean(1, keepdim=True)) & (rewards.std(1, keepdim=True) > 0)).flatten()
        raw_positive_truncated += int((positive & extra.truncated).sum())
    assert raw_positive_truncated > 0  # the case came up


def test_recompute_logprobs_on_a_step_that_draws_nothing(tiny_model_dir, monkeypatch):
    """With recompute_logprobs and AEPO in the stack the rollout's recompute is left to the splice;
    on a step that draws nothing (0.1 x 8 prompts = no extra prompt) the old log-probs trained
    against are still the training forward's, not the sampler's (here off by 1; review mutation20)."""
    import dataclasses

    from lit_covrl.learner import Learner
    from tests.helpers import fit
    from tests.test_module import HasOneReward, make_data, make_module

    module = make_module(tiny_model_dir, reward=HasOneReward(), rollout=dict(group_size=4, max_new_tokens=6),
                         update=dict(recompute_logprobs=True))
    generate, forward, update, seen = module.generate, Learner._nograd_forward, Learner.update, []

    def spy_generate(prompts, n, *, temperature, generator):
        out = generate(prompts, n, temperature=temperature, generator=generator)
        mask = out.response_mask.to(out.logp.dtype)
        return dataclasses.replace(out, logp=out.logp + mask, entropy=out.entropy + mask)

    def spy_update(self, rollout, *args, step):
        fresh = forward(self, self.policy, rollout.input_ids, rollout.attention_mask, rollout.response_mask, True)
        seen.append((rollout.logp.clone(), fresh.logp))
        return update(self, rollout, *args, step=step)

    monkeypatch.setattr(module, "generate", spy_generate)
    monkeypatch.setattr(Learner, "update", spy_update)
    fit(module, make_data(batch_size=8, val_size=0), steps=2, callbacks=[AEPO(prompt_frac=0.1)], limit_val_batches=0)
    assert len(seen) == 2
    for old, fresh in seen:
        torch.testing.assert_close(old, fresh, rtol=1e-4, atol=1e-5)


def _ddp_worker(rank: int, port: int, model_dir: str, out: str) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    from tests import _dist
    from tests.helpers import fit
    from tests.test_module import HasOneReward, make_data, make_module

    torch.set_num_threads(1)
    _dist.elastic_env(rank, 2, port)
    rec = _dist.Recorder()
    module = make_module(model_dir, reward=HasOneReward(), rollout=dict(group_size=4, max_new_tokens=6))
    fit(module, make_data(batch_size=4, val_size=0), steps=3,
        callbacks=[rec, AEPO(target_entropy=5.0, prompt_frac=1.0, sample_num=1)], limit_val_batches=0,
        strategy=DDPStrategy(process_group_backend="gloo"), devices=2)
    torch.save(rec.steps, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_processes_where_one_rank_splices_and_the_other_does_not(tiny_model_dir, tmp_path):
    """2 gloo DDP processes through the module, AEPO choosing one extra response per step over both
    ranks: one rank splices, the other does not, and the spliced batch's recompute runs collectives
    on both. The decision to splice at all is taken over all ranks: a rank deciding on its own
    choice alone left the other alone in the recompute's collectives (review mutation20: a crash,
    SIGABRT, that no test caught)."""
    from tests import _dist

    _dist.spawn(_ddp_worker, (_dist.free_port(), tiny_model_dir, str(tmp_path)), timeout_s=120)
    steps = torch.load(tmp_path / "rank0.pt", weights_only=False)
    samples = [steps[s].get("reg/aepo/samples", 0) for s in sorted(steps)]
    assert samples == [1.0, 1.0, 1.0]  # the case came up every step: one response over both ranks

