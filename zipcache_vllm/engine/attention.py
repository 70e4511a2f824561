"""Attention math of the step, float32, pure PyTorch.

* :func:`local_window` / :func:`scaled_queries` / :func:`window`: a step's scaled
  queries ``[H, g, q, D]`` (the query heads of a KV head together) and its local
  window ``kw, vw [H, s + q, D]`` (the staged tokens, then the chunk).
* :func:`causal_window`: causal attention over a one-block window (one ATen CPU
  flash-attention call, :func:`flash_cpu`, per step on the CPU).
* :func:`tiled_attention`: causal attention over a window of several blocks, in
  tiles of at most ``QUERY_TILE x KEY_TILE`` scores folded into :class:`OnlineSoftmax`.
* :func:`merge_lse`: the log-sum-exp merge of two partial attentions over disjoint
  keys, the one merge formula of every Python caller (the zipcache step's grouped
  ``[H, g, q, D]`` parts, the FastGen step's flat ``[n, Hq, D]`` ones through a
  transposed ``lse``). Online softmax folds keys into a running max and sum instead
  (:class:`OnlineSoftmax`; the portable decode in ``kernels/portable.py`` folds the
  packed part in as ``csrc/decode.cpp`` does), and the kernels merge on their own
  side (``csrc/ops.cpp`` split-K, Triton ``merge_lse``).

Every partial attention here is ``out`` (normalized) and the natural-log
log-sum-exp ``lse`` of the scaled scores; ``lse = -inf`` (with ``out = 0``) where a
query saw no key.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from .staging import StagedBlock

QUERY_TILE = 256  # query rows per score tile
KEY_TILE = 1024  # local-window keys per score tile


class OnlineSoftmax:
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


def merge_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
              lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp merge of two partial attentions over disjoint keys, in place.

    ``out_*`` float32 ``[..., D]`` (normalized), ``lse_*`` ``[...]`` (``out``'s shape
    without ``D``; a transposed view is fine). A part with ``lse = -inf`` (and ``out = 0``)
    saw no key and contributes nothing; a row where neither part saw a key gives
    ``out = 0``, ``lse = -inf``. Overwrites ``out_a`` and ``out_b`` (the callers' own
    temporaries) and returns ``(out_a, lse)``.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    # lse itself wherever it is finite (the same bits); the most negative float where
    # both parts are empty, so that their weights are exp(-inf) = 0 and not exp(nan).
    m = lse.clamp(min=torch.finfo(lse.dtype).min)
    out = out_a.mul_(torch.exp(lse_a - m).unsqueeze(-1))
    return out.add_(out_b.mul_(torch.exp(lse_b - m).unsqueeze(-1))), lse


def local_window(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, ctx: int,
                 packed_ids: torch.Tensor, staged: StagedBlock, block_size: int,
                 scale: float, n_staged: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scaled queries ``[H, g, q, D]`` and the float32 local window ``kw, vw [H, s + q, D]``
    (the ``s = n_staged`` staged tokens, default ``ctx % B``, then the chunk) of a request's
    step; checks that ``packed_ids`` lists the ``(ctx - s) // B`` packed blocks."""
    s = ctx % block_size if n_staged is None else n_staged
    if (ctx - s) % block_size:
        raise ValueError(f"{s} staged tokens at {ctx} do not start on a block boundary")
    b0 = (ctx - s) // block_size
    if packed_ids.numel() != b0:
        raise ValueError(f"expected {b0} packed block ids, got {packed_ids.numel()}")
    kw, vw = window(k_new.transpose(0, 1), v_new.transpose(0, 1), staged, s)
    return scaled_queries(q, k_new.shape[1], scale), kw, vw


def scaled_queries(q: torch.Tensor, num_kv_heads: int, scale: float) -> torch.Tensor:
    """``q [n, Hq, D]`` times ``scale`` as float32 ``[H, g, n, D]`` (the query heads of each
    KV head together)."""
    n, Hq, D = q.shape
    g = Hq // num_kv_heads
    qs = torch.empty(num_kv_heads, g, n, D, dtype=torch.float32, device=q.device)
    return qs.copy_(q.reshape(n, num_kv_heads, g, D).permute(1, 2, 0, 3)).mul_(scale)


