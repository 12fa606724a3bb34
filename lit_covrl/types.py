"""Typed containers that cross module boundaries.

Shapes: B prompts, G samples per prompt, N = B*G sequences, P prompt tokens (left-padded),
T response tokens (right-padded), V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import torch
from torch import Tensor


class SystemPrompted(list):
    """A data row's string prompt shown as [system, user] messages (`data.system_prompt`): the
    policy's chat template renders the messages, while the rewards get `data_prompt`, the row's
    prompt as in the data (a reward reading its prompt text must not find a message list there
    only because a system prompt was set)."""

    def __init__(self, system: str, prompt: str) -> None:
        super().__init__([{"role": "system", "content": system}, {"role": "user", "content": prompt}])
        self.data_prompt = prompt


def data_prompt(prompt: Any) -> Any:
    """The prompt as in the data: a SystemPrompted's string, else the prompt itself."""
    return prompt.data_prompt if isinstance(prompt, SystemPrompted) else prompt


@dataclass(frozen=True)
class Example:
    """One verifiable prompt: the text shown to the policy (or a conversation, a list of
    `{role, content}` messages rendered by the chat template), the reference answer, the row's
    other columns (passed to reward functions as keyword arguments) and `source`, where it was
    read (`file:line`, for start-up errors; None for generated prompts)."""

    prompt: str | list[dict]
    answer: str
    columns: dict[str, Any] = field(default_factory=dict, hash=False)
    source: str | None = field(default=None, compare=False)


@dataclass
class PromptBatch:
    """B prompts with their answers, as yielded by the datamodule.

    index: position k = 0, 1, 2, ... of this batch in this rank's train stream; -1 for batches
    that are not part of it (validation).
    columns: each prompt's other data columns (reward keyword arguments); [] = none.
    """

    prompts: list[str | list[dict]]
    answers: list[str]
    index: int = -1
    columns: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def from_examples(cls, examples: list[Example], index: int = -1) -> "PromptBatch":
        columns = [e.columns for e in examples] if any(e.columns for e in examples) else []
        return cls([e.prompt for e in examples], [e.answer for e in examples], index, columns)


