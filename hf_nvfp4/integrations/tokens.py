"""The one tokenization rule for scoring and prompting, for any tokenizer.

Text is encoded without the tokenizer's special tokens; a BOS is put in front only when the
tokenizer's default call puts one there (so the model saw it in training: ``data.py`` packs
documents with the default call). Nothing is ever appended: ByT5's byte tokenizer, for
one, appends ``</s>`` by default, which would end a prompt or a scored context early.

>>> from transformers import ByT5Tokenizer
>>> from hf_nvfp4.integrations.tokens import encode_pair, encode_prompt
>>> encode_prompt(ByT5Tokenizer(), "hi")                 # no trailing </s> (id 1)
[107, 108]
>>> encode_pair(ByT5Tokenizer(), "hello wor", "ld")[1]   # the continuation is exactly "ld"
[111, 103]
"""

from __future__ import annotations

import weakref

_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def bos_prefix(tokenizer) -> list[int]:
    """``[bos_token_id]`` if the tokenizer's default encoding starts with its BOS, else ``[]``."""
    try:
        return _BOS[tokenizer]
    except (KeyError, TypeError):
        pass
    bos = getattr(tokenizer, "bos_token_id", None)
    out: list[int] = []
    if bos is not None:
        with_special = tokenizer.encode("a", add_special_tokens=True)
        plain = tokenizer.encode("a", add_special_tokens=False)
        if with_special[:1] == [bos] and plain[:1] != [bos]:
            out = [bos]
    try:
        _BOS[tokenizer] = out
    except TypeError:
        pass
    return out


def encode_text(tokenizer, text: str) -> list[int]:
    """``text``'s tokens alone: no BOS, no EOS, no other special token."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A prompt for generation or a scored context: BOS where the model expects it, nothing appended."""
    ids = encode_text(tokenizer, text)
    bos = bos_prefix(tokenizer)
    return ids if not bos or ids[:1] == bos else bos + ids


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): each text tokenized once, no special token between or after.

    The pair is tokenized as one text and split where the context's own tokens end, so a
    tokenizer that marks word starts (SentencePiece's dummy prefix) sees the continuation in
    place; if a token straddles the boundary, the continuation is tokenized on its own instead.
    """
    ctx = encode_text(tokenizer, context)
    whole = encode_text(tokenizer, context + continuation)
    cont = whole[len(ctx) :] if whole[: len(ctx)] == ctx else encode_text(tokenizer, continuation)
    bos = bos_prefix(tokenizer)
    if bos and ctx[:1] != bos:
        ctx = bos + ctx
    return ctx, cont