def window(k_new: torch.Tensor, v_new: torch.Tensor, staged: StagedBlock,
           s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``kw, vw [H, s + q, D]``: the first ``s`` staged tokens, then the chunk's
    (``k_new, v_new [H, q, D]``; returned as they are when nothing is staged)."""
    if not s:
        return k_new.float(), v_new.float()
    kw = torch.cat([staged.k[:, :s].float(), k_new.float()], dim=1)
    vw = torch.cat([staged.v[:, :s].float(), v_new.float()], dim=1)
    return kw, vw


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


def causal_window(qs: torch.Tensor, kw: torch.Tensor, vw: torch.Tensor, s: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of ``qs [H, g, q, D]`` over a one-block window ``kw, vw
    [H, s + q, D]`` (query ``i`` sees keys ``0 .. s + i``): out ``[H, g, q, D]``, lse ``[H, g, q]``.

    On the CPU one fused flash-attention call per step (the query heads of a KV group
    folded into rows, the causal mask as an additive bias); elsewhere dense matmuls."""
    H, g, ql, D = qs.shape
    if qs.is_cpu:
        return flash_cpu(qs, kw, vw, _causal_bias(ql, s, g))
    logits = torch.matmul(qs, kw.unsqueeze(1).transpose(-1, -2))  # [H, g, q, Lw]
    logits.masked_fill_(~_causal_visible(ql, s), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # finite: every query sees its own key
    return torch.matmul(logits.sub_(lse.unsqueeze(-1)).exp_(), vw.unsqueeze(1)), lse


def masked_attention(qs: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of scaled queries ``qs [H, g, n, D]`` over ``k, v [H, T, D]`` where
    ``visible [H, n, T]`` (dense matmuls, any device): out ``[H, g, n, D]``, lse
    ``[H, g, n]``; a query that sees no key gets ``out = 0``, ``lse = -inf``."""
    logits = torch.matmul(qs, k.unsqueeze(1).transpose(-1, -2))  # [H, g, n, T]
    logits.masked_fill_(~visible.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.exp(logits - lse.clamp(min=torch.finfo(lse.dtype).min).unsqueeze(-1))
    return torch.matmul(p, v.unsqueeze(1)), lse


def flash_cpu(qs: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ATen's CPU flash attention of scaled queries ``qs [H, g, n, D]`` over ``k, v
    [H, T, D]`` (float32, scale 1), the ``g * n`` query rows of a KV head in one call;
    ``bias [g * n, T]`` (or per KV head, ``[H, g * n, T]``) is added to the scores.
    Returns out ``[H, g, n, D]``, lse ``[H, g, n]``."""
    H, g, n, D = qs.shape
    mask = None if bias is None else (bias.unsqueeze(0) if bias.dim() == 3
                                      else bias.unsqueeze(0).unsqueeze(0))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qs.reshape(1, H, g * n, D), k.unsqueeze(0), v.unsqueeze(0), 0.0, False,
        attn_mask=mask, scale=1.0)[:2]
    return out.reshape(H, g, n, D), lse.reshape(H, g, n)


def tiled_attention(qs: torch.Tensor, kw: torch.Tensor, vw: torch.Tensor, s: int,
                    prior: tuple[torch.Tensor, torch.Tensor] | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over a local window of several blocks, in tiles of at most
    ``QUERY_TILE x KEY_TILE`` scores, merged with ``prior``: out ``[H, g, q, D]``, lse ``[H, g, q]``."""
    ql = qs.shape[2]
    Lw = kw.shape[1]
    state = OnlineSoftmax(qs)
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


__all__ = ["KEY_TILE", "QUERY_TILE", "OnlineSoftmax", "causal_window", "flash_cpu",
           "local_window", "masked_attention", "merge_lse", "scaled_queries", "tiled_attention", "window"]
