"""Bit packing of integer codes along the last dimension.

Codes are a little-endian bit stream: code ``j`` occupies bits ``[j*b, (j+1)*b)``
of the row, so for ``b`` in {1, 2, 4} byte ``i`` holds codes ``i*8/b ..`` with
the first code in the lowest bits, and 3-bit codes pack 8 codes into 3 bytes.
"""
from __future__ import annotations

import torch


def _check(bits: int, n: int) -> None:
    if bits not in (1, 2, 3, 4, 8):
        raise ValueError(f"bits must be one of 1, 2, 3, 4, 8; got {bits}")
    if (n * bits) % 8:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole bytes")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes`` (uint8, ``[..., n]``, values < 2**bits) into ``[..., n*bits/8]`` bytes."""
    n = codes.shape[-1]
    _check(bits, n)
    if bits == 8:
        return codes.to(torch.uint8)
    lead = codes.shape[:-1]
    c = codes.to(torch.int32)
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int32, device=c.device) * bits
        return (c.reshape(*lead, n // per, per) << shifts).sum(-1).to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int32, device=c.device)
    stream = ((c.unsqueeze(-1) >> shifts) & 1).reshape(*lead, n * bits // 8, 8)
    weights = torch.arange(8, dtype=torch.int32, device=c.device)
    return (stream << weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``[..., n*bits/8]`` bytes to ``[..., n]`` uint8 codes."""
    _check(bits, n)
    if packed.shape[-1] != n * bits // 8:
        raise ValueError(f"expected {n * bits // 8} bytes per row, got {packed.shape[-1]}")
    if bits == 8:
        return packed.to(torch.uint8)
    lead = packed.shape[:-1]
    p = packed.to(torch.int32)
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int32, device=p.device) * bits
        return ((p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(*lead, n).to(torch.uint8)
    weights = torch.arange(8, dtype=torch.int32, device=p.device)
    stream = ((p.unsqueeze(-1) >> weights) & 1).reshape(*lead, n, bits)
    shifts = torch.arange(bits, dtype=torch.int32, device=p.device)
    return (stream << shifts).sum(-1).to(torch.uint8)
