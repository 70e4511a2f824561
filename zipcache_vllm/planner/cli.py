"""``zipcache-vllm layout`` (bytes of a page, part by part) and ``zipcache-vllm plan``
(what fits where, per KV dtype; ``--emit DIR`` writes deployment manifests).

``plan`` takes vLLM's flag names where the meaning is vLLM's (``--max-model-len``,
``-tp/--tensor-parallel-size``, ``-pp/--pipeline-parallel-size``, ``--max-num-seqs``,
``--gpu-memory-utilization``, ``--kv-cache-memory-bytes`` with vLLM's size suffixes,
``--max-num-batched-tokens``, ``--kv-cache-dtype``: here a comma-separated list of
candidates), and its errors name flags, not fields.
"""
from __future__ import annotations

import shlex
import sys

from .units import human_readable_int

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
        "tokens, concurrency) for each candidate --kv-cache-dtype. On GPUs without "
        "--kv-cache-memory-bytes the KV budget subtracts ESTIMATED weights/activations/overhead from "
        "--gpu-memory-utilization x memory.")
    p.add_argument("--model", required=True, help="HF model folder, config.json, or a bundled architecture "
                   "(llama3_8b, llama3_1_8b): the numbers the plan uses (see --model-ref for --emit)")
    p.add_argument("--hardware", required=True, help="GPU or CPU name from the hardware catalog "
                   "(configs/hardware/catalog.yaml)")
    p.add_argument("--max-model-len", type=human_readable_int, required=True,
                   help="vLLM's --max-model-len (32768, or 32K / 32k as vLLM reads them)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--context-len", type=human_readable_int, default=None,
                   help="tokens per request to plan for (default: --max-model-len)")
    p.add_argument("--concurrency", type=int, default=None, help="target concurrent requests of --context-len")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="vLLM's --max-num-seqs (default: --concurrency; without either, the table shows what "
                   "vLLM does without the flag and --emit deploys the planned value)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="GPU: vLLM's (default 0.9)")
    p.add_argument("--kv-cache-memory-bytes", type=human_readable_int, default=None,
                   help="vLLM's KV budget per worker, exact (e.g. 40G, 512M: K M G T binary, k m g t decimal, "
                   "as vLLM reads them); on GPUs it replaces the estimate, on CPUs the catalog's default")
    p.add_argument("--kv-cache-dtype", default=None,
                   help="comma-separated candidates, or 'all' (auto, fp8 and every zipcache dtype); "
                   "default: auto,fp8,zipcache,zipcache_hc,zipcache_kivi2")
    p.add_argument("--max-num-batched-tokens", type=human_readable_int, default=None,
                   help="GPU activation estimate (8192)")
    p.add_argument("--weights-gib", type=float, default=None, help="GPU: weights per GPU (else estimated)")
    p.add_argument("--runtime-overhead-gib", type=float, default=None, help="GPU: overhead estimate (1.5)")
    p.add_argument("--json", default=None, help="write the plan as JSON here")
    p.add_argument("--markdown", default=None, help="write the table here")
    p.add_argument("--plot", default=None, help="write a PNG plot here")
    e = p.add_argument_group("deployment (--emit)")
    e.add_argument("--emit", default=None, metavar="DIR", help="write manifests sized by the plan: for a GPU "
                   "--hardware, k8s (single GPU, tensor parallel, multi-node Ray) and docker compose; for a CPU "
                   "--hardware, docker compose for one machine (docker-compose-cpu.yaml)")
    e.add_argument("--model-ref", default=None, help="required with --emit: what `vllm serve` loads in the "
                   "container (an HF id such as meta-llama/Llama-3.1-8B-Instruct, or a path it sees)")
    e.add_argument("--gpus-per-node", type=int, default=None, help="default: --tensor-parallel-size")
    e.add_argument("--nodes", type=int, default=None, help=f"multi-node manifest (default {DEFAULT_EMIT_NODES})")
    e.add_argument("--deploy-kv-cache-dtype", default="zipcache",
                   help="the --kv-cache-dtype the manifests serve (one of the candidates)")
    e.add_argument("--served-model-name", default=None)
    e.add_argument("--image", default=None, help="default: zipcache-vllm:0.1.0 (GPU, deploy/Dockerfile), "
                   "zipcache-vllm-cpu:0.1.0 (CPU, deploy/Dockerfile.cpu)")
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
    if not rows:
        from ..config import CONFIG_DIR

        print(f"error: no quantizing preset found in {CONFIG_DIR}: this installation is missing its presets",
              file=sys.stderr)
        return 2
    text = markdown(rows, args.head_size, args.num_kv_heads)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"Command: `zipcache-vllm {' '.join(sys.argv[1:])}`\n\n{text}\n")
    return 0


