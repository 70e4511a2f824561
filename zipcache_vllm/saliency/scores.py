"""Saliency scores of the tokens of a window from attention probabilities.

Notation: a window holds ``W`` key tokens at positions ``key_pos``; ``P`` probe
queries at positions ``probe_pos`` have attention probabilities ``probs
[Hq, P, W]`` over them (zero where the query cannot see the key, i.e. causal).

* Normalized attention (ZipCache): ``p~_i = sum_k A[k, i] / nnz(A[:, i])``,
  the accumulated attention of token i divided by the number of queries that
  can see it. ``nnz`` is the causal count (a probability that underflows to 0
  still counts as a query that could attend).
* Accumulated attention (H2O, MiKV): ``sum_k A[k, i]``, biased towards early
  tokens because they are seen by more queries.
* GQA: one score per KV head, the sum over the query heads of its group.
"""
from __future__ import annotations

import math

import torch

from ..config import ProbeConfig


def gqa_aggregate(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Sum ``x [Hq, ...]`` over the query heads of each KV group -> ``[Hk, ...]``."""
    hq = x.shape[0]
    if hq % num_kv_heads:
        raise ValueError(f"{hq} query heads are not a multiple of {num_kv_heads} KV heads")
    return x.reshape(num_kv_heads, hq // num_kv_heads, *x.shape[1:]).sum(1)


def visible_counts(probe_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """Number of probe queries that can see each key (causal): ``[W]``."""
    return (probe_pos.unsqueeze(1) >= key_pos.unsqueeze(0)).sum(0)


def accumulated_scores(probs: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """H2O/MiKV accumulated attention ``[Hk, W]`` from ``probs [Hq, P, W]``."""
    return gqa_aggregate(probs.float().sum(1), num_kv_heads)


def probe_mass(qs: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, rows: torch.Tensor,
               first_row_key: int, row_tile: int = 256) -> torch.Tensor:
    """Accumulated attention ``[Hk, T]`` of the query rows ``rows`` over keys ``k [Hk, T, D]``.

    ``qs [Hk, g, q, D]`` scaled queries (the query heads of a KV group together) with the
    log-sum-exp ``lse [Hk, g, q]`` of their finished attention, so ``exp(q.k - lse)`` is the
    probability each row gave each key; row ``r`` sees keys ``0 .. first_row_key + r``
    (causal). Summed over the rows and the query heads of each group, ``row_tile`` rows
    at a time (bounded memory on long prompts).
    """
    H, T = k.shape[0], k.shape[1]
    acc = torch.zeros(H, T, dtype=torch.float32, device=k.device)
    kidx = torch.arange(T, device=k.device)
    for i in range(0, rows.numel(), row_tile):
        r = rows[i:i + row_tile]
        logits = torch.einsum("hgrd,htd->hgrt", qs[:, :, r], k)
        hidden = kidx.unsqueeze(0) > (r + first_row_key).unsqueeze(1)
        acc += logits.sub_(lse[:, :, r].unsqueeze(-1)).exp_().masked_fill_(hidden, 0.0).sum(dim=(1, 2))
    return acc


def normalize_accumulated(acc: torch.Tensor, visible: torch.Tensor, key_pos: torch.Tensor,
                          window_end, normalize: str = "visible") -> torch.Tensor:
    """ZipCache's normalization of accumulated attention ``acc [..., W]``.

    ``normalize="visible"`` divides by ``visible``, the number of probe rows that saw
    each token; ``"l_minus_i"`` by ``window_end - key_pos`` (the reference code's
    choice: the count of all queries after the token, probes or not), which favours
    recent tokens when only a few probes are recent. ``visible``, ``key_pos`` and
    ``window_end`` broadcast against ``acc``.
    """
    if normalize == "visible":
        denom = visible
    elif normalize == "l_minus_i":
        denom = window_end - key_pos
    else:
        raise ValueError(f"normalize must be 'visible' or 'l_minus_i', got {normalize!r}")
    return acc / denom.clamp_min(1).to(device=acc.device, dtype=acc.dtype)


def normalized_scores(probs: torch.Tensor, probe_pos: torch.Tensor, key_pos: torch.Tensor,
                      num_kv_heads: int, normalize: str = "visible",
                      window_end: int | None = None) -> torch.Tensor:
    """ZipCache normalized attention ``[Hk, W]`` from probe rows (:func:`normalize_accumulated`;
    ``window_end`` defaults to the position after the last probe)."""
    if window_end is None and normalize == "l_minus_i":
        window_end = int(probe_pos.max()) + 1
    return normalize_accumulated(accumulated_scores(probs, num_kv_heads),
                                 visible_counts(probe_pos, key_pos), key_pos, window_end, normalize)


def exact_normalized_attention(attn: torch.Tensor) -> torch.Tensor:
    """The paper's formula on a full causal attention matrix ``[..., L, L]`` -> ``[..., L]``."""
    L = attn.shape[-1]
    nnz = torch.arange(L, 0, -1, device=attn.device, dtype=attn.dtype)
    return attn.sum(-2) / nnz


def probe_rows(window_len: int, cfg: ProbeConfig, seed: int = 0) -> torch.Tensor:
    """Sorted indices (within a window of ``window_len`` queries) of the probe queries.

    ``recent`` takes the last ``ceil(recent_frac * W)``; ``random`` draws
    ``ceil(random_frac * W)`` from the rest with a generator seeded by
    ``cfg.seed`` and ``seed`` (e.g. the window's start position), so a
    request's probes are reproducible. Never fewer than ``min_probes`` rows
    (or the whole window).
    """
    if window_len <= 0:
        return torch.zeros(0, dtype=torch.long)
    if cfg.strategy == "exact":
        return torch.arange(window_len)
    n_recent = math.ceil(cfg.recent_frac * window_len) if cfg.strategy in ("recent", "recent_random") else 0
    n_random = math.ceil(cfg.random_frac * window_len) if cfg.strategy in ("random", "recent_random") else 0
    if n_recent + n_random < cfg.min_probes:
        if n_recent:
            n_recent = max(n_recent, cfg.min_probes - n_random)
        else:
            n_random = cfg.min_probes
    n_recent = min(n_recent, window_len)
    recent = torch.arange(window_len - n_recent, window_len)
    rest = window_len - n_recent
    n_random = min(n_random, rest)
    gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + seed) % (2 ** 63))
    rand = torch.randperm(rest, generator=gen)[:n_random]
    return torch.cat([rand, recent]).sort().values
