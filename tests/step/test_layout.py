"""BlockLayout: the byte layout of a page, checked by invariants and by hand-worked examples.

The byte accounting of the page must be exact: vLLM allocates ``page_bytes`` per
block per layer and the capacity planner divides memory by it, so a byte too few
corrupts the next page and a byte too many loses compression.
"""
from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zipcache_vllm.layout import ALIGN, BF16_BYTES, SUPPORTED_BITS, BlockLayout, StagingLayout

SECTION_NAMES = ["k_hi_codes", "k_lo_codes", "v_hi_codes", "v_lo_codes", "k_hi_params",
                 "k_lo_params", "v_channel_scale", "v_token_params", "mask"]

# Awkward layouts kept as constants: odd n_hi, B not a multiple of 16, head sizes
# that are multiples of 8 but not of 16, uniform at both ends, GQA-like head counts.
LAYOUTS = [
    BlockLayout(128, 64, 3, 4, 2, 64),
    BlockLayout(128, 128, 8, 4, 2, 77),
    BlockLayout(64, 64, 1, 3, 3, 0),
    BlockLayout(64, 64, 1, 3, 3, 64),
    BlockLayout(32, 128, 9, 8, 4, 1),
    BlockLayout(32, 128, 9, 8, 4, 31),
    BlockLayout(8, 8, 2, 4, 2, 3),
    BlockLayout(24, 40, 5, 3, 2, 7),
    BlockLayout(16, 24, 1, 2, 2, 0),
    BlockLayout(256, 256, 4, 8, 8, 256),
]


def ids(layout: BlockLayout) -> str:
    L = layout
    return f"B{L.block_size}-D{L.head_size}-H{L.num_kv_heads}-{L.hi_bits}/{L.lo_bits}-hi{L.n_hi}"


def test_hand_computed_mixed_page():
    # B=128 tokens, D=64, H=3 KV heads, salient 4 bits, regular 2 bits, n_hi=64 (n_lo=64):
    #   K hi codes   64 tokens * 64 ch * 4 bit / 8 = 2048
    #   K lo codes   64 tokens * 64 ch * 2 bit / 8 = 1024
    #   V hi codes                                 = 2048
    #   V lo codes                                 = 1024    codes: 6144
    #   K hi params  (min, scale) * 64 ch * 2 B    =  256
    #   K lo params                                =  256
    #   V channel scale  64 ch * 2 B               =  128
    #   V token params   (min, step) * 128 tok * 2 =  512    params: 1152
    #   mask             128 bits / 8              =   16
    #   content = 6144 + 1152 + 16 = 7312 = 457 * 16 -> no padding, head section 7312
    #   page = 3 heads * 7312 = 21936
    L = BlockLayout(block_size=128, head_size=64, num_kv_heads=3, hi_bits=4, lo_bits=2, n_hi=64)
    sizes = {s.name: s.nbytes for s in L.sections}
    assert sizes == {"k_hi_codes": 2048, "k_lo_codes": 1024, "v_hi_codes": 2048, "v_lo_codes": 1024,
                     "k_hi_params": 256, "k_lo_params": 256, "v_channel_scale": 128,
                     "v_token_params": 512, "mask": 16}
    offsets = {s.name: s.offset for s in L.sections}
    assert offsets == {"k_hi_codes": 0, "k_lo_codes": 2048, "v_hi_codes": 3072, "v_lo_codes": 5120,
                       "k_hi_params": 6144, "k_lo_params": 6400, "v_channel_scale": 6656,
                       "v_token_params": 6784, "mask": 7296}
    assert L.content_bytes == 7312
    assert L.head_bytes == 7312
    assert L.padding_bytes == 0
    assert L.page_bytes == 21936
    assert L.bytes_per_token_per_head == 7312 / 128  # 57.125
    assert L.compression_vs_bf16 == 256 / (7312 / 128)  # bf16 K+V: 2 * 64 * 2 = 256 bytes
    assert L.avg_code_bits == 3.0
    assert L.mixed


def test_hand_computed_padded_page():
    # B=8, D=8, H=2, 4/2 bits, n_hi=3 (n_lo=5):
    #   codes: K hi 3*8*4/8=12, K lo 5*8*2/8=10, V hi 12, V lo 10            -> 44
    #   params: K hi 2*8*2=32, K lo 32, V channel 8*2=16, V token 2*8*2=32 -> 112
    #   mask: 1 byte; content 157 -> padded to 160 (3 bytes of padding); page 320
    L = BlockLayout(8, 8, 2, 4, 2, 3)
    assert [s.nbytes for s in L.sections] == [12, 10, 12, 10, 32, 32, 16, 32, 1]
    assert L.content_bytes == 157
    assert L.head_bytes == 160
    assert L.padding_bytes == 3
    assert L.page_bytes == 320
    assert L.breakdown()["padding"] == 3 / 8


