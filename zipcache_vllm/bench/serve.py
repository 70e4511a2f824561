"""``zipcache-vllm bench serve``: serving throughput under KV-memory pressure, per KV dtype.

For each dtype (``auto``, ``fp8``, every quantizing preset) one ``vllm serve`` (through
our launcher) starts with the same model, engine arguments and KV budget in bytes
(``--kv-cache-memory-bytes``: ``VLLM_CPU_KVCACHE_SPACE`` takes whole GiB, and 1 GiB
already holds 46,592 bf16 tokens of this model, more than a 2-core box can prefill in a
short benchmark). The budget is picked so that ``auto`` holds only a few requests at
once: the rest queue or get preempted, and a cache that holds more tokens runs more
requests per engine step.

The load, in ``vllm bench serve``'s terms and flags: ``--num-prompts`` requests with prose
prompts of ``--input-len`` tokens (a different window each, no prefix caching),
``--output-len`` greedy tokens each (``ignore_eos``), at most ``--max-concurrency`` in
flight, sent at ``--request-rate`` per second (Poisson arrivals, seeded by ``--seed``;
``inf``, the default, sends them all at once) as streaming requests over loopback HTTP
(aiohttp, ``/v1/completions``, ``stream: true``). Per request: TTFT (send to first token)
and inter-token latencies; per run: requests/s and output tokens/s over the wall time of
the load, and from the server's ``/metrics``: the preemption counter
(``vllm:num_preemptions_total``) and, sampled twice a second, the running and waiting
request counts. Unlike ``vllm bench serve``, which drives a server you started, this starts
one server per dtype itself (so the server flags, ``--kv-cache-memory-bytes``,
``--max-num-seqs``, ``--max-num-batched-tokens``, ``--max-model-len``, are here too) and
reads prose, not a ``--dataset-name``.

Imports here stay cheap (the CLI builds its parser from this module).
"""
from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..engine_proc import REFUSAL
from ..planner.units import human_readable_int

BASELINE = "auto"
# vLLM's startup refusal of a budget that cannot hold one request of --max-model-len (with a
# zipcache dtype, its staging blocks included): in a budget sweep that budget becomes a row,
# as vLLM's fp8 refusal (REFUSAL) does.
CAPACITY_REFUSAL = re.compile(r"(To serve at least one request with the model's max seq len \(\d+\), "
                              r"\([\d.]+ GiB KV cache is needed)")


@dataclass(frozen=True)
class Workload:
    requests: int  # --num-prompts
    clients: int  # --max-concurrency: requests in flight at most
    prompt_len: int  # --input-len
    output_len: int  # --output-len
    kv_bytes: int  # --kv-cache-memory-bytes for every server
    max_num_seqs: int | None  # the same for every dtype; None: not passed, each server keeps its default
    chunk: int = 512  # --max-num-batched-tokens
    max_model_len: int = 512  # vLLM refuses a cache smaller than one request of this length
    ceiling_bytes: int = 0  # > 0: one more `auto` run with this budget (memory not the limit)
    request_rate: float | None = None  # --request-rate, requests/s (Poisson); None: all at once (inf)
    seed: int = 0  # the arrival times' random seed
    # The budget sweep: every dtype at each of these --kv-cache-memory-bytes (replacing
    # kv_bytes and the ceiling run), so the table shows where each dtype stops being
    # memory-bound. Empty: one budget (kv_bytes).
    sweep_bytes: tuple[int, ...] = ()


# The flags that override a Workload field: (flag, field, type). The names are vLLM's: `vllm
# bench serve` for the load, `vllm serve` for the server (sizes read with vLLM's suffixes).
OVERRIDES = (("--num-prompts", "requests", int), ("--max-concurrency", "clients", int),
             ("--request-rate", "request_rate", float), ("--input-len", "prompt_len", int),
             ("--output-len", "output_len", int), ("--seed", "seed", int),
             ("--kv-cache-memory-bytes", "kv_bytes", human_readable_int),
             ("--max-num-seqs", "max_num_seqs", int), ("--max-num-batched-tokens", "chunk", human_readable_int),
             ("--max-model-len", "max_model_len", human_readable_int),
             ("--ceiling-kv-cache-memory-bytes", "ceiling_bytes", human_readable_int))


