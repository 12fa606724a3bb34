"""The comparison report of tools/compare.py: per-method tables, the entropy-law fit, the held-out
matched-entropy frontier section, and the plots (report.md + *.png in the run directory).

Rows are lab.analysis.summary_rows dicts (one per method, seed and logged step); the numbers come
from lab.analysis, this module only lays them out.
"""
from __future__ import annotations

import math
from pathlib import Path

from lab import analysis as an

__all__ = ["held_out_section", "law_section", "make_report", "method_table", "paired_section", "same_lr_section"]


def _by_run(rows):
    runs: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        runs.setdefault((r["method"], r["seed"]), []).append(r)
    return runs


def _ms(vals, digits=3):
    m, s = an.mean_std(vals)
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _band(ax, runs, method, column, color, smooth=1):
    import numpy as np

    curves = []
    for (m, _), rs in runs.items():
        if m != method:
            continue
        st, v = an.series(rs, column)
        if st:
            curves.append(dict(zip(st, an.moving_average(v, smooth))))
    if not curves:
        return
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    if not steps:
        return
    arr = np.array([[c[s] for s in steps] for c in curves])
    mean = arr.mean(0)
    ax.plot(steps, mean, color=color, label=method, lw=1.5)
    if len(curves) > 1:
        ax.fill_between(steps, arr.min(0), arr.max(0), color=color, alpha=0.15, lw=0)


