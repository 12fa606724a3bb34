"""Run several methods x seeds on the same task and budget, then collect, tabulate and plot.

    python tools/compare.py --config configs/quickstart.yaml \
        --methods grpo,entropy_bonus,clip_cov,kl_cov --seeds 3 --steps 150 --out runs/compare [--quick]

Each method name maps to an overlay stacked on the `--config` file(s): when the (first) base config
has a folder of its own next to it (configs/reasoning.yaml -> configs/reasoning/), the method is
`<that folder>/<method>.yaml` and nothing else (its overlays are scaled for that testbed); otherwise
`cpu/<method>.yaml` or `experiments/<method>.yaml` in the base config's folder (the CPU-scale
overlays of the quickstart). A path to a YAML also works. `--config` may be repeated: the files
stack in order before the method's overlay (e.g. a budget overlay such as
configs/reasoning/budget_1h.yaml). Methods shipped: grpo, grpo_low_lr, entropy_bonus(_high), clip_cov
(_annealed, _high, _lowlb), kl_cov(_high), high_entropy_tokens, adaptive_entropy, steer,
entropy_advantage, entropy_ratio_clip, w_reinforce, entropic, archer, simko, lp_reg, siren, bapo, era, aent, aepo, trajectory_gtpo, prorl, outcome, ar, lopti, ar_lopti, dcpo (regularizers), qae (a quantile baseline), passk (Pass@k Training's advantage), unlikeliness (the unlikeliness reward) and gspo, cispo, ce_gppo, aspo (objectives); see METHODS. Every run is a `python -m lit_covrl.cli fit` subprocess (this checkout's code) with `--torch_threads 1`,
`--jobs` (default 2) at a time. Seed s sets `--seed_everything`, `--model.seed` and `--data.seed`,
so every method's seed-s run samples the same train prompt stream and is scored on the same
held-out prompts (a task's held-out set is drawn with the data seed): the report's "Paired by seed"
table compares methods within a seed, free of the held-out sets' differences in difficulty
(`--set data.val_seed=0` scores every run on one held-out set instead). Writes
  DIR/runs/<method>-s<seed>/   TensorBoard logs (`tensorboard --logdir DIR/runs`)
  DIR/logs/<method>-s<seed>.log  the run's stdout/stderr
  DIR/runs.csv                 method, seed, wall_s, returncode per run
  DIR/summary.csv              one row per (method, seed, logged step), see lab.analysis
  DIR/report.md + DIR/*.png    per-method table (mean +- std over seeds) and plots
`--set key=value` (repeatable) passes `--key value` to every run, e.g. `--set model.eval.k=4`.
`--report-only` rebuilds summary.csv and report.md from DIR/runs without training, from every seed
there (not only --seeds) and, without --methods, every method there. A failed run, or one stopped before the others' last step, is left out of
the report's tables and plots and named (exit status 1): its "final" figures would be an earlier
step's.
"""
from __future__ import annotations

import argparse
import csv
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lab import analysis as an  # noqa: E402
from lab.report import make_report  # noqa: E402

# entropy controls and objectives that `--methods` accepts by name (configs/cpu/<name>.yaml)
METHODS = (
    "grpo", "grpo_low_lr", "entropy_bonus", "entropy_bonus_high", "clip_cov", "clip_cov_annealed",
    "clip_cov_high", "clip_cov_lowlb", "kl_cov", "kl_cov_high", "high_entropy_tokens", "adaptive_entropy",
    "steer", "entropy_advantage", "entropy_ratio_clip", "gspo", "cispo", "ce_gppo", "aspo", "qae", "w_reinforce",
    "passk", "entropic", "archer", "simko", "lp_reg", "unlikeliness", "siren", "bapo", "era", "aent", "aepo",
    "trajectory_gtpo", "prorl", "outcome", "ar", "lopti", "ar_lopti", "dcpo",
)
QUICK_STEPS = 16      # --quick: a smoke run (process start-up dominates: ~25 s per run on a busy 2-core CPU)
QUICK_VAL_EVERY = 8
QUICK_SEEDS = 2
QUICK_VAL_SIZE = 32


