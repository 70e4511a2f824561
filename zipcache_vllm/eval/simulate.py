"""Offline simulation of the paged engine: a HF attention function that applies a policy.

The sequence is processed the way the served engine processes a request: the
prompt (``prefill_len`` tokens) in one chunk, then chunks of ``chunk_size``
tokens (``chunk_size = block_size`` is exactly token-by-token decode with a
staging block). A query sees

* the tokens of its own chunk in full precision (causal), and
* the tokens of earlier chunks as the policy stored them (dequantized pages,
  or evicted for FastGen).

When a chunk completes blocks, each block's saliency comes from the probe
queries of its window (``saliency_window="block"``: queries inside the block,
what the engine does; ``"chunk"``: queries of the whole chunk, the paper's
prompt probes; ``"oracle"``: the paper's exact normalized attention over the
whole sequence, future queries included, from an uncompressed pass: an
offline upper bound no engine can compute), using the probabilities of the
real attention (softmax over the whole visible context), and the block is
compressed. A trailing partial
block stays in full precision (the staging block).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..policies import FastGenPolicy, KVPolicy, NoCompression
from ..saliency import probe_rows


@dataclass
class SimConfig:
    prefill_len: int
    chunk_size: int
    saliency_window: Literal["block", "chunk", "oracle"] = "block"
    # Staged tokens in 8 bits per token and head (``_fake_int8``, the engine's 8-bit staging):
    # until its block is packed, every query reads a token as its 8-bit rounding (its own
    # chunk's too, as the engine does however the request is split into chunks), and the
    # block is packed from those 8 bits. None: as the policy's preset says (``staging_bits``;
    # unset: the model's precision); 8 forces it.
    staging_bits: int | None = None
    # Blocks a filled block waits in staging before it is packed: its saliency also counts
    # the probe rows of the next ``saliency_delay`` blocks (0: packed when it fills). None:
    # as the policy's preset says (``saliency_delay``), as the engine does.
    saliency_delay: int | None = None
    # Gaussian noise added to each layer's q, k and v, relative to the tensor's max |value|
    # (seeded by layer and length): the simulation's own sensitivity to inputs that differ
    # by float32 rounding, the floor of any engine-vs-simulation comparison (eval/fidelity.py).
    input_noise: float = 0.0


@dataclass
class SimStats:
    """Per-layer facts gathered while simulating one sequence."""

    kept_fraction: dict[int, float] = field(default_factory=dict)
    fastgen_choice: dict[int, list[int]] = field(default_factory=dict)


def _expand(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x.repeat_interleave(groups, dim=0) if groups > 1 else x


def _chunk_probs(q: torch.Tensor, keys: torch.Tensor, c0: int, c1: int, scale: float,
                 window: int | None = None) -> torch.Tensor:
    """Causal attention probabilities ``[Hq, c1 - c0, c1]`` of queries ``c0..c1`` over keys
    ``0..c1``; with a sliding ``window``, query ``p`` sees keys in ``(p - window, p]``."""
    logits = torch.einsum("hqd,hkd->hqk", q[:, c0:c1], keys) * scale
    qpos = torch.arange(c0, c1).unsqueeze(1)
    kpos = torch.arange(c1).unsqueeze(0)
    hidden = kpos > qpos if window is None else (kpos > qpos) | (kpos <= qpos - window)
    logits.masked_fill_(hidden, float("-inf"))
    return torch.softmax(logits, -1)


class KVSimulator:
    """Callable with the signature of a transformers attention function.

    ``special`` and ``punct`` (bool ``[L]``) mark the sequence's special and
    punctuation tokens (FastGen only). Set them with :meth:`reset` before each
    sequence.
    """

    def __init__(self, policy: KVPolicy, cfg: SimConfig, rotated: list[bool] | None = None):
        """``rotated``: the model's calibration (``calibration.rotated_layers``), which
        resolves a ``calibrated`` key rotation per layer as the engine does; None: every
        layer rotated (:func:`~.offline.simulated_logprobs` reads the model's own)."""
        block = policy.preset.block_size
        if cfg.chunk_size % block or cfg.chunk_size <= 0 or cfg.prefill_len < 0:
            raise ValueError(f"chunk_size must be a positive multiple of the block size {block}")
        self.policy, self.cfg, self.block = policy, cfg, block
        self.rotated = rotated
        self._layer_policies: dict[int, KVPolicy] = {}
        self.special = self.punct = None
        self.stats = SimStats()

    def reset(self, special: torch.Tensor | None = None, punct: torch.Tensor | None = None) -> None:
        self.special, self.punct = special, punct
        self.stats = SimStats()

    @property
    def saliency_delay(self) -> int:
        """Blocks a filled block waits before it is packed: the config's, else the preset's."""
        if self.cfg.saliency_delay is not None:
            return self.cfg.saliency_delay
        return getattr(self.policy, "saliency_delay", 0)

    def chunks(self, L: int) -> list[tuple[int, int]]:
        """The prompt, then up to the next block boundary, then ``chunk_size`` steps."""
        B = self.block
        bounds = [0, min(self.cfg.prefill_len, L)] if self.cfg.prefill_len else [0]
        if bounds[-1] % B and bounds[-1] < L:
            bounds.append(min(-(-bounds[-1] // B) * B, L))
        while bounds[-1] < L:
            bounds.append(min(bounds[-1] + self.cfg.chunk_size, L))
        return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]

    def __call__(self, module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                 sliding_window: int | None = None, **kwargs):
        """``sliding_window`` (transformers passes it for a sliding-window layer): a query
        at ``p`` sees keys in ``(p - sliding_window, p]``, as the engine's windowed reads."""
        if query.shape[0] != 1:
            raise ValueError("the simulator runs one sequence at a time")
        q, k, v = query[0].float(), key[0].float(), value[0].float()
        if self.cfg.input_noise:
            g = torch.Generator().manual_seed(1000 * module.layer_idx + q.shape[1])
            q, k, v = (x + torch.randn(x.shape, generator=g) * (self.cfg.input_noise * float(x.abs().max()))
                       for x in (q, k, v))
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        if sliding_window is not None and isinstance(self.policy, FastGenPolicy):
            raise NotImplementedError("sliding windows are simulated for the quantizing policies "
                                      "(FastGen is refused on sliding-window models)")
        if isinstance(self.policy, FastGenPolicy) and self.policy.paged:
            from .fastgen_sim import simulate_paged

            out = simulate_paged(self, q, k, v, scale, module.layer_idx)
        elif isinstance(self.policy, FastGenPolicy):
            out = self._fastgen(q, k, v, scale, module.layer_idx)
        else:
            out = self._paged(q, k, v, scale, window=sliding_window,
                              policy=self.layer_policy(module.layer_idx))
        return out.transpose(0, 1).unsqueeze(0).to(query.dtype), None

    def layer_policy(self, layer: int) -> KVPolicy:
        """The policy as layer ``layer`` stores its pages (a ``calibrated`` key rotation
        resolved by :attr:`rotated`)."""
        preset = self.policy.preset
        if preset.key_rotation != "calibrated":
            return self.policy
        if layer not in self._layer_policies:
            from ..calibration import layer_preset

            self._layer_policies[layer] = type(self.policy)(layer_preset(preset, self.rotated, layer))
        return self._layer_policies[layer]

    def _paged(self, q, k, v, scale, masks=None, window=None, policy=None):
        """Chunk by chunk over a cache whose completed blocks are compressed.

        The probe rows that score a block may come from several chunks (a block
        that straddles the prompt's end is finished by decode steps, as in the
        engine, where the staging block accumulates them): their attention
        pieces are kept until the block completes.
        """
        hq, L, _ = q.shape
        hk = k.shape[0]
        g = hq // hk
        B = self.block
        policy = policy or self.policy
        identity = isinstance(policy, NoCompression)
        if not identity and masks is None and (policy.preset.topk_scope == "sequence"
                                               or self.cfg.saliency_window == "oracle"):
            masks = self._prepass_masks(q, k, scale, window)
        kc, vc = k, v  # tokens of blocks not yet packed, as every query reads them
        if (self.cfg.staging_bits or policy.preset.staging_bits) == 8:
            kc = _staged_int8(k, policy.preset.key_rotation != "none")
            vc = _staged_int8(v, policy.preset.value_rotation == "hadamard")
        k_st, v_st = kc.clone(), vc.clone()
        d = self.saliency_delay  # a block is packed when the d-th block after it fills
        out = torch.empty_like(q)
        pending: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for c0, c1 in self.chunks(L):
            keys = _expand(torch.cat([k_st[:, :c0], kc[:, c0:c1]], 1), g)
            vals = _expand(torch.cat([v_st[:, :c0], vc[:, c0:c1]], 1), g)
            probs = _chunk_probs(q, keys, c0, c1, scale, window)
            out[:, c0:c1] = torch.einsum("hqk,hkd->hqd", probs, vals)
            if identity:
                continue
            if masks is None:
                for j in range(max(0, c0 // B - d), -(-c1 // B)):
                    pending.setdefault(j, []).append(self._probe_piece(probs, c0, c1, j))
            blocks = [j for j in range(max(0, c0 // B - d), c1 // B - d)]
            if not blocks:
                continue
            if masks is not None:
                sal = torch.stack([masks[j] for j in blocks])
            else:
                sal = policy.select(torch.stack([self._scores(pending.pop(j), j, c1, hk) for j in blocks]))
            sl = slice(blocks[0] * B, (blocks[-1] + 1) * B)
            # packed from what staging holds (tokens of earlier steps) and the chunk's own tokens
            m = min(max(c0, sl.start), sl.stop)  # staged before this chunk | the chunk's own
            k_in = torch.cat([k_st[:, sl.start:m], kc[:, m:sl.stop]], 1)
            v_in = torch.cat([v_st[:, sl.start:m], vc[:, m:sl.stop]], 1)
            kb = k_in.transpose(0, 1).reshape(len(blocks), B, hk, -1)
            vb = v_in.transpose(0, 1).reshape(len(blocks), B, hk, -1)
            kh, vh = policy.compress(kb, vb, sal)
            k_st[:, sl] = kh.reshape(-1, hk, kh.shape[-1]).transpose(0, 1)
            v_st[:, sl] = vh.reshape(-1, hk, vh.shape[-1]).transpose(0, 1)
        return out

    def _probe_piece(self, probs, c0, c1, j):
        """Probe rows of this chunk for block ``j``: ``(probs [Hq, P, B], positions [P])``."""
        B = self.block
        probes = self.policy.preset.probes
        if self.cfg.saliency_window == "block":
            rows = torch.cat([probe_rows(B, probes, seed=i * B) + i * B
                              for i in range(j, j + 1 + self.saliency_delay)])
        else:
            rows = probe_rows(c1 - c0, probes, seed=c0) + c0
        rows = rows[(rows >= c0) & (rows < c1)]
        piece = probs.new_zeros(probs.shape[0], rows.numel(), B)
        hi = min((j + 1) * B, c1)
        piece[..., :hi - j * B] = probs[:, rows - c0, j * B:hi]
        return piece, rows

    def _scores(self, pieces, j, c1, hk):
        """Saliency ``[Hk, B]`` of block ``j`` from its accumulated probe pieces."""
        B = self.block
        p = torch.cat([x for x, _ in pieces], 1)
        rows = torch.cat([r for _, r in pieces])
        end = (j + 1 + self.saliency_delay) * B if self.cfg.saliency_window == "block" else c1
        return self.policy.rank_from_probs(p, rows, torch.arange(j * B, (j + 1) * B), hk, end, j * B)

    def _block_scores(self, probs, c0, c1, j, hk):
        """Saliency of block ``j`` from one chunk's attention (the uncompressed prepass)."""
        return self._scores([self._probe_piece(probs, c0, c1, j)], j, c1, hk)

    def _prepass_masks(self, q, k, scale, window=None):
        """Salient masks from an uncompressed pass: sequence-global top-k and/or oracle scores."""
        hk = k.shape[0]
        g = q.shape[0] // hk
        B = self.block
        L = q.shape[1]
        scores = {}
        if self.cfg.saliency_window == "oracle":
            chunks = [(0, L)]
        else:
            chunks = self.chunks(L)
        for c0, c1 in chunks:
            keys = _expand(k[:, :c1], g)
            probs = _chunk_probs(q, keys, c0, c1, scale, window)
            for j in range(c0 // B, c1 // B):
                if self.cfg.saliency_window == "oracle":
                    pos = torch.arange(L)
                    scores[j] = self.policy.rank_from_probs(probs[:, :, j * B:(j + 1) * B], pos,
                                                            pos[j * B:(j + 1) * B], hk, L, j * B)
                else:
                    scores[j] = self._block_scores(probs, c0, c1, j, hk)
        if not scores:
            return {}
        order = sorted(scores)
        if self.policy.preset.topk_scope == "block":
            return {j: self.policy.select(scores[j].unsqueeze(0))[0] for j in order}
        flat = torch.cat([scores[j] for j in order], -1)
        n = self.policy.preset.n_salient * len(order)
        idx = torch.sort(torch.nan_to_num(flat, nan=float("-inf")), dim=-1, descending=True, stable=True).indices[:, :n]
        sel = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, idx, True)
        return {j: sel[:, i * B:(i + 1) * B] for i, j in enumerate(order)}

    def _fastgen(self, q, k, v, scale, layer):
        """Exact prefill, per-head profiling at its end, policy-masked attention after."""
        policy: FastGenPolicy = self.policy
        hq, L, _ = q.shape
        hk = k.shape[0]
        g = hq // hk
        P = min(self.cfg.prefill_len, L)
        special = self.special if self.special is not None else torch.zeros(L, dtype=torch.bool)
        punct = self.punct if self.punct is not None else torch.zeros(L, dtype=torch.bool)
        if policy.cfg.kept_bits == 8:
            k, v = _fake_int8(k), _fake_int8(v)
        kx, vx = _expand(k, g), _expand(v, g)
        logits = torch.einsum("hqd,hkd->hqk", q, kx) * scale
        pos = torch.arange(L)
        causal = pos.unsqueeze(0) <= pos.unsqueeze(1)
        prompt = torch.softmax(logits[:, :P, :P].masked_fill(~causal[:P, :P], float("-inf")), -1)
        choice, freq = policy.profile(prompt, special[:P], punct[:P], hk)
        frequent = torch.zeros(hk, L, dtype=torch.bool)
        frequent[:, :P] = freq
        vis = torch.ones(hk, L, L, dtype=torch.bool) & causal
        if P < L:
            vis[:, P:] = policy.visible(choice, frequent, special, punct, pos, pos[P:])
        probs = torch.softmax(logits.masked_fill(~_expand(vis, g), float("-inf")), -1)
        self.stats.kept_fraction[layer] = float(vis[:, -1].float().sum(-1).mean() / L)
        self.stats.fastgen_choice[layer] = choice.tolist()
        return torch.einsum("hqk,hkd->hqd", probs, vx)


def _staged_int8(x: torch.Tensor, rotated: bool) -> torch.Tensor:
    """``[H, L, D]`` as 8-bit staging reads it back: the engine stages keys (values) of a
    rotated preset rotated, so they are rounded in the rotated basis."""
    if not rotated:
        return _fake_int8(x)
    from ..kernels import hadamard_rotate

    return hadamard_rotate(_fake_int8(hadamard_rotate(x)))


def _fake_int8(x: torch.Tensor) -> torch.Tensor:
    """Per-token 8-bit round trip of ``[H, L, D]`` (FastGen's kept_bits=8 storage, and 8-bit
    staging: the bits ``zipcache::decode_paged`` stores)."""
    from ..kernels.portable import fake_quantize_rows8

    return fake_quantize_rows8(x)
