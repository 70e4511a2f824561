"""Reference quantize/pack and unpack/dequantize of whole pages (see ``layout.py``).

Shapes: ``N`` blocks, ``B`` tokens per block, ``H`` KV heads, ``D`` head size.
Keys are quantized channelwise per (block, head, precision group); values with
channel-separable tokenwise quantization (CSTQ): ``v~ = v / c`` with the
per-channel ``c = sqrt(max_t |v_t|)`` over the block, then per-token min/step.
Which tokens are salient (high bit width) is a per (block, head) mask with
exactly ``layout.n_hi`` set entries.
"""
from __future__ import annotations

import torch

from ..layout import BlockLayout
from .packing import pack_bits, unpack_bits
from .uniform import EPS, dequantize, fp16_round, quant_params, quantize, sanitize


def topk_salient_mask(scores: torch.Tensor, n_hi: int) -> torch.Tensor:
    """Block-local top-k: ``scores [..., B]`` -> bool mask with ``n_hi`` True per row.

    Ties go to the earlier token; NaN scores rank last.
    """
    if not 0 <= n_hi <= scores.shape[-1]:
        raise ValueError(f"n_hi must be in [0, {scores.shape[-1]}], got {n_hi}")
    s = torch.nan_to_num(scores.float(), nan=float("-inf"))
    idx = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :n_hi]
    mask = torch.zeros_like(s, dtype=torch.bool)
    return mask.scatter_(-1, idx, True)


def storage_order(salient: torch.Tensor) -> torch.Tensor:
    """Token index of each storage slot: salient tokens ascending, then regular ones."""
    return torch.sort((~salient).to(torch.uint8), dim=-1, stable=True).indices


def _check_mask(salient: torch.Tensor, layout: BlockLayout, shape: tuple[int, ...]) -> None:
    if salient.shape != shape or salient.dtype != torch.bool:
        raise ValueError(f"salient must be bool {list(shape)}, got {salient.dtype} {list(salient.shape)}")
    counts = salient.sum(-1)
    if not bool((counts == layout.n_hi).all()):
        raise ValueError(f"every (block, head) needs exactly n_hi={layout.n_hi} salient tokens")


def _as_bytes(t: torch.Tensor, n: int, h: int) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).reshape(n, h, -1)


def _channel_scale(v: torch.Tensor) -> torch.Tensor:
    """float16 ``sqrt(max_t |v|)`` per channel; 1 for an all-zero channel.

    The square root is taken in float64 and rounded once to float32, so it is
    correctly rounded on every device (torch's float32 CPU sqrt is not always),
    and pages packed by the CPU and GPU kernels agree byte for byte.
    """
    c = fp16_round(v.abs().amax(dim=-2).double().sqrt().float(), up=True)
    return torch.where(c.float() < EPS, torch.ones_like(c), c)


def quantize_pack_blocks(k: torch.Tensor, v: torch.Tensor, salient: torch.Tensor,
                         layout: BlockLayout) -> torch.Tensor:
    """Quantize full blocks and pack them into pages.

    Args:
        k, v: ``[N, B, H, D]`` keys (after RoPE) and values, any float dtype.
        salient: bool ``[N, H, B]``, exactly ``layout.n_hi`` True per (block, head).
    Returns:
        uint8 ``[N, layout.page_bytes]``.
    """
    B, H, D = layout.block_size, layout.num_kv_heads, layout.head_size
    if k.dim() != 4 or k.shape[1:] != (B, H, D) or v.shape != k.shape:
        raise ValueError(f"k and v must be [N, {B}, {H}, {D}], got {list(k.shape)} and {list(v.shape)}")
    n = k.shape[0]
    _check_mask(salient, layout, (n, H, B))
    order = storage_order(salient).unsqueeze(-1).expand(n, H, B, D)
    ks = torch.gather(sanitize(k).permute(0, 2, 1, 3), 2, order)
    vs = torch.gather(sanitize(v).permute(0, 2, 1, 3), 2, order)
    c = _channel_scale(vs)
    vn = vs / c.float().unsqueeze(-2)

    pages = torch.zeros(n, H, layout.head_bytes, dtype=torch.uint8, device=k.device)

    def put(name: str, t: torch.Tensor) -> None:
        sec = layout.section(name)
        if sec.nbytes:
            pages[..., sec.offset:sec.end] = _as_bytes(t, n, H)

    v_params = []
    for tag, lo, hi, bits in (("hi", 0, layout.n_hi, layout.hi_bits), ("lo", layout.n_hi, B, layout.lo_bits)):
        if hi == lo:
            continue
        kg, vg = ks[:, :, lo:hi], vn[:, :, lo:hi]
        km, kst = quant_params(kg.amin(-2), kg.amax(-2), bits)
        put(f"k_{tag}_codes", pack_bits(quantize(kg, km.unsqueeze(-2), kst.unsqueeze(-2), bits), bits))
        put(f"k_{tag}_params", torch.stack((km, kst), dim=-2))
        vm, vst = quant_params(vg.amin(-1), vg.amax(-1), bits)
        put(f"v_{tag}_codes", pack_bits(quantize(vg, vm.unsqueeze(-1), vst.unsqueeze(-1), bits), bits))
        v_params.append((vm, vst))
    put("v_channel_scale", c)
    put("v_token_params", torch.cat([torch.cat([m for m, _ in v_params], -1),
                                     torch.cat([s for _, s in v_params], -1)], -1))
    if layout.mixed:
        put("mask", pack_bits(salient.to(torch.uint8), 1))
    return pages.reshape(n, layout.page_bytes)


