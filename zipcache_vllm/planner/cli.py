"""``zipcache-vllm layout`` (bytes of a page, part by part) and ``zipcache-vllm plan``
(what fits where, per KV dtype; ``--emit DIR`` writes deployment manifests)."""
from __future__ import annotations

import shlex
import sys

DEFAULT_EMIT_NODES = 2


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("layout", help="bytes per token of every preset, part by part (from the layout)")
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--num-kv-heads", type=int, default=3, help="KV heads per page (per tensor-parallel rank)")
    p.add_argument("--presets", default=None, help="comma-separated preset names (default: all quantizing)")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    p.set_defaults(func=_run)
    _add_plan_parser(subparsers)


def _add_plan_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="KV capacity per --kv-cache-dtype on given hardware; --emit writes deploy manifests",
        description="Exact KV capacity as vLLM computes it (bytes per token from the layout, blocks, "
        "tokens, concurrency) for each candidate --kv-cache-dtype. On GPUs the KV budget subtracts "
        "ESTIMATED weights/activations/overhead from gpu_memory_utilization x memory.")
    p.add_argument("--model", required=True, help="HF model folder, config.json, or a bundled name "
                   "(configs/models/: llama3_8b, llama3_1_8b)")
    p.add_argument("--hardware", required=True, help="GPU or CPU name from configs/hardware/catalog.yaml")
    p.add_argument("--max-model-len", type=int, required=True)
    p.add_argument("--tensor-parallel-size", "--tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "--pp", type=int, default=1)
    p.add_argument("--context-len", type=int, default=None, help="tokens per request (default: max-model-len)")
    p.add_argument("--concurrency", type=int, default=None, help="target concurrent requests")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: --concurrency")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-space-gib", type=int, default=None, help="CPU: VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--kv-cache-dtypes", default=None,
                   help="comma-separated candidates, or 'all' (auto, fp8 and every zipcache dtype); "
                   "default: auto,fp8,zipcache,zipcache_hc,zipcache_kivi2")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="GPU activation estimate (8192)")
    p.add_argument("--weights-gib", type=float, default=None, help="GPU: weights per GPU (else estimated)")
    p.add_argument("--runtime-overhead-gib", type=float, default=None, help="GPU: overhead estimate (1.5)")
    p.add_argument("--json", default=None, help="write the plan as JSON here")
    p.add_argument("--markdown", default=None, help="write the table here")
    p.add_argument("--plot", default=None, help="write a PNG plot here")
    e = p.add_argument_group("deployment (--emit)")
    e.add_argument("--emit", default=None, metavar="DIR", help="write k8s (single GPU, tensor parallel, "
                   "multi-node Ray) and docker compose manifests sized by the plan")
    e.add_argument("--gpus-per-node", type=int, default=None, help="default: --tensor-parallel-size")
    e.add_argument("--nodes", type=int, default=None, help=f"multi-node manifest (default {DEFAULT_EMIT_NODES})")
    e.add_argument("--deploy-kv-cache-dtype", default="zipcache")
    e.add_argument("--model-ref", default=None, help="what `vllm serve` gets in the manifests (HF id or path)")
    e.add_argument("--served-model-name", default=None)
    e.add_argument("--image", default="zipcache-vllm:0.1.0")
    e.add_argument("--name", default="zipcache-vllm")
    p.set_defaults(func=_run_plan)


def _run(args) -> int:
    from ..config import PresetError
    from .layout_table import layout_rows, markdown

    try:
        rows = layout_rows(args.head_size, args.num_kv_heads, args.presets.split(",") if args.presets else None)
    except (PresetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = markdown(rows, args.head_size, args.num_kv_heads)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"Command: `zipcache-vllm {' '.join(sys.argv[1:])}`\n\n{text}\n")
    return 0


_PLAN_FLAGS = ("model", "hardware", "max_model_len", "tensor_parallel_size", "pipeline_parallel_size",
               "context_len", "concurrency", "max_num_seqs", "gpu_memory_utilization", "kv_cache_space_gib",
               "kv_cache_dtypes", "max_num_batched_tokens", "weights_gib", "runtime_overhead_gib",
               "gpus_per_node", "nodes", "deploy_kv_cache_dtype", "model_ref", "served_model_name",
               "image", "name")


