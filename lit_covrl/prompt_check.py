"""Start-up check of every known prompt (prompt files, HF datasets) against the policy's tokenizer.

Run once by `GRPOModule.setup`, where the tokenizer and the chat template are known, on the
datamodule's `known_examples()` (each with its `file:line`):
- `data.system_prompt` without a chat template to put it in is a ValueError naming both settings;
- a prompt the chat template rejects (it raises, e.g. "roles must alternate", "System role not
  supported") raises ValueError naming its file:line (and `data.system_prompt` when it is set);
- a prompt longer than `max_prompt_length` raises ValueError naming its file:line (when the
  module's `prompt_overflow` is "error");
- a prompt that encodes to the tokenizer's unknown token (characters it cannot represent: the
  model would see `<unk>` where the text had them) or to no token at all is *unencodable*; these
  are returned with a reason, and the datamodule rejects them (an error naming file:line, or
  skipped and counted, see `PromptDataModule(unencodable_prompts=...)`).
Tokenizers without an unknown token (byte-level BPE) represent every text; only an empty encoding
can then be reported.
"""
from __future__ import annotations

import logging

from lit_covrl.prompts import prompt_texts, short_prompt, uses_chat_template
from lit_covrl.types import Example, data_prompt

try:
    from jinja2 import TemplateError  # what transformers' chat templates raise
except ImportError:  # no jinja2: no chat template can be rendered (nor raise)
    TemplateError = ()  # type: ignore[assignment,misc]

log = logging.getLogger("lit_covrl")

__all__ = ["find_unencodable", "where"]

_CHUNK = 512  # prompts per tokenizer call


def where(example: Example) -> str:
    """`file:line` of a prompt read from a file, else a placeholder."""
    return example.source or "a prompt"


