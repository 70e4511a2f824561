"""A capacity plan: for each ``--kv-cache-dtype``, what fits on the given hardware.

:class:`PlanRequest` is the one input model (the CLI builds it from flags, ``POST
/zipcache/plan`` receives it as JSON); :func:`make_plan` returns a :class:`Plan`.

Exact (vLLM's own arithmetic, see :mod:`.capacity`): bytes per token, blocks, KV tokens and
concurrency *for a given KV budget*, and whether vLLM accepts ``max_model_len`` at all (one
request fits; the model's positions allow it). The budget is exact when given
(``kv_cache_memory_bytes``, vLLM's ``--kv-cache-memory-bytes``, on CPU or GPU; on CPU also
``VLLM_CPU_KVCACHE_SPACE``). Otherwise, on GPUs, it is ``gpu_memory_utilization x memory``
minus the weights, activations and runtime overhead, which vLLM measures by profiling at
startup; here they are ESTIMATES (see :class:`Estimates`) and every output says so.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from . import capacity as cap
from .hardware import CPU, GPU, load_catalog
from .model_spec import ModelSpec, load_model_spec

DEFAULT_DTYPES = ("auto", "fp8", "zipcache", "zipcache_hc", "zipcache_kivi2")
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
DEFAULT_LOGIT_ROWS = 256  # sampler rows of vLLM's profile run when max_num_seqs is not given
# Field -> how the CLI spells it (error messages name flags; the JSON API keeps field names).
FLAGS = {"kv_cache_dtypes": "--kv-cache-dtype", "kv_cache_space_gib": "VLLM_CPU_KVCACHE_SPACE"}


def flag(field: str) -> str:
    """The ``zipcache-vllm plan`` flag of a :class:`PlanRequest` field."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