_EMIT_FLAGS = ("gpus_per_node", "nodes", "deploy_kv_cache_dtype", "model_ref", "served_model_name", "image",
               "name")


def canonical_command(args) -> str:
    """The plan command with every given option, in a fixed order (written into outputs)."""
    parts = ["zipcache-vllm", "plan"]
    for key in _PLAN_FLAGS:
        value = getattr(args, key, None)
        if value is not None and (args.emit or key not in _EMIT_FLAGS):
            parts += ["--" + key.replace("_", "-"), str(value)]
    if args.emit:
        parts += ["--emit", "DIR"]
    return shlex.join(parts)


def _dtypes(text: str | None) -> list[str] | None:
    if text is None:
        return None
    if text == "all":
        from ..vllm_plugin.dtypes import cache_dtypes
        return ["auto", "fp8", *sorted(cache_dtypes())]
    return [d.strip() for d in text.split(",") if d.strip()]


def build_request(args, **override):
    from .plan import PlanRequest

    fields = {
        "model": args.model, "hardware": args.hardware, "max_model_len": args.max_model_len,
        "tensor_parallel_size": args.tensor_parallel_size, "pipeline_parallel_size": args.pipeline_parallel_size,
        "context_len": args.context_len, "concurrency": args.concurrency, "max_num_seqs": args.max_num_seqs,
        "gpu_memory_utilization": args.gpu_memory_utilization, "kv_cache_space_gib": args.kv_cache_space_gib,
        "kv_cache_dtypes": _dtypes(args.kv_cache_dtypes), "max_num_batched_tokens": args.max_num_batched_tokens,
        "weights_gib": args.weights_gib, "runtime_overhead_gib": args.runtime_overhead_gib, **override,
    }
    return PlanRequest(**{k: v for k, v in fields.items() if v is not None})


def _run_plan(args) -> int:
    from pydantic import ValidationError

    from .deploy import DeployOptions, emit
    from .model_spec import ModelSpecError
    from .plan import make_plan
    from .report import markdown, plot, to_json

    try:
        plan = make_plan(build_request(args))
        plans = None
        if args.emit:
            if plan.device != "gpu":
                raise ValueError("--emit writes GPU manifests: pick a GPU --hardware")
            if args.deploy_kv_cache_dtype not in plan.request.kv_cache_dtypes:
                raise ValueError(f"--deploy-kv-cache-dtype {args.deploy_kv_cache_dtype} is not among the "
                                 f"candidates {plan.request.kv_cache_dtypes}")
            per_node = args.gpus_per_node or args.tensor_parallel_size
            nodes = args.nodes or max(DEFAULT_EMIT_NODES, args.pipeline_parallel_size)
            plans = {"single_gpu": make_plan(build_request(args, tensor_parallel_size=1, pipeline_parallel_size=1)),
                     "tensor_parallel": make_plan(build_request(args, tensor_parallel_size=per_node,
                                                                pipeline_parallel_size=1)),
                     "multi_node": make_plan(build_request(args, tensor_parallel_size=per_node,
                                                           pipeline_parallel_size=nodes))}
    except (ValidationError, ModelSpecError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = markdown(plan)
    print(text)
    command = canonical_command(args)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"Command: `{command}`\n\n{text}\n")
    if args.json:
        with open(args.json, "w") as f:
            f.write(to_json(plan))
    if args.plot:
        plot(plan, args.plot)
    if plans:
        from pathlib import Path

        opts = DeployOptions(model_ref=args.model_ref or plan.model["name"], kv_cache_dtype=args.deploy_kv_cache_dtype,
                             name=args.name, image=args.image, served_model_name=args.served_model_name)
        written = emit(plans, opts, args.emit, command)
        out = Path(args.emit)
        (out / "plan.md").write_text(f"# Plans behind these manifests\n\nCommand: `{command}`\n\n" + "\n\n".join(
            f"## {key.replace('_', ' ')}\n\n{markdown(p)}" for key, p in plans.items()) + "\n")
        import json
        (out / "plan.json").write_text(json.dumps({k: json.loads(to_json(p)) for k, p in plans.items()},
                                                  indent=2, sort_keys=True) + "\n")
        for path in [*written, out / "plan.md", out / "plan.json"]:
            print(f"wrote {path}", file=sys.stderr)
    return 0