DEFAULT_METHODS = "grpo,entropy_bonus,clip_cov,kl_cov"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", default=None,
                   help="base config (repeatable: stacked in order); default configs/quickstart.yaml")
    p.add_argument("--methods", default=None,
                   help="comma-separated method names (configs/cpu/ or configs/experiments/<name>.yaml) or YAML paths "
                        f"(default {DEFAULT_METHODS}; with --report-only, every method in DIR)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds: 0 .. N-1")
    p.add_argument("--steps", type=int, default=None, help="RL steps per run (default: the config's)")
    p.add_argument("--val-every", type=int, default=None, help="validation interval in RL steps")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run (< 5 min on 2 cores): at most {QUICK_STEPS} steps and {QUICK_SEEDS} seeds, "
                        f"validation every {QUICK_VAL_EVERY} steps on {QUICK_VAL_SIZE} prompts")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra CLI override for every run (repeatable)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (each uses 1 torch thread)")
    p.add_argument("--skip-existing", action="store_true",
                   help="keep runs already finished in DIR (rc 0 in DIR/runs.csv), e.g. to add seeds")
    p.add_argument("--report-only", action="store_true", help="only rebuild summary.csv and report.md")
    p.add_argument("--fit-frac", type=float, default=0.15, help="law fit on the first fraction of steps")
    args = p.parse_args(argv)
    args.config = args.config or [str(ROOT / "configs" / "quickstart.yaml")]
    return args


METHOD_DIRS = ("cpu", "experiments")  # where method names are looked up, next to the base config


def method_config(name: str, base: Path) -> Path:
    """The overlay of a method: a YAML path as given; else `<base folder>/<base stem>/<name>.yaml`
    when that folder exists (a testbed with its own overlays); else
    `<base folder>/{cpu,experiments}/<name>.yaml` (the first that exists; the cpu/ path when neither
    does, so the error names it)."""
    if name.endswith((".yaml", ".yml")):
        return Path(name)
    own = base.parent / base.stem
    if own.is_dir():
        return own / f"{name}.yaml"
    candidates = [base.parent / d / f"{name}.yaml" for d in METHOD_DIRS]
    return next((c for c in candidates if c.exists()), candidates[0])


def method_name(name: str) -> str:
    return Path(name).stem if name.endswith((".yaml", ".yml")) else name


def run_command(args, method: str, seed: int, out: Path) -> list[str]:
    # this interpreter, this checkout's code: its root goes first on sys.path (`-m` would put the
    # caller's folder first, where another checkout's lit_covrl could shadow it)
    cmd = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); from lit_covrl.cli import main; main()",
           "fit"]
    for cfg in args.config:
        cmd += ["--config", str(cfg)]
    cmd += ["--config", str(method_config(method, Path(args.config[0]))),
           "--torch_threads", "1",
           "--seed_everything", str(seed), "--model.seed", str(seed), "--data.seed", str(seed),
           "--trainer.logger.init_args.save_dir", str(out / "runs"),
           "--trainer.logger.init_args.name", f"{method_name(method)}-s{seed}",
           "--trainer.logger.init_args.version", "",
           "--trainer.enable_progress_bar", "false",
           "--checkpoint.save_last", "false", "--checkpoint.every_n_train_steps", "0"]
    steps = args.steps
    val_every = args.val_every
    if args.quick:
        steps = min(steps or QUICK_STEPS, QUICK_STEPS)
        val_every = val_every or QUICK_VAL_EVERY
        cmd += ["--data.val_size", str(QUICK_VAL_SIZE)]
    if steps:
        cmd += ["--trainer.max_steps", str(steps)]
    if val_every:
        cmd += ["--trainer.val_check_interval", str(val_every)]
    for kv in args.set:
        key, sep, value = kv.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {kv!r}")
        cmd += [f"--{key}", value]
    return cmd


