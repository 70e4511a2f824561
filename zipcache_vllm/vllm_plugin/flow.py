"""One request's step for one layer: attend, score, quantize full blocks, stage the tail.

Pure PyTorch, no vLLM import: ``backend.py`` calls :func:`run_request_step` for
every request row of a step, and ``tests/test_backend_ref.py`` calls it directly
against an explicit dense reference.

Positions of one request in a step (``B`` tokens per block)::

    0 .............. b0*B ........ ctx ............... seq_len
    | packed pages   | staged (s)  | this step's chunk (q) |
    |  (vLLM cache)  |  (staging)  |  (new K/V)            |
                     \\_____ local window: full precision ___/

    b0 = ctx // B   s = ctx % B   q = seq_len - ctx

* Attention: every query of the chunk attends over the packed blocks (the C++
  kernels of ``zipcache_vllm.kernels`` dequantize inside the kernel; their PyTorch
  fallback dequantizes a bounded group of pages at a time), then over the local
  window (causal), merged by log-sum-exp. Per-query log-sum-exp is kept.
* Saliency: a token of the local window is scored by the queries of its own
  block only (``exp(q.k * scale - lse)``, summed over the query heads of its KV
  group), optionally only by probe rows chosen from the position. A block's
  quantization is therefore a function of its own tokens and its prefix.
* Every block that fills in this step is quantized (block-local top-k salient
  tokens) into its page; the partial tail (if any) goes back to staging.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

from ..config import Preset, ProbeConfig
from ..layout import BlockLayout
from ..kernels import (DecodePlan, attend_packed, dequantize_pages, hadamard_rotate, quantize_pack,
                       uses_triton)
from ..quant.block import topk_salient_mask
from ..saliency.scores import probe_rows
from .staging import StagingPool

QUERY_TILE = 256  # query rows per score tile
KEY_TILE = 1024  # local-window keys per score tile


@dataclass(frozen=True)
class SaliencyRule:
    """How the tokens of a block are ranked (from the preset)."""

    source: str  # "normalized" | "accumulated" | "random"
    probes: ProbeConfig
    n_hi: int

    @classmethod
    def from_preset(cls, preset: Preset) -> "SaliencyRule":
        return cls(source=preset.saliency_source, probes=preset.probes, n_hi=preset.n_salient)

    @cached_property
    def probes_json(self) -> str:
        """The probe config as the key of :func:`_probe_mask` (dumped once per rule, not per block)."""
        return self.probes.model_dump_json()


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


@dataclass
class StepResult:
    """What a request's step writes back.

    out_grouped: ``[H, g, q, D]`` float32 attention output (``out``: as ``[q, Hq, D]``);
    lse: ``[Hq, q]``.
    pages: uint8 ``[n_full, page_bytes]`` for the blocks that filled (in order).
    tail_*: the new partial block (``tail_len`` tokens, may be 0).
    """

    out_grouped: torch.Tensor
    lse: torch.Tensor
    pages: torch.Tensor
    tail_len: int
    tail_k: torch.Tensor
    tail_v: torch.Tensor
    tail_score: torch.Tensor
    tail_count: torch.Tensor

    @property
    def out(self) -> torch.Tensor:
        H, g, q, D = self.out_grouped.shape
        return self.out_grouped.permute(2, 0, 1, 3).reshape(q, H * g, D)


class _OnlineSoftmax:
    """Running max / sum / weighted values for queries ``[H, g, q, D]`` (float32)."""

    def __init__(self, qs: torch.Tensor) -> None:
        H, g, q, D = qs.shape
        self.qs = qs
        self.m = torch.full((H, g, q), float("-inf"))
        self.l = torch.zeros(H, g, q)
        self.acc = torch.zeros(H, g, q, D)

    def seed(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        """Start from a finished partial attention ``out [H, g, q, D]``, ``lse [H, g, q]``
        (``lse = -inf`` and ``out = 0`` where it saw no key)."""
        self.m = lse.clone()
        self.l = torch.ones_like(lse)
        self.acc = out.contiguous()

    def update(self, k: torch.Tensor, v: torch.Tensor, rows: slice,
               mask: torch.Tensor | None = None) -> None:
        """Fold keys/values ``[H, T, D]`` into query rows ``rows``; ``mask [r, T]`` True = visible."""
        s = torch.einsum("hgqd,htd->hgqt", self.qs[:, :, rows], k)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        m_old = self.m[:, :, rows]
        m_new = torch.maximum(m_old, s.amax(-1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - m_safe.unsqueeze(-1))
        alpha = torch.exp(m_old - m_safe)
        self.l[:, :, rows] = self.l[:, :, rows] * alpha + p.sum(-1)
        self.acc[:, :, rows] = self.acc[:, :, rows] * alpha.unsqueeze(-1) + torch.einsum(
            "hgqt,htd->hgqd", p, v)
        self.m[:, :, rows] = m_new

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.acc / self.l.unsqueeze(-1), self.m + torch.log(self.l)


@lru_cache(maxsize=4096)
def _probe_mask(block_size: int, probes_json: str, block_start: int) -> torch.Tensor:
    """bool ``[B]``: which positions of the block starting at ``block_start`` are probe rows
    (``probes_json``: :attr:`SaliencyRule.probes_json`).

    A function of the position only, so a block's probes do not depend on how its
    tokens were split into steps.
    """
    mask = torch.zeros(block_size, dtype=torch.bool, device="cpu")
    mask[probe_rows(block_size, ProbeConfig.model_validate_json(probes_json), seed=block_start)] = True
    return mask


def _random_scores(num_kv_heads: int, block_size: int, seed: int, block_start: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + block_start) % (2 ** 63))
    return torch.rand(num_kv_heads, block_size, generator=gen, device="cpu")


def block_scores(score: torch.Tensor, count: torch.Tensor, rule: SaliencyRule,
                 block_starts: list[int]) -> torch.Tensor:
    """Ranking scores ``[n, H, B]`` of full blocks from their accumulators.

    score ``[n, H, B]`` (sum of probe attention), count ``[n, B]`` (probe rows that saw
    the token); ``block_starts``: the position of each block's first token.
    """
    n, H, B = score.shape
    if rule.source == "accumulated":
        return score
    if rule.source == "random":
        return torch.stack([_random_scores(H, B, rule.probes.seed, p)
                            for p in block_starts]).to(score.device)
    if rule.probes.normalize == "l_minus_i":
        denom = torch.arange(B, 0, -1, dtype=torch.float32).expand(n, B)
    else:
        denom = count
    return score / denom.clamp_min(1.0).unsqueeze(1)


def _block_saliency(qs: torch.Tensor, kw: torch.Tensor, lse: torch.Tensor, s: int,
                    first_block_start: int, block_size: int, rule: SaliencyRule
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulators of the local window's blocks from this step's queries.

    qs ``[H, g, q, D]`` scaled queries, kw ``[H, Lw, D]`` local keys (Lw = s + q),
    lse ``[H, g, q]``. Returns score ``[nb, H, B]`` and count ``[nb, B]`` for the
    ``nb = ceil(Lw / B)`` local blocks (zero past the window). Only the query rows
    that fall in a block (and are probes, unless ``exact``) score its tokens.
    """
    H, g, q, D = qs.shape
    B, Lw = block_size, kw.shape[1]
    nb = -(-Lw // B)
    score = torch.zeros(nb, H, B)
    count = torch.zeros(nb, B)
    if rule.source == "random":
        return score, count  # ranks come from the position only
    probes = None if rule.probes.strategy == "exact" else rule.probes_json
    for c in range(nb):
        lo, hi = c * B, min((c + 1) * B, Lw)  # local key range of block c
        r0, r1 = max(lo - s, 0), hi - s  # query rows (chunk index) inside block c
        if r1 <= r0:
            continue
        rows, hidden, seen = _scoring_rows(B, probes, first_block_start + lo, lo - s, r0, r1, hi - lo)
        if rows.numel() == 0:
            continue
        logits = torch.einsum("hgrd,hkd->hgrk", qs[:, :, rows], kw[:, lo:hi])
        p = logits.sub_(lse[:, :, rows].unsqueeze(-1)).exp_().masked_fill_(hidden, 0.0)
        score[c, :, :hi - lo] = p.sum(dim=(1, 2))
        count[c, :hi - lo] = seen
    return score, count


@lru_cache(maxsize=1024)
def _scoring_rows(block_size: int, probes_json: str | None, block_start: int, row_of_first: int,
                  r0: int, r1: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query rows that score a block, as a function of positions only (cached).

    The block starts at position ``block_start``, which is chunk row ``row_of_first``;
    rows ``r0 .. r1 - 1`` of the chunk fall inside it and ``width`` of its tokens are in
    the window. Returns the scoring rows (probes of the block, or all with
    ``probes_json=None``), ``hidden [r, width]`` (True where a token is in the row's
    future) and ``seen [width]`` (how many scoring rows see each token, float32).
    """
    rows = torch.arange(r0, r1)
    if probes_json is not None:
        probe = _probe_mask(block_size, probes_json, block_start)
        rows = rows[probe[rows - row_of_first]]
    qpos = rows - row_of_first  # position of each scoring row inside the block
    visible = torch.arange(width).unsqueeze(0) <= qpos.unsqueeze(1)
    return rows, ~visible, visible.sum(0).float()


def local_window(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, ctx: int,
                 packed_ids: torch.Tensor, staged: StagedBlock, block_size: int,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scaled queries ``[H, g, q, D]`` and the float32 local window ``kw, vw [H, s + q, D]``
    (the ``s = ctx % B`` staged tokens, then the chunk) of a request's step; checks that
    ``packed_ids`` lists the ``ctx // B`` complete blocks."""
    b0 = ctx // block_size
    if packed_ids.numel() != b0:
        raise ValueError(f"expected {b0} packed block ids, got {packed_ids.numel()}")
    kw, vw = _window(k_new.transpose(0, 1), v_new.transpose(0, 1), staged, ctx % block_size)
    return scaled_queries(q, k_new.shape[1], scale), kw, vw


def scaled_queries(q: torch.Tensor, num_kv_heads: int, scale: float) -> torch.Tensor:
    """``q [n, Hq, D]`` times ``scale`` as float32 ``[H, g, n, D]`` (the query heads of each
    KV head together)."""
    n, Hq, D = q.shape
    g = Hq // num_kv_heads
    qs = torch.empty(num_kv_heads, g, n, D, dtype=torch.float32, device=q.device)
    return qs.copy_(q.reshape(n, num_kv_heads, g, D).permute(1, 2, 0, 3)).mul_(scale)


def _window(k_new: torch.Tensor, v_new: torch.Tensor, staged: StagedBlock,
            s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``kw, vw [H, s + q, D]``: the first ``s`` staged tokens, then the chunk's
    (``k_new, v_new [H, q, D]``; returned as they are when nothing is staged)."""
    if not s:
        return k_new.float(), v_new.float()
    kw = torch.cat([staged.k[:, :s].float(), k_new.float()], dim=1)
    vw = torch.cat([staged.v[:, :s].float(), v_new.float()], dim=1)
    return kw, vw


def run_request_step(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                     ctx: int, packed_ids: torch.Tensor, pages: torch.Tensor,
                     staged: StagedBlock, layout: BlockLayout, rule: SaliencyRule,
                     scale: float) -> StepResult:
    """One request's attention step over packed pages + staging + its own chunk.

    Args:
        q: ``[q, Hq, D]`` queries of the chunk (positions ``ctx .. ctx+q-1``).
        k_new, v_new: ``[q, H, D]`` the chunk's keys (after RoPE) and values.
        ctx: tokens before the chunk; ``ctx % B`` of them are staged.
        packed_ids: int64 ``[ctx // B]`` block ids of the complete blocks, in order.
        pages: uint8 ``[num_blocks, page_bytes]`` the layer's cache.
        staged: the request's staging block (first ``ctx % B`` tokens valid).
        layout: page layout; rule: saliency rule; scale: softmax scale.
    """
    qs, kw, vw = local_window(q, k_new, v_new, ctx, packed_ids, staged, layout.block_size, scale)
    # (a1) complete packed blocks: dequantized inside the kernel (C++ on CPU, or the
    # PyTorch reference a bounded group of pages at a time), merged below by LSE.
    prior = _packed_part(q, pages, packed_ids, layout, scale)
    return _step(qs, kw, vw, ctx, prior, staged, layout, rule)


def _packed_part(q: torch.Tensor, pages: torch.Tensor, packed_ids: torch.Tensor,
                 layout: BlockLayout, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Attention of ``q [n, Hq, D]`` over the packed blocks ``packed_ids`` (None if there
    are none), regrouped as ``out [H, g, n, D]``, ``lse [H, g, n]`` like the scaled queries."""
    if not packed_ids.numel():
        return None
    out, lse = attend_packed(q, pages, packed_ids, layout, scale)
    n, Hq, D = out.shape
    H = layout.num_kv_heads
    return (out.float().reshape(n, H, Hq // H, D).permute(1, 2, 0, 3),
            lse.reshape(H, Hq // H, n))


def _step(qs: torch.Tensor, kw: torch.Tensor, vw: torch.Tensor, ctx: int,
          prior: tuple[torch.Tensor, torch.Tensor] | None, staged: StagedBlock,
          layout: BlockLayout, rule: SaliencyRule) -> StepResult:
    """The step after the packed part: local window (causal), merged with ``prior`` (the
    packed part, grouped), saliency, quantization of the blocks that fill, the tail.

    qs ``[H, g, q, D]`` scaled queries, kw/vw ``[H, s + q, D]`` the local window.
    """
    H, g, ql, D = qs.shape
    B = layout.block_size
    s, b0 = ctx % B, ctx // B
    Lw = s + ql
    if Lw <= B:  # one local block (every chunk of _apply_chunk, every one-token step)
        out, lse, score, count = _one_block(qs, kw, vw, s, prior, rule, b0 * B, B)
    else:
        out, lse = _tiled_attention(qs, kw, vw, s, prior)
        # (b) saliency of the local window's blocks from the queries of the same block.
        score, count = _block_saliency(qs, kw, lse, s, b0 * B, B, rule)
    if s:  # only the first s entries of a slot are meaningful (the rest is stale)
        score[0, :, :s] += staged.score[:, :s].float()
        count[0, :s] += staged.count[:s].float()
    n_full = Lw // B
    tail = Lw - n_full * B

    # (c) quantize every block that filled in this step.
    if n_full:
        kf = kw[:, :n_full * B].reshape(H, n_full, B, D).permute(1, 2, 0, 3)  # [n, B, H, D] views
        vf = vw[:, :n_full * B].reshape(H, n_full, B, D).permute(1, 2, 0, 3)
        starts = [(b0 + c) * B for c in range(n_full)]
        ranks = block_scores(score[:n_full], count[:n_full], rule, starts)
        salient = topk_salient_mask(ranks, layout.n_hi)
        new_pages = quantize_pack(kf, vf, salient, layout)
    else:
        new_pages = torch.zeros(0, layout.page_bytes, dtype=torch.uint8)

    # (d) the partial tail goes (back) to staging.
    t0 = n_full * B
    return StepResult(
        out_grouped=out,
        lse=lse.reshape(H * g, ql),
        pages=new_pages,
        tail_len=tail,
        tail_k=kw[:, t0:Lw],
        tail_v=vw[:, t0:Lw],
        tail_score=score[n_full, :, :tail] if tail else score.new_zeros(H, 0),
        tail_count=count[n_full, :tail] if tail else count.new_zeros(0),
    )


def _one_block(qs: torch.Tensor, kw: torch.Tensor, vw: torch.Tensor, s: int,
               prior: tuple[torch.Tensor, torch.Tensor] | None, rule: SaliencyRule,
               block_start: int, block_size: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention and saliency when the local window is one block (``s + q <= B``): one
    causal attention per KV head over the window, merged with ``prior`` by log-sum-exp;
    the probe rows then score the window against the merged log-sum-exp.

    Returns out ``[H, g, q, D]``, lse ``[H, g, q]``, score ``[1, H, B]``, count ``[1, B]``.
    """
    out, lse = _causal_window(qs, kw, vw, s)
    if prior is not None:
        out, lse = _merge_grouped(prior[0], prior[1], out, lse)
    score, count = _block_saliency(qs, kw, lse, s, block_start, block_size, rule)
    return out, lse, score, count


def _causal_visible(ql: int, s: int) -> torch.Tensor:
    """bool ``[ql, s + ql]``: query row ``i`` of a chunk after ``s`` staged tokens sees
    local key ``j`` iff ``j <= s + i``."""
    return torch.arange(s + ql) <= (torch.arange(ql) + s).unsqueeze(1)


@lru_cache(maxsize=64)
def _causal_bias(ql: int, s: int, g: int) -> torch.Tensor:
    """float32 ``[g * ql, s + ql]``: 0 where query row ``i`` (of every head of the group)
    sees local key ``j``, ``-inf`` elsewhere (:func:`_causal_visible`)."""
    visible = _causal_visible(ql, s)
    return torch.zeros(ql, s + ql).masked_fill_(~visible, float("-inf")).repeat(g, 1)


def _causal_window(qs: torch.Tensor, kw: torch.Tensor, vw: torch.Tensor, s: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of ``qs [H, g, q, D]`` over a one-block window ``kw, vw
    [H, s + q, D]`` (query ``i`` sees keys ``0 .. s + i``): out ``[H, g, q, D]``, lse ``[H, g, q]``.

    On the CPU one fused flash-attention call per step (the query heads of a KV group
    folded into rows, the causal mask as an additive bias); elsewhere dense matmuls."""
    H, g, ql, D = qs.shape
    if qs.is_cpu:
        return _flash_cpu(qs, kw, vw, _causal_bias(ql, s, g))
    logits = torch.matmul(qs, kw.unsqueeze(1).transpose(-1, -2))  # [H, g, q, Lw]
    logits.masked_fill_(~_causal_visible(ql, s), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # finite: every query sees its own key
    return torch.matmul(logits.sub_(lse.unsqueeze(-1)).exp_(), vw.unsqueeze(1)), lse


def _flash_cpu(qs: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ATen's CPU flash attention of scaled queries ``qs [H, g, n, D]`` over ``k, v
    [H, T, D]`` (float32, scale 1), the ``g * n`` query rows of a KV head in one call;
    ``bias [g * n, T]`` is added to the scores. Returns out ``[H, g, n, D]``, lse ``[H, g, n]``."""
    H, g, n, D = qs.shape
    mask = None if bias is None else bias.unsqueeze(0).unsqueeze(0)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qs.reshape(1, H, g * n, D), k.unsqueeze(0), v.unsqueeze(0), 0.0, False,
        attn_mask=mask, scale=1.0)[:2]
    return out.reshape(H, g, n, D), lse.reshape(H, g, n)


def _merge_grouped(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                   lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp merge of two attentions over disjoint keys, grouped ``out [H, g, q, D]``,
    ``lse [H, g, q]``; ``lse_b`` is finite (``lse_a = -inf`` rows saw no key). Overwrites
    ``out_a`` and ``out_b`` (the step's own temporaries) and returns ``out_a``."""
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a.mul_(torch.exp(lse_a - lse).unsqueeze(-1))
    return out.add_(out_b.mul_(torch.exp(lse_b - lse).unsqueeze(-1))), lse


def _tiled_attention(qs: torch.Tensor, kw: torch.Tensor, vw: torch.Tensor, s: int,
                     prior: tuple[torch.Tensor, torch.Tensor] | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over a local window of several blocks, in tiles of at most
    ``QUERY_TILE x KEY_TILE`` scores, merged with ``prior``: out ``[H, g, q, D]``, lse ``[H, g, q]``."""
    ql = qs.shape[2]
    Lw = kw.shape[1]
    state = _OnlineSoftmax(qs)
    if prior is not None:
        state.seed(*prior)
    row_tiles = [slice(i, min(i + QUERY_TILE, ql)) for i in range(0, ql, QUERY_TILE)]
    qpos = torch.arange(ql) + s  # local index of each query
    for kstart in range(0, Lw, KEY_TILE):
        kend = min(kstart + KEY_TILE, Lw)
        kidx = torch.arange(kstart, kend)
        for rows in row_tiles:
            if int(qpos[rows.stop - 1]) < kstart:
                continue  # every key of the tile is in these queries' future
            mask = kidx.unsqueeze(0) <= qpos[rows].unsqueeze(1)
            state.update(kw[:, kstart:kend], vw[:, kstart:kend], rows, mask)
    return state.finish()


@dataclass
class RequestPlan:
    """One request row of a step (host ints; block-id tensors int64)."""

    q_start: int
    q_len: int
    ctx: int  # tokens before this step's chunk
    slot: int  # staging slot (holds ctx % B tokens on entry)
    packed_ids: torch.Tensor  # [ctx // B] block ids of the complete pages to read
    filled_ids: torch.Tensor  # block ids of the blocks that fill in this step


def plan_step(pool: StagingPool, block_size: int, query_start_loc: list[int],
              seq_lens: list[int], block_table: torch.Tensor) -> list[RequestPlan]:
    """Plan one step for every request row and advance the staging bookkeeping.

    A row whose chunk starts on a block boundary (new request, prefix-cache hit,
    recompute after preemption, or just the next block) takes an empty slot;
    otherwise it continues the slot of its partial block, which must hold exactly
    ``ctx % B`` tokens. Slots of rows that end on a block boundary are released
    after all rows are planned, so no row of the same step reuses them.
    """
    B = block_size
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
        plans.append(RequestPlan(q_start=q0, q_len=q_len, ctx=ctx, slot=slot,
                                 packed_ids=row[:b0].to(torch.int64),
                                 filled_ids=row[b0:b0 + n_full].to(torch.int64)))
    for slot in finished_slots:
        pool.release_slot(slot)
    return plans


def rotate_inputs(layout: BlockLayout, query: torch.Tensor, key: torch.Tensor,
                  decode: "DecodeBatch | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``query R, key R`` in their dtypes for a layout with rotated keys, else unchanged
    (through the step's decode plan when there is one: the same op, fewer host checks)."""
    if not layout.rotate_keys:
        return query, key
    if decode is not None:
        return decode.kernel.rotate(query), decode.kernel.rotate(key)
    return hadamard_rotate(query, query.dtype), hadamard_rotate(key, key.dtype)


def apply_step(pool: StagingPool, layer: int, plans: list[RequestPlan], query: torch.Tensor,
               key: torch.Tensor, value: torch.Tensor, pages: torch.Tensor,
               layout: BlockLayout, rule: SaliencyRule, scale: float,
               output: torch.Tensor, decode: "DecodeBatch | None" = None) -> None:
    """Run one layer's step for every planned row: write ``output``, filled pages, tails.

    query ``[T, Hq, D]``, key/value ``[T, H, D]``, pages uint8 ``[num_blocks, page_bytes]``,
    output ``[T, Hq, D]``. Decode rows (one query) run together in
    :func:`apply_decode_rows` (``decode``: their :class:`DecodeBatch`, built once per
    step by the caller, or here); chunks of several tokens run one request at a time.
    Both are the same flow (a decode row is a chunk of length 1). With
    ``layout.rotate_keys`` the query and key rows are rotated here, once, so pages,
    staging and every attention read see rotated keys (``q R . k R = q . k``).
    """
    # Off the CPU, tensors the flow creates go to the query's device (a no-op context on
    # the CPU, where entering a device mode would tax every op of the step).
    with contextlib.nullcontext() if query.is_cpu else torch.device(query.device):
        if decode is None:
            decode_plans = [p for p in plans if p.q_len == 1]
            decode = (DecodeBatch.from_plans(decode_plans, layout.block_size, rule, query.device)
                      if decode_plans else None)
        query, key = rotate_inputs(layout, query, key, decode)
        if decode is not None:
            apply_decode_rows(pool, layer, decode, query, key, value, pages, layout, rule, scale,
                              output)
        for plan in plans:
            if plan.q_len > 1:
                _apply_chunk(pool, layer, plan, query, key, value, pages, layout, rule, scale,
                             output)


def _apply_chunk(pool: StagingPool, layer: int, plan: RequestPlan, query: torch.Tensor,
                 key: torch.Tensor, value: torch.Tensor, pages: torch.Tensor,
                 layout: BlockLayout, rule: SaliencyRule, scale: float,
                 output: torch.Tensor) -> None:
    """One multi-token row, one block at a time: each query sees the blocks before its
    own block as packed pages and its own block in full precision, as decode does.

    So a request computes the same outputs and pages however vLLM splits it into
    steps (one prefill chunk, a chunk cut by the token budget, the rest after a
    prefix-cache hit, a recompute of prompt + generated tokens after preemption).

    Speed: the chunk's keys and values are converted to float32 once; the packed prefix is
    dequantized once per layer (and each block once, as it is packed) and the queries
    of a block attend it as one dense float32 attention, instead of dequantizing every
    page again for every few query rows.
    """
    B, H, slot = layout.block_size, layout.num_kv_heads, plan.slot
    ctx, filled = plan.ctx, 0
    start, end = plan.q_start, plan.q_start + plan.q_len
    # The Triton path (CUDA) attends the packed pages with its own prefill kernel.
    prefix = None if uses_triton(pages) else _DequantizedPrefix(
        pages, plan.packed_ids, layout, plan.packed_ids.numel() + plan.filled_ids.numel())
    packed = plan.packed_ids
    # keys/values converted once for the chunk (float32 [H, q, D] views of [q, H, D]: a
    # transposing conversion costs several times a straight one); queries once per block
    k_all = key[start:end].float().transpose(0, 1)
    v_all = value[start:end].float().transpose(0, 1)
    g = query.shape[1] // H
    while start < end:
        n = min(end - start, B - ctx % B)  # up to the end of the current block
        rows, i = slice(start, start + n), start - plan.q_start
        qs = scaled_queries(query[rows], H, scale)  # contiguous: [H, g * n, D] is a view
        staged = StagedBlock(pool.k[layer, slot], pool.v[layer, slot],
                             pool.score[layer, slot], pool.count[layer, slot])
        kw, vw = _window(k_all[:, i:i + n], v_all[:, i:i + n], staged, ctx % B)
        prior = (prefix.attend(qs) if prefix is not None
                 else _packed_part(query[rows], pages, packed, layout, scale))
        res = _step(qs, kw, vw, ctx, prior, staged, layout, rule)
        output[rows].unflatten(1, (H, g)).copy_(res.out_grouped.permute(2, 0, 1, 3))
        if res.pages.shape[0]:  # the block filled: later blocks read it packed
            block = plan.filled_ids[filled:filled + 1]
            pages.index_copy_(0, block, res.pages)
            if prefix is not None:
                prefix.extend(res.pages)
            else:
                packed = torch.cat([packed, block])
            filled += 1
        ctx, start = ctx + n, start + n
        t = res.tail_len
        if t:
            pool.k[layer, slot, :, :t] = res.tail_k.to(pool.dtype)
            pool.v[layer, slot, :, :t] = res.tail_v.to(pool.dtype)
            pool.score[layer, slot, :, :t] = res.tail_score
            pool.count[layer, slot, :t] = res.tail_count


class _DequantizedPrefix:
    """A request's packed blocks, dequantized to float32 ``[H, n*B, D]`` once per layer
    (room for ``capacity`` blocks, filled as blocks are packed)."""

    def __init__(self, pages: torch.Tensor, ids: torch.Tensor, layout: BlockLayout,
                 capacity: int) -> None:
        self.layout = layout
        H, B, D = layout.num_kv_heads, layout.block_size, layout.head_size
        self._k = torch.empty(H, capacity * B, D)
        self._v = torch.empty(H, capacity * B, D)
        self.len = 0
        if ids.numel():
            self.extend(pages.index_select(0, ids))

    @property
    def k(self) -> torch.Tensor:
        return self._k[:, :self.len]

    @property
    def v(self) -> torch.Tensor:
        return self._v[:, :self.len]

    def extend(self, new_pages: torch.Tensor) -> None:
        k, v = dequantize_pages(new_pages, self.layout)  # [n, H, B, D], storage order
        n = k.shape[0] * k.shape[2]
        self._k[:, self.len:self.len + n] = k.transpose(0, 1).flatten(1, 2)
        self._v[:, self.len:self.len + n] = v.transpose(0, 1).flatten(1, 2)
        self.len += n

    def attend(self, qs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(out [H, g, n, D], lse [H, g, n])`` of scaled queries ``qs [H, g, n, D]`` over
        the prefix (no mask: every query comes after it); the query heads of a KV group
        are folded into rows so one float32 flash attention per KV head serves the group."""
        if self.len == 0:
            return None
        return _flash_cpu(qs, self.k, self.v)


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

    @classmethod
    def from_plans(cls, plans: list[RequestPlan], block_size: int, rule: SaliencyRule,
                   device: torch.device | str = "cpu") -> "DecodeBatch":
        B, R = block_size, len(plans)
        s = [p.ctx % B for p in plans]
        b0 = [p.ctx // B for p in plans]
        if rule.source == "random":
            probe = [0.0] * R
        elif rule.probes.strategy == "exact":
            probe = [1.0] * R
        else:
            probe = [float(_probe_mask(B, rule.probes_json, b0[r] * B)[s[r]]) for r in range(R)]
        table = torch.zeros(R, max(max(b0, default=0), 1), dtype=torch.int64, device=device)
        for r, p in enumerate(plans):
            table[r, :b0[r]] = p.packed_ids
        full = [r for r in range(R) if s[r] == B - 1]

        def ints(xs: list[int]) -> torch.Tensor:
            return torch.tensor(xs, dtype=torch.int64, device=device)

        kernel = DecodePlan.create(ints([p.q_start for p in plans]), table, ints(b0),
                                   ints([p.slot for p in plans]), ints(s),
                                   torch.tensor(probe, dtype=torch.float32, device=device), B)
        return cls(kernel=kernel, full=full, full_slots=ints([plans[r].slot for r in full]),
                   full_ids=(torch.cat([plans[r].filled_ids for r in full]) if full else ints([])),
                   full_starts=[b0[r] * B for r in full])


def apply_decode_rows(pool: StagingPool, layer: int, batch: DecodeBatch, query: torch.Tensor,
                      key: torch.Tensor, value: torch.Tensor, pages: torch.Tensor,
                      layout: BlockLayout, rule: SaliencyRule, scale: float,
                      output: torch.Tensor) -> None:
    """All decode rows of a step at once: same math as :func:`run_request_step` with q = 1.

    One fused kernel call (:class:`zipcache_vllm.kernels.DecodePlan`, as
    :func:`~zipcache_vllm.kernels.decode_staged`: attention over
    the packed pages and the staged tokens merged by log-sum-exp, the new token appended
    to its staging slot, the slot's saliency accumulated); then each row whose block
    filled is packed from its slot into its page.
    """
    batch.kernel.run(query, key, value, pages, *pool.layers[layer], output, layout, scale)
    if batch.full:
        fs = batch.full_slots
        ranks = block_scores(pool.score[layer].index_select(0, fs),
                             pool.count[layer].index_select(0, fs), rule, batch.full_starts)
        salient = topk_salient_mask(ranks, layout.n_hi)
        new_pages = quantize_pack(pool.k[layer].index_select(0, fs).transpose(1, 2),
                                  pool.v[layer].index_select(0, fs).transpose(1, 2), salient, layout)
        pages.index_copy_(0, batch.full_ids, new_pages)


def dense_reference(q: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Explicit causal attention for tests: q ``[q, Hq, D]`` are the last q positions of
    k_ctx/v_ctx ``[T, H, D]``; returns float32 ``[q, Hq, D]``."""
    ql, Hq, D = q.shape
    T, H, _ = k_ctx.shape
    g = Hq // H
    k = k_ctx.float().repeat_interleave(g, dim=1)  # [T, Hq, D]
    v = v_ctx.float().repeat_interleave(g, dim=1)
    logits = torch.einsum("qhd,thd->hqt", q.float(), k) * scale
    qpos = torch.arange(T - ql, T)
    mask = torch.arange(T).unsqueeze(0) <= qpos.unsqueeze(1)
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqt,thd->qhd", torch.softmax(logits, -1), v)


__all__ = ["DecodeBatch", "RequestPlan", "SaliencyRule", "StagedBlock", "StepResult",
           "apply_decode_rows", "apply_step", "block_scores", "dense_reference", "local_window",
           "plan_step", "run_request_step"]
