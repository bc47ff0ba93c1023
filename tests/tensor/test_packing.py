"""Bit packing against the format definition: dense LSB-first bit stream in int32 words
(GPTQ / compressed-tensors order), checked bit-exactly on hand-built examples."""
import pytest
import torch

from polyquant.tensor.packing import pack, packed_length, unpack


def _i32(u: int) -> int:
    """An unsigned 32-bit Python int as the signed value an int32 tensor holds."""
    assert 0 <= u < 2 ** 32
    return u - 2 ** 32 if u >= 2 ** 31 else u


def _codes(vals) -> torch.Tensor:
    return torch.tensor([vals], dtype=torch.uint8)


def test_4bit_word_0x87654321():
    words = pack(_codes([1, 2, 3, 4, 5, 6, 7, 8]), 4)
    assert words.dtype == torch.int32 and words.shape == (1, 1)
    assert words.item() == _i32(0x87654321)
    assert unpack(words, 4, 8).tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]


def test_4bit_symmetric_gptq_zero_word():
    # GPTQ v1 stores zero-1 = 7 in every nibble of a symmetric 4-bit qzeros word: 0x77777777
    assert pack(_codes([7] * 8), 4).item() == 0x77777777
    assert pack(_codes([15] * 8), 4).item() == -1


def test_2bit_examples():
    # value j sits in bits [2j, 2j+2): 0,1,2,3 repeating -> bytes 0b11100100 = 0xE4
    assert pack(_codes([0, 1, 2, 3] * 4), 2).item() == _i32(0xE4E4E4E4)
    assert pack(_codes([3] + [0] * 15), 2).item() == 3
    assert pack(_codes([0] * 15 + [2]), 2).item() == _i32(0x80000000)


def test_8bit_examples():
    assert pack(_codes([0x12, 0x34, 0x56, 0x78]), 8).item() == 0x78563412
    assert pack(_codes([0xFF, 0x00, 0x00, 0x80]), 8).item() == _i32(0x800000FF)


def test_1bit_example():
    bits = [1, 0, 1, 1] + [0] * 27 + [1]
    assert pack(_codes(bits), 1).item() == _i32(0b1101 | (1 << 31))


def test_gptq_3bit_layout():
    """methods-and-formats.md §1.2: 32 values in 3 words; value 10 straddles word0 bits 30-31
    (its low 2 bits) and word1 bit 0 (its high bit); value 21 straddles word1 bit 31 (low bit)
    and word2 bits 0-1 (high 2 bits)."""
    v = [(3 * i + 1) % 8 for i in range(32)]
    v[10], v[21] = 0b101, 0b011  # both straddling values have bits on both sides of the cut
    w0 = sum(v[i] << (3 * i) for i in range(10)) | ((v[10] & 0b11) << 30)
    w1 = (v[10] >> 2) | sum(v[11 + j] << (1 + 3 * j) for j in range(10)) | ((v[21] & 1) << 31)
    w2 = (v[21] >> 1) | sum(v[22 + j] << (2 + 3 * j) for j in range(10))
    expected = [_i32(w0), _i32(w1), _i32(w2)]
    got = pack(_codes(v), 3)
    assert got.shape == (1, 3)
    assert got[0].tolist() == expected
    assert unpack(got, 3, 32)[0].tolist() == v
    # the straddling bits themselves
    assert (expected[0] >> 30) & 0b11 == 0b01 and expected[1] & 1 == 1
    assert (expected[1] >> 31) & 1 == 1 and expected[2] & 0b11 == 0b01


def test_odd_length_pads_with_zero_bits():
    words = pack(_codes(list(range(1, 10))), 4)  # 9 values -> 2 words, 9th in the low nibble
    assert words[0].tolist() == [_i32(0x87654321), 9]
    assert packed_length(9, 4) == 2 and packed_length(11, 3) == 2 and packed_length(32, 3) == 3
    assert pack(_codes([5] * 11), 3).shape == (1, 2)
    assert unpack(pack(_codes([5] * 11), 3), 3, 11)[0].tolist() == [5] * 11


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 31, 33, 100])
def test_round_trip_every_width(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2 ** bits, (3, n), generator=g, dtype=torch.uint8)
    words = pack(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (3, packed_length(n, bits))
    back = unpack(words, bits, n)
    assert back.dtype == torch.uint8 and torch.equal(back, codes)
    # stream definition: element e, bit b is stream bit e*bits+b = bit (i%32) of word i//32
    w = words.to(torch.int64) & 0xFFFFFFFF
    for e in (0, n // 2, n - 1):
        for b in range(bits):
            i = e * bits + b
            assert ((w[1, i // 32] >> (i % 32)) & 1).item() == (codes[1, e].item() >> b) & 1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_along_dim0(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (37, 5), generator=g, dtype=torch.uint8)
    words = pack(codes, bits, dim=0)
    assert words.shape == (packed_length(37, bits), 5)
    assert torch.equal(words, pack(codes.t(), bits).t())
    assert torch.equal(unpack(words, bits, 37, dim=0), codes)


def test_matches_compressed_tensors():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(0)
    for bits in range(1, 9):
        codes = torch.randint(0, 2 ** bits, (4, 45), generator=g, dtype=torch.uint8)
        signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)  # their input is signed
        for dim in (0, 1):
            ours = pack(codes if dim == 1 else codes.t(), bits, dim=dim)
            theirs = helpers.pack_to_int32(signed if dim == 1 else signed.t().contiguous(), bits, packed_dim=dim)
            assert torch.equal(ours, theirs), (bits, dim)


def test_invalid_input():
    with pytest.raises(ValueError, match="out of range"):
        pack(_codes([16, 0]), 4)
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([[-1, 0]], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="out of range"):
        pack(_codes([8]), 3)
    with pytest.raises(ValueError, match="float"):
        pack(torch.tensor([[1.0, 2.0]]), 4)
    for bad in (0, 9, 4.0):
        with pytest.raises(ValueError, match="bits"):
            pack(_codes([0]), bad)
    words = pack(_codes([1] * 9), 4)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack(words, 4, 17)
    with pytest.raises(ValueError, match="int32"):
        unpack(words.to(torch.int64), 4, 9)
