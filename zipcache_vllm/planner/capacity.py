"""KV capacity exactly as vLLM 0.32 computes it, for any ``--kv-cache-dtype``.

Pure Python (no vLLM import), reproducing, in order:

* KV heads per tensor-parallel rank: ``ModelConfig.get_num_kv_heads`` =
  ``max(1, total_kv_heads // tp)`` (heads are replicated when ``tp > kv heads``).
* Layers per pipeline stage: ``vllm.distributed.utils.get_pp_indices`` (the remainder goes
  to the stages before the last).
* Page bytes of one layer and one block: ``AttentionSpec.page_size_bytes`` =
  ``heads x block_size x (K + V) x dtype bytes`` for ``auto``/``fp8``, and for zipcache the
  backend's ``customize_spec``: one opaque state of :attr:`BlockLayout.page_bytes`.
* The budget per worker: on CPU ``VLLM_CPU_KVCACHE_SPACE`` GiB. Zipcache staging lives in
  the KV cache itself (``layout.StagingLayout``): every running request holds
  ``staging_blocks`` blocks ahead of its tokens (``vllm_plugin/kv_spec.py``).
* ``kv_cache_utils.get_kv_cache_config_from_groups``: one group with every layer of the
  worker, ``num_blocks = budget // (layers x page bytes)``; the engine keeps the smallest
  ``num_blocks`` of all workers.
* ``kv_cache_utils.get_kv_cache_capacity``: ``max_concurrency = num_blocks /
  (cdiv(max_model_len, block_size) + staging_blocks)`` (``ZipCacheSpec.max_memory_usage_bytes``)
  and the logged "KV cache size: N tokens" is ``int(max_concurrency * max_model_len)``.
* ``_check_enough_kv_cache_memory``: the engine refuses to start unless one request of
  ``max_model_len`` (with its staging blocks) fits next to the null block.
* Sliding-window layers (``SlidingWindowSpec.max_admission_blocks_per_request``): a
  request holds at most ``cdiv(min(window - 1 + in-flight tokens, max_model_len),
  block_size) + 1`` blocks of such a layer (vLLM frees what leaves the window; in-flight
  tokens: ``max_num_batched_tokens`` per concurrent batch). A hybrid model (Gemma 2/3)
  gets one KV-cache group per ``group_size`` layers of a type
  (``_get_kv_cache_groups_uniform_page_size``: the smallest type's layer count, or the
  largest when it is under 1.5x the smallest), every group with its own block table from
  one pool of blocks of ``group_size`` pages; a request's blocks are the sum over groups.

``tests/tools/test_planner.py`` checks these against vLLM's own functions, and
``tests/tools/test_planner_engine.py`` against the engine's log.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..layout import BlockLayout, StagingLayout

GiB = 1 << 30
CPU_BLOCK_SIZE = 128  # vllm/platforms/cpu.py sets block_size=128 when the user gives none
GPU_BLOCK_SIZE = 16  # vllm.config.cache.CacheConfig.DEFAULT_BLOCK_SIZE
FP8_DTYPES = ("fp8", "fp8_e4m3", "fp8_e5m2")
FULL_PRECISION_DTYPES = ("auto", "bfloat16", "float16")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kv_heads_per_rank(total_kv_heads: int, tensor_parallel_size: int) -> int:
    """KV heads stored by one TP rank (vLLM replicates heads when TP exceeds them)."""
    return max(1, total_kv_heads // tensor_parallel_size)


def layers_per_stage(num_layers: int, pipeline_parallel_size: int) -> list[int]:
    """Layers of each pipeline stage, as ``get_pp_indices`` splits them."""
    if not 1 <= pipeline_parallel_size <= num_layers:
        raise ValueError(f"pipeline_parallel_size must be in [1, {num_layers}], got {pipeline_parallel_size}")
    parts = [num_layers // pipeline_parallel_size] * pipeline_parallel_size
    for i in range(2, num_layers % pipeline_parallel_size + 2):
        parts[-i] += 1
    return parts


def is_zipcache(cache_dtype: str) -> bool:
    from ..dtypes import is_zipcache_dtype
    return is_zipcache_dtype(cache_dtype)


@dataclass(frozen=True)
class PageFormat:
    """One layer's KV page on one rank for a ``--kv-cache-dtype``."""

    cache_dtype: str
    block_size: int
    num_kv_heads: int  # per rank
    head_size: int
    page_bytes: int  # one layer, one block: vLLM's spec.page_size_bytes
    preset: str | None = None
    layout: BlockLayout | None = None  # or FastGenLayout (paged FastGen presets)
    staging_blocks: int = 0  # blocks every running request holds ahead of its tokens (zipcache)

    @property
    def bytes_per_token_per_layer(self) -> float:
        """Page bytes per token of one layer on one rank, every part counted."""
        return self.page_bytes / self.block_size

    def parts_per_token_per_layer(self) -> dict[str, float]:
        """Bytes per token per layer by part (codes, parameters, mask, padding or plain K/V)."""
        if self.layout is None or not hasattr(self.layout, "breakdown"):
            return {"kv" if self.layout is None else "page": self.bytes_per_token_per_layer}
        b = self.layout.breakdown()
        H = self.num_kv_heads
        return {
            "codes": H * sum(v for k, v in b.items() if k.endswith("_codes")),
            "key_params": H * (b["k_hi_params"] + b["k_lo_params"]),
            "value_params": H * (b["v_channel_scale"] + b["v_token_params"]),
            "mask": H * b["mask"],
            "padding": H * b["padding"],
        }


