"""Applying one layer's step: attend, score, quantize full blocks, stage the tail.

Pure PyTorch, no vLLM import. The backend's ``ZipCacheImpl.forward`` calls
:func:`apply_step` once per layer with the step's plans
(:func:`~zipcache_vllm.engine.plan.plan_step`, made once per step by the metadata
builder): the decode rows of the step run together in :func:`apply_decode_rows`
(one fused kernel call), each multi-token chunk in ``_apply_chunk``, one block at a
time. :func:`run_request_step` is the same flow for one request and a whole chunk
at once (the tests and the simulator check drive it against explicit references).

Positions of one request in a step (``B`` tokens per block)::

    0 .............. ctx-s ....... ctx ............... seq_len
    | packed pages   | staged (s)  | this step's chunk (q) |
    |  (vLLM cache)  |  (staging)  |  (new K/V)            |
                     \\_____ local window: full precision ___/

    s = ctx % B + k * B (k <= saliency_delay filled blocks wait)   q = seq_len - ctx

* Attention (``attention.py``): every query of the chunk attends over the packed
  blocks (the C++ kernels of ``zipcache_vllm.kernels`` dequantize inside the kernel;
  their PyTorch fallback dequantizes a bounded group of pages at a time), then over
  the local window (causal), merged by log-sum-exp. Per-query log-sum-exp is kept.
* Saliency (``saliency.py``): a token of the local window is scored by the queries
  of its own block and of the ``policy.saliency_delay`` blocks after it, which it waits
  for in staging (``exp(q.k * scale - lse)``, summed over the query heads of its KV
  group), optionally only by probe rows chosen from the position. A block's quantization
  is therefore a function of its own tokens, those blocks and its prefix.
* Sliding-window layers (``window``: a query at ``p`` sees keys in ``(p - window, p]``,
  as in vLLM and transformers): a block runs its queries over the packed blocks that
  intersect their windows only (vLLM's sliding-window manager frees the blocks before
  them, so they are never read), the block where the window starts under a per-query
  mask. The local window (at most ``(1 + saliency_delay) * B`` tokens, no longer than
  the window) is always visible.
* Every block whose delay passes in this step (with no delay: that fills) is packed by
  the policy
  (:meth:`~zipcache_vllm.policies.KVPolicy.pack`: block-local top-k salient tokens
  quantized into its page, or FastGen's kept slots); what is left (the blocks that wait,
  the partial tail) goes back to staging (``staging.py``).

Every policy runs this flow (``policies/``); a policy with per-request state
(FastGen) passes its engine state and the rows' prepared data to :func:`apply_step`,
runs its chunks as one window (``policy.blockwise_chunks``) and its decode rows as
chunks of one token (``policy.fused_decode``), reads packed pages through
``policy.packed_view`` and sees each row's finished attention
(``policy.observe_attention``: FastGen profiles there).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..kernels import attend_packed, dequantize_pages, hadamard_rotate, uses_triton
from ..kernels.portable import fake_quantize_rows8
from ..quant.block import storage_positions
from ..layout import BlockLayout
from ..policies import KVPolicy
from .attention import (causal_window, flash_cpu, local_window, masked_attention, merge_lse,
                        scaled_queries, tiled_attention, window)
from .plan import DecodeBatch, RequestPlan
from .saliency import block_saliency
from .staging import StagedBlock, StagingPool


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


def fused_row(plan: RequestPlan, policy: KVPolicy, window: int | None = None) -> bool:
    """Whether a row runs in the step's fused decode call: one token, a policy with the
    fused decode, and a window (sliding-window layers) that still covers every packed
    token (``ctx < window``); the other rows run one at a time (:func:`_apply_chunk`)."""
    return plan.q_len == 1 and policy.fused_decode and (window is None or plan.ctx < window)


def run_request_step(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                     ctx: int, packed_ids: torch.Tensor, pages: torch.Tensor,
                     staged: StagedBlock, layout: BlockLayout, policy: KVPolicy,
                     scale: float, row=None, n_staged: int | None = None) -> StepResult:
    """One request's attention step over packed pages + staging + its own chunk.

    Args:
        q: ``[q, Hq, D]`` queries of the chunk (positions ``ctx .. ctx+q-1``).
        k_new, v_new: ``[q, H, D]`` the chunk's keys (after RoPE) and values.
        ctx: tokens before the chunk; ``n_staged`` of them are staged (default
            ``ctx % B``; with a ``saliency_delay``, also the filled blocks that wait).
        packed_ids: int64 ``[(ctx - n_staged) // B]`` block ids of the packed blocks, in order.
        pages: uint8 ``[num_blocks, page_bytes]`` the layer's cache.
        staged: the request's staged tokens (first ``n_staged`` valid).
        layout: page layout; policy: ranks and packs a filled block's tokens; scale: softmax scale.
        row: the row's state from the policy's engine state (None for a policy without one).
    """
    n_staged = ctx % layout.block_size if n_staged is None else n_staged
    qs, kw, vw = local_window(q, k_new, v_new, ctx, packed_ids, staged, layout.block_size, scale,
                              n_staged)
    # (a1) complete packed blocks: dequantized inside the kernel (C++ on the CPU, Triton on
    # CUDA, or the portable PyTorch path a bounded group of pages at a time), merged below
    # by LSE.
    prior = _packed_part(q, *policy.packed_view(pages, layout), packed_ids, scale)
    return _step(qs, kw, vw, ctx, prior, staged, layout, policy, row, n_staged)


def _packed_part(q: torch.Tensor, pages: torch.Tensor, layout: BlockLayout,
                 packed_ids: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Attention of ``q [n, Hq, D]`` over the packed blocks ``packed_ids`` (None if there
    are none) of ``pages`` read with ``layout`` (the policy's :meth:`packed_view`), regrouped
    as ``out [H, g, n, D]``, ``lse [H, g, n]`` like the scaled queries."""
    if not packed_ids.numel():
        return None
    out, lse = attend_packed(q, pages, packed_ids, layout, scale)
    n, Hq, D = out.shape
    H = layout.num_kv_heads
    return (out.float().reshape(n, H, Hq // H, D).permute(1, 2, 0, 3),
            lse.reshape(H, Hq // H, n))


def _windowed_packed_part(q: torch.Tensor, pages: torch.Tensor, layout: BlockLayout,
                          packed_ids: torch.Tensor, scale: float, q0: int, window: int
                          ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`_packed_part` for queries at ``q0 .. q0 + n - 1`` of a sliding-window layer
    (``packed_ids[i]`` is the block of positions ``i*B .. i*B + B - 1``): the blocks every
    query sees whole through the kernels, the blocks where the windows start dequantized
    and masked per query, merged by log-sum-exp; the blocks before every window are not
    read (vLLM may have freed them)."""
    B, n = layout.block_size, q.shape[0]
    first = max(0, q0 - window + 1) // B  # the first block any query sees
    whole = min(max(first, -(-(q0 + n - window) // B)), packed_ids.numel())  # seen by all
    prior = _packed_part(q, pages, layout, packed_ids[whole:], scale)
    if whole == first:
        return prior
    edge = pages.index_select(0, packed_ids[first:whole])
    k, v = dequantize_pages(edge, layout)  # [m, H, B, D], storage order
    pos = storage_positions(edge, layout) + (
        torch.arange(first, whole, device=edge.device) * B).view(-1, 1, 1)
    out, lse = masked_attention(scaled_queries(q, layout.num_kv_heads, scale),
                                k.transpose(0, 1).flatten(1, 2), v.transpose(0, 1).flatten(1, 2),
                                _window_visible(pos.transpose(0, 1).flatten(1), q0, n, window))
    return (out, lse) if prior is None else merge_lse(prior[0], prior[1], out, lse)


def _window_visible(pos: torch.Tensor, q0: int, n: int, window: int) -> torch.Tensor:
    """bool ``[H, n, T]``: whether query ``q0 + i`` sees the key at ``pos [H, T]`` (its
    window is ``(q0 + i - window, q0 + i]``; every key here precedes every query)."""
    qpos = torch.arange(q0, q0 + n, device=pos.device)
    return pos.unsqueeze(1) > (qpos - window).view(1, n, 1)


def _step(qs: torch.Tensor, kw: torch.Tensor, vw: torch.Tensor, ctx: int,
          prior: tuple[torch.Tensor, torch.Tensor] | None, staged: StagedBlock,
          layout: BlockLayout, policy: KVPolicy, row=None, n_staged: int | None = None
          ) -> StepResult:
    """The step after the packed part: local window (causal), merged with ``prior`` (the
    packed part, grouped), saliency, the policy's pages of the blocks packed in this step,
    the tokens left staged.

    qs ``[H, g, q, D]`` scaled queries, kw/vw ``[H, n_staged + q, D]`` the local window: the
    ``n_staged`` staged tokens (default ``ctx % B``: no filled block waits), then the chunk.
    A block of the window is packed once ``policy.saliency_delay`` blocks after it filled.
    """
    H, g, ql, D = qs.shape
    B = layout.block_size
    s = ctx % B if n_staged is None else n_staged
    first = ctx - s  # position of the window's first token, a block boundary
    Lw = s + ql
    delay = policy.saliency_delay
    if ql <= B and Lw <= B * (1 + delay):  # every chunk of _apply_chunk, every decode step
        out, lse, score, count = _one_block(qs, kw, vw, s, prior, policy, first, B)
    else:
        out, lse = tiled_attention(qs, kw, vw, s, prior)
        score, count = block_saliency(qs, kw, lse, s, first, B, policy)
    if row is not None:
        policy.observe_attention(row, qs, kw, lse)
    if s:  # only the first s staged entries are meaningful (the rest is stale)
        nb = -(-s // B)
        acc = score.new_zeros(H, nb * B)
        acc[:, :s] = staged.score[:, :s]
        score[:nb] += acc.view(H, nb, B).transpose(0, 1)
        acc = count.new_zeros(nb * B)
        acc[:s] = staged.count[:s]
        count[:nb] += acc.view(nb, B)
    n_full = max(Lw // B - delay, 0)  # blocks packed in this step
    tail = Lw - n_full * B

    # (c) pack every block whose delay has passed.
    if n_full:
        kf = kw[:, :n_full * B].reshape(H, n_full, B, D).permute(1, 2, 0, 3)  # [n, B, H, D] views
        vf = vw[:, :n_full * B].reshape(H, n_full, B, D).permute(1, 2, 0, 3)
        starts = [first + c * B for c in range(n_full)]
        ranks = policy.rank(score[:n_full], count[:n_full], starts)
        new_pages = policy.pack(kf, vf, ranks, layout, row)
    else:
        new_pages = torch.zeros(0, layout.page_bytes, dtype=torch.uint8)

    # (d) the rest goes (back) to staging.
    t0 = n_full * B
    return StepResult(
        out_grouped=out,
        lse=lse.reshape(H * g, ql),
        pages=new_pages,
        tail_len=tail,
        tail_k=kw[:, t0:Lw],
        tail_v=vw[:, t0:Lw],
        tail_score=(score[n_full:].transpose(0, 1).reshape(H, -1)[:, :tail] if tail
                    else score.new_zeros(H, 0)),
        tail_count=count[n_full:].reshape(-1)[:tail] if tail else count.new_zeros(0),
    )


def _one_block(qs: torch.Tensor, kw: torch.Tensor, vw: torch.Tensor, s: int,
               prior: tuple[torch.Tensor, torch.Tensor] | None, policy: KVPolicy,
               block_start: int, block_size: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention and saliency when the local window is one block (``s + q <= B``): one
    causal attention per KV head over the window, merged with ``prior`` by log-sum-exp;
    the probe rows then score the window against the merged log-sum-exp.

    Returns out ``[H, g, q, D]``, lse ``[H, g, q]``, score ``[1, H, B]``, count ``[1, B]``.
    """
    out, lse = causal_window(qs, kw, vw, s)
    if prior is not None:
        out, lse = merge_lse(prior[0], prior[1], out, lse)
    score, count = block_saliency(qs, kw, lse, s, block_start, block_size, policy)
    return out, lse, score, count


def rotate_inputs(layout: BlockLayout, query: torch.Tensor, key: torch.Tensor,
                  decode: "DecodeBatch | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``query R, key R`` in their dtypes for a layout with rotated keys, else unchanged."""
    if not layout.rotate_keys:
        return query, key
    return _rotate(query, decode), _rotate(key, decode)


def rotate_values(layout: BlockLayout, x: torch.Tensor,
                  decode: "DecodeBatch | None" = None) -> torch.Tensor:
    """``x R`` in its dtype for a layout with rotated values, else ``x``: the values on the
    way in, the attention output on the way out (``R`` is its own inverse)."""
    return _rotate(x, decode) if layout.rotate_values else x


def _rotate(x: torch.Tensor, decode: "DecodeBatch | None") -> torch.Tensor:
    """``x R`` in its dtype, through the step's decode plan when there is one (the same op,
    fewer host checks)."""
    return decode.kernel.rotate(x) if decode is not None else hadamard_rotate(x, x.dtype)


def apply_step(pool: StagingPool, layer: int, plans: list[RequestPlan], query: torch.Tensor,
               key: torch.Tensor, value: torch.Tensor, pages: torch.Tensor,
               layout: BlockLayout, policy: KVPolicy, scale: float,
               output: torch.Tensor, decode: "DecodeBatch | None" = None,
               state=None, prepared: list | None = None, sliding_window: int | None = None) -> None:
    """Run one layer's step for every planned row: write ``output``, filled pages, tails.

    query ``[T, Hq, D]``, key/value ``[T, H, D]``, pages uint8 ``[num_blocks, page_bytes]``,
    output ``[T, Hq, D]``. Decode rows (one query) run together in
    :func:`apply_decode_rows` (``decode``: their :class:`DecodeBatch`, built once per
    step by the caller, or here) when ``policy.fused_decode``; the other rows run one
    request at a time (:func:`_apply_chunk`). Both are the same flow (a decode row is a
    chunk of length 1). With ``layout.rotate_keys`` the query and key rows are rotated
    here, once, so pages, staging and every attention read see rotated keys
    (``q R . k R = q . k``); with ``layout.rotate_values`` the value rows too, and the
    output rows are rotated back at the end. ``state``: the policy's engine state
    (:meth:`~zipcache_vllm.policies.KVPolicy.engine_state`, None for most policies) and
    ``prepared`` each row's data from its ``prepare`` (once per step, by the builder).
    ``sliding_window``: the layer's window (None: full attention); rows whose window
    starts inside the packed prefix run one at a time (:func:`fused_row`).
    """
    if pool.blocks != policy.staged_blocks:
        raise ValueError(f"the staging pool holds {pool.blocks} block(s) a request, policy "
                         f"{policy.name} stages {policy.staged_blocks} (its saliency_delay)")
    # Off the CPU, tensors the flow creates go to the query's device (a no-op context on
    # the CPU, where entering a device mode would tax every op of the step).
    with contextlib.nullcontext() if query.is_cpu else torch.device(query.device):
        if decode is None and policy.fused_decode:
            decode_plans = [p for p in plans if fused_row(p, policy, sliding_window)]
            decode = (DecodeBatch.from_plans(decode_plans, layout.block_size, policy, query.device,
                                             pool.paged)
                      if decode_plans else None)
        query, key = rotate_inputs(layout, query, key, decode)
        value = rotate_values(layout, value, decode)
        if decode is not None:
            apply_decode_rows(pool, layer, decode, query, key, value, pages, layout, policy, scale,
                              output)
        for i, plan in enumerate(plans):
            if not fused_row(plan, policy, sliding_window):
                row = (state.row(layer, plan, prepared[i], pages, layout)
                       if state is not None else None)
                _apply_chunk(pool, layer, plan, query, key, value, pages, layout, policy, scale,
                             output, row, sliding_window)
                if state is not None:
                    state.store(layer, plan, row)
        if layout.rotate_values and plans:
            rows = slice(0, plans[-1].q_start + plans[-1].q_len)
            output[rows] = rotate_values(layout, output[rows], decode)


def _apply_chunk(pool: StagingPool, layer: int, plan: RequestPlan, query: torch.Tensor,
                 key: torch.Tensor, value: torch.Tensor, pages: torch.Tensor,
                 layout: BlockLayout, policy: KVPolicy, scale: float,
                 output: torch.Tensor, row=None, sliding_window: int | None = None) -> None:
    """One row of several tokens (or one, for a policy without the fused decode, or whose
    ``sliding_window`` starts inside its packed prefix).

    With ``policy.blockwise_chunks``, one block at a time: each query sees the blocks
    before its own block as packed pages and its own block in full precision, as
    decode does. So a request computes the same outputs and pages however vLLM splits
    it into steps (one prefill chunk, a chunk cut by the token budget, the rest after
    a prefix-cache hit, a recompute of prompt + generated tokens after preemption).
    Otherwise the whole chunk is one full-precision window after the packed pages
    (FastGen, whose first step profiles its heads over the whole chunk).

    Speed: the chunk's keys and values are converted to float32 once; block by block,
    the packed prefix is dequantized once per layer (and each block once, as it is
    packed) and the queries of a block attend it as one dense float32 attention,
    instead of dequantizing every page again for every few query rows.
    """
    B, H = layout.block_size, layout.num_kv_heads
    ctx, filled = plan.ctx, 0
    start, end = plan.q_start, plan.q_start + plan.q_len
    blockwise = policy.blockwise_chunks
    if sliding_window is not None and not blockwise:
        raise NotImplementedError(f"sliding windows need a blockwise policy, not {policy.name}")
    # One window reads the packed pages once, through the kernels; so does the Triton path
    # (CUDA), with its own prefill kernel. A sliding window reads from the first block the
    # chunk's first query sees.
    first = 0 if sliding_window is None else max(0, ctx - sliding_window + 1) // B
    prefix = None if not blockwise or uses_triton(pages) else _DequantizedPrefix(
        pages, plan.packed_ids[first:], layout,
        plan.packed_ids.numel() - first + plan.filled_ids.numel(), first * B, sliding_window)
    view, view_layout = policy.packed_view(pages, layout)
    packed = plan.packed_ids
    # keys/values converted once for the chunk (float32 [H, q, D] views of [q, H, D]: a
    # transposing conversion costs several times a straight one); queries once per block
    k_all = key[start:end].float().transpose(0, 1)
    v_all = value[start:end].float().transpose(0, 1)
    exact = None
    if pool.paged is not None and pool.paged.kv_bits == 8:
        # 8-bit staging: until its block is packed a token is its 8-bit rounding for every
        # reader (its own chunk's queries too, as a decode token for its own query), so how
        # vLLM splits a request into chunks (budget, prefix hit, recompute) changes nothing;
        # the tail's codes are taken from the exact rows (store_tail)
        exact = (k_all, v_all)
        k_all, v_all = fake_quantize_rows8(k_all), fake_quantize_rows8(v_all)
    g = query.shape[1] // H
    # The staged tokens on entry; after a block of the loop fills, what the step left staged
    # (the filled blocks that wait for later blocks' queries, with a saliency delay).
    staged, n_staged = pool.staged(layer, plan, pages), plan.staged
    pool.keep_staged(plan, pages)
    res = None
    while start < end:
        n = min(end - start, B - ctx % B) if blockwise else end - start
        rows, i = slice(start, start + n), start - plan.q_start
        qs = scaled_queries(query[rows], H, scale)  # contiguous: [H, g * n, D] is a view
        kw, vw = window(k_all[:, i:i + n], v_all[:, i:i + n], staged, n_staged)
        if prefix is not None:
            prior = prefix.attend(qs, ctx)
        elif sliding_window is not None:
            prior = _windowed_packed_part(query[rows], view, view_layout, packed, scale, ctx,
                                          sliding_window)
        else:
            prior = _packed_part(query[rows], view, view_layout, packed, scale)
        res = _step(qs, kw, vw, ctx, prior, staged, layout, policy, row, n_staged)
        output[rows].unflatten(1, (H, g)).copy_(res.out_grouped.permute(2, 0, 1, 3))
        n_new = res.pages.shape[0]
        if n_new:  # blocks packed: later blocks read them packed
            blocks = plan.filled_ids[filled:filled + n_new]
            pages.index_copy_(0, blocks, res.pages)
            if prefix is not None:
                prefix.extend(res.pages)
            else:
                packed = torch.cat([packed, blocks])
            filled += n_new
        ctx, start = ctx + n, start + n
        staged = StagedBlock(res.tail_k, res.tail_v, res.tail_score, res.tail_count)
        n_staged = res.tail_len
    pool.store_tail(layer, plan, res, pages, exact)


class _DequantizedPrefix:
    """A request's packed blocks from position ``start`` on, dequantized to float32
    ``[H, n*B, D]`` once per layer (room for ``capacity`` blocks, filled as blocks are
    packed), in storage order; for a sliding window also each token's position ``[H, n*B]``."""

    def __init__(self, pages: torch.Tensor, ids: torch.Tensor, layout: BlockLayout,
                 capacity: int, start: int = 0, window: int | None = None) -> None:
        self.layout, self.start, self.window = layout, start, window
        H, B, D = layout.num_kv_heads, layout.block_size, layout.head_size
        self._k = torch.empty(H, capacity * B, D)
        self._v = torch.empty(H, capacity * B, D)
        self._pos = torch.empty(H, capacity * B, dtype=torch.int64) if window else None
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
        if self._pos is not None:
            B = self.layout.block_size
            first = self.start + self.len  # position of the first new token
            pos = storage_positions(new_pages, self.layout) + (
                first + torch.arange(k.shape[0]) * B).view(-1, 1, 1)
            self._pos[:, self.len:self.len + n] = pos.transpose(0, 1).flatten(1)
        self.len += n

    def attend(self, qs: torch.Tensor, q0: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(out [H, g, n, D], lse [H, g, n])`` of scaled queries ``qs [H, g, n, D]`` at
        positions ``q0 ..`` over the prefix (every query comes after it; with a sliding
        window, the blocks from the first query's window start, masked per query where
        the windows start); the query heads of a KV group are folded into rows so one
        float32 flash attention per KV head serves the group."""
        B, g, n, W = self.layout.block_size, qs.shape[1], qs.shape[2], self.window
        lo = 0 if W is None else max(0, q0 - W + 1 - self.start) // B * B
        if lo >= self.len:
            return None
        bias = None
        if W is not None and q0 + n - W > self.start + lo:  # some keys not seen by all
            visible = _window_visible(self._pos[:, lo:self.len], q0, n, W)  # [H, n, T]
            bias = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf")).repeat(1, g, 1)
        return flash_cpu(qs, self.k[:, lo:], self.v[:, lo:], bias)


def apply_decode_rows(pool: StagingPool, layer: int, batch: DecodeBatch, query: torch.Tensor,
                      key: torch.Tensor, value: torch.Tensor, pages: torch.Tensor,
                      layout: BlockLayout, policy: KVPolicy, scale: float,
                      output: torch.Tensor) -> None:
    """All decode rows of a step at once: same math as :func:`run_request_step` with q = 1.

    One fused kernel call (:class:`zipcache_vllm.kernels.DecodePlan`, as
    :func:`~zipcache_vllm.kernels.decode_staged`: attention over
    the packed pages and the staged tokens merged by log-sum-exp, the new token appended
    to its staging slot, the slot's saliency accumulated); then each row whose block
    filled is packed from its slot into its page.
    """
    batch.kernel.run(query, key, value, pages, *(pool.layers[layer] if pool.layers else (None,) * 4),
                     output, layout, scale)
    if batch.full:
        k, v, score, count = pool.full_blocks(layer, batch, pages)
        ranks = policy.rank(score, count, batch.full_starts)
        new_pages = policy.pack(k.transpose(1, 2), v.transpose(1, 2), ranks, layout)
        pages.index_copy_(0, batch.full_ids, new_pages)

__all__ = ["StepResult", "apply_decode_rows", "apply_step", "rotate_inputs", "rotate_values",
           "run_request_step"]
