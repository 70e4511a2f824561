"""Batched vs alone greedy tokens: how often they differ for a KV dtype and model dtype.

The preemption test compares the greedy tokens of 8 requests run together (with a
cache small enough that vLLM preempts one) with the same requests run one at a time.
This tool runs that comparison for any ``--kv-cache-dtype`` and ``--dtype`` and shows,
at each first difference, both runs' top-2 logprobs: in bf16 they are often exact ties,
whatever the KV dtype, which is why the test runs its server in float32::

    python -m zipcache_vllm.reliability.ties --kv-cache-dtype auto --dtype bfloat16
"""
from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor

PROMPTS, TOKENS, NUM_BLOCKS, MAX_NUM_SEQS, MAX_MODEL_LEN = 8, 40, 16, 16, 512


def compare(server, prompts: list[list[int]]) -> tuple[float, list[dict]]:
    """Preemptions during the batch, and per prompt the first difference (or None)."""
    def greedy(p):
        r = server.complete(p, max_tokens=TOKENS, logprobs=2, ignore_eos=True)
        if r["status"] != 200:
            raise RuntimeError(f"request failed: {r}")
        lp = r["json"]["choices"][0]["logprobs"]
        return lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]

    before = server.metric("vllm:num_preemptions_total")
    with ThreadPoolExecutor(len(prompts)) as ex:
        together = list(ex.map(greedy, prompts))
    preempted = server.metric("vllm:num_preemptions_total") - before
    rows = []
    for t, a in zip(together, (greedy(p) for p in prompts)):
        j = next((j for j, (x, y) in enumerate(zip(t[0], a[0])) if x != y), None)
        shared = len(t[0]) if j is None else j
        rows.append({"first_difference": j,
                     "max_logprob_gap_before": max((abs(x - y) for x, y in zip(t[1][:shared], a[1][:shared])),
                                                   default=0.0),
                     "together_top2": t[2][j] if j is not None else None,
                     "alone_top2": a[2][j] if j is not None else None})
    return preempted, rows


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    from ..eval.corpus import corpus_ids
    from ..model.prepare import prepare_default_model
    from .cli import server_args
    from .server import Server

    ap = argparse.ArgumentParser(prog="python -m zipcache_vllm.reliability.ties",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF model folder (default: the prepared SmolLM2)")
    ap.add_argument("--kv-cache-dtype", default="zipcache")
    ap.add_argument("--dtype", default="bfloat16", help="the model's --dtype")
    args = ap.parse_args(argv)
    model = args.model or str(prepare_default_model())
    tok = AutoTokenizer.from_pretrained(model)
    corpus = corpus_ids(tok)
    prompts = [corpus[3000 * i + 17:3000 * i + 17 + 200 + 25 * i] for i in range(PROMPTS)]
    with Server(model, *server_args(args.kv_cache_dtype, MAX_NUM_SEQS, NUM_BLOCKS), "--dtype", args.dtype,
                max_model_len=MAX_MODEL_LEN) as s:
        s.wait_ready()
        preempted, rows = compare(s, prompts)
    print(f"--kv-cache-dtype {args.kv_cache_dtype} --dtype {args.dtype}: {preempted:.0f} preemption(s) "
          f"during the batch; {sum(r['first_difference'] is not None for r in rows)} of {len(rows)} "
          "prompts differ batched vs alone")
    for i, r in enumerate(rows):
        where = "equal" if r["first_difference"] is None else f"first difference at token {r['first_difference']}"
        print(f"  prompt {i}: {where}; max |logprob gap| before it {r['max_logprob_gap_before']:.4f}"
              + ("" if r["first_difference"] is None
                 else f"; top-2 together {r['together_top2']}, alone {r['alone_top2']}"))


if __name__ == "__main__":
    main()
