"""Decode attention benchmark: packed zipcache pages vs vLLM's bf16 CPU attention.

One "call" is one layer's decode attention for a batch of requests, each with
one query over ``ctx`` cached tokens:

* ``zipcache``: :func:`zipcache_vllm.kernels.attend_packed_batch` over packed
  pages of the chosen preset (``ctx / B`` complete blocks per request).
* ``bf16``: vLLM's own paged CPU attention op (``torch.ops._C.cpu_attention_with_kv_cache``,
  the op the CPU_ATTN backend calls) over a bf16 cache filled by its
  ``cpu_attn_reshape_and_cache``; scheduler metadata built once, as the backend does.
* ``fp8``: the same op with an fp8 cache, where vLLM supports it on this CPU
  (it needs AVX-512 or AMX; otherwise the row says why not).

Every call reads the next of several per-layer copies of the cache (together larger
than the last-level cache, :data:`COLD_BYTES`), like a decode step going through the
layers: the bytes come from memory, not from a cache left warm by the previous call.

Bytes model: what a call must read from the KV cache (zipcache: whole page
sections of the blocks read; bf16: K and V, 2 bytes each); GB/s = bytes / time,
printed next to the copy bandwidth of a large tensor measured in the same run.
"""
from __future__ import annotations

import itertools
import os
import platform
import statistics
import time

import torch

SHAPES = {  # name: (Hq, Hk, D)
    "smollm2": (9, 3, 64),
    "llama": (32, 8, 128),
}
CONTEXTS = (1024, 4096, 8192)
BATCHES = (1, 8)


TIMERS = {
    # wall clock, median over repetitions: what a step waits for (noisy on a shared machine)
    "wall": (time.perf_counter, statistics.median),
    # CPU time of this thread, fastest repetition: robust to other processes taking the
    # cores; only meaningful with 1 thread (both kernels then run in the calling thread)
    "cpu": (time.thread_time, min),
}
_timer = TIMERS["wall"]


# Each call reads the next of several per-layer caches, as a decode step does layer
# after layer, so the KV bytes come from memory and not from a cache left warm by the
# previous repetition: enough layers to exceed this many bytes (> the L3 of most CPUs).
COLD_BYTES = 128 << 20


