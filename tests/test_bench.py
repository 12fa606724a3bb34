"""tools/bench.py runs end to end on a tiny config and reports every documented key (no timing
assertions: the figures depend on the machine and its load)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench  # noqa: E402

PHASES = ("step_s", "rollout_s", "score_s", "update_s", "other_s", "tokens_per_s", "completion_tokens", "params")
REGS = ("EntropyBonus", "ClipCov", "KLCov")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


def test_bench_quick_json_has_the_documented_keys(tiny_model_dir):
    res = json.loads(json.dumps(bench.run(quick=True, model=tiny_model_dir)))  # JSON round trip
    assert {"cpu", "cores", "torch_threads", "loadavg_1_5_15", "loadavg_end"} <= set(res["machine"])
    assert _positive(res["peak_rss_mb"])
    q = res["models"]["quickstart"]
    assert all(_positive(q[k]) for k in PHASES), q
    assert q["ref_logp_s"] >= 0
    for key in ("overhead", "overhead_1update"):
        assert all(_positive(res[key][k]) for k in (*REGS, "update_s_none")), res[key]
    assert set(res["selection_ms"]) == {"1e4", "1e5", "1e6"}
    for n, v in res["selection_ms"].items():
        assert all(_positive(v[k]) for k in ("cov", "clip_cov", "kl_cov")), (n, v)
    # the wasted-pass checks hold on this config too
    for label in ("none", "ClipCov", "KLCov"):
        c = res["checks"][label]
        assert c["reference_model_loaded"] is False
        assert c["generate_forwards"] == c["response_columns"] == c["longest_response"]
        assert c["loss_mask_tokens_after_eos"] == 0 and c["selected_padding_tokens"] == 0
    assert res["checks"]["none"]["update_forwards"] == res["checks"]["none"]["expected_update_forwards_without_recompute"]
    assert 0 < res["checks"]["entropy_fp32_peak_fraction_of_NTV"] < 1
