"""Theory lab: check the comparative-theory claims numerically with the project's own code.

    python tools/theory_lab.py --out OUT [--quick]

Writes OUT/claims.json ({claim: {"holds": bool, ...}}), OUT/report.md and one PNG per claim.
Seeded and deterministic; one CPU thread; the full run takes ~1-2 minutes. The experiments live
in ``lab.theory.claims``; this script only runs them, plots and writes the report.
See docs/theory.md for the reading of the results.
"""
from __future__ import annotations

import argparse
import json
import time
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the lab package lives in the checkout
from lab.theory import claims as C  # noqa: E402
from lab.theory.bandit import BanditSpec  # noqa: E402

DPI = 80


def run_all(quick: bool) -> dict:
    """Run the five claims; ``quick`` shrinks every experiment (a smoke run, not the evidence)."""
    if quick:
        spec = BanditSpec(steps=60)
        two = lambda d: {k: v[::2] for k, v in d.items()}  # noqa: E731
        jobs = {
            "entropy_change_is_covariance": lambda: C.entropy_change_is_covariance(instances=16),
            "entropy_bonus_is_biased": lambda: C.entropy_bonus_is_biased(alphas=(0.2, 0.5, 1.0), steps=3000),
            "annealed_covariance_control_is_unbiased": lambda: C.annealed_covariance_control_is_unbiased(
                spec, seeds=(0,), coefs=two(C.DEFAULT_COEFS)),
            "high_covariance_tokens_are_sparse": lambda: C.high_covariance_tokens_are_sparse(
                prompts=16, length=64, seeds=(0,), cost_sizes=((256, 512), (256, 2048), (1024, 512), (1024, 2048)), repeats=1),
            "stability": lambda: C.stability(spec, coefs=two(C.STABILITY_COEFS)),
        }
    else:
        jobs = {
            "entropy_change_is_covariance": C.entropy_change_is_covariance,
            "entropy_bonus_is_biased": C.entropy_bonus_is_biased,
            "annealed_covariance_control_is_unbiased": C.annealed_covariance_control_is_unbiased,
            "high_covariance_tokens_are_sparse": C.high_covariance_tokens_are_sparse,
            "stability": C.stability,
        }
    results = {}
    for name, job in jobs.items():
        t0 = time.perf_counter()
        results[name] = job()
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
        print(f"{name}: holds={results[name]['holds']} ({results[name]['seconds']} s)", flush=True)
    return results


