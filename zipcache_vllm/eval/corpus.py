"""Real English text that ships with every Python: the Python documentation's topics.

Source: ``pydoc_data.topics`` in the standard library (the text of the Python
Language Reference and Library Reference used by ``help()``), licensed under
the Python Software Foundation License. Indented lines (code and grammar
blocks) and heading underlines are dropped, leaving prose paragraphs. No
download: the text is on every machine that runs Python.
"""
from __future__ import annotations

import re

_UNDERLINE = re.compile(r"^[*=\-~^\"]{3,}\s*$")


#: Characters at the end of the prose held out for calibration (``calibrate.py``, about
#: 4,000 tokens): no evaluation, benchmark or test prompt reads them.
CALIBRATION_CHARS = 20_000


def english_text() -> str:
    """The evaluation text: the prose of the Python documentation topics, paragraphs
    separated by blank lines, without its held-out end (:func:`calibration_text`)."""
    return _split()[0]


def calibration_text() -> str:
    """The last paragraphs of the prose (at least ``CALIBRATION_CHARS`` characters), which
    only calibration reads."""
    return _split()[1]


def _split() -> tuple[str, str]:
    text = _prose()
    cut = text.rindex("\n\n", 0, len(text) - CALIBRATION_CHARS)
    return text[:cut], text[cut + 2:]


def _prose() -> str:
    """The prose of the Python documentation topics, paragraphs separated by blank lines."""
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        lines = []
        for line in topics[name].splitlines():
            if _UNDERLINE.match(line) or line.startswith((" ", "\t")):
                if lines:
                    paragraphs.append(" ".join(lines))
                    lines = []
                continue
            if line.strip():
                lines.append(line.strip())
            elif lines:
                paragraphs.append(" ".join(lines))
                lines = []
        if lines:
            paragraphs.append(" ".join(lines))
    return "\n\n".join(p for p in paragraphs if len(p.split()) >= 8)


def corpus_ids(tokenizer, chars: int = 200_000) -> list[int]:
    """Token ids of the first ``chars`` characters of :func:`english_text` (about 45,000
    SmolLM2 tokens by default: enough for several 8k-token prompts), no special tokens."""
    return tokenizer(english_text()[:chars], add_special_tokens=False)["input_ids"]


def token_windows(tokenizer, seq_len: int, count: int, prefix_ids: list[int] | None = None) -> list[list[int]]:
    """``count`` disjoint windows of ``seq_len`` token ids, each starting with ``prefix_ids``."""
    prefix = list(prefix_ids or [])
    body = seq_len - len(prefix)
    ids = tokenizer(english_text(), add_special_tokens=False)["input_ids"]
    stride = max(body, (len(ids) - body) // max(count, 1))
    windows = [prefix + ids[i:i + body] for i in range(0, len(ids) - body + 1, stride)][:count]
    if len(windows) < count:
        raise ValueError(f"the corpus has {len(ids)} tokens: too few for {count} windows of {seq_len}")
    return windows
