"""Entropy-law fit, summary rows and the CSV writer (lab.analysis), and tools/fit_entropy_law.py."""
from __future__ import annotations

import importlib.util
import math
import random
from pathlib import Path

import pytest

from lab import analysis as an

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _synthetic(a=0.4, b=0.9, n=400, noise=0.01, seed=0):
    rng = random.Random(seed)
    h = [1.2 * math.exp(-i / 120) + 0.05 for i in range(n)]  # a collapsing entropy curve
    r = [-a * math.exp(x) + b + rng.gauss(0.0, noise) for x in h]
    return list(range(n)), h, r


def test_law_fit_recovers_a_and_b_from_noisy_data():
    _, h, r = _synthetic(a=0.4, b=0.9, noise=0.01)
    a, b = an.fit_entropy_law(h, r)
    assert a == pytest.approx(0.4, abs=0.01) and b == pytest.approx(0.9, abs=0.02)


def test_law_fit_exact_without_noise_and_rejects_degenerate_input():
    h = [0.1, 0.5, 1.0]
    a, b = an.fit_entropy_law(h, an.law_predict(0.3, 0.7, h))
    assert (a, b) == (pytest.approx(0.3), pytest.approx(0.7))
    with pytest.raises(ValueError):
        an.fit_entropy_law([0.5, 0.5], [0.1, 0.2])
    with pytest.raises(ValueError):
        an.fit_entropy_law([0.5], [0.1])


def test_fit_on_first_fraction_predicts_the_rest():
    steps, h, r = _synthetic(a=0.4, b=0.9, noise=0.01)
    res = an.fit_law_split(steps, h, r, fit_frac=0.15)
    assert res["n_fit"] == 60 and res["n_rest"] == 340 and res["fit_until_step"] == 59
    assert res["ceiling"] == pytest.approx(0.5, abs=0.05)
    assert res["rmse_rest"] < 0.03 and res["rmse_fit"] < 0.02


def _scalars():
    return {
        "policy/entropy": [(0, 0.6), (1, 0.5), (2, 0.4)],
        "rollout/reward_mean": [(0, 0.2), (1, 0.3), (2, 0.35)],
        "rollout/accuracy": [(0, 0.2), (1, 0.3), (2, 0.35)],
        "val/pass@1": [(1, 0.25)],
        "val/pass@k": [(1, 0.7)],
        "val/entropy": [(1, 0.55)],
        "reg/clip_cov/selected_frac": [(0, 0.02), (1, 0.01), (2, 0.03)],
        "reg/clip_cov/selected_adv_mean": [(0, 0.5), (1, 0.4), (2, 0.3)],
        "reg/clip_cov/coef": [(0, 2e-3), (1, 2e-3), (2, 2e-3)],
        "time/update_s": [(0, 1.0)],
    }


def test_summary_rows_one_per_step_with_blanks():
    rows = an.summary_rows("clip_cov", 2, _scalars())
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["method"] == "clip_cov" and r["seed"] == 2 for r in rows)
    assert rows[0]["val_pass@1"] is None and rows[1]["val_pass@k"] == 0.7
    assert rows[2]["selected_frac"] == 0.03 and rows[1]["entropy"] == 0.5


def test_selected_frac_sums_the_selectors_and_leaves_out_the_kept_fraction_of_high_entropy_tokens():
    """Clip-Cov + KL-Cov stacked: their acted-on fractions add up. HighEntropyTokens' selected_frac
    is the fraction it keeps (0.2 under 80/20), not one it acts on: adding it made 0.03 read 0.23."""
    scalars = {**_scalars(), "reg/kl_cov/selected_frac": [(2, 0.01)], "reg/kl_cov/coef": [(2, 1.0)],
               "reg/high_entropy_tokens/selected_frac": [(2, 0.2)]}
    rows = an.summary_rows("stack", 0, scalars)
    assert rows[2]["selected_frac"] == pytest.approx(0.04)


def test_a_selector_that_never_selects_counts_as_zero():
    """selected_adv_mean is logged only on steps that selected a token: a Clip-Cov that never
    selects was taken for no selector at all ('—' in the report, left out of the seed mean)."""
    scalars = {"policy/entropy": [(0, 0.5), (1, 0.4)], "reg/clip_cov/selected_frac": [(0, 0.0), (1, 0.0)],
               "reg/clip_cov/coef": [(0, 2e-3), (1, 2e-3)]}
    assert an.run_stats(an.summary_rows("clip_cov", 0, scalars))["selected_frac"] == 0.0


