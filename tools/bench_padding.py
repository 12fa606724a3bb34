"""The learner's forward + backward over one rollout with and without `skip_padding`
(length-sorted micro-batches, each trimmed to its own extent; lit_covrl/packing.py).

    python tools/bench.py padding [--model lit_covrl:tiny-reasoning] [--rows 320] [--micro 16] [--repeats 3]

The rollout has long-tailed response lengths (exponential, mean `--mean-len`, capped at
`--max-len`) and prompts of 8-14 tokens, as reasoning RL produces. Prints, for each setting, the
token positions the forwards computed (padding included) and the median wall time of a full pass
(no-grad log-probs of every row, then the training forward + backward of every micro-batch),
interleaved so both see the same machine load. One torch thread.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from lit_covrl.learner import Learner, LearnerSettings
from lit_covrl.objectives import PPOClip
from lit_covrl.policy import load_policy
from lit_covrl.settings import LossSettings, RolloutSettings, UpdateSettings


def make_rollout(rows: int, mean_len: float, max_len: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    P = 14
    resp = torch.distributions.Exponential(1.0 / mean_len).sample((rows,)).clamp(1, max_len).long()
    prm = torch.randint(8, P + 1, (rows,), generator=g)
    T = int(resp.max())
    ids = torch.randint(3, vocab, (rows, P + T), generator=g)
    col = torch.arange(P + T)
    att = ((col >= P - prm[:, None]) & (col < P + resp[:, None])).long()
    return ids * att, att, att[:, P:].float()


def one_pass(learner: Learner, ids, att, mask) -> tuple[float, int]:
    widths = []
    hook = learner.policy.register_forward_pre_hook(
        lambda m, a, kw: widths.append(kw["input_ids"].numel()), with_kwargs=True)
    t0 = time.perf_counter()
    learner.logprobs(learner.policy, ids, att, mask)
    for r in learner._plan(ids, att, mask.shape[1]):
        logp = learner._logprobs(ids[r], att[r], mask.shape[1], False).logp
        (logp * mask[r]).sum().backward()
    dt = time.perf_counter() - t0
    hook.remove()
    learner.policy.zero_grad(set_to_none=True)
    return dt, sum(widths)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="lit_covrl:tiny-reasoning")
    p.add_argument("--rows", type=int, default=320)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--mean-len", type=float, default=24.0)
    p.add_argument("--max-len", type=int, default=120)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = load_policy(args.model)
    ids, att, mask = make_rollout(args.rows, args.mean_len, args.max_len, model.config.vocab_size)
    learners = {}
    for skip in (False, True):
        s = LearnerSettings(RolloutSettings(group_size=1, max_new_tokens=mask.shape[1]), LossSettings(),
                            UpdateSettings(micro_batch_size=args.micro, grad_clip=None), skip_padding=skip)
        learners[skip] = Learner(model, s, PPOClip(), [], driver=None)
    times = {False: [], True: []}
    positions = {}
    for _ in range(args.repeats):
        for skip, learner in learners.items():
            dt, n = one_pass(learner, ids, att, mask)
            times[skip].append(dt)
            positions[skip] = n
    valid = int(att.sum())
    print(f"rollout: {args.rows} rows, {ids.shape[1]} columns, {valid} valid tokens "
          f"(mean response {mask.sum(1).float().mean():.1f}, max {mask.shape[1]}); micro-batch {args.micro}; "
          f"{args.model}; median of {args.repeats}")
    for skip in (False, True):
        per_forward = positions[skip] / 2  # the no-grad forward and the training forward see the same rows
        print(f"skip_padding={str(skip):5}  positions per forward {per_forward:>8,.0f} "
              f"({per_forward / valid:.2f}x the valid tokens)  pass {statistics.median(times[skip]):.3f} s")
    print(f"speed-up {statistics.median(times[False]) / statistics.median(times[True]):.2f}x")


if __name__ == "__main__":
    main()
