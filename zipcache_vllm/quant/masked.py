"""Mixed-precision fake quantization for any number of salient tokens per block.

The same math as :func:`~zipcache_vllm.quant.block.quantize_pack_blocks`
(channelwise keys per precision group, CSTQ values, float16 parameters), but
without packing and without the fixed salient count of a page. The offline
harness uses it for the sequence-global top-k ablation, where blocks hold
different numbers of salient tokens; for a fixed count it equals the packed
round trip bit for bit (tested).
"""
from __future__ import annotations

import torch

from .block import _channel_scale
from .uniform import dequantize, quant_params, quantize, sanitize


def _key_group(k: torch.Tensor, member: torch.Tensor, bits: int) -> torch.Tensor:
    """Channelwise fake quant of the tokens selected by ``member [N,H,B,1]`` in ``k [N,H,B,D]``."""
    inf = torch.tensor(float("inf"))
    kmin = torch.where(member, k, inf).amin(-2, keepdim=True)
    kmax = torch.where(member, k, -inf).amax(-2, keepdim=True)
    empty = ~member.any(-2, keepdim=True)
    kmin = torch.where(empty, torch.zeros_like(kmin), kmin)
    kmax = torch.where(empty, torch.zeros_like(kmax), kmax)
    m, s = quant_params(kmin, kmax, bits)
    return dequantize(quantize(k, m, s, bits), m, s)


def fake_quantize_masked(k: torch.Tensor, v: torch.Tensor, salient: torch.Tensor,
                         hi_bits: int, lo_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``k, v [N, B, H, D]``, ``salient bool [N, H, B]`` -> float32 ``[N, B, H, D]``."""
    kf = sanitize(k).permute(0, 2, 1, 3)
    vf = sanitize(v).permute(0, 2, 1, 3)
    hi = salient.unsqueeze(-1)
    k_hat = torch.where(hi, _key_group(kf, hi, hi_bits), _key_group(kf, ~hi, lo_bits))
    c = _channel_scale(vf).float().unsqueeze(-2)
    vn = vf / c
    out = []
    for bits in (hi_bits, lo_bits):
        m, s = quant_params(vn.amin(-1, keepdim=True), vn.amax(-1, keepdim=True), bits)
        out.append(dequantize(quantize(vn, m, s, bits), m, s))
    v_hat = torch.where(hi, out[0], out[1]) * c
    return k_hat.permute(0, 2, 1, 3), v_hat.permute(0, 2, 1, 3)
