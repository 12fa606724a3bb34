"""`lit-covrl` console script: LightningCLI over GRPOModule + PromptDataModule.

    lit-covrl fit --config configs/quickstart.yaml
    lit-covrl fit --config configs/quickstart.yaml --config configs/cpu/clip_cov.yaml --trainer.max_steps 50
    lit-covrl export runs/quickstart/version_0/checkpoints/last.ckpt out/hf-model

A configuration or data error found at start-up (before the first batch) prints one line,
`lit-covrl: error: ...` naming the field or file:line, and exits with status 2;
LIT_COVRL_DEBUG=1 shows the traceback instead.

YAML is parsed with omegaconf (`${...}` interpolation is resolved when a file is loaded, so a
later command-line override does not flow into keys interpolated from it).
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from argparse import ArgumentError

import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ProgressBar
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

from lit_covrl.checkpointing import AtomicCheckpoint
from lit_covrl.dashboard import name_run
from lit_covrl.errors import debugging, exit_with
from lit_covrl.data import PromptDataModule
from lit_covrl.module import GRPOModule
from lit_covrl.progress import RLProgressBar
from lit_covrl.regularizers.base import Regularizer, check_unique_names
from lit_covrl.settings import moved_key_hint
from lit_covrl.sharding import check_checkpoint_strategy

log = logging.getLogger("lit_covrl")


class LitCovRLCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # always-on checkpointing, configured under `checkpoint:`; keeps `trainer.callbacks` free
        # for the regularizers, so method configs can be stacked on a base config. Atomic files and
        # `checkpoint.on_write_error` (stop | warn): lit_covrl.checkpointing
        parser.add_lightning_class_args(AtomicCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 50})
        # the module's implicit reward (null = exact match) made explicit, so that printed configs
        # show it and `--model.reward+=X` adds X to it instead of replacing it
        parser.set_defaults({"model.reward": {"class_path": "lit_covrl.rewards.ExactMatchReward"}})
        parser.add_argument(
            "--torch_threads", type=int | None, default=None,
            help="torch intra-op threads (null = torch's default). On small CPUs 1 per process is steadiest.",
        )

    def parse_arguments(self, parser, args) -> None:
        """As LightningCLI's, with the `trainer.callbacks` of stacked `--config` files appended
        instead of replaced (see `stack_config_callbacks`), a bare value of a string-list key read
        as one string (`one_string_lists`), and a switched objective or sampler class starting
        from its own defaults (`reset_switched_classes`)."""
        if args is None or isinstance(args, (list, tuple)):
            args = list(sys.argv[1:] if args is None else args)
            check_moved_keys(args)
            args = reset_switched_classes(one_string_lists(args))
            self._given_args = stack_config_callbacks(args)
            self.config = parser.parse_args(self._given_args)
        else:
            self._given_args = None
            super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Lightning fills `model` from a checkpoint file's hyperparameters over everything parsed,
        so a `--model.*` flag or a `--config` given with `--ckpt_path` (another `model.eval`
        temperature, a changed setting on resume) was silently replaced. Here the checkpoint's
        values are defaults: the arguments given apply over them, and a warning names the
        settings that differ from the checkpoint's."""
        parsed = self.config
        super()._parse_ckpt_path()
        if self.config is parsed or getattr(self, "_given_args", None) is None:
            return  # no checkpoint file, or no hyperparameters in it
        from_ckpt, sub = self.config, self.config["subcommand"]
        # the subcommand's defaults with the checkpoint's model settings: a fresh start, so that
        # appending arguments (`--trainer.callbacks+=X`) are not applied twice
        start = self.parser._subcommands_action._name_parser_map[sub].get_defaults()
        start["model"] = from_ckpt[sub]["model"].clone()
        self.config = self.parser.parse_args(self._given_args, namespace=Namespace(subcommand=sub, **{sub: start}))
        changed = _changed_model_keys(from_ckpt[sub].get("model"), self.config[sub].get("model"))
        if changed and sub != "fit":  # a fit names them with their values when it starts (resume_check)
            log.warning("--ckpt_path: the arguments given change %d of the checkpoint's model settings: %s",
                        len(changed), ", ".join(changed[:8]) + (", ..." if len(changed) > 8 else ""))

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config)
        threads = cfg.get("torch_threads")
        if threads is not None and threads < 1:
            raise ValueError(f"torch_threads={threads} must be >= 1 (or null: torch's default)")
        # runs/<name>/<method>-<config stems>-v<N> unless a version is given
        self._generated_version = name_run(cfg)
        if threads:
            import torch

            torch.set_num_threads(threads)

    def after_instantiate_classes(self) -> None:
        """The generated run name is not part of the saved config.yaml: re-running a run's saved
        config then names a new run instead of writing into (and over) that run's folder."""
        if getattr(self, "_generated_version", None) is not None:
            cfg = self.config.get(self.subcommand, self.config)
            cfg.trainer.logger.init_args.version = None

    def _run_subcommand(self, subcommand: str) -> None:
        check_checkpoint_strategy(self.config_init[subcommand].get("ckpt_path"), self.trainer.strategy)
        super()._run_subcommand(subcommand)

    def _instantiate_trainer(self, config: dict, callbacks: list):
        """The RL-step progress bar unless the config brings its own or disables the bar. Two
        regularizers with one name are refused first, with our message: for stateful ones (Clip-Cov,
        the adaptive bonus) Lightning's own state_key check would otherwise fail in Trainer()."""
        check_unique_names([c for c in _config_callbacks(config) if isinstance(c, Regularizer)])
        trainer = super()._instantiate_trainer(_with_rl_progress_bar(config), callbacks)
        _RUN["trainer"] = trainer
        return trainer