@dataclass
class Rollout:
    """N = B*G sampled responses (sequence n belongs to prompt n // G).

    input_ids      [N, P+T]  left-padded prompt followed by right-padded response
    attention_mask [N, P+T]  1 on real tokens (prompt and response up to and including EOS)
    response_mask  [N, T]    1 on response tokens that enter the loss
    logp           [N, T]    log pi_old(token) at the training temperature (0 outside the mask)
    entropy        [N, T]    entropy of the distribution sampled, softmax(z / temperature), before
                             top-p (0 outside the mask; a -inf logit contributes 0, never NaN)
    truncated      [N]       True where the response hit max_new_tokens without EOS
    nonfinite      [N]       True where some step's logits had NaN / +inf (or were all -inf): that
                             row's draw is meaningless (default: all False)
    prompt_index   [N]       the prompt each row answers, where rows are not in prompt order (a
                             regularizer's extra responses spliced in, `control_rows`); None: n // G
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    logp: Tensor
    entropy: Tensor
    truncated: Tensor
    completions: list[str] = field(default_factory=list)
    nonfinite: Tensor | None = None
    prompt_index: Tensor | None = None

    def __post_init__(self) -> None:
        if self.nonfinite is None:
            self.nonfinite = torch.zeros(self.truncated.shape, dtype=torch.bool, device=self.truncated.device)

    def prompt_of(self, rows: Tensor, group_size: int) -> Tensor:
        """The prompt each of `rows` answers (`prompt_index`, else row // group_size)."""
        return rows // group_size if self.prompt_index is None else self.prompt_index[rows]


def _asked(default, flag: str, read, stat: str, hint: str, refusal: str | None = None):
    """A `ForwardAsks` field, `default` when nothing is asked: the `Regularizer` flag `flag` that asks
    it (its value read by `read`), the `TokenStats` / `PolicyBatch` field `stat` it fills, `hint` what
    to set the flag to (the error of a `shape` that reads `stat` unasked says it) and `refusal`, the
    error when two regularizers ask for different values ({asking}: each one's name and value); None
    takes the largest value asked."""
    return field(default=default, metadata=dict(flag=flag, read=read, stat=stat, hint=hint, refusal=refusal))


@dataclass(frozen=True)
class ForwardAsks:
    """What the regularizers ask the training forward for besides the log-probs and the entropy
    (`ForwardAsks.of`), each field computed only when asked (`policy.response_logprobs`); falsy when
    nothing is. A new request is a field here, its `TokenStats` / `PolicyBatch` field, its
    computation in `policy._token_stats` and its flag on `Regularizer`.

    topk          k: the k most probable tokens' log-probs (`needs_topk`, the largest k asked)
    min_p         kappa: the sampled tokens' log-probs under the min-p proxy (`needs_min_p`)
    topp          (top_p, top_k): the nucleus entropy (`needs_topp_entropy`)
    logit_scales  (s_1, ...): the sampled tokens' log-probs under scaled logits (`needs_logit_scales`)
    clamp_p       the clamped entropy's left-out fraction (`needs_clamped_entropy`)
    """

    topk: int = _asked(0, "needs_topk", int, "topk_logp", "k (how many candidates, >= 1)")
    min_p: float = _asked(0.0, "needs_min_p", float, "proxy_logp", "the proxy's threshold (in (0, 1])",
                          "min-p proxies of different thresholds ({asking}): the training forward computes one; "
                          "give them the same min_p")
    topp: tuple[float, int] | None = _asked(None, "needs_topp_entropy", tuple, "topp_entropy", "(top_p, top_k)",
                                            "the entropy of different nuclei (top_p, top_k): {asking}; the training "
                                            "forward computes one: give them the same top_p and top_k")
    logit_scales: tuple[float, ...] = _asked((), "needs_logit_scales", tuple, "scaled_logp",
                                             "the scales (s_1, ...), each > 0",
                                             "log-probs under different logit scales: {asking}; the training forward "
                                             "computes one set: give them the same scales (ERA's: the same ERA.k)")
    clamp_p: float = _asked(0.0, "needs_clamped_entropy", float, "clamped_entropy",
                            "the clamped fraction clamp_p (in (0, 1))",
                            "clamped entropies of different clamp_p ({asking}): the training forward computes one; "
                            "give them the same clamp_p")

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    @classmethod
    def of(cls, regularizers: list) -> "ForwardAsks":
        """The requests of `regularizers` (their `needs_*` flags) as one: the largest top-k, and each
        other request the one value every regularizer that makes it asks for; different values are a
        ValueError naming the regularizers and their values (the forward computes one)."""
        asks = {}
        for f in fields(cls):
            flag, read, refusal = f.metadata["flag"], f.metadata["read"], f.metadata["refusal"]
            if refusal is None:
                asks[f.name] = max((read(getattr(r, flag)) for r in regularizers), default=f.default)
                continue
            asking = [(r.name, read(getattr(r, flag))) for r in regularizers if getattr(r, flag)]
            if len({v for _, v in asking}) > 1:
                shown = ", ".join(f"{name!r} {v if isinstance(v, tuple) else f'({v})'}" for name, v in asking)
                raise ValueError("regularizers ask for " + refusal.format(asking=shown))
            asks[f.name] = asking[0][1] if asking else f.default
        return cls(**asks)

    @staticmethod
    def batch_flags() -> dict[str, tuple[str, str]]:
        """{`PolicyBatch` field: (the `Regularizer` flag that asks it, what to set the flag to)}."""
        return {f.metadata["stat"]: (f.metadata["flag"], f.metadata["hint"]) for f in fields(ForwardAsks)}


class TokenStats(NamedTuple):
    """What one forward of the policy gives per response token (`policy.response_logprobs`, the
    learner's `_logprobs`): the log-probs, and each other field when asked, else None. The fields
    are `PolicyBatch`'s of the same name.

    logp         [n, T]      log-probs of the sampled tokens
    entropy      [n, T]      entropy of softmax(z / temperature) (`with_entropy`)
    topk_logp    [n, T, k]   the k most probable tokens' log-probs (`ForwardAsks.topk` = k, SimKO's)
    top1         [n, T]      bool: the sampled token is the most probable (with `topk_logp`)
    proxy_logp   [n, T]      the sampled tokens' log-probs under the min-p proxy, detached
                             (`ForwardAsks.min_p`, Lp-Reg's)
    topp_entropy [n, T]      the nucleus entropy (`ForwardAsks.topp` = (top_p, top_k), SIREN's)
    scaled_logp  [n, T, S]   the sampled tokens' log-probs under the logits scaled by each of
                             `ForwardAsks.logit_scales` (S of them, ERA's activation)
    clamped_entropy [n, T]   the clamped entropy (`ForwardAsks.clamp_p`, AEnt's)
    """

    logp: Tensor
    entropy: Tensor | None = None
    topk_logp: Tensor | None = None
    top1: Tensor | None = None
    proxy_logp: Tensor | None = None
    topp_entropy: Tensor | None = None
    scaled_logp: Tensor | None = None
    clamped_entropy: Tensor | None = None


@dataclass
class PolicyBatch:
    """What a regularizer sees for a set of sequences (a micro-batch, or a whole mini-batch).

    rows       [n]      indices of these sequences inside the optimizer mini-batch
    logp       [n, T]   current log-probs of the sampled tokens (with grad in `shape`)
    old_logp   [n, T]   rollout-policy log-probs (no grad)
    advantages [n, T]   per-token advantages (sequence advantage broadcast)
    mask       [n, T]   response mask (float)
    entropy    [n, T] | None   current per-token entropy of softmax(z / temperature), with grad,
                               if a regularizer sets `needs_entropy`
    ref_logp   [n, T] | None   reference-model log-probs if requested
    old_entropy [n, T] | None  rollout-policy entropy (recorded by the sampler, or recomputed
                               with the old log-probs by `recompute_logprobs`; no grad)
    kl_scale   [n, T] | None   per-token scale of the KL-to-reference penalty set by a regularizer
                               in `prepare` (`Regularizer.kl_scale`; Archer's), which ReferenceKL
                               applies; None = 1 everywhere
    topk_logp  [n, T, k] | None  current log-probs of the k most probable tokens at each position
                               (largest first; indices from the detached logits), with grad, if a
                               regularizer sets `needs_topk` = k (the largest k asked)
    top1       [n, T] | None   bool: the sampled token is the current policy's most probable one
                               (with `topk_logp`)
    proxy_logp [n, T] | None   log-prob of the sampled token under the current policy's min-p proxy
                               (tokens with probability below min_p times the largest dropped, the
                               rest renormalised; detached; -inf where the token itself is dropped),
                               if a regularizer sets `needs_min_p` (Lp-Reg)
    topp_entropy [n, T] | None  current entropy of each position's top-p nucleus, renormalised
                               (`algorithms.token_topp_entropy`), with grad, if a regularizer sets
                               `needs_topp_entropy` = (top_p, top_k)
    scaled_logp [n, T, S] | None  current log-probs of the sampled tokens under softmax(s z / temperature)
                               for each s of the scales a regularizer asks (`needs_logit_scales`, in
                               that order; `algorithms.token_scaled_logprobs`), with grad (ERA's)
    clamped_entropy [n, T] | None  current entropy of softmax(z / temperature) renormalised over
                               all but the int(V clamp_p) lowest-logit tokens
                               (`algorithms.token_clamped_entropy`), with grad, if a regularizer
                               sets `needs_clamped_entropy` = clamp_p (AEnt)
    """

    rows: Tensor
    logp: Tensor
    old_logp: Tensor
    advantages: Tensor
    mask: Tensor
    entropy: Tensor | None = None
    ref_logp: Tensor | None = None
    old_entropy: Tensor | None = None
    kl_scale: Tensor | None = None
    topk_logp: Tensor | None = None
    top1: Tensor | None = None
    proxy_logp: Tensor | None = None
    topp_entropy: Tensor | None = None
    scaled_logp: Tensor | None = None
    clamped_entropy: Tensor | None = None


@dataclass
class TokenShaping:
    """A regularizer's per-token contribution. The learner first adds every regularizer's
    `advantage_shift` to the advantages fed to the policy objective, then combines
    loss_tok = (objective(advantages + sum(shifts)) * prod(weights) + sum(penalties)) * scope, aggregated once.

    weight          [n, T] | None   multiplicative weight on the base surrogate (0 = drop token)
    penalty         [n, T] | None   additive per-token term with gradient
    advantage_shift [n, T] | None   detached additive change of the advantage, applied inside the
                                    objective (e.g. an entropy-based advantage)
    clip_low        [n, T] | None   per-token clip range (eps_low, eps_high) that replaces the
    clip_high       [n, T] | None   objective's own on both sides (Archer's); both or neither, from
                                    a regularizer with `sets_clip_range` (at most one per run),
                                    the bounds its `clip_bounds()` gave for these rows
    logp_grad       [n, T] | None   a term of value 0 (x - x.detach()) added to the log-probs the
                                    objective reads: the loss's value is unchanged, and each token's
                                    objective gradient coefficient dL/dlogp also multiplies the
                                    gradient of this term (SimKO moves part of a token's gradient
                                    from the sampled token to the top-K candidates this way); the
                                    terms of several regularizers add, each against the raw log-prob
                                    (ERA's swap to log pi'(y) plus SimKO's mix c (mean_k log pi(top_k)
                                    - log pi(y)) on a token both act on)
    scope           [n, T] | None   0/1: the tokens this update trains at all, from a regularizer with
                                    `update_phases` > 1 (Lopti's phase): multiplies the whole token loss,
                                    objective and every penalty; the others stay in the denominators
    """

    weight: Tensor | None = None
    penalty: Tensor | None = None
    advantage_shift: Tensor | None = None
    clip_low: Tensor | None = None
    clip_high: Tensor | None = None
    logp_grad: Tensor | None = None
    scope: Tensor | None = None

    @staticmethod
    def checked(shaping: Any, shape: torch.Size, owner: Any) -> "TokenShaping":
        """`shaping` as returned by `owner.shape(batch)`, once it is a TokenShaping whose fields are
        all [n, T] (`shape`, the log-probs'); else a ValueError naming the regularizer. Broadcasting
        let a per-sequence [n] penalty add sequence j's value to token column j when n == T."""
        who = f"regularizer {getattr(owner, 'name', owner)!r} ({type(owner).__name__}.shape)"
        if not isinstance(shaping, TokenShaping):
            raise ValueError(f"{who} returned {type(shaping).__name__}, not a TokenShaping (TokenShaping() for none)")
        for name in ("weight", "penalty", "advantage_shift", "clip_low", "clip_high", "logp_grad", "scope"):
            value = getattr(shaping, name)
            if value is not None and value.shape != shape:
                raise ValueError(f"{who} returned TokenShaping.{name} of shape {tuple(value.shape)}; every field is "
                                 f"per token, [n, T] = {tuple(shape)}")
        if (shaping.clip_low is None) != (shaping.clip_high is None):
            raise ValueError(f"{who} returned TokenShaping.clip_low and clip_high, one of them None: a per-token clip "
                             "range sets both")
        if shaping.clip_low is not None and not getattr(owner, "sets_clip_range", False):
            raise ValueError(f"{who} returned a per-token clip range without sets_clip_range = True (the start-up "
                             "checks and Clip-Cov's clipped tokens would not know it)")
        if shaping.scope is not None and getattr(owner, "update_phases", 1) < 2:
            raise ValueError(f"{who} returned TokenShaping.scope without update_phases > 1 (a scope restricts a phase)")
        return shaping

    @staticmethod
    def clip_range(shapings: list["TokenShaping"]) -> tuple[Tensor, Tensor] | None:
        """The per-token clip range (eps_low, eps_high) detached, of the one regularizer that sets
        one (`check_stack` refuses two), else None (the objective's own range)."""
        for s in shapings:
            if s.clip_low is not None:
                return s.clip_low.detach(), s.clip_high.detach()
        return None

    @staticmethod
    def redirected_logp(shapings: list["TokenShaping"], logp: Tensor) -> Tensor:
        """logp + every regularizer's value-0 `logp_grad` term (logp itself, the same tensor, when
        none returns one)."""
        out = logp
        for s in shapings:
            if s.logp_grad is not None:
                out = out + s.logp_grad
        return out

    @staticmethod
    def shifted_advantages(shapings: list["TokenShaping"], advantages: Tensor) -> Tensor:
        """advantages + the sum of every regularizer's (detached) advantage shift."""
        out = advantages
        for s in shapings:
            if s.advantage_shift is not None:
                out = out + s.advantage_shift.detach()
        return out

    @staticmethod
    def combine(shapings: list["TokenShaping"], base: Tensor) -> Tensor:
        """Two regularizers act as the product of their weights and the sum of their penalties; the
        sum times the scope (none: 1)."""
        out = base
        for s in shapings:
            if s.weight is not None:
                out = out * s.weight
        for s in shapings:
            if s.penalty is not None:
                out = out + s.penalty
        for s in shapings:
            if s.scope is not None:
                out = out * s.scope
        return out
