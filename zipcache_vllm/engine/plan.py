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
    """One request row of a step (host ints; block-id tensors int64)."""

    q_start: int
    q_len: int
    ctx: int  # tokens before this step's chunk
    slot: int  # staging slot (holds ctx % B tokens on entry)
    packed_ids: torch.Tensor  # [ctx // B] block ids of the complete pages to read
    filled_ids: torch.Tensor  # block ids of the blocks that fill in this step
    # Paged staging (empty otherwise): the page run of the block the chunk starts in, and
    # of the block it ends in when that one stays partial (StagingLayout).
    stage_ids: torch.Tensor = _NO_IDS
    tail_stage_ids: torch.Tensor = _NO_IDS


def plan_step(pool: StagingPool, block_size: int, query_start_loc: list[int],
              seq_lens: list[int], block_table: torch.Tensor) -> list[RequestPlan]:
    """Plan one step for every request row and advance the staging bookkeeping.

    A row whose chunk starts on a block boundary (new request, prefix-cache hit,
    recompute after preemption, or just the next block) takes an empty slot;
    otherwise it continues the slot of its partial block, which must hold exactly
    ``ctx % B`` tokens. Slots of rows that end on a block boundary are released
    after all rows are planned, so no row of the same step reuses them.

    With paged staging (``pool.paged``) a partial block ``b`` is staged in the pages of
    blocks ``b .. b + pages - 1`` of the row's block table: the KV-cache manager
    allocates ``pages - 1`` blocks ahead of every request, so they exist; a table too
    short for them raises :class:`StagingError`.
    """
    B = block_size
    run = pool.paged.pages if pool.paged is not None else 0
    plans, finished_slots = [], []
    for r in range(len(seq_lens)):
        q0, q_len = query_start_loc[r], query_start_loc[r + 1] - query_start_loc[r]
        if q_len <= 0:
            continue
        ctx = seq_lens[r] - q_len
        b0, s = divmod(ctx, B)
        row = block_table[r]
        first = int(row[b0])
        slot = pool.acquire(first) if s == 0 else pool.continue_block(first, s)
        n_full, tail = divmod(s + q_len, B)
        if tail:
            pool.rekey(slot, int(row[b0 + n_full]), tail)
        else:
            finished_slots.append(slot)
        plan = RequestPlan(q_start=q0, q_len=q_len, ctx=ctx, slot=slot,
                           packed_ids=row[:b0].to(torch.int64),
                           filled_ids=row[b0:b0 + n_full].to(torch.int64))
        if run:
            plan.stage_ids = _page_run(row, b0, run)
            if tail:
                plan.tail_stage_ids = _page_run(row, b0 + n_full, run)
        plans.append(plan)
    for slot in finished_slots:
        pool.release_slot(slot)
    return plans


def _page_run(row: torch.Tensor, block: int, run: int) -> torch.Tensor:
    """Block ids ``block .. block + run - 1`` of a block-table row (int64)."""
    if block + run > row.shape[0]:
        raise StagingError(
            f"block {block} is staged in {run} pages but the block table has "
            f"{row.shape[0]} columns: the KV-cache manager did not allocate the staging "
            "blocks ahead (is zipcache's KV-cache spec registered?)")
    return row[block:block + run].to(torch.int64)


@dataclass
class DecodeBatch:
    """The decode rows (one new token each) of a step, as tensors built once per step.

    kernel: the fused kernel's plan (checked once per step, run per layer): query rows,
    staging slot and staged count ``s`` of each row (the new token goes to index ``s``),
    probe (1.0 where the token scores its block) and the row's packed blocks; and, for
    the rows whose block fills with this token (``s == B - 1``), where it is packed.
    """

    kernel: DecodePlan
    full: list[int]  # indices (into the rows) of the rows whose block fills
    full_slots: torch.Tensor
    full_ids: torch.Tensor  # block id each full row's page is written to
    full_starts: list[int]  # position of each full block's first token
    full_stage_ids: torch.Tensor = _NO_IDS  # paged staging: each full row's page run

    @classmethod
    def from_plans(cls, plans: list[RequestPlan], block_size: int, policy: KVPolicy,
                   device: torch.device | str = "cpu",
                   staging: StagingLayout | None = None) -> "DecodeBatch":
        """``staging``: the pool's :class:`~zipcache_vllm.layout.StagingLayout` when its
        staging is paged (the rows' ``stage_ids`` go to the kernel), else None."""
        B, R = block_size, len(plans)
        s = [p.ctx % B for p in plans]
        b0 = [p.ctx // B for p in plans]
        if not policy.uses_attention:
            probe = [0.0] * R
        elif policy.preset.probes.strategy == "exact":
            probe = [1.0] * R
        else:
            probe = [float(probe_mask(B, policy.probes_json, b0[r] * B)[s[r]]) for r in range(R)]
        table = torch.zeros(R, max(max(b0, default=0), 1), dtype=torch.int64, device=device)
        for r, p in enumerate(plans):
            table[r, :b0[r]] = p.packed_ids
        full = [r for r in range(R) if s[r] == B - 1]

        def ints(xs: list[int]) -> torch.Tensor:
            return torch.tensor(xs, dtype=torch.int64, device=device)

        stage_ids = (torch.stack([p.stage_ids for p in plans]).to(device)
                     if staging is not None else None)
        kernel = DecodePlan.create(ints([p.q_start for p in plans]), table, ints(b0),
                                   ints([p.slot for p in plans]), ints(s),
                                   torch.tensor(probe, dtype=torch.float32, device=device), B,
                                   stage_ids, staging)
        batch = cls(kernel=kernel, full=full, full_slots=ints([plans[r].slot for r in full]),
                    full_ids=(torch.cat([plans[r].filled_ids for r in full]) if full else ints([])),
                    full_starts=[b0[r] * B for r in full])
        if staging is not None and full:
            batch.full_stage_ids = stage_ids[full]
        return batch


__all__ = ["DecodeBatch", "RequestPlan", "plan_step"]
