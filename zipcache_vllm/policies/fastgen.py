"""FastGen ("Model Tells You What to Discard", ICLR 2024): per-head adaptive eviction.

At the end of the prompt, each (layer, KV head) is profiled: the cheapest
policy of the hybrid ladder whose kept tokens receive at least ``threshold``
of the prompt's attention mass is chosen. Later queries see only the tokens
their head's policy keeps (and themselves).
"""
from __future__ import annotations

import math

import torch

from ..saliency import accumulated_scores
from .base import KVPolicy, register

HYBRID = (
    ("special",),
    ("special", "punct"),
    ("special", "punct", "frequent"),
    ("special", "punct", "frequent", "local"),
    ("full",),
)
HYBRID_NAMES = tuple("+".join(p) for p in HYBRID)


@register("fastgen")
class FastGenPolicy(KVPolicy):
    """Eviction, not quantization: kept tokens are stored at ``kept_bits``."""

    @property
    def cfg(self):
        return self.preset.fastgen

    @property
    def paged(self) -> bool:
        """Served by the engine: evicts into pages of ``fastgen.slots`` slots (docs/FASTGEN.md)."""
        return self.preset.paged_fastgen

    def layout(self, head_size, num_kv_heads):
        if not self.paged:
            raise ValueError("this fastgen preset has no fastgen.slots: offline masking only, no pages")
        from ..layout import FastGenLayout

        return FastGenLayout.from_preset(self.preset, head_size, num_kv_heads)

    def bytes_per_token_per_head(self, head_size: int) -> float:
        """Paged: page bytes per logical token per KV head. Otherwise bytes per KEPT token
        per KV head (multiply by the kept fraction)."""
        if self.paged:
            return self.layout(head_size, 1).bytes_per_token_per_head
        return 2 * head_size * self.cfg.kept_bits / 8

    def rank(self, score, count, block_starts, window_ends=None):
        """Ranking of a block's tokens for its slots (the preset's ``saliency_source``:
        accumulated, or ZipCache's normalized attention)."""
        if self.preset.saliency_source == "accumulated":
            return score
        return super().rank(score, count, block_starts, window_ends)

    def frequent(self, acc: torch.Tensor) -> torch.Tensor:
        """Heavy hitters: top ``r_frequent`` of accumulated attention ``acc [Hk, L]`` -> bool."""
        n = max(1, math.ceil(self.cfg.r_frequent * acc.shape[-1]))
        idx = acc.topk(n, dim=-1).indices
        return torch.zeros_like(acc, dtype=torch.bool).scatter_(-1, idx, True)

    def local(self, key_pos: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """``[Lq, L]`` bool: key within the most recent ``r_local`` share of the query's length."""
        span = torch.ceil(self.cfg.r_local * (query_pos.float() + 1)).long()
        return key_pos.unsqueeze(0) >= (query_pos - span + 1).unsqueeze(1)

    def profile(self, probs: torch.Tensor, special: torch.Tensor, punct: torch.Tensor,
                num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose a policy per KV head from the prompt's attention ``probs [Hq, L, L]``.

        Returns ``(choice [Hk] index into HYBRID, frequent [Hk, L] bool)``.
        """
        L = probs.shape[-1]
        acc = accumulated_scores(probs, num_kv_heads)
        total = acc.sum(-1)
        freq = self.frequent(acc)
        pos = torch.arange(L)
        local_last = self.local(pos, pos[-1:])[0]
        parts = {"special": special.expand_as(acc), "punct": punct.expand_as(acc),
                 "frequent": freq, "local": local_last.expand_as(acc)}
        choice = torch.full((num_kv_heads,), len(HYBRID) - 1, dtype=torch.long)
        for i in reversed(range(len(HYBRID) - 1)):
            kept = torch.zeros_like(acc, dtype=torch.bool)
            for part in HYBRID[i]:
                kept |= parts[part]
            ok = (acc * kept).sum(-1) >= self.cfg.threshold * total
            choice = torch.where(ok, torch.full_like(choice, i), choice)
        return choice, freq

    def visible(self, choice: torch.Tensor, frequent: torch.Tensor, special: torch.Tensor,
                punct: torch.Tensor, key_pos: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """``[Hk, Lq, L]`` bool: which keys each query sees under its head's policy (causal).

        ``frequent [Hk, L]`` marks the prompt's heavy hitters (later tokens are
        not promoted: the profiled set is fixed, a simplification of FastGen's
        running update).
        """
        causal = key_pos.unsqueeze(0) <= query_pos.unsqueeze(1)
        own = key_pos.unsqueeze(0) == query_pos.unsqueeze(1)
        local = self.local(key_pos, query_pos)
        hk = choice.shape[0]
        out = torch.zeros(hk, query_pos.numel(), key_pos.numel(), dtype=torch.bool)
        for h in range(hk):
            rung = int(choice[h])
            if HYBRID[rung] == ("full",):
                out[h] = causal
                continue
            keep = own | special.unsqueeze(0)
            if rung >= 1:
                keep = keep | punct.unsqueeze(0)
            if rung >= 2:
                keep = keep | frequent[h].unsqueeze(0)
            if rung >= 3:
                keep = keep | local
            out[h] = keep & causal
        return out
