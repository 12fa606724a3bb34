"""Files shipped with the package: the tiny warm-started policies of the CPU configs."""
from __future__ import annotations

from pathlib import Path

__all__ = ["TINY_MODEL_DIR", "TINY_REASONING_DIR"]

# Qwen2ForCausalLM + char tokenizer, warm-started on `ArithmeticTask()`; made by
# tools/make_tiny_model.py (see the README.md inside the folder).
TINY_MODEL_DIR = Path(__file__).parent / "tiny-arith"
# Qwen2ForCausalLM + char tokenizer, warm-started on `ReasoningTask()` (written steps); made by
# tools/make_reasoning_model.py (see the README.md inside the folder).
TINY_REASONING_DIR = Path(__file__).parent / "tiny-reasoning"
