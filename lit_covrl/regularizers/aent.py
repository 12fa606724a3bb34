"""AEnt (Han Shen 2025, "On Entropy Control in LLM-RL Algorithms", arXiv 2509.03493, ICLR 2026;
reference code github.com/antgroup/AEnt, recipe/aent/, and the author's AReaL port,
inclusionAI/AReaL recipe/AEnt/): an entropy bonus on the clamped entropy with an automatically
adjusted coefficient,

    loss_tok -= c_k H^clamp_t,   H^clamp_t = entropy of softmax(z_t / temperature) renormalised over
                                 every token but the int(V clamp_p) lowest-logit ones,
    c_{k+1}  = clamp(c_k - lr (min(0, Hbar_k - low) + max(0, Hbar_k - high)), min_coef, max_coef)
               after each RL step k > warmup_steps,

Hbar_k the token-mean clamped entropy of the tokens step k trained on. The bonus encourages
exploration among the plausible tokens only (the full-vocabulary bonus pushes mass onto the whole
vocabulary, a bias that grows with its size); the coefficient rises while the clamped entropy is
below the band [low, high] and falls while above it.

How the code computes it, followed here:
- H^clamp is computed in the training forward, with gradient through the renormalised
  probabilities (the kept set is chosen on detached logits): `algorithms.token_clamped_entropy`,
  chunked and checkpointed like the entropy (the reference's `clamped_entropy_from_logits`).
- The bonus is aggregated like the loss (`loss_tok` above, the loss's own `loss_agg_mode`), as verl
  aggregates its own entropy bonus (antgroup/AEnt is a verl recipe; its actor could not be read);
  the AReaL port takes the token mean, which is the default `token-mean` mode.
- Hbar_k is the token-mean clamped entropy of every training forward of step k (all its
  mini-batches, epochs and micro-batches), over all ranks, the AReaL port's `entropy/avg` stat of
  the update; the new coefficient acts from step k + 1 on (it is moved after the step's updates),
  and it moves only after steps k > warmup_steps (k counted from 0, as the port's global_step).
  A step that trained on no token (every group filtered out) moves nothing.

Defaults: coef 0.0002 and clamp_p 0.3 from antgroup/AEnt's README (the verl recipe's actor config
`entropy_coeff: 0.0002`, `clamp_p: 0.3`); the controller's settings from the AReaL port's README and
configs/gsm8k_aent_grpo.yaml (entropy_low 0.05, entropy_high 0.23, coeff_lr 0.001, coeff_box
[1e-5, 0.003], warmup_steps 29). The antgroup/AEnt code itself could not be read here; its
coefficient update is taken from the AReaL port, the paper's method section was not read either.

Where we differ: ties at the cut (equal logits straddling the k-th lowest) are broken by token id,
the lower ids kept (`algorithms.clamp_keep_mask`), where the reference takes `torch.topk`'s
choice, which is device-dependent; the coefficient moves by default (`adaptive: true`: the port's
shipped config has `adaptive_coeff: False`, i.e. a fixed coefficient); the coefficient is saved
in checkpoints (`state_dict`) and resumes exactly.
"""
from __future__ import annotations

from lit_covrl.algorithms import aent_coef
from lit_covrl.regularizers.base import MiniBatchContext, Regularizer, StepSums, check_number
from lit_covrl.types import PolicyBatch, TokenShaping


