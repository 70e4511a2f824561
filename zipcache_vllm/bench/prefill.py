"""Prefill attention benchmark: one request's prompt through one layer, zipcache vs vLLM.

One "call" is the attention work of one layer for a prompt of ``ctx`` tokens, the same
inputs (bf16 ``q [ctx, Hq, D]``, ``k, v [ctx, Hk, D]``) on both sides:

* ``zipcache``: :func:`zipcache_vllm.engine.step.apply_step` for the one-chunk
  prompt, what the backend runs per layer: the key rotation of rotated presets, the
  block-by-block causal attention over the packed prefix and the block being filled,
  the saliency of the probe rows, and the packing of every block that fills.
* ``vLLM``: the CPU_ATTN backend's two ops, ``cpu_attn_reshape_and_cache`` (the
  prompt's K/V into a bf16 paged cache) and ``cpu_attention_with_kv_cache`` (causal),
  in the ISA vLLM picks on this machine (``amx`` where the CPU has AMX tiles).

So the ratio isolates the attention layer from the rest of the model that
``bench decode``'s engine prefill figure includes. Timer: wall clock, median.
"""
from __future__ import annotations

import os

import torch

from .kernels import SHAPES, VllmCpuAttention, _cpu_name, _time

CONTEXTS = (1024, 4096)


def inputs(Hq: int, Hk: int, D: int, ctx: int, seed: int = 0):
    """bf16 ``q [ctx, Hq, D]``, ``k, v [ctx, Hk, D]`` (standard normal)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(ctx, Hq, D, generator=g).to(torch.bfloat16),
            torch.randn(ctx, Hk, D, generator=g).to(torch.bfloat16),
            torch.randn(ctx, Hk, D, generator=g).to(torch.bfloat16))


def zipcache_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, preset_name: str):
    """A call running the backend's step for the prompt; returns (call, output, layout)."""
    from zipcache_vllm.config import load_preset
    from zipcache_vllm.layout import BlockLayout
    from zipcache_vllm.engine.plan import plan_step
    from zipcache_vllm.policies import make_policy
    from zipcache_vllm.engine.staging import StagingPool
    from zipcache_vllm.engine.step import apply_step

    ctx, Hq, D = q.shape
    Hk = k.shape[1]
    preset = load_preset(preset_name)
    layout = BlockLayout.from_preset(preset, D, Hk)
    policy = make_policy(preset)
    B = layout.block_size
    nb = -(-ctx // B)
    pages = torch.zeros(nb, layout.page_bytes, dtype=torch.uint8)
    table = torch.arange(nb, dtype=torch.int32).unsqueeze(0)
    out = torch.empty_like(q)

    def call():
        # a fresh request each call
        pool = StagingPool(["layer"], 1, B, Hk, D, q.dtype, blocks=policy.staged_blocks)
        plans = plan_step(pool, B, [0, ctx], [ctx], table)
        apply_step(pool, 0, plans, q, k, v, pages, layout, policy, D ** -0.5, out)

    return call, out, layout


def run(preset: str = "zipcache", contexts=None, quick: bool = False) -> dict:
    """Time both sides for every shape and context; returns rows plus machine facts."""
    contexts = tuple(contexts or ((512,) if quick else CONTEXTS))
    min_time, max_reps = (0.1, 5) if quick else (1.0, 20)
    vllm_attn = VllmCpuAttention()
    rows = []
    for shape, (Hq, Hk, D) in SHAPES.items():
        for ctx in contexts:
            q, k, v = inputs(Hq, Hk, D, ctx)
            zc_call, _, layout = zipcache_call(q, k, v, preset)
            t_zc = _time(zc_call, min_time, max_reps)
            vl_call, _, isa = vllm_attn.prefill_setup(q, k, v, layout.block_size)
            t_vl = _time(vl_call, min_time, max_reps)
            rows.append(dict(shape=shape, Hq=Hq, Hk=Hk, D=D, ctx=ctx, t_vllm=t_vl, t_zc=t_zc,
                             vllm_isa=isa))
            print(f"  {shape:8s} ctx={ctx:5d}: vLLM ({isa}) {t_vl * 1e3:8.2f} ms, "
                  f"zipcache {t_zc * 1e3:8.2f} ms", flush=True)
    info = dict(cpu=_cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__,
                preset=preset, load=os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
    return dict(rows=rows, info=info)


def format_table(res: dict) -> str:
    info = res["info"]
    out = [
        f"machine: {info['cpu']}, {os.cpu_count()} CPUs, torch {info['torch']}, {info['threads']} "
        f"threads; load average at the end: {info['load']:.2f}; preset: {info['preset']}; one "
        "layer's prefill attention of one request (wall clock, median)",
        "",
        "| shape (Hq/Hk/D) | ctx | vLLM ISA | vLLM ms | zipcache ms | zipcache / vLLM speed |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in res["rows"]:
        out.append(f"| {r['shape']} ({r['Hq']}/{r['Hk']}/{r['D']}) | {r['ctx']} | {r['vllm_isa']} "
                   f"| {r['t_vllm'] * 1e3:.2f} | {r['t_zc'] * 1e3:.2f} | {r['t_vllm'] / r['t_zc']:.2f}x |")
    return "\n".join(out)


def profile_table(preset: str, Hq: int, Hk: int, D: int, ctx: int, rows: int = 8) -> str:
    """zipcache's step for one prompt under torch's profiler: the ``rows`` ops with the most
    self time (milliseconds, calls), after one unprofiled warm-up call."""
    from torch.profiler import ProfilerActivity, profile

    call = zipcache_call(*inputs(Hq, Hk, D, ctx), preset)[0]
    call()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    out = [f"| op | self ms | calls | share of {total:.1f} ms |", "|---|---:|---:|---:|"]
    for e in events[:rows]:
        ms = e.self_cpu_time_total / 1e3
        out.append(f"| `{e.key}` | {ms:.2f} | {e.count} | {ms / total:.0%} |")
    return "\n".join(out)


def main(preset: str = "zipcache", contexts: str | None = None, quick: bool = False,
         threads: int | None = None, profile: bool = False) -> int:
    if threads:
        torch.set_num_threads(threads)
    res = run(preset=preset, contexts=[int(x) for x in contexts.split(",")] if contexts else None,
              quick=quick)
    print()
    print(format_table(res))
    if profile:
        for r in res["rows"]:
            print(f"\nzipcache step, {r['shape']} ({r['Hq']}/{r['Hk']}/{r['D']}), ctx {r['ctx']}, "
                  f"{torch.get_num_threads()} threads (torch profiler, self time):\n")
            print(profile_table(preset, r["Hq"], r["Hk"], r["D"], r["ctx"]))
    return 0