class PlanRequest(BaseModel):
    """What to plan for."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="HF model folder, its config.json, or a bundled name (configs/models/)")
    hardware: str = Field(description="a GPU or CPU name from configs/hardware/catalog.yaml")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs (or CPU workers) per pipeline stage")
    pipeline_parallel_size: int = Field(1, ge=1, le=64, description="pipeline stages (one per node for multi-node)")
    max_model_len: int = Field(gt=0, le=1 << 22, description="vLLM --max-model-len")
    context_len: Optional[int] = Field(None, gt=0, description="tokens per request to plan for "
                                       "(default: max_model_len)")
    concurrency: Optional[int] = Field(None, ge=1, le=65536,
                                       description="target concurrent requests of context_len tokens")
    max_num_seqs: Optional[int] = Field(None, ge=1, le=65536, description="vLLM --max-num-seqs (default: "
                                        "concurrency; without either, what vLLM does without the flag: "
                                        "the plugin's 8 for zipcache dtypes, no cap for the KV of others)")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="vLLM --gpu-memory-utilization")
    kv_cache_memory_bytes: Optional[int] = Field(None, ge=1, description="vLLM --kv-cache-memory-bytes: the "
                                                 "KV budget of each worker, exact (on GPUs vLLM then ignores "
                                                 "gpu_memory_utilization)")
    kv_cache_space_gib: Optional[int] = Field(None, ge=1, description="CPU: VLLM_CPU_KVCACHE_SPACE (whole GiB), "
                                              "the same budget the CPU way; default: the catalog's")
    kv_cache_dtypes: list[str] = Field(default_factory=lambda: list(DEFAULT_DTYPES), min_length=1,
                                       description="candidate --kv-cache-dtype values")
    max_num_batched_tokens: int = Field(DEFAULT_MAX_NUM_BATCHED_TOKENS, ge=1,
                                        description="GPU activation estimate: tokens of the profile run")
    weights_gib: Optional[float] = Field(None, gt=0, description="GPU: weights per GPU, overrides the estimate")
    runtime_overhead_gib: float = Field(1.5, ge=0, description="GPU: CUDA context, NCCL, CUDA graphs "
                                        "(estimate)")

    @field_validator("hardware")
    @classmethod
    def _known_hardware(cls, name: str) -> str:
        load_catalog().lookup(name)
        return name

    @field_validator("kv_cache_dtypes")
    @classmethod
    def _known_dtypes(cls, names: list[str]) -> list[str]:
        for name in names:
            cap.check_cache_dtype(name)
        return names

    @model_validator(mode="after")
    def _check(self) -> "PlanRequest":
        if self.context_len is not None and self.context_len > self.max_model_len:
            raise ValueError(f"context_len ({self.context_len}) exceeds max_model_len ({self.max_model_len})")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_space_gib is not None:
            raise ValueError("give the KV budget once: kv_cache_memory_bytes or kv_cache_space_gib")
        return self


class Estimates(BaseModel):
    """GPU memory that is not KV cache, per GPU of the most loaded stage. ESTIMATES: vLLM
    measures these by profiling at startup."""

    requested_gib: float = Field(description="gpu_memory_utilization x memory (the whole device "
                                 "when kv_cache_memory_bytes is given)")
    weights_gib: float
    activations_gib: float
    runtime_overhead_gib: float
    kv_budget_gib: float = Field(description="requested - weights - activations - overhead, or "
                                 "kv_cache_memory_bytes")
    weights_source: Literal["estimate", "given"]
    kv_budget_source: Literal["estimate", "given"] = "estimate"


class DtypeRow(BaseModel):
    """The plan for one ``--kv-cache-dtype``."""

    cache_dtype: str
    preset: Optional[str]
    block_size: int
    bytes_per_token_per_layer: float = Field(description="one layer, one rank: page bytes / block size")
    parts_per_token_per_layer: dict[str, float]
    bytes_per_token: float = Field(description="whole model: all layers, all TP ranks (replicas included)")
    page_bytes: int
    staging_blocks: int = Field(0, description="blocks each running request holds ahead of its tokens "
                                "for its partial block (zipcache staging, inside the KV cache)")
    staging_bytes_per_request: int = Field(0, description="what those blocks take on the worker "
                                           "with the most layers (all its layers)")
    kv_budget_bytes: int = Field(description="smallest per-worker KV budget")
    num_blocks: int
    kv_tokens: int = Field(description="what vLLM logs as 'KV cache size: N tokens'")
    max_concurrency: float = Field(description="vLLM's 'Maximum concurrency' at max_model_len")
    kv_requests_at_context: int = Field(description="requests of context_len whose KV (and staging) "
                                        "fits at once")
    concurrency_at_context: int = Field(description="kv_requests_at_context capped by max_num_seqs")
    max_num_seqs: Optional[int]
    ratio_vs_auto: Optional[float]
    starts: bool = Field(description="vLLM accepts max_model_len (the model's positions allow it and "
                         "one request fits)")
    fits: bool = Field(description="starts, and the target concurrency fits")
    decode_tokens_per_s_bound: Optional[float] = Field(
        None, description="memory-bandwidth bound on decode throughput at concurrency_at_context "
        "(weights + KV read once per step; ignores compute): an upper bound, not a prediction")
    note: Optional[str] = None


class Plan(BaseModel):
    request: PlanRequest
    model: dict
    device: Literal["cpu", "gpu"]
    hardware: dict
    workers: int
    kv_heads_per_rank: int
    layers_per_stage: list[int]
    context_len: int
    max_model_len_limit: Optional[int] = Field(None, description="the longest max_model_len vLLM accepts "
                                               "for this model (max_position_embeddings x RoPE factor)")
    estimates: Optional[Estimates]
    rows: list[DtypeRow]
    warnings: list[str]

    def row(self, cache_dtype: str) -> DtypeRow:
        for r in self.rows:
            if r.cache_dtype == cache_dtype:
                return r
        raise KeyError(cache_dtype)


class PlanError(ValueError):
    """A request that validates alone but not with its model; ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _check_parallel(spec: ModelSpec, tp: int, pp: int) -> None:
    if spec.num_attention_heads % tp:
        raise PlanError("tensor_parallel_size", f"{tp} must divide the {spec.num_attention_heads} attention heads")
    if spec.num_kv_heads % tp and tp % spec.num_kv_heads:
        raise PlanError("tensor_parallel_size", f"{tp} and the {spec.num_kv_heads} KV heads: one must divide "
                        "the other")
    if pp > spec.num_layers:
        raise PlanError("pipeline_parallel_size", f"{pp} exceeds the {spec.num_layers} layers")


