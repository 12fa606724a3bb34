"""Per-RL-step state that regularizers accumulate over mini-batches: the rollout entropy of a step
(`StepEntropy`, for the controllers steering toward a target entropy) and metric sums over a step's
micro-batches and ranks (`StepSums`). Re-exported from `lit_covrl.regularizers.base`."""
from __future__ import annotations

import torch
from torch import Tensor

from lit_covrl import distributed


class StepEntropy:
    """The token-mean rollout entropy of each RL step over all ranks, for the controllers that
    steer toward a target entropy (AdaptiveEntropyBonus, EntroPIC): every mini-batch's `prepare`
    adds its all-reduced sums [sum of H over valid tokens, tokens]; the first mini-batch of the next
    step closes the step (`begin` returns its mean: the measurement acts from the next step on). A
    step whose groups were all filtered out measures nothing. Checkpointed by its owner under the
    keys `step` and `sums`."""

    def __init__(self) -> None:
        self.step: int | None = None  # RL step being measured
        self.sums = torch.zeros(2, dtype=torch.float64)  # [sum of H over valid tokens, tokens] of that step
        self.measured = False  # add() ran since the last pop_measured()
        self._restarting = False  # loaded from a checkpoint, not yet begun

    def begin(self, step: int) -> float | None:
        """Start (or continue) measuring `step`; the mean entropy of the step it closes, if any. The
        first call after `load_state_dict` for the step the state was saved in starts it again: a
        state saved mid-step (nonfinite-stop.ckpt) holds the aborted attempt's sums, and the
        resumed run redoes that step with a new rollout."""
        closed = None
        if self._restarting and step == self.step:
            self.sums = torch.zeros_like(self.sums)
        self._restarting = False
        if self.step is not None and step != self.step:
            if self.sums[1] > 0:
                closed = float(self.sums[0] / self.sums[1])
            self.sums = torch.zeros_like(self.sums)
        self.step = step
        return closed

    def add(self, sums: Tensor) -> None:
        """Add a mini-batch's all-reduced [sum of H over valid tokens, tokens]."""
        self.sums = self.sums.to(sums.device) + sums  # on the device: read once per RL step
        self.measured = True

    def pop_measured(self) -> float | None:
        """The current step's mean entropy so far if a mini-batch was added since the last call."""
        out = float(self.sums[0] / self.sums[1]) if self.measured and self.sums[1] > 0 else None
        self.measured = False
        return out

    def state_dict(self) -> dict:
        return {"step": self.step, "sums": self.sums.cpu().clone()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.step, self.sums = state_dict["step"], state_dict["sums"].clone().double()
        self._restarting = True


class StepSums:
    """A regularizer's metric numerators and denominators summed over every micro-batch of an RL
    step on this rank (`add`, on the device: no host sync), then over all ranks at log time (`pop`,
    a collective: the module calls pop_metrics on every rank every step, and a rank that added
    nothing, its micro-batches all fillers, adds zeros). `names` fixes the sums and their order."""

    def __init__(self, *names: str) -> None:
        self.names = names
        self._local: Tensor | None = None  # float64 [len(names)], this step, this rank

    def add(self, **sums: Tensor) -> None:
        """Add one micro-batch's 0-dim sums, given by name in the order of `names`."""
        assert tuple(sums) == self.names, f"StepSums.add({', '.join(sums)}): expected {', '.join(self.names)}"
        s = torch.stack(list(sums.values())).detach().double()
        self._local = s if self._local is None else self._local + s

    def pop(self) -> dict[str, Tensor]:
        """The step's sums over all ranks by name (0-dim float64); starts the next step at zero."""
        local = self._local if self._local is not None else torch.zeros(len(self.names), dtype=torch.float64)
        total = distributed.all_sum(local)
        self._local = None
        return dict(zip(self.names, total))
