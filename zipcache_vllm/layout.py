"""The byte layout of one zipcache page: the single place that defines it.

A page is one vLLM block of ``B`` tokens for ALL KV heads of one layer. It is
self-contained (no page needs another page to be decoded) and has a fixed
size, so vLLM can allocate it like any other page. Inside, it is one section
per KV head, head-major, so a kernel serving one KV head reads one contiguous
run of bytes::

    page (page_bytes) = [ head 0 | head 1 | ... | head H-1 ]

    one head section (head_bytes), with n_hi salient tokens and n_lo = B - n_hi
    regular ones; codes are stored in "storage order": the salient tokens in
    ascending position, then the regular tokens in ascending position.

    offset 0 ┌──────────────────────────────────────────────┐
             │ K hi codes   n_hi x D x hi_bits / 8   uint8  │  keys, salient group
             │ K lo codes   n_lo x D x lo_bits / 8   uint8  │  keys, regular group
             │ V hi codes   n_hi x D x hi_bits / 8   uint8  │  values, salient group
             │ V lo codes   n_lo x D x lo_bits / 8   uint8  │  values, regular group
             ├──────────────────────────────────────────────┤
             │ K hi min, K hi scale   2 x D        float16  │  per channel, per group
             │ K lo min, K lo scale   2 x D        float16  │  (a group with no token
             │                                              │   has no parameters)
             │ V channel scale c      D            float16  │  sqrt(max_t |v_tj|), per block
             │ V token min, step      2 x B        float16  │  per token (storage order)
             ├──────────────────────────────────────────────┤
             │ precision mask         ceil(B / 8)  uint8    │  bit t set: token t salient
             │                                              │  (only when both groups exist)
             │ padding to ALIGN bytes                       │
             └──────────────────────────────────────────────┘

Keys are quantized channelwise (one min/scale per channel over the group's
tokens); values are channel-separable tokenwise (CSTQ): divided by the channel
scale ``c``, then quantized per token. All parameters are float16. With
``rotate_keys`` the key codes hold ``k R`` (``R``: the orthonormal Hadamard
rotation of ``quant/rotation.py``) and readers rotate the query by the same ``R``;
with ``rotate_values`` the value codes hold ``v R`` and the attention output is
rotated back (``(p . v R) R = p . v``); the bytes are the same. Everything
that needs a byte count (the vLLM backend's page size, the capacity planner,
the kernels) reads it from :class:`BlockLayout`; nothing recomputes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

# Quantization bit widths. 1 bit is excluded: after saturation a group may span
# [-65504, 65504], and a 1-bit step of 131008 does not fit the float16 parameters.
SUPPORTED_BITS = (2, 3, 4, 8)
PARAM_BYTES = 2  # float16 scales and zero points
ALIGN = 16  # each head section starts on a 16-byte boundary (vector loads)
BF16_BYTES = 2


@dataclass(frozen=True)
class Section:
    """One named run of bytes inside a head section."""

    name: str
    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True)
class BlockLayout:
    """Exact byte layout of one (layer, block) page.

    Args:
        block_size: tokens per block ``B``.
        head_size: head dimension ``D``.
        num_kv_heads: KV heads stored in the page (per tensor-parallel rank).
        hi_bits: bit width of salient tokens.
        lo_bits: bit width of regular tokens.
        n_hi: salient tokens per (block, KV head); ``0`` and ``B`` give uniform
            quantization at ``lo_bits`` and ``hi_bits`` respectively.
        rotate_keys: keys are stored Hadamard-rotated (``D`` a power of two); same bytes.
        rotate_values: values are stored Hadamard-rotated (``D`` a power of two); same bytes.
    """

    block_size: int
    head_size: int
    num_kv_heads: int
    hi_bits: int = 4
    lo_bits: int = 2
    n_hi: int = 0
    rotate_keys: bool = False
    rotate_values: bool = False

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size % 8:
            raise ValueError(f"block_size must be a positive multiple of 8, got {self.block_size}")
        if self.head_size <= 0 or self.head_size % 8:
            raise ValueError(f"head_size must be a positive multiple of 8, got {self.head_size}")
        if self.num_kv_heads <= 0:
            raise ValueError(f"num_kv_heads must be positive, got {self.num_kv_heads}")
        for name in ("hi_bits", "lo_bits"):
            bits = getattr(self, name)
            if bits not in SUPPORTED_BITS:
                raise ValueError(f"{name} must be one of {SUPPORTED_BITS}, got {bits}")
        if not 0 <= self.n_hi <= self.block_size:
            raise ValueError(f"n_hi must be in [0, block_size={self.block_size}], got {self.n_hi}")
        for name in ("rotate_keys", "rotate_values"):
            if getattr(self, name) and self.head_size & (self.head_size - 1):
                raise ValueError(f"{name} needs a power-of-two head size, got {self.head_size}")

    @classmethod
    def from_preset(cls, preset, head_size: int, num_kv_heads: int) -> "BlockLayout":
        """Layout of a quantizing preset (``zipcache_vllm.config.Preset``)."""
        return cls(
            block_size=preset.block_size,
            head_size=head_size,
            num_kv_heads=num_kv_heads,
            hi_bits=preset.hi_bits,
            lo_bits=preset.lo_bits,
            n_hi=preset.n_salient,
            rotate_keys=preset.key_rotation != "none",
            rotate_values=preset.value_rotation == "hadamard",
        )

    @property
    def n_lo(self) -> int:
        return self.block_size - self.n_hi

    @property
    def mixed(self) -> bool:
        """Both precision groups are present (the mask is stored)."""
        return 0 < self.n_hi < self.block_size

    def code_row_bytes(self, bits: int) -> int:
        """Bytes of one token's packed codes for one head."""
        return self.head_size * bits // 8

    @cached_property
    def sections(self) -> tuple[Section, ...]:
        """The sections of one head section, in order (padding excluded)."""
        D, B = self.head_size, self.block_size
        sizes = [
            ("k_hi_codes", self.n_hi * self.code_row_bytes(self.hi_bits)),
            ("k_lo_codes", self.n_lo * self.code_row_bytes(self.lo_bits)),
            ("v_hi_codes", self.n_hi * self.code_row_bytes(self.hi_bits)),
            ("v_lo_codes", self.n_lo * self.code_row_bytes(self.lo_bits)),
            ("k_hi_params", 2 * D * PARAM_BYTES if self.n_hi else 0),
            ("k_lo_params", 2 * D * PARAM_BYTES if self.n_lo else 0),
            ("v_channel_scale", D * PARAM_BYTES),
            ("v_token_params", 2 * B * PARAM_BYTES),
            ("mask", (B + 7) // 8 if self.mixed else 0),
        ]
        out, offset = [], 0
        for name, nbytes in sizes:
            out.append(Section(name, offset, nbytes))
            offset += nbytes
        return tuple(out)

    def section(self, name: str) -> Section:
        for s in self.sections:
            if s.name == name:
                return s
        raise KeyError(f"no section {name!r}; sections: {[s.name for s in self.sections]}")

    @property
    def content_bytes(self) -> int:
        """Bytes of one head section before padding."""
        return self.sections[-1].end

    @property
    def padding_bytes(self) -> int:
        return self.head_bytes - self.content_bytes

    @property
    def head_bytes(self) -> int:
        """Bytes of one head section including padding to ``ALIGN``."""
        return -(-self.content_bytes // ALIGN) * ALIGN

    @property
    def page_bytes(self) -> int:
        """Bytes of one (layer, block) page: what vLLM allocates per block per layer."""
        return self.num_kv_heads * self.head_bytes

    @property
    def bytes_per_token_per_head(self) -> float:
        """Page bytes per token per KV head, all parameters and padding included."""
        return self.head_bytes / self.block_size

    @property
    def bf16_bytes_per_token_per_head(self) -> int:
        return 2 * self.head_size * BF16_BYTES

    @property
    def compression_vs_bf16(self) -> float:
        """bf16 K+V bytes divided by page bytes (staging not included)."""
        return self.bf16_bytes_per_token_per_head / self.bytes_per_token_per_head

    @property
    def avg_code_bits(self) -> float:
        return (self.n_hi * self.hi_bits + self.n_lo * self.lo_bits) / self.block_size

    def breakdown(self) -> dict[str, float]:
        """Bytes per token per KV head of every part of the page (padding included)."""
        parts = {s.name: s.nbytes / self.block_size for s in self.sections}
        parts["padding"] = self.padding_bytes / self.block_size
        return parts


@dataclass(frozen=True)
class StagingLayout:
    """Where a request's partial block lives when staging is paged: in vLLM's own pages.

    A request stages up to ``blocks`` blocks (``capacity = blocks * B`` tokens): the block
    being filled and, with a preset's ``saliency_delay`` of ``blocks - 1``, the filled
    blocks that wait to be scored by the next blocks' queries before they are packed. The
    oldest staged block (index ``b`` of the request's block table) and the ones after it are
    staged in the pages of blocks ``b .. b + pages - 1`` of each layer: its own page
    (written packed only once its turn comes) and ``pages - 1`` blocks ahead (the KV-cache
    manager allocates ``lookahead_blocks`` ahead of every request). Page ``j`` of the run
    holds staged tokens ``j*T .. j*T + T - 1`` (``T = tokens_per_page``), all KV heads, with
    their saliency accumulators. K and V are held in the model dtype (``kv_bits`` None)::

        offset 0            K      [H, T, D]   model dtype
        v_offset            V      [H, T, D]   model dtype
        score_offset        score  [H, T]      float32   sum of (probe) attention
        count_offset        count  [T]         float32   (probe) queries that saw the token
        (rest of the page unused)

    or in 8 bits (``kv_bits`` 8): each token's row of each head quantized on its own
    (``quant.uniform``: asymmetric, float16 ``(min, step)`` covering the row)::

        offset 0            K codes   [H, T, D]      uint8
        v_offset            V codes   [H, T, D]      uint8
        params_offset       K params  [H, T, 2]      float16 (min, step)
        params_offset+4HT   V params  [H, T, 2]      float16
        score_offset        score     [H, T]         float32
        count_offset        count     [T]            float32

    A token is quantized once, when it is staged (a decode token before its own query
    attends it), and read back dequantized by every later step and by the packing of its
    block; 8 bits halve the bytes of a staged token (SmolLM2-135M: 424 instead of 784),
    so a running request holds half the staging blocks.

    Args:
        page_bytes: bytes of one page of the cache (the preset's layout).
        block_size, num_kv_heads, head_size: ``B``, ``H``, ``D``.
        elt_bytes: bytes of the model dtype (2 for bfloat16 / float16, 4 for float32).
        kv_bits: None (K and V in the model dtype) or 8 (the preset's ``staging_bits``).
        blocks: blocks staged at once, ``1 + saliency_delay`` of the preset.
    """

    page_bytes: int
    block_size: int
    num_kv_heads: int
    head_size: int
    elt_bytes: int = BF16_BYTES
    kv_bits: int | None = None
    blocks: int = 1

    def __post_init__(self) -> None:
        if self.elt_bytes not in (2, 4):
            raise ValueError(f"elt_bytes must be 2 or 4, got {self.elt_bytes}")
        if self.kv_bits not in (None, 8):
            raise ValueError(f"kv_bits must be None (the model dtype) or 8, got {self.kv_bits}")
        if self.blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {self.blocks}")
        if self.kv_bits == 8 and self.head_size % 2:
            raise ValueError(f"8-bit staging needs an even head size, got {self.head_size}")
        if self.tokens_per_page < 1:
            raise ValueError(
                f"a page of {self.page_bytes} bytes cannot stage one token of {self.token_bytes} "
                f"bytes (H={self.num_kv_heads}, D={self.head_size})")

    @classmethod
    def of(cls, layout, elt_bytes: int = BF16_BYTES, kv_bits: int | None = None,
           blocks: int = 1) -> "StagingLayout":
        """The staging of a page layout (:class:`BlockLayout` or :class:`FastGenLayout`)."""
        return cls(layout.page_bytes, layout.block_size, layout.num_kv_heads, layout.head_size,
                   elt_bytes, kv_bits, blocks)

    @property
    def capacity(self) -> int:
        """Tokens a request stages at most: ``blocks * block_size``."""
        return self.blocks * self.block_size

    @property
    def kv_elt_bytes(self) -> int:
        """Bytes of one staged K or V element (1: an 8-bit code)."""
        return 1 if self.kv_bits == 8 else self.elt_bytes

    @property
    def token_bytes(self) -> int:
        """Bytes of one staged token: K and V of every head (and their 8-bit parameters),
        its scores and its count."""
        H, D = self.num_kv_heads, self.head_size
        params = 8 * H if self.kv_bits == 8 else 0
        return 2 * H * D * self.kv_elt_bytes + params + 4 * H + 4

    @property
    def tokens_per_page(self) -> int:
        return self.page_bytes // self.token_bytes

    @property
    def pages(self) -> int:
        """Pages a request's staged tokens span: the oldest staged block's own page and
        ``pages - 1`` after it."""
        return -(-self.capacity // self.tokens_per_page)

    @property
    def lookahead_blocks(self) -> int:
        """Blocks each running request holds beyond its tokens' blocks: what a run of ``n``
        staged tokens writes reaches ``ceil(n / T)`` pages from its first block, and the
        request's tokens reach ``(n - 1) // B`` blocks past it, so the most over ``n``
        (at a full block, ``n = j * B``): ``pages - 1`` for one staged block. The run's pages
        after the ones its tokens reach may not be allocated yet: they are read, never
        written (``plan._page_run``)."""
        B, T = self.block_size, self.tokens_per_page
        return max(-(-j * B // T) - j for j in range(1, self.blocks + 1))

    @property
    def v_offset(self) -> int:
        return self.num_kv_heads * self.tokens_per_page * self.head_size * self.kv_elt_bytes

    @property
    def params_offset(self) -> int:
        """Start of the 8-bit rows' float16 ``(min, step)`` (K then V); the score section
        with K and V in the model dtype (no parameters)."""
        return 2 * self.v_offset

    @property
    def score_offset(self) -> int:
        params = 8 * self.num_kv_heads * self.tokens_per_page if self.kv_bits == 8 else 0
        return self.params_offset + params

    @property
    def count_offset(self) -> int:
        return self.score_offset + 4 * self.num_kv_heads * self.tokens_per_page

    @property
    def used_bytes(self) -> int:
        """Bytes of a staging page in use (the rest of the page is not touched)."""
        return self.count_offset + 4 * self.tokens_per_page

    def args(self) -> list[int]:
        """``[T, pages, elt_bytes, v_offset, score_offset, count_offset, kv_bits,
        params_offset, capacity]`` for the kernels (``kv_bits`` 0: the model dtype)."""
        return [self.tokens_per_page, self.pages, self.elt_bytes, self.v_offset,
                self.score_offset, self.count_offset, self.kv_bits or 0, self.params_offset,
                self.capacity]


# ---------------------------------------------------------------------------
# Paged FastGen (docs/FASTGEN.md): a block of B logical tokens keeps S token
# slots per KV head; the evicted B - S tokens take no bytes.
# ---------------------------------------------------------------------------

FASTGEN_RUNG_BYTES = 1  # uint8 per head: the head's profiled rung of the hybrid ladder
FASTGEN_COUNT_BYTES = 2  # uint16 per head: slots in use (little endian)


@dataclass(frozen=True)
class FastGenLayout:
    """Exact byte layout of one (layer, block) page of a paged FastGen preset.

    ::

        page (page_bytes) = [ kept | trailer ]

        kept     a zipcache page of S tokens (:class:`BlockLayout` with
                 block_size = S): head-major sections holding each head's own
                 S kept tokens (8-bit uniform, or ZipCache's 4/2-bit mix)
        trailer  rung uint8 [H], count uint16 [H], padding to ALIGN bytes

    The page covers ``block_size`` logical tokens, so vLLM's token capacity for
    the same bytes grows by ``block_size / slots`` over the kept storage.

    Args:
        block_size: logical tokens per block ``B``.
        kept: layout of the kept tokens (its ``block_size`` is ``S``).
    """

    block_size: int
    kept: BlockLayout

    def __post_init__(self) -> None:
        if not 0 < self.kept.block_size <= self.block_size:
            raise ValueError(f"slots must be in (0, block_size={self.block_size}], "
                             f"got {self.kept.block_size}")

    @classmethod
    def from_preset(cls, preset, head_size: int, num_kv_heads: int) -> "FastGenLayout":
        """Layout of a paged FastGen preset (``fastgen.slots`` set)."""
        fg = preset.fastgen
        if fg is None or fg.slots is None:
            raise ValueError(f"preset {preset.name} has no fastgen.slots: it has no pages")
        S = fg.slots
        if fg.mixed:
            kept = BlockLayout(S, head_size, num_kv_heads, preset.hi_bits, preset.lo_bits,
                               int(round(preset.salient_ratio * S)))
        else:
            kept = BlockLayout(S, head_size, num_kv_heads, fg.kept_bits, fg.kept_bits, 0)
        return cls(preset.block_size, kept)

    @property
    def slots(self) -> int:
        return self.kept.block_size

    @property
    def head_size(self) -> int:
        return self.kept.head_size

    @property
    def num_kv_heads(self) -> int:
        return self.kept.num_kv_heads

    @property
    def rotate_keys(self) -> bool:
        return self.kept.rotate_keys

    @property
    def rotate_values(self) -> bool:
        return self.kept.rotate_values

    @property
    def rung_section(self) -> Section:
        return Section("rung", self.kept.page_bytes, self.num_kv_heads * FASTGEN_RUNG_BYTES)

    @property
    def count_section(self) -> Section:
        return Section("count", self.rung_section.end, self.num_kv_heads * FASTGEN_COUNT_BYTES)

    @property
    def trailer_bytes(self) -> int:
        raw = self.num_kv_heads * (FASTGEN_RUNG_BYTES + FASTGEN_COUNT_BYTES)
        return -(-raw // ALIGN) * ALIGN

    @property
    def page_bytes(self) -> int:
        return self.kept.page_bytes + self.trailer_bytes

    @property
    def kept_fraction(self) -> float:
        return self.slots / self.block_size

    @property
    def bytes_per_token_per_head(self) -> float:
        """Page bytes per LOGICAL token per KV head (trailer and padding included)."""
        return self.page_bytes / self.num_kv_heads / self.block_size

    @property
    def compression_vs_bf16(self) -> float:
        return 2 * self.head_size * BF16_BYTES / self.bytes_per_token_per_head