# figures -----------------------------------------------------------------------------------------
def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_1(res: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    etas = [float(e) for e in C.ETAS]
    for kind, m in (("pg", "o-"), ("npg", "s-")):
        axes[0].loglog(etas, list(res[kind]["abs_err"].values()), m, label=f"{kind.upper()} |dH - pred|")
        axes[1].loglog(etas, list(res[kind]["rel_err"].values()), m, label=f"{kind.upper()} relative error")
    ref = res["npg"]["abs_err"]["0.01"]
    axes[0].loglog(etas, [ref * (e / etas[0]) ** 2 for e in etas], "k:", label="slope 2 (eta^2)")
    ref = res["npg"]["rel_err"]["0.01"]
    axes[1].loglog(etas, [ref * e / etas[0] for e in etas], "k:", label="slope 1 (eta)")
    for ax, t in zip(axes, ("absolute error (sum over states)", "relative error")):
        ax.set_xlabel("step size eta"), ax.set_title(t, fontsize=9), ax.legend(fontsize=7)
    fig.suptitle("dH vs -Cov(log pi, dz): one exact step", fontsize=10)
    _save(fig, path)


def plot_2(res: dict, path: Path) -> None:
    rows = res["alphas"]
    a = [r["alpha"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(a, [r["gap_trained"] for r in rows], "o", label="trained (exact gradient)")
    ax.plot(a, [r["gap_closed_form"] for r in rows], "-", label="closed form max r - softmax(r/alpha).r")
    ax.plot(a, [r["bound_alpha_logK"] for r in rows], "--", label="bound alpha log K")
    ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel("entropy bonus alpha"), ax.set_ylabel("reward gap")
    ax.legend(fontsize=7), ax.set_title(f"Entropy bonus bias, K={res['arms']} arms", fontsize=10)
    _save(fig, path)


LABELS = {"entropy_bonus": "entropy bonus (const)", "entropy_bonus_annealed": "entropy bonus (annealed)",
          "clip_cov_annealed": "Clip-Cov (annealed)", "kl_cov_annealed": "KL-Cov (annealed)",
          "grpo_lower_lr": "GRPO, lower lr"}


def plot_3(res: dict, path: Path) -> None:
    runs = res["_plot"]["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, rows in runs.items():
        row = rows[len(rows) // 2]
        axes[0].plot(row["_entropy"], label=f"{LABELS[name]} {row['coef']:g}")
        pts = sorted(rows, key=lambda r: r["mean_entropy"])
        axes[1].plot([r["mean_entropy"] for r in pts], [r["mean_regret"] for r in pts], "o-", label=LABELS[name])
    axes[0].axvline(res["anneal_steps"], color="k", ls=":", lw=0.8)
    axes[0].set_xlabel("RL step"), axes[0].set_ylabel("mean entropy (nats)"), axes[0].legend(fontsize=6)
    axes[0].set_title("entropy (dotted: annealing ends)", fontsize=9)
    axes[1].set_xlabel("average entropy along training"), axes[1].set_ylabel("average regret along training")
    axes[1].set_title("reward given up at matched entropy (lower is better)", fontsize=9), axes[1].legend(fontsize=6)
    _save(fig, path)


def plot_4(res: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    g = res["group_means"]
    axes[0].bar(list(g), list(g.values()), color="tab:blue")
    axes[0].set_yscale("log"), axes[0].set_title("mean Cov of top tokens (Table 1)", fontsize=9)
    s = res["drop_share_of_positive"]
    fr = [float(k[3:-1]) / 100 for k in s]
    axes[1].bar(list(s), list(s.values()), color="tab:orange", label="share of positive drop")
    axes[1].plot(list(s), fr, "k_", markersize=20, label="token share")
    axes[1].set_yscale("log"), axes[1].legend(fontsize=7)
    axes[1].set_title("first-order entropy drop carried", fontsize=9)
    for n in sorted({c["N"] for c in res["cost"]}):
        cs = [c for c in res["cost"] if c["N"] == n]
        axes[2].loglog([c["V"] for c in cs], [c["entropy_bonus_s"] for c in cs], "o-", label=f"entropy bonus N={n}")
        axes[2].loglog([c["V"] for c in cs], [c["select_s"] for c in cs], "s--", label=f"Cov selection N={n}")
    axes[2].set_xlabel("vocabulary V"), axes[2].set_ylabel("seconds"), axes[2].legend(fontsize=6)
    axes[2].set_title("cost per mini-batch (1 CPU thread)", fontsize=9)
    _save(fig, path)


def plot_5(res: dict, path: Path) -> None:
    plot = res["_plot"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for method, rows in res["methods"].items():
        axes[0].semilogx([r["coef"] for r in rows["runs"]], [r["final_entropy_frac"] for r in rows["runs"]], "o-",
                         label={"entropy_bonus": "entropy bonus alpha", "clip_cov": "Clip-Cov ratio",
                                "kl_cov": "KL-Cov beta"}[method])
    axes[0].set_xlabel("coefficient"), axes[0].set_ylabel("final entropy / log K"), axes[0].legend(fontsize=7)
    axes[0].set_title("final entropy vs coefficient (constant)", fontsize=9)
    cmap = {"entropy_bonus": plt.cm.Blues, "kl_cov": plt.cm.Reds}
    for method, cm in cmap.items():
        series = plot[method]
        for i, (c, h) in enumerate(series):
            axes[1].plot(h, color=cm(0.35 + 0.65 * i / max(len(series) - 1, 1)), lw=0.9,
                         label=f"{method} {c:g}" if i in (0, len(series) - 1) else None)
    axes[1].set_xlabel("RL step"), axes[1].set_ylabel("mean entropy"), axes[1].legend(fontsize=6)
    axes[1].set_title("trajectories (blue: bonus, red: KL-Cov)", fontsize=9)
    _save(fig, path)


PLOTS = {"entropy_change_is_covariance": plot_1, "entropy_bonus_is_biased": plot_2,
         "annealed_covariance_control_is_unbiased": plot_3, "high_covariance_tokens_are_sparse": plot_4,
         "stability": plot_5}


# report ------------------------------------------------------------------------------------------
def _f(x: float) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def summary(name: str, r: dict) -> list[str]:
    """The key numbers of one claim as markdown bullet lines."""
    if name == "entropy_change_is_covariance":
        return [f"- {k.upper()}: relative error {', '.join(f'{_f(v)} (eta={e})' for e, v in r[k]['rel_err'].items())}; "
                f"|dH - pred| falls {_f(r[k]['abs_err_ratio_per_decade'])}x per decade of eta "
                f"(log-log slope {_f(r[k]['abs_err_loglog_slope'])}), the relative error "
                f"{_f(r[k]['rel_err_ratio_per_decade'])}x" for k in ("pg", "npg")] + [
                "- The O(eta^2) term is the absolute error; relative to dH = O(eta) it shrinks like eta."]
    if name == "entropy_bonus_is_biased":
        return [f"- alpha={a['alpha']}: gap trained {_f(a['gap_trained'])}, closed form {_f(a['gap_closed_form'])}, "
                f"bound {_f(a['bound_alpha_logK'])}; max |pi - softmax(r/alpha)| = {a['fixed_point_max_abs_err']:.1e}"
                for a in r["alphas"]]
    if name == "annealed_covariance_control_is_unbiased":
        lines = ["- worst final regret (over coefs and seeds): " + ", ".join(
            f"{LABELS[m]} {_f(v)}" for m, v in r["worst_final_regret"].items())]
        for key, v in r["matched"].items():
            if v["mean_regret_diff"] is not None:
                lines.append(f"- {key}: mean-regret difference at matched average entropy "
                             f"{_f(v['mean_regret_diff'])} over {len(v['points'])} points (negative = covariance control better)")
        lines.append(f"- less regret than: constant bonus {r['less_regret_than_constant_bonus']}, annealed bonus "
                     f"{r['less_regret_than_annealed_bonus']}, lower-lr GRPO {r['less_regret_than_lower_lr_grpo']}")
        return lines
    if name == "high_covariance_tokens_are_sparse":
        return [
            "- group means: " + ", ".join(f"{k} {_f(v)}" for k, v in r["group_means"].items()),
            "- share of the positive first-order entropy drop: " + ", ".join(
                f"{k} {_f(v)}" for k, v in r["drop_share_of_positive"].items()),
            "- share of the net drop: " + ", ".join(f"{k} {_f(v)}" for k, v in r["drop_share_net"].items()),
            f"- top-0.2% tokens: {_f(100 * r['top0.2pct_profile']['frac_negative_advantage'])}% negative advantage, "
            f"mean prob {_f(r['top0.2pct_profile']['mean_prob'])}",
            f"- cost at the largest size: selection {_f(r['cost'][-1]['select_s'])} s vs entropy bonus "
            f"{_f(r['cost'][-1]['entropy_bonus_s'])} s ({_f(r['speedup_at_largest'])}x); bonus time slope vs V "
            f"{_f(r['entropy_bonus_time_slope_vs_V'])}, vs N {_f(r['entropy_bonus_time_slope_vs_N'])}; selection vs V "
            f"{_f(r['selection_time_slope_vs_V'])}",
        ]
    if name == "stability":
        return [f"- {m}: sharpness {_f(v['sharpness'])} (between {v['sharpest_between']}), final entropy/log K "
                f"{_f(v['final_entropy_range'][0])}..{_f(v['final_entropy_range'][1])}, max sign-flip rate "
                f"{_f(v['max_sign_flip_rate'])}, max window std {_f(v['max_window_std'])}"
                for m, v in r["methods"].items()] + [
                f"- smoother than the bonus: {r['smoother_than_bonus']}; calmer than the bonus: {r['calmer_than_bonus']}"]
    return []


def write_report(results: dict, out: Path, quick: bool, seconds: float) -> None:
    lines = ["# Theory lab report", "",
             f"Command: `python tools/theory_lab.py --out {out}{' --quick' if quick else ''}` "
             f"({'quick smoke run' if quick else 'full run'}, {seconds:.0f} s, torch {torch.__version__}, 1 CPU thread).",
             "", "| claim | verdict |", "|---|---|"]
    lines += [f"| {n} | {'holds' if r['holds'] else 'does not hold'} |" for n, r in results.items()]
    for name, r in results.items():
        lines += ["", f"## {name}: {'HOLDS' if r['holds'] else 'DOES NOT HOLD'}", "",
                  f"Criterion: {r['criterion']}.", "", *summary(name, r), "", f"![{name}]({name}.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--quick", action="store_true", help="reduced sizes (smoke run)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = run_all(args.quick)
    for name, r in results.items():
        PLOTS[name](r, args.out / f"{name}.png")
    public = {n: {k: v for k, v in r.items() if not k.startswith("_")} for n, r in results.items()}
    (args.out / "claims.json").write_text(json.dumps(public, indent=1, default=float) + "\n")
    write_report(results, args.out, args.quick, time.perf_counter() - t0)
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
