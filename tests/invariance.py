"""Batch invariance of every entropy control, through the real CLI (tests/test_invariance.py).

Each control of configs/cpu (`tests.stacking.controls()`, the set the stacking matrix pairs), the
baseline, a few large stacks that hold every control (`cover_stacks`: 14-22 controls each, no
two of them a pair the README's table refuses) and settings no config uses (`variant_entries`) train 2 RL steps of 4 prompts x 8 responses with 2
optimizer updates each, in six layouts of the same global work:

    whole         1 process, one micro-batch per update (micro_batch_size 128); on the CPU each
                  group's prompt is forwarded once (system.shared_prompt null = on)
    micro1        micro-batches of one row, each trimmed to its own length (system.skip_padding)
    unshared      the GPU's forward: prompt + response per row (shared_prompt false), skip_padding,
                  micro-batches of 5 rows
    checkpointed  activation checkpointing (which turns shared_prompt off), micro-batches of 3 rows
    resumed       whole in two fits: RL step 1, its checkpoint, and a new fit resumed from it for step 2
                  (every control's state, RNGs and schedules must come back exactly)
    ranks2        2 processes (FSDP2, gloo), 2 prompts and 1 prompt per update each, micro-batches of 3 rows

An entry is batch-invariant when every layout logs the same metrics at every step (`tests.stacking.StepLogger`)
and ends with the same weights (`differences`). Micro-batches must not change a token-mean, a selection or a
quantile; ranks must gather what the math takes over the whole batch (Clip-Cov's ranking, a
quantile, a group's statistics) and log global values, the same on every rank.

Two things are held fixed so that only the layout differs. The rollouts: the real sampler draws
from one generator per rank over that rank's batch (ranks must not sample the same tokens), so
the runs sample with `tests._dist.RankInvariantGenerator`, whose tokens depend only on (prompt,
step, weights). The optimizer: SGD, whose step is linear in the gradient; AdamW's first step is
lr * g / (|g| + eps), so a gradient of float noise around zero moves a weight by up to 2 lr one way
or the other and the weights would differ where the math does not.

    python -m tests.invariance                                   # every entry, every layout
    python -m tests.invariance --config my_control.yaml          # your control (several --config: a stack)
    python -m tests.invariance --config my.yaml --layouts micro1 resumed
"""
from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch

from tests import _dist
from tests.stacking import HARNESS, ROOT, Control, StackRunner, controls

SGD = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}
LAYOUTS = {
    "whole": {"model": {"update": {"micro_batch_size": 128}}},
    "micro1": {"model": {"update": {"micro_batch_size": 1}, "system": {"skip_padding": True}}},
    "unshared": {"model": {"update": {"micro_batch_size": 5}, "system": {"shared_prompt": False, "skip_padding": True}}},
    "checkpointed": {"model": {"update": {"micro_batch_size": 3}, "system": {"activation_checkpointing": True}}},
    "resumed": {},  # as whole, in two fits: RL step 1 and its last.ckpt, then a new fit resumed from it (`_resumed`)
    "ranks2": {"trainer": {"devices": 2, "strategy": {"class_path": "lit_covrl.sharding.FSDP2Strategy",
                                                      "init_args": {"process_group_backend": "gloo"}}},
               "data": {"batch_size": 2}, "model": {"update": {"mini_batch_size": 1, "micro_batch_size": 3}}},
}
SINGLE = [layout for layout in LAYOUTS if layout != "ranks2"]  # the 1-process layouts
BASELINE = "grpo"
# logged values that are not functions of the math: timings, throughput, memory
NOT_COMPARED = ("time/", "rollout/tokens_per_s", "system/")
# float32 sums in another order differ by ~1e-7 relative; means of centred products (cov/mean) and
# losses near 0 cancel, so their noise is absolute: 3e-7 seen on cov/mean ~1e-3, a loss of 1e-9 vs
# 9e-8 (1e-8 fails those). A metric below ~1e-4 is thus checked loosely (KL-Cov's loss 3.8e-5 could
# be 2.6 % off); the weights' check bounds what any of them does to training.
METRIC_REL, METRIC_ABS = 1e-4, 1e-6
WEIGHT_REL = 1e-4  # |delta_a - delta_b| / |delta_a| over all weights
# (control, layout): why it differs there, as its README row says
LAYOUT_DEPENDENT = {
    ("aepo", "ranks2"): "each rank draws extra responses for its own first floor(prompt_frac x B) prompts and "
                        "replaces its own first rows (README AEPO row): with 2 prompts per rank it draws none",
}


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) and "class_path" not in value else value
    return out


