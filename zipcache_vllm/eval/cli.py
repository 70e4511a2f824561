"""``zipcache-vllm eval``: quality of every preset against the bf16 cache."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace

QUICK = {"seq_len": 512, "prefill_len": 256, "windows": 1}
FULL = {"seq_len": 1024, "prefill_len": 512, "windows": 4}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="measure KV-cache quality (KL, top-1, perplexity) of every preset vs bf16",
        description="Offline mode (--offline) runs the embedded model in HF transformers with the "
        "reference policies applied block by block, exactly as the paged engine stores them.")
    p.add_argument("--offline", action="store_true", help="HF transformers reference harness (no vLLM)")
    p.add_argument("--engine-fidelity", action="store_true",
                   help="engine vs offline reference logprobs, and greedy agreement of auto/fp8/zipcache "
                   "(starts vLLM once per dtype)")
    p.add_argument("--layer-errors", action="store_true",
                   help="per-layer attention-output error of a compressed prompt: kivi3 vs the preset's mix")
    p.add_argument("--engine", action="store_true",
                   help="through vLLM, one engine start per KV dtype (auto, fp8, every preset): capacity, "
                   "teacher-forced KL / top-1 / perplexity vs auto, greedy agreement, an exact copy task")
    p.add_argument("--kv-cache-dtype", default=None, help="engine mode: comma-separated --kv-cache-dtype values "
                   "(default: auto, fp8 and every preset)")
    p.add_argument("--plot", default=None, help="engine mode: write the quality-vs-bytes PNG here")
    p.add_argument("--work-dir", default=None, help="engine mode: keep each engine run's output here and "
                   "reuse it when the same command runs again (split a long run; default: a temp folder)")
    p.add_argument("--num-prompts", type=int, default=20, help="engine fidelity: number of prompts (default 20)")
    p.add_argument("--max-tokens", type=int, default=64, help="engine fidelity: greedy tokens per prompt")
    p.add_argument("--quick", action="store_true", help=f"small run for CI: {QUICK}")
    p.add_argument("--presets", default=None,
                   help="comma-separated preset names, or ablation labels in offline mode "
                   "(abl:values=rotated, ...; default: the standard table)")
    p.add_argument("--no-ablations", action="store_true", help="skip the design ablation rows")
    p.add_argument("--seq-len", type=int, default=None, help=f"tokens per window (default {FULL['seq_len']})")
    p.add_argument("--prefill-len", type=int, default=None,
                   help=f"prompt tokens per window, a multiple of the block size (default {FULL['prefill_len']})")
    p.add_argument("--windows", type=int, default=None, help=f"text windows (default {FULL['windows']})")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, dest="chunk",
                   help="engine mode: vLLM's prefill chunk (default 256, whole blocks; a length that "
                   "is not a multiple of the block size leaves each chunk's tail staged for the next)")
    p.add_argument("--model", default=None, help="HF model folder or a bundled model: smollm2 (the default), gemma3-270m (prepared on first use)")
    p.add_argument("--markdown", default=None, help="write the table, command and machine to this file")
    p.add_argument("--json", default=None, help="write the rows as JSON to this file")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    if args.engine:
        return _run_engine(args)
    if args.engine_fidelity:
        return _run_fidelity(args)
    if args.layer_errors:
        return _run_layer_errors(args)
    if not args.offline:
        print("error: choose a mode: `zipcache-vllm eval --offline` (reference harness) or "
              "`zipcache-vllm eval --engine-fidelity` (through vLLM) or `--layer-errors` or `--engine`", file=sys.stderr)
        return 2
    import torch

    from ..config import PresetError
    from . import offline

    if args.threads:
        torch.set_num_threads(args.threads)
    base = QUICK if args.quick else FULL
    seq_len = args.seq_len or base["seq_len"]
    prefill_len = args.prefill_len if args.prefill_len is not None else base["prefill_len"]
    windows = args.windows or base["windows"]
    if not 0 <= prefill_len < seq_len:
        print(f"error: --prefill-len must be in [0, --seq-len={seq_len}), got {prefill_len}", file=sys.stderr)
        return 2
    try:
        if args.presets:
            variants = offline.named_variants(args.presets.split(","))
        else:
            variants = offline.standard_variants()
        if not args.no_ablations and not args.presets:
            variants += offline.ablation_variants()
    except PresetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model_dir = _model_dir(args)
    model, tok = offline.load_model(model_dir)
    rows = offline.evaluate(model, tok, variants, seq_len, prefill_len, windows)
    table = offline.markdown_table(rows)
    print(table)
    command = "zipcache-vllm " + " ".join(sys.argv[1:])
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"Command: `{command}`\n\n")
            f.write(f"Machine: {offline.machine_line()}\n\n")
            f.write(f"Model: `{model_dir}`; {windows} windows of {seq_len} tokens, prompt {prefill_len} tokens, "
                    f"metrics over the {seq_len - prefill_len - 1} positions after the prompt.\n\n")
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 0


def _run_fidelity(args) -> int:
    from . import fidelity, offline

    model_dir = _model_dir(args)
    prompt_len = args.seq_len or 600
    res = fidelity.run(model_dir, num_prompts=args.num_prompts, prompt_len=prompt_len, max_tokens=args.max_tokens)
    text = fidelity.markdown(res, "zipcache-vllm " + " ".join(sys.argv[1:]), offline.machine_line())
    emit(text, args.markdown, args.json, res)
    return 0


def _run_layer_errors(args) -> int:
    from . import layer_error, offline

    model_dir = _model_dir(args)
    model, tok = offline.load_model(model_dir)
    rows = layer_error.layer_errors(model, tok, args.seq_len or 512, args.prefill_len or 256)
    text = layer_error.markdown(rows, "zipcache-vllm " + " ".join(sys.argv[1:]))
    emit(text, args.markdown)
    return 0


def _run_engine(args) -> int:
    from . import engine_eval
    from .offline import machine_line

    settings = engine_eval.QUICK if args.quick else engine_eval.FULL
    if args.prefill_len is not None:
        print(f"error: --prefill-len is for --offline; the engine eval scores every position after "
              f"its first {settings.chunk}-token prefill chunk", file=sys.stderr)
        return 2
    if args.windows or args.seq_len:
        score_len = args.seq_len or settings.score_len
        settings = replace(settings, score_windows=args.windows or settings.score_windows,
                           score_len=score_len,
                           max_model_len=max(settings.max_model_len, score_len + 1))  # + its 1 token
    if args.chunk is not None:
        if args.chunk < 16:
            print(f"error: --max-num-batched-tokens must be >= 16, got {args.chunk}", file=sys.stderr)
            return 2
        settings = replace(settings, chunk=args.chunk)
    names = args.kv_cache_dtype.split(",") if args.kv_cache_dtype else None
    known = engine_eval.known_dtypes()
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        print(f"error: unknown --kv-cache-dtype {', '.join(unknown)}; choose from "
              f"{', '.join(known)}", file=sys.stderr)
        return 2
    res = engine_eval.evaluate(_model_dir(args), settings, names, work_dir=args.work_dir)
    text = engine_eval.markdown(res, "zipcache-vllm " + " ".join(sys.argv[1:]), machine_line())
    emit(text, args.markdown, args.json, res)
    if args.plot:
        engine_eval.plot(res, args.plot)
    return 0


def emit(text: str, markdown: str | None, json_path: str | None = None, data=None) -> None:
    """Print a report, and write it to ``markdown`` and ``data`` to ``json_path`` when given."""
    print(text)
    if markdown:
        with open(markdown, "w") as f:
            f.write(text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(data, f, indent=1)


def _model_dir(args) -> str:
    """``--model``: an HF folder or a bundled model's name (``smollm2``, ``gemma3-270m``:
    prepared on first use, as ``zipcache-vllm model prepare``); default the embedded model."""
    import os

    from ..model.prepare import MODELS, prepare_default_model, prepare_model

    if args.model and args.model in MODELS and not os.path.exists(args.model):
        return str(prepare_model(args.model))
    if args.model:
        return args.model
    return str(prepare_default_model())
