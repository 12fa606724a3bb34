"""Pure helpers for comparing runs: TensorBoard scalars, summary rows / CSV, the entropy law.

Used by `tools/compare.py` and `tools/fit_entropy_law.py`; nothing here trains or plots.

The empirical law of Cui et al. 2025 (docs/science.md section 1): R = -a * exp(H) + b, with H the
policy entropy and R the reward. R is linear in x = exp(H), so the least-squares fit is closed
form (ordinary linear regression of R on x); the predicted ceiling (H = 0) is b - a.
"""
from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

# summary.csv column -> TensorBoard tag. The first columns are the contract of tools/compare.py.
TAGS: dict[str, str] = {
    "entropy": "policy/entropy",
    "reward_mean": "rollout/reward_mean",
    "accuracy": "rollout/accuracy",
    "val_pass@1": "val/pass@1",
    "val_pass@k": "val/pass@k",
    "val_entropy": "val/entropy",
}
# extra column: the fraction of tokens the covariance selectors acted on (sum of their `reg/<name>/selected_frac`)
SUMMARY_COLUMNS: list[str] = ["method", "seed", "step", *TAGS, "selected_frac"]


def event_dirs(log_dir: str | Path) -> list[Path]:
    """The folders under log_dir (itself included) that hold TensorBoard event files: one per run."""
    return sorted({p.parent for p in Path(log_dir).rglob("events.out.tfevents.*")})


def _natural_key(path: Path) -> list:
    """A path's sort key with its numbers compared as numbers (`-v9` before `-v10`)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def read_scalars(log_dir: str | Path, merge: bool = False) -> dict[str, list[tuple[int, float]]]:
    """All scalar series in the TensorBoard event files of one run's folder: tag -> sorted [(step, value)].

    If a step was written twice (several event files in the folder) the last value read wins. A
    folder holding several folders of event files is refused (their steps would be mixed into one
    series), unless `merge`: they are one run's parts (a resumed `lit-covrl fit` logs to the next
    version folder, -v0 then -v1), read in version order (-v9 before -v10: the resumed part's value
    of a step logged twice wins).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if len(dirs := event_dirs(log_dir)) > 1 and not merge:
        listed = ", ".join(str(d) for d in dirs[:4]) + (f" (and {len(dirs) - 4} more)" if len(dirs) > 4 else "")
        raise ValueError(f"{log_dir} holds {len(dirs)} folders of event files ({listed}): name one run's folder, "
                         "or merge them if they are one resumed run's parts")
    merged: dict[str, dict[int, float]] = {}
    for events in sorted(Path(log_dir).rglob("events.out.tfevents.*"), key=_natural_key):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series = merged.setdefault(tag, {})
            for e in acc.Scalars(tag):
                series[int(e.step)] = float(e.value)
    return {tag: sorted(s.items()) for tag, s in merged.items()}


def summary_rows(method: str, seed: int, scalars: Mapping[str, Sequence[tuple[int, float]]]) -> list[dict]:
    """One row per logged step (union over the summary tags); None where a tag was not logged."""
    by_col: dict[str, dict[int, float]] = {col: dict(scalars.get(tag, ())) for col, tag in TAGS.items()}
    sel: dict[int, float] = {}
    for tag, series in scalars.items():
        # the covariance selectors (Clip-Cov, KL-Cov) log their coefficient beside selected_frac at
        # every step (selected_adv_mean only on steps that selected: a selector that never selects
        # must count as 0, not be missing); HighEntropyTokens' selected_frac is the fraction it keeps,
        # not one it acts on, and it logs no coefficient
        acts_on = tag[: -len("selected_frac")] + "coef" in scalars
        if tag.startswith("reg/") and tag.endswith("/selected_frac") and acts_on:
            for step, v in series:
                sel[step] = sel.get(step, 0.0) + v
    by_col["selected_frac"] = sel
    steps = sorted(set().union(*(d.keys() for d in by_col.values())))
    rows = []
    for step in steps:
        row: dict = {"method": method, "seed": int(seed), "step": int(step)}
        for col, d in by_col.items():
            row[col] = d.get(step)
        rows.append(row)
    return rows


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_summary_csv(path: str | Path, rows: Iterable[Mapping]) -> Path:
    """Write rows with SUMMARY_COLUMNS (missing / None values as empty cells)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SUMMARY_COLUMNS)
        for row in rows:
            w.writerow([_fmt(row.get(c)) for c in SUMMARY_COLUMNS])
    return path


def read_summary_csv(path: str | Path) -> list[dict]:
    """Inverse of write_summary_csv: seed and step as int, metrics as float or None."""
    out = []
    with Path(path).open(newline="") as f:
        for rec in csv.DictReader(f):
            row: dict = {"method": rec["method"], "seed": int(rec["seed"]), "step": int(rec["step"])}
            for c in SUMMARY_COLUMNS[3:]:
                v = rec.get(c, "")
                row[c] = float(v) if v not in ("", None) else None
            out.append(row)
    return out


def series(rows: Iterable[Mapping], column: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one column, skipping rows where it is empty."""
    pts = sorted((r["step"], r[column]) for r in rows if r.get(column) is not None)
    return [s for s, _ in pts], [v for _, v in pts]