def harness(layout: str) -> dict:
    """The last config of a run in `layout`: stacking's HARNESS (its `StepLogger` records each step's
    metrics), SGD, the layout's settings."""
    return _merge(_merge(HARNESS, {"model": {"optimizer": SGD}}), LAYOUTS[layout])


def rank_invariant(real):
    """GRPOModule._make_generation with RankInvariantGenerator for the sampler's generator class."""

    def make(module, cls, **extra):
        return real(module, _dist.RankInvariantGenerator, step=lambda: module.global_step, **extra)

    return make


@dataclass
class Result:
    refusal: str | None = None
    steps: list[dict[str, float]] = field(default_factory=list)
    delta: torch.Tensor | None = None  # all weights minus the initial ones, flattened


class InvarianceRunner:
    """Fits of one entry at a time in one layout, through `StackRunner` (one CLI parser)."""

    def __init__(self, tmp: Path, layout: str) -> None:
        from lit_covrl.policy import load_policy

        self.layout = layout
        self.runner = StackRunner(tmp, harness=harness(layout), reuse_policies=layout != "ranks2")
        self.initial = load_policy("lit_covrl:tiny-arith", dtype="float32").state_dict()

    def run(self, entry: Entry) -> Result:
        from lit_covrl.module import GRPOModule
        from lit_covrl.sharding import full_state_dict

        generation = rank_invariant(GRPOModule._make_generation)
        with mock.patch.object(GRPOModule, "_make_generation", generation):
            out, steps = self._resumed(entry) if self.layout == "resumed" else self._fit(entry)
        if out.refusal is not None:
            return Result(refusal=out.refusal)
        steps = [steps[k] for k in sorted(steps)]
        weights = full_state_dict(self.runner.model.policy)  # a collective when sharded: every rank calls it
        delta = torch.cat([(weights[k].float().cpu() - v.float()).flatten() for k, v in self.initial.items()])
        return Result(steps=steps, delta=delta)

    def _fit(self, entry: Entry, ckpt_path: str | None = None):
        """The fit's `Outcome` and the metrics its logger got, {step: {name: value}}."""
        out = self.runner.run(*entry.stack, ckpt_path=ckpt_path)
        return out, {} if out.refusal is not None else self.runner.cli.trainer.logger.steps

    def _resumed(self, entry: Entry):
        """RL step 1 and its last.ckpt, then a new fit (a new module, data and callbacks) from it to
        step 2: the second fit's `Outcome` and both fits' logged steps."""
        base, folder = self.runner.harness, self.runner.tmp / f"ck-{entry.name}"
        saving = {"save_last": True, "every_n_train_steps": 1, "dirpath": str(folder)}
        self.runner.harness = _merge(base, {"trainer": {"max_steps": 1}, "checkpoint": saving})
        try:
            first, steps = self._fit(entry)
            if first.refusal is not None:
                return first, steps
            self.runner.harness = _merge(self.runner.harness, {"trainer": {"max_steps": 2}})
            second, more = self._fit(entry, ckpt_path=str(folder / "last.ckpt"))
        finally:
            self.runner.harness = base
        if second.refusal is None and (sorted(steps), sorted(more)) != ([0], [1]):
            raise AssertionError(f"layout resumed: steps {sorted(steps)} then {sorted(more)}, not [0] then [1] resumed")
        return second, {**steps, **more}


def differences(a: Result, b: Result) -> list[str]:
    """What differs between two layouts' results of one control (empty: invariant)."""
    if a.refusal or b.refusal:
        return [] if a.refusal == b.refusal else [f"refused: {a.refusal!r} vs {b.refusal!r}"]
    if len(a.steps) != len(b.steps):
        return [f"{len(a.steps)} vs {len(b.steps)} RL steps"]
    problems = []
    for i, (ma, mb) in enumerate(zip(a.steps, b.steps)):
        keys = {k for k in (*ma, *mb) if not k.startswith(NOT_COMPARED)}
        for k in sorted(keys):
            va, vb = ma.get(k), mb.get(k)
            if va is None or vb is None:
                problems.append(f"step {i}: {k} logged in one layout only")
            elif not (math.isclose(va, vb, rel_tol=METRIC_REL, abs_tol=METRIC_ABS) or (math.isnan(va) and math.isnan(vb))):
                problems.append(f"step {i}: {k} {va:.8g} vs {vb:.8g}")
    moved = a.delta.norm().item()
    if moved == 0:
        problems.append("the weights did not move")
    elif (gap := (a.delta - b.delta).norm().item() / moved) > WEIGHT_REL:
        problems.append(f"weights: |delta difference| / |delta| = {gap:.2e}")
    return problems