def test_a_folder_of_several_runs_is_refused(tmp_path):
    """read_scalars merged every event file below the folder by step: pointed at runs/, the entropy
    law was fitted to whichever run sorted last (or a step-by-step mix), under the folder's name."""
    from torch.utils.tensorboard import SummaryWriter

    for name in ("grpo-s0", "grpo-s1"):
        w = SummaryWriter(str(tmp_path / "runs" / name))
        w.add_scalar("policy/entropy", 0.5, 0)
        w.close()
    assert an.read_scalars(tmp_path / "runs" / "grpo-s0")["policy/entropy"] == [(0, 0.5)]
    with pytest.raises(ValueError, match="holds 2 folders of event files"):
        an.read_scalars(tmp_path / "runs")
    with pytest.raises(SystemExit, match="name one run's folder"):
        _load_tool("fit_entropy_law").fit_run(tmp_path / "runs")


def test_a_resumed_runs_parts_merge_on_request(tmp_path):
    """A resumed fit logs to the next version folder: --merge reads -v0 and -v1 as one run."""
    from torch.utils.tensorboard import SummaryWriter

    for name, steps in (("r-v0", range(0, 3)), ("r-v1", range(3, 6))):
        w = SummaryWriter(str(tmp_path / name))
        for s in steps:
            w.add_scalar("policy/entropy", 1.0 - s / 10, s)
        w.close()
    assert [s for s, _ in an.read_scalars(tmp_path, merge=True)["policy/entropy"]] == [0, 1, 2, 3, 4, 5]


def test_summary_csv_columns_and_roundtrip(tmp_path):
    rows = an.summary_rows("grpo", 0, _scalars()) + an.summary_rows("kl_cov", 1, _scalars())
    path = an.write_summary_csv(tmp_path / "out" / "summary.csv", rows)
    header = path.read_text().splitlines()[0].split(",")
    assert header[:9] == ["method", "seed", "step", "entropy", "reward_mean", "accuracy",
                          "val_pass@1", "val_pass@k", "val_entropy"]
    first = path.read_text().splitlines()[1].split(",")
    assert first[:3] == ["grpo", "0", "0"] and first[6] == ""  # empty where not logged
    back = an.read_summary_csv(path)
    assert len(back) == 6
    for a, b in zip(rows, back):
        for c in an.SUMMARY_COLUMNS:
            if a[c] is None or isinstance(a[c], str):  # blanks and the method name round-trip as is
                assert a[c] == b[c], c
            else:
                assert b[c] == pytest.approx(a[c], rel=1e-5), c


def test_run_stats_and_mean_std():
    st = an.run_stats(an.summary_rows("grpo", 0, _scalars()), edge=1)
    assert st["entropy_initial"] == 0.6 and st["entropy_final"] == 0.4
    assert st["passk_best"] == 0.7 and st["selected_frac"] == pytest.approx(0.02)
    m, s = an.mean_std([1.0, 3.0])
    assert m == 2.0 and s == pytest.approx(math.sqrt(2))
    assert an.mean_std([5.0]) == (5.0, 0.0)