def byte_sizes(text: str) -> tuple[int, ...]:
    """``--sweep-kv-cache-memory-bytes``: comma-separated sizes with vLLM's suffixes, ascending."""
    sizes = sorted({human_readable_int(x.strip()) for x in text.split(",") if x.strip()})
    if not sizes or sizes[0] <= 0:
        raise ValueError(f"expected positive sizes such as 64M,128M,256M; got {text!r}")
    return tuple(sizes)


# Sizing (bf16: 23,040 bytes per token of SmolLM2, 2.95 MB per 128-token block; the default
# preset: 0.64 MB per block, and 2 blocks ahead of each running request for its 8-bit
# staging): a request of 128 + 384 tokens takes 4 blocks; at 136 MiB `auto` holds 48 blocks
# (12 such requests), the default preset 222 blocks, 6 per request with its 2 staging blocks
# (all 24 sequences run: 37 such requests fit).
# The ceiling run: 512 MiB holds every request of the load in bf16 (24 x 4 blocks = 283 MB).
FULL = Workload(requests=48, clients=24, prompt_len=128, output_len=384, kv_bytes=136 * 2**20, max_num_seqs=24,
                ceiling_bytes=512 * 2**20)
# CI smoke load: 24 MiB holds 8 bf16 blocks; the default preset 39 (4 per 192-token request).
QUICK = Workload(requests=8, clients=8, prompt_len=128, output_len=64, kv_bytes=24 * 2**20, max_num_seqs=4)


def add_parser(bsub) -> None:
    """The ``serve`` subcommand of ``zipcache-vllm bench``."""
    s = bsub.add_parser(
        "serve", help="serving throughput per KV dtype under KV-memory pressure (real vllm serve + HTTP)",
        description=__doc__.split("\n\n")[1])
    s.add_argument("--model", default=None, help="HF model folder (default: the prepared SmolLM2)")
    s.add_argument("--kv-cache-dtype", default=None,
                   help="comma-separated --kv-cache-dtype values (default: auto, fp8, every preset)")
    s.add_argument("--quick", action="store_true", help=f"small load for CI: {QUICK}")
    for flag, name, kind in OVERRIDES:
        full = getattr(FULL, name)
        s.add_argument(flag, dest=name, type=kind, default=None,
                       help=f"override the workload (full: {'inf' if full is None else full})")
    s.add_argument("--sweep-kv-cache-memory-bytes", dest="sweep_bytes", type=byte_sizes, default=None,
                   help="budget sweep: run every dtype at each of these comma-separated KV budgets "
                        "(vLLM's size suffixes, e.g. 64M,128M,256M,512M) instead of one budget and the "
                        "ceiling run; the table and plot show req/s and p90 TTFT against the budget")
    s.add_argument("--default-max-num-seqs", action="store_true",
                   help="do not pass --max-num-seqs: every server keeps its own default (vLLM's, or "
                        "what the plugin sets for its dtypes), what `vllm serve` users get")
    s.add_argument("--markdown", default=None, help="write the table, command and machine here")
    s.add_argument("--json", default=None, help="write the raw results here")
    s.add_argument("--plot", default=None, help="write a PNG (req/s and TTFT per dtype) here")
    s.set_defaults(func=_cmd)


def _cmd(args) -> int:
    from dataclasses import replace

    base = QUICK if args.quick else FULL
    over = {name: getattr(args, name) for _, name, _ in OVERRIDES if getattr(args, name) is not None}
    if over.get("request_rate") is not None and math.isinf(over["request_rate"]):
        over["request_rate"] = None
    if args.default_max_num_seqs:
        if "max_num_seqs" in over:
            print("error: --default-max-num-seqs and --max-num-seqs contradict each other", file=sys.stderr)
            return 2
        over["max_num_seqs"] = None
    if args.sweep_bytes:
        over["sweep_bytes"] = args.sweep_bytes
    w = replace(base, **over)
    if w.prompt_len + w.output_len > w.max_model_len:
        print(f"error: --input-len {w.prompt_len} + --output-len {w.output_len} exceeds --max-model-len "
              f"{w.max_model_len}: vLLM would refuse every request", file=sys.stderr)
        return 2
    names = args.kv_cache_dtype.split(",") if args.kv_cache_dtype else default_dtypes()
    model_dir = args.model or str(_default_model())
    res = run(model_dir, w, names)
    from ..eval.offline import machine_line

    text = markdown(res, "zipcache-vllm " + " ".join(sys.argv[1:]), machine_line())
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if args.plot:
        plot(res, args.plot)
    return 0