def make_plots(out: Path, rows: list[dict], methods: list[str], frontier: dict | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _by_run(rows)
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    files = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=80)
        plt.close(fig)
        files.append(name)

    for column, ylabel, name, smooth in [
        ("entropy", "policy entropy (nats/token)", "entropy.png", 1),
        ("accuracy", "train accuracy (moving avg, 10 steps)", "accuracy.png", 10),
        ("val_pass@k", "val pass@k", "val_passk.png", 1),
        ("val_pass@1", "val pass@1", "val_pass1.png", 1),
    ]:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for m in methods:
            _band(ax, runs, m, column, colors[m], smooth)
        ax.set_xlabel("RL step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} (mean over seeds, band = min..max)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if column == "entropy":
            ax.set_yscale("log")  # an exploding run would flatten the others
        save(fig, name)

    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for m in methods:
        for (rm, _), rs in runs.items():
            if rm != m:
                continue
            _, h = an.series(rs, "entropy")
            _, r = an.series(rs, "reward_mean")
            n = min(len(h), len(r))
            if n:
                ax1.plot(an.moving_average(h[:n], 10), an.moving_average(r[:n], 10), ".", ms=2,
                         color=colors[m], alpha=0.6)
            vh = [x["val_entropy"] for x in rs if x.get("val_entropy") is not None and x.get("val_pass@1") is not None]
            vp = [x["val_pass@1"] for x in rs if x.get("val_entropy") is not None and x.get("val_pass@1") is not None]
            ax2.plot(vh, vp, "o-", ms=3, lw=0.6, color=colors[m], alpha=0.7)
        ax1.plot([], [], ".", color=colors[m], label=m)
        ax2.plot([], [], "o", color=colors[m], label=m)
    rew = [x for rs in runs.values() for x in an.series(rs, "reward_mean")[1]]
    if rew:
        ax1.set_ylim(min(rew) - 0.05, max(rew) + 0.05)  # the law would dive far below 0 at high entropy
    if frontier:
        hs = [x for (m, _), rs in runs.items() if m in frontier["methods"] for x in an.series(rs, "entropy")[1]]
        if hs:
            grid = np.linspace(0.0, 1.5 * max(hs), 60)  # from the ceiling (H = 0) to just past the fitted range
            ax1.plot(grid, an.law_predict(frontier["a"], frontier["b"], grid), "k--", lw=1.2,
                     label=f"law on {frontier['on']}: R = -{frontier['a']:.3f} e^H + {frontier['b']:.3f}")
    ax1.set_xlabel("policy entropy (10-step moving avg)")
    ax1.set_ylabel("train reward (10-step moving avg)")
    ax1.set_title("reward vs entropy, all runs; dashed: fitted law", fontsize=9)
    ax2.set_xlabel("val entropy")
    ax2.set_ylabel("val pass@1")
    ax2.set_title("val pass@1 vs val entropy (each validation)", fontsize=9)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    save(fig, "reward_vs_entropy.png")
    return files


def frontier_plot(out: Path, runs: dict, methods: list[str]) -> str | None:
    """frontier.png: held-out pass@1 and pass@k against val entropy at every validation of every
    run, with the matched-entropy frontier fitted on plain GRPO (see held_out_section)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    base = baseline_methods(methods)
    if not base:
        return None
    colors = {m: plt.cm.tab20(i % 20) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, ("val_pass@1", "val_pass@k")):
        hs = []
        for m in methods:
            pts = [p for (mm, _), rs in runs.items() if mm == m for p in an.eval_points(rs, metric)]
            if pts:
                hs += [h for _, h, _ in pts]
                ax.plot([h for _, h, _ in pts], [y for _, _, y in pts], "o" if m in base else ".",
                        ms=4 if m in base else 3, color=colors[m], label=m, alpha=0.8)
        try:
            fr = an.frontier_residuals(runs, base, metric)
        except ValueError:
            fr = None
        if fr and hs:
            grid = np.linspace(min(hs), max(hs), 50)
            ax.plot(grid, an.law_predict(fr["a"], fr["b"], grid), "k--", lw=1.2,
                    label=f"frontier ({'+'.join(base)})")
        ax.set_xlabel("val entropy (nats/token)")
        ax.set_ylabel(metric.replace("val_", "held-out "))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, ncol=2)
    fig.suptitle("every validation of every run; dashed: P = -a exp(H) + b fitted on plain GRPO", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=80)
    plt.close(fig)
    return "frontier.png"


def frontier_fit(rows: list[dict], methods: list[str]) -> dict | None:
    """The law fitted on all steps of the plain-GRPO runs (grpo*, the baseline frontier); all runs if none."""
    base = [m for m in methods if m.startswith("grpo")] or methods
    h, r = [], []
    for (m, _), rs in _by_run(rows).items():
        if m in base:
            rs_ = [x for x in rs if x.get("entropy") is not None and x.get("reward_mean") is not None]
            h += [x["entropy"] for x in rs_]
            r += [x["reward_mean"] for x in rs_]
    try:
        a, b = an.fit_entropy_law(h, r)
    except ValueError:
        return None
    return {"a": a, "b": b, "on": "+".join(base), "methods": base}


def _ci(vals, digits=3, signed=False):
    """'mean ± std [lo, hi]' over seeds, [lo, hi] the percentile-bootstrap 95 % interval of the mean."""
    m, sd = an.mean_std(vals)
    if math.isnan(m):
        return "n/a"
    lo, hi = an.bootstrap_ci(vals)
    f = f"{{:{'+' if signed else ''}.{digits}f}}".format
    return f"{f(m)} ± {sd:.{digits}f} [{f(lo)}, {f(hi)}]"


def baseline_methods(methods: list[str]) -> list[str]:
    """The runs the matched-entropy frontier is fitted on: plain GRPO at every learning rate (grpo*)."""
    return [m for m in methods if m == "grpo" or m.startswith("grpo_")]


def held_out_section(runs: dict, methods: list[str]) -> list[str]:
    """Held-out figures per method with bootstrap 95 % intervals over seeds, and each method's mean
    residual against the matched-entropy frontier of plain GRPO (pass@1 and pass@k vs val entropy)."""
    base = baseline_methods(methods)
    fronts = {}
    for metric in ("val_pass@1", "val_pass@k"):
        try:
            fronts[metric] = an.frontier_residuals(runs, base, metric) if base else None
        except ValueError:
            fronts[metric] = None
    lines = ["", "## Held-out pass@k with 95 % intervals, and the matched-entropy frontier", "",
             "Mean ± std over seeds [percentile-bootstrap 95 % interval of the mean]. 'final' = last validation, "
             "'best' = best validation of the run. Frontier: val pass@1 (pass@k) against val entropy at "
             "every validation of " + ("+".join(base) if base else "(no grpo runs)") + ", fitted as "
             "P = -a exp(H) + b; residual = a run's mean of (P - frontier) over its validations: > 0 is "
             "better than plain GRPO at the same entropy.", ""]
    for metric, fr in fronts.items():
        if fr:
            lines.append(f"- {metric} frontier: a = {fr['a']:.4f}, b = {fr['b']:.4f} ({fr['n_points']} points)")
    head = ["method", "seeds", "entropy final/initial", "final pass@1", "best pass@1", "final pass@k",
            "best pass@k", "residual pass@1", "residual pass@k"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        keys = sorted(k for k in runs if k[0] == m)
        if not keys:
            continue
        stats = [an.run_stats(runs[k]) for k in keys]
        best1 = [max(an.series(runs[k], "val_pass@1")[1], default=float("nan")) for k in keys]
        resid = {metric: [fr["per_run"].get(k, float("nan")) for k in keys] if fr else [] for metric, fr in fronts.items()}
        lines.append("| " + " | ".join([
            m, str(len(keys)), _ci([st["entropy_final"] / st["entropy_initial"] for st in stats], 2),
            _ci([st["pass1_final"] for st in stats]), _ci(best1),
            _ci([st["passk_final"] for st in stats]), _ci([st["passk_best"] for st in stats]),
            _ci(resid["val_pass@1"], signed=True), _ci(resid["val_pass@k"], signed=True),
        ]) + " |")
    return lines


def same_lr_section(runs: dict, methods: list[str]) -> list[str]:
    """Residuals against the frontier of `grpo` alone, when GRPO also ran at other learning rates.

    The pooled frontier mixes learning rates: where they do not lie on one curve, it sits between
    them, and a control run at `grpo`'s learning rate (every control config keeps it) would be
    judged against a baseline partly made of another learning rate. Fitted on `grpo`'s runs only,
    this residual answers the narrower question: better than GRPO at the same entropy *and* the
    same learning rate? Empty when there is no second GRPO learning rate or the fit fails."""
    if "grpo" not in methods or len(baseline_methods(methods)) < 2:
        return []
    try:
        fronts = {metric: an.frontier_residuals(runs, ["grpo"], metric) for metric in ("val_pass@1", "val_pass@k")}
    except ValueError:
        return []
    lines = ["", "### Against GRPO at its own learning rate", "",
             "The same residual with the frontier fitted on the `grpo` runs alone (the learning rate of every "
             "control config): > 0 is better than GRPO at the same entropy and learning rate.", ""]
    lines += [f"- {metric} frontier (grpo): a = {fr['a']:.4f}, b = {fr['b']:.4f} ({fr['n_points']} points)"
              for metric, fr in fronts.items()]
    lines += ["", "| method | seeds | residual pass@1 (vs grpo) | residual pass@k (vs grpo) |", "|---|---|---|---|"]
    for m in methods:
        keys = sorted(k for k in runs if k[0] == m)
        if keys:
            cells = [_ci([fr["per_run"].get(k, float("nan")) for k in keys], signed=True) for fr in fronts.values()]
            lines.append(f"| {m} | {len(keys)} | {cells[0]} | {cells[1]} |")
    return lines


def paired_section(runs: dict, methods: list[str]) -> list[str]:
    """Each method minus `grpo` at the same seed (and its best pass@k minus every other GRPO
    learning rate's, e.g. grpo_low_lr): a seed fixes the train prompts and the held-out set, whose
    difficulty varies from seed to seed, so these differences are free of it
    (lab.analysis.paired_differences). Empty without `grpo` runs."""
    if "grpo" not in methods:
        return []
    stats = {k: an.run_stats(rs) for k, rs in runs.items()}
    ratio = {k: st["entropy_final"] / st["entropy_initial"] for k, st in stats.items()}
    cols = {c: {k: st[c] for k, st in stats.items()} for c in ("pass1_final", "passk_final", "passk_best")}
    others = [b for b in baseline_methods(methods) if b != "grpo"]
    deltas = ([an.paired_differences(ratio, "grpo")] + [an.paired_differences(v, "grpo") for v in cols.values()]
              + [an.paired_differences(cols["passk_best"], b) for b in others])

    def cell(d, digits=3):
        return f"{_ci(d, digits, signed=True)} ({sum(x > 0 for x in d)}/{len(d)} > 0)" if d else "—"

    head = (["method", "pairs", "Δ entropy final/initial", "Δ final pass@1", "Δ final pass@k", "Δ best pass@k"]
            + [f"Δ best pass@k vs {b}" for b in others])
    lines = ["", "### Paired by seed", "",
             "A seed fixes a run's train prompts and its held-out prompts (`--data.seed`), and the held-out "
             "sets differ in difficulty from seed to seed; two methods at the same seed saw the same prompts. "
             "Each cell: the method minus `grpo` at the same seed (last column: minus the other GRPO learning "
             "rate), mean ± std [bootstrap 95 % interval] over the seeds both ran, and how many of those "
             "differences are > 0.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        if m == "grpo" or m not in deltas[0]:
            continue
        cells = [cell(deltas[0][m], 2)] + [cell(d.get(m, [])) for d in deltas[1:]]
        lines.append(f"| {m} | {len(deltas[0][m])} | " + " | ".join(cells) + " |")
    return lines


def method_table(runs: dict, methods: list[str], walls: dict) -> list[str]:
    """Per method, mean ± std over seeds: entropy start / end, pass@1 / pass@k, train accuracy,
    the regularizer's selected fraction and the wall time of a run."""
    lines = ["Per method, mean ± std over seeds. Entropy: mean of the first / last 5 RL steps; "
             "pass@k on the held-out prompts (k = model.eval.k); 'final' = last validation; "
             "selected = mean fraction of tokens a regularizer selected per step.", ""]
    head = ["method", "seeds", "entropy initial", "entropy final", "final/initial", "final pass@1",
            "final pass@k", "best pass@k", "train acc (last 10)", "selected frac", "wall s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        stats = [(s, an.run_stats(rs)) for (mm, s), rs in runs.items() if mm == m]
        if not stats:
            lines.append(f"| {m} | 0 |" + " n/a |" * (len(head) - 2))
            continue
        col = lambda k: [st[k] for _, st in stats]  # noqa: E731
        ratio = [st["entropy_final"] / st["entropy_initial"] for _, st in stats]
        sel = col("selected_frac")
        lines.append("| " + " | ".join([
            m, str(len(stats)), _ms(col("entropy_initial")), _ms(col("entropy_final")), _ms(ratio, 2),
            _ms(col("pass1_final")), _ms(col("passk_final")), _ms(col("passk_best")),
            _ms(col("accuracy_final")), "—" if all(math.isnan(x) for x in sel) else _ms(sel, 4),
            _ms([walls.get((m, s), float("nan")) for s, _ in stats], 0),
        ]) + " |")
    return lines


def law_section(runs: dict, methods: list[str], fit_frac: float, frontier: dict | None) -> list[str]:
    """The entropy law R = -a exp(H) + b per run: fitted on all steps and on the first `fit_frac`
    (with its RMSE on the rest), mean ± std over seeds; then the baseline frontier's coefficients."""
    lines = ["", "## Entropy law R = -a exp(H) + b (train reward vs policy entropy, per step)", "",
             f"Fitted per run on the first {fit_frac:.0%} of steps; RMSE of its prediction on the rest, "
             "and the law fitted on all steps (ceiling b - a). Mean ± std over seeds.", "",
             "| method | a (all) | b (all) | ceiling b-a (all) | RMSE fit-all | ceiling (first part) | RMSE rest (first-part fit) |",
             "|---|---|---|---|---|---|---|"]
    for m in methods:
        alls, parts = [], []
        for (mm, _), rs in runs.items():
            if mm != m:
                continue
            rs_ = [x for x in rs if x.get("entropy") is not None and x.get("reward_mean") is not None]
            st, h, r = [x["step"] for x in rs_], [x["entropy"] for x in rs_], [x["reward_mean"] for x in rs_]
            try:
                alls.append(an.fit_law_split(st, h, r, 1.0))
                parts.append(an.fit_law_split(st, h, r, fit_frac))
            except ValueError:
                pass
        if alls:
            lines.append("| " + " | ".join([
                m, _ms([f["a"] for f in alls]), _ms([f["b"] for f in alls]), _ms([f["ceiling"] for f in alls]),
                _ms([f["rmse_fit"] for f in alls]), _ms([f["ceiling"] for f in parts]),
                _ms([f["rmse_rest"] for f in parts]),
            ]) + " |")
    if frontier:
        lines += ["", f"Baseline frontier (dashed line in the plot), fitted on all steps of {frontier['on']}: "
                  f"a = {frontier['a']:.4f}, b = {frontier['b']:.4f}, ceiling b - a = {frontier['b'] - frontier['a']:.4f}."]
    return lines


def incomplete_runs(rows: list[dict], meta: list[dict]) -> dict[tuple[str, int], str]:
    """Runs whose numbers would not be comparable, with why: a failed run (returncode != 0 in
    runs.csv) and a run whose last logged step is before the comparison's (stopped part-way: its
    "final" figures would be from an earlier step, averaged in with the others' as if final)."""
    last: dict[tuple[str, int], int] = {}
    for r in rows:
        key = (r["method"], r["seed"])
        last[key] = max(last.get(key, -1), r["step"])
    why = {(x["method"], x["seed"]): f"rc {x['returncode']}" for x in meta if x["returncode"] != 0}
    end = max(last.values(), default=-1)
    for key, step in last.items():
        if step < end and key not in why:
            why[key] = f"stopped at step {step} of {end}"
    return why


def make_report(out: Path, rows: list[dict], methods: list[str], meta: list[dict], command: str,
                fit_frac: float) -> tuple[Path, list[str]]:
    """Write out/report.md (and the plots next to it) from the summary rows and the runs' meta
    (tools/compare.py's runs.csv: method, seed, wall_s, returncode). Failed or cut-short runs are
    left out of the tables and plots and listed; returns (the report's path, those runs' names)."""
    why = incomplete_runs(rows, meta)
    rows = [r for r in rows if (r["method"], r["seed"]) not in why]
    runs = _by_run(rows)
    frontier = frontier_fit(rows, methods)
    files = make_plots(out, rows, methods, frontier) if rows else []
    if rows and (fp := frontier_plot(out, runs, methods)):
        files.append(fp)
    lines = ["# Entropy-control comparison", "", "Command:", "", "```bash", command, "```", ""]
    lines += method_table(runs, methods, {(x["method"], x["seed"]): x["wall_s"] for x in meta})
    lines += law_section(runs, methods, fit_frac, frontier)
    lines += held_out_section(runs, methods)
    lines += same_lr_section(runs, methods)
    lines += paired_section(runs, methods)
    left_out = [f"{m}-s{s} ({reason})" for (m, s), reason in sorted(why.items())]
    if left_out:
        lines += ["", "Left out of every table and plot (failed, or stopped before the others' last step): "
                  + ", ".join(left_out)]
    lines += ["", "## Plots", ""] + [f"![{f}]({f})" for f in files] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path, left_out
