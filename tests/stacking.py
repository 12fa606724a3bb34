"""Every pair of entropy controls, stacked through the real CLI (tests/test_stacking.py).

The controls are the method configs under configs/cpu/ (a new control ships one: test_configs
refuses a config it does not know), read by their form: `model.objective` (an objective),
`trainer.callbacks` (regularizers, with the settings their config adds), or only `model.loss` /
`model.rollout` keys (a module setting: QAE, Pass@k, the unlikeliness reward); plus clip-higher, a
module setting with no file of its own. A config without any (grpo.yaml) is the baseline.
The configs rather than the classes lit_covrl.regularizers / objectives export: they hold all three
forms (the classes miss the `model.loss` settings), with the settings each recipe adds beside its
class (kl_cov's unclipped surrogate, archer's dual-clip and ReferenceKL), where most refusals come
from, and they are what a user stacks; a class without a config would need invented init_args.

A pair runs as `lit-covrl fit --config configs/quickstart.yaml --config A --config B` would, on
the parser of one `LitCovRLCLI` (built once: building it is most of the CLI's start-up time), for 2
RL steps of 4 prompts x 8 responses with 2 updates each. A refusal is an error raised before the
first batch (the CLI's own rule, `cli._past_start_up`); any later error is a crash.

    python -m tests.stacking     # prints the README's "Stacking controls" table of refused pairs
"""
from __future__ import annotations

import importlib
import itertools
import logging
import math
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import yaml
from lightning.pytorch.loggers import Logger

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIGS = ROOT / "configs" / "cpu"
BASE = ROOT / "configs" / "quickstart.yaml"
# module settings that are a control of the literature but have no config file of their own
FLAG_CONTROLS = {"clip_higher": {"model": {"loss": {"clip_high": 0.28}}}}
# 2 RL steps of 4 prompts (AEPO's prompt_frac 0.25 draws for one) x 8 responses (Pass@4 needs > 4),
# 2 updates per rollout (the off-policy code runs); no validation or checkpoint; each step's metrics (StepLogger)
HARNESS = {"trainer": {"max_steps": 2, "limit_val_batches": 0, "enable_progress_bar": False, "enable_model_summary": False,
                       "logger": {"class_path": "tests.stacking.StepLogger"}},
           "checkpoint": {"save_last": False, "every_n_train_steps": 1000},
           "data": {"batch_size": 4}, "model": {"update": {"mini_batch_size": 2}}, "torch_threads": 1}
README_BEGIN, README_END = "<!-- refused pairs: python -m tests.stacking -->", "<!-- end of refused pairs -->"


@dataclass(frozen=True)
class Control:
    """One entropy control: `name` (its config's stem), `kind` (objective, regularizer or setting),
    the config it adds, the words a refusal naming it may use (its classes, regularizer names and
    model keys) and its regularizers' metric names."""

    name: str
    kind: str
    config: dict
    words: tuple[str, ...]
    reg_names: tuple[str, ...] = ()


def _model_keys(model: dict, prefix: str = "model") -> list[str]:
    out = []
    for key, value in model.items():
        if key == "objective":
            continue
        out += _model_keys(value, f"{prefix}.{key}") if isinstance(value, dict) else [f"{prefix}.{key}"]
    return out


def control(name: str, config: dict) -> Control | None:
    """The control a method config adds (None for the baseline, which adds nothing)."""
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    model = config.get("model") or {}
    words, reg_names = [name, *_model_keys(model)], []
    if model.get("objective"):
        kind = "objective"
        words.append(model["objective"]["class_path"].rsplit(".", 1)[1])
    elif callbacks:
        kind = "regularizer"
    elif model:
        kind = "setting"
    else:
        return None
    for cb in callbacks:
        module, cls = cb["class_path"].rsplit(".", 1)
        reg_name = (cb.get("init_args") or {}).get("name") or getattr(importlib.import_module(module), cls).default_name
        words += [cls, reg_name]
        reg_names.append(reg_name)
    return Control(name, kind, config, tuple(words), tuple(reg_names))


def controls() -> list[Control]:
    """Every control of configs/cpu/*.yaml and FLAG_CONTROLS, by name."""
    found = [control(p.stem, yaml.safe_load(p.read_text())) for p in sorted(CPU_CONFIGS.glob("*.yaml"))]
    found += [control(name, cfg) for name, cfg in FLAG_CONTROLS.items()]
    return sorted((c for c in found if c is not None), key=lambda c: c.name)


