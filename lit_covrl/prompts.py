"""Turn prompts into left-padded token ids (chat template when the tokenizer has one).

A prompt is a string (sent as one user message when the template is used) or a conversation, a
list of `{role, content}` messages, which goes through the chat template as is (and so needs
one)."""
from __future__ import annotations

import torch
from torch import Tensor

PROMPT_OVERFLOW = ("error", "truncate_left")


class PromptTooLongError(ValueError):
    """A prompt longer than `max_prompt_length` under `prompt_overflow: error`."""


def short_prompt(prompt: str | list[dict], limit: int = 80) -> str:
    """The first `limit` characters of a prompt for a message: of its text, or of a conversation's
    printed messages (slicing the list would keep whole messages, however long)."""
    return (prompt if isinstance(prompt, str) else str(prompt))[:limit]


def prompt_texts(tokenizer, prompts: list[str | list[dict]], *, chat_template: bool | None = None) -> tuple[list[str], bool]:
    """(the texts the tokenizer encodes, whether they went through the chat template); see
    `encode_prompts` for `chat_template`."""
    use_template = uses_chat_template(tokenizer, chat_template)
    return [_render(tokenizer, p, use_template) for p in prompts], use_template


def uses_chat_template(tokenizer, chat_template: bool | None) -> bool:
    """Whether prompts go through the tokenizer's chat template (see `encode_prompts`)."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat_template and not has_template:
        raise ValueError("model.rollout.chat_template is true but the tokenizer has no chat template")
    return has_template if chat_template is None else bool(chat_template)


def prompt_token_ids(tokenizer, prompts: list[str | list[dict]], *, chat_template: bool | None = None) -> list[list[int]]:
    """The token ids of each prompt as the policy sees it (templated or raw), unpadded, untruncated."""
    texts, use_template = prompt_texts(tokenizer, prompts, chat_template=chat_template)
    return tokenizer(texts, add_special_tokens=not use_template)["input_ids"]


def encode_prompts(
    tokenizer,
    prompts: list[str | list[dict]],
    *,
    chat_template: bool | None = None,
    max_prompt_length: int = 512,
    overflow: str = "error",
) -> tuple[Tensor, Tensor]:
    """Return (input_ids [B, P], attention_mask [B, P]), left-padded.

    chat_template: None = use the tokenizer's template if it has one; True = require it; False = raw text.
    overflow: what to do with a prompt longer than max_prompt_length: "error" (ValueError naming the
    prompt) or "truncate_left" (keep its last max_prompt_length tokens).
    """
    if overflow not in PROMPT_OVERFLOW:
        raise ValueError(f"prompt_overflow={overflow!r}; valid: {list(PROMPT_OVERFLOW)}")
    ids = prompt_token_ids(tokenizer, prompts, chat_template=chat_template)
    too_long = [i for i, x in enumerate(ids) if len(x) > max_prompt_length]
    if too_long and overflow == "error":
        i = too_long[0]
        raise PromptTooLongError(
            f"prompt {short_prompt(prompts[i])!r} has {len(ids[i])} tokens > max_prompt_length={max_prompt_length}; "
            "raise model.rollout.max_prompt_length or set model.rollout.prompt_overflow: truncate_left"
        )
    ids = [x[-max_prompt_length:] for x in ids]
    return _left_pad(ids, tokenizer.pad_token_id)


def _render(tokenizer, prompt: str | list[dict], use_template: bool) -> str:
    if isinstance(prompt, str):
        if not use_template:
            return prompt
        prompt = [{"role": "user", "content": prompt}]
    elif not use_template:
        has_template = getattr(tokenizer, "chat_template", None) is not None
        why = "model.rollout.chat_template is false" if has_template else "the tokenizer has no chat template"
        raise ValueError(f"prompt {short_prompt(prompt)!r} is a conversation (a list of messages) but {why}; "
                         "use string prompts or a tokenizer with a chat template")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def _left_pad(ids: list[list[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(x) for x in ids)
    out = torch.full((len(ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        if x:
            out[row, width - len(x) :] = torch.tensor(x, dtype=torch.long)
            mask[row, width - len(x) :] = 1
    return out, mask