def cold_layers(cache_bytes: int) -> int:
    """How many per-layer copies of a cache of ``cache_bytes`` exceed :data:`COLD_BYTES`."""
    return max(1, -(-COLD_BYTES // max(cache_bytes, 1)))


def _time(fn, min_time: float, max_reps: int) -> float:
    """Seconds per ``fn()`` by the selected timer (after 2 warm-up calls)."""
    clock, reduce = _timer
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 5 or time.perf_counter() - start < min_time):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return reduce(times)


def copy_bandwidth(nbytes: int = 512 << 20) -> float:
    """GB/s of ``dst.copy_(src)`` for a large tensor (read + write counted)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    sec = _time(lambda: dst.copy_(src), min_time=0.5, max_reps=10)
    return 2 * nbytes / sec / 1e9


class VllmCpuAttention:
    """vLLM's CPU paged attention op, called standalone like its CPU_ATTN backend does."""

    def __init__(self) -> None:
        import vllm._custom_ops as ops  # noqa: F401 (registers torch.ops._C wrappers)
        from vllm.platforms import current_platform

        current_platform.import_kernels()
        self.ops = ops

    def isa(self, kv_cache_dtype: str, block_size: int, head_size: int) -> str:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        return _get_attn_isa(torch.bfloat16, block_size, head_size, kv_cache_dtype)

    def setup(self, Hq: int, Hk: int, D: int, B: int, ctx: int, nreq: int, kv_cache_dtype: str):
        """Fill a paged cache for ``nreq`` requests of ``ctx`` tokens; return a decode call."""
        ops = self.ops
        isa = self.isa(kv_cache_dtype, B, D)
        nb = ctx // B
        dtype = torch.uint8 if kv_cache_dtype.startswith("fp8") else torch.bfloat16
        kv = torch.zeros(nreq * nb, Hk, B, 2 * D, dtype=dtype)
        kc, vc = kv.view(nreq * nb, Hk, 2 * B, D).chunk(2, dim=2)
        g = torch.Generator().manual_seed(0)
        for r in range(nreq):  # one request at a time bounds the temporary
            k = torch.randn(nb * B, Hk, D, generator=g).to(torch.bfloat16)
            v = torch.randn(nb * B, Hk, D, generator=g).to(torch.bfloat16)
            slots = torch.arange(r * nb * B, (r + 1) * nb * B)
            ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa, kv_cache_dtype=kv_cache_dtype)
        # one cache per layer, enough layers that they do not fit the last-level cache
        caches = [(kc, vc)] + [tuple(t.clone() for t in kv.view(nreq * nb, Hk, 2 * B, D).chunk(2, dim=2))
                               for _ in range(cold_layers(kv.numel() * kv.element_size()) - 1)]
        # every request owns distinct blocks, shuffled as a paged allocator would leave them
        table = torch.randperm(nreq * nb, generator=g).to(torch.int32).reshape(nreq, nb)
        q = torch.randn(nreq, Hq, D, generator=g).to(torch.bfloat16)
        out = torch.empty_like(q)
        qsl = torch.arange(nreq + 1, dtype=torch.int32)
        seq_lens = torch.full((nreq,), ctx, dtype=torch.int32)
        meta = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=nreq, num_heads=Hq, num_kv_heads=Hk, head_dim=D, seq_lens=seq_lens,
            dtype=torch.bfloat16, query_start_loc=qsl, causal=True, sliding_window_size=-1,
            isa=isa, enable_kv_split=True, kv_cache_dtype=kv_cache_dtype)

        layer = itertools.cycle(caches)

        def call():
            kc, vc = next(layer)
            ops.cpu_attention_with_kv_cache(
                query=q, key_cache=kc, value_cache=vc, output=out, query_start_loc=qsl,
                seq_lens=seq_lens, scale=D ** -0.5, causal=True, alibi_slopes=None,
                sliding_window=-1, block_table=table, softcap=0.0, scheduler_metadata=meta,
                s_aux=None, kv_cache_dtype=kv_cache_dtype)

        return call, isa


    def prefill_setup(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, B: int,
                      kv_cache_dtype: str = "auto"):
        """One request's prefill as the CPU_ATTN backend runs it: the prompt's K/V
        (``k, v [ctx, Hk, D]``) written into a paged cache, then causal attention of its
        queries ``q [ctx, Hq, D]``. Returns (call, output, isa)."""
        import vllm.envs as envs

        ops = self.ops
        ctx, Hq, D = q.shape
        Hk = k.shape[1]
        isa = self.isa(kv_cache_dtype, B, D)
        nb = -(-ctx // B)
        dtype = torch.uint8 if kv_cache_dtype.startswith("fp8") else torch.bfloat16
        kv = torch.zeros(nb, Hk, B, 2 * D, dtype=dtype)
        kc, vc = kv.view(nb, Hk, 2 * B, D).chunk(2, dim=2)
        slots = torch.arange(ctx)
        table = torch.arange(nb, dtype=torch.int32).reshape(1, nb)
        qsl = torch.tensor([0, ctx], dtype=torch.int32)
        seq_lens = torch.tensor([ctx], dtype=torch.int32)
        out = torch.empty_like(q)
        meta = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=1, num_heads=Hq, num_kv_heads=Hk, head_dim=D, seq_lens=seq_lens,
            dtype=torch.bfloat16, query_start_loc=qsl, causal=True, sliding_window_size=-1,
            isa=isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, kv_cache_dtype=kv_cache_dtype)

        def call():
            ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa, kv_cache_dtype=kv_cache_dtype)
            ops.cpu_attention_with_kv_cache(
                query=q, key_cache=kc, value_cache=vc, output=out, query_start_loc=qsl,
                seq_lens=seq_lens, scale=D ** -0.5, causal=True, alibi_slopes=None,
                sliding_window=-1, block_table=table, softcap=0.0, scheduler_metadata=meta,
                s_aux=None, kv_cache_dtype=kv_cache_dtype)

        return call, out, isa


def zipcache_setup(Hq: int, Hk: int, D: int, ctx: int, nreq: int, preset_name: str):
    """Packed pages for ``nreq`` requests of ``ctx`` tokens; return (call, bytes read, layout)."""
    from zipcache_vllm.config import load_preset
    from zipcache_vllm.kernels import attend_packed_batch, quantize_pack
    from zipcache_vllm.layout import BlockLayout
    from zipcache_vllm.quant.block import topk_salient_mask

    layout = BlockLayout.from_preset(load_preset(preset_name), D, Hk)
    B = layout.block_size
    nb = ctx // B
    n = nreq * nb
    g = torch.Generator().manual_seed(0)
    pages = torch.empty(n, layout.page_bytes, dtype=torch.uint8)
    for i in range(0, n, 64):
        m = min(64, n - i)
        k = torch.randn(m, B, Hk, D, generator=g)
        v = torch.randn(m, B, Hk, D, generator=g)
        sal = topk_salient_mask(torch.rand(m, Hk, B, generator=g), layout.n_hi)
        pages[i:i + m] = quantize_pack(k, v, sal, layout)
    table = torch.randperm(n, generator=g).reshape(nreq, nb)
    num_blocks = torch.full((nreq,), nb, dtype=torch.int64)
    q = torch.randn(nreq, Hq, D, generator=g).to(torch.bfloat16)
    layer = itertools.cycle([pages] + [pages.clone() for _ in range(cold_layers(pages.numel()) - 1)])

    def call():
        attend_packed_batch(q, next(layer), table, num_blocks, layout, D ** -0.5)

    return call, n * layout.page_bytes, layout


