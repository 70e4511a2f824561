"""The base class of every KV policy.

A policy decides how the tokens of a completed block are stored. Quantizing
policies differ only in how they score tokens: subclass :class:`KVPolicy`,
override :meth:`block_scores`, register the class in ``POLICIES``
(``__init__.py``) and add a preset YAML in ``configs/`` (docs/POLICIES.md).
"""
from __future__ import annotations

import torch

from ..config import Preset
from ..kernels import hadamard_rotate
from ..layout import BF16_BYTES, BlockLayout
from ..quant.block import fake_quantize_blocks, topk_salient_mask
from ..quant.masked import fake_quantize_masked
from ..saliency import normalized_scores


class KVPolicy:
    """Quantizing policy: score tokens, keep the top ``n_salient`` per block at ``hi_bits``."""

    def __init__(self, preset: Preset):
        self.preset = preset

    @property
    def name(self) -> str:
        return self.preset.name

    def layout(self, head_size: int, num_kv_heads: int) -> BlockLayout:
        return BlockLayout.from_preset(self.preset, head_size, num_kv_heads)

    def bytes_per_token_per_head(self, head_size: int) -> float:
        return self.layout(head_size, 1).bytes_per_token_per_head

    def block_scores(self, probs: torch.Tensor, probe_pos: torch.Tensor, key_pos: torch.Tensor,
                     num_kv_heads: int, window_end: int, seed: int) -> torch.Tensor:
        """Saliency ``[Hk, W]`` of ``W`` tokens from probe attention ``probs [Hq, P, W]``."""
        return normalized_scores(probs, probe_pos, key_pos, num_kv_heads,
                                 self.preset.probes.normalize, window_end)

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Block-local top-k: ``scores [N, Hk, B]`` -> bool salient mask."""
        return topk_salient_mask(scores, self.preset.n_salient)

    def compress(self, k: torch.Tensor, v: torch.Tensor, salient: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized ``k, v [N, B, Hk, D]`` as the engine's pages would return them
        (rotated keys rotated back: ``R`` is its own inverse)."""
        rotate = self.preset.key_rotation == "hadamard"
        if rotate:
            k = hadamard_rotate(k)
        if bool((salient.sum(-1) == self.preset.n_salient).all()):
            k_hat, v_hat = fake_quantize_blocks(k, v, salient, self.layout(k.shape[-1], k.shape[-2]))
        else:
            k_hat, v_hat = fake_quantize_masked(k, v, salient, self.preset.hi_bits, self.preset.lo_bits)
        return (hadamard_rotate(k_hat) if rotate else k_hat), v_hat


class NoCompression(KVPolicy):
    """The bf16 cache: the baseline every other policy is measured against."""

    def bytes_per_token_per_head(self, head_size: int) -> float:
        return 2 * head_size * BF16_BYTES

    def layout(self, head_size: int, num_kv_heads: int) -> BlockLayout:
        raise ValueError("the 'none' policy stores bf16 blocks, not zipcache pages")

    def compress(self, k, v, salient):
        return k.to(torch.bfloat16).float(), v.to(torch.bfloat16).float()
