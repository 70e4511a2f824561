"""Saliency accumulators of a step's tokens, which the policy ranks a filled block by.

A token of the local window is scored by the queries of its own block and, with a
preset's ``saliency_delay`` of ``d``, of the ``d`` blocks after it, which it waits for in
staging before it is packed (``exp(q.k * scale - lse)``, summed over the query heads of
its KV group), optionally only by probe rows chosen from each query's position. A block's
accumulators (and so its ranking, :meth:`~zipcache_vllm.policies.KVPolicy.rank`) are
therefore a function of its own tokens, the ``d`` blocks after it and its prefix, however
its tokens were split into steps.
Pure PyTorch, no vLLM import.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from ..config import ProbeConfig
from ..policies import KVPolicy
from ..saliency.scores import probe_rows


@lru_cache(maxsize=4096)
def probe_mask(block_size: int, probes_json: str, block_start: int) -> torch.Tensor:
    """bool ``[B]``: which positions of the block starting at ``block_start`` are probe rows
    (``probes_json``: :attr:`~zipcache_vllm.policies.KVPolicy.probes_json`).

    A function of the position only, so a block's probes do not depend on how its
    tokens were split into steps.
    """
    mask = torch.zeros(block_size, dtype=torch.bool, device="cpu")
    mask[probe_rows(block_size, ProbeConfig.model_validate_json(probes_json), seed=block_start)] = True
    return mask


def block_saliency(qs: torch.Tensor, kw: torch.Tensor, lse: torch.Tensor, s: int,
                   first_block_start: int, block_size: int, policy: KVPolicy
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulators of the local window's blocks from this step's queries.

    qs ``[H, g, q, D]`` scaled queries, kw ``[H, Lw, D]`` local keys (Lw = s + q, the
    window starting at the block boundary ``first_block_start``), lse ``[H, g, q]``.
    Returns score ``[nb, H, B]`` and count ``[nb, B]`` for the ``nb = ceil(Lw / B)`` local
    blocks (zero past the window). The query rows of a block and of the
    ``policy.saliency_delay`` blocks after it (only their probes, unless ``exact``) score
    its tokens, each row by its own block's probe rule; a policy that ranks without
    attention (``policy.uses_attention`` False) gets zeros.
    """
    H, g, q, D = qs.shape
    B, Lw = block_size, kw.shape[1]
    nb = -(-Lw // B)
    score = torch.zeros(nb, H, B)
    count = torch.zeros(nb, B)
    if not policy.uses_attention:
        return score, count
    probes = None if policy.preset.probes.strategy == "exact" else policy.probes_json
    for c in range(nb):
        lo, hi = c * B, min((c + 1) * B, Lw)  # local key range of block c
        parts = []
        for c2 in range(c, min(c + 1 + policy.saliency_delay, nb)):  # blocks whose rows score c
            lo2, hi2 = c2 * B, min((c2 + 1) * B, Lw)
            r0, r1 = max(lo2 - s, 0), hi2 - s  # query rows (chunk index) inside block c2
            if r1 <= r0:
                continue
            rows, hidden, seen = scoring_rows(B, probes, first_block_start + lo2, lo2 - s, r0, r1,
                                              hi2 - lo2)
            if c2 != c:  # a later block's row sees every token of block c (full: c2 exists)
                hidden = hidden.new_zeros(rows.numel(), B)
                seen = torch.full((B,), float(rows.numel()))
            if rows.numel():
                parts.append((rows, hidden, seen))
        if not parts:
            continue
        rows = torch.cat([part[0] for part in parts])
        hidden = torch.cat([part[1] for part in parts])
        logits = torch.einsum("hgrd,hkd->hgrk", qs[:, :, rows], kw[:, lo:hi])
        p = logits.sub_(lse[:, :, rows].unsqueeze(-1)).exp_().masked_fill_(hidden, 0.0)
        score[c, :, :hi - lo] = p.sum(dim=(1, 2))
        count[c, :hi - lo] = sum(part[2] for part in parts)
    return score, count


@lru_cache(maxsize=1024)
def scoring_rows(block_size: int, probes_json: str | None, block_start: int, row_of_first: int,
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
        probe = probe_mask(block_size, probes_json, block_start)
        rows = rows[probe[rows - row_of_first]]
    qpos = rows - row_of_first  # position of each scoring row inside the block
    visible = torch.arange(width).unsqueeze(0) <= qpos.unsqueeze(1)
    return rows, ~visible, visible.sum(0).float()


__all__ = ["block_saliency", "probe_mask", "scoring_rows"]
