"""The loss of one micro-batch: how the policy objective and the regularizers' `TokenShaping`s
combine into the one aggregated loss the learner backpropagates, and what each regularizer adds to
it (reg/<name>/loss).

    agg( (objective.token_loss(A + sum(advantage shifts)) * prod(weights) + sum(penalties)) * scope )

`compose` writes the whole loss; `loss_parts` the update's loss metrics (policy/loss, each
regularizer's contribution, the objective's stats) in the order `metric_keys` names them. Each
function takes the objective and the regularizers as they are at the call (the learner's
`regularizers` are reassignable). `explained` calls a regularizer's `shape` or `prepare` so that
reading a field it did not ask for names the flag to set. Departures from the reference code: README,
"Where we differ from the reference code".
"""
from __future__ import annotations

import torch
from torch import Tensor

from lit_covrl.algorithms import aggregate, per_token_advantages
from lit_covrl.objectives import Objective
from lit_covrl.regularizers.base import Regularizer
from lit_covrl.types import ForwardAsks, PolicyBatch, TokenShaping

# the fields a regularizer gets only by asking (a None field read -> the flag to set)
ASKED = ForwardAsks.batch_flags()  # the training forward's requests: {field: (flag, what to set it to)}
BATCH_FLAGS = {"entropy": "needs_entropy", "ref_logp": "needs_reference",
               **{f: flag for f, (flag, _) in ASKED.items()}}  # PolicyBatch (shape)
FLAG_VALUES = dict(ASKED.values())  # what to set each request's flag to (the others: True)
CTX_FLAGS = {"entropy": "needs_current_entropy", "topp_entropy": "needs_topp_entropy"}  # MiniBatchContext (prepare)


def compose(objective: Objective, regularizers: list[Regularizer], b: PolicyBatch,
            agg: dict) -> tuple[Tensor, list[TokenShaping], Tensor]:
    """The whole loss of one micro-batch `b` (log-probs with grad), in one place:

        shapings = [reg.shape(b) for reg in regularizers]          (selection made in prepare)
        A'       = A + sum of the shapings' advantage shifts        (e.g. EntropyAdvantage)
        base     = objective.token_loss(logp + sum(logp_grad),     (PPO-clip, GSPO or CISPO; with
                                        old_logp, A', mask,         Archer's clip range; logp_grad:
                                        clip=a shaping's per-token range)  value 0, SimKO's top-K gradient)
        loss_tok = base * prod(weights) + sum(penalties)            (Clip-Cov, 80/20, STEER, ...;
                                                                     entropy bonus, KL-Cov, ref KL)
                   (times a scope: Lopti's tokens of this phase)
        loss     = aggregate(loss_tok, mask, mode, the mini-batch's denominators over all ranks)

    Returns (loss, shapings, base)."""
    shapings = [TokenShaping.checked(explained(reg, "shape", b, BATCH_FLAGS), b.logp.shape, reg)
                for reg in regularizers]
    base = objective.token_loss(TokenShaping.redirected_logp(shapings, b.logp), b.old_logp,
                                TokenShaping.shifted_advantages(shapings, b.advantages), b.mask,
                                **clip_kwargs(TokenShaping.clip_range(shapings)))
    return aggregate(TokenShaping.combine(shapings, base), b.mask, **agg), shapings, base


def loss_parts(objective: Objective, regularizers: list[Regularizer], b: PolicyBatch, loss: Tensor,
               shapings: list[TokenShaping], base: Tensor, agg: dict, num_tokens: Tensor) -> dict[str, Tensor]:
    """policy/loss, each regularizer's contribution reg/<name>/loss and the objective's stats."""
    parts = {"policy/loss": loss}
    parts.update(contributions(objective, regularizers, b, shapings, base, agg))
    scope = _scope(shapings)  # a phase's stats count its own tokens (out of it A is 0, as the reference zeroes it)
    advantages = b.advantages if scope is None else per_token_advantages(b.advantages, b.logp) * scope
    parts.update({f"policy/{k}": v for k, v in objective.stats(
        b.logp, b.old_logp, advantages, b.mask, num_tokens=num_tokens,
        **clip_kwargs(TokenShaping.clip_range(shapings))).items()})
    return parts