def _changed_model_keys(before, after, prefix: str = "model") -> list[str]:
    """Dotted keys whose values differ between two parsed `model` configs."""
    to_dict = lambda x: x.as_dict() if hasattr(x, "as_dict") else x  # noqa: E731
    before, after = to_dict(before), to_dict(after)
    if not isinstance(before, dict) or not isinstance(after, dict):
        return [] if before == after else [prefix]
    return [k for key in sorted(set(before) | set(after))
            for k in _changed_model_keys(before.get(key), after.get(key), f"{prefix}.{key}")]


def _config_callbacks(config: dict) -> list:
    """The trainer config's `callbacks`, as a list (one callback may be given bare)."""
    given = config.get("callbacks") or []
    return given if isinstance(given, list) else [given]


def _with_rl_progress_bar(config: dict) -> dict:
    given = _config_callbacks(config)
    if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
        config = {**config, "callbacks": [*given, RLProgressBar()]}
    return config


_DESCRIPTION = ("GRPO with entropy control. Subcommands: fit, validate, test, and "
                "`lit-covrl export CKPT OUT` (checkpoint -> Hugging Face folder; see `lit-covrl export --help`).")


# ----------------------------------------------------------------------------- start-up errors

_RUN: dict = {}  # the trainer of the current run, to tell start-up errors from later ones
_STARTUP_ERRORS = (ArgumentError, ValueError, TypeError, OSError, ImportError, MisconfigurationException)


def _past_start_up(trainer) -> bool:
    """True once a train, validation or test batch has started (errors then are not start-up errors)."""
    if trainer is None:
        return False
    loops = [trainer.fit_loop.epoch_loop, trainer.fit_loop.epoch_loop.val_loop, trainer.validate_loop, trainer.test_loop]
    return any(loop.batch_progress.total.started > 0 for loop in loops)


def _config_paths(args: list[str]) -> list[tuple[int, str]]:
    """(index of the last argument of each `--config PATH` / `--config=PATH`, PATH), in order
    (`-c`, Lightning's short form, too)."""
    out = []
    for i, a in enumerate(args):
        if a in ("--config", "-c") and i + 1 < len(args):
            out.append((i + 1, args[i + 1]))
        elif a.startswith(_CONFIG_EQ):
            out.append((i, a.split("=", 1)[1]))
    return out


_CONFIG_EQ = ("--config=", "-c=")


def _file_callbacks(path: str) -> list | None:
    """The `trainer.callbacks` list of a YAML config file (interpolations resolved), if any."""
    from omegaconf import OmegaConf

    if not os.path.isfile(path):
        return None  # not a file (an inline YAML string, or missing): the parser reports it
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    callbacks = (cfg.get("trainer") or {}).get("callbacks") if isinstance(cfg, dict) else None
    if callbacks is None:
        return None
    return callbacks if isinstance(callbacks, list) else [callbacks]


