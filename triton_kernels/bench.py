"""Decode-attention benchmark on a CUDA GPU: zipcache pages vs a bf16 baseline.

Run on a GPU machine (torch + triton, no vLLM needed)::

    python -m triton_kernels.bench                      # defaults below
    python -m triton_kernels.bench --contexts 1024,8192 --batches 1 --csv out.csv
    python -m triton_kernels.bench --device cpu --interpret --quick   # smoke run of this code

For every (batch, context) it times (``triton.testing.do_bench``, median; L2 flushed
before every repetition):

* ``zip``: :func:`triton_kernels.decode_attention` over the packed pages alone;
* ``zip+stage``: the whole decode read of the backend, packed pages plus a full
  bf16 staging block (:func:`staging_attention`) merged by :func:`merge_lse`;
* ``bf16``: ``torch.nn.functional.scaled_dot_product_attention`` over contiguous
  bf16 K/V ``[batch, Hk, ctx, D]`` (``enable_gqa=True``), in the first SDPA backend
  that runs it of flash, cuDNN, memory-efficient, math (the row names it).

and reports achieved GB/s = bytes the kernel must read (pages, or bf16 K and V;
queries and outputs are negligible) / time, next to the card's datasheet bandwidth
(:data:`PEAK_BANDWIDTH`, matched on the GPU's name) and a measured device copy.
Pages are real quantized data: a pool of distinct pages is packed with
:func:`quantize_pack` and copied to fill the cache, so no two block-table entries alias.
A cell that fails (out of memory, a kernel error) becomes a row with its error; the
other cells still run. ``--jsonl`` writes each row as soon as it is measured.

Without CUDA it refuses to run, except ``--device cpu --interpret``: the kernels then run
in Triton's CPU interpreter, which times numpy, not a GPU. That mode (with ``--quick``,
one tiny cell) only checks that this code runs (tests/kernels/test_gpu_check.py).

``python -m triton_kernels.bench report ...`` writes the markdown report of
``scripts/gpu_check.sh`` from its stage logs (:func:`report_main`).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from zipcache_vllm.layout import BlockLayout

DEFAULT_CONTEXTS = (1024, 8192, 32768, 131072)
DEFAULT_BATCHES = (1, 16)
UNIQUE_PAGES = 256  # distinct quantized pages, copied to fill the cache
# --quick: one tiny cell (a smoke run, sized for Triton's interpreter).
QUICK = dict(contexts=[64], batches=[1], num_heads=4, num_kv_heads=2, head_size=64, block_size=32,
             rep=1)

# Datasheet memory bandwidth (GB/s) by GPU name as ``torch.cuda.get_device_name`` spells
# it: (regex searched case-insensitively, first match wins; card; GB/s or None when the
# name does not tell the variant apart). Order matters: "GH200" contains "H200".
PEAK_BANDWIDTH: tuple[tuple[str, str, float | None], ...] = (
    (r"GH200", "GH200 (96 GB HBM3: 4000, 144 GB HBM3e: 4900; not told apart by name)", None),
    (r"H200", "H200 (SXM or NVL)", 4800.0),
    (r"H100.*NVL", "H100 NVL", 3900.0),
    (r"H100.*PCIe", "H100 PCIe", 2000.0),
    (r"H100.*(HBM3|SXM)", "H100 SXM", 3350.0),
    (r"H800.*PCIe", "H800 PCIe", 2000.0),
    (r"H800", "H800 SXM", 3350.0),
    (r"B200", "B200", 8000.0),
    (r"A100.*80GB.*PCIe", "A100 80GB PCIe", 1935.0),
    (r"A100.*80GB", "A100 80GB SXM", 2039.0),
    (r"A100", "A100 40GB", 1555.0),
    (r"L40S", "L40S", 864.0),
    (r"L40\b", "L40", 864.0),
    (r"\bL4\b", "L4", 300.0),
    (r"A10G", "A10G", 600.0),
    (r"\bA10\b", "A10", 600.0),
    (r"RTX 4090", "GeForce RTX 4090", 1008.0),
    (r"V100", "V100 (SXM2 / PCIe 16-32 GB)", 900.0),
    (r"\bT4\b", "T4", 320.0),
)


def peak_bandwidth(gpu_name: str) -> tuple[str | None, float | None]:
    """``(card, GB/s)`` of :data:`PEAK_BANDWIDTH` for a device name; ``(None, None)`` if
    the table does not know it, ``(card, None)`` if the name does not pin the variant."""
    for pattern, card, gbps in PEAK_BANDWIDTH:
        if re.search(pattern, gpu_name, re.IGNORECASE):
            return card, gbps
    return None, None


def _parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m triton_kernels.bench", description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=_parse_ints, default=list(DEFAULT_CONTEXTS),
                   help="context lengths in tokens (comma separated)")
    p.add_argument("--batches", type=_parse_ints, default=list(DEFAULT_BATCHES),
                   help="decode batch sizes (comma separated)")
    p.add_argument("--num-heads", type=int, default=32, help="query heads (Llama-3-8B: 32)")
    p.add_argument("--num-kv-heads", type=int, default=8, help="KV heads (Llama-3-8B: 8)")
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128, help="tokens per page (preset: 128)")
    p.add_argument("--hi-bits", type=int, default=4)
    p.add_argument("--lo-bits", type=int, default=2)
    p.add_argument("--salient-ratio", type=float, default=0.45, help="preset zipcache: 0.45")
    p.add_argument("--split-kv", type=int, default=None, help="default: ops.default_split_kv")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu only with --interpret (a smoke run, not a measurement)")
    p.add_argument("--interpret", action="store_true",
                   help="run the kernels in Triton's CPU interpreter (sets TRITON_INTERPRET=1; "
                   "needs --device cpu); times are numpy's, not a GPU's")
    p.add_argument("--quick", action="store_true",
                   help="one tiny cell (context 64, batch 1, Hq 4, Hk 2, D 64, B 32), for smoke runs")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    p.add_argument("--jsonl", default=None,
                   help="append a meta line, then each row as it is measured, as JSON lines")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def _fill_pages(layout: BlockLayout, num_pages: int, device: torch.device) -> torch.Tensor:
    from .ops import quantize_pack

    B, H, D = layout.block_size, layout.num_kv_heads, layout.head_size
    n = min(UNIQUE_PAGES, num_pages)
    gen = torch.Generator(device=device).manual_seed(0)
    k = torch.randn(n, B, H, D, device=device, generator=gen, dtype=torch.bfloat16)
    v = torch.randn(n, B, H, D, device=device, generator=gen, dtype=torch.bfloat16)
    ranks = torch.rand(n, H, B, device=device, generator=gen)
    salient = torch.zeros(n, H, B, dtype=torch.bool, device=device)
    salient.scatter_(-1, ranks.topk(layout.n_hi, dim=-1).indices, True)
    uniq = torch.empty(n, layout.page_bytes, dtype=torch.uint8, device=device)
    quantize_pack(k, v, salient, layout, uniq, torch.arange(n, dtype=torch.int32, device=device))
    pages = torch.empty(num_pages, layout.page_bytes, dtype=torch.uint8, device=device)
    for start in range(0, num_pages, n):
        m = min(n, num_pages - start)
        pages[start:start + m] = uniq[:m]
    return pages


def make_timer(dev: torch.device, rep_ms: int):
    """``timer(fn) -> ms``: ``triton.testing.do_bench`` (median, L2 flushed before every
    repetition) on CUDA; on the CPU the wall-clock median of a few calls."""
    if dev.type == "cuda":
        import triton.testing

        def cuda_ms(fn) -> float:
            ms = triton.testing.do_bench(fn, rep=rep_ms, quantiles=[0.5])
            return float(ms[0] if isinstance(ms, (list, tuple)) else ms)

        return cuda_ms

    def cpu_ms(fn) -> float:
        fn()
        times: list[float] = []
        stop = time.perf_counter() + rep_ms / 1e3
        while len(times) < 3 or (time.perf_counter() < stop and len(times) < 100):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    return cpu_ms


def copy_bandwidth(dev: torch.device, timer, nbytes: int) -> float:
    """GB/s of a device-to-device copy of ``nbytes`` (bytes read + written), the practical
    bandwidth limit the kernels' GB/s are compared with."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = timer(lambda d=dst, s=src: d.copy_(s))
    del src, dst
    _free(dev)
    return 2 * nbytes / ms / 1e6


