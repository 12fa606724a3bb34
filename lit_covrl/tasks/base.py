"""The contract of a built-in verifiable task."""
from __future__ import annotations

import random
import zlib
from typing import Callable, Protocol, TypeVar, runtime_checkable


T = TypeVar("T")


@runtime_checkable
class Task(Protocol):
    """A seeded generator of verifiable prompts.

    `sample(rng)` must be a pure function of the rng state, so that a stream of examples is
    reproducible from (seed, position) and a resumed run sees exactly the same prompts.
    """

    name: str

    # sample(rng: random.Random) -> Example. `data.task` is typed with this protocol, and the CLI
    # accepts a class only if its method matches this signature's annotations and names: so none
    # here (a task written without annotations is accepted) and the argument positional-only (any
    # name the task gives it is accepted).
    def sample(self, rng, /): ...


# ---------------------------------------------------------------- train / held-out split
# Every distinct prompt belongs to exactly one split, decided by a stable hash of its text
# (CRC-32, not Python's salted `hash`), so held-out prompts are never trained on however many
# prompts are drawn, in any process.
SPLITS = ("train", "test", "all")
MAX_TRIES = 10_000  # rejection-sampling draws per example before giving up


def check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """ValueError naming `name` unless `value` is an int in [low, high] (no upper bound if None)."""
    if isinstance(value, int) and low <= value and (high is None or value <= high):
        return
    bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise ValueError(f"{name} must be an int {bounds}, got {value!r}")


def check_split(split: str, test_fraction: float) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")


def is_heldout(prompt: str, test_fraction: float) -> bool:
    """True if `prompt` belongs to the held-out split (stable across processes and runs)."""
    return zlib.crc32(prompt.encode("utf-8")) / 2**32 < test_fraction


def sample_split(draw: Callable[[random.Random], T], prompt_of: Callable[[T], str], rng: random.Random,
                 split: str, test_fraction: float) -> T:
    """Draw until the item's prompt is in `split`: still a pure function of the rng state."""
    for _ in range(MAX_TRIES):
        item = draw(rng)
        if split == "all" or is_heldout(prompt_of(item), test_fraction) == (split == "test"):
            return item
    raise RuntimeError(f"no {split} example found in {MAX_TRIES} draws")