# ---------------------------------------------------------------- the entropy-performance law
def fit_entropy_law(entropy: Sequence[float], reward: Sequence[float]) -> tuple[float, float]:
    """Least-squares (a, b) of R = -a * exp(H) + b. Needs >= 2 points with distinct H."""
    if len(entropy) != len(reward):
        raise ValueError("entropy and reward must have the same length")
    if len(entropy) < 2:
        raise ValueError("need at least 2 points to fit the law")
    x = [math.exp(h) for h in entropy]
    n = len(x)
    mx, my = sum(x) / n, sum(reward) / n
    sxx = sum((xi - mx) ** 2 for xi in x)
    if sxx <= 0.0:
        raise ValueError("entropy is constant: the law is not identifiable")
    sxy = sum((xi - mx) * (yi - my) for xi, yi in zip(x, reward))
    slope = sxy / sxx            # R = slope * x + intercept, slope = -a
    return -slope, my - slope * mx


def law_predict(a: float, b: float, entropy: Sequence[float]) -> list[float]:
    return [-a * math.exp(h) + b for h in entropy]


def rmse(pred: Sequence[float], target: Sequence[float]) -> float:
    if not pred:
        return float("nan")
    return math.sqrt(sum((p - t) ** 2 for p, t in zip(pred, target)) / len(pred))


def fit_law_split(steps: Sequence[int], entropy: Sequence[float], reward: Sequence[float],
                  fit_frac: float = 1.0) -> dict:
    """Fit on the points whose step is within the first `fit_frac` of the step range, predict the rest.

    Returns a, b, ceiling (b - a), n_fit, n_rest, rmse_fit, rmse_rest (nan when no rest) and the
    last fitted step.
    """
    pts = sorted(zip(steps, entropy, reward))
    if not pts:
        raise ValueError("no points")
    lo, hi = pts[0][0], pts[-1][0]
    cut = lo + fit_frac * (hi - lo)
    fit = [p for p in pts if p[0] <= cut]
    if len(fit) < 2:  # too few steps in the window: take the first two points
        fit = pts[:2]
    rest = pts[len(fit):]
    a, b = fit_entropy_law([p[1] for p in fit], [p[2] for p in fit])
    return {
        "a": a, "b": b, "ceiling": b - a, "n_fit": len(fit), "n_rest": len(rest),
        "fit_until_step": fit[-1][0],
        "rmse_fit": rmse(law_predict(a, b, [p[1] for p in fit]), [p[2] for p in fit]),
        "rmse_rest": rmse(law_predict(a, b, [p[1] for p in rest]), [p[2] for p in rest]),
    }


# ---------------------------------------------------------------- per-run and per-method summaries
def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (same length as the input)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value); nan for none."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def run_stats(rows: Sequence[Mapping], edge: int = 5) -> dict:
    """Per-run numbers for the report table.

    Initial / final entropy are the mean of the first / last `edge` logged training steps (the
    per-step entropy of 128 sampled answers is a little noisy); val numbers are the first / last
    validation and the best over the run. selected_frac is the mean over logged steps.
    """
    _, ent = series(rows, "entropy")
    _, p1 = series(rows, "val_pass@1")
    _, pk = series(rows, "val_pass@k")
    _, sel = series(rows, "selected_frac")
    _, acc = series(rows, "accuracy")
    nan = float("nan")

    def avg(v):
        return sum(v) / len(v) if v else nan

    return {
        "entropy_initial": avg(ent[:edge]), "entropy_final": avg(ent[-edge:]),
        "accuracy_final": avg(acc[-max(edge, 10):]),
        "pass1_initial": p1[0] if p1 else nan, "pass1_final": p1[-1] if p1 else nan,
        "passk_initial": pk[0] if pk else nan, "passk_final": pk[-1] if pk else nan,
        "passk_best": max(pk) if pk else nan,
        "selected_frac": avg(sel),
    }


