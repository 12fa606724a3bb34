"""Outcome-based exploration (Song, Kempe, Munos 2025, arXiv 2509.06941; `OutcomeExploration`):
the historical count bonus and the batch repetition penalty by hand and against a float64 loop,
their counts in checkpoints, the step's rewards / advantages they shape, micro-batch and
process-count invariance, the CPU config through the CLI and the start-up refusals."""
from __future__ import annotations

import math
import random

import pytest
import torch

from lit_covrl.algorithms import (batch_repeats, distinct_answers, group_centered,
                                  historical_bonus, outcome_shaping)
from lit_covrl.reward_set import RewardSet
from lit_covrl.regularizers import OutcomeExploration
from lit_covrl.regularizers.outcome import group_answer_ids
from lit_covrl.rewards import ExactMatchReward, MathVerifyReward
from lit_covrl.tasks.reasoning import ReasoningReward
from lit_covrl.types import Example


def _ready(reg: OutcomeExploration, reward=None) -> OutcomeExploration:
    reg.check_rewards(RewardSet([reward or ExactMatchReward()]), None)
    return reg


def _step(reg: OutcomeExploration, step: int, prompts: list, completions: list[str], correct, group_size: int):
    """One RL step of one generation round: its answers counted, then its terms."""
    reg.count_outcomes(step, prompts, completions, group_size)
    return reg.outcome_shift(step, prompts, completions, correct, group_size)


def test_terms_by_hand():
    assert historical_bonus(torch.tensor([1, 4, 0, 9])).tolist() == [1.0, 0.5, 0.0, pytest.approx(1 / 3)]
    ids = torch.tensor([0, 0, 1, -1, 0, 1, 2, 3])  # G = 4: (a, a, b, none), (a, b, c, d)
    assert batch_repeats(ids, 4).tolist() == [pytest.approx(1 / 3), pytest.approx(1 / 3), 0.0, 0.0, 0, 0, 0, 0]
    assert distinct_answers(ids, 4).tolist() == [2.0, 4.0]
    counts = torch.tensor([2.0, 2.0, 1.0, 0.0, 4.0, 1.0, 1.0, 1.0])
    eligible = torch.tensor([True, False, True, False, True, True, True, True])
    hist, pen = outcome_shaping(counts, ids, eligible, 4, historical=0.6, batch=0.3)
    assert hist.tolist() == pytest.approx([0.6 / math.sqrt(2), 0, 0.6, 0, 0.3, 0.6, 0.6, 0.6])
    assert pen.tolist() == pytest.approx([-0.1, 0, 0, 0, 0, 0, 0, 0])
    assert group_centered(torch.tensor([1.0, 2.0, 3.0, 6.0]), 2).tolist() == [-0.5, 0.5, -1.5, 1.5]
    assert group_answer_ids(["7", None, "7", "8", "8", "9"], 3).tolist() == [0, -1, 0, 0, 0, 1]


def test_the_regulariser_counts_over_steps_by_hand():
    """Step 0: prompt x answers (5, 5, 6, none) -> N = 2, 2, 1; step 1: (5, 6, 6, 7) -> N = 3, 3, 3, 1."""
    reg = _ready(OutcomeExploration(historical=1.0, batch=0.6))
    correct = torch.tensor([True, False, False, False])
    got = _step(reg, 0, ["x"], ["5", "5", "6", " "], correct, 4)
    r2 = 1 / math.sqrt(2)
    assert got.tolist() == pytest.approx([r2 - 0.2, r2 - 0.2, 1.0, 0.0])
    got = _step(reg, 1, ["x"], ["5", "6", "6", "7"], correct, 4)
    r3 = 1 / math.sqrt(3)
    assert got.tolist() == pytest.approx([r3, r3 - 0.2, r3 - 0.2, 1.0])
    assert reg.counts == {"x": {"5": 3, "6": 3, "7": 1}}
    assert reg.pop_metrics()["reg/outcome/novel_frac"] == pytest.approx((1 + 1 / 4) / 2)  # step 0: all new; step 1: "7"
    correct_only = _ready(OutcomeExploration(historical=1.0, batch=0.0, responses="correct"))
    assert _step(correct_only, 0, ["x"], ["5", "5", "6", "7"], correct, 4).tolist() == \
        pytest.approx([r2, 0, 0, 0])