def pairs(found: list[Control]) -> list[tuple[Control, Control]]:
    """Every unordered pair but two objectives (a run trains one: the CLI says so)."""
    return [(a, b) for a, b in itertools.combinations(found, 2) if not (a.kind == b.kind == "objective")]


def disagree(pair) -> list[str]:
    """The `model.loss` keys both controls' configs set, to different values (the later file's wins)."""
    a, b = ((c.config.get("model") or {}).get("loss") or {} for c in pair)
    return sorted(k for k in set(a) & set(b) if a[k] != b[k])


def pair_id(pair) -> str:
    return "+".join(c.name for c in pair)


class Warnings(logging.Handler):
    """The `lit_covrl` logger's warnings, kept while attached."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class StepLogger(Logger):
    """The metrics each RL step logged, {step: {name: value}} (the trainer's callback_metrics keep a
    value logged at an earlier step: a metric logged only when a step selects tokens would carry
    over into a step that selected none, and a resumed fit has no earlier step to carry it from)."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "stacking"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.steps.setdefault(step, {}).update({k: float(v) for k, v in metrics.items()})


@dataclass
class Outcome:
    refusal: str | None = None  # the start-up error, "<type>: <message>"
    warnings: list[str] = field(default_factory=list)  # lit_covrl's warnings
    steps: list[dict[str, float]] = field(default_factory=list)  # the logged metrics of each RL step


class StackRunner:
    """Fits of stacked controls through one CLI parser; config files written under `tmp`."""

    def __init__(self, tmp: Path, harness: dict | None = None, reuse_policies: bool = True) -> None:
        """`harness`: the last config of every run (HARNESS by default); `reuse_policies`: hand
        loaded models back to later runs (`_policy`); off where a fit changes a model for good
        (FSDP2 shards it in place)."""
        from lit_covrl.cli import LitCovRLCLI, _ArgumentParser
        from lit_covrl.data import PromptDataModule
        from lit_covrl.module import GRPOModule

        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.harness, self.reuse_policies = harness or HARNESS, reuse_policies
        self._policies: dict = {}
        self.model = None  # the last run's GRPOModule
        self.cli = LitCovRLCLI(GRPOModule, PromptDataModule, parser_class=_ArgumentParser, save_config_callback=None,
                               parser_kwargs={"parser_mode": "omegaconf"}, args=self._args([]), run=False)

    def _args(self, stack: list[Control]) -> list[str]:
        args = ["--config", str(BASE)]
        for c in stack:
            path = self.tmp / f"{c.name}.yaml"  # the config as read (FLAG_CONTROLS have no file)
            path.write_text(yaml.safe_dump(c.config))
            args += ["--config", str(path)]
        harness = self.tmp / "harness.yaml"  # one file parses faster than its flags
        checkpoint = {"dirpath": str(self.tmp / "ck"), **self.harness["checkpoint"]}  # the harness's dirpath wins
        # a run without a log folder writes what it writes (e.g. skipped_rows.txt) here, not in the working directory
        trainer = {"default_root_dir": str(self.tmp / "root"), **self.harness["trainer"]}
        harness.write_text(yaml.safe_dump({**self.harness, "trainer": trainer, "checkpoint": checkpoint}))
        return [*args, "--config", str(harness)]

    def _policy(self, spec: str, *, dtype: str):
        """`policy.load_policy` for the `i`-th model a run loads (policy, reference): each is read
        once and handed back to later runs as loaded (its weights, gradients and flags reset), as
        loading (or copying) the tiny model is a third of a 2-step fit and checks nothing of the stack."""
        from lit_covrl.policy import load_policy

        pool = self._policies.setdefault((spec, dtype), [])
        i, self._loaded = self._loaded, self._loaded + 1
        if i == len(pool):
            model = load_policy(spec, dtype=dtype)
            pool.append((model, {k: v.clone() for k, v in model.state_dict().items()}))
        model, weights = pool[i]
        model.load_state_dict(weights)
        for p in model.parameters():
            p.grad = None
        return model.train().requires_grad_(True)

    def run(self, *stack: Control, ckpt_path: str | None = None) -> Outcome:
        """Fit the stack for 2 RL steps (from `ckpt_path` when given): its metrics, or the start-up
        error that refused it."""
        from lit_covrl import cli as cli_module

        cli, warnings, log = self.cli, Warnings(), logging.getLogger("lit_covrl")
        self._loaded = 0
        cli_module._RUN.clear()
        log.addHandler(warnings)
        loads = mock.patch("lit_covrl.sharding.load_policy", self._policy) if self.reuse_policies else nullcontext()
        try:
            with loads:
                cli.parse_arguments(cli.parser, self._args(list(stack)))
                # LightningCLI keeps the first parse's config dump (`config_dump`) and gives it to every
                # later module and datamodule as their hparams: the data settings and the module's
                # hparams-read ones (model, dtype, correct_threshold) would stay the first run's
                vars(cli).pop("config_dump", None)
                cli.before_instantiate_classes()
                cli.instantiate_classes()
                cli_module._RUN["trainer"] = cli.trainer
                self.model = cli.model
                cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)
        except cli_module._STARTUP_ERRORS as err:
            if cli_module._past_start_up(cli_module._RUN.get("trainer")):
                raise
            return Outcome(refusal=f"{type(err).__name__}: {err}", warnings=warnings.messages)
        finally:
            log.removeHandler(warnings)
        logged = cli.trainer.logger.steps  # {step: metrics}
        return Outcome(steps=[logged[k] for k in sorted(logged)], warnings=warnings.messages)


