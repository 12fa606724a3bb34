"""What a run writes to TensorBoard besides its step metrics, so that the story comes first:

- a Custom Scalars layout (the CUSTOM SCALARS tab): "Learning" (train reward and accuracy,
  held-out pass@1 and pass@k), "Entropy" (policy and held-out entropy, each regularizer's
  coefficient), "Control" (each regularizer's selected fraction and loss contribution) and
  "Speed" (rollout and update seconds, rollout tokens per second, peak memory). Regularizers add
  their own charts (`Regularizer.charts()`), so a new control shows up without touching this file;
- the run's full resolved configuration as text (TEXT tab, tag `config`): the YAML the CLI saves
  as config.yaml, or the module's and datamodule's hyperparameters outside the CLI;
- the HPARAMS tab: the main settings (`run_hparams`) and the final figures, logged as scalars
  under `final/` when fit ends (FINAL_METRICS), so runs can be sorted and filtered by them;
- `method_name`: what ran, the first part of the CLI's run folder names (lit_covrl.run_names).

The hparams plugin takes its columns from the first experiment summary it finds (of any run)
and reads each metric as the last value of a scalar of that name in the run; of two summaries of
one tag in a run it keeps the first. So every run writes the same columns (MAIN_SETTINGS and
FINAL_METRICS) at `on_fit_start`, and `RunDashboard.setup` turns off Lightning's own summary
(TensorBoardLogger's `default_hp_metric` placeholder, a stray `hp_metric = -1` scalar plus
a second summary with every init argument). The final figures are written when fit ends, or at
the exception that stops it (Ctrl-C included; the session is then marked failed). Only global
rank 0 writes.
"""
from __future__ import annotations

import re

from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lit_covrl.regularizers.base import Regularizer

CATEGORIES = ("Learning", "Entropy", "Control", "Speed")
# the built-in charts: category -> [(title, [tag regexes])]; regularizers add theirs (charts())
BASE_CHARTS: dict[str, list[tuple[str, list[str]]]] = {
    "Learning": [
        ("train reward", ["rollout/reward_mean"]),
        ("train accuracy", ["rollout/accuracy"]),
        ("held-out pass@1", ["val/pass@1"]),
        ("held-out pass@k", ["val/pass@k"]),
    ],
    "Entropy": [
        ("policy entropy (token mean; mean of sequence means)", ["policy/entropy", "policy/entropy_seq_mean"]),
        ("held-out entropy", ["val/entropy"]),
    ],
    "Control": [],
    "Speed": [
        ("rollout seconds", ["time/rollout_s"]),
        ("update seconds", ["time/update_s"]),
        ("rollout tokens per second", ["rollout/tokens_per_s"]),
        ("peak memory GiB", ["time/peak_mem_gib"]),
    ],
}
# final figure (HPARAMS column, scalar tag) -> the step metric it summarizes
FINAL_METRICS = {
    "final/entropy": "policy/entropy",
    "final/val_entropy": "val/entropy",
    "final/reward_mean": "rollout/reward_mean",
    "final/accuracy": "rollout/accuracy",
    "final/val_pass@1": "val/pass@1",
    "final/val_pass@k": "val/pass@k",
    "final/best_val_pass@1": "val/pass@1",
    "final/best_val_pass@k": "val/pass@k",
}
# GRPOModule settings shown in the HPARAMS tab (the full configuration is in the TEXT tab):
# column -> key under `model` (the columns keep their short names, so runs from before the
# settings groups line up with later ones)
MAIN_SETTINGS = {
    "model": "model", "seed": "seed", "group_size": "rollout.group_size", "temperature": "rollout.temperature",
    "advantage": "loss.advantage", "baseline_quantile": "loss.baseline_quantile",
    "pass_k": "loss.pass_k", "unlikeliness": "loss.unlikeliness", "loss_agg_mode": "loss.loss_agg_mode",
    "mini_batch_size": "update.mini_batch_size", "ppo_epochs": "update.ppo_epochs",
    "max_new_tokens": "rollout.max_new_tokens", "filter_groups": "rollout.filter_groups",
    "overlong": "rollout.overlong",
    # what final/val_pass@k is: pass@eval_k from eval_samples answers per prompt at eval_temperature
    "eval_k": "eval.k", "eval_samples": "eval.samples", "eval_temperature": "eval.temperature",
}


def _get(hp, dotted: str):
    """hp["a"]["b"] for "a.b" (None where a key is missing)."""
    for part in dotted.split("."):
        hp = hp.get(part) if isinstance(hp, dict) else None
    return hp


def _regex(spec: str) -> str:
    """A chart entry as TensorBoard matches it: from the start of the tag (re.match) to its end."""
    return spec if spec.endswith("$") else spec + "$"


# charts of module settings that log their own tags, written only when the setting is on
SETTING_CHARTS = {
    "unlikeliness": ("Control", "unlikeliness reward (share of reward taken; correct responses' mean log-prob)",
                     ["adv/unlikeliness_penalty", "adv/unlikeliness_correct_seq_logp"]),
}


