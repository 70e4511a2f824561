"""Bit packing of integer codes: bit-exact round trips and the stream convention.

Convention under test (``zipcache_vllm/quant/packing.py``): each row is a
little-endian bit stream. Code ``j`` of ``b`` bits occupies stream bits
``[j*b, (j+1)*b)``, its least significant bit first, and stream bit ``i`` is
bit ``i % 8`` of byte ``i // 8``. So for b in {1, 2, 4} the first code sits in
the lowest bits of byte 0, and for b = 3 a code may straddle two bytes
(8 codes fill 3 bytes). Equivalently: the row's bytes are the little-endian
encoding of the integer ``sum_j code_j << (j*b)``. The C++/Triton kernels
decode this exact format, so it must never change silently.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zipcache_vllm.quant import pack_bits, unpack_bits


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

BITS = (1, 2, 3, 4, 8)
# Leading shapes: none, one, two and three leading dims, and an empty batch.
LEAD_SHAPES = [(), (3,), (2, 5), (2, 3, 4), (0,)]
# Row lengths: the shortest legal one for every width (8 codes), head sizes, and an
# odd multiple of 8 that is not a power of two.
ROW_LENGTHS = (8, 24, 64, 128)


def ref_pack_row(codes: list[int], bits: int) -> list[int]:
    """Pure-Python packer: the integer ``sum code_j << (j*bits)`` as little-endian bytes."""
    acc = 0
    for j, c in enumerate(codes):
        assert 0 <= c < (1 << bits)
        acc |= c << (j * bits)
    return list(acc.to_bytes(len(codes) * bits // 8, "little"))


def random_codes(shape: tuple[int, ...], bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("lead", LEAD_SHAPES, ids=str)
@pytest.mark.parametrize("n", ROW_LENGTHS)
def test_round_trip_is_bit_exact(bits, lead, n):
    codes = random_codes((*lead, n), bits, seed=bits * 1000 + n)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*lead, n * bits // 8)
    out = unpack_bits(packed, bits, n)
    assert out.dtype == torch.uint8
    assert torch.equal(out, codes)


@pytest.mark.parametrize("bits", BITS)
def test_matches_pure_python_bit_stream(bits):
    codes = random_codes((4, 40), bits, seed=bits)
    packed = pack_bits(codes, bits)
    for row_codes, row_bytes in zip(codes.tolist(), packed.tolist()):
        assert row_bytes == ref_pack_row(row_codes, bits)


# Known vectors, worked out by hand from the convention in the module docstring.
KNOWN = [
    # 2-bit [1, 2, 3, 0]: 01 | 10<<2 | 11<<4 | 00<<6 = 0b00_11_10_01 = 57
    (2, [1, 2, 3, 0], [0b00111001]),
    (2, [3, 0, 0, 0, 0, 0, 0, 2], [0b00000011, 0b10000000]),
    # 1-bit: code j is bit j of the byte
    (1, [1, 0, 0, 0, 0, 0, 0, 0], [1]),
    (1, [0, 0, 0, 0, 0, 0, 0, 1], [128]),
    (1, [1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], [0b00001011, 0b10000000]),
    # 4-bit: first code in the low nibble
    (4, [0x3, 0xA], [0xA3]),
    (4, [0xF, 0x0, 0x1, 0xE], [0x0F, 0xE1]),
    # 3-bit [1..7, 0]: sum c_j << 3j = 0b000_111_110_101_100_011_010_001 = 0x1F58D1
    # -> little-endian bytes 0xD1, 0x58, 0x1F (code 2 = 0b011 straddles bytes 0 and 1:
    #    its low two bits are bits 6..7 of byte 0, its high bit (0) is bit 0 of byte 1)
    (3, [1, 2, 3, 4, 5, 6, 7, 0], [0xD1, 0x58, 0x1F]),
    (3, [0, 0, 4, 0, 0, 0, 0, 0], [0x00, 0x01, 0x00]),
    # 8-bit: identity
    (8, [0, 1, 127, 255], [0, 1, 127, 255]),
]


@pytest.mark.parametrize("bits,codes,expected", KNOWN, ids=lambda x: str(x))
def test_known_vectors(bits, codes, expected):
    c = torch.tensor(codes, dtype=torch.uint8)
    assert pack_bits(c, bits).tolist() == expected
    assert unpack_bits(torch.tensor(expected, dtype=torch.uint8), bits, len(codes)).tolist() == codes


@pytest.mark.parametrize("bits", BITS)
def test_all_ones_and_all_zeros(bits):
    top = (1 << bits) - 1
    assert pack_bits(torch.full((2, 16), top, dtype=torch.uint8), bits).eq(255).all()
    assert pack_bits(torch.zeros(2, 16, dtype=torch.uint8), bits).eq(0).all()


@pytest.mark.parametrize("bits", BITS)
def test_rows_are_independent(bits):
    """Packing a batch equals packing each row alone (no bits leak across rows)."""
    codes = random_codes((5, 16), bits, seed=7)
    batch = pack_bits(codes, bits)
    for i in range(5):
        assert torch.equal(batch[i], pack_bits(codes[i], bits))


@pytest.mark.parametrize("bits", BITS)
def test_non_contiguous_input(bits):
    codes = random_codes((16, 6), bits, seed=3)
    t = codes.t()  # [6, 16], not contiguous
    assert not t.is_contiguous()
    assert torch.equal(pack_bits(t, bits), pack_bits(t.contiguous(), bits))
    packed = pack_bits(t.contiguous(), bits)
    wide = torch.cat([packed, packed], dim=-1)[:, : packed.shape[-1]]  # non-contiguous view
    assert torch.equal(unpack_bits(wide, bits, 16), t)


@pytest.mark.parametrize("bad_bits", [0, 5, 6, 7, 16, -1])
def test_unsupported_bits_raise(bad_bits):
    codes = torch.zeros(2, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_bits(codes, bad_bits)
    with pytest.raises(ValueError, match="bits must be one of"):
        unpack_bits(torch.zeros(2, 16, dtype=torch.uint8), bad_bits, 16)


@pytest.mark.parametrize("bits,n", [(1, 7), (2, 6), (3, 4), (3, 12), (4, 3), (1, 1)])
def test_rows_that_do_not_fill_whole_bytes_raise(bits, n):
    with pytest.raises(ValueError, match="whole bytes"):
        pack_bits(torch.zeros(2, n, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="whole bytes"):
        unpack_bits(torch.zeros(2, 8, dtype=torch.uint8), bits, n)


@pytest.mark.parametrize("bits", BITS)
def test_unpack_wrong_byte_count_raises(bits):
    packed = torch.zeros(2, 16 * bits // 8 + 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match=f"expected {16 * bits // 8} bytes per row"):
        unpack_bits(packed, bits, 16)
    with pytest.raises(ValueError, match="bytes per row"):
        unpack_bits(torch.zeros(2, 16 * bits // 8, dtype=torch.uint8), bits, 24)


@st.composite
def code_rows(draw):
    bits = draw(st.sampled_from(BITS))
    n = 8 * draw(st.integers(1, 6))
    rows = draw(st.integers(1, 3))
    data = draw(st.lists(st.lists(st.integers(0, (1 << bits) - 1), min_size=n, max_size=n),
                         min_size=rows, max_size=rows))
    return bits, data


@settings(max_examples=150, deadline=None)
@given(code_rows())
def test_fuzz_against_pure_python(case):
    bits, data = case
    codes = torch.tensor(data, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.tolist() == [ref_pack_row(r, bits) for r in data]
    assert torch.equal(unpack_bits(packed, bits, codes.shape[-1]), codes)