def _get(pages: torch.Tensor, layout: BlockLayout, name: str) -> torch.Tensor:
    sec = layout.section(name)
    return pages[..., sec.offset:sec.end]


def unpack_salient_mask(pages: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """bool ``[N, H, B]`` precision mask stored in the pages."""
    n, H, B = pages.shape[0], layout.num_kv_heads, layout.block_size
    if not layout.mixed:
        return torch.full((n, H, B), layout.n_hi == B, dtype=torch.bool, device=pages.device)
    p = pages.reshape(n, H, layout.head_bytes)
    return unpack_bits(_get(p, layout, "mask"), 1, B).bool()


def storage_positions(pages: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """int64 ``[N, H, B]``: the position in its block of each storage slot's token (what
    a reader of storage-order keys needs for a position mask: sliding windows)."""
    return storage_order(unpack_salient_mask(pages, layout))


def unpack_dequantize_blocks(pages: torch.Tensor, layout: BlockLayout,
                             order: str = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize pages to float32 keys and values ``[N, H, B, D]``.

    ``order="token"`` returns tokens in their positions; ``order="storage"``
    skips the scatter (salient tokens first), which attention may use since
    it does not depend on the order of the keys as long as values follow them.
    """
    if order not in ("token", "storage"):
        raise ValueError(f"order must be 'token' or 'storage', got {order!r}")
    B, H, D = layout.block_size, layout.num_kv_heads, layout.head_size
    if pages.dim() != 2 or pages.shape[1] != layout.page_bytes or pages.dtype != torch.uint8:
        raise ValueError(f"pages must be uint8 [N, {layout.page_bytes}], got {pages.dtype} {list(pages.shape)}")
    n = pages.shape[0]
    p = pages.reshape(n, H, layout.head_bytes)
    c = _get(p, layout, "v_channel_scale").contiguous().view(torch.float16).float()
    vtp = _get(p, layout, "v_token_params").contiguous().view(torch.float16)
    v_min, v_step = vtp[..., :B], vtp[..., B:]
    ks, vs = [], []
    for tag, lo, hi, bits in (("hi", 0, layout.n_hi, layout.hi_bits), ("lo", layout.n_hi, B, layout.lo_bits)):
        if hi == lo:
            continue
        kp = _get(p, layout, f"k_{tag}_params").contiguous().view(torch.float16).reshape(n, H, 2, D)
        kq = unpack_bits(_get(p, layout, f"k_{tag}_codes").reshape(n, H, hi - lo, -1), bits, D)
        ks.append(dequantize(kq, kp[:, :, 0].unsqueeze(-2), kp[:, :, 1].unsqueeze(-2)))
        vq = unpack_bits(_get(p, layout, f"v_{tag}_codes").reshape(n, H, hi - lo, -1), bits, D)
        vs.append(dequantize(vq, v_min[..., lo:hi].unsqueeze(-1), v_step[..., lo:hi].unsqueeze(-1)))
    k = torch.cat(ks, dim=2)
    v = torch.cat(vs, dim=2) * c.unsqueeze(-2)
    if order == "storage" or not layout.mixed:
        return k, v
    idx = storage_order(unpack_salient_mask(pages, layout)).unsqueeze(-1).expand(n, H, B, D)
    return torch.empty_like(k).scatter_(2, idx, k), torch.empty_like(v).scatter_(2, idx, v)


def fake_quantize_blocks(k: torch.Tensor, v: torch.Tensor, salient: torch.Tensor,
                         layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Round trip through the real pages: ``[N, B, H, D]`` in, float32 ``[N, B, H, D]`` out."""
    kd, vd = unpack_dequantize_blocks(quantize_pack_blocks(k, v, salient, layout), layout)
    return kd.transpose(1, 2), vd.transpose(1, 2)
