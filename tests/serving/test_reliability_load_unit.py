"""The load driver's own logic (no server): request mix and response checks."""
from __future__ import annotations

import json

import pytest

from zipcache_vllm.reliability.load import (
    KINDS,
    LoadConfig,
    Malformed,
    check_completion,
    check_stream,
    make_specs,
    prompt_lengths,
)


def _cfg(**kw) -> LoadConfig:
    return LoadConfig(url="http://127.0.0.1:1", model="m", corpus_ids=list(range(5000)), **kw)


def test_mix_is_reproducible_covers_every_kind_and_reaches_the_limit():
    cfg = _cfg(requests=40, max_model_len=512, max_tokens=16)
    a, b = make_specs(cfg), make_specs(cfg)
    assert [(s.kind, s.prompt_ids) for s in a] == [(s.kind, s.prompt_ids) for s in b]
    assert {s.kind for s in a} == set(KINDS)
    normal = [len(s.prompt_ids) for s in a if s.kind != "too_long"]
    assert max(normal) == 512 - 16 and min(normal) >= 8
    assert all(len(s.prompt_ids) > 512 for s in a if s.kind == "too_long")


def test_prompt_lengths_span_short_to_limit():
    import random

    lens = prompt_lengths(30, 1000, random.Random(1))
    assert min(lens) <= 64 and max(lens) == 1000 and any(65 <= n <= 400 for n in lens)


def _choice(text="Paris is nice", reason="length", i=0, **kw):
    return {"index": i, "text": text, "finish_reason": reason, **kw}


def test_check_completion_accepts_well_formed_and_rejects_the_rest():
    ok = {"choices": [_choice(i=0), _choice(i=1)], "usage": {"prompt_tokens": 7, "completion_tokens": 20}}
    assert check_completion(ok, 2, 7, 10, chat=False, stop=None) == 20
    bad = [
        {**ok, "choices": ok["choices"][:1]},  # n = 2 asked, one choice
        {**ok, "usage": {"prompt_tokens": 8, "completion_tokens": 20}},  # wrong prompt count
        {**ok, "usage": {"prompt_tokens": 7, "completion_tokens": 21}},  # more than n * max
        {**ok, "choices": [_choice(i=0, reason=None), _choice(i=1)]},  # unfinished
        {**ok, "choices": [_choice(i=0), _choice(i=0)]},  # duplicate index
    ]
    for body in bad:
        with pytest.raises(Malformed):
            check_completion(body, 2, 7, 10, chat=False, stop=None)
    stopped = {"choices": [_choice("a. b", "stop", stop_reason=".")],
               "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
    with pytest.raises(Malformed, match="stop string"):
        check_completion(stopped, 1, 7, 10, chat=False, stop=["."])


def _sse(*chunks, done=True):
    return [json.dumps(c) for c in chunks] + (["[DONE]"] if done else [])


def test_check_stream():
    usage = {"choices": [], "usage": {"completion_tokens": 4}}
    good = _sse({"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]},
                {"choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": "length"}]},
                usage)
    assert check_stream(good, 1, chat=True, stop=None) == 4
    with pytest.raises(Malformed, match="DONE"):
        check_stream(good[:-1], 1, chat=True, stop=None)
    with pytest.raises(Malformed, match="finish"):
        check_stream(_sse({"choices": [{"index": 0, "text": "x", "finish_reason": None}]}, usage),
                     1, chat=False, stop=None)
    with pytest.raises(Malformed, match="error"):
        check_stream(_sse({"error": {"message": "boom"}}, usage), 1, chat=False, stop=None)