def check_runs(pair, out: Outcome) -> list[str]:
    """What is wrong with a pair that ran: not 2 steps, a non-finite loss or metric, a regularizer
    of either control whose reg/<name>/loss is missing from a step (metrics by name: two of one
    name are refused), or a `model.loss` key both configs set to different values, the later
    file's silently trained (`cli_args.warn_replaced_loss_settings` must say so)."""
    problems = [] if len(out.steps) == 2 else [f"{len(out.steps)} RL steps ran, not 2"]
    for i, metrics in enumerate(out.steps):
        if not math.isfinite(metrics.get("policy/loss", math.nan)):
            problems.append(f"step {i}: policy/loss {metrics.get('policy/loss')}")
        problems += [f"step {i}: {k} = {v}" for k, v in metrics.items() if not math.isfinite(v)]
        problems += [f"step {i}: no reg/{n}/loss" for c in pair for n in c.reg_names if f"reg/{n}/loss" not in metrics]
    for key in disagree(pair):
        if not any(f"model.loss.{key}" in w and pair[0].name in w and pair[1].name in w for w in out.warnings):
            problems.append(f"both set model.loss.{key} and no warning says which value is trained")
    return problems


def names_both(pair, message: str) -> bool:
    """Whether `message` names each control of `pair` by a word the other does not share (a
    ReferenceKL in both configs names neither) or by its config file."""
    text = message.lower()
    # a control's config file names it too (a recipe holding the other's class, ar_lopti beside ar,
    # shares all of the other's words)
    a, b = ({w.lower() for w in c.words} | {f"/{c.name}.yaml"} for c in pair)
    return any(w in text for w in a - b) and any(w in text for w in b - a)


def refused_table(refused: set[str]) -> str:
    """The README's table of refused pairs (`a+b` ids): each under the first of its two names."""
    by_first: dict[str, list[str]] = {}
    for pair in sorted(refused):
        first, second = pair.split("+")
        by_first.setdefault(first, []).append(second)
    rows = [f"| `{a}` | {', '.join(f'`{b}`' for b in others)} |" for a, others in by_first.items()]
    return "\n".join([README_BEGIN, "| control | refused with |", "|---|---|", *rows, README_END])


def documented_refusals(readme: str) -> set[str]:
    """The `a+b` ids of the README's table of refused pairs (`refused_table`)."""
    table = readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0] if README_BEGIN in readme else ""
    out = set()
    for line in (row for row in table.splitlines() if row.startswith("| `")):
        first, others = (cell.strip() for cell in line.strip("|").split("|"))
        out |= {f"{first.strip('`')}+{b.strip().strip('`')}" for b in others.split(",")}
    return out


def main() -> None:
    logging.getLogger("lit_covrl").propagate = False  # warnings are collected, not printed
    found = controls()
    with tempfile.TemporaryDirectory() as tmp:
        runner = StackRunner(Path(tmp))
        refused = {pair_id(pair) for pair in pairs(found) if runner.run(*pair).refusal is not None}
    print(refused_table(refused))


if __name__ == "__main__":
    main()
