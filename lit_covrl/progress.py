"""The training progress bar in RL steps: "RL step 37/200", not Lightning's "Epoch 0" over an
endless stream (`max_epochs=-1` shows as "Epoch 0/-2" in some Lightning versions).

Every `training_step` of GRPOModule is one RL step (rollout + updates) and advances
`trainer.global_step` by one, so the bar counts `global_step` out of `trainer.max_steps`
(no total when max_steps is -1). A resumed run starts the bar at its restored step. The lit-covrl
CLI adds it unless the configuration sets its own progress bar or `enable_progress_bar: false`.
"""
from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar

__all__ = ["RLProgressBar", "fit_end_message"]


class RLProgressBar(TQDMProgressBar):
    """TQDM bar over RL steps (`trainer.global_step` out of `trainer.max_steps`)."""

    @property
    def train_description(self) -> str:
        return "RL step"

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        if getattr(self, "_leave", False):  # as the parent: a fresh bar per epoch when asked
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.set_description("RL step", refresh=False)
        bar.reset(total=trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None)
        bar.initial = 0
        bar.n = trainer.global_step
        bar.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar = self.train_progress_bar
        n = trainer.global_step
        rate = self.refresh_rate
        if bar is not None and not bar.disable and rate and (n % rate == 0 or n == bar.total):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes


def fit_end_message(trainer) -> str:
    """What the end of a fit prints: where the logs are (and how to view them with a TensorBoard
    logger: a CSV logger's folder holds no event files) and the last checkpoint."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logger, ckpt = trainer.logger, trainer.checkpoint_callback
    lines = ["", "lit_covrl: training finished."]
    if logger is not None and getattr(logger, "log_dir", None):
        lines.append(f"  logs:        {logger.log_dir}")
        if isinstance(logger, TensorBoardLogger):
            lines.append(f"  view them:   tensorboard --logdir {logger.log_dir}")
    if ckpt is not None and getattr(ckpt, "last_model_path", ""):
        lines.append(f"  checkpoint:  {ckpt.last_model_path}")
    return "\n".join(lines)
