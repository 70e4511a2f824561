"""The base class of every KV policy, and the registry of methods.

A policy decides how the tokens of a completed block are stored and read. Both the
served engine (``engine/step.py``) and the offline simulator (``eval/simulate.py``)
call the same hooks of the same object:

* :attr:`KVPolicy.uses_attention`: does the step accumulate probe attention for it;
* :meth:`KVPolicy.rank`: the ranking of a filled block's tokens from those accumulators;
* :meth:`KVPolicy.select` and :meth:`KVPolicy.layout`: which tokens are salient, and the
  page (its bytes) they are packed into;
* :meth:`KVPolicy.pack`: a filled block's page (the engine; :meth:`select` then the
  kernels' packing unless a policy stores its pages differently);
* :meth:`KVPolicy.packed_view`: the packed pages as the attention kernels read them;
* :meth:`KVPolicy.compress`: the simulator's dequantized view of a packed block.

A policy that keeps per-request state across steps (FastGen's per-head rungs and
token classes) also returns an engine state from :meth:`KVPolicy.engine_state` and
sees each row's finished attention through :meth:`KVPolicy.observe_attention`; two
flags shape its step (:attr:`KVPolicy.fused_decode`, :attr:`KVPolicy.blockwise_chunks`).
A quantizing policy needs none of these.

A new method is one class decorated with :func:`register` in a module of this package
and one preset YAML in ``configs/`` (docs/POLICIES.md).
"""
from __future__ import annotations

from functools import cached_property
from typing import Callable

import torch

from ..config import Preset
from ..kernels import hadamard_rotate, quantize_pack
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
    #: One-token rows of a step run together in the fused decode kernel
    #: (``engine/step.apply_decode_rows``); False: each runs as a chunk of one token.
    fused_decode: bool = True
    #: A chunk of several tokens runs one block at a time, each block reading the blocks
    #: filled before it packed (``engine/step._apply_chunk``); False: the whole chunk is
    #: one full-precision window after the packed pages.
    blockwise_chunks: bool = True

    def __init__(self, preset: Preset):
        self.preset = preset

    @property
    def name(self) -> str:
        return self.preset.name

    @property
    def saliency_delay(self) -> int:
        """Blocks a filled block waits in staging, scored by the next blocks' probe rows,
        before :meth:`pack` (the preset's ``saliency_delay``)."""
        return self.preset.saliency_delay

    @property
    def staged_blocks(self) -> int:
        """Blocks a request stages at most: the one being filled and the delayed ones."""
        return self.preset.staged_blocks

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

    def pack(self, k: torch.Tensor, v: torch.Tensor, ranks: torch.Tensor, layout,
             row=None) -> torch.Tensor:
        """Pages ``uint8 [n, page_bytes]`` of ``n`` filled blocks ``k, v [n, B, Hk, D]`` ranked
        by ``ranks [n, Hk, B]`` (:meth:`rank`); ``row``: the row's engine state
        (:meth:`engine_state`), None for a policy without one."""
        return quantize_pack(k, v, self.select(ranks), layout)

    def packed_view(self, pages: torch.Tensor, layout) -> tuple[torch.Tensor, BlockLayout]:
        """The packed pages ``uint8 [N, page_bytes]`` as the attention kernels read them, and
        the :class:`BlockLayout` they read them with."""
        return pages, layout

    def engine_state(self, num_layers: int, num_slots: int, num_kv_heads: int, block_size: int,
                     tokenizer: str | None, device: torch.device | str = "cpu"):
        """State one engine keeps for this policy beside its staging pool (None: none).

        A state has ``prepare(plans, token_ids)`` (once per step, by the metadata
        builder: per-row data from the step's token ids), ``row(layer, plan, prepared,
        pages, layout)`` (a row's state for one layer's step) and ``store(layer, plan,
        row)`` (after the row's step). ``num_slots``: the staging pool's slots, which
        index the per-request state.
        """
        return None

    def observe_attention(self, row, qs: torch.Tensor, kw: torch.Tensor, lse: torch.Tensor) -> None:
        """A row's finished attention over its local window: scaled queries ``qs [Hk, g, q, D]``,
        window keys ``kw [Hk, s + q, D]`` and the log-sum-exp ``lse [Hk, g, q]`` over all its
        keys (called only for a policy with an :meth:`engine_state`)."""

    def compress(self, k: torch.Tensor, v: torch.Tensor, salient: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized ``k, v [N, B, Hk, D]`` as the engine's pages would return them
        (rotated keys and values rotated back: ``R`` is its own inverse)."""
        rotate_k = self.preset.key_rotation != "none"  # calibrated: unresolved = every layer
        rotate_v = self.preset.value_rotation == "hadamard"
        if rotate_k:
            k = hadamard_rotate(k)
        if rotate_v:
            v = hadamard_rotate(v)
        if bool((salient.sum(-1) == self.preset.n_salient).all()):
            k_hat, v_hat = fake_quantize_blocks(k, v, salient, self.layout(k.shape[-1], k.shape[-2]))
        else:
            k_hat, v_hat = fake_quantize_masked(k, v, salient, self.preset.hi_bits, self.preset.lo_bits)
        return (hadamard_rotate(k_hat) if rotate_k else k_hat), (hadamard_rotate(v_hat) if rotate_v else v_hat)


@register("none")
class NoCompression(KVPolicy):
    """The bf16 cache: the baseline every other policy is measured against."""

    def bytes_per_token_per_head(self, head_size: int) -> float:
        return 2 * head_size * BF16_BYTES

    def layout(self, head_size: int, num_kv_heads: int) -> BlockLayout:
        raise ValueError("the 'none' policy stores bf16 blocks, not zipcache pages")

    def compress(self, k, v, salient):
        return k.to(torch.bfloat16).float(), v.to(torch.bfloat16).float()
