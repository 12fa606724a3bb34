"""A custom synthetic task for the README section "Bring your own reward, data and model":
sums of three one-digit numbers ("3+4+8=" -> "15"). Any object with `sample(rng)` returning an
`Example` will do; `heldout(n, seed)` (optional) gives the validation prompts. Here a stable hash
of the prompt text puts a fifth of the distinct prompts in a held-out split that `sample` never
returns (`lit_covrl.tasks.base.sample_split`, as the built-in tasks do), so validation scores
prompts training never sees."""
import random

from lit_covrl.tasks.base import sample_split
from lit_covrl.types import Example


class ThreeDigitSums:
    name = "three_digit_sums"
    test_fraction = 0.2  # share of the distinct prompts held out

    def __init__(self, max_digit=9):
        self.max_digit = max_digit

    def _draw(self, rng):
        a, b, c = (rng.randint(0, self.max_digit) for _ in range(3))
        return Example(prompt=f"{a}+{b}+{c}=", answer=str(a + b + c))

    def sample(self, rng):  # training prompts: never one of the held-out split
        return sample_split(self._draw, lambda ex: ex.prompt, rng, "train", self.test_fraction)

    def heldout(self, n, seed):
        rng = random.Random(seed)
        return [sample_split(self._draw, lambda ex: ex.prompt, rng, "test", self.test_fraction) for _ in range(n)]
