"""`lit-covrl` console script: LightningCLI over GRPOModule + PromptDataModule.

    lit-covrl fit --config configs/quickstart.yaml
    lit-covrl fit --config configs/quickstart.yaml --config configs/clip_cov.yaml --trainer.max_steps 50

YAML is parsed with omegaconf (`${...}` interpolation is resolved when a file is loaded, so a
later command-line override does not flow into keys interpolated from it).
"""
from __future__ import annotations

import logging
import os

from lightning.pytorch.cli import LightningCLI

from lit_covrl.checkpointing import AtomicCheckpoint
from lit_covrl.data import PromptDataModule
from lit_covrl.module import GRPOModule


class LitCovRLCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # always-on checkpointing, configured under `checkpoint:`; keeps `trainer.callbacks` free
        # for the regularizers, so method configs can be stacked on a base config. Atomic files and
        # `checkpoint.on_write_error` (stop | warn): lit_covrl.checkpointing
        parser.add_lightning_class_args(AtomicCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 50})
        parser.add_argument(
            "--torch_threads", type=int | None, default=None,
            help="torch intra-op threads (null = torch's default). On small CPUs 1 per process is steadiest.",
        )

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config)
        threads = cfg.get("torch_threads")
        if threads:
            import torch

            torch.set_num_threads(threads)


def main(args: list[str] | None = None) -> None:
    logging.getLogger("lit_covrl").setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    LitCovRLCLI(
        GRPOModule,
        PromptDataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
