"""Where the time of one lit_covrl RL step goes (1 update per rollout), and the floor.

    python tools/profile_step.py [--steps 20] [--warmup 3] [--reps 3] [--cprofile] [--ops]
    python tools/profile_step.py --ab-train [--updates 1|4] [--trl]   # shared_prompt off vs on

Setting: the TRL side-by-side benchmark's 1-update case (tools/bench_trl.py): the shipped tiny
Qwen2 (`lit_covrl:tiny-arith`), 16 prompts x 8 generations, <= 5 new tokens, `mini_batch_size:
null` (one optimizer update per rollout), micro-batch 128, AdamW, grad clip 1, a real Lightning
Trainer with a TensorBoard logger, one torch thread.

1. Breakdown (default): functions of the step are wrapped with perf_counter timers (about a
   microsecond each: the breakdown is not distorted the way a tracing profiler distorts
   op-bound code). Times are exclusive (a region's time minus its timed children), summed over
   the measured steps and shown as a share of the wall time start to start (on_train_batch_start
   to the next one, as bench_trl.py measures). "lightning loop" is everything outside
   `training_step`: Lightning's loop, hooks, data loading, the logger.
2. Floor: the least any GRPO implementation on this Hugging Face model must run per rollout:
   one prefill forward (last-position logits) + one KV-cache forward per further token, a
   log-softmax + multinomial per token, one training forward (response logits only) with a
   clipped-ratio token-mean loss, backward, grad-norm clip and one AdamW step; no Lightning,
   no metrics, no logging. Timed in blocks interleaved with lit_covrl blocks (A B A B ...).
3. `--ab`: interleaved A/B of the sampler's prompt forward (every row vs once per group);
   `--ab-train`: interleaved A/B of `model.shared_prompt` (the training and no-grad log-prob
   forwards: prompt+response on every row vs the prompt once per group), at `--updates` 1 or 4
   optimizer updates per rollout, with TRL blocks at the same setting under `--trl`.
4. `--cprofile`: cProfile of the measured steps, top functions by cumulative time (detail of
   the Lightning / logging side). `--ops`: torch.profiler op counts and self-CPU shares per region.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import bench  # noqa: E402  (tools/bench.py)

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
    for name, label in [("generate", "rollout"), ("score", "score"), ("_update", "update"),
                        ("manual_backward", "backward (Lightning)"), ("_optimizer_step", "optimizer step (Lightning)"),
                        ("_log_step", "self.log (logging)"), ("training_step", "training_step")]:
        setattr(module, name, w(label, getattr(module, name)))
    tok = module.tokenizer
    tok.batch_decode = w("decode completions", tok.batch_decode)
    module.policy.forward = w("model forward", module.policy.forward)
    if _PATCHED:
        return
    _PATCHED.append(True)
    import lit_covrl.module as M
    import lit_covrl.policy as P
    import lit_covrl.rollout as R
    import lit_covrl.update as U

    w = timers.wrap
    M.encode_prompts = w("encode prompts", M.encode_prompts)
    M.sample_responses = w("sampler", M.sample_responses)
    R.forward_with_cache = w("model forward (decode)", R.forward_with_cache)
    M.compute_advantages = w("advantages", M.compute_advantages)
    M.rollout_metrics = w("rollout metrics", M.rollout_metrics)
    U.response_logprobs = w("training forward", U.response_logprobs)
    U.shared_prompt_logprobs = w("training forward", U.shared_prompt_logprobs)
    P.token_logprobs = w("log-prob gather", P.token_logprobs)
    U.ppo_token_loss = w("loss", U.ppo_token_loss)
    U.aggregate = w("loss", U.aggregate)
    U.ppo_stats = w("update metrics (ppo_stats)", U.ppo_stats)
    torch.autograd.backward = w("autograd backward", torch.autograd.backward)
    torch.nn.utils.clip_grad_norm_ = w("clip_grad_norm", torch.nn.utils.clip_grad_norm_)


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
    import lit_covrl.rollout as R

    return R.forward_with_cache(model, None, input_ids=prompt_ids, attention_mask=mask,
                                position_ids=R.position_ids_from_mask(mask), logits_to_keep=1)


def run_lit(steps: int, warmup: int, log_dir: str, *, profiler=None, plain_prefill: bool = False,
            module_kw: dict | None = None) -> dict:
    """lit_covrl blocks; `module_kw` overrides GRPOModule settings (default: 1 update per rollout)."""
    import lit_covrl.rollout as R

    saved = R._prefill
    if plain_prefill:
        R._prefill = _plain_prefill
    try:
        return _run_lit(steps, warmup, log_dir, profiler=profiler, module_kw=module_kw or {})
    finally:
        R._prefill = saved


def _run_lit(steps: int, warmup: int, log_dir: str, *, profiler=None, module_kw: dict) -> dict:
    module = bench.make_module(bench.QUICKSTART, **{"mini_batch_size": None, **module_kw})
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


# ----------------------------------------------------------------------------- floor


def make_floor(shared_prompt: bool = False):
    """A bare GRPO step on the same model and prompts (see the module docstring).

    shared_prompt=True: the variant that does fewer FLOPs than every implementation compared
    here: each prompt's prefix runs once per group (16 rows, not 128), in sampling and in the
    training forward (its KV cache, with grad, is repeated over the group's 8 rows), so only the
    response tokens run per sample. Same math up to float rounding."""
    from transformers import DynamicCache

    from lit_covrl.policy import load_policy, load_tokenizer
    from lit_covrl.prompts import encode_prompts

    model = load_policy(bench.QUICKSTART)
    tok = load_tokenizer(bench.QUICKSTART)
    dm = bench.make_data(PROMPTS)
    batches = dm._stream(0, 1, start=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    eos = tok.eos_token_id
    parts: dict[str, float] = defaultdict(float)

    def prefix(ids, mask, pos, cache, keep):
        if not shared_prompt:
            return model(input_ids=ids.repeat_interleave(G, 0), attention_mask=mask.repeat_interleave(G, 0),
                         position_ids=pos.repeat_interleave(G, 0), past_key_values=cache, use_cache=True,
                         logits_to_keep=keep).logits
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                       logits_to_keep=keep).logits
        cache.batch_repeat_interleave(G)
        return logits.repeat_interleave(G, 0)

    def step() -> None:
        t = [time.perf_counter()]
        batch = next(batches)
        ids, pmask = encode_prompts(tok, batch.prompts, chat_template=False, max_prompt_length=512, overflow="error")
        ppos = (pmask.cumsum(-1) - 1).clamp(min=0)
        n = ids.shape[0] * G
        t.append(time.perf_counter())
        with torch.no_grad():
            a = time.perf_counter()
            cache = DynamicCache()
            logits = prefix(ids, pmask, ppos, cache, 1)[:, -1]
            pf = time.perf_counter() - a
            parts["prefill forward"] += pf
            fwd = 0.0
            mask = pmask.repeat_interleave(G, 0)
            p = ppos[:, -1:].repeat_interleave(G, 0)
            toks, logps, alive = [], [], []
            done = torch.zeros(n, dtype=torch.bool)
            for s in range(T_MAX):
                lp = torch.log_softmax(logits, -1)
                tk = torch.multinomial(lp.exp(), 1)
                alive.append(~done)
                toks.append(tk)
                logps.append(lp.gather(-1, tk))
                done = done | (tk[:, 0] == eos)
                if s == T_MAX - 1 or bool(done.all()):
                    break
                mask = torch.cat([mask, (~done).long()[:, None]], 1)
                p = p + 1
                a = time.perf_counter()
                logits = model(input_ids=tk, attention_mask=mask, position_ids=p, past_key_values=cache,
                               use_cache=True).logits[:, -1]
                fwd += time.perf_counter() - a
            resp = torch.cat(toks, 1)
            old = torch.cat(logps, 1)
            m = torch.stack(alive, 1).float()
        t.append(time.perf_counter())
        parts["decode forwards"] += fwd
        parts["sampling math"] += t[-1] - t[-2] - fwd - pf
        texts = tok.batch_decode(resp, skip_special_tokens=True)
        r = torch.tensor([float(x.strip() == y) for x, y in zip(texts, [a for a in batch.answers for _ in range(G)])])
        rg = r.view(-1, G)
        adv = ((rg - rg.mean(1, keepdim=True)) / (rg.std(1, keepdim=True) + 1e-6)).view(-1, 1)
        t.append(time.perf_counter())
        parts["score + advantages"] += t[-1] - t[-2]
        T = resp.shape[1]
        fm = torch.cat([pmask.repeat_interleave(G, 0), m.long()], 1)
        if shared_prompt:  # prefix once per prompt (with grad), then the responses on its repeated cache
            cache = DynamicCache()
            first = prefix(ids, pmask, ppos, cache, 1)  # [n, 1, V]: predicts response token 0
            rpos = ppos[:, -1:].repeat_interleave(G, 0) + 1 + torch.arange(T)
            rest = model(input_ids=resp, attention_mask=fm, position_ids=rpos, past_key_values=cache,
                         use_cache=True).logits[:, :-1]
            out = torch.cat([first, rest], 1)
        else:
            full = torch.cat([ids.repeat_interleave(G, 0), resp], 1)
            out = model(input_ids=full, attention_mask=fm, position_ids=(fm.cumsum(-1) - 1).clamp(min=0),
                        logits_to_keep=T + 1, use_cache=False).logits[:, :-1]
        logp = torch.log_softmax(out, -1).gather(-1, resp[..., None]).squeeze(-1)
        ratio = torch.exp(logp - old)
        loss = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
        loss = (loss * m).sum() / m.sum()
        t.append(time.perf_counter())
        parts["training forward + loss"] += t[-1] - t[-2]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t.append(time.perf_counter())
        parts["backward"] += t[-1] - t[-2]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        t.append(time.perf_counter())
        parts["clip + AdamW"] += t[-1] - t[-2]
        parts["encode prompts"] += t[1] - t[0]
        step.last = (logp.detach(), old, m)

    return step, parts


def run_floor(steps: int, warmup: int, shared_prompt: bool = False) -> dict:
    step, parts = make_floor(shared_prompt)
    for _ in range(warmup):
        step()
    parts.clear()
    per = []
    for _ in range(steps):
        a = time.perf_counter()
        step()
        per.append(time.perf_counter() - a)
    return {"wall": sum(per), "per_step": per, "parts": dict(parts)}


# ----------------------------------------------------------------------------- main


GROUPS = [  # (row label, [exclusive timer paths that belong to it]) -- paths matched by suffix
    ("rollout: model forwards (prefill + decode)", ["rollout/sampler/model forward (decode)/model forward"]),
    ("rollout: sampler math + bookkeeping", ["rollout/sampler", "rollout/sampler/model forward (decode)"]),
    ("rollout: encode prompts + decode completions", ["rollout/encode prompts", "rollout/decode completions", "rollout"]),
    ("score (reward)", ["score"]),
    ("advantages", ["advantages"]),
    ("update: training forward (model)", ["update/training forward/model forward"]),
    ("update: log-prob gather", ["update/training forward/log-prob gather", "update/training forward"]),
    ("update: loss", ["update/loss"]),
    ("update: backward (autograd)", ["update/backward (Lightning)/autograd backward"]),
    ("update: backward (Lightning wrapper)", ["update/backward (Lightning)"]),
    ("update: clip_grad_norm", ["update/optimizer step (Lightning)/clip_grad_norm"]),
    ("update: AdamW step", ["update/optimizer step (Lightning)/AdamW step"]),
    ("update: optimizer step (Lightning wrapper)", ["update/optimizer step (Lightning)"]),
    ("update: metrics + rest of _update", ["update/update metrics (ppo_stats)", "update"]),
    ("rollout metrics", ["rollout metrics"]),
    ("self.log (logging)", ["self.log (logging)"]),
    ("training_step rest", [""]),
]


def breakdown(res: dict) -> list[tuple[str, float, float]]:
    tm: Timers = res["timers"]
    wall = res["wall"]
    excl = {k[len("training_step/"):] if k.startswith("training_step/") else ("" if k == "training_step" else "@" + k): v
            for k, v in tm.excl.items()}
    used = set()
    rows = []
    for label, keys in GROUPS:
        s = 0.0
        for k in keys:
            if k in excl:
                s += excl[k]
                used.add(k)
        rows.append((label, s))
    tb = sum(v for k, v in excl.items() if k.startswith("@") and "log_metrics" in k)
    inside = sum(v for k, v in excl.items() if not k.startswith("@"))
    other = [k for k in excl if k not in used and not k.startswith("@")]
    if other:
        rows.append(("(unassigned: " + ", ".join(other) + ")", sum(excl[k] for k in other)))
    rows.append(("Lightning loop, hooks, data (outside training_step)", wall - inside - tb))
    rows.append(("TensorBoard log_metrics (in the loop)", tb))
    return [(lbl, s / wall * 100, s / len(res["per_step"]) * 1e3) for lbl, s in rows]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="interleaved lit / floor blocks")
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--ops", action="store_true")
    ap.add_argument("--ab", action="store_true",
                    help="interleaved A/B: prompt forward on every row (before) vs once per group (now)")
    ap.add_argument("--ab-train", action="store_true",
                    help="interleaved A/B of model.shared_prompt: training forward on every row vs prompt once per group")
    ap.add_argument("--updates", type=int, default=1, choices=(1, 4), help="optimizer updates per rollout (--ab-train)")
    ap.add_argument("--trl", action="store_true", help="also TRL's GRPOTrainer blocks (tools/bench_trl.py)")
    args = ap.parse_args(argv)
    bench._quiet()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print(f"load before: {[round(x, 2) for x in os.getloadavg()]}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lit_covrl_prof_") as tmp:
        if args.cprofile:
            prof = cProfile.Profile()
            run_lit(args.steps, args.warmup, tmp, profiler=prof)
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(45)
            print(s.getvalue())
            return
        if args.ops:
            return ops_profile(args, tmp)
        if args.ab:
            return ab(args, tmp)
        if args.ab_train:
            return ab_train(args, tmp)
        lit_runs, floor_runs, shared_runs, trl_steps = [], [], [], []
        for rep in range(args.reps):
            lit_runs.append(run_lit(args.steps, args.warmup, tmp))
            floor_runs.append(run_floor(args.steps, args.warmup))
            shared_runs.append(run_floor(args.steps, args.warmup, shared_prompt=True))
            msg = ""
            if args.trl:
                import bench_trl

                got = [x["seconds"] for x in bench_trl.run_trl(1, args.steps, args.warmup, T_MAX, tmp)]
                trl_steps += got
                msg = f", TRL {statistics.median(got) * 1e3:.1f}"
            print(f"rep {rep + 1}: lit {statistics.median(lit_runs[-1]['per_step']) * 1e3:.1f} ms/step, "
                  f"floor {statistics.median(floor_runs[-1]['per_step']) * 1e3:.1f}, "
                  f"shared-prompt floor {statistics.median(shared_runs[-1]['per_step']) * 1e3:.1f}{msg}; "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    # pooled breakdown over reps
    pooled = Timers()
    for r in lit_runs:
        for k, v in r["timers"].excl.items():
            pooled.excl[k] += v
    allsteps = [x for r in lit_runs for x in r["per_step"]]
    rows = breakdown({"timers": pooled, "wall": sum(r["wall"] for r in lit_runs), "per_step": allsteps})
    lit_med = statistics.median(allsteps)
    print(f"\nlit_covrl step (start to start): median {lit_med * 1e3:.1f} ms over {len(allsteps)} steps")
    print(f"{'region':58s} {'share %':>8s} {'ms/step':>8s}")
    for lbl, pct, ms in rows:
        print(f"{lbl:58s} {pct:8.1f} {ms:8.2f}")
    for name, runs in (("floor", floor_runs), ("shared-prompt floor", shared_runs)):
        fsteps = [x for r in runs for x in r["per_step"]]
        fwall = sum(r["wall"] for r in runs)
        parts = defaultdict(float)
        for r in runs:
            for k, v in r["parts"].items():
                parts[k] += v
        f_med = statistics.median(fsteps)
        print(f"\n{name} step: median {f_med * 1e3:.1f} ms over {len(fsteps)} steps; lit / {name} = {lit_med / f_med:.2f}")
        for k, v in parts.items():
            print(f"  {k:40s} {v / fwall * 100:6.1f} % {v / len(fsteps) * 1e3:8.2f} ms")
    if trl_steps:
        t_med = statistics.median(trl_steps)
        print(f"\nTRL GRPOTrainer (1 update) s/rollout: median {t_med * 1e3:.1f} ms over {len(trl_steps)}; "
              f"TRL / lit = {t_med / lit_med:.2f}")
    print(f"load after: {[round(x, 2) for x in os.getloadavg()]}")


def ab(args, tmp) -> None:
    runs = {"plain prefill": [], "shared prefill": [], "TRL": []}
    blocks = {"plain prefill": [], "shared prefill": []}
    for rep in range(args.reps):
        for name in ("plain prefill", "shared prefill"):
            r = run_lit(args.steps, args.warmup, tmp, plain_prefill=name == "plain prefill")
            runs[name] += r["per_step"]
            blocks[name].append(r)
        msg = ""
        if args.trl:
            import bench_trl

            got = [x["seconds"] for x in bench_trl.run_trl(1, args.steps, args.warmup, T_MAX, tmp)]
            runs["TRL"] += got
            msg = f", TRL {statistics.median(got) * 1e3:.1f}"
        print(f"rep {rep + 1}: plain {statistics.median(blocks['plain prefill'][-1]['per_step']) * 1e3:.1f} ms, "
              f"shared {statistics.median(blocks['shared prefill'][-1]['per_step']) * 1e3:.1f} ms{msg}; "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items() if v}
    for k, v in med.items():
        print(f"{k}: median {v * 1e3:.1f} ms/rollout over {len(runs[k])}")
    print(f"plain / shared = {med['plain prefill'] / med['shared prefill']:.3f}")
    for name, rs in blocks.items():
        fwd = sum(r["timers"].excl.get("training_step/rollout/sampler/model forward (decode)/model forward", 0.0)
                  for r in rs) / sum(len(r["per_step"]) for r in rs)
        print(f"{name}: rollout model forwards {fwd * 1e3:.1f} ms/step")
    if "TRL" in med:
        for name in ("plain prefill", "shared prefill"):
            print(f"TRL / lit ({name}) = {med['TRL'] / med[name]:.3f}")
    print(f"load after: {[round(x, 2) for x in os.getloadavg()]}")


AB_TRAIN = {"shared_prompt off": False, "shared_prompt on": True}
UPDATE_TIMERS = {  # exclusive timer paths of the update's model work
    "training forward (model)": "training_step/update/training forward/model forward",
    "backward (autograd)": "training_step/update/backward (Lightning)/autograd backward",
}


def ab_train(args, tmp) -> None:
    """Interleaved blocks of lit_covrl with `shared_prompt` off and on (and TRL under --trl), at
    args.updates optimizer updates per rollout; medians of the per-rollout wall times."""
    import bench_trl

    mbs = None if args.updates == 1 else PROMPTS // args.updates
    runs = {name: [] for name in [*AB_TRAIN, "TRL"]}
    blocks = {name: [] for name in AB_TRAIN}
    for rep in range(args.reps):
        for name, on in AB_TRAIN.items():
            r = run_lit(args.steps, args.warmup, tmp, module_kw={"shared_prompt": on, "mini_batch_size": mbs})
            runs[name] += r["per_step"]
            blocks[name].append(r)
        if args.trl:
            runs["TRL"] += [x["seconds"] for x in bench_trl.run_trl(args.updates, args.steps, args.warmup, T_MAX, tmp)]
        print(f"rep {rep + 1}: " + ", ".join(f"{k} {statistics.median(v[-args.steps:]) * 1e3:.1f} ms"
                                             for k, v in runs.items() if v) + f"; load {os.getloadavg()[0]:.2f}", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items() if v}
    print(f"\n{args.updates} update(s) per rollout, medians over {len(runs['shared_prompt on'])} rollouts per side:")
    for k, v in med.items():
        print(f"  {k}: {v * 1e3:.1f} ms/rollout")
    print(f"  off / on = {med['shared_prompt off'] / med['shared_prompt on']:.3f}")
    for name, rs in blocks.items():
        n = sum(len(r["per_step"]) for r in rs)
        parts = {lbl: sum(r["timers"].excl.get(path, 0.0) for r in rs) / n * 1e3 for lbl, path in UPDATE_TIMERS.items()}
        print(f"  {name}: " + ", ".join(f"{lbl} {ms:.1f} ms/step" for lbl, ms in parts.items()))
    if "TRL" in med:
        for name in AB_TRAIN:
            print(f"  TRL / lit ({name}) = {med['TRL'] / med[name]:.3f}")
    print(f"load after: {[round(x, 2) for x in os.getloadavg()]}")


def ops_profile(args, tmp) -> None:
    """torch.profiler over a few steps: aten op counts per step and self-CPU shares."""
    from torch.profiler import ProfilerActivity, profile

    holder = {}

    class P:
        def enable(self):
            holder["p"] = profile(activities=[ProfilerActivity.CPU])
            holder["p"].__enter__()

        def disable(self):
            holder["p"].__exit__(None, None, None)

    run_lit(args.steps, args.warmup, tmp, profiler=P())
    ka = holder["p"].key_averages()
    aten = [e for e in ka if e.key.startswith("aten::")]
    total_calls = sum(e.count for e in aten)
    print(f"aten op calls per RL step (all levels): {total_calls / args.steps:.0f}")
    print(ka.table(sort_by="self_cpu_time_total", row_limit=25))
    step, _ = make_floor()
    for _ in range(args.warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as p2:
        for _ in range(args.steps):
            step()
    ka2 = p2.key_averages()
    print(f"floor: aten op calls per step (all levels): {sum(e.count for e in ka2 if e.key.startswith('aten::')) / args.steps:.0f}")
    print(ka2.table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
