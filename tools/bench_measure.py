"""The measurements of tools/bench.py (see docs/benchmarks.md): phase times of a real fit,
regularizer overhead, selection cost, wasted-pass checks, the float32 entropy peak and the
quickstart's peak RSS. tools/bench.py runs them and prints the table / JSON.

How phases are timed: a `GRPOModule` is driven by a real Lightning `Trainer` (TensorBoard logger
in a temp dir, like the quickstart) for `warmup + steps` RL steps; a callback reads the module's
own `time/rollout_s`, `time/score_s`, `time/ref_logp_s`, `time/update_s` metrics after each step
and the wall time from `on_train_batch_start` to `on_train_batch_end` (end to end: everything
the trainer does for one RL step, logging included). Figures are medians over the steps after
the warm-up. Completion tokens/s = valid response tokens of the step / step wall time.

Regularizer overhead: inside the same kind of fit (in `on_train_start`, optimizers set up), one
rollout is sampled once; then `module.learner.update` is called on that same rollout again and again, with the
policy and optimizer state restored before every call (same batch, same weights, same seeds),
cycling through [none, EntropyBonus, ClipCov, KLCov] in rounds (A B C D A B C D ...). The ratio
is median(update with the regularizer) / median(update with none).
"""
from __future__ import annotations

import copy
import os
import random
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch

from bench_common import QUICKSTART, REG_NAMES, REPO, _fit, make_data, make_module, num_params

# --------------------------------------------------------------------------- phases


class PhaseRecorder:
    """Lightning callback: per-RL-step wall time and the module's time/* metrics."""

    def __new__(cls, *a, **k):  # a real Callback subclass, built lazily so importing is cheap
        from lightning.pytorch import Callback

        class _Rec(Callback):
            def __init__(self) -> None:
                self.steps: list[dict] = []
                self._t0 = 0.0

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                self._t0 = time.perf_counter()
                self._n = len(batch.prompts) * pl_module.settings.rollout.group_size

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                wall = time.perf_counter() - self._t0
                m = {k: float(v) for k, v in trainer.callback_metrics.items()}
                tokens = m["rollout/response_length"] * self._n
                self.steps.append({
                    "t_start": self._t0, "step_s": wall, "rollout_s": m["time/rollout_s"], "score_s": m["time/score_s"],
                    "ref_logp_s": m.get("time/ref_logp_s", 0.0), "update_s": m["time/update_s"],
                    "completion_tokens": tokens, "tokens_per_s": tokens / wall,
                })

        return _Rec()


def _median_steps(steps: list[dict], warmup: int) -> dict:
    kept = [dict(s) for s in (steps[warmup:] or steps)]
    for s in kept:  # the rest of the step: advantages, logging, Lightning's loop
        s["other_s"] = s["step_s"] - s["rollout_s"] - s["score_s"] - s["ref_logp_s"] - s["update_s"]
    out = {k: statistics.median(s[k] for s in kept) for k in kept[0] if k != "t_start"}
    out["steps_measured"] = len(kept)
    return out


def bench_phases(model: str, *, steps: int, warmup: int, log_dir: str, **overrides) -> dict:
    """Median per-step phase times of a real fit (see module docstring)."""
    module, rec = make_module(model, **overrides), PhaseRecorder()
    _fit(module, make_data(), warmup + steps, [rec], log_dir)
    out = _median_steps(rec.steps, warmup)
    out["params"] = num_params(module.policy)
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in out.items()}


# --------------------------------------------------------------------------- regularizer overhead


def _make_reg(name: str):
    from lit_covrl.regularizers import ClipCov, EntropyBonus, KLCov

    return {"EntropyBonus": lambda: EntropyBonus(coef=1e-3), "ClipCov": lambda: ClipCov(ratio=2e-4),
            "KLCov": lambda: KLCov(ratio=2e-3, beta=1.0)}[name]()