def zipcache_layout(preset, head_size: int, num_kv_heads: int):
    """The page layout the backend declares for ``preset`` (``backend.layout_for``; importing the
    backend would import vLLM, so the dispatch is repeated here and ``tests/tools/test_planner.py``
    checks it against the backend's ``customize_spec`` for every dtype)."""
    if getattr(preset, "paged_fastgen", False):
        from ..layout import FastGenLayout
        return FastGenLayout.from_preset(preset, head_size, num_kv_heads)
    return BlockLayout.from_preset(preset, head_size, num_kv_heads)


def check_cache_dtype(cache_dtype: str) -> None:
    """Raise ``ValueError`` listing the valid names unless the planner knows ``cache_dtype``."""
    from ..dtypes import cache_dtypes
    if cache_dtype in FP8_DTYPES or cache_dtype in FULL_PRECISION_DTYPES or cache_dtype in cache_dtypes():
        return
    raise ValueError(f"unknown --kv-cache-dtype {cache_dtype!r}; valid: "
                     f"{', '.join([*FULL_PRECISION_DTYPES, *FP8_DTYPES, *sorted(cache_dtypes())])}")


def page_format(cache_dtype: str, head_size: int, num_kv_heads: int, model_dtype_bytes: int,
                device: str, block_size: int | None = None) -> PageFormat:
    """The page of ``cache_dtype`` for ``num_kv_heads`` heads of ``head_size`` (one rank)."""
    if is_zipcache(cache_dtype):
        from ..dtypes import preset_for_dtype
        preset = preset_for_dtype(cache_dtype)
        if block_size not in (None, preset.block_size):
            raise ValueError(f"{cache_dtype} stores blocks of {preset.block_size} tokens, not {block_size}")
        layout = zipcache_layout(preset, head_size, num_kv_heads)
        staging = StagingLayout.of(layout, 4 if model_dtype_bytes == 4 else 2, preset.staging_bits,
                                   preset.staged_blocks)
        return PageFormat(cache_dtype, layout.block_size, num_kv_heads, head_size, layout.page_bytes,
                          preset.name, layout, staging.lookahead_blocks)
    if cache_dtype in FP8_DTYPES:
        elt = 1
    elif cache_dtype in FULL_PRECISION_DTYPES:
        elt = 2 if cache_dtype != "auto" else model_dtype_bytes
    else:
        raise ValueError(f"unknown --kv-cache-dtype {cache_dtype!r} for the planner: use auto, "
                         f"{', '.join(FP8_DTYPES)} or a zipcache dtype")
    bs = block_size or (CPU_BLOCK_SIZE if device == "cpu" else GPU_BLOCK_SIZE)
    return PageFormat(cache_dtype, bs, num_kv_heads, head_size, num_kv_heads * bs * 2 * head_size * elt)


