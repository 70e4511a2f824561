"""Asymmetric uniform quantization with float16 parameters.

``q = clamp(round((x - m) / s), 0, 2^b - 1)``, ``x^ = q * s + m``. The stored
parameters are float16, rounded so that the grid still covers the data: the
zero point ``m`` is rounded down and the step ``s`` up, computed from the
rounded ``m``. Hence every reconstructed element is within half a stored step
of its input (the bound the tests check). A constant input gives ``s = EPS``
and exact reconstruction instead of a division by zero.

Inputs are sanitized first (defined behaviour for adversarial values): NaN
becomes 0, and magnitudes saturate to the float16 range (+-65504), since the
parameters are stored in float16.
"""
from __future__ import annotations

import torch

EPS = 2.0 ** -14  # smallest normal float16: step of a constant group
FP16_MAX = 65504.0


def sanitize(x: torch.Tensor) -> torch.Tensor:
    """float32 copy of ``x`` with NaN -> 0 and values clamped to +-65504."""
    return torch.nan_to_num(x.float(), nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX).clamp_(-FP16_MAX, FP16_MAX)


def fp16_round(x: torch.Tensor, up: bool) -> torch.Tensor:
    """Round float32 ``x`` to float16 towards +inf (``up``) or -inf, saturating."""
    y = x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
    yf = y.float()
    target = torch.full_like(y, float("inf") if up else float("-inf"))
    wrong = yf < x if up else yf > x
    y = torch.where(wrong, torch.nextafter(y, target), y)
    return y.clamp(-FP16_MAX, FP16_MAX)


def quant_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 ``(min, step)`` whose b-bit grid covers ``[xmin, xmax]`` (float32 inputs)."""
    if bits < 2:
        raise ValueError(f"bits must be >= 2 (a 1-bit step cannot cover the float16 range), got {bits}")
    levels = (1 << bits) - 1
    m = fp16_round(xmin, up=False)
    s = fp16_round(((xmax - m.float()) / levels).clamp_min(EPS), up=True)
    return m, s


def quantize(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of float32 ``x`` on the grid ``(m, s)`` (broadcast)."""
    q = torch.round((x - m.float()) / s.float())
    return q.clamp_(0, (1 << bits) - 1).to(torch.uint8)


def dequantize(q: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """float32 reconstruction ``q * s + m`` (broadcast)."""
    return q.float() * s.float() + m.float()