def layout(regularizers: list[Regularizer], settings: tuple[str, ...] = ()) -> dict[str, dict[str, list]]:
    """The Custom Scalars layout in `SummaryWriter.add_custom_scalars`' format:
    {category: {chart title: ["Multiline", [tag regexes]]}}. Built-in charts first, then those of
    the module `settings` that are on (`SETTING_CHARTS`), then each regularizer's, in the order of
    `trainer.callbacks`; a chart named twice appears once."""
    out: dict[str, dict[str, list]] = {c: {} for c in CATEGORIES}
    charts_on = [*BASE_CHARTS.items(), *((c, [(t, tags)]) for c, t, tags in map(SETTING_CHARTS.get, settings))]
    for category, charts in charts_on:
        for title, tags in charts:
            out[category][title] = ["Multiline", [_regex(re.escape(t)) for t in tags]]
    for reg in regularizers:
        for category, specs in reg.charts().items():
            for spec in specs:
                out.setdefault(category, {})[spec.replace("\\", "")] = ["Multiline", [_regex(spec)]]
    return {c: charts for c, charts in out.items() if charts}


def _settings_on(pl_module) -> tuple[str, ...]:
    """The `SETTING_CHARTS` keys whose module setting (model.loss.<key>) is on, i.e. not null."""
    loss = getattr(getattr(pl_module, "settings", None), "loss", None)
    return tuple(k for k in SETTING_CHARTS if getattr(loss, k, None) is not None)


def method_name(regularizer_names: list[str], objective: str | None = None, baseline_quantile=None,
                advantage: str | None = None, unlikeliness=None) -> str:
    """What ran: the objective's `run_name` (GSPO, CISPO, CE-GPPO, ASPO), 'qae' for a quantile baseline,
    'passk' for Pass@k Training's advantage, 'unlikeliness' for the unlikeliness reward and the
    regularizers' names, joined by '+'; 'grpo' for plain GRPO."""
    return "+".join([*([objective] if objective else []), *(["qae"] if baseline_quantile is not None else []),
                     *(["passk"] if advantage == "passk" else []),
                     *(["unlikeliness"] if unlikeliness is not None else []), *regularizer_names]) or "grpo"


def _describe(reg: Regularizer) -> str:
    """`name(setting=value, ...)` from the regularizer's scalar constructor settings (the
    parameters it keeps under the same name, `resume_check.describe`: running state, such as
    AdaptiveEntropyBonus' coefficient, is left out, so a resumed run reads as the run it
    continues) and its schedule."""
    from lit_covrl.resume_check import describe

    parts = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in describe(reg)["init_args"].items()
             if k != "name" and isinstance(v, (int, float, str, bool))]
    s = reg.schedule
    if s.name != "constant":
        parts.append(f"schedule={s.name}->{s.final:g}@{s.steps}")
    return f"{reg.name}({', '.join(parts)})"


def _hparam(value):
    """TensorBoard hparams take numbers, strings and bools; None becomes 'none' (not dropped,
    so every run has the same columns)."""
    return "none" if value is None else value if isinstance(value, (int, float, str, bool)) else str(value)


def run_hparams(trainer, pl_module) -> dict:
    """The main settings of a run, the same keys for every run (HPARAMS columns)."""
    regs = regularizers_of(trainer)
    hp = pl_module.hparams
    dm_hp = getattr(getattr(trainer, "datamodule", None), "hparams", {})
    group = trainer.optimizers[0].param_groups[0] if trainer.optimizers else {}
    objective = getattr(pl_module, "objective", None)
    out = {
        "method": method_name([r.name for r in regs], getattr(objective, "run_name", None),
                              _get(hp, "loss.baseline_quantile"), _get(hp, "loss.advantage"),
                              _get(hp, "loss.unlikeliness")),
        "regularizers": "; ".join(_describe(r) for r in regs) or "none",
        # the objective's clip range (model.loss.clip_* stay at their defaults when one is given)
        "objective": type(objective).__name__ if objective is not None else "none",
        "clip_low": getattr(objective, "clip_low", _get(hp, "loss.clip_low")),
        "clip_high": getattr(objective, "clip_high", _get(hp, "loss.clip_high")),
        **{col: _get(hp, key) for col, key in MAIN_SETTINGS.items()},
        "batch_size": dm_hp.get("batch_size"),
        "task": dm_hp.get("task"),
        "lr": group.get("initial_lr", group.get("lr")),  # initial_lr: before a scheduler's first factor
        "max_steps": trainer.max_steps,
        "world_size": trainer.world_size,
    }
    return {k: _hparam(v) for k, v in out.items()}


