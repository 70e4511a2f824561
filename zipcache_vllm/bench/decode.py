"""Engine-level speed: decode and prefill tokens/s of each KV dtype through vLLM.

``zipcache-vllm bench decode`` starts the real engine once per KV dtype (``auto``,
``fp8``, the zipcache presets asked for; same model, same engine arguments) and
context, runs :mod:`.decode_worker` in it, and prints ratios against ``auto`` measured
in the same run. The engines run context by context, every dtype in turn for each
context, so the dtypes of one table row are measured minutes apart, not a whole
dtype's run apart: on a shared machine whose speed drifts over tens of minutes, a slow
spell then falls on all of them.

Bytes model: a decode step reads the model weights once and every running
request's KV cache once per layer. Per request and layer, ``auto`` reads
``ctx * H * D * 2 * 2`` bytes (K and V, bf16), ``fp8`` half of it, a zipcache
preset ``(ctx // B) * page_bytes`` of packed pages plus its staged tokens in bf16.
"floor" is those bytes at the copy bandwidth measured in the same run (a large
tensor copy, read + write counted); "of floor" is floor / measured step time: how
close the whole step is to being purely memory bound.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

CONTEXTS = (1024, 4096, 8064)  # 8064 + 64 generated tokens fit SmolLM2's 8192 positions
BATCHES = (1, 8)
QUICK_CONTEXTS, QUICK_BATCHES = (512,), (1, 2)
RESULTS_BEGIN = "<!-- bench decode: begin (written by `zipcache-vllm bench decode --update-results`) -->"
RESULTS_END = "<!-- bench decode: end -->"


def run_worker(model_dir: str, kv_dtype: str, contexts, batches, decode_tokens: int, workdir: Path,
               kv_space_gib: str, timeout: float = 3600, prefill_reps: int = 1) -> dict:
    """One engine for ``kv_dtype`` in its own process; its JSON, or why vLLM refused it."""
    out = workdir / f"decode_{kv_dtype}.json"
    cmd = [sys.executable, "-m", "zipcache_vllm.bench.decode_worker", "--model", model_dir,
           "--kv-cache-dtype", kv_dtype, "--contexts", ",".join(map(str, contexts)),
           "--batches", ",".join(map(str, batches)), "--decode-tokens", str(decode_tokens),
           "--prefill-reps", str(prefill_reps),
           "--max-model-len", str(max(8192, max(contexts) + decode_tokens + 1)), "--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=kv_space_gib)
    log = workdir / f"decode_{kv_dtype}.log"
    for attempt in range(2):  # one retry: a worker start can fail on a machine short of memory
        # Output to a file, not a pipe: an engine process left behind would hold a pipe open.
        with open(log, "w") as f:
            proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        text = log.read_text(errors="replace")
        if proc.returncode == 0:
            return json.loads(out.read_text())
        refused = re.search(r"(FP8 KV cache on CPU requires[^'\n]*)", text)
        if refused:  # vLLM's own fp8 CPU path needs AVX-512 or AMX
            return {"kv_cache_dtype": kv_dtype, "unsupported": refused.group(1)}
        print(f"bench engine {kv_dtype} failed (attempt {attempt + 1}):\n{text[-2000:]}", file=sys.stderr)
    raise RuntimeError(f"bench engine {kv_dtype} failed twice; last log:\n{text[-4000:]}")


def model_facts(model_dir: str) -> dict:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    weights = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    return {"layers": cfg["num_hidden_layers"], "kv_heads": cfg.get("num_key_value_heads", heads),
            "head_size": cfg.get("head_dim") or cfg["hidden_size"] // heads, "weights_bytes": weights}


def kv_bytes_per_request(kv_dtype: str, ctx: int, facts: dict) -> int:
    """KV bytes one decode step reads for one request of ``ctx`` cached tokens (all layers)."""
    H, D, L = facts["kv_heads"], facts["head_size"], facts["layers"]
    if kv_dtype == "auto":
        return L * ctx * H * D * 2 * 2
    if kv_dtype == "fp8":
        return L * ctx * H * D * 2
    from ..layout import BlockLayout
    from ..vllm_plugin.dtypes import preset_for_dtype

    layout = BlockLayout.from_preset(preset_for_dtype(kv_dtype), head_size=D, num_kv_heads=H)
    B = layout.block_size
    return L * ((ctx // B) * layout.page_bytes + (ctx % B) * H * D * 2 * 2)


def run(model_dir: str, dtypes, contexts, batches, decode_tokens: int, kv_space_gib: str,
        progress: bool = True, prefill_reps: int = 1) -> dict:
    from tqdm.auto import tqdm

    from .kernels import _cpu_name, copy_bandwidth

    facts = model_facts(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(c, d) for c in contexts for d in dtypes]
        parts = [run_worker(model_dir, d, [c], batches, decode_tokens, Path(tmp), kv_space_gib,
                            prefill_reps=prefill_reps)
                 for c, d in tqdm(runs, desc="engines (context, dtype)", disable=not progress)]
    engines = merge_runs(dtypes, [d for _, d in runs], parts)
    info = {"cpu": _cpu_name(), "cpus": os.cpu_count(), "bandwidth_gb_s": copy_bandwidth(),
            "load": os.getloadavg()[0], "kv_space_gib": kv_space_gib, "decode_tokens": decode_tokens,
            "prefill_reps": prefill_reps,
            "model": Path(model_dir).name, **facts}
    return {"info": info, "engines": engines}


def merge_runs(dtypes, run_dtypes, parts) -> dict:
    """One result per dtype from its engine runs (one per context): rows in context order;
    a dtype vLLM refused keeps the refusal."""
    engines: dict = {}
    for d, part in zip(run_dtypes, parts):
        if "unsupported" in part:
            engines[d] = part
        elif "unsupported" not in engines.get(d, {}):
            merged = engines.setdefault(d, {**part, "rows": []})
            merged["rows"] = merged["rows"] + part["rows"]
    return {d: engines[d] for d in dtypes if d in engines}


def _row(res: dict, d: str, ctx: int, batch: int) -> dict | None:
    eng = res["engines"].get(d, {})
    for r in eng.get("rows", ()):
        if r["ctx"] == ctx and r["batch"] == batch:
            return r
    return None


def format_table(res: dict) -> str:
    info, engines = res["info"], res["engines"]
    dtypes = list(engines)
    ran = [d for d in dtypes if "rows" in engines[d]]
    bw = info["bandwidth_gb_s"]
    lines = [
        f"machine: {info['cpu']}, {info['cpus']} CPUs; copy bandwidth {bw:.1f} GB/s; load average at the "
        f"end {info['load']:.2f}; model {info['model']} ({info['layers']} layers, {info['kv_heads']} KV heads, "
        f"head {info['head_size']}, weights {info['weights_bytes'] / 1e6:.0f} MB); "
        f"VLLM_CPU_KVCACHE_SPACE={info['kv_space_gib']} GiB; {info['decode_tokens']} decode tokens a request",
        "",
    ]
    for d in dtypes:
        if "unsupported" in engines[d]:
            lines.append(f"- `{d}`: not run: vLLM refused it on this machine: {engines[d]['unsupported']}")
    if len(ran) < len(dtypes):
        lines.append("")
    head = "| ctx | batch | " + " | ".join(f"{d} tok/s" for d in ran) + " | " + " | ".join(
        f"{d} / auto" for d in ran if d != "auto") + " | " + " | ".join(
        f"{d} MB/step, of floor" for d in ran) + " |"
    lines += ["Decode (tokens/s over all requests; ratio > 1 = faster than `auto`):", "", head,
              "|" + "---:|" * (2 + len(ran) + (len(ran) - 1) + len(ran))]
    rows0 = engines[ran[0]]["rows"] if ran else []
    for r0 in rows0:
        ctx, batch = r0["ctx"], r0["batch"]
        rows = {d: _row(res, d, ctx, batch) for d in ran}
        speeds = [f"{rows[d]['decode_tok_s']:.1f}" for d in ran]
        ratios = [f"{rows[d]['decode_tok_s'] / rows['auto']['decode_tok_s']:.2f}x" for d in ran
                  if d != "auto" and "auto" in rows]
        model = []
        for d in ran:
            nbytes = info["weights_bytes"] + batch * kv_bytes_per_request(d, ctx, info)
            step_s = batch / rows[d]["decode_tok_s"]
            model.append(f"{nbytes / 1e6:.0f}, {nbytes / (bw * 1e9) / step_s:.0%}")
        lines.append(f"| {ctx} | {batch} | " + " | ".join(speeds) + " | " + " | ".join(ratios) + " | "
                     + " | ".join(model) + " |")
    reps = info.get("prefill_reps", 1)
    lines += ["", "Prefill (prompt tokens/s until every request has its first token"
              + (f"; batch 1: the median of {reps} prompts" if reps > 1 else "") + "):", "",
              "| ctx | batch | " + " | ".join(f"{d} tok/s" for d in ran) + " | "
              + " | ".join(f"{d} / auto" for d in ran if d != "auto") + " |",
              "|" + "---:|" * (2 + len(ran) + len(ran) - 1)]
    for r0 in rows0:
        ctx, batch = r0["ctx"], r0["batch"]
        rows = {d: _row(res, d, ctx, batch) for d in ran}
        lines.append(f"| {ctx} | {batch} | " + " | ".join(f"{rows[d]['prefill_tok_s']:.0f}" for d in ran)
                     + " | " + " | ".join(f"{rows[d]['prefill_tok_s'] / rows['auto']['prefill_tok_s']:.2f}x"
                                         for d in ran if d != "auto" and "auto" in rows) + " |")
    return "\n".join(lines)


def update_results(path: Path, command: str, table: str) -> None:
    """Replace the bench-decode section of ``path`` (docs/RESULTS.md), or append it."""
    text = path.read_text() if path.exists() else ""
    block = f"{RESULTS_BEGIN}\n\nCommand: `{command}`\n\n{table}\n\n{RESULTS_END}"
    if RESULTS_BEGIN in text and RESULTS_END in text:
        pre, rest = text.split(RESULTS_BEGIN, 1)
        post = rest.split(RESULTS_END, 1)[1]
        text = pre + block + post
    else:
        text = text.rstrip("\n") + "\n\n## Engine decode and prefill speed\n\n" + block + "\n"
    path.write_text(text)


def main(model_dir: str | None, dtypes: str, contexts: str | None, batches: str | None, decode_tokens: int,
         quick: bool, kv_space_gib: str, json_out: str | None, update: str | None,
         render: str | None = None, prefill_reps: int = 3) -> int:
    if render:  # a saved run (--json), shown again without running the engines
        res = json.loads(Path(render).read_text())
    else:
        from ..model.prepare import prepare_default_model

        model_dir = model_dir or str(prepare_default_model())
        parse = (lambda s: [int(x) for x in s.split(",")] if s else None)
        ctxs = parse(contexts) or list(QUICK_CONTEXTS if quick else CONTEXTS)
        bats = parse(batches) or list(QUICK_BATCHES if quick else BATCHES)
        if quick:
            decode_tokens, prefill_reps = min(decode_tokens, 8), 1
        if prefill_reps < 1:
            raise ValueError(f"--prefill-reps must be >= 1, got {prefill_reps}")
        res = run(model_dir, [d.strip() for d in dtypes.split(",")], ctxs, bats, decode_tokens, kv_space_gib,
                  prefill_reps=prefill_reps)
        res["info"]["command"] = "zipcache-vllm bench decode " + " ".join(sys.argv[3:])
    table = format_table(res)
    print()
    print(table)
    if json_out:
        Path(json_out).write_text(json.dumps(res, indent=1))
    if update:
        command = res["info"].get("command", "zipcache-vllm bench decode")
        if render:
            command += f"` (rendered from its saved results: `zipcache-vllm bench decode --render {render}"
        update_results(Path(update), command, table)
    return 0
