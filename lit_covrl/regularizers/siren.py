"""SIREN, selective entropy regularization ("Rethinking Entropy Regularization in Large Reasoning
Models", arXiv 2509.25133; the authors' code Linn3a/siren, a verl fork: workers/actor/dp_actor.py,
`efficient_top_p_sampling`, `mask_by_quantile` and the `siren` branch of `update_policy`, and the
anchor in trainer/ppo/ray_trainer.py). A plain entropy bonus over the whole vocabulary and every
token makes the entropy of long responses explode; SIREN regularises a selected entropy instead:

1. top-p mask: at each position the entropy of the nucleus alone, H^p_t = -sum_{v in S_t} q_v
   log q_v with q the policy's softmax renormalised over S_t, the most probable tokens (at most
   top_k) whose cumulative probability stays below top_p (`algorithms.token_topp_entropy`);
2. peak-entropy mask: of each response, the tokens whose H^p exceeds its `quantile` quantile
   (strictly; `archer_high_entropy`);
3. self-anchored form: H_bar, the mean over responses of each response's mean H^p over its
   selected tokens, is held near an anchor by the loss coef * (H_bar - anchor)^2 (in place of
   -coef * H_bar), the anchor being the initial value of H_bar.

How it composes: the squared term is a `TokenShaping.penalty` on the selected tokens, with the
deviation H_bar - anchor measured over the whole optimizer mini-batch on all ranks in `prepare`
(from a forward of the current policy: `Regularizer.needs_topp_entropy`), so that aggregated with
the loss's own mode its value is coef * (H_bar - anchor)^2 and its gradient that of the square for
the mini-batch, whatever the micro-batch size or device count; it adds to any objective.

Defaults: the reference recipe exp_scripts/siren.sh (entropy_coeff 0.005, mask_ratio 0.8,
entropy_topk 10000, entropy_topp 0.8); the reference's entropy aggregation default
(seq-mean-token-mean).

Where we differ from the reference code:
- the deviation is that of the whole optimizer mini-batch (all micro-batches, all ranks); the
  reference squares each micro-batch's own H_bar - anchor and sums the micro-batches' squares
  weighted by their share, which depends on the micro-batch size;
- the anchor, unless given, is H_bar of the run's first rollout (its kept responses, all ranks)
  under the rollout policy, before the first update (`observe_rollout`: one no-grad forward over
  that rollout, once per run), as the reference measures it on its first batch; it is saved in
  checkpoints (`state_dict`) and resumes exactly (the reference keeps it in the trainer and reads
  it from the config on resume);
- the nucleus holds at most min(top_k, V) tokens (the reference's torch.topk fails for V < top_k),
  and its entropy has no 1e-12 guards (0 for an empty nucleus, as the reference's);
- a peak-entropy test within a relative 1e-5 above the quantile counts as equal to it (rounding
  of different micro-batch shapes, as Archer and SimKO).
"""
from __future__ import annotations

import torch

from lit_covrl import distributed
from lit_covrl.algorithms import archer_high_entropy, siren_agg_factor, siren_row_weights, siren_token_penalty
from lit_covrl.regularizers.base import MiniBatchContext, Regularizer
from lit_covrl.regularizers.checks import check_number
from lit_covrl.types import PolicyBatch, TokenShaping