def test_hand_computed_uniform_page():
    # KIVI-2 style: B=128, D=128, H=1, 2 bits for every token (n_hi=0):
    #   K codes 128*128*2/8=4096, V codes 4096, K params 2*128*2=512,
    #   V channel 256, V token 2*128*2=512, no hi group, no mask -> 9472 = 592*16
    L = BlockLayout(128, 128, 1, 4, 2, 0)
    sizes = {s.name: s.nbytes for s in L.sections}
    assert sizes == {"k_hi_codes": 0, "k_lo_codes": 4096, "v_hi_codes": 0, "v_lo_codes": 4096,
                     "k_hi_params": 0, "k_lo_params": 512, "v_channel_scale": 256,
                     "v_token_params": 512, "mask": 0}
    assert L.head_bytes == 9472
    assert L.avg_code_bits == 2.0


def test_design_doc_byte_budget():
    # DESIGN.md section 4: head size 64, 60% of tokens at 4 bits -> codes alone are
    # 51.2 bytes per token per KV head; fp16 per-token value parameters add 4 bytes;
    # key channel parameters add 2 * groups * 64 * 2 / B. B=80 makes 60% exact (48 tokens).
    L = BlockLayout(80, 64, 1, 4, 2, 48)
    b = L.breakdown()
    assert math.isclose(b["k_hi_codes"] + b["k_lo_codes"] + b["v_hi_codes"] + b["v_lo_codes"], 51.2)
    assert b["v_token_params"] == 4.0
    assert b["k_hi_params"] + b["k_lo_params"] == 2 * 2 * 64 * 2 / 80
    assert L.bf16_bytes_per_token_per_head == 256


@pytest.mark.parametrize("L", LAYOUTS, ids=ids)
def test_sections_tile_the_head_section_in_order(L):
    assert [s.name for s in L.sections] == SECTION_NAMES
    offset = 0
    for s in L.sections:
        assert s.offset == offset, s.name
        assert s.nbytes >= 0
        assert s.end == s.offset + s.nbytes
        offset = s.end
    assert L.content_bytes == offset == sum(s.nbytes for s in L.sections)
    assert L.head_bytes == L.content_bytes + L.padding_bytes


@pytest.mark.parametrize("L", LAYOUTS, ids=ids)
def test_alignment_and_page_size(L):
    assert L.head_bytes % ALIGN == 0
    assert 0 <= L.padding_bytes < ALIGN
    assert L.page_bytes == L.num_kv_heads * L.head_bytes
    # every float16 parameter section starts on an even byte, so it can be viewed as float16
    for name in ("k_hi_params", "k_lo_params", "v_channel_scale", "v_token_params"):
        assert L.section(name).offset % 2 == 0, name


@pytest.mark.parametrize("L", LAYOUTS, ids=ids)
def test_breakdown_sums_to_bytes_per_token(L):
    b = L.breakdown()
    assert set(b) == set(SECTION_NAMES) | {"padding"}
    assert math.isclose(sum(b.values()), L.bytes_per_token_per_head, rel_tol=1e-12)
    assert L.bytes_per_token_per_head == L.head_bytes / L.block_size
    assert L.compression_vs_bf16 == 2 * L.head_size * BF16_BYTES / L.bytes_per_token_per_head


@pytest.mark.parametrize("L", LAYOUTS, ids=ids)
def test_code_sizes_follow_bit_widths(L):
    D = L.head_size
    assert L.section("k_hi_codes").nbytes == L.n_hi * D * L.hi_bits // 8
    assert L.section("v_hi_codes").nbytes == L.n_hi * D * L.hi_bits // 8
    assert L.section("k_lo_codes").nbytes == L.n_lo * D * L.lo_bits // 8
    assert L.section("v_lo_codes").nbytes == L.n_lo * D * L.lo_bits // 8
    assert L.n_hi + L.n_lo == L.block_size
    assert L.avg_code_bits == (L.n_hi * L.hi_bits + L.n_lo * L.lo_bits) / L.block_size


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("n_hi", ["zero", "all"])
def test_uniform_layouts_have_no_mask_and_no_empty_group(bits, n_hi):
    B = 64
    L = (BlockLayout(B, 64, 2, hi_bits=8, lo_bits=bits, n_hi=0) if n_hi == "zero"
         else BlockLayout(B, 64, 2, hi_bits=bits, lo_bits=2, n_hi=B))
    empty = "hi" if n_hi == "zero" else "lo"
    full = "lo" if empty == "hi" else "hi"
    assert not L.mixed
    assert L.section("mask").nbytes == 0
    for part in ("k_{}_codes", "v_{}_codes", "k_{}_params"):
        assert L.section(part.format(empty)).nbytes == 0
        assert L.section(part.format(full)).nbytes > 0
    # the unused bit width must not leak into the size
    assert L.avg_code_bits == bits
    assert L.content_bytes == 2 * B * 64 * bits // 8 + 2 * 64 * 2 + 64 * 2 + 2 * B * 2


