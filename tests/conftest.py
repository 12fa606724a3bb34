"""Shared fixtures: a tiny random Qwen2 policy saved to disk (loaded through the same
`from_pretrained` path as a hub model) and a short-fit helper."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROOT_BEFORE = set(os.listdir(_ROOT))


def pytest_sessionfinish(session, exitstatus):
    """Tests write into their tmp_path, never into the checkout: a Trainer without a root dir put
    its checkpoints in ./checkpoints, and they were committed once. New entries fail the session."""
    new = sorted(set(os.listdir(_ROOT)) - _ROOT_BEFORE - {".pytest_cache"})
    if new:
        print(f"\ntests wrote into the checkout {_ROOT}: {new} (give the Trainer default_root_dir=tmp_path)")
        session.exitstatus = 1


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA device: skipped (not failed) without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A ~50k-parameter random Qwen2 with the char tokenizer, saved with save_pretrained."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lit_covrl.tokenizer import build_char_tokenizer

    path = tmp_path_factory.mktemp("tiny_qwen2")
    tok = build_char_tokenizer("0123456789+-=")
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
