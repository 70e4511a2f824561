"""Passkey retrieval at long context: the prompts, and the offline check of a preset.

The prompt (a plain completion, token ids): real English text (:mod:`.corpus`) with
``NEEDLE`` inserted after the first sentence end at a given depth, then ``CUE``; the
model retrieves the passkey by copying it after the cue. ``tests/serving/test_reliability_long.py``
asks the served engine; :func:`offline` asks the HF model through the KV simulator
(same block-by-block prefill rule as the engine), which is how a collapse is located
without an engine::

    python -m zipcache_vllm.eval.passkey --presets none,zipcache,zipcache_kivi4

prints, for each depth and preset, the teacher-forced log-probability of the passkey's
tokens after the cue and the argmax token at each of those positions.
"""
from __future__ import annotations

import argparse

KEY = "71432"
NEEDLE = f" The secret passkey is {KEY}. Remember the passkey {KEY}."
CUE = "\n\nThe secret passkey is"
DEPTHS = (0.2, 0.5, 0.8)


def bos_ids(tokenizer) -> list[int]:
    """``[bos]`` when the tokenizer starts a text with its BOS token (Gemma: without it the
    model degenerates), else ``[]`` (SmolLM2)."""
    first = tokenizer("a")["input_ids"][:1]
    return first if tokenizer.bos_token_id is not None and first == [tokenizer.bos_token_id] else []


def build_prompt(tokenizer, corpus_ids: list[int], depth: float, n_tokens: int) -> list[int]:
    """``n_tokens`` token ids: the tokenizer's BOS token if it adds one, real text with the
    needle after the first sentence end at ``depth`` of it, then the cue."""
    needle = tokenizer(NEEDLE, add_special_tokens=False)["input_ids"]
    cue = tokenizer(CUE, add_special_tokens=False)["input_ids"]
    bos = bos_ids(tokenizer)
    size = n_tokens - len(needle) - len(cue) - len(bos)
    hay = corpus_ids[:size]
    if len(hay) < size:
        raise ValueError(f"the corpus holds {len(corpus_ids)} tokens, fewer than a {n_tokens}-token prompt needs")
    at = max(1, int(depth * len(hay)))
    while at < len(hay) and not tokenizer.decode(hay[at - 1:at]).endswith("."):
        at += 1
    ids = bos + hay[:at] + needle + hay[at:] + cue
    assert len(ids) == n_tokens
    return ids


def key_ids(tokenizer) -> list[int]:
    """The passkey's tokens as they follow the cue."""
    return tokenizer(f" {KEY}", add_special_tokens=False)["input_ids"]


def offline(model_dir: str, presets: list[str], n_tokens: int, depths=DEPTHS, block: int = 128):
    """Yield one row per (depth, preset): teacher-forced passkey log-probability and the
    argmax tokens at the passkey's positions, from the HF model (float32) through the
    simulator; preset ``none`` (the uncompressed cache) through the model's own attention."""
    import torch

    from ..policies import make_policy
    from .corpus import corpus_ids
    from .offline import load_model, reference_logprobs, simulated_logprobs
    from .simulate import KVSimulator, SimConfig

    model, tok = load_model(model_dir)
    ids = corpus_ids(tok)
    key = key_ids(tok)
    for depth in depths:
        prompt = build_prompt(tok, ids, depth, n_tokens)
        x = torch.tensor(prompt + key)
        for name in presets:
            start = len(prompt) - 1
            lp = (reference_logprobs(model, x, start) if name == "none" else
                  simulated_logprobs(model, KVSimulator(make_policy(name), SimConfig(0, block)), x, start))
            top = [int(lp[i].argmax()) for i in range(len(key))]
            yield {"depth": depth, "preset": name, "key_logprob": sum(float(lp[i, k]) for i, k in enumerate(key)),
                   "argmax": tok.decode(top), "retrieved": top == key}


def main(argv: list[str] | None = None) -> None:
    from tqdm.auto import tqdm

    from ..model.prepare import prepare_default_model

    ap = argparse.ArgumentParser(prog="python -m zipcache_vllm.eval.passkey", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF model folder (default: the prepared SmolLM2)")
    ap.add_argument("--presets", default="none,zipcache,zipcache_kivi4", help="comma-separated preset names")
    ap.add_argument("--tokens", type=int, default=8180, help="prompt length in tokens")
    args = ap.parse_args(argv)
    presets = args.presets.split(",")
    model = args.model or str(prepare_default_model())
    rows = offline(model, presets, args.tokens)
    print("| depth | preset | passkey log-prob | argmax at the passkey's positions | retrieved |")
    print("| ---: | --- | ---: | --- | --- |")
    for r in tqdm(rows, total=len(DEPTHS) * len(presets), desc="passkey", unit="pass"):
        tqdm.write(f"| {r['depth']} | {r['preset']} | {r['key_logprob']:.3f} | {r['argmax']!r} | {r['retrieved']} |")


if __name__ == "__main__":
    main()