_PLAN_FLAGS = ("model", "hardware", "max_model_len", "tensor_parallel_size", "pipeline_parallel_size",
               "context_len", "concurrency", "max_num_seqs", "gpu_memory_utilization", "kv_cache_memory_bytes",
               "kv_cache_dtype", "max_num_batched_tokens", "weights_gib", "runtime_overhead_gib",
               "model_ref", "gpus_per_node", "nodes", "deploy_kv_cache_dtype", "served_model_name",
               "image", "name")


_EMIT_FLAGS = ("model_ref", "gpus_per_node", "nodes", "deploy_kv_cache_dtype", "served_model_name", "image",
               "name")
DEFAULT_IMAGES = {"gpu": "zipcache-vllm:0.1.0", "cpu": "zipcache-vllm-cpu:0.1.0"}


def canonical_command(args) -> str:
    """The plan command with every given option, in a fixed order (written into outputs)."""
    from .units import format_bytes

    parts = ["zipcache-vllm", "plan"]
    for key in _PLAN_FLAGS:
        value = getattr(args, key, None)
        if value is not None and (args.emit or key not in _EMIT_FLAGS):
            text = format_bytes(value) if key == "kv_cache_memory_bytes" else str(value)
            parts += ["--" + key.replace("_", "-"), text]
    if args.emit:
        parts += ["--emit", "DIR"]
    return shlex.join(parts)


def _dtypes(text: str | None) -> list[str] | None:
    if text is None:
        return None
    if text == "all":
        from ..dtypes import cache_dtypes
        return ["auto", "fp8", *sorted(cache_dtypes())]
    return [d.strip() for d in text.split(",") if d.strip()]


def build_request(args, **override):
    from .plan import PlanRequest

    fields = {
        "model": args.model, "hardware": args.hardware, "max_model_len": args.max_model_len,
        "tensor_parallel_size": args.tensor_parallel_size, "pipeline_parallel_size": args.pipeline_parallel_size,
        "context_len": args.context_len, "concurrency": args.concurrency, "max_num_seqs": args.max_num_seqs,
        "gpu_memory_utilization": args.gpu_memory_utilization, "kv_cache_memory_bytes": args.kv_cache_memory_bytes,
        "kv_cache_dtypes": _dtypes(args.kv_cache_dtype), "max_num_batched_tokens": args.max_num_batched_tokens,
        "weights_gib": args.weights_gib, "runtime_overhead_gib": args.runtime_overhead_gib, **override,
    }
    return PlanRequest(**{k: v for k, v in fields.items() if v is not None})


class UsageError(ValueError):
    """A flag combination ``plan`` refuses (the message names the flags)."""


def flag_message(exc: Exception) -> str:
    """An error of the planner as the CLI user should read it: flags, not field names, and no
    pydantic dump (one line per problem)."""
    import re

    from pydantic import ValidationError

    from .plan import PlanError, PlanRequest, flag

    names = sorted((f for f in PlanRequest.model_fields if "_" in f), key=len, reverse=True)
    fields = re.compile(r"(?<![\w-])(" + "|".join(names) + r")(?![\w-])")

    def flags_in(text: str) -> str:
        return fields.sub(lambda m: flag(m.group(1)), text)

    if isinstance(exc, ValidationError):
        lines = []
        for err in exc.errors():
            msg = flags_in(err["msg"].removeprefix("Value error, "))
            names = [flag(x) for x in err["loc"] if isinstance(x, str)]
            if msg.startswith("Input should"):
                msg = f"{msg[0].lower()}{msg[1:]} (got {err.get('input')!r})"
            lines.append(f"{', '.join(names)}: {msg}" if names else msg)
        return "\n".join(lines)
    if isinstance(exc, PlanError):
        return f"{flag(exc.field)}: {flags_in(str(exc).split(': ', 1)[1])}"
    return flags_in(str(exc))