def test_every_round_of_a_step_is_counted_and_the_batch_gets_the_terms():
    """Dynamic sampling: round 0 (prompts x, y) and round 1 (x, z) of step 0 are both counted; the
    batch trained on (round 0's x, round 1's z) gets its terms from those counts: x's "5" is counted
    3 times (twice in round 0, once in round 1, which is not trained on)."""
    reg = _ready(OutcomeExploration(historical=1.0, batch=0.0))
    reg.count_outcomes(0, ["x", "y"], ["5", "5", "7", "7"], 2)
    reg.count_outcomes(0, ["x", "z"], ["5", "6", "8", " "], 2)
    assert reg.counts == {"x": {"5": 3, "6": 1}, "y": {"7": 2}, "z": {"8": 1}}
    got = reg.outcome_shift(0, ["x", "z"], ["5", "5", "8", " "], torch.zeros(4, dtype=torch.bool), 2)
    assert got.tolist() == pytest.approx([1 / math.sqrt(3), 1 / math.sqrt(3), 1.0, 0.0])
    reg.count_outcomes(1, ["x"], ["5", "6"], 2)  # step 1: "5" and "6" were seen before, so novel_frac 0
    reg.outcome_shift(1, ["x"], ["5", "6"], torch.zeros(2, dtype=torch.bool), 2)
    assert reg.pop_metrics()["reg/outcome/novel_frac"] == pytest.approx((1.0 + 0.0) / 2)