def _file_model(path: str) -> dict:
    """The `model:` (or `model.init_args:`) mapping of a YAML config file ({} if none)."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        cfg = yaml.safe_load(f)
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if isinstance(model, dict) and isinstance(model.get("init_args"), dict):
        model = model["init_args"]
    return model if isinstance(model, dict) else {}


def _file_model_keys(path: str) -> list[str]:
    """The keys under `model:` (or `model.init_args:`) of a YAML config file."""
    return list(_file_model(path))


def check_moved_keys(args: list[str]) -> None:
    """A flat key that moved into a settings group (`model.group_size` -> `model.rollout.group_size`),
    given in a `--config` file or on the command line, is refused with the new key named (before
    parsing, whose own message would only say the key is unknown)."""
    for index, path in _config_paths(args):
        for key in _file_model_keys(path):
            if (hint := moved_key_hint(key)) is not None:
                raise ValueError(f"{path}: {hint} (see the README's \"Moved keys\")")
    for a in args:
        if a.startswith("--model."):
            key = a[len("--model."):].split("=", 1)[0].removeprefix("init_args.").split(".")[0]
            if (hint := moved_key_hint(key)) is not None:
                raise ValueError(f"--model.{key}: {hint} (see the README's \"Moved keys\")")


# keys typed `list[str] | None` (lit_covrl.settings.RolloutSettings, PromptDataModule)
STRING_LIST_KEYS = ("model.rollout.stop", "data.train_files", "data.val_files")
_NULLS = ("null", "Null", "NULL", "~")


def _flag_key(arg: str) -> str:
    """`--model.init_args.rollout.stop+=x` -> `model.rollout.stop+` (the key as given, without
    init_args); "" for an argument that is not a `--` flag."""
    if not arg.startswith("--"):
        return ""
    return re.sub(r"\.init_args(?=\.)", "", arg.split("=", 1)[0][2:])


def _one_string(value: str, append: bool) -> str:
    """A string-list flag's value as jsonargparse should read it (see `one_string_lists`)."""
    if value.startswith("[") or (not append and value in _NULLS):
        return value
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        try:
            quoted = yaml.safe_load(value)
        except yaml.YAMLError:
            quoted = None
        value = quoted if isinstance(quoted, str) else value
    return json.dumps([value])


def one_string_lists(args: list[str]) -> list[str]:
    """A value of a string-list key (STRING_LIST_KEYS: `model.rollout.stop`, `data.train_files`,
    `data.val_files`) given on the command line is one string unless it is a list literal:
    `--model.rollout.stop+=####` (or `+ ####`) appends "####", `--model.rollout.stop=####` (or
    ` ####`) sets ["####"]. jsonargparse reads such values as YAML, where `####` or `# Answer:`
    is a comment (null: the whole list was cleared, silently) and `~` is null. The rule:
    a value starting with `[` is a YAML list (`[END]` is ["END"]; `'["[END]"]'` is the string);
    after `=` or a space, `null` (or `~`) clears the list; a value in matching quotes is a YAML
    quoted string (`'"\n\n"'` is two newlines, `"####"` is ####); anything else is taken
    verbatim, `#`, `:` and spaces included."""
    out, i = [], 0
    while i < len(args):
        arg, key = args[i], _flag_key(args[i])
        name, append = key.removesuffix("+"), key.endswith("+")
        if name in STRING_LIST_KEYS and "=" in arg:
            out.append(f"{arg.split('=', 1)[0]}={_one_string(arg.split('=', 1)[1], append)}")
        elif name in STRING_LIST_KEYS and i + 1 < len(args) and not args[i + 1].startswith("-"):
            out += [arg, _one_string(args[i + 1], append)]
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


# single-class keys of the model whose init_args belong to the class (the optimizer is not one:
# its `lr` carries over to another optimizer class, as in Lightning's CLI)
CLASS_KEYS = ("model.objective", "model.sampler")


