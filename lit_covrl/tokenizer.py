"""A character-level Hugging Face tokenizer for the built-in tasks and the tiny embedded model.

Every character of `alphabet` is one token; anything else maps to "<unk>". Ids 0..3 are the
special tokens pad "<pad>", unk "<unk>", bos "<bos>", eos "<eos>", then the alphabet in order.
No special token is added automatically: encode("47+85=") is exactly 6 ids. Decoding
concatenates the characters (no spaces); `skip_special_tokens=True` drops pad/unk/bos/eos (so
an unknown character then decodes to nothing).
The result is a plain `PreTrainedTokenizerFast` (a `tokenizer.json`), so `save_pretrained` and
`PreTrainedTokenizerFast.from_pretrained(folder)` round-trip without any lit_covrl code. (In a
folder whose config.json names a model type such as qwen2, transformers 5's `AutoTokenizer` builds
that type's own tokenizer class instead, which drops unknown characters rather than mapping them
to "<unk>"; `lit_covrl.policy.load_tokenizer` keeps the saved one.)
"""
from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "build_char_tokenizer"]

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>",
                  "eos_token": "<eos>"}


def build_char_tokenizer(alphabet: str, padding_side: str = "left") -> PreTrainedTokenizerFast:
    """Character-level tokenizer over `alphabet` (distinct characters, order kept).

    Args:
        alphabet: the characters to give ids to, e.g. "0123456789+-=".
        padding_side: "left" (what batched generation needs) or "right".
    """
    if not alphabet:
        raise ValueError("alphabet must be a non-empty string")
    if len(set(alphabet)) != len(alphabet):
        raise ValueError(f"alphabet has repeated characters: {alphabet!r}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    specials = list(SPECIAL_TOKENS.values())
    vocab = {tok: i for i, tok in enumerate(specials + list(alphabet))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    # One pre-token per character ("[\s\S]" so that newlines are split too, and become <unk>).
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        padding_side=padding_side,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
        **SPECIAL_TOKENS,
    )
