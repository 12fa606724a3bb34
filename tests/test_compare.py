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
    out = tmp_path / "cmp"
    cmd = [sys.executable, str(ROOT / "tools" / "compare.py"), "--config", str(ROOT / "configs" / "quickstart.yaml"),
           "--methods", "grpo,clip_cov", "--seeds", "1", "--steps", "3", "--val-every", "3", "--out", str(out),
           "--quick", "--set", "data.val_size=8"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
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
              "gspo", "cispo"):
        assert m in compare.METHODS
    missing = [m for m in compare.METHODS if not compare.method_config(m, ROOT / "configs" / "quickstart.yaml").exists()]
    assert not missing
