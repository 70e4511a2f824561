"""KIVI-style uniform quantization: per-channel keys, per-token values, no saliency."""
import torch

from .base import KVPolicy


class KiviPolicy(KVPolicy):
    def block_scores(self, probs, probe_pos, key_pos, num_kv_heads, window_end, seed):
        return torch.zeros(num_kv_heads, key_pos.numel())