@dataclass(frozen=True)
class Entry:
    """A run of the matrix: GRPO with the controls of `stack` (none for the baseline)."""

    name: str
    stack: tuple[Control, ...] = ()


def cover_stacks(found: list[Control], refused: set[str], leave_out: set[str]) -> list[tuple[Control, ...]]:
    """Large stacks that together hold every control but `leave_out`: each built greedily, in name
    order from the controls no stack holds yet, of controls no two of which are `refused` (the
    README's `a+b` ids) or both objectives."""
    def stack_well(a: Control, b: Control) -> bool:
        return not (a.kind == b.kind == "objective" or f"{a.name}+{b.name}" in refused or f"{b.name}+{a.name}" in refused)

    left, stacks = [c for c in found if c.name not in leave_out], []
    while left:
        stack: list[Control] = []
        for c in sorted(left, key=lambda c: c.name) + sorted((c for c in found if c not in left and c.name not in leave_out),
                                                             key=lambda c: c.name):
            if all(stack_well(c, s) for s in stack):
                stack.append(c)
        stacks.append(tuple(stack))
        left = [c for c in left if c not in stack]
    return stacks


def variant(control: Control, name: str, init_args: dict[str, dict], extra: dict | None = None) -> Control:
    """`control` with settings its config does not use: `init_args` {callback class name: its
    init_args, replacing the config's}, and `extra` config merged in (e.g. other data)."""
    config = _merge(copy.deepcopy(control.config), extra or {})
    for callback in config["trainer"]["callbacks"]:
        cls = callback["class_path"].rsplit(".", 1)[1]
        if cls in init_args:
            callback["init_args"] = init_args[cls]
    return dataclasses.replace(control, name=name, config=config)


# examples/byo/data.jsonl, 5 prompts: 4 per step, so step 2 sees prompts step 1 trained on
RECURRING_PROMPTS = {"data": {"task": None, "train_files": [str(ROOT / "examples/byo/data.jsonl")], "prompt_field": "question",
                              "answer_field": "reward_model.ground_truth", "val_size": 0},
                     "model": {"reward": "examples.byo.my_rewards.close_enough"}}


def variant_entries(found: dict[str, Control]) -> list[Entry]:
    """Settings no config of configs/cpu uses, alone and stacked on the controls they interact with:
    Lopti's per-step quantile split (`portion`, gathered over ranks) beside the selections that
    read its phases; DCPOAdvantage bounded to 2 prompts, and OutcomeExploration, on 5 prompts that
    recur, so that their per-prompt state is read (and DCPO's evicted): on the arithmetic task no
    prompt recurs in 2 steps, and a state resumed wrong but for its size would pass."""
    portion = variant(found["lopti"], "lopti_portion", {"Lopti": {"portion": 0.5, "low_first": True}})
    dcpo = variant(found["dcpo"], "dcpo_bounded_recurring", {"DCPOAdvantage": {"max_prompts": 2}}, RECURRING_PROMPTS)
    exact = _merge(RECURRING_PROMPTS, {"model": {"reward": {"class_path": "lit_covrl.rewards.ExactMatchReward"}}})
    outcome = variant(found["outcome"], "outcome_recurring", {}, exact)  # its answer counts: a reward with final_answer
    return [Entry(portion.name, (portion,)),
            Entry("lopti_portion+kl_cov+bapo+clip_cov", (portion, found["kl_cov"], found["bapo"], found["clip_cov"])),
            Entry(dcpo.name, (dcpo,)), Entry(outcome.name, (outcome,))]


