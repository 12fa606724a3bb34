"""Helpers of the multi-process tests: a rank-invariant sampler, a worker entry point that runs
Lightning Trainers with FSDP2 (`ModelParallelStrategy`, gloo) in each spawned process, and the
metric recorder. Not a test module (no `test_` prefix): spawned workers import it by name."""
from __future__ import annotations

import json
import os
import socket
import time
import zlib
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch import Callback

from lit_covrl import distributed
from lit_covrl.data import PromptDataModule
from lit_covrl.generation import RolloutGenerator
from lit_covrl.module import GRPOModule
from lit_covrl.regularizers import ClipCov, KLCov
from lit_covrl.rollout import sample_responses
from lit_covrl.types import Rollout
from tests.helpers import merge_settings

B, G = 2, 4  # prompts per rank per step, responses per prompt
CONSTANT = "const"  # answer marker: the reward is 0 for every response -> zero-variance group


class MarkedOnesReward:
    """Fraction of '1's in the completion, or 0 for prompts whose answer is CONSTANT (so that
    `filter_groups` drops those groups and a rank can be left with an empty mini-batch)."""

    def __call__(self, completion: str, answer: str) -> float:
        if answer == CONSTANT:
            return 0.0
        return completion.count("1") / max(len(completion), 1)


class MarkedHasOneReward:
    """1 if the completion holds a '1', else 0 (0 for CONSTANT prompts): a 0/1 reward, as
    `model.loss.advantage: passk` needs."""

    def __call__(self, completion: str, answer: str) -> float:
        return 0.0 if answer == CONSTANT else float("1" in completion)


class RankInvariantGenerator(RolloutGenerator):
    """A RolloutGenerator whose samples depend only on (prompt, RL step, weights), not on which rank
    holds the prompt or how many prompts a rank holds.

    The real sampler draws from one generator per rank (seed + 1_000_003 * rank) over that rank's
    whole [N, V] batch: 1 process x 2B prompts and 2 processes x B prompts consume different random
    streams, so their rollouts (and hence trajectories) differ by design. Here each prompt group
    is sampled on its own, without left padding, from a generator seeded by its token ids and the
    step, and padded to max_new_tokens; every rank still runs the same number of decoding forwards
    (`all_done` keeps them in step), which FSDP needs.
    """

    def __init__(self, *args, step, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step = step  # () -> the current RL step

    def sample(self, policy, ids, mask, temperature, generator) -> Rollout:
        tok, ro = self.tokenizer, self.settings
        T, n = ro.max_new_tokens, ro.group_size
        parts = []
        for start in range(0, ids.shape[0], n):
            gi, gm = ids[start:start + n], mask[start:start + n]
            first = int(gm[0].nonzero()[0])  # the rows of a group are the same prompt
            key = zlib.crc32(gi[0, first:].numpy().tobytes()) + 7919 * self.step()
            out = sample_responses(
                policy, gi[:, first:], gm[:, first:], max_new_tokens=T, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, temperature=temperature, top_p=ro.top_p,
                generator=torch.Generator().manual_seed(key), all_done=distributed.all_true,
            )
            parts.append(_pad(out, first, T, tok.pad_token_id))
        return Rollout(**{f: torch.cat([getattr(p, f) for p in parts]) for f in
                          ("input_ids", "attention_mask", "response_mask", "logp", "entropy", "truncated")})


class RankInvariantModule(GRPOModule):
    """GRPOModule whose rollouts come from a `RankInvariantGenerator`."""

    def _make_generation(self, cls, **extra):
        return super()._make_generation(RankInvariantGenerator, step=lambda: self.global_step, **extra)


def _pad(out: Rollout, left: int, T: int, pad_id: int) -> Rollout:
    """Left-pad the prompt by `left` columns, right-pad the response to T tokens."""
    n, t = out.response_mask.shape
    right = T - t

    def lr(x, value):
        return torch.nn.functional.pad(x, (left, right), value=value)

    def r(x, value=0):
        return torch.nn.functional.pad(x, (0, right), value=value)

    return Rollout(
        input_ids=lr(out.input_ids, pad_id), attention_mask=lr(out.attention_mask, 0),
        response_mask=r(out.response_mask), logp=r(out.logp), entropy=r(out.entropy), truncated=out.truncated,
    )


def write_prompts(path: Path, n: int) -> Path:
    """n arithmetic prompts; every prompt of global batch 1 (rank 1's first batch) and one more
    are constant-reward, so filtering empties rank 1's first mini-batch and unbalances others."""
    rows = []
    for i in range(n):
        a, b = 10 + i, 11 + 2 * i  # all prompts have the same length: no layout-dependent padding
        const = i in (2, 3, 6)
        rows.append({"prompt": f"{a}+{b}=", "answer": CONSTANT if const else str(a + b)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_module(model_dir: str, **kw) -> GRPOModule:
    args = dict(
        model=model_dir, reward=MarkedOnesReward(), correct_threshold=0.5,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1), seed=0,
        rollout=dict(group_size=G, max_new_tokens=4, filter_groups=True),
        update=dict(mini_batch_size=None, ppo_epochs=2, micro_batch_size=1, grad_clip=None),
    )
    return RankInvariantModule(**merge_settings(args, kw))


def make_data(prompts: Path, batch_size: int) -> PromptDataModule:
    return PromptDataModule(task=None, train_files=[str(prompts)], batch_size=batch_size, seed=0)


def regularizers():
    return [ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=3), KLCov(ratio=0.1, beta=1.0)]


def entropy_controls():
    """Every entropy control of the literature stacked, with Clip-Cov (whose candidates follow
    the objective's clipped tokens); settings that make each act on the tiny model."""
    from lit_covrl.regularizers import (
        AdaptiveEntropyBonus, EntroPIC, EntropyAdvantage, EntropyRatioClip, HighEntropyTokens, SteerWeights,
        WeightedReinforce,
    )

    entropic = EntroPIC(target=50.0, kp=0.01, ki=0.01, threshold=0.05)  # acts from step 1 (alpha ~ -0.5)
    return [HighEntropyTokens(top_frac=0.5), EntropyRatioClip(low=1e-3, high=1e-3), SteerWeights(),
            AdaptiveEntropyBonus(target=50.0, delta=0.01, init_coef=0.02, max_coef=0.1), EntropyAdvantage(),
            WeightedReinforce(positive_weight=0.5, negative_weight=1.5), entropic,
            ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=3)]


