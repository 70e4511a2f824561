"""One engine start, three jobs: teacher-forced scoring, greedy generation, an exact task.

Run as a process of its own (vLLM spawns its engine; the entry stays under the
``__main__`` guard)::

    python -m zipcache_vllm.eval.engine_worker --job job.json --out out.json

``job.json`` (written by :mod:`zipcache_vllm.eval.engine_eval`)::

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

``out.json``: the engine's KV capacity, and per scored prompt and position the
top-k token ids and logprobs plus the logprob of the actual next token.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    with open(args.job) as f:
        job = json.load(f)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from ..launcher import install_version_shim

    install_version_shim()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.time()
    llm = LLM(model=job["model"], kv_cache_dtype=job["kv_cache_dtype"], dtype="bfloat16", enforce_eager=True,
              max_model_len=job["max_model_len"], max_num_seqs=job["max_num_seqs"],
              max_num_batched_tokens=job["chunk"], enable_chunked_prefill=True,
              enable_prefix_caching=False, max_logprobs=job["logprobs"], seed=0)
    t_start = time.time() - t0
    cfg = llm.llm_engine.vllm_config.cache_config
    k = job["logprobs"]

    def run(prompts, params):
        return llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=True)

    t1 = time.time()
    score = [_prompt_rows(o, k) for o in run(job["score"], SamplingParams(
        temperature=0.0, max_tokens=1, prompt_logprobs=k, detokenize=False))]
    t2 = time.time()
    gen = [list(o.outputs[0].token_ids) for o in run(job["gen"], SamplingParams(
        temperature=0.0, max_tokens=job["gen_tokens"], ignore_eos=True, detokenize=False))]
    task = [list(o.outputs[0].token_ids) for o in run(job["task"], SamplingParams(
        temperature=0.0, max_tokens=job["task_tokens"], ignore_eos=True, detokenize=False))]
    t3 = time.time()
    result = {"kv_cache_dtype": job["kv_cache_dtype"], "num_gpu_blocks": cfg.num_gpu_blocks,
              "block_size": cfg.block_size, "kv_cache_memory_bytes": cfg.kv_cache_memory_bytes,
              "score": score, "gen": gen, "task": task,
              "seconds": {"start": t_start, "score": t2 - t1, "generate": t3 - t2}}
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
