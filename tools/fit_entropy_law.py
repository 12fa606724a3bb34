"""Fit the entropy-performance law R = -a * exp(H) + b (docs/science.md section 1) to a run's history.

    python tools/fit_entropy_law.py runs/compare/runs/grpo-s0 --fit-frac 0.15

Reads (entropy, reward) per logged step from the run's TensorBoard event files (default tags
policy/entropy and rollout/reward_mean; use --entropy-tag val/entropy --reward-tag val/pass@1 for
the validation curve). Fits by closed-form least squares (R is linear in exp(H)) on the steps in the
first `--fit-frac` of the step range, then reports the RMSE of its prediction on the remaining
steps and the predicted ceiling b - a (the reward at H = 0). `--json` prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab import analysis as an  # noqa: E402


def fit_run(log_dir: str | Path, fit_frac: float = 0.15, entropy_tag: str = "policy/entropy",
            reward_tag: str = "rollout/reward_mean", merge: bool = False) -> dict:
    try:
        scalars = an.read_scalars(log_dir, merge=merge)
    except ValueError as e:  # a folder of several runs
        raise SystemExit(f"{e} (--merge)") from None
    if entropy_tag not in scalars or reward_tag not in scalars:
        raise SystemExit(f"{log_dir}: needs tags {entropy_tag!r} and {reward_tag!r}; found {sorted(scalars)}")
    ent, rew = dict(scalars[entropy_tag]), dict(scalars[reward_tag])
    steps = sorted(set(ent) & set(rew))
    res = an.fit_law_split(steps, [ent[s] for s in steps], [rew[s] for s in steps], fit_frac)
    res.update(log_dir=str(log_dir), fit_frac=fit_frac, entropy_tag=entropy_tag, reward_tag=reward_tag,
               steps=len(steps))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("log_dir", nargs="+", help="TensorBoard log directory of a run (searched recursively)")
    p.add_argument("--fit-frac", type=float, default=0.15, help="fit on the first fraction of steps")
    p.add_argument("--entropy-tag", default="policy/entropy")
    p.add_argument("--reward-tag", default="rollout/reward_mean")
    p.add_argument("--json", action="store_true", help="one JSON object per run")
    p.add_argument("--merge", action="store_true",
                   help="a log_dir whose subfolders are one resumed run's parts (runs/quickstart: -v0, -v1): read as one run")
    args = p.parse_args(argv)
    for d in args.log_dir:
        r = fit_run(d, args.fit_frac, args.entropy_tag, args.reward_tag, merge=args.merge)
        if args.json:
            print(json.dumps(r))
            continue
        print(f"{d}: R = -a * exp(H) + b with a = {r['a']:.4f}, b = {r['b']:.4f}   (fit on {r['n_fit']} of {r['steps']} steps, "
              f"up to step {r['fit_until_step']})\n"
              f"  RMSE on the fitted steps: {r['rmse_fit']:.4f}\n"
              f"  RMSE of the prediction on the remaining {r['n_rest']} steps: {r['rmse_rest']:.4f}\n"
              f"  predicted ceiling b - a (H = 0): {r['ceiling']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
