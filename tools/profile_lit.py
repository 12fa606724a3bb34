"""Instrumented lit_covrl blocks for tools/profile_step.py: nested perf_counter timers wrapped
around the functions of one RL step (`instrument`), a Lightning callback that switches them on
after the warm-up and records the step start times, and `run_lit`, one block of a real fit in
the profiled setting (see profile_step.py's docstring: 16 prompts x 8 generations, <= 5 new
tokens, 1 optimizer update per rollout unless `module_kw` says otherwise).

Timers are exclusive: a region's time minus its timed children, keyed by the path of labels.
"""
from __future__ import annotations

import importlib
import time
from collections import defaultdict


import bench  # tools/bench.py

PROMPTS, G, T_MAX = 16, 8, 5


# ----------------------------------------------------------------------------- nested timers


class Timers:
    def __init__(self) -> None:
        self.excl: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[list] = []  # [label, child_seconds]
        self.on = False

    def wrap(self, label: str, fn):
        timers = self

        def wrapped(*a, **k):
            if not timers.on:
                return fn(*a, **k)
            path = "/".join([s[0] for s in timers.stack] + [label])
            timers.stack.append([label, 0.0])
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                _, child = timers.stack.pop()
                timers.excl[path] += dt - child
                timers.calls[path] += 1
                if timers.stack:
                    timers.stack[-1][1] += dt

        return wrapped


_PATCHED = []


TIMERS = Timers()


def instrument(module, timers: Timers) -> None:
    """Wrap the pieces of one RL step (module-level names are patched where they are looked up,
    once per process; instance methods per module)."""
    w = timers.wrap
    for name, label in [("generate", "rollout"), ("score", "score"), ("manual_backward", "backward (Lightning)"),
                        ("training_step", "training_step")]:
        setattr(module, name, w(label, getattr(module, name)))
    tok = module.tokenizer
    tok.batch_decode = w("decode completions", tok.batch_decode)
    module.policy.forward = w("model forward", module.policy.forward)
    if _PATCHED:
        return
    _PATCHED.append(True)
    for owner, attr, label in PATCHES:
        obj = resolve(owner)
        setattr(obj, attr, w(label, getattr(obj, attr)))


# (where the name is looked up, the name, the timer label): module-level functions are patched in
# the module that calls them; "module:Class" patches a method on the class
PATCHES = [
    ("lit_covrl.generation", "encode_prompts", "encode prompts"),
    ("lit_covrl.sampling.kv_cache:KVCacheSampler", "sample", "sampler"),
    ("lit_covrl.sampling.kv_cache", "forward_with_cache", "model forward (decode)"),
    ("lit_covrl.step_batch", "compute_advantages", "advantages"),
    ("lit_covrl.module", "rollout_metrics", "rollout metrics"),
    ("lit_covrl.module", "publish_step_metrics", "self.log (logging)"),
    ("lit_covrl.learner:Learner", "update", "update"),
    ("lit_covrl.drivers:LightningDriver", "step", "optimizer step (Lightning)"),
    ("lit_covrl.learner", "response_logprobs", "training forward"),
    ("lit_covrl.learner", "shared_prompt_logprobs", "training forward"),
    ("lit_covrl.policy", "token_logprobs", "log-prob gather"),
    ("lit_covrl.objectives:PPOClip", "token_loss", "loss"),
    ("lit_covrl.loss", "aggregate", "loss"),
    ("lit_covrl.objectives:PPOClip", "stats", "update metrics (objective stats)"),
    ("torch.autograd", "backward", "autograd backward"),
    ("torch.nn.utils", "clip_grad_norm_", "clip_grad_norm"),
]


def resolve(owner: str):
    """"pkg.mod" -> the module; "pkg.mod:Class" -> the class."""
    mod, _, cls = owner.partition(":")
    obj = importlib.import_module(mod)
    return getattr(obj, cls) if cls else obj


def make_timing_callback(timers: Timers, warmup: int, steps: int, profiler=None):
    from lightning.pytorch import Callback

    class Cb(Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_train_start(self, trainer, module) -> None:
            opt = module.optimizers().optimizer
            opt.step = timers.wrap("AdamW step", opt.step)
            lg = trainer.logger
            lg.log_metrics = timers.wrap("TensorBoard log_metrics", lg.log_metrics)

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            self.starts.append(time.perf_counter())
            i = len(self.starts) - 1
            if i == warmup:
                timers.on = True
                if profiler is not None:
                    profiler.enable()
            if i == warmup + steps:
                timers.on = False
                if profiler is not None:
                    profiler.disable()

    return Cb()


def _plain_prefill(model, prompt_ids, mask):
    """lit_covrl's prompt forward before it was shared over a group: every row (A/B baseline)."""
    import lit_covrl.sampling.kv_cache as R

    return R.forward_with_cache(model, None, input_ids=prompt_ids, attention_mask=mask,
                                position_ids=R.position_ids_from_mask(mask), logits_to_keep=1)


def run_lit(steps: int, warmup: int, log_dir: str, *, profiler=None, plain_prefill: bool = False,
            module_kw: dict | None = None) -> dict:
    """lit_covrl blocks; `module_kw` overrides GRPOModule settings (default: 1 update per rollout)."""
    import lit_covrl.sampling.kv_cache as R

    saved = R.prefill
    if plain_prefill:
        R.prefill = _plain_prefill
    try:
        return _run_lit(steps, warmup, log_dir, profiler=profiler, module_kw=module_kw or {})
    finally:
        R.prefill = saved


def _run_lit(steps: int, warmup: int, log_dir: str, *, profiler=None, module_kw: dict) -> dict:
    update = {"mini_batch_size": None, **module_kw.get("update", {})}
    module = bench.make_module(bench.QUICKSTART, **{**module_kw, "update": update})
    module.configure_model()
    timers = TIMERS
    timers.excl.clear()
    timers.calls.clear()
    instrument(module, timers)
    cb = make_timing_callback(timers, warmup, steps, profiler)
    bench._fit(module, bench.make_data(PROMPTS), warmup + steps + 1, [cb], log_dir)
    st = cb.starts
    per = [b - a for a, b in zip(st[warmup:warmup + steps], st[warmup + 1:warmup + steps + 1])]
    snap = Timers()
    snap.excl.update(timers.excl)
    snap.calls.update(timers.calls)
    return {"wall": sum(per), "per_step": per, "timers": snap}
