"""README "Stacking controls": every pair of entropy controls (tests/stacking.py finds them in
configs/cpu/) either is refused at start-up, by an error naming both, or runs 2 RL steps of 2
updates with a finite loss and each control's own metrics; the refused pairs are exactly the
README's table."""
from __future__ import annotations

import logging

import pytest

from tests.stacking import (ROOT, StackRunner, check_runs, controls, disagree, documented_refusals, names_both, pair_id,
                            pairs, refused_table)

FOUND = controls()
PAIRS = pairs(FOUND)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    log = logging.getLogger("lit_covrl")
    log.propagate = False  # the runs' warnings, hundreds of them, are collected (Outcome.warnings), not printed
    yield StackRunner(tmp_path_factory.mktemp("stacking"))
    log.propagate = True


@pytest.fixture(scope="module")
def documented() -> set[str]:
    return documented_refusals((ROOT / "README.md").read_text())


def test_the_controls_are_found():
    """The enumeration sees every form: regularizer configs, objectives and module settings."""
    kinds = {c.name: c.kind for c in FOUND}
    assert {kinds["clip_cov"], kinds["gspo"], kinds["qae"], kinds["clip_higher"]} == {"regularizer", "objective", "setting"}
    assert kinds["clip_higher"] == kinds["passk"] == kinds["unlikeliness"] == "setting"
    assert "grpo" not in kinds  # the baseline adds nothing
    n, objectives = len(FOUND), sum(c.kind == "objective" for c in FOUND)
    assert objectives >= 4 and len(PAIRS) == n * (n - 1) // 2 - objectives * (objectives - 1) // 2  # all but objective pairs


def assert_names_both(pair, refusal: str) -> None:
    assert refusal.startswith("ValueError: ") and names_both(pair, refusal), \
        f"the refusal is no ValueError naming both controls: {refusal}"


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_a_pair_runs_or_is_refused_at_start_up(pair, runner, documented):
    out = runner.run(*pair)
    table = "regenerate the README's table with `python -m tests.stacking`"
    if out.refusal is not None:
        assert_names_both(pair, out.refusal)
        assert pair_id(pair) in documented, f"refused, but not in the README's table ({table}): {out.refusal}"
    else:
        assert check_runs(pair, out) == []
        assert pair_id(pair) not in documented, f"runs, but the README's table says refused ({table})"


@pytest.mark.parametrize("pair", [p[::-1] for p in PAIRS if disagree(p)], ids=pair_id)
def test_a_pair_whose_configs_disagree_is_refused_or_runs_in_the_other_order_too(pair, runner):
    """Where both configs set a model.loss key (the later file's value is trained), the other file
    order is another run: passk.yaml after trajectory_gtpo.yaml trains passk, before it is refused."""
    out = runner.run(*pair)
    if out.refusal is not None:
        assert_names_both(pair, out.refusal)
    else:
        assert check_runs(pair, out) == []


def test_the_readme_table_names_only_existing_pairs(documented):
    assert documented, "README: no table of refused pairs"
    assert documented <= {pair_id(p) for p in PAIRS}, documented - {pair_id(p) for p in PAIRS}
    assert refused_table(documented) in (ROOT / "README.md").read_text()  # the generated form, sorted