def run(quick: bool = False, preset: str = "zipcache", contexts=None, batches=None) -> dict:
    """Measure every shape x context x batch; returns rows plus machine facts."""
    from zipcache_vllm.kernels import cpu_isa

    contexts = tuple(contexts or ((1024, 8192) if quick else CONTEXTS))
    batches = tuple(batches or BATCHES)
    min_time, max_reps = (0.15, 20) if quick else (0.5, 100)
    vllm_attn = VllmCpuAttention()
    rows = []
    for shape, (Hq, Hk, D) in SHAPES.items():
        for ctx in contexts:
            for nreq in batches:
                zc_call, zc_bytes, layout = zipcache_setup(Hq, Hk, D, ctx, nreq, preset)
                t_zc = _time(zc_call, min_time, max_reps)
                del zc_call
                bf_call, bf_isa = vllm_attn.setup(Hq, Hk, D, layout.block_size, ctx, nreq, "auto")
                t_bf = _time(bf_call, min_time, max_reps)
                del bf_call
                bf_bytes = nreq * ctx * Hk * D * 2 * 2
                fp8 = None
                try:
                    f_call, _ = vllm_attn.setup(Hq, Hk, D, layout.block_size, ctx, nreq, "fp8")
                    fp8 = _time(f_call, min_time, max_reps)
                    del f_call
                except (NotImplementedError, RuntimeError) as exc:
                    fp8_reason = str(exc).splitlines()[0]
                rows.append(dict(shape=shape, Hq=Hq, Hk=Hk, D=D, ctx=ctx, batch=nreq,
                                 t_bf16=t_bf, t_zc=t_zc, t_fp8=fp8, bf16_bytes=bf_bytes,
                                 zc_bytes=zc_bytes, bf16_isa=bf_isa))
                print(f"  {shape:8s} ctx={ctx:5d} batch={nreq}: bf16 {t_bf * 1e3:7.3f} ms, "
                      f"zipcache {t_zc * 1e3:7.3f} ms", flush=True)
    info = dict(
        bandwidth=copy_bandwidth(),
        cpu=_cpu_name(),
        threads=torch.get_num_threads(),
        zc_isa=cpu_isa(),
        torch=torch.__version__,
        preset=preset,
        timer="wall clock, median" if _timer is TIMERS["wall"] else "thread CPU time, fastest repetition",
        load=os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
        fp8_note=None if any(r["t_fp8"] is not None for r in rows) else locals().get("fp8_reason"),
    )
    return dict(rows=rows, info=info)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_table(res: dict) -> str:
    info, rows = res["info"], res["rows"]
    out = [
        f"machine: {info['cpu']}, {os.cpu_count()} CPUs, torch {info['torch']}, {info['threads']} threads; "
        f"zipcache kernel ISA: {info['zc_isa']}; vLLM CPU attention ISA: {rows[0]['bf16_isa'] if rows else '?'}; "
        f"load average at the end: {info['load']:.2f}",
        f"memory bandwidth (large tensor copy, read + write): {info['bandwidth']:.1f} GB/s",
        f"packed preset: {info['preset']}; timer: {info['timer']}; one decode attention call (one layer), "
        f"per-layer caches rotated (> {COLD_BYTES >> 20} MiB in all, cold last-level cache)",
        "",
        "| shape (Hq/Hk/D) | ctx | batch | bf16 vLLM ms | zipcache ms | speedup vs bf16 | fp8 ms "
        "| bytes bf16 | bytes zipcache | bf16 GB/s | zipcache GB/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fp8 = f"{r['t_fp8'] * 1e3:.3f}" if r["t_fp8"] is not None else "n/a"
        out.append(
            f"| {r['shape']} ({r['Hq']}/{r['Hk']}/{r['D']}) | {r['ctx']} | {r['batch']} "
            f"| {r['t_bf16'] * 1e3:.3f} | {r['t_zc'] * 1e3:.3f} | {r['t_bf16'] / r['t_zc']:.2f}x | {fp8} "
            f"| {r['bf16_bytes'] / 1e6:.2f} MB | {r['zc_bytes'] / 1e6:.2f} MB "
            f"| {r['bf16_bytes'] / r['t_bf16'] / 1e9:.2f} | {r['zc_bytes'] / r['t_zc'] / 1e9:.2f} |")
    if info.get("fp8_note"):
        out += ["", f"fp8: not run: {info['fp8_note']}"]
    return "\n".join(out)


def main(quick: bool = False, preset: str = "zipcache", contexts: str | None = None,
         batches: str | None = None, threads: int | None = None, timer: str = "wall") -> int:
    global _timer
    if timer == "cpu":
        threads = 1
    _timer = TIMERS[timer]
    if threads:
        torch.set_num_threads(threads)
    parse = (lambda s: [int(x) for x in s.split(",")] if s else None)
    res = run(quick=quick, preset=preset, contexts=parse(contexts), batches=parse(batches))
    print()
    print(format_table(res))
    return 0
