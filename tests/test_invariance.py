"""README "Batch invariance": every entropy control (the baseline and each control of configs/cpu,
found as the stacking matrix finds them) trains the same metrics and weights whether an update is
one micro-batch, micro-batches of one row, forwarded without the shared prompt, with activation
checkpointing, or split over 2 processes (FSDP2, gloo). The harness,
its layouts and why the rollouts and the optimizer are held fixed: tests/invariance.py."""
from __future__ import annotations

import logging

import pytest

from tests.invariance import SINGLE, InvarianceRunner, all_controls, differences, name, run_ranks2

FOUND = all_controls()
# (control, layout): why it differs there, as its README row says
LAYOUT_DEPENDENT = {
    ("aepo", "ranks2"): "each rank draws extra responses for its own first floor(prompt_frac x B) prompts and "
                        "replaces its own first rows (README AEPO row): with 2 prompts per rank it draws none",
}


@pytest.fixture(scope="module", autouse=True)
def quiet():
    log = logging.getLogger("lit_covrl")
    log.propagate = False  # a hundred runs' warnings
    yield
    log.propagate = True


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    runner, done = InvarianceRunner(tmp_path_factory.mktemp("whole"), "whole"), {}

    def result(control):
        if name(control) not in done:
            done[name(control)] = runner.run(control)
        return done[name(control)]

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


def test_every_form_of_control_is_in_the_matrix():
    names = {name(c) for c in FOUND}
    assert {"grpo", "clip_cov", "kl_cov", "gspo", "qae", "clip_higher", "lopti", "dcpo"} <= names and len(names) >= 30


def assert_layout(control, layout: str, problems: list[str]) -> None:
    reason = LAYOUT_DEPENDENT.get((name(control), layout))
    if reason is None:
        assert problems == [], f"{name(control)} differs in layout {layout}"
    else:  # a fix makes it invariant: then drop it from LAYOUT_DEPENDENT and its README note
        assert problems, f"{name(control)} is now the same in layout {layout}, listed as differing: {reason}"


@pytest.mark.parametrize("layout", [layout for layout in SINGLE if layout != "whole"])
@pytest.mark.parametrize("control", FOUND, ids=name)
def test_one_process_layouts_train_as_one_micro_batch(control, layout, whole, single):
    """micro1: micro-batches of one row; unshared: the GPU's forward (no shared prompt) with
    trimmed micro-batches of 5; checkpointed: activation checkpointing."""
    reference = whole(control)
    assert reference.refusal is None, reference.refusal  # each control runs alone
    assert_layout(control, layout, differences(reference, single(layout).run(control)))


@pytest.mark.slow
@pytest.mark.parametrize("control", FOUND, ids=name)
def test_two_processes_train_as_one_process(control, whole, ranks2):
    for rank in range(2):  # each rank logs the global values
        assert_layout(control, "ranks2", differences(whole(control), ranks2[rank][name(control)]))
