"""The staging pool: each request's newest, partially filled block in full precision,
and the filled blocks that wait to be scored by the next blocks' queries.

vLLM allocates a page for the partial block like for any block, but a zipcache
page can only be written once the block is full (its quantization needs all B
tokens and their saliency), and with a preset's ``saliency_delay`` of ``d`` only once
the ``d`` blocks after it have filled too (their probe rows score it). Until then the
blocks' K/V live in staging, a run of up to ``C = (1 + d) * B`` tokens per request, in
the model dtype or in 8 bits per element (the preset's ``staging_bits``, paged only),
with their saliency accumulators. Two storages, one bookkeeping:

* **paged** (the engine's): inside vLLM's own cache, in the pages of the run's oldest
  block and of the ``pages - 1`` blocks after it, which the KV-cache manager allocates
  ahead of each request (:class:`~zipcache_vllm.layout.StagingLayout`). Staging then
  costs nothing for requests that are not running, and vLLM's scheduler sees (and
  preempts for) what a running request holds.
* **dense** (the simulator's and the tests'): pool tensors of their own::

    k, v   [L, S, H, C, D]  model dtype      L layers, S slots, H KV heads
    score  [L, S, H, C]     float32          sum of (probe) attention probabilities
    count  [L, S, C]        float32          (probe) queries that saw the token

A slot is keyed by the vLLM block id of the run's oldest block (staged blocks are never
shared by prefix caching: a block is cached once it is packed), with the tokens it
stages and the request's length as of the planned step. The bookkeeping (which slot
holds which run, how many tokens) is advanced once per step by the metadata builder,
before any layer runs; the layers only move data. Slots come back when nothing is left
staged, when the request finishes or is aborted, and when it is preempted. A paged slot
is only a key (policies with per-request state, FastGen, index theirs by it); its
bytes are the pages named by the step's plan.

A pool belongs to one engine's worker (held by the backend's ``ZipCacheEngine``), with
its slots and its request lifecycle bookkeeping: two engines in one process keep
separate pools.

No vLLM import: the backend's metadata builder advances the bookkeeping through
:func:`~zipcache_vllm.engine.plan.plan_step`; vLLM's model runner reports finished,
preempted and resumed requests to the engine's pool (``compat.patch_request_lifecycle``
calls :meth:`StagingPool.on_request_removed` and the two methods beside it).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..kernels import gather_staged, move_staged, scatter_staged
from ..layout import StagingLayout

MARGIN = 1  # one spare slot: a request re-keyed in the step it finishes never blocks a new one


@dataclass
class StagedBlock:
    """The staged part of a request's current block (views into the pool, or test tensors).

    k, v: ``[H, B, D]``; score: ``[H, B]``; count: ``[B]``. Only the first ``s``
    tokens are meaningful on entry.
    """

    k: torch.Tensor
    v: torch.Tensor
    score: torch.Tensor
    count: torch.Tensor


class StagingError(RuntimeError):
    """The staging bookkeeping disagrees with what vLLM scheduled."""


class StagingPool:
    """Full-precision partial blocks of all running requests, for all layers."""

    def __init__(self, layer_names: list[str], num_slots: int, block_size: int,
                 num_kv_heads: int, head_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", paged: StagingLayout | None = None,
                 blocks: int = 1) -> None:
        """``blocks``: blocks a request stages at most (``policy.staged_blocks``: 1 plus the
        preset's ``saliency_delay``); with paged staging, the layout's own ``blocks``."""
        L, S, H, B, D = len(layer_names), num_slots, num_kv_heads, block_size, head_size
        self.layer_index = {name: i for i, name in enumerate(layer_names)}
        self.num_slots, self.block_size = S, B
        self.num_kv_heads, self.head_size, self.dtype = H, D, dtype
        self.paged = paged
        if paged is not None:
            elt = torch.empty((), dtype=dtype).element_size()
            if (paged.block_size, paged.num_kv_heads, paged.head_size, paged.elt_bytes,
                    paged.blocks) != (B, H, D, elt, blocks):
                raise ValueError(f"staging layout {paged} does not match B={B}, H={H}, D={D}, "
                                 f"{dtype}, {blocks} staged blocks")
            self.k = self.v = self.score = self.count = None
            self.layers: list[tuple[torch.Tensor, ...]] = []
        else:
            C = blocks * B
            self.k = torch.zeros(L, S, H, C, D, dtype=dtype, device=device)
            self.v = torch.zeros(L, S, H, C, D, dtype=dtype, device=device)
            self.score = torch.zeros(L, S, H, C, dtype=torch.float32, device=device)
            self.count = torch.zeros(L, S, C, dtype=torch.float32, device=device)
            # Per-layer views (k, v, score, count), made once: the decode step passes them to
            # its kernel for every layer of every step.
            self.layers = [(self.k[i], self.v[i], self.score[i], self.count[i]) for i in range(L)]
        self._free = list(range(S - 1, -1, -1))
        self._slot_of_block: dict[int, int] = {}
        self._block_of_slot: list[int] = [-1] * S
        self.blocks = blocks
        self.fill: list[int] = [0] * S  # staged tokens per slot, as of the end of the planned step
        self.end: list[int] = [0] * S  # the request's tokens, as of the end of the planned step
        self._released_on_preemption: set[str] = set()  # request ids, see on_request_preempted

    @property
    def nbytes(self) -> int:
        """Bytes of the pool's own tensors (0 when paged: its bytes are vLLM's pages)."""
        if self.paged is not None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.score, self.count))

    @property
    def capacity(self) -> int:
        """Tokens a slot stages at most (``blocks * block_size``)."""
        return self.blocks * self.block_size

    @property
    def in_use(self) -> int:
        return self.num_slots - len(self._free)

    def matches(self, layer_names: Iterable[str], block_size: int, num_kv_heads: int,
                head_size: int, dtype: torch.dtype) -> bool:
        return (set(layer_names) <= set(self.layer_index) and block_size == self.block_size
                and num_kv_heads == self.num_kv_heads and head_size == self.head_size
                and dtype == self.dtype)

    # -- bookkeeping, called by the metadata builder once per step ---------------

    def slot_of(self, block_id: int) -> int | None:
        return self._slot_of_block.get(block_id)

    def acquire(self, block_id: int) -> int:
        """A slot for a block that starts empty this step (a stale owner is reset)."""
        slot = self._slot_of_block.get(block_id)
        if slot is None:
            if not self._free:
                raise StagingError(
                    f"all {self.num_slots} zipcache staging slots are in use; a request ended "
                    "without its slot being released (this is a bug), or --max-num-seqs was "
                    "raised after the pool was sized")
            slot = self._free.pop()
            self._slot_of_block[block_id] = slot
            self._block_of_slot[slot] = block_id
        self.fill[slot] = self.end[slot] = 0
        return slot

    def continue_block(self, block_id: int, staged: int) -> int:
        """The slot of a block that already holds ``staged`` tokens."""
        slot = self._slot_of_block.get(block_id)
        if slot is None or self.fill[slot] != staged:
            have = None if slot is None else self.fill[slot]
            raise StagingError(
                f"block {block_id} should hold {staged} staged tokens but the pool has {have}")
        return slot

    def find_run(self, row: torch.Tensor, ctx: int) -> tuple[int, int] | None:
        """``(slot, staged tokens)`` of a request whose staging run holds filled blocks that
        wait (``blocks > 1``): the slot keyed by the oldest staged block, ``k`` blocks before
        block ``ctx // B`` of its block-table ``row``, that staged ``ctx % B + k * B`` tokens
        when the request had ``ctx`` tokens; None if there is none (a new run)."""
        B = self.block_size
        b0, s = divmod(ctx, B)
        for k in range(1, min(self.blocks - 1, b0) + 1):
            slot = self._slot_of_block.get(int(row[b0 - k]))
            if slot is not None and self.end[slot] == ctx and self.fill[slot] == s + k * B:
                return slot, s + k * B
        return None

    def rekey(self, slot: int, block_id: int, fill: int, end: int = 0) -> None:
        """The slot now stages a run that starts at ``block_id`` and holds ``fill`` tokens, the
        last of them the request's token ``end - 1`` (the request moved on to a new block)."""
        old = self._block_of_slot[slot]
        if old != block_id:
            self._slot_of_block.pop(old, None)
            stale = self._slot_of_block.get(block_id)
            if stale is not None and stale != slot:  # a leftover of a preempted owner
                self._release_slot(stale)
            self._slot_of_block[block_id] = slot
            self._block_of_slot[slot] = block_id
        self.fill[slot] = fill
        self.end[slot] = end

    # -- data, called by the layers ---------------------------------------------

    def staged(self, layer: int, plan, pages: torch.Tensor) -> StagedBlock:
        """The staged tokens of ``plan``'s request on entry (its first ``plan.staged`` are
        meaningful): views of its slot, or a copy of its page run (``plan.stage_ids``)
        of ``pages`` (the layer's cache) when paged."""
        if self.paged is None:
            slot = plan.slot
            return StagedBlock(self.k[layer, slot], self.v[layer, slot], self.score[layer, slot],
                               self.count[layer, slot])
        if plan.staged == 0:  # nothing staged: nothing to read
            H, D = self.num_kv_heads, self.head_size
            return StagedBlock(pages.new_empty(H, 0, D, dtype=self.dtype),
                               pages.new_empty(H, 0, D, dtype=self.dtype),
                               pages.new_empty(H, 0, dtype=torch.float32),
                               pages.new_empty(0, dtype=torch.float32))
        k, v, score, count = gather_staged(pages, plan.stage_ids.unsqueeze(0), self.paged,
                                           self._gather_dtype)
        return StagedBlock(k[0], v[0], score[0], count[0])

    @property
    def _gather_dtype(self) -> torch.dtype:
        """8-bit staging reads back in float32 (what the decode step attends); else the
        model dtype."""
        return torch.float32 if self.paged is not None and self.paged.kv_bits == 8 else self.dtype

    def store_tail(self, layer: int, plan, res, pages: torch.Tensor,
                   exact: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Write a step result's new partial block (``res.tail_*``, ``res.tail_len`` tokens,
        maybe none) for ``plan``'s request: into its slot of ``layer``, or into the page run
        of its last block (``plan.tail_stage_ids``) of ``pages`` when paged. ``exact``: the
        chunk's own K and V (float32 ``[H, q, D]``) before 8-bit rounding, what 8-bit staging
        quantizes the chunk's new tail tokens from (``res.tail_*`` hold their rounding)."""
        t = res.tail_len
        if not t:
            return
        if self.paged is not None:
            # tokens staged before this chunk that stay staged keep their bytes (8-bit
            # staging would otherwise round them a second time): in place, or moved by
            # :meth:`keep_staged` when the run moved on
            kv_from = plan.kept
            if self.paged.kv_bits == 8:
                k, v = res.tail_k, res.tail_v
                if exact is not None:  # the new tail tokens are the chunk's last ones
                    k, v = k.clone(), v.clone()
                    k[:, kv_from:] = exact[0][:, plan.q_len - (t - kv_from):]
                    v[:, kv_from:] = exact[1][:, plan.q_len - (t - kv_from):]
            else:
                k, v = res.tail_k.to(self.dtype), res.tail_v.to(self.dtype)
            scatter_staged(pages, plan.tail_stage_ids.unsqueeze(0), self.paged,
                           k.unsqueeze(0), v.unsqueeze(0), res.tail_score.unsqueeze(0),
                           res.tail_count.unsqueeze(0), kv_from=kv_from)
            return
        slot = plan.slot
        self.k[layer, slot, :, :t] = res.tail_k.to(self.dtype)
        self.v[layer, slot, :, :t] = res.tail_v.to(self.dtype)
        self.score[layer, slot, :, :t] = res.tail_score
        self.count[layer, slot, :t] = res.tail_count

    def keep_staged(self, plan, pages: torch.Tensor) -> None:
        """Paged staging, before a chunk packs its first block: move the staged tokens that
        stay staged (``plan.kept``, after the ``plan.staged - plan.kept`` that get packed)
        from the entry run (``plan.stage_ids``) to the front of the exit run
        (``plan.tail_stage_ids``), their bytes as they are."""
        if self.paged is not None and plan.kept and plan.filled_ids.numel():
            move_staged(pages, plan.stage_ids.unsqueeze(0), plan.tail_stage_ids.unsqueeze(0),
                        self.paged, plan.staged - plan.kept, plan.kept)

    def full_blocks(self, layer: int, batch, pages: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``k, v [n, H, B, D]``, ``score [n, H, B]``, ``count [n, B]`` of the oldest staged
        block of a decode batch's rows whose run filled this step (``batch.full_slots``, or
        ``batch.full_stage_ids`` when paged), after the step's kernel staged their last
        token; then the rest of each such run moves to the front of its next run (its next
        slot contents, or ``batch.next_stage_ids`` when paged) for the steps after."""
        B = self.block_size
        if self.paged is not None:
            k, v, score, count = gather_staged(pages, batch.full_stage_ids, self.paged,
                                               self._gather_dtype)
            if self.blocks > 1:
                move_staged(pages, batch.full_stage_ids, batch.next_stage_ids, self.paged, B,
                            self.capacity - B)
            return k[:, :, :B], v[:, :, :B], score[:, :, :B], count[:, :B]
        fs = batch.full_slots
        # the oldest block only (index_select copies; a delay's later blocks stay put)
        out = (self.k[layer][:, :, :B].index_select(0, fs), self.v[layer][:, :, :B].index_select(0, fs),
               self.score[layer][:, :, :B].index_select(0, fs), self.count[layer][:, :B].index_select(0, fs))
        if self.blocks > 1:
            for t in (self.k[layer], self.v[layer], self.score[layer]):
                t[fs, :, :-B] = t[fs, :, B:]
            self.count[layer][fs, :-B] = self.count[layer][fs, B:]
        return out

    def release_slot(self, slot: int) -> None:
        if self._block_of_slot[slot] != -1:
            self._release_slot(slot)

    def _release_slot(self, slot: int) -> None:
        self._slot_of_block.pop(self._block_of_slot[slot], None)
        self._block_of_slot[slot] = -1
        self.fill[slot] = self.end[slot] = 0
        self._free.append(slot)

    def release_blocks(self, block_ids: Iterable[int]) -> None:
        """Free the slots staging any of ``block_ids`` (request finished or preempted)."""
        for block_id in block_ids:
            slot = self._slot_of_block.get(int(block_id))
            if slot is not None:
                self._release_slot(slot)

    # -- request lifecycle, reported by vLLM's model runner -----------------------
    # A request's slots are released exactly once, keyed by the block ids it held: a
    # preempted request loses its blocks at once and they may be reallocated to another
    # request, so its old ids must not be released again later (that would free the new
    # owner's slot) when it resumes or finishes while waiting.

    @property
    def preempted_pending(self) -> int:
        """Preempted requests whose slots were released and that have not resumed or ended."""
        return len(self._released_on_preemption)

    def release_request(self, req_state: object) -> None:
        """Free the slots of a request's blocks (``req_state.block_ids``: one list of block
        ids per KV cache group, as in the runner's request state)."""
        for group in getattr(req_state, "block_ids", ()) or ():
            self.release_blocks(group)

    def on_request_preempted(self, req_id: str, req_state: object) -> None:
        """Preempted: vLLM takes its blocks back now, so its slots are released now."""
        if req_id not in self._released_on_preemption:
            self.release_request(req_state)
            self._released_on_preemption.add(req_id)

    def on_request_resumed(self, req_id: str, req_state: object) -> None:
        """Resumed after preemption (its old block ids are still in ``req_state``)."""
        if req_id in self._released_on_preemption:
            self._released_on_preemption.discard(req_id)
        else:  # forced preemption (e.g. reset_prefix_cache) comes without a preempted notice
            self.release_request(req_state)

    def on_request_removed(self, req_id: str, req_state: object) -> None:
        """Finished or aborted (running, or waiting after a preemption)."""
        if req_id in self._released_on_preemption:
            self._released_on_preemption.discard(req_id)
        else:
            self.release_request(req_state)
