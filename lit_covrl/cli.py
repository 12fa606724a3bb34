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

import functools
import logging
import os
import re
import shutil
import sys
import time
from argparse import ArgumentError
from pathlib import Path

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ProgressBar
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_covrl.checkpointing import AtomicCheckpoint
from lit_covrl.cli_args import (
    check_moved_keys, config_file_with_key, flag_as_given, one_string_lists, reset_switched_classes,
    name_setting_sources, stack_config_callbacks, warn_replaced_loss_settings,
)
from lit_covrl.run_names import last_checkpoint, name_run
from lit_covrl.errors import InitFailures, class_argument, debugging, exit_with, unknown_settings
from lit_covrl.data import PromptDataModule
from lit_covrl.module import GRPOModule
from lit_covrl.progress import RLProgressBar
from lit_covrl.model_specs import absolute_local_path
from lit_covrl.regularizers.base import Regularizer, check_stack
from lit_covrl.sharding import check_checkpoint_strategy

log = logging.getLogger("lit_covrl")


_INTERPOLATION = re.compile(r"(\\*)\$\{")  # a `${` and the backslashes right before it


def escape_interpolations(value):
    """`value` with every `${` in its strings written `\\${` and the backslashes right before it
    doubled. Files are read with omegaconf, which resolves `${...}` when a file is loaded, so a
    printed or saved config holds resolved values: a `${` left in it came from the command line
    (`--data.system_prompt 'Cost is ${x}'`) or was escaped in a file, and a backslash before it is a
    literal backslash (`'a\\${x}'`). Both must read back as they are, or the file fails on a missing
    key or silently loses the backslash (omegaconf reads `\\${` as `${` and `\\\\` before `${` as `\\`)."""
    if isinstance(value, str):
        return _INTERPOLATION.sub(lambda m: m.group(1) * 2 + r"\${", value)
    if isinstance(value, Namespace):
        out = value.clone()
        for key in value.keys():
            out[key] = escape_interpolations(value[key])
        return out
    if isinstance(value, dict):
        return {k: escape_interpolations(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(escape_interpolations(v) for v in value)
    return value


class _ArgumentParser(LightningArgumentParser):
    """Lightning's parser whose dumps (`--print_config`, the run's config.yaml) read back to the
    values they print (`escape_interpolations`), with no abbreviated options: argparse took
    `--model.loss.unlik 0.5` for `--model.loss.unlikeliness 0.5`, so a misspelt setting could
    silently set another one."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def dump(self, cfg, *args, **kwargs) -> str:
        if "skip_none" in kwargs:  # Lightning's SaveConfigCallback still passes jsonargparse's old name
            kwargs["skip_unset"] = kwargs.pop("skip_none")
        return super().dump(escape_interpolations(cfg), *args, **kwargs)


class LitCovRLCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's, without `predict`: GRPOModule has no predict_step (answers to held-out
        prompts are sampled by validate / test); it was listed and failed with a MisconfigurationException."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def add_arguments_to_parser(self, parser) -> None:
        # always-on checkpointing, configured under `checkpoint:`; keeps `trainer.callbacks` free
        # for the regularizers, so method configs can be stacked on a base config. Atomic files and
        # `checkpoint.on_write_error` (stop | warn): lit_covrl.checkpointing
        parser.add_lightning_class_args(AtomicCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 50})
        # the module's implicit reward (null = exact match) made explicit, so that printed configs
        # show it and `--model.reward+=X` adds X to it instead of replacing it
        parser.set_defaults({"model.reward": {"class_path": "lit_covrl.rewards.ExactMatchReward"}})
        # an RL step is minutes on a real model: its tags are written every step (Lightning's own
        # default of 50 left a run's own base config with one point per 50 RL steps, silently)
        parser.set_defaults({"trainer.log_every_n_steps": 1})
        parser.add_argument(
            "--torch_threads", type=int | None, default=None,
            help="torch intra-op threads (null = torch's default). On small CPUs 1 per process is steadiest.",
        )

    def parse_arguments(self, parser, args) -> None:
        """As LightningCLI's, with the `trainer.callbacks` of stacked `--config` files appended
        instead of replaced (see `stack_config_callbacks`), a bare value of a string-list key read
        as one string (`one_string_lists`), and a switched objective or sampler class starting
        from its own defaults (`reset_switched_classes`). A misspelt setting is named with the
        closest one (`unknown_settings`, `class_argument`)."""
        if args is None or isinstance(args, (list, tuple)):
            args = list(sys.argv[1:] if args is None else args)
            check_moved_keys(args)
            args = reset_switched_classes(one_string_lists(args))
            warn_replaced_loss_settings(args)
            self._given_args = stack_config_callbacks(args)
            try:
                self.config = parser.parse_args(self._given_args)
            except ArgumentError as err:
                keys = [a.dest for a in _command_parser(parser, self._given_args)._actions]
                file_of = functools.partial(config_file_with_key, self._given_args)
                text = (unknown_settings(str(err), keys, file_of, self._given_args)
                        or class_argument(str(err), file_of, functools.partial(flag_as_given, self._given_args)))
                if text is None:
                    raise
                raise ArgumentError(None, text) from err
        else:
            self._given_args = None
            super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """`--ckpt_path last` resolved to the newest earlier run's last.ckpt (`last_checkpoint`),
        then the checkpoint's hyperparameters read (`_read_ckpt_settings`)."""
        sub = self.config.get("subcommand")
        last = last_checkpoint(self.config[sub]) if sub and self.config[sub].get("ckpt_path") == "last" else None
        if last is not None:
            log.info("--ckpt_path last: %s", last)
            self.config[sub]["ckpt_path"] = last
        self._read_ckpt_settings()
        if last is not None:  # the arguments re-parsed over the checkpoint's settings say "last" again
            self.config[sub]["ckpt_path"] = last

    def _read_ckpt_settings(self) -> None:
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
        # appending arguments (`--trainer.callbacks+=X`, `--model.reward+=X`: the reward is not
        # saved, `from_ckpt` holds the parsed one) are not applied twice
        start = self.parser._subcommands_action._name_parser_map[sub].get_defaults()
        default_reward = start["model"]["reward"]
        start["model"] = from_ckpt[sub]["model"].clone()
        start["model"]["reward"] = default_reward
        self.config = self.parser.parse_args(self._given_args, namespace=Namespace(subcommand=sub, **{sub: start}))
        _drop_switched_pass_k(from_ckpt[sub].get("model"), self.config[sub].get("model"))
        _drop_unpaired_reward_weights(parsed[sub].get("model"), default_reward, self.config[sub].get("model"))
        changed = _changed_model_keys(from_ckpt[sub].get("model"), self.config[sub].get("model"))
        if changed and sub != "fit":  # a fit names them with their values when it starts (resume_check)
            log.warning("--ckpt_path: the arguments given change %d of the checkpoint's model settings: %s",
                        len(changed), ", ".join(changed[:8]) + (", ..." if len(changed) > 8 else ""))

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config)
        threads = cfg.get("torch_threads")
        if threads is not None and threads < 1:
            raise ValueError(f"torch_threads={threads} must be >= 1 (or null: torch's default)")
        # runs/<name>/<method>-<config stems>-v<N> unless a version is given, its folder made now
        # (by rank 0) so that runs started at once take different numbers; not under fast_dev_run,
        # whose dummy logger writes nothing there
        reserve = _first_process() and not cfg.get("trainer", {}).get("fast_dev_run")
        self._generated_version, _RUN["new_folders"] = name_run(cfg, reserve=reserve)
        # a relative local model folder by its absolute path: the module's hparams (and so its
        # checkpoints, read by `export` or `load_from_checkpoint` from elsewhere) are the CLI's values
        model_cfg = cfg.get("model")
        for key in ("model", "tokenizer", "reference_model") if model_cfg is not None else ():
            if isinstance(model_cfg.get(key), str):
                model_cfg[key] = absolute_local_path(model_cfg[key])
        if threads:
            import torch

            torch.set_num_threads(threads)

    def instantiate_classes(self) -> None:
        """As LightningCLI's; a settings error naming model keys that stacked `--config` files set
        says which file set each (`name_setting_sources`), so that a refused pair names both; a
        reward class whose constructor raised is named with that exception's type and text."""
        failures = InitFailures()
        self.parser.add_instantiator(failures, object, subclasses=True)  # after Lightning's own
        try:
            super().instantiate_classes()
        except Exception as err:
            model = self.config.get(self.subcommand, self.config).get("model")
            if model is not None and (text := failures.reward_error(err, model.get("reward"))) is not None:
                raise ValueError(text) from err
            if not isinstance(err, ValueError):
                raise
            text = name_setting_sources(str(err), getattr(self, "_given_args", None) or [])
            if text is None or type(err) is not ValueError:
                raise
            raise ValueError(text) from err

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
        check_stack([c for c in _config_callbacks(config) if isinstance(c, Regularizer)])
        trainer = super()._instantiate_trainer(_with_rl_progress_bar(config), callbacks)
        _RUN["trainer"] = trainer
        log_dir = _log_dir(trainer)
        # the logger will make it (rank 0's: the other ranks log into rank 0's folder)
        if not _RUN.get("new_folders") and log_dir and not os.path.isdir(log_dir) and _first_process():
            _RUN["new_folders"] = [p for p in (log_dir, *map(str, Path(log_dir).parents)) if not os.path.isdir(p)]
        return trainer


def _command_parser(parser, args: list[str]):
    """The parser of the subcommand named in `args` (`fit`), or `parser` itself without subcommands."""
    commands = getattr(parser._subcommands_action, "_name_parser_map", None) or {}
    return next((commands[a] for a in args if a in commands), parser)


def _first_process() -> bool:
    """False in the other ranks of a multi-process run (Lightning's launcher, torchrun and srun
    start them with a rank set): they log into rank 0's folder and must not take a number."""
    return all(int(os.environ.get(key) or 0) == 0 for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _drop_switched_pass_k(before, after) -> None:
    """`model.loss.pass_k` is the k of advantage 'passk' only: arguments that switch a Pass@k
    checkpoint's advantage to another (configs/quickstart.yaml's `advantage: grpo`) and leave its
    k as it was drop the k with it, as `--model.loss.pass_k null` does, instead of failing on a k
    the user never gave."""
    old, new = (getattr(m, "loss", None) for m in (before, after))
    if old is None or new is None or old.get("advantage") != "passk" or new.get("advantage") == "passk":
        return
    if new.get("pass_k") == old.get("pass_k"):
        new["pass_k"] = None


def _drop_unpaired_reward_weights(given, default_reward, after) -> None:
    """A checkpoint saves `model.reward_weights` but not the rewards they weigh (a reward is not a
    saved setting): arguments that give no weights, and no reward (the default exact match) or
    rewards of another count, drop the checkpoint's weights, as `--model.reward_weights null` does,
    instead of failing on weights the user never gave. The run's own config gives both and keeps them."""
    if given is None or after is None or given.get("reward_weights") is not None or after.get("reward_weights") is None:
        return
    reward = given.get("reward")
    if reward == default_reward or len(reward if isinstance(reward, list) else [reward]) != len(after["reward_weights"]):
        after["reward_weights"] = None


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


def _log_dir(trainer) -> str | None:
    return getattr(getattr(trainer, "logger", None), "log_dir", None) if trainer is not None else None


def _remove_run_folder(written_since: float | None = None) -> None:
    """Remove the run folder this process made (reserved when the name was chosen, or one its logger
    made; never one that existed before, such as an explicit logger version's) when the run stopped
    without using it, with the folders made above it that are left empty. Each failed attempt took a
    version number, so the next real run was `-v3` where the README's commands name `-v0`. Other
    ranks made none (`_first_process`).

    With `written_since` (the run stopped before its first batch: a start-up error, Ctrl-C while the
    model loads) the folder goes even though it holds config.yaml and an empty event file, provided
    everything in it was written since then and it holds no checkpoint; without (the run got further)
    only an empty folder goes."""
    log_dir, *_ = _RUN.get("new_folders") or [None]
    if written_since is not None and log_dir and os.path.isdir(log_dir):
        entries = [os.path.join(root, name) for root, dirs, files in os.walk(log_dir) for name in dirs + files]
        if not any(os.path.basename(p) == "checkpoints" or os.path.getmtime(p) < written_since for p in entries):
            if any(os.path.basename(p) == "skipped_rows.txt" for p in entries):  # named in the log above
                log.warning("the run stopped at start-up: its folder %s is removed, with the skipped_rows.txt "
                            "named above (the run that gets past start-up writes it again)", log_dir)
            shutil.rmtree(log_dir, ignore_errors=True)
    for folder in _RUN.get("new_folders") or []:
        try:
            os.rmdir(folder)  # only an empty one
        except FileNotFoundError:  # the logger never made it, or it was just removed
            continue
        except OSError:  # written into, or another run's folder appeared next to it
            return


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
    started = time.time()
    debug = debugging()
    try:
        LitCovRLCLI(
            GRPOModule,
            PromptDataModule,
            parser_class=_ArgumentParser,
            parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": debug, "description": _DESCRIPTION},
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except BaseException as err:  # a start-up error, Ctrl-C (or Lightning's exit after one), any other error
        if debug or _past_start_up(_RUN.get("trainer")):
            _remove_run_folder()
            raise
        # stopped before its first batch, e.g. while the model loads: config.yaml and an empty event file
        _remove_run_folder(written_since=started)
        if not isinstance(err, _STARTUP_ERRORS):
            raise
        exit_with(err)


if __name__ == "__main__":
    main()
