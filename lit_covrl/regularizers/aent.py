"""AEnt (Han Shen 2025, "On Entropy Control in LLM-RL Algorithms", arXiv 2509.03493, ICLR 2026;
the author's verl recipe antgroup/AEnt recipe/aent/, read here from a third party's verbatim copy,
Gricha1/llm_tests recipe/aent/, and the author's AReaL port, inclusionAI/AReaL recipe/AEnt/, as the
second source): an entropy bonus on the clamped entropy with an automatically adjusted coefficient,

    loss_tok -= c_k H^clamp_t,   H^clamp_t = entropy of softmax(z_t / temperature) renormalised over
                                 every token but the int(V clamp_p) lowest-logit ones,
    c_{k+1}  = clamp(c_k - lr (min(0, Hbar_k - low) + max(0, Hbar_k - high)), min_coef, max_coef)
               after each RL step k >= warmup_steps - 1 (k from 0),

Hbar_k the token-mean clamped entropy of the tokens step k trained on. The bonus encourages
exploration among the plausible tokens only (the full-vocabulary bonus pushes mass onto the whole
vocabulary, a bias that grows with its size); the coefficient rises while the clamped entropy is
below the band [low, high] and falls while above it.

How the code computes it, followed here:
- H^clamp is computed in the training forward, with gradient through the renormalised
  probabilities (the kept set is chosen on detached logits): `algorithms.token_clamped_entropy`,
  chunked and checkpointed like the entropy (the recipe's `clamped_entropy_from_logits`,
  aent_torch_functional.py).
- The bonus is aggregated like the loss (`loss_tok` above, the loss's own `loss_agg_mode`), as the
  recipe's actor does (`pg_loss - entropy_loss * entropy_coeff`, aent_dp_actor.py); the AReaL port
  takes the token mean, which is the default `token-mean` mode.
- The coefficient's step is the recipe's (ray_aent_trainer.py `fit`, after the actor update):
  `if entropy_coeff_warmup <= global_steps: entropy_coeff -= entropy_coeff_lr * (min(0, H - low) +
  max(0, H - high)); clip to [entropy_coeff_clip_low, entropy_coeff_clip_high]`, with verl's
  global_steps counted from 1. So with warmup_steps W it moves after the 0-based RL steps
  k >= W - 1 and first acts, moved, in step max(W, 1); W 0 and 1 both move it from the first step.
  The new coefficient acts from step k + 1 on. A step that trained on no token (every group
  filtered out) moves nothing.
- Hbar_k is the token-mean clamped entropy of every training forward of step k (all its
  mini-batches, epochs and micro-batches), over all ranks.

Defaults: the author's MATH run, antgroup/AEnt recipe/aent/run_aent_math.sh (Qwen2.5-Math-1.5B):
entropy_coeff 0.002, clamp_p 0.33, entropy_low 0.15, entropy_high 0.24, entropy_coeff_lr 0.002,
entropy_coeff_warmup 30, entropy_coeff_clip_low 6e-4, entropy_coeff_clip_high 9e-3. Its OpenR1
run (run_aent_openr1.sh, R1-Distill-Qwen-1.5B) uses 3e-4, 0.25, [0.35, 0.62], 1e-4, 156,
[4e-5, 1e-3]. The paper's method section was not read.

Where we differ: Hbar_k weighs every token of the step equally (float64 sums over micro-batches and
ranks, so it does not depend on the micro-batch size or device count), where the recipe averages
its micro-batches' token-mean clamped entropies with equal weight (`actor/entropy_loss` through
`reduce_metrics`) and the AReaL port takes the update's token mean; the recipe's optional L2 pull
toward the initial coefficient (`entropy_coeff_reg`, 0 in every one of its run scripts) is left
out; the AReaL port's warm-up (`global_step > warmup_steps`, from 0) moves the coefficient two
steps later than the recipe's, which is followed here; ties at the cut (equal logits straddling
the k-th lowest) are broken by token id, the lower ids kept (`algorithms.clamp_keep_mask`), where
the reference takes `torch.topk`'s choice, which is device-dependent; the coefficient is saved in
checkpoints (`state_dict`) and resumes exactly.
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

    def __init__(self, init_coef: float = 2e-3, clamp_p: float = 0.33, adaptive: bool = True,
                 entropy_low: float = 0.15, entropy_high: float = 0.24, coef_lr: float = 2e-3,
                 min_coef: float = 6e-4, max_coef: float = 9e-3, warmup_steps: int = 30,
                 name: str | None = None) -> None:
        """Defaults: antgroup/AEnt's run_aent_math.sh (see the module docstring).

        Args:
            init_coef: the bonus coefficient before the first adjustment (entropy_coeff; >= 0);
                the coefficient throughout with `adaptive` false.
            clamp_p: fraction of the vocabulary, the lowest-logit tokens, left out of the clamped
                entropy (clamp_p; in [0, 1): 0 is the plain entropy).
            adaptive: adjust the coefficient after each RL step (the recipe adapts when its
                entropy_low / entropy_high / entropy_coeff_lr are set).
            entropy_low: the coefficient rises while the measured clamped entropy is below this
                (nats; entropy_low).
            entropy_high: the coefficient falls while it is above this (nats; entropy_high;
                >= entropy_low).
            coef_lr: step size per nat outside [entropy_low, entropy_high] (entropy_coeff_lr).
            min_coef: lower bound of the adjusted coefficient (entropy_coeff_clip_low).
            max_coef: upper bound of the adjusted coefficient (entropy_coeff_clip_high).
            warmup_steps: the coefficient moves after each RL step from the warmup_steps-th on,
                counting RL steps from 1 (entropy_coeff_warmup, compared with verl's global_steps):
                after the 0-based steps k >= warmup_steps - 1 (k as logged), so the first moved
                coefficient acts in step max(warmup_steps, 1); 0 and 1 both move it from the
                first step.
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
        every step), the controller's measurement; with `adaptive`, after a step k >= warmup_steps - 1,
        it moves the coefficient of the next step (`algorithms.aent_coef`). Not logged, and nothing
        moved, for a step that trained on no token."""
        total = self._sums.pop()
        if total["tokens"] > 0:
            entropy = float(total["entropy"] / total["tokens"])
            self.record("clamped_entropy", entropy)
            # antgroup/AEnt's `entropy_coeff_warmup <= global_steps`, its global_steps counted from 1
            if self.adaptive and self._step is not None and self._step + 1 >= self.warmup_steps:
                self._coef = aent_coef(self._coef, entropy, low=self.entropy_low, high=self.entropy_high,
                                       lr=self.coef_lr, min_coef=self.min_coef, max_coef=self.max_coef)
        return super().pop_metrics()

    def state_dict(self) -> dict:
        return {"coef": self._coef}

    def load_state_dict(self, state_dict: dict) -> None:
        self._coef = float(state_dict["coef"])
