"""Smoke test of tools/compare.py: two methods, one seed, a handful of RL steps, real subprocesses."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_compare_quick_two_methods_one_seed(tmp_path):
    """Run from the user's folder with a relative base config and output (the runs used to execute
    in the repository root, where `my.yaml` does not exist: every run failed with rc 2)."""
    out = tmp_path / "cmp"
    (tmp_path / "my.yaml").write_text((ROOT / "configs" / "quickstart.yaml").read_text())
    methods = ",".join(str(ROOT / "configs" / "cpu" / f"{m}.yaml") for m in ("grpo", "clip_cov"))
    cmd = [sys.executable, str(ROOT / "tools" / "compare.py"), "--config", "my.yaml",
           "--methods", methods, "--seeds", "1", "--steps", "3", "--val-every", "3", "--out", "cmp",
           "--quick", "--set", "data.val_size=8"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for m in ("grpo", "clip_cov"):
        assert list((out / "runs" / f"{m}-s0").glob("events.out.tfevents.*"))
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {"method", "seed", "step", "entropy", "reward_mean", "accuracy", "val_pass@1", "val_pass@k",
            "val_entropy"} <= set(rows[0])
    assert {(r["method"], r["step"]) for r in rows} == {(m, str(s)) for m in ("grpo", "clip_cov") for s in range(3)}
    vals = [r["val_pass@k"] for r in rows if r["method"] == "grpo"]
    assert vals[:2] == ["", ""] and 0.0 <= float(vals[2]) <= 1.0  # validated at step 3 only
    report = (out / "report.md").read_text()
    assert "| grpo | 1 |" in report and "| clip_cov | 1 |" in report
    for png in ("entropy.png", "accuracy.png", "val_passk.png", "reward_vs_entropy.png"):
        assert (out / png).stat().st_size > 0 and f"]({png})" in report


def test_every_named_method_has_a_config():
    """tools/compare.py runs configs/<method>.yaml for each method it names (incl. the entropy
    controls and objectives of the literature)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare", ROOT / "tools" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    for m in ("high_entropy_tokens", "adaptive_entropy", "steer", "entropy_advantage", "entropy_ratio_clip",
              "gspo", "cispo", "ce_gppo", "entropic"):
        assert m in compare.METHODS
    missing = [m for m in compare.METHODS if not compare.method_config(m, ROOT / "configs" / "quickstart.yaml").exists()]
    assert not missing
    # the reasoning testbed has its own overlay of each (its scale), but for the CPU-only experiment
    # with Clip-Cov's candidate window opened (gspo and cispo had none)
    reasoning = ROOT / "configs" / "reasoning.yaml"
    missing = [m for m in compare.METHODS if not compare.method_config(m, reasoning).exists()]
    assert missing == ["clip_cov_lowlb"], missing


def _compare_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare", ROOT / "tools" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    return compare


def test_testbed_overlays_and_stacked_base_configs():
    """A base config with a folder of its own (configs/reasoning/) takes its methods from there only;
    repeated --config files stack in order before the method's overlay."""
    compare = _compare_module()
    reasoning = ROOT / "configs" / "reasoning.yaml"
    for m in ("grpo", "grpo_low_lr", "entropy_bonus", "entropy_bonus_high", "adaptive_entropy", "clip_cov",
              "clip_cov_high", "clip_cov_annealed", "kl_cov", "kl_cov_high", "high_entropy_tokens", "steer",
              "entropy_advantage", "entropy_ratio_clip"):
        assert compare.method_config(m, reasoning) == ROOT / "configs" / "reasoning" / f"{m}.yaml"
        assert compare.method_config(m, reasoning).exists(), m
    assert compare.method_config("gspo", reasoning) == ROOT / "configs" / "reasoning" / "gspo.yaml"  # no fallback
    args = compare.parse_args(["--config", str(reasoning), "--config", "extra.yaml", "--methods", "kl_cov",
                               "--out", "x", "--seeds", "1"])
    cmd = compare.run_command(args, "kl_cov", 0, Path("x"))
    configs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--config"]
    assert configs == [str(reasoning), "extra.yaml", str(ROOT / "configs" / "reasoning" / "kl_cov.yaml")]
    assert compare.parse_args(["--out", "x"]).config == [str(ROOT / "configs" / "quickstart.yaml")]


