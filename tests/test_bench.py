"""tools/bench.py runs end to end on a tiny config and reports every documented key (no timing
assertions: the figures depend on the machine and its load)."""
from __future__ import annotations

import json
import os
import re
import shlex
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


def test_bench_gpu_model_flops_match_the_parameter_count():
    """MFU's numerator: 6 x (non-embedding params) per token + the LM head on response positions
    + causal attention, against the real Qwen2.5-0.5B architecture's parameter count (built on
    the meta device: no memory). Biases and norms are left out of the formula: < 0.1 % here."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import bench_gpu

    cfg = Qwen2Config(tie_word_embeddings=True, **bench_gpu.SHAPES["0.5B"])
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert 490e6 < total < 500e6  # Qwen2.5-0.5B: 494M
    body = total - cfg.vocab_size * cfg.hidden_size  # the tied embedding is counted once, as the head
    P, T = 128, 512
    S = P + T
    expected = 3 * (2 * body * S + 2 * cfg.hidden_size * cfg.vocab_size * (T + 1)
                    + 2 * cfg.num_hidden_layers * cfg.hidden_size * S * S)
    assert bench_gpu.model_flops_per_seq(cfg, P, T) == pytest.approx(expected, rel=1e-3)


# Packages a GPU machine lacks (it has torch and transformers; tools/gpu_check.sh brings only the
# wheels of lightning, jsonargparse, omegaconf and pytest): the benchmark's runs must not need them.
_NOT_ON_A_BARE_GPU_MACHINE = ("tensorboard", "math_verify", "latex2sympy2_extended", "datasets", "pyarrow", "pandas")


def _block_imports(root, names):
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here (test)')\n")
    return root


def test_bench_gpu_runs_end_to_end_on_cpu(tmp_path, monkeypatch):
    import bench_gpu

    # each run is a child process: these imports fail there, as on the GPU machine
    blocked = _block_imports(tmp_path / "blocked", _NOT_ON_A_BARE_GPU_MACHINE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(blocked), os.environ.get("PYTHONPATH")])))
    out = tmp_path / "gpu.json"
    runs = ["tiny:kv_cache", "tiny:static_eager", "tiny:hf_generate"]
    bench_gpu.main(["--device", "cpu", "--runs", *runs, "--steps", "2", "--prompts", "4", "--updates", "2",
                    "--micro", "8", "--prompt-len", "8", "--new-tokens", "6", "--out", str(out)])
    res = json.loads(out.read_text())
    assert [r["name"] for r in res["configs"]] == runs
    for r in res["configs"]:
        assert "error" not in r, r.get("error")
        assert {"name", "sampler", "rollout_tok_s", "decode_ms_per_step", "update_tok_s", "update_mfu", "step_s"} <= set(r)
        assert _positive(r["rollout_tok_s"]) and _positive(r["decode_ms_per_step"])
        if r["config"] != "hf_generate":
            assert r["loss_finite"] and _positive(r["update_tok_s"]) and _positive(r["step_s"])
    assert res["configs"][1]["sampler_stats"]["steps"] == 6


def test_bench_gpu_profile_says_where_the_step_went(tmp_path):
    import bench_gpu

    out = tmp_path / "gpu.json"
    bench_gpu.main(["--device", "cpu", "--runs", "tiny:kv_cache", "--steps", "3", "--prompts", "4", "--updates", "2",
                    "--micro", "8", "--prompt-len", "8", "--new-tokens", "6", "--profile", "--out", str(out)])
    r = json.loads(out.read_text())["configs"][0]
    assert "error" not in r, r.get("error")
    assert r["steps_measured"] == 1  # warm-up and the profiled step are left out of the medians
    prof = r["profile"]
    assert prof["ranked_by"] == "self cpu ms" and _positive(prof["step_wall_ms"]) and len(prof["top"]) == 25
    own = [op["self_cpu_ms"] for op in prof["top"]]
    assert own == sorted(own, reverse=True) and sum(own) < prof["step_wall_ms"]
    assert any(op["op"] in ("aten::mm", "aten::addmm", "aten::bmm") for op in prof["top"])  # the matmuls show up
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--device", "cpu", "--profile", "--steps", "2"])


def test_bench_gpu_profile_summary_counts_kernel_time_once():
    """On CUDA an operator's own device time is its kernels' time again: the busy time sums the
    kernels only (hand-made events: an mm op whose kernel took 3 ms, a graph-replayed kernel of
    5 ms that belongs to no operator, a host-only op)."""
    from types import SimpleNamespace as E

    from torch.autograd import DeviceType

    import bench_gpu

    events = [E(key="aten::mm", count=2, self_cpu_time_total=400.0, self_device_time_total=3000.0, device_type=DeviceType.CPU),
              E(key="gemm_kernel", count=2, self_cpu_time_total=0.0, self_device_time_total=3000.0, device_type=DeviceType.CUDA),
              E(key="graph_kernel", count=9, self_cpu_time_total=0.0, self_device_time_total=5000.0, device_type=DeviceType.CUDA),
              E(key="aten::item", count=1, self_cpu_time_total=900.0, self_device_time_total=0.0, device_type=DeviceType.CPU)]
    prof = E(key_averages=lambda: events)
    res = bench_gpu.profile_summary(prof, 0.02, "cuda", top=3)
    assert res["device_busy_ms"] == 8.0 and res["step_wall_ms"] == 20.0
    assert [(e["op"], e["kind"], e["self_cuda_ms"]) for e in res["top"]] == [
        ("graph_kernel", "kernel", 5.0), ("aten::mm", "op", 3.0), ("gemm_kernel", "kernel", 3.0)]
    cpu = bench_gpu.profile_summary(prof, 0.02, "cpu", top=2)
    assert "device_busy_ms" not in cpu and [e["op"] for e in cpu["top"]] == ["aten::item", "aten::mm"]


def test_bench_logging_reports_positive_medians(tiny_model_dir):
    import bench_logging
    from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector

    from lit_covrl.module import GRPOModule

    timed = [(GRPOModule, "training_step"), (GRPOModule, "log_step"), (_LoggerConnector, "update_train_step_metrics")]
    before = [cls.__dict__[name] for cls, name in timed]
    res = bench_logging.main(["--steps", "4", "--warmup", "1", "--model", tiny_model_dir])
    assert set(res) == {"training_step_ms", "log_step_ms", "lightning_step_logging_ms"}
    assert all(_positive(v) for v in res.values()), res
    assert res["log_step_ms"] < res["training_step_ms"]  # log_step runs inside training_step
    # the timing wrappers are gone: each class holds its original function object again
    assert [cls.__dict__[name] for cls, name in timed] == before


def test_one_entry_point_names_every_benchmark_script(capsys):
    """`python tools/bench.py list` / `NAME ...`: every name points to a script in tools/ that runs
    as __main__ (a renamed or deleted script fails here), and every bench_*/profile_step script
    has a name."""
    tools = Path(__file__).resolve().parents[1] / "tools"
    assert bench._dispatch(["list"])
    listed = capsys.readouterr().out.split()
    assert all(name in listed for name in bench.BENCHMARKS)
    files = {f for f, _ in bench.BENCHMARKS.values()}
    assert all((tools / f).is_file() for f in files)
    runnable = {p.name for p in tools.glob("bench_*.py") if "__main__" in p.read_text()} | {"profile_step.py"}
    assert runnable - {"bench_common.py", "bench_measure.py"} <= files | {"bench.py"}
    assert not bench._dispatch(["--quick"])  # the default benchmark's own flags pass through


def test_every_function_the_step_profiler_times_still_exists():
    """tools/profile_lit.py wraps functions by name; a renamed or moved one would make
    `tools/profile_step.py` fail with an AttributeError before it measured anything."""
    import profile_lit

    for owner, attr, _ in profile_lit.PATCHES:
        assert callable(getattr(profile_lit.resolve(owner), attr, None)), f"{owner}.{attr}"


def test_bench_gpu_deadline_skips_runs_it_cannot_fit_and_every_entry_has_the_figures(tmp_path):
    """The prepared GPU check has one device command (<= 600 s): its runs share --deadline-s, and a
    run that cannot fit is listed as skipped, with the figures as null like a failed run's (a
    failed run lacked them, so readers of the JSON met a KeyError)."""
    import bench_gpu

    out = tmp_path / "gpu.json"
    res = bench_gpu.main(["--device", "cpu", "--runs", "tiny:kv_cache", "tiny:static_eager", "--deadline-s", "20",
                          "--out", str(out)])
    assert res == json.loads(out.read_text())
    assert [r["name"] for r in res["configs"]] == ["tiny:kv_cache", "tiny:static_eager"]
    for r in res["configs"]:
        assert r["error"].startswith("skipped: ") and "--deadline-s 20" in r["error"]
        assert all(r[k] is None for k in bench_gpu.FIGURES)


def test_gpu_check_help_prints_usage_and_runs_nothing(tmp_path):
    """`--help` prints the script's header and bench_gpu.py's options (it used to run the whole
    check: nvidia-smi, the GPU tests, a benchmark whose help went to /dev/null)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(["bash", "tools/gpu_check.sh", "--runs", "tiny:kv_cache", "--help"], cwd=root,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OUT": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("The prepared GPU check") and "usage: bench_gpu.py" in out.stdout
    assert not list(tmp_path.iterdir())  # no gpu_tests.log, bench_gpu.json or bench_gpu.log


_SCRIPT = re.compile(r"(?:^|\s)(?:(?:bash|sh|python3?)\s+)?tools/(gpu_check\.sh|bench_gpu\.py)\b")
_FENCE = re.compile(r"^ *```[^\n]*\n(.*?)^ *```", re.S | re.M)
_WORKTREE = re.compile(r"git worktree add \S+ ([0-9a-f]{7,40})\b")  # the command runs that commit's scripts


def _doc_gpu_commands(root: Path):
    """Every gpu_check.sh / bench_gpu.py command in README.md and docs/*.md (fenced blocks line by
    line, inline code spans per paragraph): (where, script, argv, env, commit or None)."""
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = path.read_text()
        snippets = []  # (line, text before it that sets the context, the snippet)
        for m in _FENCE.finditer(text):
            lines = m.group(1).replace("\\\n", " ").splitlines()
            first = text.count("\n", 0, m.start(1)) + 1
            snippets += [(first + i, "\n".join(lines[:i]), ln) for i, ln in enumerate(lines)]
        prose = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
        offset = 0
        for para in prose.split("\n\n"):
            for m in re.finditer(r"`([^`]+)`", para):
                snippets.append((prose.count("\n", 0, offset + m.start()) + 1, "", m.group(1).replace("\n", " ")))
            offset += len(para) + 2
        for line, context, snippet in snippets:
            m = _SCRIPT.search(snippet)
            if m:
                before = snippet[:m.start()]
                rest = re.split(r"\s(?:#|&&|;|\||\d?>)", " " + snippet[m.end():])[0]
                env = dict(w.split("=", 1) for w in shlex.split(before.split("&&")[-1]) if "=" in w)
                commit = _WORKTREE.search(context + "\n" + before)
                yield (f"{path.relative_to(root)}:{line}", m.group(1), shlex.split(rest), env,
                       commit and commit.group(1))


def _bench_gpu_parser_of(commit: str, tmp_path: Path):
    """parse_args of tools/bench_gpu.py as it was at `commit` (None when git cannot show it)."""
    import importlib.util
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        src = subprocess.run(["git", "show", f"{commit}:tools/bench_gpu.py"], cwd=root, capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    (tmp_path / commit / "tools").mkdir(parents=True)
    file = tmp_path / commit / "tools" / "bench_gpu.py"
    file.write_text(src)
    spec = importlib.util.spec_from_file_location(f"bench_gpu_{commit}", file)
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module.parse_args


def test_every_gpu_command_in_the_docs_parses(tmp_path, capsys):
    """Each gpu_check.sh / bench_gpu.py command that README.md and docs/*.md give is accepted by
    bench_gpu.py's argument parser (run configs included) and names only gpu_check.sh's stages;
    a command run in a worktree of an older commit (`git worktree add DIR COMMIT && ...`) by that
    commit's parser. The docs had named run configs and flags that bench_gpu.py no longer has
    (`--configs single single_no_shared_prompt`)."""
    import subprocess

    import bench_gpu

    root = Path(__file__).resolve().parents[1]
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=root, capture_output=True,
                             text=True).stdout.strip()
    commands, bad, parsers = list(_doc_gpu_commands(root)), [], {None: bench_gpu.parse_args}
    assert sum(bool(argv) for _, _, argv, _, _ in commands) >= 6, commands  # the extraction finds them
    for where, script, argv, env, commit in commands:
        if commit not in parsers:
            parsers[commit] = _bench_gpu_parser_of(commit, tmp_path)
        parse = parsers[commit]
        if parse is None:
            if shallow == "false":  # a full clone has every commit the docs name
                bad.append(f"{where}: commit {commit} is not in this repository")
            continue
        for stage in env.get("GPU_CHECK_STAGES", "tests").split(","):
            if script == "gpu_check.sh" and stage not in ("tests", "gap", "bench"):
                bad.append(f"{where}: GPU_CHECK_STAGES stage {stage!r}")
        try:
            parse(argv)
        except SystemExit as err:
            if err.code:
                bad.append(f"{where}: {script} {' '.join(argv)}: {capsys.readouterr().err.strip().splitlines()[-1]}")
    assert not bad, "\n".join(bad)


def test_gpu_check_runs_only_the_stages_asked_for(tmp_path):
    """GPU_CHECK_STAGES picks the stages (a second call for the benchmark's skipped runs need not
    repeat the tests and logprob_gap); the gap stage writes the KV rows and a GPU fit's default
    sampler under bf16 autocast into logprob_gap.txt. An unknown stage is refused before anything runs."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    cmd = ["bash", "tools/gpu_check.sh", "--device", "cpu", "--runs", "tiny:kv_cache"]
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_BUDGET": "40"}  # a bench stage would skip its run
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300,
                         env={**env, "GPU_CHECK_STAGES": "gap"})
    assert out.returncode == 0, out.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["logprob_gap.txt"]  # no gpu_tests.log, no bench_gpu.*
    gap = (tmp_path / "logprob_gap.txt").read_text()
    assert "KVCacheSampler()" in gap and "StaticCacheSampler(graphs='compile'" in gap
    assert gap.count("\nbfloat16 ") == 2 and gap.count("\nbf16-mixed ") == 2, gap
    assert "Loading weights" not in gap  # transformers' progress bars (each line begins with a carriage return)
    (tmp_path / "logprob_gap.txt").unlink()
    bad = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=60,
                         env={**env, "GPU_CHECK_STAGES": "bench,gaps"})
    assert bad.returncode == 2 and "GPU_CHECK_STAGES=bench,gaps: unknown stage 'gaps'" in bad.stderr
    assert not list(tmp_path.iterdir())


def test_logprob_gap_reports_every_dtype_and_temperature(capsys):
    """tools/logprob_gap.py (run by gpu_check.sh on the GPU): the sampler's recorded log-probs are the
    training forward's up to float32 rounding on the CPU."""
    import logprob_gap

    rows = logprob_gap.main(["--dtypes", "float32", "--prompts", "4", "--group", "2", "--max-new-tokens", "4"])
    assert [(r["dtype"], r["temperature"]) for r in rows] == [("float32", 1.0), ("float32", 0.7)]
    assert all(r["tokens"] > 0 and 0 <= r["mean"] <= r["max"] < 1e-4 for r in rows), rows
    assert "on cpu: 4 prompts x 2 samples" in capsys.readouterr().out


def test_logprob_gap_measures_the_sampler_and_precision_of_a_gpu_fit(capsys):
    """gpu_check.sh's second logprob_gap row set is the GPU fit's default: StaticCacheSampler with a
    compiled step (eager on the CPU) under bf16 autocast over fp32 weights (bf16-mixed). It used to
    measure only KVCacheSampler with bf16 weights, which is not what a GPU fit runs."""
    import logprob_gap

    small = ["--prompts", "4", "--group", "2", "--max-new-tokens", "4"]
    rows = logprob_gap.main(["--sampler", "static_compile", "--autocast", *small])
    out = capsys.readouterr().out
    assert [(r["sampler"], r["dtype"], r["temperature"]) for r in rows] == [
        ("static_compile", "bf16-mixed", 1.0), ("static_compile", "bf16-mixed", 0.7)]
    assert "StaticCacheSampler(graphs='compile'" in out and "bf16-mixed" in out
    # bf16 rounding may separate them, but they are the same log-probs
    assert all(r["tokens"] > 0 and 0 <= r["max"] < 0.5 and r["mean"] <= r["max"] for r in rows), rows
    kv = logprob_gap.main(["--sampler", "kv", "--dtypes", "float32", *small])
    assert [r["sampler"] for r in kv] == ["kv", "kv"] and all(r["max"] < 1e-4 for r in kv), kv
    with pytest.raises(SystemExit):  # fp32 weights under autocast: a --dtypes list would say otherwise
        logprob_gap.main(["--autocast", "--dtypes", "bfloat16"])
