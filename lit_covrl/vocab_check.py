"""Start-up checks that a tokenizer and the models reading its ids agree: every id has an embedding
row (`check_vocab`), and a tokenizer or reference model named beside the policy's has the policy
tokenizer's own vocabulary (`check_same_vocab`), so that no model reads another model's ids as its
own tokens (a reference of another vocabulary made ReferenceKL compare unrelated tokens, review
byo25 F15)."""
from __future__ import annotations

from torch import nn

from lit_covrl.model_specs import _pretrained_args
from lit_covrl.policy import read_tokenizer

# the files a model folder (or hub repository) holds its tokenizer in
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def check_vocab(tokenizer, model: nn.Module, model_spec: str, tokenizer_spec: str | None = None,
                model_field: str = "model.model") -> None:
    """ValueError unless every token id the tokenizer can produce has a row in the model's
    embedding: a tokenizer of another model (or a model saved with a cut vocabulary) failed inside
    the first rollout with a bare `IndexError: index out of range` (a device-side assert on CUDA).
    A tokenizer shorter than the embedding is normal (Qwen pads its vocabulary)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embedding, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    if rows is None or len(tokenizer) <= rows:
        return
    if tokenizer_spec:
        raise ValueError(f"model.tokenizer={tokenizer_spec!r} has {len(tokenizer)} tokens, but the model of "
                         f"{model_field}={model_spec!r} embeds only {rows}: use that model's own tokenizer "
                         "(model.tokenizer: null)")
    if model_field != "model.model":  # the reference model, read with the policy's tokenizer
        raise ValueError(f"{model_field}={model_spec!r} embeds only {rows} tokens, but the policy's tokenizer has "
                         f"{len(tokenizer)}: the reference must share the policy's vocabulary")
    raise ValueError(f"model.model={model_spec!r}: its tokenizer has {len(tokenizer)} tokens, but its model "
                     f"embeds only {rows} (vocab_size in its config.json): the folder's tokenizer and weights "
                     "do not belong together")


def own_tokenizer(spec: str):
    """The tokenizer a model spec ships with, as `read_tokenizer` reads it, or None for a folder (or
    hub repository) of weights without tokenizer files: transformers would build a stand-in from the
    model type for it (a Qwen2 folder of weights only gets a Qwen2Tokenizer of 1 token)."""
    from transformers.utils import cached_file

    path, kwargs = _pretrained_args(spec)
    if not kwargs and not any(cached_file(path, name, _raise_exceptions_for_missing_entries=False)
                              for name in TOKENIZER_FILES):
        return None
    return read_tokenizer(spec)


def check_same_vocab(tokenizer, tokenizer_field: str, tokenizer_spec: str, other_field: str, other_spec: str) -> None:
    """ValueError naming both settings when the model of `other_field` ships a tokenizer whose
    vocabulary (`get_vocab()`: token -> id, added tokens included) is not the policy tokenizer's, the
    one `tokenizer_field` names; a model without tokenizer files is left to `check_vocab`."""
    if other_spec == tokenizer_spec:
        return
    other = own_tokenizer(other_spec)
    if other is None:
        return
    mine, theirs = tokenizer.get_vocab(), other.get_vocab()
    if mine == theirs:
        return
    token = next((t for t in sorted(mine) if theirs.get(t) != mine[t]), None)
    token = token if token is not None else min(set(theirs) - set(mine))
    raise ValueError(
        f"{other_field}={other_spec!r} has another vocabulary than the policy's tokenizer ({tokenizer_field}="
        f"{tokenizer_spec!r}): {len(theirs)} tokens vs the policy's {len(mine)}, {token!r} is id {theirs.get(token)} "
        f"there and {mine.get(token)} in the policy's. It would read the policy's token ids as other tokens; "
        "use models (and a tokenizer) of one vocabulary"
    )
