"""FastGen ("Model Tells You What to Discard", ICLR 2024): per-head adaptive eviction.

At the end of the prompt, each (layer, KV head) is profiled: the cheapest
policy of the hybrid ladder whose kept tokens receive at least ``threshold``
of the prompt's attention mass is chosen. Later queries see only the tokens
their head's policy keeps (and themselves).

Paged presets (``fastgen.slots``) run in the engine's step like every policy
(``engine/step.py``, docs/FASTGEN.md), through the hooks of :class:`FastGenPolicy`:

* a chunk is one full-precision window (:attr:`~FastGenPolicy.blockwise_chunks` False),
  so a request's first step profiles its heads over the whole first chunk
  (:meth:`~FastGenPolicy.observe_attention`: the probe rows' attention mass, then the
  ladder); decode rows run one at a time (:attr:`~FastGenPolicy.fused_decode` False);
* a filled block keeps, per head, the ``S`` tokens of highest (rung priority,
  saliency) (:meth:`~FastGenPolicy.pack`, ``fastgen_pages.select_slots``);
* attention reads each packed page's kept part as a zipcache page of ``S`` tokens
  (:meth:`~FastGenPolicy.packed_view`);
* :class:`FastGenState` keeps each request's rungs and its staged tokens' classes
  between steps (the engine's state for this policy).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..saliency import accumulated_scores, probe_mass, probe_rows
from .base import KVPolicy, register
from .fastgen_pages import (HYBRID, HYBRID_NAMES, kept_view, pack_pages, read_rungs, rungs_from_mass,
                            select_slots)
from .token_classes import class_table, classify


@register("fastgen")
class FastGenPolicy(KVPolicy):
    """Eviction, not quantization: kept tokens are stored at ``kept_bits``."""

    fused_decode = False  # a decode row packs by its request's rungs: one row at a time
    blockwise_chunks = False  # the first step profiles over its whole chunk

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

    def packed_view(self, pages, layout):
        """The kept part of each page, a zipcache page of ``S`` tokens (a strided view)."""
        return kept_view(pages, layout), layout.kept

    def engine_state(self, num_layers, num_slots, num_kv_heads, block_size, tokenizer, device="cpu"):
        if torch.device(device).type != "cpu":
            raise NotImplementedError("paged FastGen dtypes (zipcache_fastgen*) run on the CPU engine only "
                                      "for now (their request state is kept on the CPU); use a zipcache "
                                      "preset on CUDA")
        table = class_table(tokenizer) if tokenizer is not None else None
        return FastGenState(num_layers, num_slots, num_kv_heads, block_size, table)

    def observe_attention(self, row, qs, kw, lse):
        """A request's first step (no rung yet) profiles its heads: the probe rows'
        attention mass over the chunk, then the ladder (:meth:`profile_rungs`)."""
        if row.rung is None:
            row.rung = self.profile_rungs(qs, kw, lse, row.cls)

    def profile_rungs(self, qs: torch.Tensor, k: torch.Tensor, lse: torch.Tensor,
                      cls: torch.Tensor) -> torch.Tensor:
        """Rungs ``[Hk]`` of a request's first chunk: scaled queries ``qs [Hk, g, L, D]``,
        keys ``k [Hk, L, D]``, log-sum-exp ``lse [Hk, g, L]``, class bytes ``cls [L]``; the
        probe rows are ``probe_rows(L)`` of the preset's probes."""
        rows = probe_rows(qs.shape[2], self.preset.probes, seed=0)
        return rungs_from_mass(probe_mass(qs, k, lse, rows, 0), cls, self.cfg)

    def pack(self, k, v, ranks, layout, row=None):
        """Each head keeps ``S`` tokens of each filled block (``select_slots``: its rung's
        classes first, then by ``ranks``), packed with the rung trailer."""
        if row is None:
            raise ValueError("a FastGen block is packed with its request's rungs and token classes")
        n, B, H, _ = k.shape
        rungs = row.rung.expand(n, H)
        kept = select_slots(ranks, rungs, row.cls[:n * B].reshape(n, B), row.start + B * torch.arange(n),
                            torch.full((n,), row.end), self.cfg, layout.slots)
        return pack_pages(k, v, ranks, kept, rungs, layout)

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


@dataclass
class FastGenRow:
    """One row's FastGen state in one layer's step.

    cls: uint8 ``[s + q]`` class bytes of the local window (staged tokens, then the chunk);
    rung: ``[Hk]`` the request's rungs (None in its first step, until profiled);
    start: position of the window's first token; end: the sequence length after the step.
    """

    cls: torch.Tensor
    rung: torch.Tensor | None
    start: int
    end: int


class FastGenState:
    """One engine's FastGen state beside its staging pool (indexed by staging slot).

    ``rung [L, S, Hk]``: the rungs of the request in each slot, per layer (-1: none);
    ``cls [S, B]``: the class bytes of each slot's staged tokens (the same for every
    layer). A request whose partial block is empty reads its rungs from the trailer of
    its last page instead.
    """

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, block_size: int,
                 table: torch.Tensor | None) -> None:
        self.table, self.block_size = table, block_size
        self.rung = torch.full((num_layers, num_slots, num_kv_heads), -1, dtype=torch.int64)
        self.cls = torch.zeros(num_slots, block_size, dtype=torch.uint8)

    def prepare(self, plans, ids: torch.Tensor | None) -> list[torch.Tensor]:
        """Class bytes of each row's local window from the step's token ids ``ids`` (None
        before any was recorded); advances the slots' class bytes (builder, once a step)."""
        B = self.block_size
        out = []
        for p in plans:
            s = p.ctx % B
            if ids is not None and self.table is not None and ids.numel() >= p.q_start + p.q_len:
                chunk = classify(self.table, ids[p.q_start:p.q_start + p.q_len])
            else:  # no token ids recorded (warm-up run): plain tokens
                chunk = torch.zeros(p.q_len, dtype=torch.uint8)
            win = torch.cat([self.cls[p.slot, :s], chunk])
            n_full, tail = divmod(s + p.q_len, B)
            if tail:
                self.cls[p.slot, :tail] = win[n_full * B:]
            out.append(win)
        return out

    def row(self, layer: int, plan, cls: torch.Tensor, pages: torch.Tensor, layout) -> FastGenRow:
        """The row's state for ``layer``: its rungs (None in the request's first step)."""
        s = plan.ctx % self.block_size
        if plan.ctx == 0:
            rung = None
        elif s:
            rung = self.rung[layer, plan.slot]
        else:
            rung = read_rungs(pages.index_select(0, plan.packed_ids[-1:]), layout)[0]
        return FastGenRow(cls, rung, plan.ctx - s, plan.ctx + plan.q_len)

    def store(self, layer: int, plan, row: FastGenRow) -> None:
        """Keep the rungs with the request's partial block (if the step left one)."""
        if (plan.ctx + plan.q_len) % self.block_size:
            self.rung[layer, plan.slot] = row.rung


__all__ = ["HYBRID", "HYBRID_NAMES", "FastGenPolicy", "FastGenRow", "FastGenState"]
