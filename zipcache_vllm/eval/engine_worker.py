"""One process, one engine per dtype in turn, three jobs each: teacher-forced scoring, greedy generation, an exact task.

Run as a process of its own (the entry stays under the ``__main__`` guard); the engine
core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so vLLM is imported
once for all dtypes and each engine is torn down before the next starts::

    python -m zipcache_vllm.eval.engine_worker --jobs jobs.json

``jobs.json`` (written by :mod:`zipcache_vllm.eval.engine_eval`) is a list of
``{"job": JOB, "out": PATH}``; every JOB has the same ``kv_space_gib``. One JOB::

    {"model": DIR, "kv_cache_dtype": "zipcache", "chunk": 256, "max_model_len": 2048,
     "max_num_seqs": 8, "logprobs": 20,
     "score": [[ids...], ...],                 # teacher forcing: prompt_logprobs of every position
     "gen": [[ids...], ...], "gen_tokens": 32, # greedy continuations
     "task": [[ids...], ...], "task_tokens": 16}

Unlike :mod:`engine_gen` (every prompt prefilled in one chunk, the offline
simulator's assumption), prefill here is chunked with ``--max-num-batched-tokens
= chunk``, so that later chunks read the earlier ones from the packed cache, as a
served engine does with long prompts. vLLM 0.32 accumulates prompt logprobs across
chunks (``in_progress_prompt_logprobs_cpu`` in the model runner), so chunking does
not change what ``prompt_logprobs`` returns, only which cache it is computed from.

Each ``out`` file: the engine's KV capacity, and per scored prompt and position the
top-k token ids and logprobs plus the logprob of the actual next token.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time

from ..engine_proc import import_vllm


def _prompt_rows(output, k: int) -> dict:
    """Per position 1..n-1: top-k ids/logprobs (rank order) and the target's logprob."""
    ids = output.prompt_token_ids
    top_ids, top_lps, target = [], [], []
    for pos in range(1, len(ids)):
        d = output.prompt_logprobs[pos]
        ranked = sorted(((lp.rank, t, lp.logprob) for t, lp in d.items() if lp.rank <= k))
        top_ids.append([t for _, t, _ in ranked])
        top_lps.append([x for _, _, x in ranked])
        target.append(d[ids[pos]].logprob)
    return {"top_ids": top_ids, "top_lps": top_lps, "target": target}


def _run_one(LLM, SamplingParams, TokensPrompt, job: dict) -> dict:
    """One engine (built, used, torn down): capacity, teacher forcing, greedy, the task."""
    t0 = time.time()
    llm = LLM(model=job["model"], kv_cache_dtype=job["kv_cache_dtype"], dtype="bfloat16", enforce_eager=True,
              max_model_len=job["max_model_len"], max_num_seqs=job["max_num_seqs"],
              max_num_batched_tokens=job["chunk"], enable_chunked_prefill=True,
              enable_prefix_caching=False, max_logprobs=job["logprobs"], seed=0)
    t_start = time.time() - t0
    cfg = llm.llm_engine.vllm_config.cache_config
    k = job["logprobs"]

    def run(prompts, params):
        return llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)

    t1 = time.time()
    score = [_prompt_rows(o, k) for o in run(job["score"], SamplingParams(
        temperature=0.0, max_tokens=1, prompt_logprobs=k, detokenize=False))]
    t2 = time.time()
    gen = [list(o.outputs[0].token_ids) for o in run(job["gen"], SamplingParams(
        temperature=0.0, max_tokens=job["gen_tokens"], ignore_eos=True, detokenize=False))]
    task = [list(o.outputs[0].token_ids) for o in run(job["task"], SamplingParams(
        temperature=0.0, max_tokens=job["task_tokens"], ignore_eos=True, detokenize=False))]
    t3 = time.time()
    return {"kv_cache_dtype": job["kv_cache_dtype"], "num_gpu_blocks": cfg.num_gpu_blocks,
            "block_size": cfg.block_size, "kv_cache_memory_bytes": cfg.kv_cache_memory_bytes,
            "kv_cache_size_tokens": cfg.kv_cache_size_tokens,  # what vLLM logs as "KV cache size: N tokens"
            "score": score, "gen": gen, "task": task,
            "seconds": {"start": t_start, "score": t2 - t1, "generate": t3 - t2}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", required=True, help='JSON list of {"job": {...}, "out": path}')
    args = p.parse_args(argv)
    with open(args.jobs) as f:
        jobs = json.load(f)
    spaces = {j["job"]["kv_space_gib"] for j in jobs}
    if len(spaces) != 1:
        raise SystemExit(f"every job of one worker needs the same kv_space_gib (got {sorted(spaces)})")

    # The engine core runs in this process, so vLLM is imported once for every dtype.
    import_vllm(kv_space_gib=spaces.pop(), in_process=True)
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory
    from vllm.inputs import TokensPrompt

    from ..engine_proc import REFUSAL
    from .engine_eval import WORKER_MARK

    for entry in jobs:
        name = entry["job"]["kv_cache_dtype"]
        print(f"{WORKER_MARK}{name}", file=sys.stderr, flush=True)
        try:
            result = _run_one(LLM, SamplingParams, TokensPrompt, entry["job"])
        except Exception as exc:  # vLLM refuses fp8 on CPUs without AVX-512/AMX: recorded, not fatal
            refused = REFUSAL.search(str(exc))
            if not refused:
                raise
            result = {"unsupported": refused.group(1)}
        finally:
            gc.collect()
            cleanup_dist_env_and_memory()
        with open(entry["out"], "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