def _check_model_ref(args) -> None:
    from .model_spec import bundled_models

    if not args.model_ref:
        raise UsageError("--emit needs --model-ref: what `vllm serve` loads in the container (an HF id such as "
                         "meta-llama/Llama-3.1-8B-Instruct, or a path the container sees); --model only gives "
                         "the planner the model's numbers")
    if args.model_ref in bundled_models():
        raise UsageError(f"--model-ref {args.model_ref} is the name of a bundled architecture config, not a model "
                         "vLLM can load: give an HF id or a path inside the container")


def emit_requests(args, plan) -> dict:
    """The plan request of each manifest ``--emit`` writes, with the planned ``--max-num-seqs``."""
    from .plan import planned_max_num_seqs

    _check_model_ref(args)
    dtype = args.deploy_kv_cache_dtype
    if dtype not in plan.request.kv_cache_dtypes:
        raise UsageError(f"--deploy-kv-cache-dtype {dtype} is not among the --kv-cache-dtype candidates "
                         f"{','.join(plan.request.kv_cache_dtypes)}")
    if not plan.row(dtype).starts:
        raise UsageError(f"vLLM would not start --kv-cache-dtype {dtype} with --max-model-len {args.max_model_len} "
                         f"on this plan ({'; '.join(plan.warnings) or 'one request does not fit the KV budget'})")
    if plan.device == "cpu":
        if args.pipeline_parallel_size > 1 or args.nodes or args.gpus_per_node:
            raise UsageError("--emit on a CPU --hardware writes one machine's docker compose file: "
                             "--pipeline-parallel-size, --nodes and --gpus-per-node do not apply")
        requests = {"cpu": build_request(args)}
    else:
        per_node = args.gpus_per_node or args.tensor_parallel_size
        nodes = args.nodes or max(DEFAULT_EMIT_NODES, args.pipeline_parallel_size)
        requests = {"single_gpu": build_request(args, tensor_parallel_size=1, pipeline_parallel_size=1),
                    "tensor_parallel": build_request(args, tensor_parallel_size=per_node, pipeline_parallel_size=1),
                    "multi_node": build_request(args, tensor_parallel_size=per_node, pipeline_parallel_size=nodes)}
    return {key: build_request(args, tensor_parallel_size=req.tensor_parallel_size,
                               pipeline_parallel_size=req.pipeline_parallel_size,
                               max_num_seqs=planned_max_num_seqs(req, dtype))
            for key, req in requests.items()}


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
            plans = {key: make_plan(req) for key, req in emit_requests(args, plan).items()}
    except (ValidationError, ModelSpecError, ValueError) as exc:
        print(f"error: {flag_message(exc)}", file=sys.stderr)
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
        import json
        from pathlib import Path

        opts = DeployOptions(model_ref=args.model_ref, kv_cache_dtype=args.deploy_kv_cache_dtype, name=args.name,
                             image=args.image or DEFAULT_IMAGES[plan.device],
                             served_model_name=args.served_model_name)
        written = emit(plans, opts, args.emit, command)
        out = Path(args.emit)
        suffix = "-cpu" if plan.device == "cpu" else ""
        (out / f"plan{suffix}.md").write_text(
            f"# Plans behind these manifests\n\nCommand: `{command}`\n\n" + "\n\n".join(
                f"## {key.replace('_', ' ')}\n\n{markdown(p)}" for key, p in plans.items()) + "\n")
        (out / f"plan{suffix}.json").write_text(json.dumps({k: json.loads(to_json(p)) for k, p in plans.items()},
                                                           indent=2, sort_keys=True) + "\n")
        for path in [*written, out / f"plan{suffix}.md", out / f"plan{suffix}.json"]:
            print(f"wrote {path}", file=sys.stderr)
        for key, p in plans.items():
            row = p.row(opts.kv_cache_dtype)
            if not row.fits:
                print(f"warning: {key.replace('_', ' ')}: --kv-cache-dtype {opts.kv_cache_dtype} "
                      f"{'does not start' if not row.starts else 'misses the target'} on this plan "
                      f"(see plan{suffix}.md)", file=sys.stderr)
    return 0
