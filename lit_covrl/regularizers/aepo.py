"""AEPO (Wang et al. 2025, "Arbitrary Entropy Policy Optimization Breaks the Exploration Bottleneck
of Reinforcement Learning", arXiv 2510.08141; the authors' code 597358816/AEPO, an EasyR1 fork,
`trainer.algorithm=AEPO` in verl/trainer/ray_trainer.py `fit`): in place of an entropy bonus, a
REINFORCE term on temperature-adjusted samples,

    grad J = grad J_GRPO + E_{o ~ pi^T, R(o) good} [grad log pi(o | q)],
    T = T_high while the measured entropy H_k <= H (the target), else T_low,

so that flatter samples (T_high > 1) pull the entropy up and sharper ones (T_low < 1) pull it down;
the verifiable reward keeps only good samples, so the term never pushes toward wrong answers.

How the code does it, followed here:
- Each RL step, the first quarter of the step's prompts (`len // 4`) get group_size more responses,
  drawn at T (the rollout's own sampler and settings otherwise), scored, and given the run's
  advantages over their own groups (GRPO in every script); the ones with advantage > 0.05
  (`_select_by_advantage(threshold=0.05, absolute=False)`) are candidates, of which the first
  min(sample_num, candidates) are taken, halved (`// 2`) while H_k > H.
- The taken responses replace the batch's first rows (`concat([controller[:k], batch[k:]])`),
  advantage 1 (`torch.ones_like`), and the batch trains as usual: old log-probs recomputed at
  the training temperature, the run's policy objective (PPO clip there), its aggregation. Here
  the module does this (`lit_covrl.control_rows`, asked through `draws_rollout`), so the term
  rides on any objective; this callback decides T, the count and the measurement.
- H_k, the measurement, acts from the next step: the code reads its actor's `entropy_loss` metric
  of step k - 1's update, starting from 0 (so the first step draws at T_high).

Defaults: the code's TrainerConfig (verl/trainer/config.py: temperature_high 1.2, temperature_low
0.8, entropy_base 0.5, reinforce_sample_num 60) and its run script examples/qwen-math-7b-AEPO.sh
(entropy_base 0.5, reinforce_sample_num 60, Qwen2.5-Math-7B, 512 prompts x 5 responses); the
quarter of the prompts and the 0.05 threshold are written into ray_trainer.py. The paper's best
run is H = 0.75 (the repository README's table). The paper's method section could not be read
here (only its abstract and the repository README's formula).

Where we differ: H_k is the token-mean entropy of softmax(z / temperature) of the step's trained
rows under the rollout policy (every mini-batch's, float64 sums over micro-batches and ranks,
`StepEntropy`), where the code averages its micro-batches' -mean log pi(o) of the sampled tokens
at T = 1 during the update (measured on the same batch, its own samples included, but a
cross-entropy: the current policy, moved by the update's earlier mini-batches, on tokens partly
drawn at another temperature; ours is the rollout policy's exact entropy); the extra prompts are each rank's first quarter and each rank replaces its own
first rows, the count being chosen over all ranks' candidates in rank order (the code's single
driver: the batch's); a response truncated under `overlong: mask` is never a candidate; the
measured entropy is saved in checkpoints (`state_dict`) and resumes exactly.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from lit_covrl import distributed
from lit_covrl.algorithms import aepo_choose, aepo_prompts, aepo_temperature
from lit_covrl.regularizers.base import MiniBatchContext, Regularizer, StepEntropy, check_number, select_globally
from lit_covrl.types import PolicyBatch, TokenShaping

log = logging.getLogger("lit_covrl")


class AEPO(Regularizer):
    """REINFORCE with advantage 1 on good responses drawn at T_high or T_low, chosen by the
    measured entropy against a target (see the module docstring)."""

    default_name = "aepo"
    draws_rollout = True
    chart_metrics = {"Entropy": ("temperature", "measured_entropy", "samples")}

    def __init__(self, target_entropy: float = 0.5, temperature_high: float = 1.2, temperature_low: float = 0.8,
                 sample_num: int = 60, prompt_frac: float = 0.25, adv_threshold: float = 0.05,
                 name: str | None = None) -> None:
        """Defaults: 597358816/AEPO's TrainerConfig and run script (see the module docstring).

        Args:
            target_entropy: the target H, nats (entropy_base): T_high at or below it, T_low above.
            temperature_high: sampling temperature of the extra responses while the entropy is at
                or below the target (temperature_high; > 0).
            temperature_low: their temperature while it is above (temperature_low; > 0).
            sample_num: most extra responses trained on per RL step, over all ranks
                (reinforce_sample_num; half as many while the entropy is above the target).
            prompt_frac: fraction of each rank's prompts, its first ones, that get group_size
                extra responses (the code's `len(batch) // 4`: 0.25; in (0, 1]).
            adv_threshold: a response is a candidate when its group advantage exceeds this (the
                code's 0.05).
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(None, name)
        self.target_entropy = check_number("AEPO.target_entropy", target_entropy)
        self.temperature_high = check_number("AEPO.temperature_high", temperature_high, low=0.0, low_open=True)
        self.temperature_low = check_number("AEPO.temperature_low", temperature_low, low=0.0, low_open=True)
        if isinstance(sample_num, bool) or not isinstance(sample_num, int) or sample_num < 1:
            raise ValueError(f"AEPO.sample_num={sample_num!r} is invalid: must be an integer >= 1")
        self.sample_num = sample_num
        self.prompt_frac = check_number("AEPO.prompt_frac", prompt_frac, low=0.0, low_open=True, high=1.0)
        self.adv_threshold = check_number("AEPO.adv_threshold", adv_threshold, low=float("-inf"))
        # running state (saved by state_dict), private: the settings above describe the run
        self._measured: float | None = None  # the last closed step's entropy (None: none yet)
        self._entropy = StepEntropy()  # the step being measured
        self._warned = False  # said once that too few prompts draw nothing

    @property
    def measured_entropy(self) -> float | None:
        """The entropy that decides this step's temperature (None before any step is measured)."""
        return self._measured

    def _close(self, step: int) -> None:
        if (entropy := self._entropy.begin(step)) is not None:  # the previous step, closed
            self._measured = entropy

    def _above(self) -> bool:
        return self._measured is not None and self._measured > self.target_entropy

    def rollout_request(self, step: int, num_prompts: int) -> tuple[int, float] | None:
        self._close(step)
        n = aepo_prompts(num_prompts, self.prompt_frac)
        if n == 0:
            if not self._warned:
                log.warning("%s: %d prompts per step x prompt_frac %g draw no extra response: AEPO does nothing "
                            "(raise data.batch_size or prompt_frac)", self.name, num_prompts, self.prompt_frac)
                self._warned = True
            return None
        temperature = aepo_temperature(self._measured, target=self.target_entropy, high=self.temperature_high,
                                       low=self.temperature_low)
        self.record("temperature", temperature)
        if self._measured is not None:
            self.record("measured_entropy", self._measured)
        return n, temperature

    def choose_extra(self, advantages: Tensor) -> Tensor:
        chosen = select_globally([advantages], lambda a: aepo_choose(a, threshold=self.adv_threshold,
                                                                    sample_num=self.sample_num, halve=self._above()))
        counts = distributed.all_sum(torch.stack([chosen.sum(), (advantages > self.adv_threshold).sum(),
                                                  torch.tensor(len(advantages), device=chosen.device)]).double())
        self.record("samples", counts[0])
        self.record("candidate_frac", counts[1] / counts[2].clamp(min=1))
        return chosen

    def prepare(self, ctx: MiniBatchContext) -> None:
        assert ctx.old_entropy is not None, "the module must provide the rollout entropy"
        self._close(ctx.step)
        m = ctx.mask.double()
        self._entropy.add(distributed.all_sum(torch.stack([(ctx.old_entropy.double() * m).sum(), m.sum()])))

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        return TokenShaping()  # the term is the objective's own on the spliced rows (advantage 1)

    def state_dict(self) -> dict:
        return {"measured": self._measured, **self._entropy.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._measured = None if state_dict["measured"] is None else float(state_dict["measured"])
        self._entropy.load_state_dict(state_dict)