def _default_model():
    from ..model.prepare import prepare_default_model

    return prepare_default_model()


def default_dtypes() -> list[str]:
    from ..eval.engine_eval import dtypes

    return dtypes()


# --------------------------------------------------------------------------- server
def start_server(model_dir: str, kv_dtype: str, w: Workload):
    """A server handle (:class:`zipcache_vllm.reliability.server.Server`: wait, log, stop) for
    this workload's engine args, started without ``VLLM_CPU_KVCACHE_SPACE`` in its environment:
    vLLM's CPU platform replaces ``--kv-cache-memory-bytes`` with that variable when it is set,
    and an empty value fails in the worker (``int('')``)."""
    import os
    import subprocess
    import tempfile

    from ..reliability.server import Server, free_port

    class ByteBudgetServer(Server):
        def __init__(self) -> None:  # same fields as Server, a different environment
            self.port = free_port()
            self.log_path = Path(tempfile.mkstemp(prefix=f"zipcache_bench_{kv_dtype}_", suffix=".log")[1])
            env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
            env["HF_HUB_OFFLINE"] = "1"
            self.cmd = [sys.executable, "-m", "zipcache_vllm.launcher", "serve", model_dir, "--enforce-eager",
                        "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", str(w.max_model_len),
                        "--kv-cache-dtype", kv_dtype, "--kv-cache-memory-bytes", str(w.kv_bytes),
                        *(["--max-num-seqs", str(w.max_num_seqs)] if w.max_num_seqs is not None else []),
                        "--max-num-batched-tokens", str(w.chunk),
                        "--no-enable-prefix-caching", "--served-model-name", "model",
                        "--disable-uvicorn-access-log"]
            self._log = open(self.log_path, "w")
            self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
            self.url = f"http://127.0.0.1:{self.port}"
            self._model_name = "model"

    return ByteBudgetServer()


# --------------------------------------------------------------------------- load
def metric(text: str, name: str) -> float:
    """Sum of a Prometheus metric's samples (all label sets) in ``/metrics`` text."""
    pat = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", re.M)
    return sum(float(v) for v in pat.findall(text))


def percentiles(xs: list[float], ps=(50, 90, 99)) -> dict:
    if not xs:
        return {f"p{p}": None for p in ps}
    s = sorted(xs)
    return {f"p{p}": s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))] for p in ps}


@dataclass
class Result:
    kv_cache_dtype: str
    kv_tokens: int | None = None
    completed: int = 0
    failed: int = 0
    seconds: float = 0.0
    req_per_s: float = 0.0
    out_tok_per_s: float = 0.0
    ttft_s: dict = field(default_factory=dict)
    itl_s: dict = field(default_factory=dict)
    preemptions: float = 0.0
    mean_running: float = 0.0
    mean_waiting: float = 0.0
    unsupported: str | None = None
    ceiling: bool = False  # the `auto` run whose cache holds the whole load
    kv_bytes: int = 0  # the run's --kv-cache-memory-bytes