class OverheadProbe:
    """Lightning callback: in on_train_start, time `learner.update` on one fixed rollout with each
    regularizer (or none), interleaved, state restored before every call."""

    def __new__(cls, rounds: int):
        from lightning.pytorch import Callback

        class _Probe(Callback):
            def __init__(self) -> None:
                self.times: dict[str, list[float]] = {k: [] for k in ("none", *REG_NAMES)}

            def on_train_start(self, trainer, module) -> None:
                from lit_covrl.algorithms import compute_advantages
                from lit_covrl.tasks import get_task

                task, rng = get_task("arithmetic"), random.Random(0)
                examples = [task.sample(rng) for _ in range(trainer.datamodule.hparams.batch_size)]
                G = module.settings.rollout.group_size
                rollout = module.generate([e.prompt for e in examples], G, temperature=1.0,
                                          generator=torch.Generator().manual_seed(0))
                rewards, _ = module.score(rollout.completions, [e.answer for e in examples for _ in range(G)])
                loss = module.settings.loss
                adv = compute_advantages(rewards, G, loss.advantage, baseline_quantile=loss.baseline_quantile,
                                         pass_k=loss.pass_k)
                keep = torch.ones(len(adv), dtype=torch.bool)
                opt = module.optimizers()
                policy0 = copy.deepcopy(module.policy.state_dict())
                opt0 = copy.deepcopy(opt.optimizer.state_dict())
                regs = {name: _make_reg(name) for name in REG_NAMES}
                saved = list(trainer.callbacks)
                try:
                    for _ in range(rounds):
                        for name in self.times:
                            module.policy.load_state_dict(policy0)
                            opt.optimizer.load_state_dict(opt0)
                            trainer.callbacks[:] = saved + ([regs[name]] if name != "none" else [])
                            module.learner.regularizers = module.regularizers
                            if name == "ClipCov":
                                regs[name].generator.manual_seed(0)
                            t0 = time.perf_counter()
                            module.learner.update(rollout, adv, keep, None, step=0)
                            self.times[name].append(time.perf_counter() - t0)
                            for r in regs.values():
                                r.pop_metrics()
                finally:
                    trainer.callbacks[:] = saved
                    module.policy.load_state_dict(policy0)
                    opt.optimizer.load_state_dict(opt0)
                trainer.should_stop = True

        return _Probe()


def bench_overhead(model: str, *, rounds: int, log_dir: str, **overrides) -> dict:
    module, probe = make_module(model, **overrides), OverheadProbe(rounds)
    _fit(module, make_data(), 1, [probe], log_dir)
    med = {k: statistics.median(v) for k, v in probe.times.items()}
    return {
        "update_s_none": round(med["none"], 5),
        **{f"update_s_{k}": round(med[k], 5) for k in REG_NAMES},
        **{k: round(med[k] / med["none"], 4) for k in REG_NAMES},
        "rounds": rounds,
    }


# --------------------------------------------------------------------------- selection cost


def bench_selection(sizes=(10_000, 100_000, 1_000_000), *, repeats: int = 7, T: int = 16) -> dict:
    """ms for covariance (global means + Cov) + Clip-Cov selection, and covariance + KL-Cov
    selection, over N valid tokens ([N/T, T], ~10% padding like real rollouts)."""
    from lit_covrl.algorithms import clip_cov_select, covariance_sums, kl_cov_select, token_covariance

    out = {}
    for n in sizes:
        g = torch.Generator().manual_seed(0)
        rows = n // T
        logp = -torch.rand(rows, T, generator=g) * 3
        adv = torch.randn(rows, generator=g)
        mask = (torch.rand(rows, T, generator=g) > 0.1).float()
        elig = mask.bool()
        gen = torch.Generator().manual_seed(0)

        def cov():
            s = covariance_sums(logp, adv, mask)
            c = s[2].clamp(min=1)
            return token_covariance(logp, adv, mask, means=(s[0] / c, s[1] / c))

        def clip():
            return clip_cov_select(cov(), mask, elig, ratio=2e-4, lb=0.0, ub=5.0, generator=gen)

        def kl():
            return kl_cov_select(cov(), mask, ratio=2e-3)

        res = {}
        for key, fn in (("cov", cov), ("clip_cov", clip), ("kl_cov", kl)):
            fn()
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            res[key] = round(statistics.median(ts), 4)
        out[f"{n:.0e}".replace("+0", "")] = res
    return out


# --------------------------------------------------------------------------- wasted-pass checks


def _tokens_after_eos(rollout, eos_id: int) -> int:
    """Response-mask entries after a sequence's first EOS (padding that would enter the loss)."""
    T = rollout.response_mask.shape[1]
    resp = rollout.input_ids[:, -T:]
    is_eos = (resp == eos_id).long()
    after = (is_eos.cumsum(1) - is_eos) > 0  # strictly after the first EOS
    return int((rollout.response_mask.bool() & after).sum())


