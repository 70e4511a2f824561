"""One KV dtype through the real vLLM engine: prefill and decode speed (own process).

Run by :mod:`zipcache_vllm.bench.decode` (vLLM spawns its engine; the entry stays
under the ``__main__`` guard)::

    python -m zipcache_vllm.bench.decode_worker --model DIR --kv-cache-dtype zipcache \\
        --contexts 1024,4096 --batches 1,8 --decode-tokens 32 --out out.json

For every (context, batch): ``batch`` requests of ``context`` random prompt tokens
(seeded, distinct, prefix caching off) are added together and stepped to the end
with greedy sampling and ``ignore_eos``. Prefill time: from adding them until every
request has its first token; decode speed: tokens generated after that moment
divided by the time they took (every request decodes in every step then). At batch 1
the prefill is timed ``--prefill-reps`` times in all (the extra runs: other prompts of
the same length, one output token each) and the median is reported, since one prefill
is a single sample of a noisy machine.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

# Prompt tokens are drawn from this id range: ordinary vocabulary pieces of the
# embedded model (no special or control tokens), so no prompt ends early.
TOKEN_RANGE = (1000, 40000)


def _prompt(ctx: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(*TOKEN_RANGE) for _ in range(ctx)]


def _prefill_once(engine, ctx: int, seed: int, rid: str) -> float:
    """Seconds from adding one prompt of ``ctx`` tokens until its first token."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    engine.add_request(rid, TokensPrompt(prompt_token_ids=_prompt(ctx, seed)),
                       SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - t0


def measure(engine, ctx: int, batch: int, decode_tokens: int, tag: str, prefill_reps: int = 1) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=decode_tokens + 1, ignore_eos=True)
    ids = [f"{tag}-{ctx}-{batch}-{i}" for i in range(batch)]
    t0 = time.perf_counter()
    for i, rid in enumerate(ids):
        engine.add_request(rid, TokensPrompt(prompt_token_ids=_prompt(ctx, 1000 * ctx + 17 * batch + i)),
                           params)
    produced: dict[str, int] = {}
    t_first = None
    tokens_at_first = 0
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            produced[out.request_id] = len(out.outputs[0].token_ids)
        steps += 1
        if t_first is None and len(produced) == batch and min(produced.values()) >= 1:
            t_first = time.perf_counter()
            tokens_at_first = sum(produced.values())
    t_end = time.perf_counter()
    decoded = sum(produced.values()) - tokens_at_first
    samples = [t_first - t0]
    if batch == 1:
        samples += [_prefill_once(engine, ctx, 1000 * ctx + 17 + 7919 * (i + 1), f"{tag}-{ctx}-prefill-{i}")
                    for i in range(prefill_reps - 1)]
    prefill_s = sorted(samples)[len(samples) // 2]
    return {"ctx": ctx, "batch": batch, "prefill_s": prefill_s, "prefill_tok_s": ctx * batch / prefill_s,
            "prefill_samples_s": samples, "decode_tokens": decoded, "decode_s": t_end - t_first,
            "decode_tok_s": decoded / (t_end - t_first), "steps": steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--contexts", required=True)
    p.add_argument("--batches", required=True)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--prefill-reps", type=int, default=1, help="prefill runs at batch 1 (median reported)")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from ..launcher import install_version_shim

    install_version_shim()
    from vllm import LLM

    llm = LLM(model=args.model, kv_cache_dtype=args.kv_cache_dtype, dtype="bfloat16", enforce_eager=True,
              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False, seed=0)
    engine = llm.llm_engine
    measure(engine, 256, 1, 4, "warmup")
    rows = []
    for ctx in (int(x) for x in args.contexts.split(",")):
        for batch in (int(x) for x in args.batches.split(",")):
            row = measure(engine, ctx, batch, args.decode_tokens, "bench", args.prefill_reps)
            print(json.dumps(row), flush=True)
            rows.append(row)
    cfg = llm.llm_engine.vllm_config.cache_config
    result = {"kv_cache_dtype": args.kv_cache_dtype, "num_gpu_blocks": cfg.num_gpu_blocks,
              "block_size": cfg.block_size, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