class SIREN(Regularizer):
    """Selective, self-anchored entropy regularization on each response's peak nucleus entropies."""

    default_name = "siren"
    chart_metrics = {"Entropy": ("entropy", "anchor", "nucleus_entropy"), "Control": ("deviation", "selected_frac")}

    def __init__(self, coef: float = 0.005, top_p: float = 0.8, top_k: int = 10000, quantile: float = 0.8,
                 anchor: float | None = None, name: str | None = None) -> None:
        """
        Args:
            coef: weight of (H_bar - anchor)^2 in the loss (recipe entropy_coeff: 0.005; >= 0).
            top_p: the nucleus' cumulative probability bound (recipe entropy_topp: 0.8; in (0, 1]).
            top_k: the most tokens of a nucleus (recipe entropy_topk: 10000; >= 1).
            quantile: a token is regularised when its nucleus entropy exceeds this quantile of its
                response's (recipe mask_ratio: 0.8; in [0, 1), 0 keeps all but each response's
                lowest).
            anchor: the nucleus entropy to hold, in nats; None (default, the reference's): H_bar
                of the run's first rollout (all its kept responses, before the first update).
            name: metric namespace (reg/<name>/...).
        """
        super().__init__(None, name)
        self.coef = check_number("SIREN.coef", coef)
        self.top_p = check_number("SIREN.top_p", top_p, high=1.0, low_open=True, must="a probability in (0, 1]")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"SIREN.top_k={top_k!r} is invalid: must be an integer >= 1")
        self.top_k = int(top_k)
        self.quantile = check_number("SIREN.quantile", quantile, high=1.0, high_open=True,
                                     must="in [0, 1) (1 selects no token)")
        self.anchor = None if anchor is None else check_number(
            "SIREN.anchor", anchor, must="an entropy >= 0 (nats) or null (measured)")
        self._anchor: float | None = self.anchor  # in effect (saved by state_dict)
        self.weights: torch.Tensor | None = None  # coef * f * w of the prepared mini-batch
        self._deviation = 0.0
        self._covered = 0.0

    @property
    def needs_topp_entropy(self) -> tuple[float, int]:  # the learner's nucleus request
        return (self.top_p, self.top_k)

    @property
    def anchor_value(self) -> float | None:
        """The anchor in effect (None until the first rollout when measured)."""
        return self._anchor

    def _sums(self, topp_entropy: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w [n, T] (`siren_row_weights` of the peak-entropy tokens), the all-reduced [sum w H,
        rows with a selected token, rows, valid tokens, selected tokens, sum H])."""
        h = topp_entropy.detach().double()
        w = siren_row_weights(archer_high_entropy(h, mask, quantile=self.quantile), mask)
        local = torch.stack([(w * h).sum(), w.sum(), h.new_tensor(float(mask.shape[0])), mask.double().sum(),
                             (w > 0).double().sum(), (h * mask).sum()])
        return w, distributed.all_sum(local)

    def observes_rollout(self) -> bool:
        return self._anchor is None  # until the anchor is measured

    def observe_rollout(self, topp_entropy: torch.Tensor, mask: torch.Tensor) -> None:
        """The anchor: H_bar of the whole rollout (all ranks' kept rows) under the rollout policy,
        before the first update, as the reference measures it on its first batch."""
        _, sums = self._sums(topp_entropy, mask)
        if sums[2] > 0:
            self._anchor = float(sums[0]) / float(sums[2])

    def prepare(self, ctx: MiniBatchContext) -> None:
        assert ctx.topp_entropy is not None, "the module must fill ctx.topp_entropy when needs_topp_entropy is set"
        m = ctx.mask
        w, sums = self._sums(ctx.topp_entropy, m)
        num_seqs = max(float(sums[2]), 1.0)
        h_bar = float(sums[0]) / num_seqs
        if self._anchor is None:  # not observed (prepare called outside the learner): this mini-batch's
            self._anchor = h_bar
        self._deviation, self._covered = h_bar - self._anchor, float(sums[1]) / num_seqs
        factor = siren_agg_factor(m, ctx.agg_mode, num_tokens=sums[3], num_seqs=sums[2],
                                  norm_length=ctx.norm_length if ctx.norm_length is not None else m.shape[-1])
        self.weights = self.coef * factor * w
        tokens = sums[3].clamp(min=1)
        self.record("entropy", h_bar)
        self.record("anchor", self._anchor)
        self.record("deviation", self._deviation)
        self.record("selected_frac", sums[4] / tokens)
        self.record("nucleus_entropy", sums[5] / tokens)

    def shape(self, batch: PolicyBatch) -> TokenShaping:
        assert self.weights is not None, "prepare() must run before shape()"
        assert batch.topp_entropy is not None, "the module must fill batch.topp_entropy when needs_topp_entropy is set"
        return TokenShaping(penalty=siren_token_penalty(batch.topp_entropy, self.weights[batch.rows],
                                                        deviation=self._deviation, covered=self._covered))

    def state_dict(self) -> dict:
        return {"anchor": self._anchor}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("anchor")
        # a given anchor is a setting (the run's): it wins over the checkpoint's
        self._anchor = self.anchor if self.anchor is not None else (None if saved is None else float(saved))
