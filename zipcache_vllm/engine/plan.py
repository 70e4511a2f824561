"""Per-step planning, once for all layers: which staging slot each request row uses,
which pages it reads, which blocks fill; the decode rows as tensors.

The backend's metadata builder calls :func:`plan_step` (it advances the staging
bookkeeping of :class:`~zipcache_vllm.engine.staging.StagingPool`, so the layers
only move data) and :meth:`DecodeBatch.from_plans` for the one-token rows. Pure
PyTorch, no vLLM import.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import DecodePlan
from ..layout import StagingLayout
from ..policies import KVPolicy
from .saliency import probe_mask
from .staging import StagingError, StagingPool


_NO_IDS = torch.zeros(0, dtype=torch.int64)


@dataclass
class RequestPlan:
    """One request row of a step (host ints; block-id tensors int64).

    The request's staging run holds ``staged`` tokens on entry: the ``ctx % B`` of the
    block being filled, after the filled blocks that still wait to be scored by the next
    blocks' queries (a preset's ``saliency_delay``), so it starts at position
    ``ctx - staged``, a block boundary; the blocks before it are packed pages.
    """

    q_start: int
    q_len: int
    ctx: int  # tokens before this step's chunk
    slot: int  # staging slot (holds ``staged`` tokens on entry)
    packed_ids: torch.Tensor  # [(ctx - staged) // B] block ids of the complete pages to read
    filled_ids: torch.Tensor  # block ids of the blocks packed in this step, oldest first
    # Paged staging (empty otherwise): the page run of the entry's staged tokens (starting at
    # their first block), and the run of the tokens staged at the end, if any (StagingLayout).
    stage_ids: torch.Tensor = _NO_IDS
    tail_stage_ids: torch.Tensor = _NO_IDS
    staged: int = 0  # staged tokens on entry
    kept: int = 0  # of those, how many are still staged at the end


def plan_step(pool: StagingPool, block_size: int, query_start_loc: list[int],
              seq_lens: list[int], block_table: torch.Tensor) -> list[RequestPlan]:
    """Plan one step for every request row and advance the staging bookkeeping.

    A row continues the staging run of its request: the slot keyed by the run's first
    block, which must hold the request's staged tokens as of ``ctx`` (``ctx % B`` of the
    block being filled, and with a ``saliency_delay`` the filled blocks that wait, found
    by :meth:`StagingPool.find_run`). A row whose chunk starts on a block boundary with no
    run (new request, prefix-cache hit, recompute after preemption, or the next block
    without a delay) takes an empty slot. A block is packed once ``pool.blocks - 1``
    blocks after it have filled; the run then starts at the next block. Slots of rows that
    end with nothing staged are released after all rows are planned, so no row of the same
    step reuses them.

    With paged staging (``pool.paged``) a run starting at block ``b`` is staged in the
    pages of blocks ``b .. b + pages - 1`` of the row's block table: the KV-cache manager
    allocates ``pages - 1`` blocks ahead of every request, so they exist; a table too
    short for them raises :class:`StagingError`.
    """
    B = block_size
    run = pool.paged.pages if pool.paged is not None else 0
    delay = pool.blocks - 1
    plans, finished_slots = [], []
    for r in range(len(seq_lens)):
        q0, q_len = query_start_loc[r], query_start_loc[r + 1] - query_start_loc[r]
        if q_len <= 0:
            continue
        ctx = seq_lens[r] - q_len
        b0, s = divmod(ctx, B)
        row = block_table[r]
        found = pool.find_run(row, ctx) if delay else None
        if found is not None:
            slot, staged = found
        else:
            staged = s
            first = int(row[b0])
            slot = pool.acquire(first) if s == 0 else pool.continue_block(first, s)
        start = b0 - (staged - s) // B  # the run's first block
        total = staged + q_len
        n_pack = max(total // B - delay, 0)
        left = total - n_pack * B
        if left:
            pool.rekey(slot, int(row[start + n_pack]), left, ctx + q_len)
        else:
            finished_slots.append(slot)
        plan = RequestPlan(q_start=q0, q_len=q_len, ctx=ctx, slot=slot,
                           packed_ids=row[:start].to(torch.int64),
                           filled_ids=row[start:start + n_pack].to(torch.int64),
                           staged=staged, kept=max(staged - n_pack * B, 0))
        if run:
            T = pool.paged.tokens_per_page
            # the entry run holds what the step stages into it (a decode token) at most
            plan.stage_ids = _page_run(row, start, run, -(-min(total, pool.capacity) // T))
            if left:
                plan.tail_stage_ids = _page_run(row, start + n_pack, run, -(-left // T))
        plans.append(plan)
    for slot in finished_slots:
        pool.release_slot(slot)
    return plans


def _page_run(row: torch.Tensor, block: int, run: int, used: int) -> torch.Tensor:
    """Block ids ``block .. block + run - 1`` of a block-table row (int64), of which the
    first ``used`` hold the run's tokens: the KV-cache manager allocates those
    (``StagingLayout.lookahead_blocks``); the rest, which a run of fewer tokens than its
    capacity never writes, may not be allocated yet and stand for its first page."""
    if block + used > row.shape[0]:
        raise StagingError(
            f"block {block} is staged in {used} pages but the block table has "
            f"{row.shape[0]} columns: the KV-cache manager did not allocate the staging "
            "blocks ahead (is zipcache's KV-cache spec registered?)")
    ids = row[block:block + run].to(torch.int64)
    if ids.shape[0] < run or used < run:
        ids = torch.cat([ids[:used], ids[:1].expand(run - used)])
    return ids


@dataclass
class DecodeBatch:
    """The decode rows (one new token each) of a step, as tensors built once per step.

    kernel: the fused kernel's plan (checked once per step, run per layer): query rows,
    staging slot and staged count ``s`` of each row (the new token goes to index ``s``),
    probe (1.0 where the token scores the staged tokens) and the row's packed blocks; and,
    for the rows whose oldest staged block is packed after this token (its run is full:
    ``s == capacity - 1``), where it is packed.
    """

    kernel: DecodePlan
    full: list[int]  # indices (into the rows) of the rows that pack a block
    full_slots: torch.Tensor
    full_ids: torch.Tensor  # block id each full row's page is written to
    full_starts: list[int]  # position of each packed block's first token
    full_stage_ids: torch.Tensor = _NO_IDS  # paged staging: each full row's page run
    next_stage_ids: torch.Tensor = _NO_IDS  # paged staging with a delay: each one's next run

    @classmethod
    def from_plans(cls, plans: list[RequestPlan], block_size: int, policy: KVPolicy,
                   device: torch.device | str = "cpu",
                   staging: StagingLayout | None = None) -> "DecodeBatch":
        """``staging``: the pool's :class:`~zipcache_vllm.layout.StagingLayout` when its
        staging is paged (the rows' ``stage_ids`` go to the kernel), else None."""
        B, R = block_size, len(plans)
        s = [p.staged for p in plans]
        b0 = [p.ctx // B for p in plans]
        packed = [(p.ctx - p.staged) // B for p in plans]
        if not policy.uses_attention:
            probe = [0.0] * R
        elif policy.preset.probes.strategy == "exact":
            probe = [1.0] * R
        else:
            probe = [float(probe_mask(B, policy.probes_json, b0[r] * B)[plans[r].ctx % B])
                     for r in range(R)]
        table = torch.zeros(R, max(max(packed, default=0), 1), dtype=torch.int64, device=device)
        for r, p in enumerate(plans):
            table[r, :packed[r]] = p.packed_ids
        full = [r for r in range(R) if plans[r].filled_ids.numel()]

        def ints(xs: list[int]) -> torch.Tensor:
            return torch.tensor(xs, dtype=torch.int64, device=device)

        stage_ids = (torch.stack([p.stage_ids for p in plans]).to(device)
                     if staging is not None else None)
        kernel = DecodePlan.create(ints([p.q_start for p in plans]), table, ints(packed),
                                   ints([p.slot for p in plans]), ints(s),
                                   torch.tensor(probe, dtype=torch.float32, device=device), B,
                                   stage_ids, staging, capacity=B * policy.staged_blocks)
        batch = cls(kernel=kernel, full=full, full_slots=ints([plans[r].slot for r in full]),
                    full_ids=(torch.cat([plans[r].filled_ids for r in full]) if full else ints([])),
                    full_starts=[packed[r] * B for r in full])
        if staging is not None and full:
            batch.full_stage_ids = stage_ids[full]
            if policy.saliency_delay:
                batch.next_stage_ids = torch.stack([plans[r].tail_stage_ids for r in full]).to(device)
        return batch


__all__ = ["DecodeBatch", "RequestPlan", "plan_step"]
