"""Random saliency at the zipcache bit mix: the floor any saliency metric must beat."""
import torch

from .base import KVPolicy, register


@register("random_mixed")
class RandomMixedPolicy(KVPolicy):
    """Salient = random, drawn from the block's position (reproducible however the
    block's tokens were split into steps)."""

    uses_attention = False

    def rank(self, score, count, block_starts, window_ends=None):
        H, B = score.shape[1], score.shape[2]
        seed = self.preset.probes.seed
        return torch.stack([
            torch.rand(H, B, generator=torch.Generator().manual_seed((seed * 1_000_003 + p) % (2 ** 63)))
            for p in block_starts]).to(score.device)
