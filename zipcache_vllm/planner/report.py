"""A plan as a Markdown table, JSON, or a PNG plot."""
from __future__ import annotations

import json
from pathlib import Path

from .plan import Plan


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f}"


def markdown(plan: Plan) -> str:
    req, m = plan.request, plan.model
    hw = plan.hardware
    topo = f"TP {req.tensor_parallel_size} x PP {req.pipeline_parallel_size} ({plan.workers} workers)"
    out = [f"Model `{m['name']}` ({m['num_layers']} layers, {m['num_kv_heads']} KV heads of {m['head_size']}, "
           f"{m['dtype']}) on {hw['name']} ({plan.device}), {topo}; {plan.kv_heads_per_rank} KV heads and "
           f"{max(plan.layers_per_stage)} layers per worker; max_model_len {req.max_model_len}, "
           f"planning for {req.concurrency or 1} request(s) of {plan.context_len} tokens.", ""]
    if plan.estimates is not None and plan.estimates.kv_budget_source == "given":
        e = plan.estimates
        out += [f"KV budget per GPU: --kv-cache-memory-bytes {req.kv_cache_memory_bytes} = "
                f"**{e.kv_budget_gib:.2f} GiB** (exact; vLLM then ignores --gpu-memory-utilization). Beside it "
                f"(ESTIMATES): weights {e.weights_gib:.2f} GiB ({e.weights_source}), activations "
                f"{e.activations_gib:.2f} GiB, runtime overhead {e.runtime_overhead_gib:.2f} GiB, of "
                f"{hw['memory_gib']} GiB.", ""]
    elif plan.estimates is not None:
        e = plan.estimates
        out += [f"KV budget per GPU (ESTIMATE; vLLM profiles the real one at startup): "
                f"{req.gpu_memory_utilization} x {hw['memory_gib']} GiB = {e.requested_gib:.2f} GiB, minus "
                f"weights {e.weights_gib:.2f} GiB ({e.weights_source}), activations {e.activations_gib:.2f} GiB "
                f"(estimate), runtime overhead {e.runtime_overhead_gib:.2f} GiB (estimate) = "
                f"**{e.kv_budget_gib:.2f} GiB** (or give it: --kv-cache-memory-bytes). Everything below is "
                "exact for that budget.", ""]
    elif req.kv_cache_memory_bytes:
        out += [f"KV budget per worker: --kv-cache-memory-bytes {req.kv_cache_memory_bytes} = "
                f"{_gib(req.kv_cache_memory_bytes)} GiB (exact).", ""]
    else:
        space = req.kv_cache_space_gib or hw["kv_cache_space_gib"]
        out += [f"KV budget per worker: {space} GiB (exact; VLLM_CPU_KVCACHE_SPACE={space}, the same as "
                f"--kv-cache-memory-bytes {space}G).", ""]
    out += ["| --kv-cache-dtype | block | bytes/token/layer | bytes/token (model) | staging blocks / MiB a request | KV tokens | "
            "vs auto | max concurrency @max_model_len | requests @context: KV / max_num_seqs | fits |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    too_long = plan.max_model_len_limit is not None and req.max_model_len > plan.max_model_len_limit
    refusal = (f" (vLLM refuses max_model_len > the model's {plan.max_model_len_limit} positions)" if too_long
               else " (engine refuses max_model_len: one request does not fit)")
    for r in plan.rows:
        ratio = f"{r.ratio_vs_auto:.2f}x" if r.ratio_vs_auto is not None else ""
        fits = ("yes" if r.fits else "no") + ("" if r.starts else refusal)
        out.append(f"| {r.cache_dtype} | {r.block_size} | {r.bytes_per_token_per_layer:.2f} | "
                   f"{r.bytes_per_token:,.0f} | {r.staging_blocks} / {r.staging_bytes_per_request / 2**20:.2f} | "
                   f"{r.kv_tokens:,} | {ratio} | "
                   f"{r.max_concurrency:.2f} | {r.kv_requests_at_context} / {r.max_num_seqs or '-'} | {fits} |")
    notes = [f"- `{r.cache_dtype}`: {r.note}" for r in plan.rows if r.note]
    if notes:
        out += ["", *notes]
    if any(r.decode_tokens_per_s_bound for r in plan.rows):
        out += ["", "Decode throughput bound (memory bandwidth only, weights + KV read once per step; an upper "
                "bound, not a prediction): " + ", ".join(
                    f"{r.cache_dtype} {r.decode_tokens_per_s_bound:,.0f} tok/s"
                    for r in plan.rows if r.decode_tokens_per_s_bound)]
    out += [f"- warning: {w}" for w in plan.warnings]
    return "\n".join(out)


def to_json(plan: Plan) -> str:
    return json.dumps(plan.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def plot(plan: Plan, path: str | Path) -> None:
    """Horizontal bars: KV tokens per dtype, labelled with the ratio to auto and the number
    of requests of ``context_len`` that fit; a line at the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = plan.rows
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.6))
    y = range(len(rows))
    ax.barh(list(y), [r.kv_tokens for r in rows], color=["#888" if r.preset is None else "#2a7" for r in rows])
    for i, r in enumerate(rows):
        ratio = f"{r.ratio_vs_auto:.2f}x" if r.ratio_vs_auto else ""
        ax.text(r.kv_tokens, i, f" {r.kv_tokens / 1e6:.2f}M ({ratio}; {r.kv_requests_at_context} x "
                f"{plan.context_len})", va="center", fontsize=8)
    target = (plan.request.concurrency or 1) * plan.context_len
    ax.axvline(target, color="#c33", linestyle="--", label=f"target: {plan.request.concurrency or 1} x "
               f"{plan.context_len} tokens")
    ax.set_yticks(list(y), [r.cache_dtype for r in rows])
    ax.invert_yaxis()
    ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1e6:g}M")
    ax.set_xlabel("KV cache tokens (vLLM's count)" + (" - GPU budget estimated" if plan.estimates else ""))
    ax.set_title(f"{plan.model['name']} on {plan.hardware['name']} (TP {plan.request.tensor_parallel_size}, "
                 f"PP {plan.request.pipeline_parallel_size})", fontsize=10)
    ax.set_xlim(0, max(r.kv_tokens for r in rows) * 1.45 or 1)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