def _free(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def sdpa_baseline(q4: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """``(fn, label)``: bf16 SDPA of ``q4 [b, Hq, 1, D]`` over ``k, v [b, Hk, ctx, D]`` in the
    first backend that runs it (flash, cuDNN, efficient, math). Without ``enable_gqa``
    (torch < 2.5) K/V are repeated to ``Hq`` heads first (the label says so)."""
    F = torch.nn.functional
    label_gqa = ""
    try:
        F.scaled_dot_product_attention(q4[:1, :, :, :], k[:1, :, :1], v[:1, :, :1], scale=scale,
                                       enable_gqa=True)
        kw = dict(enable_gqa=True)
    except TypeError:
        g = q4.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        kw, label_gqa = {}, ", K/V repeated to Hq (torch without enable_gqa)"
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return (lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, **kw)), "sdpa" + label_gqa
    names = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
    errors = []
    for name in names:
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q4, k, v, scale=scale, **kw)
        except RuntimeError as exc:
            errors.append(f"{name}: {str(exc).splitlines()[0][:80]}")
            continue

        def fn(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q4, k, v, scale=scale, **kw)

        return fn, f"sdpa {name.lower()}{label_gqa}"
    raise RuntimeError("no SDPA backend runs the bf16 baseline: " + "; ".join(errors))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _cell(args, layout: BlockLayout, dev: torch.device, timer, batch: int, ctx: int) -> dict:
    """One (batch, context) row; a failing half (zip or bf16) records its error and the
    other half still runs."""
    from .ops import decode_attention, default_split_kv, merge_lse, staging_attention

    Hq, Hk, D, B = args.num_heads, args.num_kv_heads, args.head_size, args.block_size
    scale = D ** -0.5
    nb = ctx // B
    row: dict = dict(batch=batch, ctx=ctx, zip_bytes=batch * nb * layout.page_bytes,
                     bf16_bytes=2 * batch * Hk * ctx * D * 2)
    errors = []
    q = torch.randn(batch, Hq, D, device=dev, dtype=torch.bfloat16)
    try:
        pages = _fill_pages(layout, batch * nb, dev)
        table = torch.randperm(batch * nb, device=dev).to(torch.int32).reshape(batch, nb)
        num_blocks = torch.full((batch,), nb, dtype=torch.int32, device=dev)
        split = args.split_kv or default_split_kv(batch, Hk, nb, dev)
        k_st = torch.randn(batch, Hk, B, D, device=dev, dtype=torch.bfloat16)
        v_st = torch.randn_like(k_st)
        st_len = torch.full((batch,), B, dtype=torch.int32, device=dev)

        def zip_only():
            return decode_attention(q, pages, table, num_blocks, layout, scale, split_kv=split)

        def zip_stage():
            po, pl = decode_attention(q, pages, table, num_blocks, layout, scale, split_kv=split)
            so, sl = staging_attention(q, k_st, v_st, st_len, scale)
            return merge_lse(po, pl, so, sl)

        out, _ = zip_only()
        if not bool(torch.isfinite(out).all()):
            raise RuntimeError("decode_attention returned non-finite values")
        row["split_kv"] = split
        row["zip_ms"] = timer(zip_only)
        row["zip_gbps"] = row["zip_bytes"] / row["zip_ms"] / 1e6
        row["zip_stage_ms"] = timer(zip_stage)
    except Exception as exc:  # noqa: BLE001 -- one failing cell must not end the run
        errors.append("zip: " + _first_line(exc))
    finally:
        pages = table = k_st = v_st = None
        _free(dev)
    try:
        k = torch.randn(batch, Hk, ctx, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        fn, label = sdpa_baseline(q.unsqueeze(2), k, v, scale)
        row["bf16_impl"] = label
        row["bf16_ms"] = timer(fn)
        row["bf16_gbps"] = row["bf16_bytes"] / row["bf16_ms"] / 1e6
    except Exception as exc:  # noqa: BLE001
        errors.append("bf16: " + _first_line(exc))
    finally:
        k = v = fn = None
        _free(dev)
    if errors:
        row["error"] = "; ".join(errors)
    return row


def _fmt(row: dict, key: str, spec: str) -> str:
    """``row[key]`` formatted by ``spec`` (``">W..."``), or ``-`` in the same width when the
    cell did not measure it."""
    if row.get(key) is not None:
        return format(row[key], spec)
    return format("-", ">" + re.match(r">(\d+)", spec).group(1))


def _versions() -> dict:
    import triton

    return dict(torch=torch.__version__, torch_cuda=torch.version.cuda, triton=triton.__version__)


def run(args: argparse.Namespace, dev: torch.device = torch.device("cuda")) -> list[dict]:
    """Times every (batch, context) on ``dev``; returns one dict per row (also printed, and
    appended to ``args.jsonl`` as measured). Row keys: batch, ctx, split_kv, zip_ms,
    zip_gbps, zip_stage_ms, bf16_impl, bf16_ms, bf16_gbps, zip_bytes, bf16_bytes, and
    ``error`` for a cell that failed."""
    Hq, Hk, D, B = args.num_heads, args.num_kv_heads, args.head_size, args.block_size
    layout = BlockLayout(block_size=B, head_size=D, num_kv_heads=Hk, hi_bits=args.hi_bits,
                         lo_bits=args.lo_bits, n_hi=int(round(args.salient_ratio * B)))
    timer = make_timer(dev, args.rep)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (Triton interpreter)"
    card, peak = peak_bandwidth(name) if dev.type == "cuda" else (None, None)
    copy_bytes = 1 << 30 if dev.type == "cuda" and not args.quick else 64 << 20
    copy_gbps = copy_bandwidth(dev, timer, copy_bytes)
    jsonl = open(args.jsonl, "a") if args.jsonl else None

    def emit(record: dict) -> None:
        if jsonl:
            jsonl.write(json.dumps(record) + "\n")
            jsonl.flush()

    emit(dict(kind="meta", device=name, interpret=dev.type != "cuda", card=card, peak_gbps=peak,
              copy_gbps=copy_gbps, copy_bytes=copy_bytes, num_heads=Hq, num_kv_heads=Hk,
              head_size=D, block_size=B, hi_bits=args.hi_bits, lo_bits=args.lo_bits,
              n_hi=layout.n_hi, page_bytes=layout.page_bytes,
              compression_vs_bf16=layout.compression_vs_bf16, **_versions()))
    print(f"# {name}; datasheet bandwidth: {f'{peak:.0f} GB/s ({card})' if peak else 'unknown'}; "
          f"device copy ({copy_bytes >> 20} MiB, read + write counted): {copy_gbps:.0f} GB/s")
    print(f"# Hq={Hq} Hk={Hk} D={D} B={B} bits={args.hi_bits}/{args.lo_bits} n_hi={layout.n_hi}; "
          f"page {layout.page_bytes} B ({layout.compression_vs_bf16:.2f}x vs bf16)")
    if dev.type != "cuda":
        print("# Triton interpreter on the CPU: the times below are numpy's, not kernel timings")
    print(f"{'batch':>5} {'ctx':>7} {'split':>5} | {'zip ms':>8} {'GB/s':>7} | {'zip+stage ms':>12} | "
          f"{'bf16 ms':>8} {'GB/s':>7} | {'bf16/zip':>8}")
    rows = []
    try:
        for batch in args.batches:
            for ctx in args.contexts:
                row = _cell(args, layout, dev, timer, batch, ctx)
                rows.append(row)
                emit(dict(kind="row", **row))
                ratio = (f"{row['bf16_ms'] / row['zip_ms']:>8.2f}"
                         if "zip_ms" in row and "bf16_ms" in row else f"{'-':>8}")
                print(f"{batch:>5} {ctx:>7} {_fmt(row, 'split_kv', '>5')} | {_fmt(row, 'zip_ms', '>8.3f')} "
                      f"{_fmt(row, 'zip_gbps', '>7.0f')} | {_fmt(row, 'zip_stage_ms', '>12.3f')} | "
                      f"{_fmt(row, 'bf16_ms', '>8.3f')} {_fmt(row, 'bf16_gbps', '>7.0f')} | {ratio}"
                      + (f"  ERROR {row['error']}" if "error" in row else ""), flush=True)
    finally:
        if jsonl:
            jsonl.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    """Bench (exit 0; 1 if a cell failed; 2 if it cannot run here), or ``report ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    args = _args(argv)
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if args.interpret:
        if args.device != "cpu":
            print("triton_kernels.bench: --interpret needs --device cpu", file=sys.stderr)
            return 2
        if not interpreting and f"{__package__}.kernels" in sys.modules:
            print("triton_kernels.bench: the kernels are already compiled for the GPU in this "
                  "process; set TRITON_INTERPRET=1 before starting Python", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # read when kernels.py is first imported
    elif args.device == "cpu":
        print("triton_kernels.bench: the Triton kernels run on the CPU only in the interpreter: "
              "add --interpret (a smoke run, not a measurement)", file=sys.stderr)
        return 2
    elif not torch.cuda.is_available() or interpreting:
        print("triton_kernels.bench needs a CUDA GPU and TRITON_INTERPRET unset: "
              "the interpreter would time numpy on the CPU, not the kernels. Nothing measured.",
              file=sys.stderr)
        return 2
    rows = run(args, torch.device(args.device))
    if args.csv and rows:
        fields = list(dict.fromkeys(key for row in rows for key in row))
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    return 1 if any("error" in row for row in rows) else 0


# ---------------------------------------------------------------------------
# The report of scripts/gpu_check.sh
# ---------------------------------------------------------------------------

OUTCOMES = ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")
_RESULT_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.M)
_SUMMARY_LINE = re.compile(r"^(FAILED|ERROR) (\S+)(?: - (.*))?$", re.M)


def parse_pytest_log(text: str) -> dict:
    """Outcomes in the output of ``pytest -v -ra`` (also a partial one, cut by a timeout,
    or a ``--collect-only`` one for its collection errors).

    Returns ``{"counts": {outcome: n}, "seen": set of node ids with an outcome,
    "problems": [(node id or file, message)]}``: failures and errors with their short
    summary message; collection errors (a file that did not import) count as errors.
    """
    counts = dict.fromkeys(OUTCOMES, 0)
    seen = set()
    for node, outcome in _RESULT_LINE.findall(text):
        counts[outcome] += 1
        seen.add(node)
    problems = []
    for kind, node, message in _SUMMARY_LINE.findall(text):
        if "::" not in node:  # a collection error: the message is in its "E " lines
            counts["ERROR"] += 1
            m = re.search(rf"ERROR collecting {re.escape(node)}.*?^E +(.+?)$", text, re.M | re.S)
            message = message or (m.group(1) if m else "collection error")
        problems.append((node, f"{kind}: {message}" if message else kind))
    return dict(counts=counts, seen=seen, problems=problems)


def read_jsonl(path: str | Path) -> tuple[dict | None, list[dict]]:
    """``(meta, rows)`` of a ``--jsonl`` file (missing or partial files allowed)."""
    meta, rows = None, []
    p = Path(path)
    if not p.is_file():
        return meta, rows
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a timeout
        kind = rec.pop("kind", None)
        if kind == "meta":
            meta = rec
        elif kind == "row":
            rows.append(rec)
    return meta, rows


def _md_row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def md_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table (``|`` in cells escaped)."""
    return "\n".join([_md_row(header), _md_row(["---"] * len(header))] + [_md_row(r) for r in rows])


def bench_table(rows: list[dict], peak_gbps: float | None) -> str:
    """The benchmark rows as a markdown table; "% peak" is GB/s over the datasheet
    bandwidth (``-`` when the card is unknown)."""
    def num(row, key, spec):
        return format(row[key], spec) if row.get(key) is not None else "-"

    def pct(row, key):
        return f"{100 * row[key] / peak_gbps:.0f}%" if peak_gbps and row.get(key) else "-"

    body = []
    for r in rows:
        ratio = f"{r['bf16_ms'] / r['zip_ms']:.2f}x" if r.get("zip_ms") and r.get("bf16_ms") else "-"
        body.append([r["batch"], r["ctx"], num(r, "split_kv", "d"), num(r, "zip_ms", ".3f"),
                     num(r, "zip_gbps", ".0f"), pct(r, "zip_gbps"), num(r, "zip_stage_ms", ".3f"),
                     num(r, "bf16_ms", ".3f"), num(r, "bf16_gbps", ".0f"), pct(r, "bf16_gbps"), ratio,
                     r.get("bf16_impl", "-"), r.get("error", "")])
    return md_table(["batch", "context", "split", "zip ms", "zip GB/s", "zip % peak", "zip+stage ms",
                     "bf16 ms", "bf16 GB/s", "bf16 % peak", "bf16/zip", "bf16 kernel", "error"], body)


def read_stages(path: str | Path) -> list[dict]:
    """Stage records of gpu_check.sh: ``name<TAB>rc<TAB>seconds<TAB>limit<TAB>note`` lines."""
    stages = []
    p = Path(path)
    for line in (p.read_text().splitlines() if p.is_file() else []):
        name, rc, sec, limit, *note = line.split("\t") + [""]
        stages.append(dict(name=name, rc=int(rc), seconds=int(sec), limit=int(limit), note=note[0]))
    return stages


def stage_status(rc: int) -> str:
    return {0: "ok", 124: "TIMED OUT", 137: "TIMED OUT (killed)"}.get(rc, f"failed (exit {rc})")


def render_report(env: dict, stages: list[dict], tests: dict, collected: list[str],
                  bench_meta: dict | None, bench_rows: list[dict]) -> tuple[str, bool]:
    """``(markdown, passed)`` of a gpu_check run.

    ``env``: the script's preflight facts (gpu, capability, sms, memory_gib, driver,
    torch, torch_cuda, triton, python, pytest, selftest). ``tests``: merged
    :func:`parse_pytest_log` of the collection and every test shard. ``collected``: the
    node ids the shards were given. Passed = every stage ok, every collected test
    passed or skipped, no collection error, and every bench cell measured.
    """
    counts, seen = tests["counts"], tests["seen"]
    not_run = [n for n in collected if n not in seen]
    card, peak = peak_bandwidth(env.get("gpu", ""))
    problems = []
    for s in stages:
        if s["rc"] != 0 and not (s["name"] == "tests" and s["rc"] == 1):  # 1: failures, listed below
            problems.append(f"stage {s['name']} {stage_status(s['rc'])}" + (f": {s['note']}" if s["note"] else ""))
    if counts["FAILED"] or counts["ERROR"]:
        problems.append(f"{counts['FAILED']} tests failed, {counts['ERROR']} errors")
    if not_run:
        problems.append(f"{len(not_run)} collected tests did not run")
    if not counts["PASSED"]:
        problems.append("no test passed")
    bench_errors = [r for r in bench_rows if r.get("error")]
    if bench_errors:
        problems.append(f"{len(bench_errors)} bench cells failed")
    if not bench_rows:
        problems.append("no bench row")
    passed = not problems
    selftest = bool(env.get("selftest"))

    out = ["# zipcache Triton kernels: GPU check", ""]
    if selftest:
        out += ["**CPU SELF-TEST of scripts/gpu_check.sh (Triton interpreter, one tiny bench cell): "
                "NOT a GPU result.**", ""]
    out += [f"**Result: {'PASS' if passed else 'FAIL'}**" + ("" if passed else ": " + "; ".join(problems)), ""]
    mem = f", {env['memory_gib']:.1f} GiB" if env.get("memory_gib") else ""
    gpu = env.get("gpu", "?") + (f" (sm_{env['capability']}, {env.get('sms')} SMs{mem})"
                                  if env.get("capability") else "")
    if peak:
        peak_text = f"{peak:.0f} GB/s ({card}, datasheet)"
    else:
        peak_text = f"unknown ({card})" if card else "unknown (GPU name not in triton_kernels/bench.py's table)"
    facts = [("GPU", gpu), ("datasheet memory bandwidth", peak_text)]
    if bench_meta:
        facts.append(("measured device copy", f"{bench_meta['copy_gbps']:.0f} GB/s "
                      f"({bench_meta['copy_bytes'] >> 20} MiB copy, read + write counted)"))
    facts += [("driver", env.get("driver") or "?"),
              ("torch", f"{env.get('torch', '?')} (CUDA {env.get('torch_cuda') or 'none'})"),
              ("triton", env.get("triton", "?")), ("python", env.get("python", "?")),
              ("pytest", env.get("pytest") or "not installed"),
              ("repository commit", env.get("commit") or "?"), ("date", env.get("date", "?"))]
    out += [md_table(["", ""], facts), "", "## Stages", ""]
    out += [md_table(["stage", "result", "seconds", "limit (s)", "note"],
                     [[s["name"], stage_status(s["rc"]), s["seconds"], s["limit"], s["note"]] for s in stages]),
            ""]
    where = "Triton interpreter on the CPU" if selftest else "compiled, on the GPU"
    out += [f"## Triton tests ({where})", "",
            md_table(["collected", "passed", "failed", "errors", "skipped", "xfail", "not run"],
                     [[len(collected), counts["PASSED"], counts["FAILED"], counts["ERROR"],
                       counts["SKIPPED"], counts["XFAIL"], len(not_run)]]), ""]
    if tests["problems"]:
        out += ["Failures and errors (pytest's short summary; full output in the logs):", ""]
        out += [f"- `{node}`: {msg[:300]}" for node, msg in tests["problems"][:30]]
        if len(tests["problems"]) > 30:
            out.append(f"- ... and {len(tests['problems']) - 30} more")
        out.append("")
    if not_run:
        out += ["Not run (a shard timed out or crashed): " + ", ".join(f"`{n}`" for n in not_run[:10])
                + (f" and {len(not_run) - 10} more" if len(not_run) > 10 else ""), ""]
    out += ["## Decode attention: zipcache pages vs bf16", ""]
    if bench_meta:
        m = bench_meta
        out += [f"Hq {m['num_heads']}, Hk {m['num_kv_heads']}, D {m['head_size']}, page of "
                f"{m['block_size']} tokens at {m['hi_bits']}/{m['lo_bits']} bits (n_hi {m['n_hi']}): "
                f"{m['page_bytes']} B, {m['compression_vs_bf16']:.2f}x smaller than bf16. "
                "Times: median of `triton.testing.do_bench` (L2 flushed before each repetition). "
                "GB/s = bytes that must be read (pages; bf16 K + V) / time; % peak = of the datasheet "
                "bandwidth. `zip+stage` adds one bf16 staging block per request and the LSE merge "
                "(the backend's whole decode read). bf16/zip > 1: zipcache faster.", ""]
        if m.get("interpret"):
            out += ["Interpreter: these times are numpy on the CPU, not kernel timings.", ""]
    out += [bench_table(bench_rows, peak) if bench_rows else "No bench row was measured.", ""]
    return "\n".join(out), passed


def report_main(argv: list[str]) -> int:
    """``report``: write gpu_check.sh's markdown report; exit 0 if the check passed, else 1."""
    p = argparse.ArgumentParser(prog="python -m triton_kernels.bench report")
    p.add_argument("--env", required=True, help="preflight facts (JSON)")
    p.add_argument("--stages", required=True, help="stage records (TSV)")
    p.add_argument("--ids", default=None, help="collected node ids, one per line")
    p.add_argument("--tests-log", action="append", default=[], help="pytest output (repeatable)")
    p.add_argument("--bench-jsonl", default=None)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    env = json.loads(Path(a.env).read_text())
    tests = dict(counts=dict.fromkeys(OUTCOMES, 0), seen=set(), problems=[])
    for log in a.tests_log:
        if Path(log).is_file():
            part = parse_pytest_log(Path(log).read_text(errors="replace"))
            for k, n in part["counts"].items():
                tests["counts"][k] += n
            tests["seen"] |= part["seen"]
            tests["problems"] += part["problems"]
    ids = Path(a.ids).read_text().split() if a.ids and Path(a.ids).is_file() else []
    meta, rows = read_jsonl(a.bench_jsonl) if a.bench_jsonl else (None, [])
    text, passed = render_report(env, read_stages(a.stages), tests, ids, meta, rows)
    Path(a.out).write_text(text)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
