"""Annealing schedules: hand values, endpoints, validation, YAML parsing."""
import math

import pytest

from lit_covrl.regularizers.schedules import SCHEDULES, Schedule


def test_constant():
    s = Schedule()
    assert [s.value(0.3, t) for t in (0, 5, 10_000)] == [0.3, 0.3, 0.3]


def test_linear_hand_values():
    s = Schedule("linear", final=0.2, steps=4)
    # 1 -> 0.2 over 4 steps: -0.2 per step
    got = [s.value(1.0, t) for t in range(6)]
    assert got == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.2], abs=1e-12)


def test_cosine_hand_values():
    s = Schedule("cosine", final=0.0, steps=4)
    # 0.5 (1 + cos(pi t / 4)): t=1 -> 0.853553, t=2 -> 0.5, t=3 -> 0.146447
    got = [s.value(1.0, t) for t in range(6)]
    want = [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 - math.cos(math.pi / 4)), 0.0, 0.0]
    assert got == pytest.approx(want, abs=1e-12)
    assert got[1] == pytest.approx(0.853553, abs=1e-6)


def test_exponential_hand_values():
    s = Schedule("exponential", final=0.0, steps=10)  # half-life 10/5 = 2
    assert s.value(1.0, 2) == pytest.approx(0.5)
    assert s.value(1.0, 4) == pytest.approx(0.25)
    assert s.value(1.0, 10) == 0.0
    s = Schedule("exponential", final=1.0, steps=100, half_life=5)
    # 1 + (3 - 1) 0.5^(5/5) = 2
    assert s.value(3.0, 5) == pytest.approx(2.0)


@pytest.mark.parametrize("name", ["linear", "cosine", "exponential"])
def test_reaches_final_and_is_monotone(name):
    s = Schedule(name, final=0.1, steps=50)
    vals = [s.value(1.0, t) for t in range(60)]
    assert vals[0] == pytest.approx(1.0)
    assert all(b <= a + 1e-12 for a, b in zip(vals, vals[1:]))
    assert vals[50:] == [0.1] * 10


def test_validation_messages():
    with pytest.raises(ValueError) as e:
        Schedule("cosinus")
    msg = str(e.value)
    assert "schedule.name" in msg and "cosinus" in msg and all(n in msg for n in SCHEDULES)
    with pytest.raises(ValueError, match="steps"):
        Schedule("linear", steps=0)
    with pytest.raises(ValueError, match="schedule.steps"):
        Schedule("linear", steps=1.5)
    with pytest.raises(ValueError, match="final"):
        Schedule("linear", final=-1.0)
    with pytest.raises(ValueError, match="half_life"):
        Schedule("exponential", half_life=0.0)


def test_jsonargparse_reads_yaml_dict():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--schedule", type=Schedule, default=Schedule())
    cfg = parser.parse_args(["--schedule", "{name: cosine, final: 0.0, steps: 500}"])
    s = parser.instantiate_classes(cfg).schedule
    assert s == Schedule("cosine", 0.0, 500)


def test_null_steps_anneal_over_the_whole_run():
    s = Schedule("linear", final=0.0, steps=None)
    # resolved to a 4-step run (RL steps 0-3): 1 at the first step, 0 at the last one that runs
    # (it used to reach 0 at step 4, which never runs: an annealed Clip-Cov stayed on to the end)
    assert [s.over(4).value(1.0, t) for t in range(5)] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0, 0.0])
    assert s.over(1).value(1.0, 0) == 1.0  # a 1-step run has nothing to anneal over
    assert Schedule("linear", steps=7).over(100).steps == 7  # an explicit length is kept
    assert Schedule("constant", steps=None).over(None).value(0.3, 9) == 0.3  # nothing to anneal
    with pytest.raises(RuntimeError, match="not resolved"):
        s.value(1.0, 0)
    with pytest.raises(ValueError, match="trainer.max_steps is -1"):
        s.over(-1)  # Lightning's "no limit"


def test_regularizer_resolves_a_null_schedule_from_the_trainer():
    from types import SimpleNamespace

    from lit_covrl.regularizers import ClipCov

    reg = ClipCov(ratio=2e-3, schedule={"name": "cosine", "final": 0.0, "steps": None})
    reg.setup(SimpleNamespace(max_steps=151), None, "fit")
    assert reg.schedule.steps == 150  # RL steps 0..150: the last one takes final
    assert reg.scheduled(2e-3, 75) == pytest.approx(1e-3)  # cosine half-way: half the ratio
    assert reg.scheduled(2e-3, 150) == 0.0
    with pytest.raises(ValueError, match="schedule.steps is null"):
        ClipCov(ratio=2e-3, schedule={"name": "cosine", "steps": None}).setup(SimpleNamespace(max_steps=-1), None, "fit")


def test_leaving_steps_out_anneals_over_the_whole_run():
    # the default must not be a silent one-step anneal (the control off from step 1 on)
    s = Schedule("cosine", final=0.0).over(301)
    assert s.steps == 300
    assert s.value(1.0, 1) == pytest.approx(0.5 * (1 + math.cos(math.pi / 300)))
    assert s.value(1.0, 150) == pytest.approx(0.5)


def test_a_ratio_schedule_must_end_in_the_unit_interval():
    from lit_covrl.regularizers import ClipCov, KLCov

    with pytest.raises(ValueError, match=r"ClipCov\.ratio: schedule\.final must be in \[0, 1\].*got 2\.0"):
        ClipCov(ratio=2e-3, schedule={"name": "linear", "final": 2.0, "steps": 10})
    with pytest.raises(ValueError, match=r"KLCov\.ratio: schedule\.final"):
        KLCov(ratio=2e-3, schedule={"name": "linear", "final": 2.0, "steps": 10}, schedule_on="ratio")
    KLCov(ratio=2e-3, beta=1.0, schedule={"name": "linear", "final": 2.0, "steps": 10})  # beta may grow past 1
    ClipCov(ratio=2e-3, schedule={"name": "linear", "final": 0.5, "steps": 10})  # annealing up, within [0, 1]
