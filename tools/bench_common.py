"""Shared setup of the benchmark tools (tools/bench.py and its measurements, bench_trl.py,
bench_logging.py, profile_step.py): the quickstart model name, the random-init Qwen2 shapes,
the GRPOModule / data / Lightning Trainer the benchmarks drive, and the machine description.

Everything here is re-exported by tools/bench.py (`bench.make_module`, `bench._fit`, ...).
"""
from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = "lit_covrl:tiny-arith"
# random-init Qwen2 shapes (char vocabulary of the arithmetic task, so the same prompts work)
MODEL_SHAPES = {
    "10M": dict(hidden_size=384, intermediate_size=1152, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2),
    "100M": dict(hidden_size=768, intermediate_size=2304, num_hidden_layers=14, num_attention_heads=12, num_key_value_heads=4),
}
REG_NAMES = ("EntropyBonus", "ClipCov", "KLCov")


def _quiet() -> None:
    import logging

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lit_covrl", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def machine() -> dict:
    load = os.getloadavg()
    return {
        "cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "loadavg_1_5_15": [round(x, 2) for x in load],
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build_random_model(path: Path, size: str) -> str:
    """A random-init Qwen2 of the given MODEL_SHAPES entry with the char tokenizer, saved with
    save_pretrained (loaded by the module like any hub model). Returns the folder."""
    return save_random_qwen2(path, "0123456789+-=", max_positions=64, **MODEL_SHAPES[size])


def save_random_qwen2(path: Path, alphabet: str, *, max_positions: int, **dims) -> str:
    """Save a random-init (seed 0) Qwen2 with tied embeddings and `dims`, over the character
    tokenizer of `alphabet` (its vocabulary sets the model's). Returns the folder."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lit_covrl.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(alphabet)
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok), max_position_embeddings=max_positions, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, **dims,
    )
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- module / trainer


def make_module(model: str, **overrides):
    """GRPOModule with the quickstart settings (configs/quickstart.yaml), overridable."""
    from lit_covrl.module import GRPOModule

    kw = dict(
        model=model, seed=0, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.0),
        rollout=dict(group_size=8, max_new_tokens=5, temperature=1.0),
        loss=dict(advantage="grpo", clip_low=0.2, clip_high=0.2, loss_agg_mode="token-mean"),
        update=dict(mini_batch_size=4, micro_batch_size=128, ppo_epochs=1, grad_clip=1.0),
    )
    for key, value in overrides.items():  # a settings group given as a dict merges into the default one
        kw[key] = {**kw[key], **value} if isinstance(value, dict) and isinstance(kw.get(key), dict) else value
    return GRPOModule(**kw)


def make_data(batch_size: int = 16):
    from lit_covrl.data import PromptDataModule

    return PromptDataModule(task="arithmetic", batch_size=batch_size, val_size=0, seed=0)


def _fit(module, data, steps: int, callbacks: list, log_dir: str) -> None:
    import lightning as L

    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, callbacks=callbacks,
        logger=L.pytorch.loggers.TensorBoardLogger(log_dir, name="bench"), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1,
        limit_val_batches=0, check_val_every_n_epoch=None,
    )
    trainer.fit(module, data)
