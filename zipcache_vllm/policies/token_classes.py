"""Token classes for FastGen's hybrid policies: special and punctuation tokens.

* special: the tokenizer's special ids (BOS/EOS, the chat template's markers such
  as ``<|im_start|>``, which are registered as special tokens);
* punct: vocabulary pieces whose text is made only of whitespace and ASCII
  punctuation.

The table is computed once per tokenizer (one pass over the vocabulary) and
cached in the process; token ids are then classified by indexing.
"""
from __future__ import annotations

import string
from functools import lru_cache

import torch

SPECIAL = 1  # bit of the class byte
PUNCT = 2

_PUNCT_CHARS = frozenset(string.punctuation)


def is_punct_text(text: str) -> bool:
    """True for a non-empty string of whitespace and punctuation only."""
    return bool(text) and all(ch in _PUNCT_CHARS or ch.isspace() for ch in text)


def build_class_table(tokenizer) -> torch.Tensor:
    """uint8 ``[vocab]``: ``SPECIAL`` / ``PUNCT`` bits of every token id."""
    n = max(len(tokenizer), max(tokenizer.all_special_ids, default=0) + 1)
    table = torch.zeros(n, dtype=torch.uint8)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    for i, piece in enumerate(pieces):
        if piece is not None and is_punct_text(tokenizer.convert_tokens_to_string([piece])):
            table[i] |= PUNCT
    for i in tokenizer.all_special_ids:
        table[i] = SPECIAL
    return table


@lru_cache(maxsize=8)
def class_table(tokenizer_path: str) -> torch.Tensor:
    """The class table of the tokenizer at ``tokenizer_path`` (computed once per process)."""
    from transformers import AutoTokenizer

    return build_class_table(AutoTokenizer.from_pretrained(tokenizer_path))


def classify(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """uint8 class bytes of ``ids`` (ids outside the table are plain tokens)."""
    ids = ids.to(torch.int64)
    inside = (ids >= 0) & (ids < table.numel())
    return torch.where(inside, table[ids.clamp(0, table.numel() - 1)], torch.zeros_like(table[:1]))


def masks(cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``(special, punct)`` masks from class bytes."""
    return (cls & SPECIAL).bool(), (cls & PUNCT).bool()
