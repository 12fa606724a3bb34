"""Every YAML under configs/ parses and instantiates through the real CLI (no training run).

Method overlays are stacked on their base (quickstart or the 7B recipe), as the README shows.
Paper recipes name hub models and data files that do not exist offline: the test points them
at a local tiny model and a temp JSONL file, which is all that instantiation needs.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_covrl.cli import LitCovRLCLI
from lit_covrl.data import PromptDataModule
from lit_covrl.module import GRPOModule
from lit_covrl.regularizers import Regularizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICK = CONFIGS / "quickstart.yaml"
R7 = CONFIGS / "recipes" / "qwen2.5-7b.yaml"
STACKS = {
    "quickstart.yaml": [QUICK],
    "grpo.yaml": [QUICK, CONFIGS / "grpo.yaml"],
    "entropy_bonus.yaml": [QUICK, CONFIGS / "entropy_bonus.yaml"],
    "clip_cov.yaml": [QUICK, CONFIGS / "clip_cov.yaml"],
    "kl_cov.yaml": [QUICK, CONFIGS / "kl_cov.yaml"],
    "recipes/qwen2.5-7b.yaml": [R7],
    "recipes/qwen2.5-32b.yaml": [R7, CONFIGS / "recipes" / "qwen2.5-32b.yaml"],
    "recipes/clip_cov.yaml": [R7, CONFIGS / "recipes" / "clip_cov.yaml"],
    "recipes/kl_cov_7b.yaml": [R7, CONFIGS / "recipes" / "kl_cov_7b.yaml"],
    "recipes/kl_cov_32b.yaml": [R7, CONFIGS / "recipes" / "kl_cov_32b.yaml"],
}


def test_every_config_file_is_covered():
    on_disk = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")}
    extra = {"smollm2_math.yaml"} & on_disk  # owned by tests/test_smollm2.py
    assert on_disk - extra == set(STACKS), "add new configs to STACKS"


@pytest.mark.parametrize("name", sorted(STACKS))
def test_config_instantiates(name, tmp_path, tiny_model_dir):
    args = []
    for cfg in STACKS[name]:
        args += ["--config", str(cfg)]
    if STACKS[name][0] == R7:
        rows = tmp_path / "math.jsonl"
        rows.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
        args += ["--model.model", tiny_model_dir, "--data.train_files", json.dumps([str(rows)]),
                 "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
                 "--trainer.precision", "32-true"]
    args += ["--trainer.logger.init_args.save_dir", str(tmp_path)]
    cli = LitCovRLCLI(GRPOModule, PromptDataModule, parser_kwargs={"parser_mode": "omegaconf"}, args=args, run=False)
    assert isinstance(cli.model, GRPOModule) and isinstance(cli.datamodule, PromptDataModule)
    regs = [cb for cb in cli.trainer.callbacks if isinstance(cb, Regularizer)]
    expected = {"grpo.yaml": 0, "quickstart.yaml": 0, "recipes/qwen2.5-7b.yaml": 0, "recipes/qwen2.5-32b.yaml": 0}
    assert len(regs) == expected.get(name, 1)
    if name == "recipes/qwen2.5-32b.yaml":
        assert cli.model.hparams.micro_batch_size == 2
    if name.endswith("kl_cov.yaml") or "kl_cov_" in name:
        assert cli.model.hparams.clip_low is None and cli.model.hparams.clip_high is None
