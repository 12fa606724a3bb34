"""The contract of a built-in verifiable task."""
from __future__ import annotations

import random
from typing import Protocol, runtime_checkable

from lit_covrl.types import Example


@runtime_checkable
class Task(Protocol):
    """A seeded generator of verifiable prompts.

    `sample(rng)` must be a pure function of the rng state, so that a stream of examples is
    reproducible from (seed, position) and a resumed run sees exactly the same prompts.
    """

    name: str

    def sample(self, rng: random.Random) -> Example: ...
