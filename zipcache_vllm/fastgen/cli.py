"""``zipcache-vllm fastgen``: paged FastGen measurements (docs/FASTGEN.md).

* ``layout``: page bytes of every paged FastGen preset (no model needed).
* ``profile-cost``: profiling time as a share of prefill time, per prompt length.
* ``engine-check``: one engine run per dtype: capacity from the engine's log vs the
  layout, engine logprobs vs the offline simulator, a greedy chat answer.
"""
from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("fastgen", help="paged FastGen: profiling cost, engine capacity and fidelity")
    p.add_argument("mode", choices=["layout", "profile-cost", "engine-check"])
    p.add_argument("--head-size", type=int, default=64, help="layout: head size")
    p.add_argument("--num-kv-heads", type=int, default=3, help="layout: KV heads")
    p.add_argument("--presets", default="zipcache_fastgen",
                   help="profile-cost: comma-separated paged FastGen presets")
    p.add_argument("--input-lens", default="512,1024,2048", help="profile-cost: comma-separated prompt lengths")
    p.add_argument("--repeats", type=int, default=3, help="profile-cost: timed repeats (median)")
    p.add_argument("--kv-cache-dtype", default="zipcache_fastgen_t95,zipcache_fastgen",
                   help="engine-check: comma-separated --kv-cache-dtype values")
    p.add_argument("--num-prompts", type=int, default=3, help="engine-check: text prompts (plus one chat prompt)")
    p.add_argument("--input-len", type=int, default=600, help="engine-check: tokens per text prompt")
    p.add_argument("--max-tokens", type=int, default=32, help="engine-check: greedy tokens per prompt")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2)")
    p.add_argument("--markdown", default=None, help="write the table, command and machine here")
    p.add_argument("--json", default=None, help="write the raw results as JSON here")
    p.set_defaults(func=_run)


def layout_table(head_size: int, num_kv_heads: int) -> str:
    """Markdown: bytes of every paged FastGen preset's page, and its growth over no eviction."""
    from ..config import list_presets, load_preset
    from ..layout import BlockLayout, FastGenLayout

    lines = ["| preset | --kv-cache-dtype | T | slots S / B | kept storage | page bytes | bytes/token/KV head | "
             "vs bf16 | page bytes without eviction | growth |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    from ..dtypes import dtype_for_preset

    for name in list_presets():
        preset = load_preset(name)
        if not preset.paged_fastgen:
            continue
        lay = FastGenLayout.from_preset(preset, head_size, num_kv_heads)
        k = lay.kept
        full = BlockLayout(lay.block_size, head_size, num_kv_heads, k.hi_bits, k.lo_bits,
                           int(round(k.n_hi * lay.block_size / lay.slots)))
        kind = f"{k.hi_bits}/{k.lo_bits}-bit, {k.n_hi} of {lay.slots} at {k.hi_bits}" if k.mixed else f"{k.hi_bits}-bit"
        lines.append(f"| {name} | {dtype_for_preset(name)} | {preset.fastgen.threshold} | {lay.slots} / "
                     f"{lay.block_size} | {kind} | {lay.page_bytes} | {lay.bytes_per_token_per_head:.2f} | "
                     f"{lay.compression_vs_bf16:.2f}x | {full.page_bytes} | {full.page_bytes / lay.page_bytes:.3f}x |")
    return "\n".join(lines) + "\n"


def _run(args) -> int:
    from ..eval.cli import emit

    if args.mode == "layout":
        text = f"Command: `zipcache-vllm {' '.join(sys.argv[1:])}`\n\n" + layout_table(args.head_size,
                                                                                     args.num_kv_heads)
        emit(text, args.markdown)
        return 0
    import torch

    from ..eval.offline import load_model, machine_line
    from ..model.prepare import prepare_default_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model or str(prepare_default_model())
    command = "zipcache-vllm " + " ".join(sys.argv[1:])
    if args.mode == "profile-cost":
        from . import profile_cost

        model, tok = load_model(model_dir)
        rows = [profile_cost.measure(model, tok, model_dir, name, int(n), args.repeats)
                for name in args.presets.split(",") for n in args.input_lens.split(",")]
        text = profile_cost.markdown(rows, command, machine_line())
    else:
        from . import engine_check

        rows = [engine_check.check(model_dir, d, args.num_prompts, args.input_len, args.max_tokens)
                for d in args.kv_cache_dtype.split(",")]
        text = engine_check.markdown(rows, command, machine_line())
    emit(text, args.markdown, args.json, rows)
    return 0
