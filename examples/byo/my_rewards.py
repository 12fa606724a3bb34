"""Reward functions for the README section "Bring your own reward, data and model".

Named in YAML by dotted path (`examples.byo.my_rewards.exact`, run from the repository root:
the lit-covrl CLI resolves dotted paths from the current directory too).
"""


def exact(completion, answer):
    """Item-level, no annotations: 1.0 for the exact answer."""
    return float(completion.strip() == answer.strip())


def close_enough(completion, answer, tolerance=0, **columns):
    """Item-level, reading a data column: full reward within the row's `tolerance`, half within
    twice it. `columns` receives the row's other columns (and `prompt`)."""
    try:
        error = abs(int(completion.strip()) - int(answer))
    except ValueError:
        return 0.0
    return 1.0 if error <= tolerance else 0.5 if error <= 2 * tolerance else 0.0


class LengthPenalty:
    """A class without annotations, configured with `init_args`: minus the characters beyond
    `max_chars`, per `max_chars`."""

    def __init__(self, max_chars=3):
        self.max_chars = max_chars

    def __call__(self, completion, answer):
        return -max(0, len(completion.strip()) - self.max_chars) / self.max_chars


def all_digits(completions, **kwargs):
    """Batched (TRL's form: lists in, one list out): 1.0 for a digits-only completion."""
    return [float(c.strip().isdigit()) for c in completions]