def test_held_out_section_intervals_and_frontier_residuals():
    """Two GRPO runs on the line P = 2 - e^H define the frontier; a method 0.05 above it at every
    validation gets residual +0.050 with an interval of width 0 (both seeds agree)."""
    import math

    from lab.report import held_out_section

    def run(points, ent=(0.10, 0.05)):
        rows = [{"step": i, "entropy": ent[0] if i < 5 else ent[1]} for i in range(10)]
        for s, h, p in points:
            rows[s].update({"val_entropy": h, "val_pass@1": p, "val_pass@k": p})
        return rows

    line = lambda h: 2.0 - math.exp(h)  # noqa: E731
    runs = {("grpo", 0): run([(4, 0.5, line(0.5)), (9, 0.3, line(0.3))]),
            ("grpo_low_lr", 0): run([(4, 0.6, line(0.6)), (9, 0.4, line(0.4))]),
            ("clip_cov", 0): run([(4, 0.45, line(0.45) + 0.05), (9, 0.35, line(0.35) + 0.05)]),
            ("clip_cov", 1): run([(4, 0.55, line(0.55) + 0.05), (9, 0.25, line(0.25) + 0.05)])}
    lines = held_out_section(runs, ["grpo", "grpo_low_lr", "clip_cov"])
    row = next(x for x in lines if x.startswith("| clip_cov |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2" and cells[2] == "0.50 ± 0.00 [0.50, 0.50]"  # entropy 0.05 / 0.10
    assert cells[7] == cells[8] == "+0.050 ± 0.000 [+0.050, +0.050]"
    best1 = line(0.25) + 0.05, line(0.35) + 0.05  # best pass@1 of seed 1 and seed 0 (the last validation)
    assert cells[4].startswith(f"{sum(best1) / 2:.3f} ± ")
    assert any("frontier: a = 1.0000, b = 2.0000" in x for x in lines)


def test_same_learning_rate_frontier_is_fitted_on_grpo_alone():
    """grpo on P = 2 - e^H, low-lr GRPO 0.2 above it: the pooled frontier sits 0.1 above grpo's line,
    so a control 0.05 above grpo's line is below the pooled frontier (-0.05) but above GRPO at its
    own learning rate (+0.05); without a second GRPO learning rate there is no such section."""
    import math

    from lab.report import held_out_section, same_lr_section

    def run(points):
        rows = [{"step": i, "entropy": 0.1} for i in range(10)]
        for s, h, p in points:
            rows[s].update({"val_entropy": h, "val_pass@1": p, "val_pass@k": p})
        return rows

    line = lambda h: 2.0 - math.exp(h)  # noqa: E731
    hs = (0.2, 0.4, 0.6)
    runs = {("grpo", 0): run([(3 * i + 3, h, line(h)) for i, h in enumerate(hs)]),
            ("grpo_low_lr", 0): run([(3 * i + 3, h, line(h) + 0.2) for i, h in enumerate(hs)]),
            ("clip_cov", 0): run([(3 * i + 3, h, line(h) + 0.05) for i, h in enumerate(hs)])}
    methods = ["grpo", "grpo_low_lr", "clip_cov"]
    pooled = next(x for x in held_out_section(runs, methods) if x.startswith("| clip_cov |"))
    assert pooled.count("-0.050 ± 0.000 [-0.050, -0.050]") == 2
    lines = same_lr_section(runs, methods)
    assert any("frontier (grpo): a = 1.0000, b = 2.0000 (3 points)" in x for x in lines)
    row = next(x for x in lines if x.startswith("| clip_cov |"))
    assert row == "| clip_cov | 1 | +0.050 ± 0.000 [+0.050, +0.050] | +0.050 ± 0.000 [+0.050, +0.050] |"
    assert next(x for x in lines if x.startswith("| grpo_low_lr |")).count("+0.200") == 6
    assert same_lr_section({k: v for k, v in runs.items() if k[0] != "grpo_low_lr"}, ["grpo", "clip_cov"]) == []


def test_paired_section_hand_worked():
    """Method minus grpo at the same seed: entropy ratio, final pass@1 / pass@k, best pass@k, and
    best pass@k minus grpo_low_lr's; a seed grpo did not run (clip_cov seed 2) has no pair."""
    from lab.report import paired_section

    def run(ent_final, pass1_final, passk):
        rows = [{"step": i, "entropy": 1.0 if i < 5 else ent_final} for i in range(10)]
        for step, pk in zip((3, 6, 9), passk):
            rows[step].update({"val_entropy": 0.1, "val_pass@1": 0.0, "val_pass@k": pk})
        rows[9]["val_pass@1"] = pass1_final
        return rows

    runs = {("grpo", 0): run(0.5, 0.20, (0.4, 0.6, 0.5)), ("grpo", 1): run(0.5, 0.10, (0.3, 0.4, 0.35)),
            ("grpo_low_lr", 0): run(0.5, 0.30, (0.5, 0.65, 0.6)), ("grpo_low_lr", 1): run(0.5, 0.3, (0.4, 0.48, 0.4)),
            ("clip_cov", 0): run(0.6, 0.25, (0.4, 0.7, 0.55)), ("clip_cov", 1): run(0.56, 0.08, (0.3, 0.45, 0.45)),
            ("clip_cov", 2): run(0.9, 0.9, (0.9, 0.9, 0.9))}
    lines = paired_section(runs, ["grpo", "grpo_low_lr", "clip_cov"])
    assert lines[-4].endswith("| Δ best pass@k | Δ best pass@k vs grpo_low_lr |")
    # entropy ratio 0.6 - 0.5, 0.56 - 0.5; pass@1 0.25 - 0.2, 0.08 - 0.1; final pass@k 0.55 - 0.5,
    # 0.45 - 0.35; best pass@k 0.7 - 0.6, 0.45 - 0.4; against grpo_low_lr 0.7 - 0.65, 0.45 - 0.48
    assert lines[-1] == ("| clip_cov | 2 | +0.08 ± 0.03 [+0.06, +0.10] (2/2 > 0) "
                         "| +0.015 ± 0.049 [-0.020, +0.050] (1/2 > 0) | +0.075 ± 0.035 [+0.050, +0.100] (2/2 > 0) "
                         "| +0.075 ± 0.035 [+0.050, +0.100] (2/2 > 0) | +0.010 ± 0.057 [-0.030, +0.050] (1/2 > 0) |")
    assert lines[-2].startswith("| grpo_low_lr | 2 | +0.00 ± 0.00") and lines[-2].endswith("| — |")
    assert paired_section({k: v for k, v in runs.items() if k[0] != "grpo"}, ["grpo_low_lr", "clip_cov"]) == []


def test_a_comparison_stopped_part_way_keeps_its_finished_runs(tmp_path, monkeypatch):
    """runs.csv is written after every run: the second run dies (as on Ctrl-C or a session's end),
    the first stays recorded, and --skip-existing keeps it instead of running it again."""
    compare = _compare_module()
    out = tmp_path / "cmp"
    launched = []

    def fake_launch(cmd, log):
        launched.append(cmd[cmd.index("--trainer.logger.init_args.name") + 1])
        if len(launched) == 2:
            raise KeyboardInterrupt
        (out / "runs" / "grpo-s0").mkdir(parents=True, exist_ok=True)
        (out / "runs" / "grpo-s0" / "events.out.tfevents.0").write_text("")
        return 12.5, 0

    monkeypatch.setattr(compare, "launch", fake_launch)
    args = compare.parse_args(["--methods", "grpo,clip_cov", "--seeds", "1", "--jobs", "1", "--out", str(out)])
    out.mkdir()
    with pytest.raises(KeyboardInterrupt):
        compare.run_all(args, out)
    assert launched == ["grpo-s0", "clip_cov-s0"]
    assert compare.read_meta(out) == [{"method": "grpo", "seed": 0, "wall_s": 12.5, "returncode": 0}]
    launched.clear()
    monkeypatch.setattr(compare, "launch", lambda cmd, log: (launched.append(cmd[cmd.index("--trainer.logger.init_args.name") + 1]), (3.0, 0))[1])
    args = compare.parse_args(["--methods", "grpo,clip_cov", "--seeds", "1", "--jobs", "1", "--out", str(out),
                               "--skip-existing"])
    meta = compare.run_all(args, out)
    assert launched == ["clip_cov-s0"]  # grpo-s0 was kept
    assert {(x["method"], x["wall_s"]) for x in meta} == {("grpo", 12.5), ("clip_cov", 3.0)}
    assert {(x["method"], x["wall_s"]) for x in compare.read_meta(out)} == {("grpo", 12.5), ("clip_cov", 3.0)}


def _synthetic_runs(out: Path, spec: dict[str, int]) -> None:
    """TensorBoard runs under out/runs/<method>-s<seed> with the same curves for every method:
    entropy 1 - step/100, reward step/100, a validation every 5 steps; `spec`: name -> steps logged."""
    from torch.utils.tensorboard import SummaryWriter

    for name, steps in spec.items():
        w = SummaryWriter(str(out / "runs" / name))
        for s in range(steps):
            w.add_scalar("policy/entropy", 1 - s / 100, s)
            w.add_scalar("rollout/reward_mean", s / 100, s)
            if s % 5 == 4:
                w.add_scalar("val/pass@1", s / 50, s)
                w.add_scalar("val/pass@k", s / 40, s)
        w.close()


def test_a_run_stopped_early_is_left_out_of_the_report_and_named(tmp_path, capsys):
    """Review tools14: a seed cut short (Ctrl-C, a crash) had its last logged step's figures
    averaged in as 'final' with complete seeds: two identical methods showed a difference."""
    compare = _compare_module()
    out = tmp_path / "cmp"
    _synthetic_runs(out, {"grpo-s0": 16, "grpo-s1": 16, "clip_cov-s0": 16, "clip_cov-s1": 10})
    rc = compare.main(["--report-only", "--out", str(out), "--methods", "grpo,clip_cov", "--seeds", "2"])
    assert rc == 1 and "left out of the report's tables (stopped early or failed): clip_cov-s1 (stopped at step 9 of 15)" \
        in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "Left out of every table and plot (failed, or stopped before the others' last step): clip_cov-s1" in report
    grpo = next(x for x in report.splitlines() if x.startswith("| grpo | 2 |"))
    clip = next(x for x in report.splitlines() if x.startswith("| clip_cov | 1 |"))
    assert grpo.split("|")[3:9] == clip.split("|")[3:9]  # identical curves, identical figures


def test_report_only_reads_every_seed_and_refuses_an_empty_folder(tmp_path):
    """--report-only reported (and rewrote summary.csv with) seeds 0-2 only, --seeds' default, of a
    5-seed comparison; a mistyped --out was created and reported as 0 rows with rc 0."""
    compare = _compare_module()
    out = tmp_path / "cmp"
    _synthetic_runs(out, {f"grpo-s{s}": 6 for s in range(5)})
    assert compare.main(["--report-only", "--out", str(out), "--methods", "grpo"]) == 0
    with (out / "summary.csv").open() as f:
        assert {r["seed"] for r in csv.DictReader(f)} == {"0", "1", "2", "3", "4"}
    assert "| grpo | 5 |" in (out / "report.md").read_text()
    with pytest.raises(SystemExit, match="no runs in"):
        compare.main(["--report-only", "--out", str(tmp_path / "typo"), "--methods", "grpo"])
    assert not (tmp_path / "typo").exists()


def test_report_only_reports_every_method_in_the_folder_and_refuses_one_it_lacks(tmp_path):
    """Without --methods, --report-only used the default four methods: grpo_low_lr's runs left
    summary.csv, and methods never run there got '0 | n/a' rows, rc 0 (review layout14)."""
    compare = _compare_module()
    out = tmp_path / "cmp"
    _synthetic_runs(out, {"grpo-s0": 6, "grpo_low_lr-s0": 6, "clip_cov-s0": 6})
    assert compare.main(["--report-only", "--out", str(out)]) == 0
    with (out / "summary.csv").open() as f:
        assert {r["method"] for r in csv.DictReader(f)} == {"grpo", "grpo_low_lr", "clip_cov"}
    report = (out / "report.md").read_text()
    assert all(f"| {m} | 1 |" in report for m in ("grpo", "grpo_low_lr", "clip_cov")) and "| kl_cov |" not in report
    with pytest.raises(SystemExit, match="no runs of kl_cov in .*; it holds clip_cov, grpo, grpo_low_lr"):
        compare.main(["--report-only", "--out", str(out), "--methods", "grpo,kl_cov"])