def test_mask_present_exactly_when_mixed():
    for n_hi in range(0, 33):
        L = BlockLayout(32, 16, 1, 4, 2, n_hi)
        assert L.mixed == (0 < n_hi < 32)
        assert L.section("mask").nbytes == (4 if L.mixed else 0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=0), "block_size"),
    (dict(block_size=-8), "block_size"),
    (dict(block_size=12), "block_size"),
    (dict(head_size=0), "head_size"),
    (dict(head_size=60), "head_size"),
    (dict(num_kv_heads=0), "num_kv_heads"),
    (dict(num_kv_heads=-1), "num_kv_heads"),
    (dict(hi_bits=5), "hi_bits"),
    (dict(hi_bits=0), "hi_bits"),
    (dict(lo_bits=16), "lo_bits"),
    (dict(lo_bits=6), "lo_bits"),
    (dict(n_hi=-1), "n_hi"),
    (dict(n_hi=65), "n_hi"),
])
def test_invalid_args_raise(kwargs, match):
    args = dict(block_size=64, head_size=64, num_kv_heads=2, hi_bits=4, lo_bits=2, n_hi=10) | kwargs
    with pytest.raises(ValueError, match=match):
        BlockLayout(**args)


def test_unknown_section_lists_valid_names():
    L = BlockLayout(64, 64, 1, 4, 2, 10)
    with pytest.raises(KeyError, match="k_hi_codes"):
        L.section("k_codes")


def test_layout_is_frozen_and_hashable():
    L = BlockLayout(64, 64, 1, 4, 2, 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        L.n_hi = 3  # type: ignore[misc]
    assert L == BlockLayout(64, 64, 1, 4, 2, 10)
    assert hash(L) == hash(BlockLayout(64, 64, 1, 4, 2, 10))


def test_from_preset():
    preset = SimpleNamespace(block_size=128, hi_bits=4, lo_bits=2, n_salient=77, key_rotation="none",
                             value_rotation="none")
    L = BlockLayout.from_preset(preset, head_size=64, num_kv_heads=8)
    assert L == BlockLayout(128, 64, 8, 4, 2, 77)
    for field, flag in (("key_rotation", "rotate_keys"), ("value_rotation", "rotate_values")):
        rotated = BlockLayout.from_preset(SimpleNamespace(**{**vars(preset), field: "hadamard"}), 64, 8)
        assert getattr(rotated, flag) and rotated.page_bytes == L.page_bytes
    with pytest.raises(ValueError, match="rotate_values needs a power-of-two head size"):
        BlockLayout(128, 80, 1, 4, 2, 58, rotate_values=True)


def test_staging_layout_sections():
    """Model dtype: K, V, score, count; 8 bits: codes, then float16 (min, step) per row, then
    score and count, every float32 section 4-byte aligned."""
    full = StagingLayout(21360, 128, 3, 64)
    assert (full.token_bytes, full.tokens_per_page, full.pages, full.lookahead_blocks) == (784, 27, 5, 4)
    assert full.score_offset == full.params_offset == 2 * 3 * 27 * 64 * 2
    q8 = StagingLayout(21360, 128, 3, 64, kv_bits=8)
    assert (q8.token_bytes, q8.tokens_per_page, q8.pages, q8.lookahead_blocks) == (424, 50, 3, 2)
    T = q8.tokens_per_page
    assert q8.v_offset == 3 * T * 64 and q8.params_offset == 2 * q8.v_offset
    assert q8.score_offset == q8.params_offset + 8 * 3 * T and q8.count_offset == q8.score_offset + 4 * 3 * T
    assert q8.used_bytes == q8.count_offset + 4 * T <= 21360
    assert q8.args() == [T, 3, 2, q8.v_offset, q8.score_offset, q8.count_offset, 8, q8.params_offset,
                         128]
    assert StagingLayout(21360, 128, 3, 64, 4, kv_bits=8).token_bytes == 424  # the model dtype's width: no matter
    with pytest.raises(ValueError, match="kv_bits"):
        StagingLayout(21360, 128, 3, 64, kv_bits=4)
    with pytest.raises(ValueError, match="even head size"):
        StagingLayout(21360, 128, 3, 63, kv_bits=8)


@st.composite
def layouts(draw):
    B = 8 * draw(st.integers(1, 32))
    return BlockLayout(
        block_size=B,
        head_size=8 * draw(st.integers(1, 32)),
        num_kv_heads=draw(st.integers(1, 16)),
        hi_bits=draw(st.sampled_from(SUPPORTED_BITS)),
        lo_bits=draw(st.sampled_from(SUPPORTED_BITS)),
        n_hi=draw(st.integers(0, B)),
    )


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_invariants_hold_for_any_valid_layout(L):
    assert L.head_bytes % ALIGN == 0 and 0 <= L.padding_bytes < ALIGN
    assert L.content_bytes == sum(s.nbytes for s in L.sections)
    assert L.page_bytes == L.num_kv_heads * L.head_bytes
    assert math.isclose(sum(L.breakdown().values()), L.bytes_per_token_per_head, rel_tol=1e-12)
    D, B = L.head_size, L.block_size
    codes = B * D * 2 * L.avg_code_bits / 8
    groups = (L.n_hi > 0) + (L.n_lo > 0)
    params = groups * 2 * D * 2 + D * 2 + 2 * B * 2
    mask = B // 8 if L.mixed else 0
    assert math.isclose(L.content_bytes, codes + params + mask)
