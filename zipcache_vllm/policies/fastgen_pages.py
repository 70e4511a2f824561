"""Paged FastGen: profile each KV head, choose its kept tokens per block, pack pages.

Pure PyTorch, shared by the policy's engine hooks (:class:`.fastgen.FastGenPolicy`) and
the offline simulator (``eval/fastgen_sim.py``), so both store exactly the same bytes.

* :func:`profile_heads` - FastGen's hybrid ladder from accumulated probe attention:
  per KV head, the cheapest rung whose kept tokens hold >= T of the attention mass.
* :func:`select_slots` - which ``S`` tokens of a full block each head keeps: the
  tokens its rung keeps come first (special > punctuation > frequent / local),
  then by saliency; a head whose rung keeps more than ``S`` tokens ("full", or a
  rich hybrid) keeps its ``S`` highest-ranked ones, one that keeps fewer fills the
  remaining slots with the next best tokens (the slots are paid for anyway).
* :func:`pack_pages` / :func:`unpack_pages` - kept tokens in ascending position
  into a zipcache page of ``S`` tokens, plus the rung / count trailer
  (:class:`~zipcache_vllm.layout.FastGenLayout`).
"""
from __future__ import annotations

import math

import torch

from ..kernels import quantize_pack
from ..layout import FastGenLayout
from ..quant.block import topk_salient_mask, unpack_dequantize_blocks
from ..saliency import accumulated_scores
from .token_classes import masks

#: FastGen's hybrid ladder, cheapest first: the token sets each rung keeps.
HYBRID = (
    ("special",),
    ("special", "punct"),
    ("special", "punct", "frequent"),
    ("special", "punct", "frequent", "local"),
    ("full",),
)
HYBRID_NAMES = tuple("+".join(p) for p in HYBRID)
FULL = len(HYBRID) - 1  # rung index of "full"


def ladder_choice(acc: torch.Tensor, special: torch.Tensor, punct: torch.Tensor,
                  threshold: float, r_frequent: float, r_local: float) -> torch.Tensor:
    """Rung ``[Hk]`` (index into ``HYBRID``) from accumulated attention ``acc [Hk, L]``.

    ``special`` / ``punct``: bool ``[L]``. Frequent = top ``ceil(r_frequent * L)``
    tokens by ``acc``; local = the last ``ceil(r_local * L)`` positions.
    """
    hk, L = acc.shape
    acc = acc.float()
    n_freq = max(1, math.ceil(r_frequent * L))
    freq = torch.zeros_like(acc, dtype=torch.bool).scatter_(-1, acc.topk(min(n_freq, L), -1).indices, True)
    local = torch.arange(L) >= L - math.ceil(r_local * L)
    # Rungs 0-3 keep growing unions: special, +punct, +frequent, +local.
    kept = torch.stack([special.expand_as(acc), punct.expand_as(acc), freq, local.expand_as(acc)]).cummax(0).values
    ok = (acc * kept).sum(-1) >= threshold * acc.sum(-1)  # [4, Hk]
    ok = torch.cat([ok, torch.ones(1, hk, dtype=torch.bool)])  # "full" always reaches T
    return ok.to(torch.int8).argmax(0).to(torch.long)  # the first (cheapest) rung that does


def profile_heads(probs: torch.Tensor, cls: torch.Tensor, num_kv_heads: int, cfg) -> torch.Tensor:
    """Rungs ``[Hk]`` from probe attention ``probs [Hq, P, L]`` over a prompt with class bytes ``cls [L]``."""
    return rungs_from_mass(accumulated_scores(probs, num_kv_heads), cls, cfg)


def rungs_from_mass(acc: torch.Tensor, cls: torch.Tensor, cfg) -> torch.Tensor:
    """Rungs ``[Hk]`` from the probe rows' accumulated attention ``acc [Hk, L]`` over a prompt
    with class bytes ``cls [L]`` (the preset's ``fastgen`` settings ``cfg``)."""
    special, punct = masks(cls)
    return ladder_choice(acc, special, punct, cfg.threshold, cfg.r_frequent, cfg.r_local)


