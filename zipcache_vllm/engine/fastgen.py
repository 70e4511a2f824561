"""One layer's step for a paged FastGen preset (docs/FASTGEN.md), pure PyTorch, no vLLM import.

The same positions as ``step.py`` (packed pages, staged tokens, the chunk); what
differs is what a page holds and how a filled block is stored:

* attention reads each packed page's ``S`` kept tokens per head (the page's kept
  part is a zipcache page of ``S`` tokens, so the packed-page kernels read it as a
  strided view), then the local window (staged tokens + chunk) in full precision;
* the request's first step (``ctx == 0``) profiles every KV head from its probe
  rows (``probe_rows(q_len)``) over the chunk: the head's rung of the hybrid
  ladder; later steps read it from the staging side state (partial block) or
  from the trailer of the request's last page;
* a filled block keeps, per head, the ``S`` tokens of highest (rung priority,
  saliency) (``fastgen_pages.select_slots``), saliency from the probe queries of
  its own block exactly as ``step.py`` scores it (the rows of
  ``saliency.scoring_rows``).

The metadata builder adds each row's token classes (special / punctuation, from
the step's token ids, which the backend records through
``compat.patch_step_token_ids``) through :meth:`FastGenStepper.prepare`; the
backend's ``ZipCacheImpl.forward`` runs each layer through :meth:`FastGenStepper.apply`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .fastgen_pages import kept_view, pack_pages, read_rungs, select_slots, ladder_choice
from .token_classes import classify, masks
from ..kernels import attend_packed
from ..layout import FastGenLayout
from ..saliency.scores import probe_rows
from .attention import QUERY_TILE, local_window, merge_lse
from .plan import RequestPlan
from ..policies import KVPolicy
from .saliency import scoring_rows
from .staging import StagedBlock, StagingPool


@dataclass
class FastGenResult:
    out: torch.Tensor  # [q, Hq, D] float32
    pages: torch.Tensor  # uint8 [n_full, page_bytes]
    rung: torch.Tensor  # [H] int64
    tail_len: int
    tail_k: torch.Tensor
    tail_v: torch.Tensor
    tail_score: torch.Tensor
    tail_count: torch.Tensor


def probe_mass(p: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """``[H, T]`` attention mass of the probe rows of a tile of probabilities ``p [H, g, r, T]``
    (``probe`` bool ``[r]``), summed over the query heads of each KV group: the only
    work profiling adds to the first step's attention (plus :func:`rung_from_mass`)."""
    return p[:, :, probe].sum(dim=(1, 2))


def rung_from_mass(acc: torch.Tensor, cls: torch.Tensor, cfg) -> torch.Tensor:
    """Rungs ``[H]`` from the probe rows' accumulated attention ``acc [H, L]`` and classes ``cls [L]``."""
    special, punct = masks(cls)
    return ladder_choice(acc, special, punct, cfg.threshold, cfg.r_frequent, cfg.r_local)


