"""Every KV dtype through the real vLLM engine, side by side: prefill and decode speed.

Run by :mod:`zipcache_vllm.bench.decode` in its own process (vLLM spawns its engines;
the entry stays under the ``__main__`` guard)::

    python -m zipcache_vllm.bench.decode_worker --model DIR --kv-cache-dtype auto,fp8,zipcache \\
        --kv-cache-memory-bytes 2147483648 --contexts 1024,4096 --batches 1,8 --decode-tokens 16 \\
        --rounds 6 --out out.json

One engine per dtype (same model and engine arguments), all alive at once; only one
works at a time. For every (context, batch), ``batch`` prompts of ``context`` random
tokens (seeded, distinct) go through each engine in turn:

- prefill: the time from adding them until every request has its first token (at
  batch 1, ``--prefill-reps`` prompts in all, interleaved across the engines, median);
- decode, in ``--rounds`` rounds: in every round each engine in turn (the order
  rotating from round to round) runs the same prompts again (a prefix-cache hit: only
  the last partial block is recomputed) and generates ``--decode-tokens`` tokens per
  request with greedy sampling and ``ignore_eos``; the decode time is from the moment
  every request has its first token to the end.

So the dtypes' decode samples are taken seconds apart, round after round, and a slow
spell of a shared machine falls on all of them (the per-round ratios show how much
the machine drifted). Between engines the bench waits ``PAUSE_S``: a vLLM worker keeps
polling its queue for a second after its last step.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..engine_proc import import_vllm

# Prompt tokens are drawn from this id range: ordinary vocabulary pieces of the
# embedded model (no special or control tokens), so no prompt ends early.
TOKEN_RANGE = (1000, 40000)
# vLLM's shared-memory queue reader spins for 1 s after its last read (shm_broadcast's
# busy_loop_s); the next engine starts after that, so it has the core to itself.
PAUSE_S = 1.2


def _prompt(ctx: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(*TOKEN_RANGE) for _ in range(ctx)]


def _cell_prompts(ctx: int, batch: int) -> list[list[int]]:
    """The ``batch`` prompts of a (context, batch) cell: the same in every round and engine."""
    return [_prompt(ctx, 1000 * ctx + 17 * batch + i) for i in range(batch)]


def run_batch(engine, prompts: list[list[int]], decode_tokens: int, tag: str,
              on_first: Callable[[], None] | None = None) -> dict:
    """Add ``prompts`` together and step them to the end (``decode_tokens`` tokens each after
    the first): prefill seconds (until every request has its first token), decoded tokens
    and decode seconds (after that moment), steps, and the prompt tokens vLLM took from its
    prefix cache. ``on_first`` runs at that moment, before the decode steps."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=decode_tokens + 1, ignore_eos=True)
    t0 = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", TokensPrompt(prompt_token_ids=ids), params)
    produced: dict[str, int] = {}
    cached: dict[str, int] = {}
    t_first = None
    tokens_at_first = 0
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            produced[out.request_id] = len(out.outputs[0].token_ids)
            cached[out.request_id] = out.num_cached_tokens or 0
        steps += 1
        if t_first is None and len(produced) == len(prompts) and min(produced.values()) >= 1:
            t_first = time.perf_counter()
            tokens_at_first = sum(produced.values())
            if on_first is not None:
                on_first()
    t_end = time.perf_counter()
    return {"prefill_s": t_first - t0, "decode_tokens": sum(produced.values()) - tokens_at_first,
            "decode_s": t_end - t_first, "steps": steps, "cached_tokens": sum(cached.values())}


def _rotated(names: list[str], k: int) -> list[str]:
    k %= len(names)
    return names[k:] + names[:k]