@dataclass(frozen=True)
class EngineCapacity:
    """What the engine allocates and logs."""

    num_blocks: int  # the smallest over workers
    kv_tokens: int  # "KV cache size: N tokens"
    max_concurrency: float  # "Maximum concurrency for max_model_len tokens per request: X"
    starts: bool  # one max_model_len request fits next to the null block on every worker
    kv_budget_bytes: int  # the smallest per-worker budget


@dataclass(frozen=True)
class Groups:
    """The KV-cache groups of one worker's layers: ``layers_per_block`` pages make one
    block of the shared pool; ``windows`` lists each group's sliding window (None: full)."""

    layers_per_block: int
    windows: tuple[int | None, ...]

    @classmethod
    def of(cls, layer_windows: tuple[int | None, ...] | list[int | None]) -> "Groups":
        counts: dict[int | None, int] = {}
        for w in layer_windows:
            counts[w] = counts.get(w, 0) + 1
        if len(counts) == 1:
            return cls(len(layer_windows), tuple(counts))
        smallest, largest = min(counts.values()), max(counts.values())
        size = largest if largest < smallest * 1.5 else smallest
        return cls(size, tuple(w for w, n in counts.items() for _ in range(cdiv(n, size))))


def blocks_per_request(fmt: PageFormat, num_tokens: int, window: int | None = None,
                       in_flight_tokens: int = 0) -> int:
    """Blocks a running request of ``num_tokens`` tokens holds in one layer (its staging
    blocks included): all of them, or for a sliding ``window`` at most a window plus the
    tokens in flight, plus one."""
    if window is None:
        return cdiv(num_tokens, fmt.block_size) + fmt.staging_blocks
    held = min(window - 1 + in_flight_tokens, num_tokens)
    return cdiv(held, fmt.block_size) + 1 + fmt.staging_blocks


def request_blocks(fmt: PageFormat, groups: Groups, num_tokens: int, in_flight_tokens: int) -> int:
    """Blocks of the pool one request of ``num_tokens`` tokens holds, over all groups."""
    return sum(blocks_per_request(fmt, num_tokens, w, in_flight_tokens) for w in groups.windows)


def engine_capacity(fmt: PageFormat, budgets: list[int], layers: list[int],
                    max_model_len: int, layer_windows: tuple[int | None, ...] | None = None,
                    in_flight_tokens: int = 0) -> EngineCapacity:
    """Blocks, tokens and concurrency for workers with ``budgets[i]`` bytes and ``layers[i]``
    layers (one entry per worker); ``layer_windows``: each layer's sliding window (None:
    every layer full attention), with ``in_flight_tokens`` scheduled per step."""
    if not budgets or len(budgets) != len(layers):
        raise ValueError("one budget and layer count per worker")
    if layer_windows is not None and len(set(layer_windows)) > 1 and len(layers) > 1:
        raise ValueError("the planner models hybrid (sliding-window + full) models on one "
                         "pipeline stage only")
    groups = Groups.of(layer_windows) if layer_windows is not None else None
    per_block = ([groups.layers_per_block * fmt.page_bytes] if groups is not None and
                 len(groups.windows) > 1 else [n * fmt.page_bytes for n in layers])
    num_blocks = max(0, min(a // p for a, p in zip(budgets, per_block)))
    per_request = (request_blocks(fmt, groups, max_model_len, in_flight_tokens)
                   if groups is not None else blocks_per_request(fmt, max_model_len))
    max_concurrency = num_blocks / per_request
    starts = all(a - p >= per_request * p for a, p in zip(budgets, per_block))
    return EngineCapacity(num_blocks, int(max_concurrency * max_model_len), max_concurrency, starts,
                          min(budgets))