def entries() -> list[Entry]:
    """The baseline, every control alone, `cover_stacks` of all but the layout-dependent ones, and
    `variant_entries`."""
    from tests.stacking import ROOT, documented_refusals

    found = controls()
    dependent = {c for c, _ in LAYOUT_DEPENDENT}
    stacks = cover_stacks(found, documented_refusals((ROOT / "README.md").read_text()), dependent)
    return [Entry(BASELINE), *(Entry(c.name, (c,)) for c in found),
            *(Entry(f"stack{i}-{s[0].name}-{len(s)}", s) for i, s in enumerate(stacks, 1)),
            *variant_entries({c.name: c for c in found})]


def name(entry: Entry) -> str:
    return entry.name


def expected_difference(entry: Entry, layout: str) -> str | None:
    """Why `entry` differs in `layout` (LAYOUT_DEPENDENT), or None where it must not."""
    return next((LAYOUT_DEPENDENT[c.name, layout] for c in entry.stack if (c.name, layout) in LAYOUT_DEPENDENT), None)


def ranks2_worker(rank: int, port: int, out: str, found: list[Entry]) -> None:
    """A spawned worker: rank `rank` of 2 fits every entry in layout ranks2 and saves its results,
    {name: Result}, to out/rank<rank>.pt."""
    import logging

    import torch.distributed as dist

    torch.set_num_threads(1)
    _dist.elastic_env(rank, 2, port)
    logging.getLogger("lit_covrl").propagate = False
    runner = InvarianceRunner(Path(out) / f"rank{rank}", "ranks2")
    results = {e.name: runner.run(e) for e in found}
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run_ranks2(out: Path, found: list[Entry], timeout_s: float) -> list[dict[str, Result]]:
    """Both ranks' results of layout ranks2 for the entries `found`, {name: Result} each."""
    out.mkdir(parents=True, exist_ok=True)
    _dist.spawn(ranks2_worker, (_dist.free_port(), str(out), found), timeout_s=timeout_s,
                what="the 2-process invariance runs")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def user_entry(paths: list[str]) -> Entry:
    """The stack of the method configs at `paths` (as `--config` files after configs/quickstart.yaml)."""
    import yaml

    from tests.stacking import control

    stack = []
    for path in paths:
        found = control(Path(path).stem, yaml.safe_load(Path(path).read_text()))
        if found is None:
            raise SystemExit(f"{path}: no control found (no model.objective, trainer.callbacks or model keys)")
        stack.append(found)
    return Entry("+".join(c.name for c in stack), tuple(stack))


def report(found: list[Entry], layouts: list[str], tmp: Path) -> int:
    """Print each entry's differences per layout against whole; the number of unexpected ones."""
    single = {layout: InvarianceRunner(tmp / layout, layout) for layout in ["whole", *layouts] if layout != "ranks2"}
    ranks = run_ranks2(tmp / "ranks2", found, timeout_s=1800) if "ranks2" in layouts else None
    unexpected = 0
    for e in found:
        whole = single["whole"].run(e)
        if whole.refusal is not None:  # nothing ran: no layout to compare
            print(f"{e.name:36s} refused at start-up: {whole.refusal}")
            unexpected += 1
            continue
        rows = {layout: single[layout].run(e) for layout in layouts if layout != "ranks2"}
        if ranks is not None:
            rows |= {"ranks2 rank 0": ranks[0][e.name], "ranks2 rank 1": ranks[1][e.name]}
        for layout, result in rows.items():
            problems = differences(whole, result)
            expected = problems and expected_difference(e, layout.split()[0])
            unexpected += bool(problems) and not expected
            print(f"{e.name:36s} {layout:14s} {'ok' if not problems else ('expected: ' if expected else '') + '; '.join(problems[:4])}")
    return unexpected


def main(argv: list[str] | None = None) -> int:
    import argparse
    import logging

    parser = argparse.ArgumentParser(prog="python -m tests.invariance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="a method config to check (stack several with several --config); default: every entry")
    parser.add_argument("--layouts", nargs="+", default=[layout for layout in LAYOUTS if layout != "whole"],
                        choices=[layout for layout in LAYOUTS if layout != "whole"], help="compared with whole")
    args = parser.parse_args(argv)
    logging.getLogger("lit_covrl").propagate = False
    found = [user_entry(args.config)] if args.config else entries()
    with tempfile.TemporaryDirectory() as tmp:
        return 1 if report(found, args.layouts, Path(tmp)) else 0


if __name__ == "__main__":
    raise SystemExit(main())