def launch(cmd: list[str], log: Path) -> tuple[float, int]:
    """Run one fit in the caller's folder (relative config, data and module paths mean what they
    mean to `lit-covrl fit` there); `run_command` puts this checkout first on the path."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with log.open("w") as f:
        f.write(shlex.join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    return time.perf_counter() - t0, rc


def n_seeds(args) -> int:
    return min(args.seeds, QUICK_SEEDS) if args.quick else args.seeds


def run_all(args, out: Path) -> list[dict]:
    """Run every (method, seed) not kept by --skip-existing, `--jobs` at a time. runs.csv is
    rewritten after each finished run, so a comparison stopped part-way (Ctrl-C, a session's end)
    keeps what it finished and `--skip-existing` picks up from there."""
    jobs = [(m, s) for s in range(n_seeds(args)) for m in args.methods.split(",") if m]
    previous = read_meta(out)
    done = {(x["method"], x["seed"]): x for x in previous if x["returncode"] == 0} if args.skip_existing else {}
    finished: dict[tuple[str, int], dict] = {}
    lock = threading.Lock()

    def record(row: dict) -> None:
        with lock:
            finished[(row["method"], row["seed"])] = row
            write_meta(out, [x for x in previous if (x["method"], x["seed"]) not in finished] + list(finished.values()))

    def one(job):
        m, s = job
        if (method_name(m), s) in done and list((out / "runs" / f"{method_name(m)}-s{s}").glob("events.out.tfevents.*")):
            print(f"[compare] {method_name(m)}-s{s}: kept (--skip-existing)", flush=True)
            return done[(method_name(m), s)]
        if (out / "runs" / f"{method_name(m)}-s{s}").exists():  # a fresh run must not mix with old events
            import shutil

            shutil.rmtree(out / "runs" / f"{method_name(m)}-s{s}")
        wall, rc = launch(run_command(args, m, s, out), out / "logs" / f"{method_name(m)}-s{s}.log")
        print(f"[compare] {method_name(m)}-s{s}: rc={rc} wall={wall:.1f}s", flush=True)
        row = {"method": method_name(m), "seed": s, "wall_s": round(wall, 2), "returncode": rc}
        record(row)
        return row

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        meta = list(pool.map(one, jobs))
    ran = {(x["method"], x["seed"]) for x in meta}
    every = [x for x in previous if (x["method"], x["seed"]) not in ran] + meta  # keep other methods' runs
    write_meta(out, every)
    return every


def write_meta(out: Path, rows: list[dict]) -> None:
    """runs.csv: method, seed, wall_s, returncode per run (written whole, then renamed into place)."""
    tmp = out / "runs.csv.tmp"
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "seed", "wall_s", "returncode"])
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out / "runs.csv")


def read_meta(out: Path) -> list[dict]:
    p = out / "runs.csv"
    if not p.exists():
        return []
    with p.open() as f:
        return [{"method": r["method"], "seed": int(r["seed"]), "wall_s": float(r["wall_s"]),
                 "returncode": int(r["returncode"])} for r in csv.DictReader(f)]


def _run_folders(out: Path) -> list[tuple[str, int]]:
    """(method, seed) of every DIR/runs/<method>-s<seed> folder."""
    found = []
    for d in (out / "runs").glob("*-s*"):
        method, _, seed = d.name.rpartition("-s")
        if d.is_dir() and method and seed.isdigit():
            found.append((method, int(seed)))
    return sorted(found)


def methods_on_disk(out: Path) -> list[str]:
    """The methods with runs in DIR: in runs.csv's order, then any others by name."""
    on_disk = {m for m, _ in _run_folders(out)}
    listed = list(dict.fromkeys(x["method"] for x in read_meta(out) if x["method"] in on_disk))
    return listed + sorted(on_disk - set(listed))


def collect(out: Path, methods: list[str], seeds: int | None) -> list[dict]:
    """Summary rows of seeds 0 .. seeds - 1 of each method (None: every `<method>-s<seed>` folder there)."""
    rows = []
    on_disk = _run_folders(out)
    for m in methods:
        found = [s for mm, s in on_disk if mm == m]
        for s in found if seeds is None else [s for s in found if s < seeds]:
            rows += an.summary_rows(m, s, an.read_scalars(out / "runs" / f"{m}-s{s}"))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    if args.report_only:
        if not (on_disk := methods_on_disk(out)):
            raise SystemExit(f"--report-only: no runs in {out / 'runs'} (a comparison's --out folder has runs/<method>-s<seed>)")
        args.methods = args.methods or ",".join(on_disk)
        if missing := [method_name(m) for m in args.methods.split(",") if m and method_name(m) not in on_disk]:
            raise SystemExit(f"--report-only: no runs of {', '.join(missing)} in {out / 'runs'}; it holds {', '.join(on_disk)}")
    args.methods = args.methods or DEFAULT_METHODS
    out.mkdir(parents=True, exist_ok=True)
    methods = [method_name(m) for m in args.methods.split(",") if m]
    for m in args.methods.split(",") if not args.report_only else []:  # a report needs the runs, not the configs
        if m and not method_config(m, Path(args.config[0])).exists():
            raise SystemExit(f"no config for method {m!r}: {method_config(m, Path(args.config[0]))}")
    command = shlex.join([Path(sys.executable).name, "tools/compare.py", *(argv if argv is not None else sys.argv[1:])])
    t0 = time.perf_counter()
    meta = read_meta(out) if args.report_only else run_all(args, out)
    rows = collect(out, methods, None if args.report_only else n_seeds(args))  # a report: every seed there
    an.write_summary_csv(out / "summary.csv", rows)
    report, left_out = make_report(out, rows, methods, meta, command, args.fit_frac)
    print(f"[compare] {len(rows)} rows -> {out / 'summary.csv'}; report {report}; "
          f"total {time.perf_counter() - t0:.0f}s; tensorboard --logdir {out / 'runs'}", flush=True)
    if left_out:
        print(f"[compare] left out of the report's tables (stopped early or failed): {', '.join(left_out)}", flush=True)
    return 1 if left_out or any(x["returncode"] != 0 for x in meta) else 0


if __name__ == "__main__":
    raise SystemExit(main())
