"""The zipcache attention backend for vLLM 0.32 (the kernels of ``zipcache_vllm.kernels``,
routed by device in ``kernels/ops.py``: C++ on the CPU, Triton on CUDA, the portable
PyTorch path without the C++ build; the rest PyTorch ops).

Four parts, like vLLM's ``cpu_attn.py`` / ``turboquant_attn.py``:

* :class:`ZipCacheBackend`: static descriptor; ``customize_spec`` declares the
  exact page bytes of :class:`~zipcache_vllm.layout.BlockLayout` so the engine
  allocates (and reports) more tokens for the same memory.
* :class:`ZipCacheMetadata`: the per-step plan (one :class:`RequestPlan` a row).
* :class:`ZipCacheMetadataBuilder`: plans once per step: which staging slot each
  request uses, which pages it reads, which blocks fill; it advances the
  staging bookkeeping so the layers only move data.
* :class:`ZipCacheImpl`: per layer, runs the planned rows through
  :func:`~zipcache_vllm.engine.step.apply_step` (attention, saliency, packing of
  filled blocks, new partial tails) with the preset's policy (``policies/``); the
  step lives in the vLLM-free package ``zipcache_vllm.engine`` so it is testable
  without vLLM.

Per-engine state lives on objects, never in module globals, so two engines in one
process stay apart: an engine's staging pool, its policy's engine state and step token ids
are one :class:`ZipCacheEngine`, created by its first metadata builder and attached to
its zipcache layers' impls, where its other builders, the runner's hooks
(``compat.patch_request_lifecycle``, ``compat.patch_step_token_ids``) and the worker
extension find it (:func:`engine_of`). The cache dtype (and the model dtype's width, which
sizes the staging) reaches ``customize_spec`` through the backend class: the router gives
each dtype's layers a subclass that carries it (:func:`backend_for`). ``customize_spec``
declares a :class:`~.kv_spec.ZipCacheSpec`: the page bytes and the staging blocks every
running request holds ahead of its tokens (paged staging, ``engine/staging.py``).

See ``docs/BACKEND.md`` for the step flow.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import Preset
from ..engine.plan import DecodeBatch, RequestPlan, plan_step
from ..engine.staging import MARGIN, StagingPool
from ..engine.step import apply_step, fused_row
from ..layout import BlockLayout, FastGenLayout, StagingLayout
from ..policies import make_policy
from . import compat
from .compat import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionSpec,
    AttentionType,
    CommonAttentionMetadata,
    KVCacheLayout,
    MultipleOf,
)
from ..dtypes import is_zipcache_dtype, preset_for_dtype
from .kv_spec import ZipCacheSlidingSpec, ZipCacheSpec

logger = compat.logger

SUPPORTED_HEAD_SIZES = (64, 128, 256)
BACKEND_PATH = "zipcache_vllm.vllm_plugin.backend.ZipCacheBackend"  # vLLM's CUSTOM slot
DTYPE_BACKEND_PREFIX = "ZipCacheBackend_"  # + cache dtype: the class the router names
F32_SUFFIX = "__f32"  # + on the classes of float32 models (4-byte staging elements)


def _cache_dtype_of(vllm_config) -> str:
    dtype = getattr(getattr(vllm_config, "cache_config", None), "cache_dtype", None)
    if is_zipcache_dtype(dtype):
        return dtype
    raise RuntimeError("zipcache backend used without a zipcache --kv-cache-dtype")


def layout_for(preset: Preset, head_size: int, num_kv_heads: int) -> BlockLayout | FastGenLayout:
    if preset.paged_fastgen:  # per-head eviction into S-slot pages (docs/FASTGEN.md)
        return FastGenLayout.from_preset(preset, head_size=head_size, num_kv_heads=num_kv_heads)
    return BlockLayout.from_preset(preset, head_size=head_size, num_kv_heads=num_kv_heads)


class ZipCacheBackend(AttentionBackend):
    """Mixed-precision packed pages + a full-precision staging block per request."""

    # Pages can only be written once saliency is known, i.e. inside forward():
    # the whole cache update (staging append, page packing) happens there.
    forward_includes_kv_cache_update: bool = True

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = []  # any zipcache* name, see supports_kv_cache_dtype
    # The cache dtype of the layers this class serves: set on the per-dtype subclasses the
    # router names (backend_for); None on the CUSTOM-registered class itself.
    cache_dtype: ClassVar[str | None] = None
    # Bytes of the model dtype the staging holds (2: bfloat16 / float16, 4: float32).
    staging_elt_bytes: ClassVar[int | None] = None

    @staticmethod
    def get_name() -> str:
        # The CUSTOM slot: a dynamically added enum member breaks when the config is
        # unpickled in a spawned process before plugins load.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type["ZipCacheImpl"]:
        return ZipCacheImpl

    @staticmethod
    def get_builder_cls() -> type["ZipCacheMetadataBuilder"]:
        return ZipCacheMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]  # the preset's block size; a page is never split

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_SIZES)

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype) -> bool:
        return is_zipcache_dtype(kv_cache_dtype)

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """One page per (layer, block): ``[1 head slot, 1 state, page_bytes]``, as a
        :class:`~.kv_spec.ZipCacheSpec` with the staging blocks of the preset's
        :class:`~zipcache_vllm.layout.StagingLayout`.

        ``tokens_per_state = block_size`` makes the whole block one opaque state, so
        ``page_size_bytes == layout.page_bytes`` exactly (no padding, no split). The preset
        and the staging element width are the class's :attr:`cache_dtype` and
        :attr:`staging_elt_bytes` (vLLM calls this where no current config is set: the
        worker's ``get_kv_cache_spec``), else the current config's.
        """
        if isinstance(spec, (ZipCacheSpec, ZipCacheSlidingSpec)):
            return spec
        config = None if cls.cache_dtype else compat.get_current_vllm_config_or_none()
        preset = preset_for_dtype(cls.cache_dtype or _cache_dtype_of(config))
        elt = cls.staging_elt_bytes or _staging_elt_bytes(config.model_config.dtype)
        layout = layout_for(preset, spec.head_size, spec.num_kv_heads)
        if spec.block_size not in (1, layout.block_size):
            raise ValueError(f"zipcache preset {preset.name} needs block size {layout.block_size}, "
                             f"the engine uses {spec.block_size}")
        sliding = isinstance(spec, compat.SlidingWindowSpec)
        base = compat.SlidingWindowSpec if sliding else compat.FullAttentionSpec
        fields = {f: getattr(spec, f) for f in base.__dataclass_fields__}
        fields.update(num_head_slots=1, tokens_per_state=spec.block_size,
                      state_content_bytes=layout.page_bytes * spec.block_size // layout.block_size,
                      staging_blocks=StagingLayout.of(layout, elt, preset.staging_bits,
                                                      preset.staged_blocks).lookahead_blocks,
                      cache_delay_blocks=preset.saliency_delay)
        return (ZipCacheSlidingSpec if sliding else ZipCacheSpec)(**fields)


def is_zipcache_backend(backend: object) -> bool:
    """Whether ``backend`` (an attention backend class) is ours."""
    return isinstance(backend, type) and issubclass(backend, ZipCacheBackend)


def _staging_elt_bytes(model_dtype: torch.dtype | None) -> int:
    """Bytes of a staged element: the model dtype's (float32: 4, else 2)."""
    return 4 if model_dtype == torch.float32 else 2


def backend_for(cache_dtype: str, staging_elt_bytes: int = 2) -> type[ZipCacheBackend]:
    """The :class:`ZipCacheBackend` subclass for layers of ``cache_dtype`` in a model whose
    dtype has ``staging_elt_bytes`` bytes (one per pair and process, named
    ``ZipCacheBackend_<dtype>`` in this module, ``+ "__f32"`` for float32 models, see
    :func:`backend_path`)."""
    return _backend_class(cache_dtype, staging_elt_bytes)


@functools.cache
def _backend_class(cache_dtype: str, staging_elt_bytes: int) -> type[ZipCacheBackend]:
    preset_for_dtype(cache_dtype)  # unknown names list the valid ones
    if staging_elt_bytes not in (2, 4):
        raise ValueError(f"staging elements are 2 or 4 bytes, got {staging_elt_bytes}")
    name = DTYPE_BACKEND_PREFIX + cache_dtype + (F32_SUFFIX if staging_elt_bytes == 4 else "")
    return type(name, (ZipCacheBackend,), {"cache_dtype": cache_dtype,
                                           "staging_elt_bytes": staging_elt_bytes,
                                           "__module__": __name__, "__qualname__": name})


def backend_path(cache_dtype: str, model_dtype: torch.dtype | None = None) -> str:
    """The qualified name of :func:`backend_for` for ``cache_dtype`` layers of a
    ``model_dtype`` model: what the router returns to vLLM, which imports it by name
    (:func:`__getattr__`)."""
    return f"{__name__}.{backend_for(cache_dtype, _staging_elt_bytes(model_dtype)).__name__}"


def __getattr__(name: str):
    """``ZipCacheBackend_<dtype>[__f32]``: the per-dtype backend classes, made on first use."""
    if name.startswith(DTYPE_BACKEND_PREFIX):
        dtype = name[len(DTYPE_BACKEND_PREFIX):]
        f32 = dtype.endswith(F32_SUFFIX)
        try:
            return backend_for(dtype[:-len(F32_SUFFIX)] if f32 else dtype, 4 if f32 else 2)
        except ValueError:
            pass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class ZipCacheMetadata:
    num_actual_tokens: int
    plans: list[RequestPlan]
    decode: DecodeBatch | None  # the decode rows as tensors, shared by every layer
    prepared: list | None = None  # each row's data from the policy's engine state (FastGen: token classes)


@dataclass(eq=False)
class ZipCacheEngine:
    """One engine's zipcache state in its worker, shared by the engine's metadata builders
    and zipcache layers (:func:`engine_for` creates it, :func:`engine_of` finds it).

    ``pool``: the staging pool of all zipcache layers, with its request lifecycle
    bookkeeping; ``state``: the policy's engine state
    (:meth:`~zipcache_vllm.policies.KVPolicy.engine_state`: paged FastGen presets, else
    None); ``step_token_ids``: the token ids of the current step
    (``GPUModelRunner.input_ids``), recorded by ``compat.patch_step_token_ids`` right after
    the runner fills them (for a policy with an engine state).
    """

    pool: StagingPool
    state: object | None = None
    step_token_ids: torch.Tensor | None = None


class ZipCacheMetadataBuilder(AttentionMetadataBuilder[ZipCacheMetadata]):
    """Plans each step once for all layers and advances the staging bookkeeping."""

    # CUDA graphs: never around attention. A step's work depends on host-side state
    # planned per step (which staging slot each request uses, which blocks fill and get
    # packed now, the probe rows), with Python control flow and shapes that change every
    # step; a captured graph would replay one step's plan forever. vLLM then captures at
    # most piecewise graphs with attention run eagerly between the pieces.
    _cudagraph_support = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        preset = preset_for_dtype(_cache_dtype_of(vllm_config))
        self.block_size = preset.block_size
        self.policy = make_policy(preset)
        self.engine = engine_for(vllm_config, device)
        # A sliding-window group: decode rows whose window starts inside the packed
        # prefix run the windowed per-row path (engine/step.py), not the fused kernel.
        self.window = getattr(kv_cache_spec, "sliding_window", None)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> ZipCacheMetadata:
        cm, engine = common_attn_metadata, self.engine
        plans = plan_step(engine.pool, self.block_size, cm.query_start_loc_cpu.tolist(),
                          cm.seq_lens.cpu().tolist()[:cm.num_reqs], cm.block_table_tensor)
        decode = [p for p in plans if fused_row(p, self.policy, self.window)]
        prepared = (engine.state.prepare(plans, engine.step_token_ids)
                    if engine.state is not None else None)
        return ZipCacheMetadata(
            num_actual_tokens=cm.num_actual_tokens, plans=plans, prepared=prepared,
            decode=(DecodeBatch.from_plans(decode, self.block_size, self.policy, self.device,
                                           engine.pool.paged)
                    if decode else None))


class ZipCacheImpl(AttentionImpl[ZipCacheMetadata]):
    """Per layer: attention over packed pages + staging + chunk; pack filled blocks."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes, sliding_window, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks=None) -> None:
        preset = preset_for_dtype(kv_cache_dtype)
        unsupported = {
            "ALiBi": alibi_slopes is not None,
            f"a sliding window of {sliding_window} tokens with {preset.block_size}-token pages "
            "(the window must be longer than a page)":
                sliding_window is not None and sliding_window <= preset.block_size,
            "sliding windows with a FastGen preset":
                sliding_window is not None and preset.paged_fastgen,
            "logits soft cap": bool(logits_soft_cap),
            "attention sinks": sinks is not None,
            "cross-layer KV sharing": kv_sharing_target_layer_name is not None,
            f"attention type {attn_type}": attn_type != AttentionType.DECODER,
        }
        bad = [name for name, flag in unsupported.items() if flag]
        if bad:
            raise NotImplementedError(f"zipcache KV cache does not support {', '.join(bad)}")
        if head_size not in SUPPORTED_HEAD_SIZES or num_heads % num_kv_heads:
            raise NotImplementedError(
                f"zipcache needs head size in {SUPPORTED_HEAD_SIZES} and query heads a multiple "
                f"of KV heads; got head size {head_size}, {num_heads} / {num_kv_heads} heads")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        self.sliding_window = sliding_window  # keys in (p - window, p] for a query at p
        self.layout = layout_for(preset, head_size, num_kv_heads)
        self.policy = make_policy(preset)
        self.engine: ZipCacheEngine | None = None  # attached by the engine's first builder
        self.layer_index = -1  # this layer's index in the engine's staging pool

    def attach(self, engine: ZipCacheEngine, layer_index: int) -> None:
        """Serve this layer from ``engine``: its staging pool's layer ``layer_index``."""
        self.engine, self.layer_index = engine, layer_index

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: ZipCacheMetadata | None,
                output: torch.Tensor, output_scale=None, output_block_scale=None) -> torch.Tensor:
        """query ``[T, Hq, D]``, key/value ``[T, H, D]``, kv_cache uint8 ``[N, 1, 1, page_bytes]``."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by zipcache")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        apply_step(self.engine.pool, self.layer_index, attn_metadata.plans, query, key, value,
                   kv_cache.flatten(1), self.layout, self.policy, self.scale, output,
                   attn_metadata.decode, self.engine.state, attn_metadata.prepared,
                   self.sliding_window)
        return output


# ---------------------------------------------------------------------------
# What plugin.register() hooks into vLLM: validation, config, the staging budget;
# and each engine's state (ZipCacheEngine) for its builders, layers and runner hooks.
# ---------------------------------------------------------------------------

def validate_selector_config(cfg) -> None:
    """Reject, at startup, layers zipcache cannot serve (called when routing a layer)."""
    preset_for_dtype(cfg.kv_cache_dtype)  # unknown names list the valid ones
    problems = []
    if cfg.use_mla:
        problems.append("MLA attention")
    if cfg.use_sparse:
        problems.append("sparse attention")
    if cfg.has_sink:
        problems.append("attention sinks")
    if cfg.attn_type != AttentionType.DECODER:
        problems.append(f"{cfg.attn_type} attention (only decoder self-attention)")
    if cfg.head_size not in SUPPORTED_HEAD_SIZES:
        problems.append(f"head size {cfg.head_size} (supported: {SUPPORTED_HEAD_SIZES})")
    if cfg.dtype not in ZipCacheBackend.supported_dtypes:
        problems.append(f"model dtype {cfg.dtype}")
    if problems:
        raise ValueError(f"--kv-cache-dtype {cfg.kv_cache_dtype} does not support: "
                         + "; ".join(problems) + ". Serve this model with --kv-cache-dtype auto.")


def update_vllm_config(vllm_config) -> None:
    """Config-time checks and defaults for our dtypes (after the platform's own)."""
    cache = vllm_config.cache_config
    preset = preset_for_dtype(cache.cache_dtype)
    if cache.user_specified_block_size and cache.block_size != preset.block_size:
        raise ValueError(f"--kv-cache-dtype {cache.cache_dtype} (preset {preset.name}) stores "
                         f"blocks of {preset.block_size} tokens; --block-size {cache.block_size} "
                         f"is incompatible (leave it unset or set {preset.block_size})")
    cache.block_size = preset.block_size
    if cache.prefix_match_unit not in (None, preset.block_size):
        raise ValueError("zipcache needs prefix-cache hits on block boundaries: "
                         f"--prefix-match-unit must be unset or {preset.block_size}")
    if cache.kv_cache_dtype_skip_layers:
        raise ValueError("zipcache does not support --kv-cache-dtype-skip-layers "
                         "(one page layout for every layer)")
    if vllm_config.speculative_config is not None:
        raise ValueError("zipcache does not support speculative decoding: rejected draft "
                         "tokens would roll back tokens already staged or packed")
    model = vllm_config.model_config
    if model is not None:
        if getattr(model, "use_mla", False):
            raise ValueError("zipcache does not support MLA models; serve this model with "
                             "--kv-cache-dtype auto")
        window = model.get_sliding_window()
        if window is not None and preset.paged_fastgen:
            raise ValueError(f"--kv-cache-dtype {cache.cache_dtype} (FastGen) does not support "
                             "sliding-window attention models; serve this model with a "
                             "quantizing zipcache preset (--kv-cache-dtype zipcache)")
        staged = preset.staged_blocks * preset.block_size
        if window is not None and (window <= preset.block_size or window < staged):
            raise ValueError(f"this model's sliding window ({window} tokens) must be longer "
                             f"than the pages of --kv-cache-dtype {cache.cache_dtype} "
                             f"({preset.block_size} tokens) and hold the {staged} tokens it "
                             "stages: use a preset with smaller pages or no saliency_delay "
                             "(a user preset, docs/POLICIES.md) or --kv-cache-dtype auto")
    if cache.enable_prefix_caching:
        if preset.saliency_delay:
            logger.info("zipcache: prefix caching stays on: a block is cached once it is "
                        "packed, %d block(s) after it filled (saliency_delay); its page "
                        "depends on its tokens, its prefix and the request that packed it.",
                        preset.saliency_delay)
        else:
            logger.info("zipcache: prefix caching stays on: a full page is written once and "
                        "depends only on its own tokens and its prefix.")


def num_staging_slots(vllm_config) -> int:
    return vllm_config.scheduler_config.max_num_seqs + MARGIN


def _max_groups(impls: list[ZipCacheImpl]) -> int:
    """At most how many KV-cache groups vLLM makes of these layers: one for a model of one
    attention type; for a hybrid model (full and sliding-window layers) vLLM splits each
    type into groups of at least the smallest type's layer count. A running request
    stages one partial block per group (its block ids differ), so the pool has this many
    slots per request (paged slots are keys only: no memory)."""
    counts: dict[int | None, int] = {}
    for impl in impls:
        counts[impl.sliding_window] = counts.get(impl.sliding_window, 0) + 1
    smallest = min(counts.values())
    return sum(-(-n // smallest) for n in counts.values())


def _our_layers(vllm_config) -> dict[str, object]:
    ctx = vllm_config.compilation_config.static_forward_context
    return {name: layer for name, layer in ctx.items()
            if isinstance(getattr(layer, "impl", None), ZipCacheImpl)}


def engine_for(vllm_config, device) -> ZipCacheEngine:
    """The engine's zipcache state: created by its first metadata builder and attached to
    every zipcache layer's impl, where its other builders find it.

    Its staging pool covers all zipcache layers, on ``device`` (the model runner's; on
    CUDA it lives outside the KV budget, in the memory ``--gpu-memory-utilization`` leaves
    free, and its size is logged)."""
    layers = _our_layers(vllm_config)
    impls = [layer.impl for layer in layers.values()]
    H, D = impls[0].num_kv_heads, impls[0].head_size
    if any((i.num_kv_heads, i.head_size) != (H, D) for i in impls):
        raise NotImplementedError("zipcache needs the same KV heads and head size in every layer")
    B = impls[0].layout.block_size
    dtype = vllm_config.model_config.dtype
    engine = impls[0].engine
    if engine is not None and engine.pool.matches(layers, B, H, D, dtype):
        return engine
    preset = impls[0].policy.preset
    staging = StagingLayout.of(impls[0].layout, _staging_elt_bytes(dtype), preset.staging_bits,
                               preset.staged_blocks)
    device = torch.device(device if device is not None else "cpu")
    pool = StagingPool(sorted(layers), num_staging_slots(vllm_config) * _max_groups(impls),
                       B, H, D, dtype, device=device, paged=staging, blocks=staging.blocks)
    logger.info("zipcache: staging in the KV cache (%s): each running request holds %d "
                "block(s) ahead of its tokens (%d tokens a page, %.2f MiB a request over %d "
                "layers).", "8-bit" if staging.kv_bits == 8 else str(dtype).removeprefix("torch."),
                staging.lookahead_blocks, staging.tokens_per_page,
                staging.lookahead_blocks * staging.page_bytes * len(layers) / 2**20, len(layers))
    state = impls[0].policy.engine_state(len(layers), pool.num_slots, H, B,
                                         vllm_config.model_config.tokenizer, device)
    if state is not None:  # its builder reads each step's token ids
        compat.patch_step_token_ids(record_step_tokens)
    engine = ZipCacheEngine(pool, state)
    for name, impl in zip(layers, impls):
        impl.attach(engine, pool.layer_index[name])
    _apply_calibration(vllm_config, layers)
    return engine


def _apply_calibration(vllm_config, layers: dict[str, object]) -> None:
    """Resolve a ``calibrated`` key rotation per layer from the model folder's calibration
    (``zipcache_vllm/calibration.py``): the layers it marks store unrotated keys (same page
    bytes); without a calibration every layer rotates them. Logged either way."""
    from ..calibration import FILE_NAME, layer_preset, rotated_layers

    impls = [layer.impl for layer in layers.values()]
    preset = impls[0].policy.preset
    if preset.key_rotation != "calibrated":
        return
    model = getattr(vllm_config.model_config, "model", None)  # its folder (a hub name has none)
    rotated = rotated_layers(model)
    if rotated is None:
        logger.info("zipcache: %s has no %s (zipcache-vllm model calibrate): keys rotated in "
                    "every layer.", model, FILE_NAME)
        return
    for name, impl in zip(layers, impls):
        p = layer_preset(preset, rotated, _model_layer(name))
        impl.layout = layout_for(p, impl.head_size, impl.num_kv_heads)
        impl.policy = make_policy(p)
    logger.info("zipcache: keys rotated in %d of %d layers (the model's calibration, %s).",
                sum(i.layout.rotate_keys for i in impls), len(impls), FILE_NAME)


def _model_layer(name: str) -> int:
    """The model layer index in a layer name (``model.layers.5.self_attn.attn`` -> 5)."""
    match = re.search(r"layers\.(\d+)\.", name)
    if match is None:
        raise ValueError(f"cannot tell the layer index of attention layer {name!r}")
    return int(match.group(1))


def engine_of(vllm_config) -> ZipCacheEngine | None:
    """The zipcache state of the engine ``vllm_config`` configures, read off its layers
    (None: no zipcache layer, or before its first metadata builder)."""
    for layer in vllm_config.compilation_config.static_forward_context.values():
        impl = getattr(layer, "impl", None)
        if isinstance(impl, ZipCacheImpl):
            return impl.engine
    return None


def staging_pool_of(vllm_config) -> StagingPool | None:
    """The engine's staging pool (for the runner's request lifecycle hooks and the stats)."""
    engine = engine_of(vllm_config)
    return engine.pool if engine is not None else None


def record_step_tokens(vllm_config, ids: torch.Tensor) -> None:
    """Keep a step's token ids for the metadata builder of an engine whose policy has an
    engine state (paged FastGen: the rows' token classes)."""
    engine = engine_of(vllm_config)
    if engine is not None:
        engine.step_token_ids = ids