def test_dynamic_sampling_counts_every_round_through_the_module(tiny_model_dir, monkeypatch):
    """filter_groups with max_gen_rounds 3: N(x, a) is every generated answered response of every
    round (the groups not trained on included), as with one round, where the filtered groups count
    too. The random tiny model rarely matches exactly, so most groups are uninformative and each step
    runs more than one round."""
    from tests.helpers import fit

    module = _module(tiny_model_dir, rollout=dict(filter_groups=True, max_gen_rounds=3))
    rounds = []
    real = module.generate_scored
    monkeypatch.setattr(module, "generate_scored", lambda batch, *a, **kw: (
        lambda out: rounds.append((list(batch.prompts), list(out[0].completions))) or out)(real(batch, *a, **kw)))
    reg = OutcomeExploration(historical=1.0, batch=0.5)
    fit(module, _data(), steps=2, callbacks=[reg], limit_val_batches=0)
    want: dict = {}
    for prompts, completions in rounds:
        for i, c in enumerate(completions):
            if (a := ExactMatchReward().final_answer(c)) is not None:
                per_prompt = want.setdefault(prompts[i // 4], {})
                per_prompt[a] = per_prompt.get(a, 0) + 1
    assert len(rounds) > 2  # more rounds than steps
    assert reg.counts == want and sum(sum(v.values()) for v in want.values()) > 2 * 4 * 4


def _loop_oracle(steps, historical, batch, G):
    """Each step's terms by a plain float64 loop over dicts: count first, then bonus and penalty."""
    counts: dict = {}
    out = []
    for prompts, answers in steps:
        for i, a in enumerate(answers):
            if a is not None:
                counts[(prompts[i // G], a)] = counts.get((prompts[i // G], a), 0) + 1
        terms = []
        for i, a in enumerate(answers):
            if a is None:
                terms.append(0.0)
                continue
            group = answers[(i // G) * G:(i // G + 1) * G]
            same = sum(1 for j, b in enumerate(group) if b == a and j != i % G)
            terms.append(historical / math.sqrt(counts[(prompts[i // G], a)]) - batch * same / (G - 1))
        out.append(terms)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_terms_match_a_float64_loop(seed):
    rng = random.Random(seed)
    G, steps = 5, []
    for _ in range(6):
        prompts = [rng.choice("abcd") for _ in range(3)]
        steps.append((prompts, [rng.choice(["1", "2", "3", None]) for _ in range(3 * G)]))
    reg = _ready(OutcomeExploration(historical=0.7, batch=0.4))
    want = _loop_oracle(steps, 0.7, 0.4, G)
    for s, (prompts, answers) in enumerate(steps):
        completions = [" " if a is None else a for a in answers]
        got = _step(reg, s, prompts, completions, torch.zeros(3 * G, dtype=torch.bool), G)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, torch.tensor(want[s], dtype=torch.float64), rtol=0, atol=1e-12)


def test_state_round_trip_and_final_answers_of_the_built_in_rewards():
    reg = _ready(OutcomeExploration(historical=1.0, batch=0.0))
    _step(reg, 0, [[{"role": "user", "content": "q"}]], ["4", "4"], torch.zeros(2, dtype=torch.bool), 2)
    state = reg.state_dict()
    other = _ready(OutcomeExploration(historical=1.0, batch=0.0))
    other.load_state_dict(state)
    assert other.counts == reg.counts == {'[{"content": "q", "role": "user"}]': {"4": 2}}
    state["counts"]['[{"content": "q", "role": "user"}]']["4"] = 9
    assert reg.counts['[{"content": "q", "role": "user"}]']["4"] == 2  # a copy, not the live dict
    assert ExactMatchReward().final_answer("  12 \n") == "12" and ExactMatchReward().final_answer(" ") is None
    assert MathVerifyReward().final_answer("so \\boxed{\\frac{1}{2}}.") == "1/2"
    assert ReasoningReward().final_answer("1+2=3|3") == "3" and ReasoningReward().final_answer("3") is None


def test_math_verify_outcomes_are_canonical_so_forms_of_one_value_are_one_outcome():
    """MathVerifyReward scores `\\frac{1}{2}`, `1/2`, `0.5` and `50\\%` alike, so they are one outcome:
    a group writing one value in four forms is penalised as four repeats of it (it was not: four
    outcomes, no penalty, and the batch term rewarded rewriting a repeated answer)."""
    mv = MathVerifyReward()
    forms = ["\\boxed{\\frac{1}{2}}", "so it is $1/2$", "the answer is 0.5", "\\boxed{50\\%}", "\\boxed{ 1 / 2 }"]
    assert {mv.final_answer(c) for c in forms} == {"1/2"}
    assert mv.final_answer("\\boxed{\\sqrt{8}}") == mv.final_answer("\\boxed{2\\sqrt{2}}") == "2*sqrt(2)"
    assert mv.final_answer("\\boxed{b+a}") == mv.final_answer("\\boxed{a + b}") == "a + b"
    assert mv.final_answer("\\boxed{2.0}") == mv.final_answer("\\boxed{2}") == "2"
    assert mv.final_answer("\\boxed{3}") != mv.final_answer("\\boxed{\\pi}")
    assert mv.final_answer("\\boxed{x=2}") != mv.final_answer("\\boxed{2}")  # only verify equates these
    assert mv.final_answer("\\boxed{? ?}") == "??"  # unreadable: the text without whitespace
    assert mv.final_answer("\\boxed{10^{10^{7}}}") == "10^{10^{7}}"  # never parsed (scoring's limit)
    assert mv.final_answer("no answer here") is None
    # review final24: no rounding to a nearby value the reward scores apart, no unbounded evaluation,
    # no crash past Python's 4300-digit int-to-str limit
    assert mv.final_answer("\\boxed{0.999999999}") == "999999999/1000000000" != mv.final_answer("\\boxed{1}")
    assert "Integral" in mv.final_answer("\\boxed{\\int_0^1 e^{x^2}\\sin(x^3)dx}")  # left unevaluated
    assert mv.final_answer("\\boxed{4000000!}") == "factorial(4000000)"
    assert mv.final_answer("\\boxed{2^{20000}}") == "2^{20000}"  # 6021 digits: the written text
    reg = _ready(OutcomeExploration(historical=0.0, batch=0.6), mv)
    got = _step(reg, 0, ["x"], forms[:4], torch.zeros(4, dtype=torch.bool), 4)
    assert got.tolist() == pytest.approx([-0.6] * 4)  # each: all 3 others repeat its outcome
    assert reg.counts == {"x": {"1/2": 4}}


def test_a_state_saved_mid_step_counts_the_redone_step_once():
    """A state saved inside step 1 (nonfinite-stop.ckpt is written mid-step) holds the aborted
    attempt's answers; the resumed run redoes step 1 with a new rollout, whose answers alone count
    (review outcome21 F7: they were counted on top). A state saved after step 1 keeps them all."""
    zero = torch.zeros(2, dtype=torch.bool)
    aborted = _ready(OutcomeExploration(historical=1.0, batch=0.0))
    _step(aborted, 0, ["x"], ["5", "5"], zero, 2)
    aborted.count_outcomes(1, ["x"], ["5", "6"], 2)  # stopped before the update
    resumed = _ready(OutcomeExploration(historical=1.0, batch=0.0))
    resumed.load_state_dict(torch.load(_saved(aborted.state_dict()), weights_only=True))
    assert _step(resumed, 1, ["x"], ["7", "5"], zero, 2).tolist() == pytest.approx([1.0, 1 / math.sqrt(3)])
    assert resumed.counts == {"x": {"5": 3, "7": 1}}
    assert resumed.pop_metrics()["reg/outcome/novel_frac"] == 0.5  # "5" was seen at step 0, "7" never
    resumed.count_outcomes(1, ["y"], ["8", "8"], 2)  # a second round of the redone step adds up
    assert resumed.counts == {"x": {"5": 3, "7": 1}, "y": {"8": 2}}
    after = _ready(OutcomeExploration(historical=1.0, batch=0.0))
    after.load_state_dict(resumed.state_dict())
    _step(after, 2, ["x"], ["7", "9"], zero, 2)
    assert after.counts == {"x": {"5": 3, "7": 2, "9": 1}, "y": {"8": 2}}
    old_format = _ready(OutcomeExploration(historical=1.0, batch=0.0))
    old_format.load_state_dict({"counts": {"x": {"5": 2}}})  # saved before the step was kept
    _step(old_format, 1, ["x"], ["5", "5"], zero, 2)
    assert old_format.counts == {"x": {"5": 4}}


def _saved(state: dict):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


# ------------------------------------------------------------------------------ through the module

class TwoPrompts:
    """Two prompts drawn over and over, so answers recur across steps (the historical counts act)."""

    name = "two_prompts"

    def sample(self, rng):
        a = rng.choice([1, 2])
        return Example(prompt=f"{a}+{a}=", answer=str(2 * a))


def _module(model_dir, micro=64, **kw):
    from tests.test_module import make_module

    return make_module(model_dir, reward=ExactMatchReward(), optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
                       update=dict(micro_batch_size=micro, mini_batch_size=2, grad_clip=None), **kw)


def _data():
    from lit_covrl.data import PromptDataModule

    return PromptDataModule(task=TwoPrompts(), batch_size=4, val_size=0)


def test_the_step_trains_on_the_shaped_rewards_or_advantages(tiny_model_dir, monkeypatch):
    """apply: reward feeds rewards + terms to the estimator; apply: advantage adds the group-centred
    terms to the estimator's advantages; the terms are the regulariser's outcome_shift."""
    from tests.helpers import fit
    import lit_covrl.step_batch as step_batch

    real_adv = step_batch.compute_advantages
    for apply in ("reward", "advantage"):
        seen, shifts = [], []
        reg = OutcomeExploration(historical=1.0, batch=0.5, apply=apply)
        real_shift = reg.outcome_shift
        monkeypatch.setattr(reg, "outcome_shift", lambda *a: shifts.append(real_shift(*a)) or shifts[-1])
        monkeypatch.setattr(step_batch, "compute_advantages",
                            lambda r, *a, **kw: seen.append((r.clone(), real_adv(r, *a, **kw))) or seen[-1][1])
        module = _module(tiny_model_dir)
        trained = []
        module.configure_model()
        real_update = module.learner.update
        monkeypatch.setattr(module.learner, "update",
                            lambda ro, adv, *a, **kw: trained.append(adv.clone()) or real_update(ro, adv, *a, **kw))
        fit(module, _data(), steps=2, callbacks=[reg], limit_val_batches=0)
        assert len(shifts) == len(trained) == 2 and any(s.abs().sum() > 0 for s in shifts)
        for (estimated, adv), shift, got in zip(seen, shifts, trained):
            if apply == "reward":
                torch.testing.assert_close(got, adv)
                raw = estimated.double() - shift  # the exact-match rewards, 0 or 1
                torch.testing.assert_close(raw, raw.round(), rtol=0, atol=1e-6)
                assert set(raw.round().tolist()) <= {0.0, 1.0}
            else:
                torch.testing.assert_close(got, adv + group_centered(shift, 4).float())


def _fit(model_dir, micro, steps=3):
    from tests._dist import Recorder
    from tests.helpers import fit

    torch.manual_seed(0)
    rec = Recorder()
    module = _module(model_dir, micro)
    fit(module, _data(), steps=steps, callbacks=[OutcomeExploration(historical=1.0, batch=0.5), rec],
        limit_val_batches=0)
    return {k: v.detach().clone() for k, v in module.policy.state_dict().items()}, rec.steps


_REF: dict = {}


@pytest.mark.parametrize("micro", [1, 3])
def test_fit_is_invariant_to_micro_batch_size(tiny_model_dir, micro):
    """Three RL steps over two recurring prompts: the weights and every policy/ and reg/ metric are
    the same for micro-batches of 1, 3 or all 16 sequences."""
    if "ref" not in _REF:
        _REF["ref"] = _fit(tiny_model_dir, 64)
    from tests.test_aent import _assert_same_fit

    ref_m = _REF["ref"][1]
    assert ref_m[3]["reg/outcome/novel_frac"] < 1.0 and ref_m[3]["reg/outcome/historical_mean"] > 0
    _assert_same_fit(_REF["ref"], _fit(tiny_model_dir, micro))


def test_counts_resume_exactly(tiny_model_dir, tmp_path):
    """The counts travel in the checkpoint: a resume at step 2 that lost them would give every
    answer seen before a larger bonus (historical_mean, novel_frac and the update all differ)."""
    from tests.test_resume import straight_and_resumed

    compared = ["reg/outcome/historical_mean", "reg/outcome/novel_frac", "reg/outcome/tracked_answers",
                "reg/outcome/bonus_mean", "policy/loss", "policy/grad_norm"]
    a, b, ckpt = straight_and_resumed(tmp_path, lambda: [OutcomeExploration(historical=1.0, batch=0.5)],
                                      lambda: _module(tiny_model_dir), _data, compared)
    saved = [v for k, v in torch.load(ckpt, weights_only=True)["callbacks"].items() if k.startswith("Outcome")]
    assert len(saved) == 1 and set(saved[0]["counts"]) == {"1+1=", "2+2="}
    assert a["reg/outcome/novel_frac"][2] < 1.0  # answers of steps 0-1 recur at step 2
    for tag in compared:
        assert sorted(b[tag]) == [2, 3], tag
        for s in (2, 3):
            assert abs(a[tag][s] - b[tag][s]) <= 1e-5 * max(1.0, abs(a[tag][s])), (tag, s, a[tag][s], b[tag][s])


def _gather_worker(rank: int, port: int, out: str) -> None:
    from tests import _dist

    _dist.elastic_env(rank, 2, port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    reg = _ready(OutcomeExploration(historical=1.0, batch=0.5))
    terms = []
    for s, (prompts, completions) in enumerate(_TWO_STEPS):
        half = len(prompts) // 2
        mine = slice(rank * half, (rank + 1) * half)
        rows = slice(rank * half * 3, (rank + 1) * half * 3)
        terms.append(_step(reg, s, prompts[mine], completions[rows], torch.zeros(half * 3, dtype=torch.bool), 3))
    torch.save({"terms": terms, "counts": reg.counts, "metrics": reg.pop_metrics()}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


_TWO_STEPS = [(["a", "b", "a", "c"], list("112" "333" "121" "4 4")),
              (["b", "a", "c", "c"], list("343" "211" "445" "555"))]


def test_two_processes_count_over_both_ranks(tmp_path):
    """2 gloo processes holding half the prompts each: every rank ends with the counts of all rows,
    its rows get the terms one process gives them, and the metrics are the global ones."""
    from tests import _dist

    single = _ready(OutcomeExploration(historical=1.0, batch=0.5))
    whole = [_step(single, s, p, c, torch.zeros(12, dtype=torch.bool), 3) for s, (p, c) in enumerate(_TWO_STEPS)]
    metrics = single.pop_metrics()
    _dist.spawn(_gather_worker, (_dist.free_port(), str(tmp_path)), timeout_s=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for s in range(2):
        torch.testing.assert_close(torch.cat([ranks[0]["terms"][s], ranks[1]["terms"][s]]), whole[s], rtol=0, atol=0)
    assert ranks[0]["counts"] == ranks[1]["counts"] == single.counts
    assert ranks[0]["metrics"] == ranks[1]["metrics"] == metrics


def _fit_worker(rank: int, port: int, model_dir: str, prompts: str, out: str) -> None:
    from tests import _dist

    _dist.save_ddp_fit(_outcome_fit, rank, port, model_dir, prompts, out)


def _outcome_fit(model_dir, prompts, root, devices, strategy=None):
    """3 RL steps of `_dist`'s rank-invariant module (samples a function of prompt and step) with
    OutcomeExploration, exact-match rewards and no group filter: every step's metrics."""
    from tests import _dist

    rec = _dist.Recorder()
    module = _dist.make_module(model_dir, reward=ExactMatchReward(), rollout=dict(filter_groups=False))
    _dist.trainer(3, [rec, OutcomeExploration(historical=1.0, batch=0.5)], devices, root, strategy=strategy).fit(
        module, _dist.make_data(prompts, _dist.B * 2 // devices))
    return rec.steps


def test_two_ddp_processes_train_as_one_process(tiny_model_dir, tmp_path):
    """Through the module: 2 gloo DDP processes with B prompts each train as one process with 2B.
    Three of each step's four prompts are the same and the samples depend only on prompt and step,
    so their groups' answers are counted 3 times, across both ranks (a rank counting its own rows
    alone would give them 1/sqrt(2) or 1, not 1/sqrt(3))."""
    from tests import _dist

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{a}+1=", "answer": "{a + 1}"}}\n' for a in [10, 11, 10, 10] * 6))
    single = _outcome_fit(tiny_model_dir, prompts, tmp_path / "s", 1)
    _dist.spawn(_fit_worker, (_dist.free_port(), tiny_model_dir, str(prompts), str(tmp_path)), timeout_s=180)
    assert 0 < single[1]["reg/outcome/historical_mean"] < 0.7  # mostly 1/sqrt(3): counted over the 3 groups
    _dist.assert_ranks_match(tmp_path, single, "reg/outcome/")


def test_cpu_config_runs_through_the_cli(tmp_path):
    """configs/cpu/outcome.yaml on the quickstart through `lit-covrl fit`: the tags are written every
    step and move (the counted answers grow), and the bonus acts."""
    from tests.helpers import cli_fit_tags

    tags = cli_fit_tags(tmp_path, "configs/cpu/outcome.yaml")
    keys = ("bonus_mean", "historical_mean", "batch_penalty_mean", "distinct_answers", "answered_frac",
            "novel_frac", "tracked_answers")
    assert all(len(tags[f"reg/outcome/{k}"]) == 3 for k in keys)
    tracked = tags["reg/outcome/tracked_answers"]
    assert tracked[0] < tracked[1] < tracked[2]
    assert all(v > 0 for v in tags["reg/outcome/historical_mean"]) and 1 <= tags["reg/outcome/distinct_answers"][0] <= 8