def measure_cell(engines: dict, ctx: int, batch: int, decode_tokens: int, rounds: int,
                 prefill_reps: int = 1, pause_s: float = PAUSE_S, turn: int = 0) -> dict[str, dict]:
    """One (context, batch) cell on every engine, interleaved (see the module docstring):
    a row per engine name. ``turn`` rotates which engine goes first in the cell."""
    names = list(engines)
    prompts = _cell_prompts(ctx, batch)
    prefill = {n: [] for n in names}
    rounds_of = {n: [] for n in names}
    first = True

    def pause():
        nonlocal first
        if not first:
            time.sleep(pause_s)
        first = False

    for r in range(rounds):  # round 0 is the cold prefill, the later ones prefix-cache hits
        for n in _rotated(names, turn + r):
            pause()
            res = run_batch(engines[n], prompts, decode_tokens, f"{n}-{ctx}-{batch}-r{r}")
            if r == 0:
                prefill[n].append(res["prefill_s"])
            rounds_of[n].append(res)
    if batch == 1:  # more cold prefills: other prompts of the same length, one token each
        for i in range(prefill_reps - 1):
            for n in _rotated(names, turn + i):
                pause()
                other = _prompt(ctx, 1000 * ctx + 17 + 7919 * (i + 1))
                prefill[n].append(run_batch(engines[n], [other], 0, f"{n}-{ctx}-prefill-{i}")["prefill_s"])
    rows = {}
    for n in names:
        samples = prefill[n]
        prefill_s = sorted(samples)[len(samples) // 2]
        decoded = sum(x["decode_tokens"] for x in rounds_of[n])
        decode_s = sum(x["decode_s"] for x in rounds_of[n])
        rows[n] = {"ctx": ctx, "batch": batch, "prefill_s": prefill_s,
                   "prefill_tok_s": ctx * batch / prefill_s, "prefill_samples_s": samples,
                   "decode_tokens": decoded, "decode_s": decode_s, "decode_tok_s": decoded / decode_s,
                   "rounds": [[x["decode_tokens"], x["decode_s"]] for x in rounds_of[n]],
                   "hit_prefill_s": [x["prefill_s"] for x in rounds_of[n][1:]],
                   "cached_tokens": [x["cached_tokens"] for x in rounds_of[n]]}
    return rows


def profile_round(llm, prompts: list[list[int]], decode_tokens: int, tag: str, profile_dir: Path,
                  layers: int, wait_s: float = 60.0) -> dict:
    """One more round of ``prompts`` with vLLM's profiler on from the moment every request
    has its first token to the end: the decode steps' op split (:mod:`.step_profile`)."""
    from .step_profile import read_summary

    run_batch(llm.llm_engine, prompts, decode_tokens, tag, on_first=llm.start_profile)
    llm.stop_profile()
    deadline = time.monotonic() + wait_s  # the worker writes its table as the profiler stops
    while not any(profile_dir.glob("*.profiler_out.txt")) and time.monotonic() < deadline:
        time.sleep(0.5)
    return read_summary(profile_dir, layers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--kv-cache-dtype", default="auto", help="comma-separated --kv-cache-dtype values")
    p.add_argument("--kv-cache-memory-bytes", type=int, required=True, help="every engine's KV budget")
    p.add_argument("--contexts", required=True)
    p.add_argument("--batches", required=True)
    p.add_argument("--decode-tokens", type=int, default=16, help="tokens per request and round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--prefill-reps", type=int, default=1, help="prefill runs at batch 1 (median reported)")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--profile-dir", default=None,
                   help="give every engine vLLM's torch profiler and, after the cells, profile one "
                        "more round of the first cell's decode steps per engine (tables go here)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import_vllm(kv_space_gib=None)  # the engines get kv_cache_memory_bytes; vLLM would use the variable instead
    from vllm import LLM

    from ..vllm_plugin.compat import cpu_attention_refusal
    from ..dtypes import is_zipcache_dtype
    from .decode import model_facts

    facts = model_facts(args.model)
    head_size = facts["head_size"]
    result: dict[str, dict] = {}
    llms = {}  # the LLM objects own their engines' processes: kept to the end
    for dtype in args.kv_cache_dtype.split(","):
        why = None if is_zipcache_dtype(dtype) else cpu_attention_refusal(dtype, head_size)
        if why is not None:  # vLLM would fail in its worker, with a generic error here
            result[dtype] = {"kv_cache_dtype": dtype, "unsupported": why}
            print(json.dumps(result[dtype]), flush=True)
            continue
        profiling = {} if args.profile_dir is None else {"profiler_config": {
            "profiler": "torch", "torch_profiler_dir": str(Path(args.profile_dir) / dtype),
            "torch_profiler_with_stack": False}}
        llm = LLM(model=args.model, kv_cache_dtype=dtype, dtype="bfloat16", enforce_eager=True,
                  max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                  enable_prefix_caching=True, seed=0, **profiling)
        llms[dtype] = llm
        run_batch(llm.llm_engine, [_prompt(256, 1)], 4, f"{dtype}-warmup")
        cfg = llm.llm_engine.vllm_config.cache_config
        result[dtype] = {"kv_cache_dtype": dtype, "num_gpu_blocks": cfg.num_gpu_blocks,
                         "block_size": cfg.block_size, "rows": []}
    engines = {dtype: llm.llm_engine for dtype, llm in llms.items()}
    cells = list(itertools.product((int(x) for x in args.contexts.split(",")),
                                   (int(x) for x in args.batches.split(","))))
    for cell, (ctx, batch) in enumerate(cells):
        rows = measure_cell(engines, ctx, batch, args.decode_tokens, args.rounds,
                            args.prefill_reps, turn=cell) if engines else {}
        for dtype, row in rows.items():
            result[dtype]["rows"].append(row)
        print("CELL " + json.dumps({"ctx": ctx, "batch": batch, "rows": rows}), flush=True)
    if args.profile_dir is not None and engines:
        ctx, batch = cells[0]
        prompts = _cell_prompts(ctx, batch)
        for dtype, llm in llms.items():
            time.sleep(PAUSE_S)
            prof = profile_round(llm, prompts, args.decode_tokens, f"{dtype}-profile",
                                 Path(args.profile_dir) / dtype, facts["layers"])
            result[dtype]["profile"] = {"ctx": ctx, "batch": batch, **prof}
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
