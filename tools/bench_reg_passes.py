"""CPU cost of the extra passes regularizers ask of the training forward: Lp-Reg's min-p proxy,
SIREN's nucleus entropy, ERA's scaled log-probs and AEnt's clamped entropy.

    python tools/bench_reg_passes.py [--reps 9] [--model lit_covrl:tiny-reasoning]

One optimizer update (`Learner.update`, one mini-batch, one micro-batch) of a 16 x 8 rollout of
random tokens (prompts of 12 tokens, responses of 25-44 tokens in a width of 44, as the reasoning
testbed's), AdamW, one torch thread, run bare (no Lightning): without a regularizer, with LpReg and
with SIREN at their configs/cpu settings, timed interleaved (A B C A B C ...) after two warm-up
updates each, median of `--reps`. Then the passes alone on that update's logits [128, 44, V]:
`token_logprobs` (the forward's own log-probs, for scale), `token_proxy_logprobs` (no grad) and
`token_topp_entropy` (forward + backward), each against the passes over the valid (response-mask)
rows only; with `--pass-vocab V` the passes alone on random logits of a V-token vocabulary (their
cost grows with V, the tiny model's V is 19; `--logit-scale LO HI` sets how peaked those rows are),
ERA's and AEnt's and the full entropy's too. Times are process CPU time (one thread), so that other
load on a shared machine does not count.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lit_covrl.algorithms import (  # noqa: E402
    token_clamped_entropy,
    token_entropy,
    token_logprobs,
    token_proxy_logprobs,
    token_scaled_logprobs,
    token_topp_entropy,
)
from lit_covrl.learner import Learner, LearnerSettings  # noqa: E402
from lit_covrl.objectives import PPOClip  # noqa: E402
from lit_covrl.drivers import PlainDriver  # noqa: E402
from lit_covrl.policy import load_policy  # noqa: E402
from lit_covrl.regularizers import SIREN, LpReg  # noqa: E402
from lit_covrl.settings import LossSettings, RolloutSettings, UpdateSettings  # noqa: E402
from lit_covrl.types import Rollout  # noqa: E402

B, G, P, T = 16, 8, 12, 44


def make_rollout(vocab: int, seed: int = 0) -> tuple[Rollout, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = B * G
    lengths = torch.randint(25, T + 1, (n,), generator=g)
    resp = (torch.arange(T)[None] < lengths[:, None]).float()
    ids = torch.randint(4, vocab, (n, P + T), generator=g)
    att = torch.cat([torch.ones(n, P, dtype=torch.long), resp.long()], 1)
    ids = ids * att
    logp = -torch.rand(n, T, generator=g) * resp
    rewards = (torch.rand(B, G, generator=g) < 0.5).float()
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).reshape(-1)
    return Rollout(ids, att, resp, logp, torch.zeros(n, T), torch.zeros(n, dtype=torch.bool)), adv


def make_learner(policy, regs) -> Learner:
    settings = LearnerSettings(RolloutSettings(group_size=G, max_new_tokens=T), LossSettings(),
                               UpdateSettings(micro_batch_size=B * G))
    driver = PlainDriver(torch.optim.AdamW(policy.parameters(), lr=0.0))  # lr 0: the weights stay put across repeats
    learner = driver.learner = Learner(policy, settings, PPOClip(), regs, driver)
    return learner


def timed(fn, reps: int) -> float:
    out = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        out.append(time.process_time() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--model", default="lit_covrl:tiny-reasoning")
    ap.add_argument("--pass-vocab", type=int, default=0,
                    help="also time the passes alone on random logits [128, 44, V] of this vocabulary size")
    ap.add_argument("--logit-scale", type=float, nargs=2, default=(3.0, 3.0), metavar=("LO", "HI"),
                    help="those random logits are N(0, 1) x a per-row scale uniform in [LO, HI] (larger: more "
                         "peaked rows, smaller nuclei; 6 30 at V=32000 gives a mean entropy of ~0.6 nats)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    policy = load_policy(args.model)
    vocab = policy.config.vocab_size
    rollout, adv = make_rollout(vocab)
    keep = torch.ones(B * G, dtype=torch.bool)
    learners = {
        "none": make_learner(policy, []),
        "LpReg": make_learner(policy, [LpReg(beta=1.0, min_p=0.02, neg_ratio=0.01, pos_ratio=0.0)]),
        "SIREN": make_learner(policy, [SIREN(coef=0.005, top_p=0.8, top_k=10000, quantile=0.8)]),
    }
    for name, learner in learners.items():  # warm-up; SIREN measures its anchor on the first
        for step in range(2):
            learner.update(rollout, adv, keep, None, step=step)
    times: dict[str, list[float]] = {k: [] for k in learners}
    for rep in range(args.reps):
        for name, learner in learners.items():
            t0 = time.process_time()
            learner.update(rollout, adv, keep, None, step=2 + rep)
            times[name].append(time.process_time() - t0)
    print(f"{args.model} (V={vocab}), {B}x{G} rollout, T={T}, {int(rollout.response_mask.sum())} valid tokens, "
          f"1 thread, median of {args.reps}")
    base = statistics.median(times["none"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  update, {name:5s}: median {m * 1e3:6.1f} ms ({(m - base) * 1e3:+6.1f} ms), "
              f"min {min(ts) * 1e3:6.1f} ms ({(min(ts) - min(times['none'])) * 1e3:+6.1f} ms)")

    with torch.no_grad():
        logits = policy(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask).logits[:, P - 1:-1].float()
    labels = rollout.input_ids[:, P:]
    valid = rollout.response_mask.bool()
    lz, ly = logits[valid], labels[valid]
    print(f"  passes on the logits {tuple(logits.shape)} (all rows) vs the {int(valid.sum())} valid rows:")
    print(f"    token_logprobs      : {timed(lambda: token_logprobs(logits, labels), args.reps) * 1e3:7.2f} ms | "
          f"{timed(lambda: token_logprobs(lz, ly), args.reps) * 1e3:7.2f} ms")
    proxy_all = timed(lambda: token_proxy_logprobs(logits, labels, 0.02), args.reps)
    print(f"    token_proxy_logprobs: {proxy_all * 1e3:7.2f} ms | "
          f"{timed(lambda: token_proxy_logprobs(lz, ly, 0.02), args.reps) * 1e3:7.2f} ms")

    def with_grad(z, fn):
        z = z.detach().requires_grad_(True)
        fn(z).sum().backward()

    def topp(z):
        z = z.detach().requires_grad_(True)
        token_topp_entropy(z, top_p=0.8, top_k=10000).sum().backward()

    print(f"    token_topp_entropy  : {timed(lambda: topp(logits), args.reps) * 1e3:7.2f} ms | "
          f"{timed(lambda: topp(lz), args.reps) * 1e3:7.2f} ms  (forward + backward)")
    if args.pass_vocab:
        g = torch.Generator().manual_seed(1)
        lo, hi = args.logit_scale
        z = torch.randn(B * G, T, args.pass_vocab, generator=g) * torch.empty(B * G, T, 1).uniform_(lo, hi, generator=g)
        y = torch.randint(0, args.pass_vocab, (B * G, T))
        h = token_entropy(z).mean()
        print(f"  passes alone on random logits {tuple(z.shape)} (all rows; scale {lo:g}-{hi:g}, mean entropy {h:.2f} nats):")
        print(f"    token_logprobs      : {timed(lambda: token_logprobs(z, y), args.reps) * 1e3:8.1f} ms")
        print(f"    token_proxy_logprobs: {timed(lambda: token_proxy_logprobs(z, y, 0.02), args.reps) * 1e3:8.1f} ms")
        print(f"    token_topp_entropy  : {timed(lambda: topp(z), args.reps) * 1e3:8.1f} ms  (forward + backward)")
        scaled = timed(lambda: with_grad(z, lambda w: token_scaled_logprobs(w, y, (2.0, 0.5))), args.reps)
        clamped = timed(lambda: with_grad(z, lambda w: token_clamped_entropy(w, clamp_p=0.3)), args.reps)
        print(f"    token_scaled_logprobs (2, 1/2): {scaled * 1e3:8.1f} ms  (forward + backward)")
        print(f"    token_clamped_entropy (0.3)   : {clamped * 1e3:8.1f} ms  (forward + backward)")
        print(f"    token_entropy (for scale)     : {timed(lambda: with_grad(z, token_entropy), args.reps) * 1e3:8.1f} ms  "
              "(forward + backward)")


if __name__ == "__main__":
    main()