async def _one(session, url: str, prompt: list[int], w: Workload, out: list) -> None:
    body = {"model": "model", "prompt": prompt, "max_tokens": w.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    stamps = []
    async with session.post(f"{url}/v1/completions", json=body) as r:
        if r.status != 200:
            out.append({"ok": False, "error": f"HTTP {r.status}: {(await r.text())[:200]}"})
            return
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    out.append({"ok": bool(stamps), "ttft": stamps[0] - t0 if stamps else None,
                "itl": [b - a for a, b in zip(stamps, stamps[1:])], "chunks": len(stamps)})


async def _drive(url: str, prompts: list[list[int]], w: Workload, progress: bool) -> dict:
    """Send ``prompts`` as ``vllm bench serve`` does: at ``w.request_rate`` (Poisson; None: all at
    once), at most ``w.clients`` in flight."""
    import asyncio
    import random

    import aiohttp
    from tqdm.auto import tqdm

    results: list = []
    samples: list = []
    arrivals = random.Random(w.seed)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=1800)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def metrics_text() -> str:
            async with session.get(f"{url}/metrics") as r:
                return await r.text()

        before = metric(await metrics_text(), "vllm:num_preemptions_total")
        bar = tqdm(total=len(prompts), desc="requests", leave=False, disable=not progress)

        in_flight = asyncio.Semaphore(w.clients)

        async def request(p):
            async with in_flight:
                await _one(session, url, p, w, results)
            bar.update(1)

        async def send_all():
            tasks = []
            for i, p in enumerate(prompts):
                if i and w.request_rate is not None:
                    await asyncio.sleep(arrivals.expovariate(w.request_rate))
                tasks.append(asyncio.create_task(request(p)))
            await asyncio.gather(*tasks)

        async def sampler():
            while True:
                t = await metrics_text()
                samples.append((metric(t, "vllm:num_requests_running"), metric(t, "vllm:num_requests_waiting")))
                await asyncio.sleep(0.5)

        t0 = time.perf_counter()
        samp = asyncio.create_task(sampler())
        await send_all()
        seconds = time.perf_counter() - t0
        samp.cancel()
        await asyncio.gather(samp, return_exceptions=True)
        bar.close()
        after = metric(await metrics_text(), "vllm:num_preemptions_total")
    return {"results": results, "seconds": seconds, "preemptions": after - before, "samples": samples}


def prompts_for(model_dir: str, w: Workload) -> list[list[int]]:
    """``w.requests`` disjoint prose windows of ``w.prompt_len`` tokens (wrapping if the text runs out)."""
    from transformers import AutoTokenizer

    from ..eval.corpus import english_text

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(english_text(), add_special_tokens=False)["input_ids"]
    n = len(ids) // w.prompt_len
    return [ids[(i % n) * w.prompt_len:(i % n + 1) * w.prompt_len] for i in range(w.requests)]


def bench_one(model_dir: str, name: str, w: Workload, prompts: list[list[int]], progress: bool,
              ceiling: bool = False) -> Result:
    """One server for ``name`` under the load, with ``w.kv_bytes`` of cache; ``ceiling``: the
    row is the ceiling run (``run`` gives it the ceiling budget)."""
    import asyncio

    server = start_server(model_dir, name, w)
    try:
        try:
            server.wait_ready()
        except RuntimeError:
            log = server.log()  # the whole log: the exception keeps only its tail
            refused = REFUSAL.search(log) or CAPACITY_REFUSAL.search(log)
            if refused:
                return Result(name, unsupported=refused.group(1), kv_bytes=w.kv_bytes)
            raise
        d = asyncio.run(_drive(server.url, prompts, w, progress))
        res = Result(name, kv_tokens=server.kv_tokens(), ceiling=ceiling, kv_bytes=w.kv_bytes)
    finally:
        server.stop()
        server.log_path.unlink(missing_ok=True)
    ok = [r for r in d["results"] if r["ok"]]
    res.completed, res.failed, res.seconds = len(ok), len(d["results"]) - len(ok), d["seconds"]
    res.req_per_s = len(ok) / d["seconds"]
    res.out_tok_per_s = len(ok) * w.output_len / d["seconds"]
    res.ttft_s = percentiles([r["ttft"] for r in ok])
    res.itl_s = percentiles([x for r in ok for x in r["itl"]])
    res.preemptions = d["preemptions"]
    if d["samples"]:
        res.mean_running = sum(s[0] for s in d["samples"]) / len(d["samples"])
        res.mean_waiting = sum(s[1] for s in d["samples"]) / len(d["samples"])
    return res


