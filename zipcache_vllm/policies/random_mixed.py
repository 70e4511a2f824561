"""Random saliency at the zipcache bit mix: the floor any saliency metric must beat."""
import torch

from .base import KVPolicy


class RandomMixedPolicy(KVPolicy):
    def block_scores(self, probs, probe_pos, key_pos, num_kv_heads, window_end, seed):
        gen = torch.Generator().manual_seed(self.preset.probes.seed * 1_000_003 + seed)
        return torch.rand(num_kv_heads, key_pos.numel(), generator=gen)
