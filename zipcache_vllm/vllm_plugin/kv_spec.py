"""What vLLM's KV-cache manager allocates for a zipcache layer: pages plus staging blocks.

With paged staging (``engine/staging.py``, ``layout.StagingLayout``) the block a request
is filling is staged in its own page and in the pages of ``staging_blocks`` more blocks
allocated ahead of its tokens. :class:`ZipCacheSpec` carries that count;
:class:`ZipCacheManager` allocates the blocks with the request's own, so

* the scheduler admits, preempts and reports capacity with the staging included (no
  memory outside the KV budget, no cap on ``--max-num-seqs``);
* the worker's block table has room for them (:meth:`ZipCacheSpec.max_num_blocks_per_req`),
  and a request that cannot fit its longest sequence with them is refused at startup by
  vLLM's own check (:meth:`ZipCacheSpec.max_memory_usage_bytes`).

The blocks ahead are ordinary blocks of the request: block ``b + j`` of its table, freed
with the request, never prefix-cached before they fill (vLLM caches full blocks only), and
written packed when their turn comes. ``compat.register_kv_cache_spec`` registers each
pair.

Sliding-window layers (Gemma 2/3, Mistral-style windows) get :class:`ZipCacheSlidingSpec`:
the same pages (so every KV-cache group of a hybrid model shares one page size, as vLLM's
hybrid allocator requires, and nothing is padded back to bf16 size) and the same staging
blocks, managed by :class:`ZipCacheSlidingManager`, vLLM's sliding-window manager, which
frees the blocks that leave the window. The step never reads them
(``engine/step.py``: windowed reads).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from . import compat


class _StagedPages:
    """The staging blocks a request holds ahead, added to vLLM's per-request block count
    and memory (both zipcache specs; the field is each dataclass's ``staging_blocks``)."""

    def max_num_blocks_per_req(self, vllm_config, max_len: int) -> int:
        return super().max_num_blocks_per_req(vllm_config, max_len) + self.staging_blocks

    def max_memory_usage_bytes(self, vllm_config) -> int:
        return (super().max_memory_usage_bytes(vllm_config)
                + self.staging_blocks * self.page_size_bytes)

    def merge_staging(self, specs: list) -> dict[str, int]:
        """The staging fields of specs merged into one group: equal in every layer."""
        fields = {}
        for name in ("staging_blocks", "cache_delay_blocks"):
            values = {getattr(spec, name) for spec in specs}
            if len(values) != 1:
                raise ValueError(f"zipcache layers of one KV cache group differ in {name}: "
                                 f"{sorted(values)}")
            fields[name] = values.pop()
        return fields


@dataclass(frozen=True, kw_only=True)
class ZipCacheSpec(_StagedPages, compat.FullAttentionSpec):
    """A full-attention layer whose requests hold ``staging_blocks`` blocks ahead, and whose
    last ``cache_delay_blocks`` full blocks are not packed yet (the preset's
    ``saliency_delay``)."""

    staging_blocks: int = 0
    cache_delay_blocks: int = 0

    @classmethod
    def merge(cls, specs: list["ZipCacheSpec"]) -> "ZipCacheSpec":
        return replace(super().merge(specs), **specs[0].merge_staging(specs))


@dataclass(frozen=True, kw_only=True)
class ZipCacheSlidingSpec(_StagedPages, compat.SlidingWindowSpec):
    """A sliding-window layer in zipcache pages, whose requests hold ``staging_blocks``
    blocks ahead (at most a window plus the tokens in flight, plus those)."""

    staging_blocks: int = 0
    cache_delay_blocks: int = 0


class _StagingAhead:
    """Allocates the spec's staging blocks ahead of every request's tokens, and offers a
    block to the prefix cache only once it is packed: with a ``saliency_delay`` a full
    block stays staged (its page unwritten) until ``cache_delay_blocks`` blocks after it
    have filled, and a prefix-cache hit must never read it before then."""

    def cache_blocks(self, request, num_tokens: int, *args, **kwargs) -> None:
        delayed = self.kv_cache_spec.cache_delay_blocks * self.block_size
        super().cache_blocks(request, max(num_tokens - delayed, 0), *args, **kwargs)

    def _with_staging(self, num_tokens: int) -> int:
        return num_tokens + self.kv_cache_spec.staging_blocks * self.block_size

    def get_num_blocks_to_allocate(self, request_id, num_tokens, *args, **kwargs) -> int:
        return super().get_num_blocks_to_allocate(request_id, self._with_staging(num_tokens),
                                                  *args, **kwargs)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        return super().allocate_new_blocks(request_id, self._with_staging(num_tokens),
                                           num_tokens_main_model)


class ZipCacheManager(_StagingAhead, compat.FullAttentionManager):
    """Full attention, with the spec's staging blocks allocated ahead of every request."""


class ZipCacheSlidingManager(_StagingAhead, compat.SlidingWindowManager):
    """A sliding window (blocks that leave it are freed), with the spec's staging blocks
    allocated ahead of every request."""


__all__ = ["ZipCacheManager", "ZipCacheSlidingManager", "ZipCacheSlidingSpec", "ZipCacheSpec"]