def run(model_dir: str, w: Workload, names: list[str], progress: bool = True) -> dict:
    """One server per dtype (then the ``auto`` ceiling run), or with ``w.sweep_bytes`` one per
    (budget, dtype), budgets ascending, every dtype at one budget before the next."""
    from dataclasses import replace

    from tqdm.auto import tqdm

    if BASELINE in names:
        names = [BASELINE] + [n for n in names if n != BASELINE]
    prompts = prompts_for(model_dir, w)
    if w.sweep_bytes:
        runs = [(name, replace(w, kv_bytes=b), False) for b in w.sweep_bytes for name in names]
    else:
        runs = [(name, w, False) for name in names]
        if w.ceiling_bytes:
            runs.append((BASELINE, replace(w, kv_bytes=w.ceiling_bytes), True))
    rows = []
    bar = tqdm(runs, desc="servers", disable=not progress)
    for name, wl, ceiling in bar:
        bar.set_postfix_str(f"{name} at {wl.kv_bytes / 2**20:.0f} MiB" + (" (ceiling)" if ceiling else ""))
        rows.append(asdict(bench_one(model_dir, name, wl, prompts, progress, ceiling=ceiling)))
    return {"workload": asdict(w), "rows": rows}


def row_label(r: dict, w: dict) -> str:
    """The table's name of a row: the dtype, or the ceiling run's budget."""
    if r.get("ceiling"):
        return f"{r['kv_cache_dtype']}, {w['ceiling_bytes'] / 2**20:.0f} MiB (ceiling)"
    return r["kv_cache_dtype"]


def _fmt(x, spec=".2f") -> str:
    return "" if x is None else format(x, spec)


def _baseline(rows: list[dict], kv_bytes: int, name: str = BASELINE) -> dict | None:
    """The memory-limited run of ``name`` at budget ``kv_bytes`` (not the ceiling run)."""
    return next((r for r in rows if r["kv_cache_dtype"] == name and not r["unsupported"]
                 and not r.get("ceiling") and r.get("kv_bytes", kv_bytes) == kv_bytes), None)


def markdown(res: dict, command: str, machine: str) -> str:
    w = res["workload"]
    sweep = bool(w.get("sweep_bytes"))
    seqs = (f"`--max-num-seqs {w['max_num_seqs']}`" if w["max_num_seqs"] is not None
            else "no `--max-num-seqs` (each server's default)")
    budget = ("`--kv-cache-memory-bytes` of each row" if sweep else
              f"`--kv-cache-memory-bytes {w['kv_bytes']}` ({w['kv_bytes'] / 2**20:.0f} MiB)")
    lines = [f"Command: `{command}`", "", f"Machine: {machine}", "",
             f"Load: `--num-prompts {w['requests']}` streaming requests (aiohttp, `/v1/completions`), at most "
             f"`--max-concurrency {w['clients']}` in flight, "
             + (f"`--request-rate {w['request_rate']:g}` (Poisson, `--seed {w.get('seed', 0)}`)"
                if w.get("request_rate") else "sent at once (`--request-rate inf`)")
             + f", prompts of `--input-len {w['prompt_len']}` prose tokens, `--output-len {w['output_len']}` greedy "
             f"tokens each (`ignore_eos`). Every server: {budget}, {seqs}, "
             f"`--max-num-batched-tokens {w['chunk']}`, `--max-model-len {w['max_model_len']}`, "
             "`--enforce-eager`, `--no-enable-prefix-caching`.", "",
             "| --kv-cache-dtype | " + ("KV MiB | " if sweep else "") + "KV tokens | req/s | vs auto | output tok/s "
             "| TTFT p50 / p90 / p99 (s) | ITL p50 / p90 / p99 (ms) | preemptions | mean running / waiting |",
             "| --- | " + ("---: | " if sweep else "") + "---: | ---: | ---: | ---: | --- | --- | ---: | --- |"]
    mib = lambda r: f"{r.get('kv_bytes', w['kv_bytes']) / 2**20:.0f} | " if sweep else ""  # noqa: E731
    for r in res["rows"]:
        if r["unsupported"]:
            lines.append(f"| {r['kv_cache_dtype']} | {mib(r)}refused at startup: {r['unsupported']} | | | | | | | |")
            continue
        base = _baseline(res["rows"], r.get("kv_bytes", w["kv_bytes"]))
        ratio = f"{r['req_per_s'] / base['req_per_s']:.2f}x" if base else ""
        t, i = r["ttft_s"], r["itl_s"]
        lines.append(
            f"| {row_label(r, w)} | {mib(r)}{r['kv_tokens']:,} | {r['req_per_s']:.3f} | {ratio} | "
            f"{r['out_tok_per_s']:.1f} | {_fmt(t['p50'])} / {_fmt(t['p90'])} / {_fmt(t['p99'])} | "
            f"{_fmt(i['p50'] and i['p50'] * 1e3, '.0f')} / {_fmt(i['p90'] and i['p90'] * 1e3, '.0f')} / "
            f"{_fmt(i['p99'] and i['p99'] * 1e3, '.0f')} | {r['preemptions']:.0f} | "
            f"{r['mean_running']:.1f} / {r['mean_waiting']:.1f} |")
    if sweep:
        lines += ["", *sweep_table(res)]
    if any(r.get("ceiling") for r in res["rows"]):
        lines += ["", f"The ceiling row is `{BASELINE}` with a cache that holds the whole load "
                  f"(`--kv-cache-memory-bytes {w['ceiling_bytes']}`): the same server when KV memory is not "
                  "the limit. A compressed cache runs more requests at once than the limited `auto`, but "
                  "each step then costs the compute of the larger batch; it can pass the ceiling only by "
                  "as much as its attention is faster than bf16 attention."]
    return "\n".join(lines) + "\n"


