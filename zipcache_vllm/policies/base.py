"""The base class of every KV policy, and the registry of methods.

A policy decides how the tokens of a completed block are stored. Both the served
engine (``engine/step.py``, ``engine/fastgen.py``) and the offline simulator
(``eval/simulate.py``) call the same hooks of the same object:

* :attr:`KVPolicy.uses_attention`: does the step accumulate probe attention for it;
* :meth:`KVPolicy.rank`: the ranking of a filled block's tokens from those accumulators;
* :meth:`KVPolicy.select` and :meth:`KVPolicy.layout`: which tokens are salient, and the
  page (its bytes) they are packed into;
* :meth:`KVPolicy.compress`: the simulator's dequantized view of a packed block.

A new method is one class decorated with :func:`register` in a module of this package
and one preset YAML in ``configs/`` (docs/POLICIES.md).
"""
from __future__ import annotations

from functools import cached_property
from typing import Callable

import torch

from ..config import Preset
from ..kernels import hadamard_rotate
from ..layout import BF16_BYTES, BlockLayout
from ..quant.block import fake_quantize_blocks, topk_salient_mask
from ..quant.masked import fake_quantize_masked
from ..saliency import accumulated_scores, normalize_accumulated, visible_counts

#: ``method`` name of a preset -> its policy class, filled by :func:`register` when the
#: modules of this package are imported (``__init__.py`` imports them all).
POLICIES: dict[str, type["KVPolicy"]] = {}


def register(method: str) -> Callable[[type["KVPolicy"]], type["KVPolicy"]]:
    """Class decorator: presets with ``method: <method>`` run this policy."""
    def add(cls: type["KVPolicy"]) -> type["KVPolicy"]:
        if POLICIES.get(method, cls) is not cls:
            raise ValueError(f"policy method {method!r} is registered twice "
                             f"({POLICIES[method].__name__} and {cls.__name__})")
        POLICIES[method] = cls
        return cls
    return add


class KVPolicy:
    """Quantizing policy: rank a block's tokens, keep the top ``n_salient`` at ``hi_bits``.

    The base class is ZipCache's rule: normalized attention of the probe queries
    (``preset.probes``) of the token's own block.
    """

    #: The step accumulates probe attention (``engine/saliency.block_saliency``) for
    #: :meth:`rank`; a policy that ranks without attention sets it False (the step then
    #: skips that work and passes zero accumulators).
    uses_attention: bool = True

    def __init__(self, preset: Preset):
        self.preset = preset

    @property
    def name(self) -> str:
        return self.preset.name

    @cached_property
    def probes_json(self) -> str:
        """The probe config as a hashable key (``engine/saliency.probe_mask``'s cache)."""
        return self.preset.probes.model_dump_json()

    def layout(self, head_size: int, num_kv_heads: int) -> BlockLayout:
        return BlockLayout.from_preset(self.preset, head_size, num_kv_heads)

    def bytes_per_token_per_head(self, head_size: int) -> float:
        return self.layout(head_size, 1).bytes_per_token_per_head

    def rank(self, score: torch.Tensor, count: torch.Tensor, block_starts: list[int],
             window_ends: list[int] | None = None) -> torch.Tensor:
        """Ranking ``[n, Hk, B]`` of the tokens of ``n`` filled blocks (higher = salient).

        ``score [n, Hk, B]``: the probe attention each token received, summed over the
        probe rows and the query heads of its KV group; ``count [n, B]``: how many probe
        rows saw it; ``block_starts``: the position of each block's first token;
        ``window_ends``: the position after the last query of each block's saliency
        window (default, the engine's: the block's end).
        """
        B = score.shape[-1]
        starts = torch.tensor(block_starts, dtype=torch.int64).unsqueeze(1)
        ends = starts + B if window_ends is None else torch.tensor(window_ends).unsqueeze(1)
        return normalize_accumulated(score, count.unsqueeze(1), (starts + torch.arange(B)).unsqueeze(1),
                                     ends.unsqueeze(1), self.preset.probes.normalize)

    def rank_from_probs(self, probs: torch.Tensor, probe_pos: torch.Tensor, key_pos: torch.Tensor,
                        num_kv_heads: int, window_end: int, block_start: int) -> torch.Tensor:
        """:meth:`rank` ``[Hk, B]`` of one block from the probe attention ``probs [Hq, P, B]``
        of the probes at ``probe_pos`` over its keys at ``key_pos`` (the simulator's view):
        the same accumulators the engine keeps, then the same hook."""
        score = accumulated_scores(probs, num_kv_heads)
        count = visible_counts(probe_pos, key_pos).float()
        return self.rank(score[None], count[None], [block_start], [window_end])[0]

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Block-local top-k of :meth:`rank`: ``scores [N, Hk, B]`` -> bool salient mask."""
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


@register("none")
class NoCompression(KVPolicy):
    """The bf16 cache: the baseline every other policy is measured against."""

    def bytes_per_token_per_head(self, head_size: int) -> float:
        return 2 * head_size * BF16_BYTES

    def layout(self, head_size: int, num_kv_heads: int) -> BlockLayout:
        raise ValueError("the 'none' policy stores bf16 blocks, not zipcache pages")

    def compress(self, k, v, salient):
        return k.to(torch.bfloat16).float(), v.to(torch.bfloat16).float()
