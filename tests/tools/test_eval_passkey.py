"""The passkey prompts (no engine): exact length, needle at a sentence end near the depth, cue last."""
from __future__ import annotations

import pytest

from zipcache_vllm.eval import passkey


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def corpus(tokenizer):
    from zipcache_vllm.eval.corpus import corpus_ids

    return corpus_ids(tokenizer)


@pytest.mark.parametrize("n_tokens", [1000, 8180])
@pytest.mark.parametrize("depth", passkey.DEPTHS)
def test_prompt_holds_the_needle_at_its_depth_and_ends_with_the_cue(tokenizer, corpus, depth, n_tokens):
    ids = passkey.build_prompt(tokenizer, corpus, depth, n_tokens)
    assert len(ids) == n_tokens
    needle = tokenizer(passkey.NEEDLE, add_special_tokens=False)["input_ids"]
    cue = tokenizer(passkey.CUE, add_special_tokens=False)["input_ids"]
    assert ids[-len(cue):] == cue
    at = next(i for i in range(len(ids)) if ids[i:i + len(needle)] == needle)
    assert tokenizer.decode(ids[at - 1:at]).endswith(".")
    hay = n_tokens - len(needle) - len(cue)
    assert 0 <= at - int(depth * hay) < 150  # the first sentence end after the depth
    assert tokenizer.decode(ids).count(passkey.KEY) == 2


def test_a_corpus_too_short_is_refused(tokenizer):
    with pytest.raises(ValueError, match="fewer than"):
        passkey.build_prompt(tokenizer, list(range(100)), 0.5, 1000)