def simko():
    """SimKO with a mix and penalty large enough to act on the tiny model, with Clip-Cov."""
    from lit_covrl.regularizers import SimKO

    return [SimKO(mix_topk_coef=0.5, tau=0.5, incorrect_top1_scale=2.0), ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=3)]


def siren():
    """SIREN with a coefficient large enough to act on the tiny model (its anchor measured on the
    first rollout over both ranks), with Clip-Cov."""
    from lit_covrl.regularizers import SIREN

    return [SIREN(coef=5.0, top_p=0.9, top_k=8, quantile=0.5), ClipCov(ratio=0.1, lb=-1e9, ub=1e9, seed=3)]


def gspo():
    from lit_covrl.objectives import GSPO

    return GSPO(clip_low=0.05, clip_high=0.05)


class Recorder(Callback):
    """Every logged metric of every RL step: {step: {name: value}}."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps[trainer.global_step] = {k: float(v) for k, v in trainer.callback_metrics.items()}


class GeneratorAtFirstBatch(Callback):
    """The module's rollout-generator state when the first training batch starts (after a resume
    has restored it)."""

    state = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.state is None:
            self.state = pl_module.rollout_generator.get_state()


def trainer(steps: int, callbacks, devices: int, root: Path, strategy=None) -> L.Trainer:
    if strategy is None and devices > 1:
        from lit_covrl.sharding import FSDP2Strategy  # ModelParallelStrategy, data parallel only

        strategy = FSDP2Strategy(process_group_backend="gloo")
    elif strategy is None:
        strategy = "auto"
    return L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(root),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_ddp_fit(fit, rank: int, port: int, model_dir: str, prompts: str, out: str) -> None:
    """A spawned worker's body: `fit(model_dir, prompts, out / "d", 2, a gloo DDPStrategy)` as rank
    `rank` of 2, its result saved to out/rank<rank>.pt."""
    from lightning.pytorch.strategies import DDPStrategy

    torch.set_num_threads(1)
    elastic_env(rank, 2, port)
    torch.save(fit(model_dir, Path(prompts), Path(out) / "d", 2, DDPStrategy(process_group_backend="gloo")),
               f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def assert_ranks_match(out: Path, single: dict, prefix: str, steps=(1, 2, 3)) -> None:
    """Each rank's saved fit (`save_ddp_fit`) logged what the one-process fit `single` did: every
    metric under `prefix`, policy/loss and policy/grad_norm (at least 8 of them) at each step."""
    for rank in range(2):
        saved = torch.load(out / f"rank{rank}.pt", weights_only=False)
        for s in steps:
            keys = [k for k in single[s] if k.startswith(prefix) or k in ("policy/loss", "policy/grad_norm")]
            assert len(keys) >= 8
            for k in keys:
                assert saved[s][k] == pytest.approx(single[s][k], rel=2e-3, abs=1e-5), (rank, s, k)


def elastic_env(rank: int, world: int, port: int) -> None:
    """What torchrun would set: Lightning then treats the processes as launched externally."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0", TORCHELASTIC_RUN_ID="lit_covrl_test",
    )


def spawn(worker, args: tuple, *, timeout_s: float, what: str = "the 2-process run", nprocs: int = 2) -> None:
    """Run `worker(rank, *args)` in `nprocs` spawned processes and wait for them; fail the test,
    killing them, if they are not done in `timeout_s` (a rank left waiting in a collective that the
    others never join hangs instead of failing). A worker's exception is re-raised here."""
    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, start_method="spawn", join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{what} did not finish in {timeout_s:.0f} s")