def sweep_table(res: dict) -> list[str]:
    """The budget sweep at a glance: per budget, each dtype's req/s (with its ratio to ``auto``
    and ``fp8`` at the same budget) and p90 TTFT."""
    rows = [r for r in res["rows"] if not r.get("ceiling")]
    names = list(dict.fromkeys(r["kv_cache_dtype"] for r in rows))
    out = ["Budget sweep: requests/s (vs `auto`, vs `fp8` at the same budget) and TTFT p90 (s).", "",
           "| KV MiB | " + " | ".join(f"`{n}`" for n in names) + " |",
           "| ---: | " + " | ".join("---" for _ in names) + " |"]
    for b in res["workload"]["sweep_bytes"]:
        auto, fp8 = _baseline(rows, b), _baseline(rows, b, "fp8")
        cells = []
        for n in names:
            r = next((x for x in rows if x["kv_cache_dtype"] == n and x.get("kv_bytes") == b), None)
            if r is None or r["unsupported"]:
                cells.append("refused" if r is not None else "")
                continue
            vs = [f"{r['req_per_s'] / ref['req_per_s']:.2f}x {label}" for label, ref in (("auto", auto), ("fp8", fp8))
                  if ref is not None and ref is not r]
            cells.append(f"{r['req_per_s']:.3f}" + (f" ({', '.join(vs)})" if vs else "")
                         + f" · {_fmt(r['ttft_s']['p90'])}")
        out.append(f"| {b / 2**20:.0f} | " + " | ".join(cells) + " |")
    return out


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if not r["unsupported"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if res["workload"].get("sweep_bytes"):  # one line per dtype against the budget
        budgets = [b / 2**20 for b in res["workload"]["sweep_bytes"]]
        for i, n in enumerate(dict.fromkeys(r["kv_cache_dtype"] for r in rows)):  # auto first: C0
            pts = sorted((r["kv_bytes"] / 2**20, r["req_per_s"], r["ttft_s"]["p90"])
                         for r in rows if r["kv_cache_dtype"] == n)
            style = dict(marker="o", color=f"C{i}", label=n)
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], **style)
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], **style)
        for ax, label in zip(axes, ("requests / s", "TTFT p90 (s)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
            ax.set_xlabel("--kv-cache-memory-bytes (MiB)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
    else:
        names = [BASELINE + " (ceiling)" if r.get("ceiling") else r["kv_cache_dtype"].replace("zipcache_", "zc_")
                 for r in rows]
        colors = ["C7" if r.get("ceiling") else "C0" if r["kv_cache_dtype"] == BASELINE else "C3" for r in rows]
        axes[0].bar(names, [r["req_per_s"] for r in rows], color=colors)
        axes[0].set_ylabel("requests / s")
        axes[1].bar(names, [r["ttft_s"]["p50"] for r in rows], color="C2")
        axes[1].set_ylabel("TTFT p50 (s)")
        for ax in axes:
            ax.tick_params(axis="x", rotation=45, labelsize=8)
            ax.grid(axis="y", alpha=0.3)
    fig.suptitle("vllm serve under KV-memory pressure (SmolLM2-135M, 2-core CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