def _unknown_characters(tokenizer, text: str, add_special_tokens: bool, unk: int) -> list[str]:
    """The distinct pieces of `text` that became the unknown token (fast tokenizers; else [])."""
    try:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return []
    pieces = [text[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == unk and b > a]
    return list(dict.fromkeys(pieces))


def _reason(tokenizer, prompt: str | list[dict], text: str, ids: list[int], add_special_tokens: bool,
            special: set[int]) -> str | None:
    """Why the prompt is unencodable, or None. `special`: the special token ids but the unknown one."""
    unk = tokenizer.unk_token_id
    content = [i for i in ids if i not in special]
    if not content:
        return f"prompt {short_prompt(prompt)!r} encodes to no token"
    n_unk = content.count(unk) if unk is not None else 0
    if not n_unk:
        return None
    pieces = _unknown_characters(tokenizer, text, add_special_tokens, unk)
    shown = f": {', '.join(map(repr, pieces[:10]))}{' ...' if len(pieces) > 10 else ''}" if pieces else ""
    return (f"prompt {short_prompt(prompt)!r} has {n_unk} of {len(content)} tokens unknown to the tokenizer "
            f"({tokenizer.unk_token!r}){shown}")


def _texts(tokenizer, chunk: list[Example], chat_template: bool | None, hint: str) -> tuple[list[str], bool]:
    """`prompt_texts` of the chunk's prompts; ValueError naming file:line of the first prompt the
    chat template rejects (with `hint` appended)."""
    try:
        return prompt_texts(tokenizer, [ex.prompt for ex in chunk], chat_template=chat_template)
    except TemplateError:
        for ex in chunk:
            try:
                prompt_texts(tokenizer, [ex.prompt], chat_template=chat_template)
            except TemplateError as e:
                msg = " ".join(str(e).split())  # one line
                raise ValueError(f"{where(ex)}: the chat template rejects this prompt: {msg}{hint}") from e
        raise


def find_unencodable(
    tokenizer, examples: list[Example], *, chat_template: bool | None = None, max_prompt_length: int | None = None,
    template_hint: str = "", too_long: list[tuple[Example, int]] | None = None,
) -> list[tuple[Example, str]]:
    """[(example, reason)] for the prompts that encode to unknown tokens or to nothing, in order.

    Raises ValueError naming file:line for the first prompt over `max_prompt_length` (None: no limit)
    unless `too_long` is given, which then collects (example, its token count) of each such prompt
    (`prompt_overflow: truncate_left` cuts them), and for the first prompt the chat template rejects
    (`template_hint` appended to that message).
    """
    bad: list[tuple[Example, str]] = []
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    for start in range(0, len(examples), _CHUNK):
        chunk = examples[start : start + _CHUNK]
        texts, templated = _texts(tokenizer, chunk, chat_template, template_hint)
        ids = tokenizer(texts, add_special_tokens=not templated)["input_ids"]
        for ex, text, x in zip(chunk, texts, ids):
            if max_prompt_length is not None and len(x) > max_prompt_length:
                if too_long is None:
                    raise ValueError(
                        f"{where(ex)}: prompt {short_prompt(ex.prompt)!r} has {len(x)} tokens > max_prompt_length="
                        f"{max_prompt_length}; raise model.rollout.max_prompt_length or set model.rollout.prompt_overflow: truncate_left"
                    )
                too_long.append((ex, len(x)))
            reason = _reason(tokenizer, ex.prompt, text, x, not templated, special)
            if reason is not None:
                bad.append((ex, reason))
    return bad


def check_datamodule_prompts(tokenizer, dm, *, chat_template: bool | None, max_prompt_length: int | None,
                             truncate: bool = False) -> None:
    """GRPOModule's start-up check of a datamodule's prompts: fail at start-up, not hours in, on a
    prompt over `max_prompt_length` (None: not checked), naming its file:line, or with `truncate`
    (`prompt_overflow: truncate_left`) warn how many will lose their first tokens; prompts the
    tokenizer cannot represent are counted, reported and handed to the datamodule
    (`reject_prompts`: an error or skipped, its setting decides). A task's generated prompts are
    only reported (from `task_sample()`), never dropped. `data.system_prompt` without a chat
    template, and a prompt the chat template rejects, are errors."""
    hint = _check_system_prompt(tokenizer, getattr(dm, "hparams", {}).get("system_prompt"), chat_template)
    if hasattr(dm, "known_examples"):
        examples = dm.known_examples()
    else:
        examples = [Example(p, "") for p in dm.known_prompts()]
    _warn_pretemplated(tokenizer, examples, chat_template)
    long: list[tuple[Example, int]] | None = [] if truncate else None
    bad = find_unencodable(tokenizer, examples, chat_template=chat_template, max_prompt_length=max_prompt_length,
                           template_hint=hint, too_long=long)
    _warn_truncated(long, len(examples), max_prompt_length, "prompts")
    if bad:
        log.warning("%d of %d prompts encode to the tokenizer's unknown token or to nothing (first: %s: %s)",
                    len(bad), len(examples), where(bad[0][0]), bad[0][1])
        if hasattr(dm, "reject_prompts"):
            dm.reject_prompts(bad)
    sample = dm.task_sample() if hasattr(dm, "task_sample") else []
    long = [] if truncate else None
    bad = find_unencodable(tokenizer, sample, chat_template=chat_template, max_prompt_length=max_prompt_length,
                           template_hint=hint, too_long=long)  # a task whose prompts are too long fails here, not at its first rollout
    _warn_truncated(long, len(sample), max_prompt_length, "checked prompts of the task (its training prompts are generated alike)")
    if bad:
        log.warning("%d of %d checked prompts of the task encode to the tokenizer's unknown token or to nothing, "
                    "and its training prompts are generated alike (first: %s: %s)",
                    len(bad), len(sample), where(bad[0][0]), bad[0][1])


def _warn_pretemplated(tokenizer, examples: list[Example], chat_template: bool | None) -> None:
    """A warning when string prompts that go through the chat template already hold special tokens
    the template itself writes (`<|im_start|>`): pre-formatted data, templated a second time into a
    user turn that holds a whole conversation (review byo25 F11)."""
    if not examples or not uses_chat_template(tokenizer, chat_template):
        return
    try:
        probe = prompt_texts(tokenizer, ["x"], chat_template=chat_template)[0][0]
    except TemplateError:
        return
    marks = [t for t in dict.fromkeys(getattr(tokenizer, "all_special_tokens", None) or []) if t and t in probe]
    hits = [(ex, mark) for ex in examples if marks and isinstance(text := data_prompt(ex.prompt), str)
            and (mark := next((m for m in marks if m in text), None)) is not None]
    if hits:
        log.warning("%d of %d string prompts already hold special tokens the chat template writes (first: %s: %r): "
                    "the template wraps each again, a user turn holding a whole conversation; set "
                    "model.rollout.chat_template: false to feed them as written", len(hits), len(examples),
                    where(hits[0][0]), hits[0][1])


def _warn_truncated(long: list[tuple[Example, int]] | None, total: int, limit: int | None, what: str) -> None:
    """The start-up warning of `prompt_overflow: truncate_left`: how many prompts lose their first
    tokens (with a chat template, the instruction and the user header go first)."""
    if long:
        ex, n = max(long, key=lambda item: item[1])
        log.warning("%d of %d %s are longer than model.rollout.max_prompt_length=%d and lose their first tokens "
                    "(prompt_overflow: truncate_left); the longest, %s, has %d tokens", len(long), total, what, limit,
                    where(ex), n)


def _check_system_prompt(tokenizer, system_prompt: str | None, chat_template: bool | None) -> str:
    """ValueError when `data.system_prompt` is set but prompts do not go through a chat template;
    else the hint for a chat template error ("" without a system prompt)."""
    if system_prompt is None:
        return ""
    if not uses_chat_template(tokenizer, chat_template):
        why = ("model.rollout.chat_template is false" if getattr(tokenizer, "chat_template", None) is not None
               else "the tokenizer has no chat template (model.rollout.chat_template cannot add one)")
        raise ValueError(f"data.system_prompt needs a chat template, but {why}; unset data.system_prompt "
                         "or put the instruction in the prompts")
    return (" (data.system_prompt adds a system message before every string prompt; unset it if the "
            "template takes no system role)")
