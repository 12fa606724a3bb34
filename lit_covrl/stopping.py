"""When a response ends: end-of-sequence ids and user stop strings.

End-of-sequence ids. Chat models often have several (Qwen2.5-Instruct: `<|im_end|>` and
`<|endoftext|>`; Llama-3-Instruct: `<|eot_id|>` and `<|end_of_text|>`), listed in the model's
generation config while the tokenizer names one. `eos_token_ids` is their union, and the sampler
stops a row at the first of them.

Stop strings (`model.rollout.stop`). Applied after sampling, at the module level: a row whose decoded
response contains a stop string keeps its tokens up to and including the first token at which the
decoded text contains one; the rest is masked out of the loss and the attention mask, replaced by
padding, and the row counts as finished (not truncated). Decoding itself still runs until EOS or
max_new_tokens for those rows (the sampler knows only token ids), so stop strings shorten what is
scored and trained, not the rollout time. The completion text keeps the stop string (and any
characters its last token carries after it).
"""
from __future__ import annotations

from collections.abc import Sequence

from lit_covrl.types import Rollout

__all__ = ["eos_token_ids", "truncate_at_stop_strings"]


def _as_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every end-of-sequence id of the model's generation config and the tokenizer, in that order."""
    config = getattr(model, "generation_config", None)
    ids = _as_list(getattr(config, "eos_token_id", None)) + _as_list(getattr(tokenizer, "eos_token_id", None))
    out = list(dict.fromkeys(ids))
    if not out:
        raise ValueError("neither the model's generation config nor the tokenizer names an end-of-sequence token")
    return out


def _stop_length(tokenizer, tokens: list[int], stop: Sequence[str]) -> int | None:
    """The smallest k such that decode(tokens[:k]) contains a stop string, or None. Binary search:
    a longer prefix decodes to a longer text, so containment is monotone in k. Special tokens are
    decoded too when a stop string names one (e.g. `<|im_end|>` with a base model whose EOS is
    another token), and skipped otherwise."""
    special = getattr(tokenizer, "all_special_tokens", None) or []
    skip = not any(t and t in s for s in stop for t in special)

    def hit(k: int) -> bool:
        text = tokenizer.decode(tokens[:k], skip_special_tokens=skip)
        return any(s in text for s in stop)

    if not tokens or not hit(len(tokens)):
        return None
    lo, hi = 1, len(tokens)  # hit(hi) is True
    while lo < hi:
        mid = (lo + hi) // 2
        if hit(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def truncate_at_stop_strings(rollout: Rollout, tokenizer, prompt_len: int, stop: Sequence[str],
                             pad_token_id: int) -> Rollout:
    """Cut each response after the token that completes its first stop string (in place; returns
    `rollout`). `prompt_len` is P, the width of the prompt part of `rollout.input_ids`."""
    stop = [s for s in stop if s]
    if not stop:
        return rollout
    mask = rollout.response_mask
    lengths = mask.sum(1).long().tolist()
    response = rollout.input_ids[:, prompt_len:]
    for row, n in enumerate(lengths):
        tokens = response[row, :n].tolist()
        k = _stop_length(tokenizer, tokens, stop)
        if k is None or not bool(rollout.truncated[row]) and not tokenizer.decode(tokens[k:], skip_special_tokens=True):
            continue  # no stop string, or only the EOS that ended the row follows it: keep the row whole
        mask[row, k:] = 0
        rollout.attention_mask[row, prompt_len + k:] = 0
        response[row, k:] = pad_token_id
        rollout.truncated[row] = False
    rollout.logp.mul_(mask)
    rollout.entropy.mul_(mask)
    return rollout