def weights_per_gpu(spec: ModelSpec, tp: int, layers: int, first: bool, last: bool) -> int:
    """Bytes of weights on one GPU of a stage (ESTIMATE: dense Llama-style, vocab split by TP)."""
    H, D = spec.hidden_size, spec.head_size
    kvh = cap.kv_heads_per_rank(spec.num_kv_heads, tp)
    per_layer = (2 * H * spec.num_attention_heads * D // tp + 2 * H * kvh * D
                 + 3 * H * spec.intermediate_size // tp + 2 * H)
    params = layers * per_layer
    embed = spec.vocab_size * H // tp
    if first:
        params += embed
    if last:
        params += H + (0 if spec.tie_word_embeddings and first else embed)
    return params * spec.dtype_bytes


def activations_per_gpu(spec: ModelSpec, tp: int, batched_tokens: int, logit_rows: int) -> int:
    """Peak activation bytes of vLLM's profile run on one GPU (ESTIMATE): the widest layer
    intermediates of ``batched_tokens`` tokens plus float32 logits of the sampled rows."""
    H, D = spec.hidden_size, spec.head_size
    kvh = cap.kv_heads_per_rank(spec.num_kv_heads, tp)
    per_token = 2 * H + (spec.num_attention_heads // tp + 2 * kvh) * D + 2 * spec.intermediate_size // tp
    return batched_tokens * per_token * spec.dtype_bytes + logit_rows * spec.vocab_size * 4


def vllm_default_max_num_seqs(hardware: str, hw: GPU | CPU, workers: int) -> int:
    """What ``vllm serve`` uses for ``--max-num-seqs`` when it is not given (zipcache dtypes
    included): ``EngineArgs.get_batch_defaults`` for the API server."""
    if isinstance(hw, CPU):
        return 128 * workers
    if hw.memory_gib >= 160 or (hw.memory_gib >= 70 and "a100" not in f"{hardware} {hw.description}".lower()):
        return 1024
    return 256


def in_flight_tokens(req: PlanRequest, device: str) -> int:
    """Tokens scheduled but not yet settled (``VllmConfig.max_in_flight_tokens``): what a
    sliding-window layer holds beyond its window. ``--max-num-batched-tokens`` as given,
    else ``vllm serve``'s default on the CPU (``2048 x world size``, arg_utils), per
    concurrent batch (one per pipeline stage; async scheduling off, the CPU default)."""
    pp = req.pipeline_parallel_size
    given = "max_num_batched_tokens" in req.model_fields_set or device != "cpu"
    batched = req.max_num_batched_tokens if given else 2048 * req.tensor_parallel_size * pp
    return batched * pp


def make_plan(req: PlanRequest, spec: ModelSpec | None = None) -> Plan:
    spec = spec or load_model_spec(req.model)
    hw = load_catalog().lookup(req.hardware)
    device = "cpu" if isinstance(hw, CPU) else "gpu"
    tp, pp = req.tensor_parallel_size, req.pipeline_parallel_size
    _check_parallel(spec, tp, pp)
    stages = cap.layers_per_stage(spec.num_layers, pp)
    kvh = cap.kv_heads_per_rank(spec.num_kv_heads, tp)
    context = req.context_len or req.max_model_len
    warnings: list[str] = []
    limit = spec.derived_max_model_len
    too_long = limit is not None and req.max_model_len > limit
    if too_long:
        warnings.append(f"max_model_len {req.max_model_len} exceeds the {limit} positions of the model "
                        f"(max_position_embeddings {spec.max_position_embeddings}"
                        + (f" x RoPE factor {spec.rope_factor:g}" if spec.rope_factor != 1 else "")
                        + "): vLLM refuses it (unless VLLM_ALLOW_LONG_MAX_MODEL_LEN=1, which it warns "
                        "gives NaNs past the trained length); no row fits")
    if tp > spec.num_kv_heads:
        warnings.append(f"tensor_parallel_size {tp} > {spec.num_kv_heads} KV heads: each KV head is "
                        f"replicated on {tp // spec.num_kv_heads} GPUs (KV capacity does not grow with TP)")

    # Per worker (one per TP rank of each stage; all ranks of a stage look alike).
    estimates = None
    spare = 0.0  # GPU: bytes per GPU outside everything vLLM allocates
    if device == "cpu":
        budget = req.kv_cache_memory_bytes or (req.kv_cache_space_gib or hw.kv_cache_space_gib) * cap.GiB
        budgets = [budget] * pp
    else:
        memory = hw.memory_gib * cap.GiB
        logit_rows = req.max_num_seqs or req.concurrency or DEFAULT_LOGIT_ROWS
        act = activations_per_gpu(spec, tp, req.max_num_batched_tokens, logit_rows)
        overhead = req.runtime_overhead_gib * cap.GiB
        weights = [int(req.weights_gib * cap.GiB) if req.weights_gib else
                   weights_per_gpu(spec, tp, n, i == 0, i == pp - 1) for i, n in enumerate(stages)]
        if req.kv_cache_memory_bytes:  # vLLM takes it as is and ignores gpu_memory_utilization
            requested = memory
            budgets = [req.kv_cache_memory_bytes] * pp
            spare = memory - max(weights) - act - overhead - req.kv_cache_memory_bytes
            if spare < 0:
                warnings.append(f"kv_cache_memory_bytes {req.kv_cache_memory_bytes} plus the estimated weights, "
                                f"activations and overhead exceed the {hw.memory_gib} GiB of a GPU by "
                                f"{-spare / cap.GiB:.2f} GiB (estimate): vLLM would run out of memory")
        else:
            requested = req.gpu_memory_utilization * memory
            budgets = [max(0, int(requested - w - act - overhead)) for w in weights]
            spare = memory - requested
        worst = min(range(pp), key=lambda i: budgets[i])
        estimates = Estimates(requested_gib=requested / cap.GiB, weights_gib=weights[worst] / cap.GiB,
                              activations_gib=act / cap.GiB, runtime_overhead_gib=req.runtime_overhead_gib,
                              kv_budget_gib=budgets[worst] / cap.GiB,
                              weights_source="given" if req.weights_gib else "estimate",
                              kv_budget_source="given" if req.kv_cache_memory_bytes else "estimate")

    rows = []
    for dtype in req.kv_cache_dtypes:
        rows.append(_row(req, spec, hw, device, dtype, kvh, stages, budgets, context, spare, too_long))
    auto = next((r for r in rows if r.cache_dtype == "auto"), None)
    if auto is None:
        auto = _row(req, spec, hw, device, "auto", kvh, stages, budgets, context, spare, too_long)
    for r in rows:
        r.ratio_vs_auto = r.kv_tokens / auto.kv_tokens if auto.kv_tokens else None
    return Plan(request=req, model=spec.__dict__ | {"parameters": spec.num_parameters()}, device=device,
                hardware={"name": req.hardware, **hw.model_dump()}, workers=tp * pp,
                kv_heads_per_rank=kvh, layers_per_stage=stages, context_len=context,
                max_model_len_limit=limit, estimates=estimates, rows=rows, warnings=warnings)


def _row(req, spec, hw, device, dtype, kvh, stages, budgets, context, spare, too_long) -> DtypeRow:
    fmt = cap.page_format(dtype, spec.head_size, kvh, spec.dtype_bytes, device)
    zip_ = fmt.layout is not None
    max_num_seqs = req.max_num_seqs or req.concurrency or None
    in_flight = in_flight_tokens(req, device)
    capy = cap.engine_capacity(fmt, budgets, stages, req.max_model_len, spec.layer_windows, in_flight)
    starts = capy.starts and not too_long
    per_request = (cap.request_blocks(fmt, cap.Groups.of(spec.layer_windows), context, in_flight)
                   if spec.layer_windows is not None else cap.blocks_per_request(fmt, context))
    kv_requests = capy.num_blocks // per_request if starts else 0
    conc = kv_requests if max_num_seqs is None else min(kv_requests, max_num_seqs)
    note = None
    if device == "cpu" and dtype in cap.FP8_DTYPES:
        note = "vLLM's fp8 CPU path needs x86 with AVX-512 or AMX"
    if device == "gpu" and zip_:
        note = "CUDA backend (Triton kernels, not yet run on a GPU: docs/TRITON.md)"
    bound = None
    if device == "gpu" and conc:
        kv_read = [conc * context * n * fmt.bytes_per_token_per_layer for n in stages]
        weights = (req.weights_gib * cap.GiB if req.weights_gib else None)
        step_s = sum((weights or weights_per_gpu(spec, req.tensor_parallel_size, n, i == 0, i == len(stages) - 1))
                     + kv_read[i] for i, n in enumerate(stages)) / (hw.bandwidth_gbs * 1e9)
        bound = conc / step_s
    whole = fmt.bytes_per_token_per_layer * spec.num_layers * req.tensor_parallel_size
    return DtypeRow(
        cache_dtype=dtype, preset=fmt.preset, block_size=fmt.block_size,
        bytes_per_token_per_layer=fmt.bytes_per_token_per_layer,
        parts_per_token_per_layer=fmt.parts_per_token_per_layer(), bytes_per_token=whole,
        page_bytes=fmt.page_bytes, staging_blocks=fmt.staging_blocks,
        staging_bytes_per_request=fmt.staging_blocks * fmt.page_bytes * max(stages),
        kv_budget_bytes=capy.kv_budget_bytes,
        num_blocks=capy.num_blocks, kv_tokens=capy.kv_tokens, max_concurrency=capy.max_concurrency,
        kv_requests_at_context=kv_requests, concurrency_at_context=conc, max_num_seqs=max_num_seqs,
        ratio_vs_auto=None, starts=starts, fits=starts and conc >= (req.concurrency or 1),
        decode_tokens_per_s_bound=bound, note=note)


def planned_max_num_seqs(req: PlanRequest, cache_dtype: str, spec: ModelSpec | None = None) -> int:
    """The ``--max-num-seqs`` to deploy ``cache_dtype`` with: ``req.max_num_seqs`` when given;
    else the largest n up to ``req.concurrency`` (without it, up to vLLM's default for the
    hardware, :func:`vllm_default_max_num_seqs`) such that n requests of ``context_len`` fit
    in the KV cache with their staging blocks; at least 1.

    Every probe is a full :func:`make_plan` with ``max_num_seqs=n``, so the answer accounts for
    what n changes (sampler rows in the GPU activation estimate), which only shrinks the
    cache as n grows, so the largest such n is found by bisection.
    """
    if req.max_num_seqs:
        return req.max_num_seqs
    spec = spec or load_model_spec(req.model)
    hw = load_catalog().lookup(req.hardware)
    top = req.concurrency or vllm_default_max_num_seqs(
        req.hardware, hw, req.tensor_parallel_size * req.pipeline_parallel_size)

    def fits(n: int) -> bool:
        probe = req.model_copy(update={"max_num_seqs": n, "concurrency": None, "kv_cache_dtypes": [cache_dtype]})
        row = make_plan(probe, spec).row(cache_dtype)
        return row.fits and row.kv_requests_at_context >= n

    lo, hi = 1, top
    if not fits(lo):
        return lo
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