def config_text(trainer, pl_module) -> str:
    """The run's full resolved configuration as Markdown (a YAML code block)."""
    from lightning.pytorch.cli import SaveConfigCallback

    saver = next((cb for cb in trainer.callbacks if isinstance(cb, SaveConfigCallback)), None)
    if saver is not None:  # what the CLI writes to config.yaml
        body = saver.parser.dump(saver.config, skip_none=False)
    else:
        import yaml

        def plain(d) -> dict:
            return {k: plain(v) if isinstance(v, dict) else v if isinstance(v, (int, float, str, bool, type(None)))
                    else repr(v) for k, v in dict(d).items()}

        dm = getattr(trainer, "datamodule", None)
        cfg = {
            "model": {"class_path": type(pl_module).__qualname__, **plain(pl_module.hparams)},
            "data": {"class_path": type(dm).__qualname__, **plain(getattr(dm, "hparams", {}))} if dm is not None else None,
            "callbacks": [_describe(cb) if isinstance(cb, Regularizer) else type(cb).__qualname__ for cb in trainer.callbacks],
            "trainer": {"max_steps": trainer.max_steps, "world_size": trainer.world_size},
        }
        body = yaml.safe_dump(cfg, sort_keys=False, width=120)
    return f"```yaml\n{body.rstrip()}\n```"


def regularizers_of(trainer) -> list[Regularizer]:
    return [cb for cb in trainer.callbacks if isinstance(cb, Regularizer)]


def _tensorboard_loggers(trainer) -> list[TensorBoardLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


class RunDashboard(Callback):
    """Writes the layout, the configuration text and the hparams of a fit, tracks the best
    held-out pass@1 / pass@k, and logs the final figures under `final/` when fit ends.
    GRPOModule adds it to every fit (`configure_callbacks`)."""

    def __init__(self) -> None:
        self.best: dict[str, float] = {}  # val/pass@1, val/pass@k -> best value so far (resumes)
        self.last_val: dict[str, float] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        for lg in _tensorboard_loggers(trainer):
            # Lightning's placeholder hparams summary (hp_metric = -1, every init argument a column)
            # would be the one TensorBoard keeps: ours (on_fit_start) replaces it in a fit, and a
            # validate / test run in the same log folder must not bring it back for every run.
            lg._default_hp_metric = False

    def on_fit_start(self, trainer, pl_module) -> None:
        # Without a TensorBoard logger there is nothing to write, and `tensorboard` need not be
        # installed at all (a bare GPU machine runs tools/bench_gpu.py with `logger=False`).
        if not trainer.is_global_zero or not _tensorboard_loggers(trainer):
            return
        from torch.utils.tensorboard.summary import hparams

        regs = regularizers_of(trainer)
        text = config_text(trainer, pl_module)
        exp, ssi, _ = hparams(run_hparams(trainer, pl_module), {k: 0.0 for k in FINAL_METRICS})
        for lg in _tensorboard_loggers(trainer):
            writer = lg.experiment
            writer.add_custom_scalars(layout(regs, _settings_on(pl_module)))
            writer.add_text("config", text)
            writer._get_file_writer().add_summary(exp)
            writer._get_file_writer().add_summary(ssi)
            writer.flush()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        for tag in ("val/pass@1", "val/pass@k", "val/entropy"):
            value = trainer.callback_metrics.get(tag)
            if value is None:
                continue
            self.last_val[tag] = float(value)
            if tag != "val/entropy":
                self.best[tag] = max(self.best.get(tag, float("-inf")), float(value))

    def final_figures(self, trainer) -> dict[str, float]:
        """The FINAL_METRICS known at the end of fit (held-out ones only if a validation ran)."""
        cm = trainer.callback_metrics
        out = {}
        for name, tag in FINAL_METRICS.items():
            if name.startswith("final/best_"):
                value = self.best.get(tag)
            elif tag.startswith("val/"):
                value = self.last_val.get(tag)
            else:
                value = float(cm[tag]) if tag in cm else None
            if value is not None:
                out[name] = value
        return out

    def on_fit_end(self, trainer, pl_module) -> None:
        self._finish(trainer, success=True)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if trainer.state.fn == "fit":
            try:
                self._finish(trainer, success=False)
            except Exception:  # never mask the exception that stopped the run
                pass

    def _finish(self, trainer, *, success: bool) -> None:
        """Log the final figures at the last RL step and close the hparams session."""
        if not trainer.is_global_zero or not _tensorboard_loggers(trainer):
            return
        final = self.final_figures(trainer)
        end = _session_end(success)
        for lg in _tensorboard_loggers(trainer):
            if final:
                # at the last RL step's metrics (a step's metrics go to global_step - 1, after its updates)
                lg.log_metrics(final, step=max(trainer.global_step - 1, 0))
            lg.experiment._get_file_writer().add_summary(end)
            lg.experiment.flush()

    def state_dict(self) -> dict:
        return {"best": dict(self.best), "last_val": dict(self.last_val)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = dict(state_dict.get("best", {}))
        self.last_val = dict(state_dict.get("last_val", {}))


def _session_end(success: bool):
    """The hparams plugin's session-end summary with status success or failure."""
    import time

    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo

    info = SessionEndInfo(status=api_pb2.STATUS_SUCCESS if success else api_pb2.STATUS_FAILURE,
                          end_time_secs=time.time())
    content = HParamsPluginData(session_end_info=info, version=metadata.PLUGIN_DATA_VERSION)
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
        plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString()))
    return Summary(value=[Summary.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=meta)])
