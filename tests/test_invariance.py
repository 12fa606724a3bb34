"""README "Batch invariance": every entropy control (the baseline and each control of configs/cpu,
found as the stacking matrix finds them) trains the same metrics and weights whether an update is
one micro-batch, micro-batches of one row, forwarded without the shared prompt, with activation
checkpointing, stopped and resumed from a checkpoint, or split over 2 processes (FSDP2, gloo). The harness,
its layouts and why the rollouts and the optimizer are held fixed: tests/invariance.py."""
from __future__ import annotations

import logging

import pytest
import yaml

from lit_covrl.regularizers import EntropyBonus
from lit_covrl.types import TokenShaping
from tests.invariance import (SINGLE, InvarianceRunner, differences, entries, expected_difference, main, name,
                              run_ranks2)
from tests.stacking import ROOT, controls

FOUND = entries()


@pytest.fixture(scope="module", autouse=True)
def quiet():
    log = logging.getLogger("lit_covrl")
    log.propagate = False  # a hundred runs' warnings
    yield
    log.propagate = True


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    runner, done = InvarianceRunner(tmp_path_factory.mktemp("whole"), "whole"), {}

    def result(entry):
        if name(entry) not in done:
            done[name(entry)] = runner.run(entry)
        return done[name(entry)]

    return result


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """A runner per 1-process layout but whole, built on first use."""
    runners = {}

    def runner(layout: str) -> InvarianceRunner:
        if layout not in runners:
            runners[layout] = InvarianceRunner(tmp_path_factory.mktemp(layout), layout)
        return runners[layout]

    return runner


@pytest.fixture(scope="module")
def ranks2(tmp_path_factory):
    """Both ranks' results of every control: one spawn of 2 workers fits them all in turn."""
    return run_ranks2(tmp_path_factory.mktemp("ranks2"), FOUND, timeout_s=900)


def test_every_control_is_in_the_matrix_alone_and_in_a_stack():
    names = {name(e) for e in FOUND}
    assert {"grpo", "clip_cov", "kl_cov", "gspo", "qae", "clip_higher", "lopti", "dcpo"} <= names and len(names) >= 30
    stacked = {c.name for e in FOUND if len(e.stack) > 1 for c in e.stack}
    assert stacked - {"lopti_portion"} == {c.name for c in controls()} - {"aepo"}  # AEPO differs over ranks: alone only
    assert max(len(e.stack) for e in FOUND) >= 15


def assert_layout(entry, layout: str, problems: list[str]) -> None:
    reason = expected_difference(entry, layout)
    if reason is None:
        assert problems == [], f"{name(entry)} differs in layout {layout}"
    else:  # a fix makes it invariant: then drop it from LAYOUT_DEPENDENT and its README note
        assert problems, f"{name(entry)} is now the same in layout {layout}, listed as differing: {reason}"


@pytest.mark.parametrize("layout", [layout for layout in SINGLE if layout != "whole"])
@pytest.mark.parametrize("entry", FOUND, ids=name)
def test_one_process_layouts_train_as_one_micro_batch(entry, layout, whole, single):
    """micro1: micro-batches of one row; unshared: the GPU's forward (no shared prompt) with
    trimmed micro-batches of 5; checkpointed: activation checkpointing; resumed: two fits, the
    second resumed from the first's checkpoint."""
    reference = whole(entry)
    assert reference.refusal is None, reference.refusal  # each control runs alone and in its stack
    assert_layout(entry, layout, differences(reference, single(layout).run(entry)))


@pytest.mark.slow
@pytest.mark.parametrize("entry", FOUND, ids=name)
def test_two_processes_train_as_one_process(entry, whole, ranks2):
    assert whole(entry).refusal is None, whole(entry).refusal  # two refusals alike are no invariance
    for rank in range(2):  # each rank logs the global values
        assert_layout(entry, "ranks2", differences(whole(entry), ranks2[rank][name(entry)]))


class MicroBatchNormalizedBonus(EntropyBonus):
    """An entropy bonus divided by its micro-batch's mean entropy: a statistic of whatever rows a
    forward holds, the common way a control loses batch invariance (the check must say so)."""

    default_name = "mb_bonus"

    def shape(self, batch):
        h = batch.entropy
        return TokenShaping(penalty=-self._coef_now * h / h.detach().mean().clamp(min=1e-6))


def test_the_check_of_a_users_control_reports_a_micro_batch_statistic(tmp_path, capsys):
    """`python -m tests.invariance --config my.yaml`: a user's control, checked in the layouts named;
    exit status 1 and the differing metrics where it depends on the micro-batches, ok elsewhere."""
    config = tmp_path / "mb_bonus.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": f"{__name__}.MicroBatchNormalizedBonus", "init_args": {"coef": 0.1}}]}}))
    assert main(["--config", str(config), "--layouts", "micro1", "resumed"]) == 1
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if line.startswith("mb_bonus ")}
    assert lines["resumed"].endswith(" ok") and "policy/loss" in lines["micro1"] and "reg/mb_bonus/loss" in lines["micro1"]
    refused = tmp_path / "refused.yaml"  # a setting start-up refuses: nothing ran, so no "ok"
    refused.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "lit_covrl.regularizers.ClipCov", "init_args": {"lb": 2.0, "ub": 1.0}}]}}))
    assert main(["--config", str(refused), "--layouts", "micro1"]) == 1
    assert "refused at start-up: ValueError" in capsys.readouterr().out
    # the README's example: the bring-your-own regularizer
    assert main(["--config", str(ROOT / "examples/byo/regularizer.yaml"), "--layouts", "micro1", "resumed"]) == 0
