"""What the prompt datamodule checks about its rows, as pure functions over lists of `Example`:

- `rows_digest`: a short hash of the train rows' (prompt, answer) sequence, saved in checkpoints;
- `changed_rows_warning`: resumed on train rows that differ from the checkpoint's (a malformed
  line fixed, rows added, edited or reordered), the epochs' shuffles, permutations of the row
  positions, no longer continue the saved stream;
- `reuse_warnings`: held-out rows that are also train prompts, and steps larger than the data.
"""
from __future__ import annotations

import hashlib
import json

from lit_covrl.types import Example

__all__ = ["rows_digest", "changed_rows_warning", "reuse_warnings"]


def _prompt_key(prompt: str | list[dict]) -> str:
    """A hashable stand-in for a prompt (a conversation is a list of dicts)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


def rows_digest(rows: list[Example]) -> str:
    """A short hash of the rows' (prompt, answer) sequence, order included."""
    h = hashlib.sha256()
    for ex in rows:
        h.update(json.dumps([ex.prompt, ex.answer]).encode("utf-8"))
    return h.hexdigest()[:16]


def changed_rows_warning(saved_n: int, saved_digest: str | None, n: int, digest: str) -> str | None:
    """The warning for train rows that differ from a checkpoint's (`saved_n` rows with
    `saved_digest`, None in checkpoints that kept only the count), or None."""
    if n != saved_n:
        return (f"train rows changed since the checkpoint ({saved_n} -> {n} rows): every epoch's shuffle differs, "
                "so rows of the current epoch may repeat or be missed")
    if saved_digest is not None and saved_digest != digest:
        return (f"train rows changed since the checkpoint (the same {n} rows, but other prompts or answers, or "
                "another order): rows edited in place are used as edited; rows that moved may repeat or be "
                "missed in the current epoch")
    return None


def reuse_warnings(train: list[Example], held_out: list[Example] | None, batch_size: int, world: int) -> list[str]:
    """Warnings about train rows used twice: by validation (`held_out`: rows read from files or a
    split, None for a task's own held-out prompts) or within a step (more prompts per step than rows)."""
    out = []
    if held_out:
        seen = {_prompt_key(ex.prompt) for ex in train}
        shared = sum(_prompt_key(ex.prompt) in seen for ex in held_out)
        if shared:
            out.append(f"{shared} of {len(held_out)} held-out rows have the prompt of a train row: validation "
                       "scores prompts the policy trains on")
    if world * batch_size > len(train):
        out.append(f"data.batch_size={batch_size} x {world} device(s) = {world * batch_size} prompts per step, "
                   f"more than the {len(train)} train rows: each step holds some rows several times")
    return out