# ---------------------------------------------------------------- intervals and the matched-entropy frontier
def bootstrap_ci(values: Sequence[float], *, n_boot: int = 4000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: resample the values with replacement `n_boot`
    times and take the (1-level)/2 and (1+level)/2 quantiles of the resampled means.

    With one value the interval is that value; nan values are dropped; none gives (nan, nan).
    Seeded, so a report is reproducible. Over 3-5 seeds the interval is crude (it cannot be wider
    than the range of the values): read it as "how much the seeds disagree", not as a test.
    """
    import random

    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    if len(vals) == 1:
        return vals[0], vals[0]
    rng = random.Random(seed)
    n = len(vals)
    means = sorted(sum(rng.choice(vals) for _ in range(n)) / n for _ in range(n_boot))
    lo = means[int(math.floor((1 - level) / 2 * (n_boot - 1)))]
    hi = means[int(math.ceil((1 + level) / 2 * (n_boot - 1)))]
    return lo, hi


def paired_differences(values: Mapping[tuple[str, int], float], baseline: str) -> dict[str, list[float]]:
    """Per method, value(method, s) - value(baseline, s) over the seeds both ran, in seed order.

    In tools/compare.py a seed fixes a run's train prompt stream and its held-out prompts
    (`--data.seed`), so runs of two methods at the same seed saw the same prompts and were scored
    on the same held-out set: their difference is free of the held-out set's difficulty, which
    varies from seed to seed. Pairs where either value is NaN are left out; the baseline itself and
    methods sharing no seed with it get no entry.
    """
    base = {s: v for (m, s), v in values.items() if m == baseline and not math.isnan(v)}
    out: dict[str, list[float]] = {}
    for (m, s), v in sorted(values.items()):
        if m != baseline and s in base and not math.isnan(v):
            out.setdefault(m, []).append(v - base[s])
    return out


def eval_points(rows: Iterable[Mapping], metric: str, entropy: str = "val_entropy") -> list[tuple[int, float, float]]:
    """(step, entropy, metric) at every logged step where both columns are present (e.g. every
    validation: val_entropy and val_pass@1)."""
    return sorted((int(r["step"]), float(r[entropy]), float(r[metric])) for r in rows
                  if r.get(entropy) is not None and r.get(metric) is not None)


def frontier_residuals(runs: Mapping[tuple[str, int], Sequence[Mapping]], baseline: Sequence[str],
                       metric: str, entropy: str = "val_entropy", skip_first: bool = False) -> dict:
    """The matched-entropy frontier of `metric` and every run's mean residual against it.

    The frontier is the law metric = -a exp(H) + b fitted by least squares on every evaluation point
    (H = the `entropy` column at that step) of the `baseline` methods' runs (plain GRPO at its
    learning rates). A run's residual is the mean over its evaluation points of metric minus the
    frontier at the point's entropy: > 0 means the run does better than GRPO did at the same entropy.
    `skip_first` drops each run's first evaluation point when a run has more than one (use it when
    runs validate before training: that point is the shared starting policy, the same for every method).

    Returns {"a", "b", "n_points", "per_run": {(method, seed): mean residual}}.
    Raises ValueError when the baseline points cannot identify the law.
    """
    def pts(rs):
        p = eval_points(rs, metric, entropy)
        return p[1:] if skip_first and len(p) > 1 else p

    base = [p for (m, _), rs in runs.items() if m in baseline for p in pts(rs)]
    a, b = fit_entropy_law([h for _, h, _ in base], [y for _, _, y in base])
    per_run = {}
    for key, rs in runs.items():
        p = pts(rs)
        if p:
            per_run[key] = sum(y - (-a * math.exp(h) + b) for _, h, y in p) / len(p)
    return {"a": a, "b": b, "n_points": len(base), "per_run": per_run}
