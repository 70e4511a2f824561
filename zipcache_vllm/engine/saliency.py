"""Saliency of a step's tokens: how the tokens of a block are ranked for quantization.

A token of the local window is scored by the queries of its own block only
(``exp(q.k * scale - lse)``, summed over the query heads of its KV group),
optionally only by probe rows chosen from the position. A block's ranking is
therefore a function of its own tokens and its prefix, however its tokens were
split into steps. Pure PyTorch, no vLLM import.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

from ..config import Preset, ProbeConfig
from ..saliency.scores import probe_rows


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
        """The probe config as the key of :func:`probe_mask` (dumped once per rule, not per block)."""
        return self.probes.model_dump_json()


@lru_cache(maxsize=4096)
def probe_mask(block_size: int, probes_json: str, block_start: int) -> torch.Tensor:
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


def block_saliency(qs: torch.Tensor, kw: torch.Tensor, lse: torch.Tensor, s: int,
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
        rows, hidden, seen = scoring_rows(B, probes, first_block_start + lo, lo - s, r0, r1, hi - lo)
        if rows.numel() == 0:
            continue
        logits = torch.einsum("hgrd,hkd->hgrk", qs[:, :, rows], kw[:, lo:hi])
        p = logits.sub_(lse[:, :, rows].unsqueeze(-1)).exp_().masked_fill_(hidden, 0.0)
        score[c, :, :hi - lo] = p.sum(dim=(1, 2))
        count[c, :hi - lo] = seen
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


__all__ = ["SaliencyRule", "block_saliency", "block_scores", "probe_mask", "scoring_rows"]
