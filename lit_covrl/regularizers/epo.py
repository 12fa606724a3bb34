"""EPO (Xu, Zhao, Wang, Li, Jin, Jin, Mei, Wan, Metaxas 2025, "EPO: Entropy-regularized Policy
Optimization for LLM Agents Reinforcement Learning", arXiv 2509.22576): an entropy bonus, an entropy
smoothing regularizer against a band around the historical mean entropy, and a phase weight on it,

    loss_tok += -c_H H_t + c_H c_S w_k p_t,
    p_t = 0 if low H_bar_k < H_t < high H_bar_k, else penalty        (`algorithms.epo_band_penalty`)
    H_bar_k = mean over RL steps j = 0 .. k of E_j                    (E_j: step j's rollout entropy)
    w_k = epo_phase_weight(k, phase_steps) with `phase_weighting`, else 1

H_t the current policy's entropy of token t (with gradient; the bonus is aggregated like the loss),
E_j the token-mean entropy of the rollout policy over the tokens step j trains on, all ranks.

What was read: the paper's abstracts (v1: the regularizer "bounds policy entropy within historical
averages"; v2: it "penalizes deviations from historical averages", the weighting "transitions from
conservative exploration to strong stabilization"); its method section could not be read, so this
follows the authors' code, github.com/WujiangXu/EPO (verl/workers/actor/dp_actor.py
`update_policy`, `generate_entropy_penalty`, `_calculate_epoch_based_entropy_weight`;
verl/trainer/ppo/ray_trainer.py `entropy_history`; agent_system/multi_turn_rollout/rollout_loop.py):
- the loss: `entropy_loss = agg(H) - entropy_smooth_coeff * agg(mask)`, `policy_loss = pg_loss -
  entropy_coeff * entropy_loss`; H the actor's entropy in the update forward (the current policy);
- the mask ("token" mode, the default): 0 inside (min_ratio H_bar, max_ratio H_bar), strict, else
  `entropy_smooth_out_range_penalty`; built with `torch.where` on constants, it has no gradient:
  in the reference code the smoothing term (and the weight on it) changes the loss value, not the
  update. Followed as is: p_t is detached here too;
- the history: each RL step appends the rollout's token-mean entropy (the actor recomputes it on
  the generated batch before the update) and the update reads the mean over all appended steps,
  the current one included;
- the weight (`enable_smooth_weights`): 1 -> 0.8 over the first half of E = 150 trainer epochs,
  then 0.8 exp(-3 progress); it multiplies the smoothing mask only.
Defaults: the code's verl/trainer/config/ppo_trainer.yaml: entropy_coeff 0.001, entropy_smooth_coeff
1.0, min/max_ratio 0.8 / 1.2, out_range_penalty 0.1 (examples/general_running_server.sh sets
0.5 / 1.5, with the smoothing off by default).

Where we differ (single-turn responses): the code keeps one history per turn index and smooths
only turns >= max_step // 2 (25 of 50); a response here is one turn, so one history and no turn gate
(under the code's gate a single-turn run would never be smoothed). The weight's epoch is the RL
step and its E is `phase_steps`. H_bar and the step's entropy weigh every token of all ranks
equally, float64, over the step's trained rows (the code: the whole generated batch; they differ
where `filter_groups` drops groups or `overlong: mask` masks responses, and beside AEPO, whose extra
responses, drawn at another temperature, join the rows); a step that trains on no
token adds nothing to the history. The history is saved
in checkpoints (`state_dict`) and resumes exactly; a step redone after a restore replaces its entry.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lit_covrl import distributed
from lit_covrl.algorithms import epo_band_penalty, epo_phase_weight
from lit_covrl.regularizers.base import MiniBatchContext, Regularizer, StepSums, check_number
from lit_covrl.types import PolicyBatch, TokenShaping


class EPO(Regularizer):
    """Entropy bonus plus EPO's entropy smoothing against the historical mean (module docstring)."""

    needs_entropy = True
    default_name = "epo"
    chart_metrics = {"Entropy": ("history_entropy", "step_entropy"), "Control": ("out_band_frac", "weight")}

    def __init__(self, entropy_coef: float = 1e-3, smooth_coef: float = 1.0, low_ratio: float = 0.8,
                 high_ratio: float = 1.2, penalty: float = 0.1, phase_weighting: bool = True,
                 phase_steps: int = 150, name: str | None = None) -> None:
        """Defaults: the authors' ppo_trainer.yaml (see the module docstring).

        Args:
            entropy_coef: c_H, the bonus coefficient, also scaling the smoothing term (entropy_coeff; > 0).
            smooth_coef: c_S, the smoothing term's weight (entropy_smooth_coeff).
            low_ratio: the band's lower end, a multiple of H_bar (entropy_smooth_min_ratio).
            high_ratio: its upper end (entropy_smooth_max_ratio; >= low_ratio).
            penalty: p_t outside the band (entropy_smooth_out_range_penalty).
            phase_weighting: weigh the smoothing term by w_k (enable_smooth_weights).
            phase_steps: E of w_k, in RL steps (the code's 150 epochs; >= 1).
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(None, name)
        self.entropy_coef = check_number("EPO.entropy_coef", entropy_coef, low_open=True)
        self.smooth_coef = check_number("EPO.smooth_coef", smooth_coef)
        self.low_ratio = check_number("EPO.low_ratio", low_ratio)
        self.high_ratio = check_number("EPO.high_ratio", high_ratio, low=self.low_ratio,
                                       must=f"a finite number >= low_ratio ({self.low_ratio:g})")
        self.penalty = check_number("EPO.penalty", penalty)
        if not isinstance(phase_weighting, bool):
            raise ValueError(f"EPO.phase_weighting={phase_weighting!r} is invalid: must be true or false")
        if isinstance(phase_steps, bool) or not isinstance(phase_steps, int) or phase_steps < 1:
            raise ValueError(f"EPO.phase_steps={phase_steps!r} is invalid: must be an integer >= 1")
        self.phase_weighting, self.phase_steps = phase_weighting, phase_steps
        # running state (saved by state_dict), private: the settings above describe the run
        self._hist_sum, self._hist_count = 0.0, 0  # sum and number of the steps' entropies E_j
        self._last: tuple[int, float] | None = None  # (step, the sum before its entry) of the latest entry
        self._weight = 1.0
        self._sums = StepSums("out_band", "tokens")

    @property
    def history(self) -> float | None:
        """H_bar: the mean of the recorded steps' rollout entropies (None before the first)."""
        return self._hist_sum / self._hist_count if self._hist_count else None

    def observe_old_entropy(self, entropy: Tensor, mask: Tensor, step: int) -> None:
        m = mask.double()
        sums = distributed.all_sum(torch.stack([(entropy.double() * m).sum(), m.sum()]))
        if self._last is not None and self._last[0] == step:  # the step redone (restored mid-step): the
            self._hist_sum, self._hist_count = self._last[1], self._hist_count - 1  # sum before it, bit for bit
        if float(sums[1]) == 0:
            self._last = None
            return
        mean = float(sums[0] / sums[1])
        self._last = (step, self._hist_sum)
        self._hist_sum, self._hist_count = self._hist_sum + mean, self._hist_count + 1
        self.record("step_entropy", mean)

    def prepare(self, ctx: MiniBatchContext) -> None:
        self._weight = epo_phase_weight(ctx.step, self.phase_steps) if self.phase_weighting else 1.0
        self.record("weight", self._weight)
        if (h := self.history) is not None:
            self.record("history_entropy", h)

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        assert batch.entropy is not None, "the module must compute entropy when needs_entropy is set"
        bonus = -self.entropy_coef * batch.entropy
        if (h := self.history) is None:
            return TokenShaping(penalty=bonus)
        p = epo_band_penalty(batch.entropy, h, low=self.low_ratio, high=self.high_ratio, penalty=1.0)
        m = batch.mask.double()
        self._sums.add(out_band=(p.double() * m).sum(), tokens=m.sum())
        scale = self.entropy_coef * self.smooth_coef * self._weight * self.penalty
        return TokenShaping(penalty=bonus + scale * p)

    def pop_metrics(self) -> dict[str, float]:
        """Also reg/<name>/out_band_frac: the share of the step's trained valid tokens, over every
        update and all ranks, whose current entropy lies outside (low H_bar, high H_bar) (a
        collective: called on every rank every step). step_entropy (E_k), history_entropy (H_bar_k)
        and weight (w_k) are recorded as they are set."""
        total = self._sums.pop()
        if total["tokens"] > 0:
            self.record("out_band_frac", total["out_band"] / total["tokens"])
        return super().pop_metrics()

    def state_dict(self) -> dict:
        return {"hist_sum": self._hist_sum, "hist_count": self._hist_count,
                "last": None if self._last is None else list(self._last)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._hist_sum, self._hist_count = float(state_dict["hist_sum"]), int(state_dict["hist_count"])
        last = state_dict["last"]
        self._last = None if last is None else (int(last[0]), float(last[1]))
