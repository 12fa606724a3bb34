"""README "Batch invariance": every entropy control (the baseline and each control of configs/cpu,
found as the stacking matrix finds them) trains the same metrics and weights whether an update is
one micro-batch, micro-batches of one row, forwarded without the shared prompt, with activation
checkpointing, stopped and resumed from a checkpoint, or split over 2 processes (FSDP2, gloo). The harness,
its layouts and why the rollouts and the optimizer are held fixed: tests/invariance.py."""
from __future__ import annotations

import logging

import pytest

from tests.invariance import SINGLE, InvarianceRunner, differences, entries, expected_difference, name, run_ranks2
from tests.stacking import controls

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
    return run_ranks2(tmp_path_factory.mktemp("ranks2"), [name(c) for c in FOUND], timeout_s=900)


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
    for rank in range(2):  # each rank logs the global values
        assert_layout(entry, "ranks2", differences(whole(entry), ranks2[rank][name(entry)]))
