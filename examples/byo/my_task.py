"""A custom synthetic task for the README section "Bring your own reward, data and model":
sums of three one-digit numbers ("3+4+8=" -> "15"). Any object with `sample(rng)` returning an
`Example` will do; `heldout(n, seed)` (optional) gives validation prompts training never sees."""
import random

from lit_covrl.types import Example


class ThreeDigitSums:
    name = "three_digit_sums"

    def __init__(self, max_digit=9):
        self.max_digit = max_digit

    def sample(self, rng):
        a, b, c = (rng.randint(0, self.max_digit) for _ in range(3))
        return Example(prompt=f"{a}+{b}+{c}=", answer=str(a + b + c))

    def heldout(self, n, seed):
        rng = random.Random(seed)
        return [self.sample(rng) for _ in range(n)]
