"""Explicit dense attention, the reference the engine step is checked against."""
from __future__ import annotations

import torch


def dense_reference(q: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Explicit causal attention for tests: q ``[q, Hq, D]`` are the last q positions of
    k_ctx/v_ctx ``[T, H, D]``; returns float32 ``[q, Hq, D]``."""
    ql, Hq, D = q.shape
    T, H, _ = k_ctx.shape
    g = Hq // H
    k = k_ctx.float().repeat_interleave(g, dim=1)  # [T, Hq, D]
    v = v_ctx.float().repeat_interleave(g, dim=1)
    logits = torch.einsum("qhd,thd->hqt", q.float(), k) * scale
    qpos = torch.arange(T - ql, T)
    mask = torch.arange(T).unsqueeze(0) <= qpos.unsqueeze(1)
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqt,thd->qhd", torch.softmax(logits, -1), v)