def check_passes(model: str, log_dir: str, steps: int = 2) -> dict:
    """Count policy forwards per phase of one real RL step (no regularizer, then ClipCov), the
    reference model's existence, decode steps vs the longest response, and whether any padding
    token is selected by Clip-Cov / KL-Cov."""
    import lightning as L

    counts = {"n": 0}

    class _Count(L.pytorch.Callback):
        def __init__(self) -> None:
            self.records: list[dict] = []

        def on_train_start(self, trainer, module) -> None:
            module.policy.register_forward_pre_hook(lambda *_: counts.__setitem__("n", counts["n"] + 1))
            gen, upd = module.generate, module.learner.update
            rec = self.records

            def generate(*a, **k):
                c0 = counts["n"]
                out = gen(*a, **k)
                lengths = out.response_mask.sum(1)
                rec.append({"generate_forwards": counts["n"] - c0, "response_columns": out.response_mask.shape[1],
                            "longest_response": int(lengths.max()),
                            "loss_mask_tokens_after_eos": _tokens_after_eos(out, module.tokenizer.eos_token_id)})
                return out

            def update(*a, **k):
                c0 = counts["n"]
                out = upd(*a, **k)
                rec[-1]["update_forwards"] = counts["n"] - c0
                return out

            module.generate, module.learner.update = generate, update

    out = {}
    for label, regs in (("none", []), ("ClipCov", ["ClipCov"]), ("KLCov", ["KLCov"])):
        module, c = make_module(model), _Count()
        sel = []
        reg_objs = [_make_reg(r) for r in regs]
        for r in reg_objs:  # record selected tokens outside the mask
            orig = r.prepare

            def prepare(ctx, _orig=orig, _r=r):
                _orig(ctx)
                sel.append(int((_r.selected & ~ctx.mask.bool()).sum()))

            r.prepare = prepare
        _fit(module, make_data(), steps, [c, *reg_objs], log_dir)
        upd = module.settings.update
        per_update_micro = -(-upd.mini_batch_size * module.settings.rollout.group_size // upd.micro_batch_size)
        # a pass is 2 forwards with shared_prompt (the groups' prompts, then the responses; every
        # micro-batch here holds whole groups), else 1 over prompt+response
        per_pass = 2 if module.shared_prompt_on else 1
        step = c.records[-1]
        out[label] = {
            **step, "updates_per_rollout": module.updates_per_rollout, "forwards_per_pass": per_pass,
            "expected_update_forwards_without_recompute": module.updates_per_rollout * per_update_micro * per_pass,
            "reference_model_loaded": module._reference is not None,
            "selected_padding_tokens": sum(sel),
        }
    return out


def entropy_fp32_peak_fraction(N: int = 64, T: int = 16, V: int = 4096, chunk: int = 128) -> float:
    """Largest float32 tensor created by token_entropy (forward + backward) on bf16 logits
    [N, T, V], as a fraction of N*T*V: < 1 means float32 N x T x V is never materialized."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lit_covrl.algorithms import token_entropy

    biggest = [0]

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            res = func(*args, **(kwargs or {}))
            for t in res if isinstance(res, (tuple, list)) else [res]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    biggest[0] = max(biggest[0], t.numel())
            return res

    logits = torch.randn(N, T, V, dtype=torch.bfloat16, requires_grad=True)
    with Watch():
        token_entropy(logits, chunk_size=chunk).sum().backward()
    return biggest[0] / (N * T * V)


# --------------------------------------------------------------------------- peak RSS


def quickstart_peak_rss_mb(steps: int, log_dir: str, *, model: str = QUICKSTART, fork: bool = False) -> float:
    """Max RSS (MB) of a child process running a short quickstart fit.

    fork=False: a fresh `lit-covrl fit --config configs/quickstart.yaml --trainer.max_steps
    <steps>` process (the real thing, imports included). fork=True (used by --quick and the
    tests, ~20 s cheaper): a fork of this process runs the same fit through `make_module` with
    `model`; its RSS then also counts the pages it inherited and touched."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if fork:
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                _fit(make_module(model), make_data(), steps, [], log_dir)
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError("the forked quickstart run failed")
    else:
        cmd = [
            sys.executable, "-c", "from lit_covrl.cli import main; main()", "fit", "--config",
            str(REPO / "configs" / "quickstart.yaml"), "--trainer.max_steps", str(steps),
            "--trainer.logger.init_args.save_dir", log_dir, "--trainer.enable_progress_bar", "false",
            "--model.model", model,
        ]
        subprocess.run(cmd, check=True, cwd=log_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if after <= before and before > 0:  # an earlier, bigger child would hide this one
        warnings.warn("peak_rss_mb is a max over earlier child processes")
    return round(after / 1024.0, 1)  # Linux: KiB