def test_fit_entropy_law_tool_reads_tensorboard(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    steps, h, r = _synthetic(a=0.3, b=0.8, n=100, noise=0.005)
    w = SummaryWriter(str(tmp_path / "run"))
    for s, hh, rr in zip(steps, h, r):
        w.add_scalar("policy/entropy", hh, s)
        w.add_scalar("rollout/reward_mean", rr, s)
    w.close()
    tool = _load_tool("fit_entropy_law")
    res = tool.fit_run(tmp_path / "run", fit_frac=0.15)
    assert res["steps"] == 100 and res["n_fit"] == 15
    assert res["a"] == pytest.approx(0.3, abs=0.05) and res["ceiling"] == pytest.approx(0.5, abs=0.05)
    assert tool.main([str(tmp_path / "run"), "--fit-frac", "0.15"]) == 0
    out = capsys.readouterr().out
    assert "RMSE of the prediction on the remaining 85 steps" in out and "ceiling b - a" in out


def test_bootstrap_ci_brackets_the_mean_and_matches_a_hand_case():
    # two values 0 and 1: resampled means are 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the
    # 2.5 % and 97.5 % quantiles of 4000 resampled means are 0 and 1
    assert an.bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    lo, hi = an.bootstrap_ci([0.30, 0.32, 0.35, 0.31, 0.40])
    assert 0.30 <= lo < 0.336 < hi <= 0.40  # mean 0.336, interval inside the range of the values
    assert hi - lo < 0.10
    assert an.bootstrap_ci([0.2]) == (0.2, 0.2)
    assert all(math.isnan(x) for x in an.bootstrap_ci([]))
    assert an.bootstrap_ci([1.0, 2.0, 4.0], seed=3) == an.bootstrap_ci([1.0, 2.0, 4.0], seed=3)


def test_frontier_residuals_hand_worked():
    # baseline points lie exactly on y = -1 * e^H + 2 (a = 1, b = 2); a method 0.05 above the
    # line at every evaluation has mean residual +0.05; the first point of each run is skipped
    def run(points):
        return [{"step": s, "val_entropy": h, "val_pass@1": y} for s, h, y in points]

    line = lambda h: -math.exp(h) + 2.0  # noqa: E731
    runs = {
        ("grpo", 0): run([(0, 0.9, 0.0), (10, 0.5, line(0.5)), (20, 0.3, line(0.3))]),
        ("grpo_low_lr", 0): run([(0, 0.9, 0.0), (10, 0.6, line(0.6)), (20, 0.4, line(0.4))]),
        ("clip_cov", 0): run([(0, 0.9, 0.0), (10, 0.45, line(0.45) + 0.05), (20, 0.35, line(0.35) + 0.05)]),
        ("worse", 1): run([(0, 0.9, 0.0), (10, 0.2, line(0.2) - 0.1)]),
    }
    fr = an.frontier_residuals(runs, ["grpo", "grpo_low_lr"], "val_pass@1", skip_first=True)
    assert fr["a"] == pytest.approx(1.0) and fr["b"] == pytest.approx(2.0) and fr["n_points"] == 4
    assert fr["per_run"][("grpo", 0)] == pytest.approx(0.0, abs=1e-12)
    assert fr["per_run"][("clip_cov", 0)] == pytest.approx(0.05)
    assert fr["per_run"][("worse", 1)] == pytest.approx(-0.1)
    # keeping the first point (off the line by construction) changes the fit
    assert an.frontier_residuals(runs, ["grpo", "grpo_low_lr"], "val_pass@1")["a"] != pytest.approx(1.0)


def test_paired_differences_hand_worked():
    # seeds shared with the baseline only; NaN pairs dropped; seed order kept
    vals = {("grpo", 0): 0.20, ("grpo", 1): 0.10, ("grpo", 2): 0.30, ("grpo", 3): 0.25,
            ("clip_cov", 2): 0.35, ("clip_cov", 0): 0.22, ("clip_cov", 1): float("nan"),
            ("kl_cov", 4): 0.9,  # no grpo run at seed 4: no pair
            ("bonus", 3): 0.20}
    d = an.paired_differences(vals, "grpo")
    assert set(d) == {"clip_cov", "bonus"}
    assert d["clip_cov"] == pytest.approx([0.02, 0.05])
    assert d["bonus"] == pytest.approx([-0.05])
    # a NaN baseline value removes that seed's pair for everyone
    assert an.paired_differences({("grpo", 0): float("nan"), ("a", 0): 1.0}, "grpo") == {}


def test_merged_parts_are_read_in_version_order_past_v9(tmp_path):
    """A step logged twice (after the last checkpoint by the crashed part, then by the resumed one)
    takes the resumed part's value; string order read -v10 before -v9, so from the tenth resume on
    the crashed part's values won."""
    from torch.utils.tensorboard import SummaryWriter

    for i in range(11):  # part i resumes at step 10 i and crashes after step 10 i + 14
        w = SummaryWriter(str(tmp_path / f"grpo-quickstart-v{i}"))
        for step in range(10 * i, 10 * i + 15):
            w.add_scalar("policy/loss", float(i), step)
        w.close()
    merged = dict(an.read_scalars(tmp_path, merge=True)["policy/loss"])
    assert [merged[s] for s in (24, 94, 100, 104, 110)] == [2.0, 9.0, 10.0, 10.0, 10.0]