def priority(score: torch.Tensor, rung: torch.Tensor, cls: torch.Tensor, block_start: torch.Tensor,
             fill_pos: torch.Tensor, cfg) -> torch.Tensor:
    """Priority level ``[n, H, B]`` (3 special, 2 punct, 1 frequent/local/full, 0 evictable).

    score ``[n, H, B]`` saliency of the block's tokens; rung ``[n, H]``; cls ``[n, B]``;
    block_start ``[n]`` position of each block's first token; fill_pos ``[n]`` sequence
    length when the block filled (the "current length" of FastGen's local window).
    """
    n, H, B = score.shape
    special, punct = masks(cls)
    special, punct = special[:, None, :], punct[:, None, :]
    r = rung[:, :, None]
    n_freq = max(1, math.ceil(cfg.r_frequent * B))
    frequent = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.topk(n_freq, -1).indices, True)
    pos = block_start[:, None] + torch.arange(B)[None, :]
    span = torch.ceil(cfg.r_local * fill_pos.float()).long()
    local = (pos >= (fill_pos - span)[:, None])[:, None, :]
    level = torch.zeros(n, H, B, dtype=torch.long)
    level = torch.where((r >= 3) & (r < FULL) & local, 1, level)
    level = torch.where((r >= 2) & (r < FULL) & frequent, 1, level)
    level = torch.where(r == FULL, 1, level)
    level = torch.where((r >= 1) & (r < FULL) & punct, torch.maximum(level, torch.full_like(level, 2)), level)
    level = torch.where((r < FULL) & special, torch.full_like(level, 3), level)
    return level


def select_slots(score: torch.Tensor, rung: torch.Tensor, cls: torch.Tensor, block_start: torch.Tensor,
                 fill_pos: torch.Tensor, cfg, slots: int) -> torch.Tensor:
    """Kept positions ``[n, H, S]`` (ascending) of full blocks: top ``S`` by (priority, score)."""
    level = priority(score, rung, cls, block_start, fill_pos, cfg)
    key = level.double() * 1e6 + torch.nan_to_num(score.double(), nan=0.0).clamp(0.0, 1e5)
    idx = key.topk(slots, -1).indices
    return idx.sort(-1).values


def pack_pages(k: torch.Tensor, v: torch.Tensor, score: torch.Tensor, kept: torch.Tensor,
               rung: torch.Tensor, layout: FastGenLayout) -> torch.Tensor:
    """Pages ``uint8 [n, page_bytes]`` of full blocks.

    k, v ``[n, B, H, D]``; score ``[n, H, B]`` (ranks the kept tokens for the high bit
    width when the kept storage is mixed); kept ``[n, H, S]``; rung ``[n, H]``.
    """
    n, B, H, D = k.shape
    S = layout.slots
    idx = kept.unsqueeze(-1).expand(n, H, S, D)
    ks = torch.gather(k.permute(0, 2, 1, 3), 2, idx).permute(0, 2, 1, 3).contiguous()  # [n, S, H, D]
    vs = torch.gather(v.permute(0, 2, 1, 3), 2, idx).permute(0, 2, 1, 3).contiguous()
    salient = topk_salient_mask(torch.gather(score, 2, kept), layout.kept.n_hi)
    pages = torch.zeros(n, layout.page_bytes, dtype=torch.uint8)
    if n == 0:
        return pages
    pages[:, :layout.kept.page_bytes] = quantize_pack(ks, vs, salient, layout.kept)
    rs, cs = layout.rung_section, layout.count_section
    pages[:, rs.offset:rs.end] = rung.to(torch.uint8)
    count = torch.full((n, H), S, dtype=torch.int16)
    pages[:, cs.offset:cs.end] = count.view(torch.uint8).reshape(n, cs.nbytes)
    return pages


def kept_view(pages: torch.Tensor, layout: FastGenLayout) -> torch.Tensor:
    """The kept part of pages ``[N, page_bytes]`` as zipcache pages of ``S`` tokens (a strided view)."""
    return pages[:, :layout.kept.page_bytes]


def read_rungs(pages: torch.Tensor, layout: FastGenLayout) -> torch.Tensor:
    """Rungs ``[N, H]`` (int64) stored in pages."""
    rs = layout.rung_section
    return pages[:, rs.offset:rs.end].to(torch.int64)


def read_counts(pages: torch.Tensor, layout: FastGenLayout) -> torch.Tensor:
    cs = layout.count_section
    return pages[:, cs.offset:cs.end].contiguous().view(torch.int16).to(torch.int64)


def unpack_pages(pages: torch.Tensor, layout: FastGenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized kept tokens ``k, v [N, H, S, D]`` in ascending position (float32)."""
    return unpack_dequantize_blocks(kept_view(pages, layout).contiguous(), layout.kept, order="token")