def run_fastgen_step(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, ctx: int,
                     packed_ids: torch.Tensor, pages: torch.Tensor, staged: StagedBlock,
                     cls_window: torch.Tensor, rung: torch.Tensor | None, layout: FastGenLayout,
                     policy: KVPolicy, cfg, scale: float) -> FastGenResult:
    """One request's step. ``cls_window`` uint8 ``[ctx % B + q]`` classes of the local window;
    ``rung`` ``[H]`` (None: this step profiles, only when ``ctx == 0``)."""
    ql, Hq, D = q.shape
    H, B = layout.num_kv_heads, layout.block_size
    g = Hq // H
    s, b0 = ctx % B, ctx // B
    qs, kw, vw = local_window(q, k_new, v_new, ctx, packed_ids, staged, B, scale)
    Lw = s + ql
    qpos = torch.arange(ql) + s
    kidx = torch.arange(Lw)

    # Local window (causal), query tiles; then merged with the packed pages' kept tokens.
    # In the first step (ctx == 0: no packed page, so a tile's probabilities are final)
    # the probe rows' probabilities are summed for profiling as the tiles go by.
    profiling = rung is None
    if profiling and ctx != 0:
        raise ValueError("only a request's first step (ctx == 0) profiles its heads")
    probe = torch.zeros(ql, dtype=torch.bool)
    if profiling:
        probe[probe_rows(ql, policy.preset.probes, seed=0)] = True
    acc = torch.zeros(H, Lw)
    out_l = torch.empty(H, g, ql, D)
    lse_l = torch.empty(H, g, ql)
    for r0 in range(0, ql, QUERY_TILE):
        r1 = min(r0 + QUERY_TILE, ql)
        sc = torch.einsum("hgqd,htd->hgqt", qs[:, :, r0:r1], kw)
        sc = sc.masked_fill(kidx.unsqueeze(0) > qpos[r0:r1].unsqueeze(1), float("-inf"))
        lse = torch.logsumexp(sc, -1)
        pt = torch.exp(sc - lse.unsqueeze(-1))
        out_l[:, :, r0:r1] = torch.einsum("hgqt,htd->hgqd", pt, vw)
        lse_l[:, :, r0:r1] = lse
        if profiling:
            acc += probe_mass(pt, probe[r0:r1])
    out = out_l.permute(2, 0, 1, 3).reshape(ql, Hq, D)
    lse_all = lse_l.reshape(Hq, ql)
    if b0:
        out_p, lse_p = attend_packed(q, kept_view(pages, layout), packed_ids, layout.kept, scale)
        out, lse_t = merge_lse(out_p, lse_p.t(), out, lse_all.t())  # lse [Hq, n] -> [n, Hq]
        lse_all = lse_t.t()
    lse = lse_all.reshape(H, g, ql)

    if profiling:
        rung = rung_from_mass(acc, cls_window, cfg)

    # Saliency of the local window's blocks from the (probe) queries of the same block:
    # the scoring rows of saliency.block_saliency; the GQA group, then the rows, summed
    # in two reductions (this step's own summation order).
    nb = -(-Lw // B)
    score = torch.zeros(nb, H, B)
    count = torch.zeros(nb, B)
    probes = None if policy.preset.probes.strategy == "exact" else policy.probes_json
    for c in range(nb):
        lo, hi = c * B, min((c + 1) * B, Lw)
        r0, r1 = max(lo - s, 0), hi - s
        if r1 <= r0:
            continue
        rows, hidden, seen = scoring_rows(B, probes, b0 * B + lo, lo - s, r0, r1, hi - lo)
        if rows.numel() == 0:
            continue
        logit = torch.einsum("hgrd,hkd->hgrk", qs[:, :, rows], kw[:, lo:hi])
        p = torch.exp(logit - lse[:, :, rows].unsqueeze(-1)).masked_fill(hidden, 0.0)
        score[c, :, :hi - lo] = p.sum(1).sum(1)
        count[c, :hi - lo] = seen
    if s:
        score[0, :, :s] += staged.score[:, :s].float()
        count[0, :s] += staged.count[:s].float()
    n_full, tail = divmod(Lw, B)

    if n_full:
        kf = kw[:, :n_full * B].reshape(H, n_full, B, D).permute(1, 2, 0, 3)  # [n, B, H, D]
        vf = vw[:, :n_full * B].reshape(H, n_full, B, D).permute(1, 2, 0, 3)
        starts = [(b0 + c) * B for c in range(n_full)]
        ranks = policy.rank(score[:n_full], count[:n_full], starts)
        rungs = rung.expand(n_full, H)
        kept = select_slots(ranks, rungs, cls_window[:n_full * B].reshape(n_full, B), torch.tensor(starts),
                            torch.full((n_full,), ctx + ql), cfg, layout.slots)
        new_pages = pack_pages(kf, vf, ranks, kept, rungs, layout)
    else:
        new_pages = torch.zeros(0, layout.page_bytes, dtype=torch.uint8)
    t0 = n_full * B
    return FastGenResult(out=out, pages=new_pages, rung=rung, tail_len=tail,
                         tail_k=kw[:, t0:Lw], tail_v=vw[:, t0:Lw],
                         tail_score=score[n_full, :, :tail] if tail else score.new_zeros(H, 0),
                         tail_count=count[n_full, :tail] if tail else count.new_zeros(0))


class FastGenStepper:
    """One engine's FastGen state next to its staging pool, and the per-step hooks.

    ``rung [L, S, H]``: each staging slot's heads' rungs (per layer); ``cls [S, B]``:
    the class bytes of the slot's staged tokens (the same for every layer).
    """

    def __init__(self, pool: StagingPool, table: torch.Tensor, cfg) -> None:
        L = len(pool.layer_index)
        self.pool, self.table, self.cfg = pool, table, cfg
        self.rung = torch.full((L, pool.num_slots, pool.num_kv_heads), -1, dtype=torch.int64)
        self.cls = torch.zeros(pool.num_slots, pool.block_size, dtype=torch.uint8)

    def prepare(self, plans: list[RequestPlan], ids: torch.Tensor | None) -> list[torch.Tensor]:
        """Class bytes of each row's local window from the step's token ids ``ids`` (None
        before any was recorded); advances the slots' class bytes (builder, once a step)."""
        B = self.pool.block_size
        out = []
        for p in plans:
            s = p.ctx % B
            if ids is not None and ids.numel() >= p.q_start + p.q_len:
                chunk = classify(self.table, ids[p.q_start:p.q_start + p.q_len])
            else:  # no token ids recorded (warm-up run): plain tokens
                chunk = torch.zeros(p.q_len, dtype=torch.uint8)
            win = torch.cat([self.cls[p.slot, :s], chunk])
            n_full, tail = divmod(s + p.q_len, B)
            if tail:
                self.cls[p.slot, :tail] = win[n_full * B:]
            out.append(win)
        return out

    def apply(self, layer: int, plans: list[RequestPlan], windows: list[torch.Tensor],
              query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pages: torch.Tensor,
              layout: FastGenLayout, policy: KVPolicy, scale: float, output: torch.Tensor) -> None:
        """Run every planned row of one layer (one request at a time)."""
        pool, B = self.pool, layout.block_size
        for plan, win in zip(plans, windows):
            rows = slice(plan.q_start, plan.q_start + plan.q_len)
            slot, s = plan.slot, plan.ctx % B
            if plan.ctx == 0:
                rung = None
            elif s:
                rung = self.rung[layer, slot]
            else:
                rung = read_rungs(pages.index_select(0, plan.packed_ids[-1:]), layout)[0]
            staged = StagedBlock(pool.k[layer, slot], pool.v[layer, slot],
                                 pool.score[layer, slot], pool.count[layer, slot])
            res = run_fastgen_step(query[rows], key[rows], value[rows], plan.ctx, plan.packed_ids,
                                   pages, staged, win, rung, layout, policy, self.cfg, scale)
            output[rows] = res.out.to(output.dtype)
            if res.pages.shape[0]:
                pages.index_copy_(0, plan.filled_ids, res.pages)
            pool.store_tail(layer, slot, res)
            if res.tail_len:
                self.rung[layer, slot] = res.rung


__all__ = ["FastGenResult", "FastGenStepper", "probe_mass", "rung_from_mass", "run_fastgen_step"]
