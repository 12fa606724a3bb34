"""The sampler interface and the per-token math every sampler shares.

A sampler turns N left-padded prompt rows into a `Rollout`: one response per row, with, for every
sampled token, its log-probability at the training temperature (the PPO "old" log-prob: the
rollout policy has the same weights as the policy before the first update) and the entropy of
the distribution it was sampled from. Samplers know nothing about rewards.

One decoding step on the logits z [N, V] of the last position (`sample_token`):

    logp  = log_softmax(z / temperature)                       (recorded, training temperature)
    H     = -sum_v p_v log p_v,  p = softmax(z / temperature)  (recorded; terms with p_v = 0 are 0,
                                                                so -inf logits give no NaN)
    token ~ top_p_filter(z / temperature, top_p).softmax()     (torch.multinomial, the caller's generator)

Pure temperature + optional nucleus (top-p); there is no hidden top-k (HF's `generate` defaults
to top_k=50). Both samplers call exactly this function, so given the same logits they draw the
same tokens from the same generator state.

Non-finite logits: a row whose logits contain NaN or +inf, or are all -inf, has no distribution
to sample from (torch.multinomial would raise a device-side error). Its log-softmax is NaN, hence
its entropy, which is how it is detected (one [N] check instead of a pass over [N, V]). Such a row
is flagged (`Rollout.nonfinite`), drawn from uniform weights (the generator advances exactly as
for any other row), its token forced to the first EOS id so the row ends there, and its log-prob
and entropy recorded as 0. GRPOModule stops the run on a flagged rollout (`module.py`). A -inf
logit next to finite ones is a masked token, not an error.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from lit_covrl.types import Rollout


class Sampler:
    """Interface of a rollout sampler (chosen in YAML as `model.sampler`: class_path/init_args)."""

    def sample(
        self,
        model: nn.Module,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        *,
        max_new_tokens: int,
        eos_token_id: int | list[int],
        pad_token_id: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        all_done: Callable[[bool], bool] = lambda done: done,
    ) -> Rollout:
        """Sample one response for each row of `prompt_ids` [N, P] (left-padded, mask `prompt_mask`).

        Decoding stops once every row has emitted an EOS id (`all_done(local_done)` lets
        distributed callers agree, so every rank runs the same number of forwards) or after
        max_new_tokens. Returns a Rollout whose `completions` are left empty (the caller decodes)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def eos_ids(eos_token_id: int | list[int] | tuple[int, ...], device) -> Tensor:
    """The stop ids as a 1-D tensor (one id or a list of ids; every one ends a sequence)."""
    ids = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    if not ids or any(i is None for i in ids):
        raise ValueError(f"eos_token_id={eos_token_id!r}: need at least one token id")
    return torch.as_tensor(ids, dtype=torch.long, device=device)


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Set to -inf the logits outside the smallest set whose probability mass reaches top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop_sorted = (probs.cumsum(-1) - probs) >= top_p  # keep the token that crosses top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def token_distribution(logits: Tensor, temperature: float, top_p: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The deterministic half of a decoding step, on logits [N, V]: (log_softmax(z / temperature)
    [N, V], its entropy [N], the top-p filtered sampling probabilities [N, V], nonfinite [N] bool).
    No random numbers, no host sync: `StaticCacheSampler` captures it in its CUDA graph."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    logp_all = torch.log_softmax(z, -1)
    p = logp_all.exp()
    entropy = torch.special.entr(p).sum(-1)  # entr(0) = 0: -inf logits add nothing
    bad = entropy.isnan()  # NaN / +inf logits or an all -inf row make the whole log-softmax row NaN
    probs = p if top_p >= 1.0 else top_p_filter(z, top_p).softmax(-1)
    return logp_all, entropy.masked_fill(bad, 0.0), probs.masked_fill(bad[:, None], 1.0), bad


def draw_token(logp_all: Tensor, probs: Tensor, bad: Tensor, generator: torch.Generator | None,
               stop_id: Tensor) -> tuple[Tensor, Tensor]:
    """The random half: token [N] ~ probs (torch.multinomial with the caller's generator; flagged
    rows get `stop_id`) and its log-prob [N] from logp_all."""
    tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    tok = torch.where(bad, stop_id, tok)
    return tok, logp_all.gather(-1, tok[:, None]).squeeze(-1).masked_fill(bad, 0.0)


def sample_token(
    logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None, stop_id: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One decoding step on logits [N, V] -> (token [N], logp [N] at `temperature`, entropy [N] of
    softmax(z / temperature), nonfinite [N] bool). See the module docstring."""
    logp_all, entropy, probs, bad = token_distribution(logits, temperature, top_p)
    tok, logp = draw_token(logp_all, probs, bad, generator, stop_id)
    return tok, logp, entropy, bad


def finish_rollout(prompt_ids: Tensor, prompt_mask: Tensor, tokens: Tensor, alive: Tensor, logp: Tensor,
                   entropy: Tensor, finished: Tensor, nonfinite: Tensor) -> Rollout:
    """Assemble a Rollout from per-step columns [N, T] (alive: the row had not ended before the step)."""
    m = alive.float()
    return Rollout(
        input_ids=torch.cat([prompt_ids, tokens], 1),
        attention_mask=torch.cat([prompt_mask.long(), alive.long()], 1),
        response_mask=m,
        logp=logp * m,
        entropy=entropy * m,
        truncated=~finished,
        nonfinite=nonfinite,
    )
