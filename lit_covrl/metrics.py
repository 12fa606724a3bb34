"""Metric helpers: a per-step running-mean accumulator and the pass@k torchmetrics Metric."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from math import comb

import torch
from torch import Tensor
from torchmetrics import Metric


class PhaseTimer:
    """Wall time of the phases of one RL step: `with timer("rollout"): ...` -> timer.seconds
    (a phase entered several times, e.g. generation rounds, adds up), and what they produced:
    `timer.count("rollout_tokens", n)` -> timer.counts, added up the same way."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, float | Tensor] = {}

    def count(self, name: str, value: float | Tensor) -> None:
        self.counts[name] = self.counts.get(name, 0.0) + value

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


class StepMetrics:
    """Collects scalars over the mini-batch updates of one RL step; `means()` averages them."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    def add(self, name: str, value: float | Tensor) -> None:
        self._sums[name] += float(value)
        self._counts[name] += 1

    def update(self, values: dict[str, float | Tensor]) -> None:
        for k, v in values.items():
            self.add(k, v)

    def pop(self) -> dict[str, float]:
        out = {k: self._sums[k] / self._counts[k] for k in self._sums}
        self._sums.clear()
        self._counts.clear()
        return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n < k:
        raise ValueError(f"pass@k needs n >= k samples, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


class PassAtK(Metric):
    """Mean pass@1 and unbiased pass@k over prompts; `update(correct[B, n])`, n samples per prompt."""

    full_state_update = False

    def __init__(self, k: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.add_state("pass1_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("passk_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("prompts", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct: Tensor) -> None:
        n = correct.shape[1]
        c = correct.long().sum(1).tolist()
        self.pass1_sum += sum(ci / n for ci in c)
        self.passk_sum += sum(pass_at_k(n, ci, self.k) for ci in c)
        self.prompts += len(c)

    def compute(self) -> dict[str, Tensor]:
        denom = self.prompts.clamp(min=1).double()
        return {"pass@1": (self.pass1_sum / denom).float(), f"pass@{self.k}": (self.passk_sum / denom).float()}


def rollout_metrics(
    rollout, rewards: Tensor, advantages: Tensor, zero_var: Tensor, *, group_size: int, seconds: float,
    correct_threshold: float, generated_tokens: Tensor | float | None = None, scores: Tensor | None = None,
) -> dict[str, Tensor]:
    """The rollout/, policy/entropy and cov/ metrics of one RL step, over all ranks.

    Every value is global (the same on every rank, what one process holding all ranks' rows
    would compute): means are sums over ranks divided by counts over ranks (never a mean of
    rank means), maxima are maxima over ranks, and the cov/ statistics use the global token
    means and the global top-k. policy/entropy is the exact token-mean entropy (of softmax(z / temperature))
    of the sampled responses under the rollout policy (as the sampler recorded it, or the no-grad
    training forward's with `recompute_logprobs`); policy/entropy_seq_mean is the paper's
    mean of per-sequence means. rollout/tokens_per_s is all ranks' sampled tokens over the slowest
    rank's rollout time; `generated_tokens` is this rank's count when it sampled more than the
    rollout holds (dynamic sampling: every round's tokens, over every round's time).
    rollout/reward_mean and reward_std are of `rewards`, trained on (an overlong penalty included);
    rollout/accuracy is correctness: `scores` (the rewards as scored, before that penalty; null:
    `rewards`) >= correct_threshold, as held-out pass@1 judges it.
    """
    from lit_covrl import distributed
    from lit_covrl.algorithms import covariance_group_means
    from lit_covrl.regularizers.base import global_token_covariance

    m = rollout.response_mask
    lengths = m.sum(1)
    per_seq = (rollout.entropy * m).sum(1) / lengths.clamp(min=1)
    r = rewards.double()
    groups = zero_var.float().view(-1, group_size)[:, 0]
    s = distributed.all_sum(torch.stack([
        r.sum(), (r * r).sum(), torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device),
        ((rewards if scores is None else scores) >= correct_threshold).double().sum(), lengths.double().sum(),
        rollout.truncated.double().sum(), groups.double().sum(),
        torch.tensor(float(groups.numel()), dtype=torch.float64, device=r.device),
        (rollout.entropy * m).double().sum(), per_seq.double().sum(),
        torch.as_tensor(lengths.sum() if generated_tokens is None else generated_tokens, dtype=torch.float64,
                        device=r.device),
    ]))
    n = s[2].clamp(min=1)
    mean = s[0] / n
    var = (s[1] - n * mean * mean) / (n - 1).clamp(min=1)  # unbiased, as torch.std
    mx = distributed.all_max(torch.stack([lengths.max().double(), torch.tensor(float(seconds), dtype=torch.float64, device=r.device)]))
    f = torch.float32
    metrics = {
        "rollout/reward_mean": mean.to(f),
        "rollout/reward_std": var.clamp(min=0).sqrt().to(f) if int(s[2]) > 1 else torch.tensor(0.0),
        "rollout/accuracy": (s[3] / n).to(f),
        "rollout/response_length": (s[4] / n).to(f),
        "rollout/response_length_max": mx[0].to(f),
        "rollout/truncated_frac": (s[5] / n).to(f),
        "rollout/zero_var_group_frac": (s[6] / s[7].clamp(min=1)).to(f),
        "rollout/tokens_per_s": (s[10] / mx[1].clamp(min=1e-9)).to(f),
        "policy/entropy": (s[8] / s[4].clamp(min=1)).to(f),
        "policy/entropy_seq_mean": (s[9] / n).to(f),
    }
    cov = global_token_covariance(rollout.logp, advantages[:, None].expand_as(m), m)
    cov_all, _ = distributed.gather_rows(cov)  # [N_global, T]: the top-k groups are global
    mask_all, _ = distributed.gather_rows(m)
    for frac, value in covariance_group_means(cov_all, mask_all).items():
        metrics[f"cov/top{frac * 100:g}pct"] = value
    metrics["cov/mean"] = (cov_all * mask_all).sum() / mask_all.sum().clamp(min=1)
    return metrics


def unlikeliness_metrics(rewards: Tensor, seq_logp: Tensor, group_size: int, beta: float,
                         ranks: Tensor | None = None) -> dict[str, Tensor]:
    """The adv/unlikeliness_* metrics of one RL step, over all ranks, of the correct responses
    (reward 1) of mixed groups, those the unlikeliness reward re-weights: `penalty`, the mean
    share of their reward taken away (beta rank / G; 0 for the least likely of a group), and
    `correct_seq_logp`, their mean token log-prob under the rollout policy (rising towards 0 as
    GRPO sharpens the policy onto its likeliest answers). `ranks`: `likelihood_ranks(seq_logp)`
    when the caller already has them (those the advantages used)."""
    from lit_covrl import distributed
    from lit_covrl.algorithms import likelihood_ranks, zero_variance_groups

    correct = (rewards == 1) & ~zero_variance_groups(rewards, group_size)
    if ranks is None:
        ranks = likelihood_ranks(seq_logp, group_size)
    cut = beta * ranks / group_size
    s = distributed.all_sum(torch.stack([
        cut[correct].sum(), seq_logp.double()[correct].sum(), correct.double().sum(),
    ]))
    n, f = s[2].clamp(min=1), torch.float32
    return {"adv/unlikeliness_penalty": (s[0] / n).to(f), "adv/unlikeliness_correct_seq_logp": (s[1] / n).to(f)}


def as_floats(metrics: dict) -> dict[str, float]:
    """Plain floats, with one device-to-host copy per device for all tensor values (not one
    synchronization per metric)."""
    out = {k: float(v) for k, v in metrics.items() if not isinstance(v, Tensor)}
    by_device: dict[torch.device, list[str]] = defaultdict(list)
    for k, v in metrics.items():
        if isinstance(v, Tensor):
            by_device[v.device].append(k)
    for keys in by_device.values():
        values = torch.stack([metrics[k].detach().reshape(()).double() for k in keys]).tolist()
        out.update(zip(keys, values))
    return {k: out[k] for k in metrics}  # the caller's order


def publish_step_metrics(trainer, metrics: dict[str, float], step: int) -> None:
    """What one `self.log(name, value, on_step=True)` per metric does at the end of a training
    step, done once for all of them: every metric becomes visible to callbacks
    (`trainer.callback_metrics`: checkpoint monitors, early stopping, recorders) and is written
    to every logger at `step` when Lightning would log it (every `log_every_n_steps` steps, or
    when the trainer is stopping). One `self.log` per metric costs a measurable share of a CPU
    step (Lightning's result collection moves each stored metric's state on every call; figures
    in docs/benchmarks.md, `python tools/bench_logging.py`)."""
    # float64, the logged Python floats' precision: under bf16-true precision the default dtype
    # inside a training step is bfloat16 and monitors would read values rounded to 3 digits
    trainer.callback_metrics.update({k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()})
    every = trainer.log_every_n_steps
    if every and ((step + 1) % every == 0 or trainer.should_stop):  # Lightning's own cadence
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak memory so far, in GiB: allocated CUDA memory on a GPU (the caching
    allocator's high-water mark of live tensors), the peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)