def _scope(shapings: list[TokenShaping]) -> Tensor | None:
    """The scope of this update's phase (`TokenShaping.scope`; at most one per run), or None."""
    return next((s.scope for s in shapings if s.scope is not None), None)


def contributions(objective: Objective, regularizers: list[Regularizer], b: PolicyBatch,
                  shapings: list[TokenShaping], base: Tensor, agg: dict) -> dict[str, Tensor]:
    """reg/<name>/loss: what each regularizer adds to the aggregated loss on top of the ones
    listed before it: the change of the objective its advantage shift or its per-token clip
    range makes, the change of the (shifted, already weighted) objective its weight makes, its
    penalty; each on the tokens of the update's phase alone (its scope), whose owner adds the change
    the scope makes to the unshaped objective. They add up to policy/loss minus the unshaped
    objective's loss, also when two drop the same token."""
    out, running = {}, None  # running: the product of the weights so far
    before = None  # the objective's token loss with the shifts / clip so far (computed once one acts)
    inside: list[TokenShaping] = []  # the shapings so far that act inside the objective
    base = base.detach()
    scope = _scope(shapings)

    def in_phase(x: Tensor) -> Tensor:  # a term aggregated on this phase's tokens
        return aggregate(x if scope is None else x * scope, b.mask, **agg)

    def objective_loss(shapings_so_far: list[TokenShaping]) -> Tensor:
        return objective.token_loss(b.logp.detach(), b.old_logp,
                                    TokenShaping.shifted_advantages(shapings_so_far, b.advantages), b.mask,
                                    **clip_kwargs(TokenShaping.clip_range(shapings_so_far)))

    for reg, s in zip(regularizers, shapings):
        total = torch.zeros((), device=base.device)
        if s.advantage_shift is not None or s.clip_low is not None:
            if before is None:
                before = objective_loss([])
            inside.append(s)
            after = objective_loss(inside)
            total = total + in_phase(after - before)
            before = after
        if s.weight is not None:
            weighted = base if running is None else base * running
            total = total + in_phase(weighted * (s.weight - 1.0))
            running = s.weight if running is None else running * s.weight
        if s.penalty is not None:
            total = total + in_phase(s.penalty.detach())
        if s.scope is not None:  # the others' terms are counted on the scope's tokens (above): the objective's rest
            total = total + aggregate(base * (s.scope - 1.0), b.mask, **agg)
        out[f"reg/{reg.name}/loss"] = total
    return out


def metric_keys(objective: Objective, regularizers: list[Regularizer]) -> list[str]:
    """Names of the per-update loss metrics (`loss_parts`), in a fixed order (the same on every
    rank, even on a rank whose micro-batches were all fillers)."""
    stats = objective.stat_names()
    return ["policy/loss", *[f"reg/{reg.name}/loss" for reg in regularizers], *[f"policy/{k}" for k in stats]]


def clip_kwargs(clip: tuple[Tensor, Tensor] | None) -> dict:
    """The objective's keyword for a per-token clip range: none when there is none, so objectives
    that take no `clip` (token_clip False) are called as before."""
    return {} if clip is None else {"clip": clip}


def explained(reg, method: str, arg, flags: dict[str, str]):
    """reg.<method>(arg); an error about None raised while a field of `arg` the regularizer did not
    ask for is None (it read batch.entropy without `needs_entropy = True`) names the flag to set."""
    try:
        return getattr(reg, method)(arg)
    except (TypeError, AttributeError) as e:
        unasked = [f"{'ctx' if method == 'prepare' else 'batch'}.{f} is None unless the class sets {flag} = "
                   + FLAG_VALUES.get(flag, "True")
                   for f, flag in flags.items() if getattr(arg, f) is None and not getattr(reg, flag, False)]
        if unasked and "NoneType" in str(e):
            raise type(e)(f"regularizer {getattr(reg, 'name', reg)!r} ({type(reg).__name__}.{method}): {e}; "
                          + "; ".join(unasked)) from e
        raise
