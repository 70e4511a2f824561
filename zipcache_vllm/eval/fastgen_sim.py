"""Offline mirror of the engine's step with a paged FastGen policy (``engine/step.py``
through :class:`~zipcache_vllm.policies.FastGenPolicy`'s hooks).

Called by :class:`~zipcache_vllm.eval.simulate.KVSimulator` for a paged FastGen
preset. The sequence runs chunk by chunk like the engine serves it (the prompt,
then block-sized decode chunks); a query sees the tokens of its own chunk in full
precision and, of earlier complete blocks, only the tokens their page kept,
dequantized from the same bytes the engine writes (``policies/fastgen_pages.pack_pages``).
The heads are profiled once, from the probe rows of the first chunk (the prompt).
"""
from __future__ import annotations

import torch

from ..layout import FastGenLayout
from ..saliency import probe_rows
from ..policies.fastgen_pages import pack_pages, profile_heads, select_slots, unpack_pages
from ..policies.token_classes import PUNCT, SPECIAL


def class_bytes(special: torch.Tensor | None, punct: torch.Tensor | None, L: int) -> torch.Tensor:
    """uint8 ``[L]`` class bytes from the simulator's bool masks (absent = none)."""
    cls = torch.zeros(L, dtype=torch.uint8)
    if special is not None:
        cls |= special[:L].to(torch.uint8) * SPECIAL
    if punct is not None:
        cls |= punct[:L].to(torch.uint8) * PUNCT
    return cls


def simulate_paged(sim, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   layer: int) -> torch.Tensor:
    """Attention outputs ``[Hq, L, D]`` of one layer under paged FastGen (q ``[Hq, L, D]``, k/v ``[Hk, L, D]``)."""
    preset = sim.policy.preset
    cfg = preset.fastgen
    hq, L, D = q.shape
    hk = k.shape[0]
    g = hq // hk
    B = sim.block
    layout = FastGenLayout.from_preset(preset, D, hk)
    cls = class_bytes(sim.special, sim.punct, L)
    keep = torch.ones(hk, L, dtype=torch.bool)
    k_st, v_st = k.clone(), v.clone()
    out = torch.empty_like(q)
    pending: dict[int, list] = {}
    rung = None
    pos = torch.arange(L)
    for c0, c1 in sim.chunks(L):
        keys = torch.cat([k_st[:, :c0], k[:, c0:c1]], 1).repeat_interleave(g, 0)
        vals = torch.cat([v_st[:, :c0], v[:, c0:c1]], 1).repeat_interleave(g, 0)
        logits = torch.einsum("hqd,hkd->hqk", q[:, c0:c1], keys) * scale
        visible = (pos[:c1].unsqueeze(0) <= pos[c0:c1].unsqueeze(1)).unsqueeze(0) & \
            keep[:, :c1].repeat_interleave(g, 0).unsqueeze(1)
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1)
        out[:, c0:c1] = torch.einsum("hqk,hkd->hqd", probs, vals)
        if rung is None:  # the request's first step profiles every head
            rows = probe_rows(c1 - c0, preset.probes, seed=0)
            rung = profile_heads(probs[:, rows, :c1], cls[:c1], hk, cfg)
        for j in range(c0 // B, -(-c1 // B)):
            pending.setdefault(j, []).append(sim._probe_piece(probs, c0, c1, j))
        blocks = list(range(c0 // B, c1 // B))
        if not blocks:
            continue
        n = len(blocks)
        score = torch.stack([sim._scores(pending.pop(j), j, c1, hk) for j in blocks])
        starts = torch.tensor([j * B for j in blocks])
        kept = select_slots(score, rung.expand(n, hk), cls[blocks[0] * B:(blocks[-1] + 1) * B].reshape(n, B),
                            starts, torch.full((n,), c1), cfg, layout.slots)
        sl = slice(blocks[0] * B, (blocks[-1] + 1) * B)
        kb = k[:, sl].transpose(0, 1).reshape(n, B, hk, D)
        vb = v[:, sl].transpose(0, 1).reshape(n, B, hk, D)
        pages = pack_pages(kb, vb, score, kept, rung.expand(n, hk), layout)
        kd, vd = unpack_pages(pages, layout)  # [n, hk, S, D]
        absolute = kept + starts[:, None, None]  # [n, hk, S]
        for h in range(hk):
            idx = absolute[:, h].reshape(-1)
            keep[h, sl] = False
            keep[h, idx] = True
            k_st[h, idx] = kd[:, h].reshape(-1, D)
            v_st[h, idx] = vd[:, h].reshape(-1, D)
    sim.stats.kept_fraction[layer] = float(keep.float().mean())
    sim.stats.fastgen_choice[layer] = rung.tolist() if rung is not None else []
    return out
