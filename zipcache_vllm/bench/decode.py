"""Engine-level speed: decode and prefill tokens/s of each KV dtype through vLLM.

``zipcache-vllm bench decode`` runs :mod:`.decode_worker` in its own process: one real
engine per KV dtype (``auto``, ``fp8``, the zipcache presets asked for; same model, same
engine arguments), all started once and measured in turn, and prints ratios against
``auto`` measured in the same run. Decode is measured in rounds, every engine once per
round, seconds apart, so a slow spell of a shared machine falls on all dtypes of a
round; the table shows the ratio over all rounds and the range of the per-round ratios.

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
import sys
import tempfile
from pathlib import Path

from .. import engine_proc
from ..planner.units import format_bytes
from .step_profile import format_profiles

CONTEXTS = (1024, 4096, 8064)  # 8064 + 64 generated tokens fit SmolLM2's 8192 positions
BATCHES = (1, 8)
QUICK_CONTEXTS, QUICK_BATCHES = (512,), (1, 2)
RESULTS_BEGIN = "<!-- bench decode: begin (written by `zipcache-vllm bench decode --update-results`) -->"
RESULTS_END = "<!-- bench decode: end -->"


def run_worker(model_dir: str, dtypes, contexts, batches, decode_tokens: int, rounds: int,
               workdir: Path, kv_cache_memory_bytes: int, prefill_reps: int = 1, timeout: float = 4 * 3600,
               progress: bool = True, profile: bool = False) -> dict:
    """All engines in one worker process; its JSON (a result per dtype, a refusal kept). The
    engines get ``kv_cache_memory_bytes`` each (vLLM's ``--kv-cache-memory-bytes``); the worker
    runs without ``VLLM_CPU_KVCACHE_SPACE``, which vLLM would use instead."""
    from tqdm.auto import tqdm

    out = workdir / "decode.json"
    args = ["--model", model_dir, "--kv-cache-dtype", ",".join(dtypes), "--kv-cache-memory-bytes", str(kv_cache_memory_bytes),
           "--contexts", ",".join(map(str, contexts)),
           "--batches", ",".join(map(str, batches)), "--decode-tokens", str(decode_tokens),
           "--rounds", str(rounds), "--prefill-reps", str(prefill_reps),
           "--max-model-len", str(max(8192, max(contexts) + decode_tokens + 1)), "--out", str(out)]
    if profile:
        args += ["--profile-dir", str(workdir / "profile")]
    cells = len(contexts) * len(batches)
    with tqdm(total=cells, desc="cells (context, batch)", disable=not progress) as bar:
        def follow(text: str) -> None:
            done = text.count("\nCELL ")
            if done > bar.n:
                bar.update(done - bar.n)

        engine_proc.run_worker("zipcache_vllm.bench.decode_worker", args, workdir / "decode.log", "bench decode worker",
                   timeout, drop_env=("VLLM_CPU_KVCACHE_SPACE",), progress=follow)
    return json.loads(out.read_text())


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
    from ..dtypes import preset_for_dtype

    layout = BlockLayout.from_preset(preset_for_dtype(kv_dtype), head_size=D, num_kv_heads=H)
    B = layout.block_size
    return L * ((ctx // B) * layout.page_bytes + (ctx % B) * H * D * 2 * 2)


def run(model_dir: str, dtypes, contexts, batches, decode_tokens: int, kv_cache_memory_bytes: int,
        progress: bool = True, prefill_reps: int = 1, rounds: int = 6, profile: bool = False) -> dict:
    from .kernels import _cpu_name, copy_bandwidth

    facts = model_facts(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        part = run_worker(model_dir, dtypes, contexts, batches, decode_tokens, rounds, Path(tmp),
                          kv_cache_memory_bytes, prefill_reps=prefill_reps, progress=progress, profile=profile)
    engines = {d: part[d] for d in dtypes if d in part}
    info = {"cpu": _cpu_name(), "cpus": os.cpu_count(), "bandwidth_gb_s": copy_bandwidth(),
            "load": os.getloadavg()[0], "kv_cache_memory_bytes": kv_cache_memory_bytes,
            "decode_tokens": decode_tokens,
            "rounds": rounds, "prefill_reps": prefill_reps, "profiled": profile,
            "model": Path(model_dir).name, **facts}
    return {"info": info, "engines": engines}


def round_ratios(row: dict, base: dict) -> list[float]:
    """Per-round decode speed ratios of ``row`` against ``base`` (same cell, same rounds)."""
    return [(n / s) / (bn / bs) for (n, s), (bn, bs) in zip(row.get("rounds", ()), base.get("rounds", ()))]


def _row(res: dict, d: str, ctx: int, batch: int) -> dict | None:
    eng = res["engines"].get(d, {})
    for r in eng.get("rows", ()):
        if r["ctx"] == ctx and r["batch"] == batch:
            return r
    return None


def _ratio_cell(row: dict, base: dict) -> str:
    text = f"{row['decode_tok_s'] / base['decode_tok_s']:.2f}x"
    per_round = round_ratios(row, base)
    if len(per_round) > 1:
        text += f" ({min(per_round):.2f}-{max(per_round):.2f})"
    return text


def _md_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def format_table(res: dict) -> str:
    info, engines = res["info"], res["engines"]
    dtypes = list(engines)
    ran = [d for d in dtypes if "rows" in engines[d]]
    bw = info["bandwidth_gb_s"]
    budget = (f"--kv-cache-memory-bytes {format_bytes(info['kv_cache_memory_bytes'])}"
              if "kv_cache_memory_bytes" in info  # runs saved before that flag record the CPU variable
              else f"VLLM_CPU_KVCACHE_SPACE={info['kv_space_gib']} GiB")
    lines = [
        f"machine: {info['cpu']}, {info['cpus']} CPUs; copy bandwidth {bw:.1f} GB/s; load average at the "
        f"end {info['load']:.2f}; model {info['model']} ({info['layers']} layers, {info['kv_heads']} KV heads, "
        f"head {info['head_size']}, weights {info['weights_bytes'] / 1e6:.0f} MB); "
        f"{budget} for every engine; {info['decode_tokens']} decode tokens a request"
        + (f" and round, {info['rounds']} rounds" if info.get("rounds") else ""),
        "",
    ]
    for d in dtypes:
        if "unsupported" in engines[d]:
            lines.append(f"- `{d}`: not run: vLLM refused it on this machine: {engines[d]['unsupported']}")
    if len(ran) < len(dtypes):
        lines.append("")
    # ratio columns only when `auto` ran: it is the baseline
    compared = [d for d in ran if d != "auto"] if "auto" in ran else []
    rounds = info.get("rounds")
    lines += ["Decode (tokens/s over all requests; ratio > 1 = faster than `auto`"
              + (f"; over {rounds} rounds, in brackets the lowest and highest ratio of one round"
                 if rounds and rounds > 1 else "") + "):", "",
              _md_row(["ctx", "batch"] + [f"{d} tok/s" for d in ran] + [f"{d} / auto" for d in compared]
                      + [f"{d} MB/step, of floor" for d in ran]),
              "|" + "---:|" * (2 + 2 * len(ran) + len(compared))]
    cells = [(r["ctx"], r["batch"]) for r in engines[ran[0]]["rows"]] if ran else []
    for ctx, batch in cells:
        rows = {d: _row(res, d, ctx, batch) for d in ran}
        model = []
        for d in ran:
            nbytes = info["weights_bytes"] + batch * kv_bytes_per_request(d, ctx, info)
            step_s = batch / rows[d]["decode_tok_s"]
            model.append(f"{nbytes / 1e6:.0f}, {nbytes / (bw * 1e9) / step_s:.0%}")
        lines.append(_md_row([ctx, batch] + [f"{rows[d]['decode_tok_s']:.1f}" for d in ran]
                             + [_ratio_cell(rows[d], rows["auto"]) for d in compared] + model))
    reps = info.get("prefill_reps", 1)
    lines += ["", "Prefill (prompt tokens/s until every request has its first token"
              + (f"; batch 1: the median of {reps} prompts" if reps > 1 else "") + "):", "",
              _md_row(["ctx", "batch"] + [f"{d} tok/s" for d in ran] + [f"{d} / auto" for d in compared]),
              "|" + "---:|" * (2 + len(ran) + len(compared))]
    for ctx, batch in cells:
        rows = {d: _row(res, d, ctx, batch) for d in ran}
        lines.append(_md_row([ctx, batch] + [f"{rows[d]['prefill_tok_s']:.0f}" for d in ran]
                             + [f"{rows[d]['prefill_tok_s'] / rows['auto']['prefill_tok_s']:.2f}x"
                                for d in compared]))
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
         quick: bool, kv_cache_memory_bytes: int, json_out: str | None, update: str | None,
         render: str | None = None, prefill_reps: int = 3, rounds: int = 6, profile: bool = False) -> int:
    if render:  # a saved run (--json), shown again without running the engines
        res = json.loads(Path(render).read_text())
    else:
        from ..model.prepare import prepare_default_model

        model_dir = model_dir or str(prepare_default_model())
        parse = (lambda s: [int(x) for x in s.split(",")] if s else None)
        ctxs = parse(contexts) or list(QUICK_CONTEXTS if quick else CONTEXTS)
        bats = parse(batches) or list(QUICK_BATCHES if quick else BATCHES)
        if quick:
            decode_tokens, prefill_reps, rounds = min(decode_tokens, 8), 1, min(rounds, 2)
        if prefill_reps < 1 or rounds < 1 or decode_tokens < 1:
            raise ValueError("--prefill-reps, --rounds and --decode-tokens must be >= 1; got "
                             f"{prefill_reps}, {rounds}, {decode_tokens}")
        res = run(model_dir, [d.strip() for d in dtypes.split(",")], ctxs, bats, decode_tokens, kv_cache_memory_bytes,
                  prefill_reps=prefill_reps, rounds=rounds, profile=profile)
        res["info"]["command"] = "zipcache-vllm bench decode " + " ".join(sys.argv[3:])
    table = format_table(res)
    profiles = format_profiles(res["engines"])
    if profiles:
        table += ("\n\nWhere a decode step's time goes (vLLM's torch profiler in each engine, on "
                  "for one more round after the timed ones; it slows every op, so these are "
                  "shares of a step, and speeds to quote come from a run without --profile):\n\n"
                  + profiles)
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
