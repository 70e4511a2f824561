"""Sizes on the command line, parsed the way vLLM parses them (standard library only: the
CLI builds its parser without importing vLLM).

``human_readable_int`` repeats ``vllm.utils.argparse_utils.human_readable_int``, the type of
vLLM's ``--kv-cache-memory-bytes``, ``--max-num-batched-tokens`` and (with ``auto``)
``--max-model-len``: a plain integer, or a number with a suffix, ``k m g t`` decimal
(``25.6k`` = 25,600) and ``K M G T`` binary (``2G`` = 2 x 2**30, no decimals).
``tests/tools/test_planner.py`` checks it against vLLM's on the same strings.
"""
from __future__ import annotations

import argparse
import re

DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def human_readable_int(value: str) -> int:
    """``'1k'`` -> 1000, ``'1K'`` -> 1024, ``'2G'`` -> 2147483648, ``'512'`` -> 512."""
    value = value.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT])", value)
    if match is None:
        try:
            return int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer or a size such as 512M, 2G, 25.6k: {value!r}") from None
    number, suffix = match.groups()
    if suffix in DECIMAL:
        return int(float(number) * DECIMAL[suffix])
    if "." in number:
        raise argparse.ArgumentTypeError(f"decimals are not allowed with binary suffixes like {suffix}: "
                                         f"{value!r} (did you mean {number}{suffix.lower()}?)")
    return int(number) * BINARY[suffix]


def format_bytes(n: int) -> str:
    """``n`` in the shortest form :func:`human_readable_int` reads back exactly (``2G``, ``136M``)."""
    for suffix in ("T", "G", "M", "K"):
        if n and n % BINARY[suffix] == 0:
            return f"{n // BINARY[suffix]}{suffix}"
    return str(n)