class AEnt(Regularizer):
    """Clamped-entropy bonus with a coefficient kept by a projected step toward a band of the
    measured clamped entropy (see the module docstring)."""

    default_name = "aent"
    chart_metrics = {"Entropy": ("coef", "clamped_entropy")}

    def __init__(self, init_coef: float = 2e-4, clamp_p: float = 0.3, adaptive: bool = True,
                 entropy_low: float = 0.05, entropy_high: float = 0.23, coef_lr: float = 1e-3,
                 min_coef: float = 1e-5, max_coef: float = 3e-3, warmup_steps: int = 29,
                 name: str | None = None) -> None:
        """
        Args:
            init_coef: the bonus coefficient before the first adjustment (antgroup/AEnt
                entropy_coeff: 0.0002; >= 0); the coefficient throughout with `adaptive` false.
            clamp_p: fraction of the vocabulary, the lowest-logit tokens, left out of the clamped
                entropy (antgroup/AEnt clamp_p: 0.3; in [0, 1): 0 is the plain entropy).
            adaptive: adjust the coefficient after each RL step (AReaL port: adaptive_coeff).
            entropy_low: the coefficient rises while the measured clamped entropy is below this
                (nats; AReaL port: 0.05).
            entropy_high: the coefficient falls while it is above this (nats; AReaL port: 0.23;
                >= entropy_low).
            coef_lr: step size per nat outside [entropy_low, entropy_high] (AReaL port coeff_lr:
                0.001).
            min_coef: lower bound of the adjusted coefficient (AReaL port coeff_box_low: 1e-5).
            max_coef: upper bound of the adjusted coefficient (AReaL port coeff_box_high: 0.003).
            warmup_steps: the coefficient moves only after RL steps k > warmup_steps, k from 0
                (AReaL port: 29).
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(None, name)
        self.init_coef = check_number("AEnt.init_coef", init_coef)
        self.clamp_p = check_number("AEnt.clamp_p", clamp_p, high=1.0, high_open=True)
        if not isinstance(adaptive, bool):
            raise ValueError(f"AEnt.adaptive={adaptive!r} is invalid: must be true or false")
        self.adaptive = adaptive
        self.entropy_low = check_number("AEnt.entropy_low", entropy_low)
        self.entropy_high = check_number("AEnt.entropy_high", entropy_high, low=self.entropy_low,
                                         must=f"a finite number >= entropy_low ({self.entropy_low:g})")
        self.coef_lr = check_number("AEnt.coef_lr", coef_lr)
        self.min_coef = check_number("AEnt.min_coef", min_coef)
        self.max_coef = check_number("AEnt.max_coef", max_coef, low=self.min_coef,
                                     must=f"a finite number >= min_coef ({self.min_coef:g})")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"AEnt.warmup_steps={warmup_steps!r} is invalid: must be an integer >= 0")
        self.warmup_steps = warmup_steps
        # clamp_p 0: the plain entropy, which the training forward computes as `batch.entropy`
        self.needs_entropy = self.clamp_p == 0.0
        # running state (saved by state_dict), private: the settings above describe the run
        self._coef = self.init_coef
        self._step: int | None = None  # the RL step being trained (from prepare)
        self._sums = StepSums("entropy", "tokens")  # the step's clamped entropy over its valid tokens

    @property
    def needs_clamped_entropy(self) -> float:  # the learner's request (Regularizer.needs_clamped_entropy)
        return self.clamp_p

    @property
    def coef(self) -> float:
        """The coefficient applied now."""
        return self._coef

    def prepare(self, ctx: MiniBatchContext) -> None:
        self._step = ctx.step
        self.record("coef", self._coef)

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        h = batch.clamped_entropy if self.clamp_p else batch.entropy
        assert h is not None, "the module must fill batch.clamped_entropy when needs_clamped_entropy is set"
        m = batch.mask.double()  # float64 sums: the same for any split into micro-batches
        self._sums.add(entropy=(h.detach().double() * m).sum(), tokens=m.sum())
        if self._coef == 0.0:
            return TokenShaping()
        return TokenShaping(penalty=-self._coef * h)

    def pop_metrics(self) -> dict[str, float]:
        """Also reg/<name>/clamped_entropy: the step's token-mean clamped entropy over every
        training forward and all ranks (a collective: the module calls pop_metrics on every rank
        every step), the controller's measurement; with `adaptive`, after a step k > warmup_steps,
        it moves the coefficient of the next step (`algorithms.aent_coef`). Not logged, and nothing
        moved, for a step that trained on no token."""
        total = self._sums.pop()
        if total["tokens"] > 0:
            entropy = float(total["entropy"] / total["tokens"])
            self.record("clamped_entropy", entropy)
            if self.adaptive and self._step is not None and self._step > self.warmup_steps:
                self._coef = aent_coef(self._coef, entropy, low=self.entropy_low, high=self.entropy_high,
                                       lr=self.coef_lr, min_coef=self.min_coef, max_coef=self.max_coef)
        return super().pop_metrics()

    def state_dict(self) -> dict:
        return {"coef": self._coef}

    def load_state_dict(self, state_dict: dict) -> None:
        self._coef = float(state_dict["coef"])
