"""Typed containers that cross module boundaries.

Shapes: B prompts, G samples per prompt, N = B*G sequences, P prompt tokens (left-padded),
T response tokens (right-padded), V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class Example:
    """One verifiable prompt: the text shown to the policy and the reference answer."""

    prompt: str
    answer: str


@dataclass
class PromptBatch:
    """B prompts with their answers, as yielded by the datamodule.

    index: position k = 0, 1, 2, ... of this batch in this rank's train stream; -1 for batches
    that are not part of it (validation).
    """

    prompts: list[str]
    answers: list[str]
    index: int = -1

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def from_examples(cls, examples: list[Example], index: int = -1) -> "PromptBatch":
        return cls([e.prompt for e in examples], [e.answer for e in examples], index)


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
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    logp: Tensor
    entropy: Tensor
    truncated: Tensor
    completions: list[str] = field(default_factory=list)
    nonfinite: Tensor | None = None

    def __post_init__(self) -> None:
        if self.nonfinite is None:
            self.nonfinite = torch.zeros(self.truncated.shape, dtype=torch.bool, device=self.truncated.device)


@dataclass
class PolicyBatch:
    """What a regularizer sees for a set of sequences (a micro-batch, or a whole mini-batch).

    rows       [n]      indices of these sequences inside the optimizer mini-batch
    logp       [n, T]   current log-probs of the sampled tokens (with grad in `shape`)
    old_logp   [n, T]   rollout-policy log-probs (no grad)
    advantages [n, T]   per-token advantages (sequence advantage broadcast)
    mask       [n, T]   response mask (float)
    entropy    [n, T] | None   per-token entropy at temperature 1 (with grad) if requested
    ref_logp   [n, T] | None   reference-model log-probs if requested
    """

    rows: Tensor
    logp: Tensor
    old_logp: Tensor
    advantages: Tensor
    mask: Tensor
    entropy: Tensor | None = None
    ref_logp: Tensor | None = None


@dataclass
class TokenShaping:
    """A regularizer's per-token contribution, combined by the module as
    loss_tok = base_loss * weight + penalty, then aggregated once.

    weight  [n, T] | None   multiplicative weight on the base surrogate (e.g. 0 = detach token)
    penalty [n, T] | None   additive per-token term with gradient
    """

    weight: Tensor | None = None
    penalty: Tensor | None = None

    @staticmethod
    def combine(shapings: list["TokenShaping"], base: Tensor) -> Tensor:
        """Two regularizers act as the product of their weights and the sum of their penalties."""
        out = base
        for s in shapings:
            if s.weight is not None:
                out = out * s.weight
        for s in shapings:
            if s.penalty is not None:
                out = out + s.penalty
        return out