def _class_of(value) -> str | None:
    """The class a value of a CLASS_KEYS key names: its class (path), "" for null, None for no
    class (init_args only). A flag's value may be a dict in YAML or JSON."""
    if isinstance(value, str) and value.startswith("{"):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return None
    if value is None or value in _NULLS:
        return ""
    if isinstance(value, dict):
        value = value.get("class_path")
    return value if isinstance(value, str) else None


def _class_sources(args: list[str]) -> list[tuple[int, str, str]]:
    """(index of the argument to insert a reset before, key, class or "" for null) for each
    `--config` file or flag that names a class of a CLASS_KEYS key, in order."""
    out = []
    for index, path in _config_paths(args):
        start = index if args[index].startswith(_CONFIG_EQ) else index - 1  # `--config PATH`: at `--config`
        model = _file_model(path)
        fields = [(key, key.removeprefix("model.")) for key in CLASS_KEYS]
        out += [(start, key, _class_of(model[field])) for key, field in fields if field in model]
    for i, arg in enumerate(args):
        key = _flag_key(arg).removesuffix(".class_path")
        if key in CLASS_KEYS and ("=" in arg or i + 1 < len(args)):
            out.append((i, key, _class_of(arg.split("=", 1)[1] if "=" in arg else args[i + 1])))
    return sorted(source for source in out if source[2] is not None)


def reset_switched_classes(args: list[str]) -> list[str]:
    """A `--config` file or flag that switches `model.objective` or `model.sampler` to another
    class (`--config gspo.yaml --model.objective CISPO`) starts that class from its own
    defaults: `--KEY=null` is put before it. jsonargparse would otherwise carry the earlier
    class's init_args over (CISPO with GSPO's clip range of 3e-4/4e-4)."""
    current: dict[str, str] = {}
    resets = []
    for index, key, cls in _class_sources(args):
        before = current.get(key)
        if before and cls and before.rpartition(".")[2] != cls.rpartition(".")[2]:
            resets.append((index, key))
        current[key] = cls
    for index, key in sorted(resets, reverse=True):
        args = [*args[:index], f"--{key}=null", *args[index:]]
    return args


def stack_config_callbacks(args: list[str]) -> list[str]:
    """Make stacked method configs add up: `--config base.yaml --config clip_cov.yaml --config
    entropy_bonus.yaml` trains with every regularizer named in any of them. A YAML list in a later
    file would otherwise replace the earlier one (jsonargparse merges dicts, not lists). When two
    or more files set `trainer.callbacks`, their lists are concatenated in file order and passed
    once, right after the last `--config`, so later command-line arguments
    (`--trainer.callbacks+=...`, `--trainer.callbacks.ratio=...`) still apply on top. Such an
    argument given before a `--config` file that sets `trainer.callbacks` would be replaced by
    that file's list: it is refused, with the place to put it."""
    paths = _config_paths(args)
    setting = [(index, path, cbs) for index, path in paths if (cbs := _file_callbacks(path)) is not None]
    if setting:
        index, path, _ = setting[-1]
        early = next((a for a in args[:index] if _flag_key(a).startswith("trainer.callbacks")), None)
        if early is not None:
            raise ValueError(f"{early.split('=', 1)[0]}: given before --config {path}, whose trainer.callbacks "
                             "replace it; put it after the last --config")
    if len(setting) < 2:
        return args
    merged = [cb for _, _, cbs in setting for cb in cbs]
    last = paths[-1][0]
    # YAML, not JSON: JSON has no .inf / .nan (ClipCov's `ub: .inf`)
    flow = yaml.safe_dump(merged, default_flow_style=True, sort_keys=False, width=float("inf")).strip()
    return [*args[: last + 1], f"--trainer.callbacks={flow}", *args[last + 1 :]]


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["export"]:
        from lit_covrl.export import main as export_main

        return export_main(argv[1:])
    logging.getLogger("lit_covrl").setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.getcwd() not in sys.path:  # dotted paths of your rewards/tasks resolve from where you run
        sys.path.append(os.getcwd())
    _RUN.clear()
    debug = debugging()
    try:
        LitCovRLCLI(
            GRPOModule,
            PromptDataModule,
            parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": debug, "description": _DESCRIPTION},
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except _STARTUP_ERRORS as err:
        if debug or _past_start_up(_RUN.get("trainer")):
            raise
        exit_with(err)


if __name__ == "__main__":
    main()
