"""Greedy generations with logprobs from the real vLLM engine (one KV dtype per process).

Run as a process of its own (vLLM spawns its engine; the entry stays under the
``__main__`` guard)::

    python -m zipcache_vllm.eval.engine_gen --model DIR --kv-cache-dtype zipcache \\
        --prompts prompts.json --out out.json [--dtype float32] [--max-tokens 64] [--kv-space-gib 1]

``prompts.json`` is a list of token-id lists; ``out.json`` gets, per prompt, the
generated token ids, their logprobs, and the engine's KV capacity in tokens.
Every prompt is prefilled in one chunk (the token budget holds all running
prompts), which is what the offline simulator assumes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..engine_proc import import_vllm


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--kv-space-gib", default=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                   help="the CPU engine's KV budget, VLLM_CPU_KVCACHE_SPACE (default: that variable, else 1)")
    args = p.parse_args(argv)

    import_vllm(kv_space_gib=args.kv_space_gib, in_process=True)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(args.prompts) as f:
        prompts = json.load(f)
    budget = max(args.max_model_len, args.max_num_seqs * max(len(x) for x in prompts) + args.max_num_seqs)
    llm = LLM(model=args.model, kv_cache_dtype=args.kv_cache_dtype, dtype=args.dtype, enforce_eager=True,
              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=budget, enable_prefix_caching=False, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, logprobs=0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=True)
    cfg = llm.llm_engine.vllm_config.cache_config
    rows = []
    for o in outs:
        c = o.outputs[0]
        rows.append({"prompt_len": len(o.prompt_token_ids), "token_ids": list(c.token_ids),
                     "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]})
    result = {"kv_cache_dtype": args.kv_cache_dtype, "dtype": args.dtype,
              "num_gpu_blocks": cfg.num_gpu_blocks, "block_size": cfg.block_size, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
