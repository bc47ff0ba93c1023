"""QuantizedWeight: layout validation, dequantize() against hand computations, g_idx, nbytes."""
import pytest
import torch

from polyquant.tensor.packing import pack
from polyquant.tensor.quantized_weight import QuantizedWeight

CODES_2x8 = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7],
                          [15, 14, 13, 12, 11, 10, 9, 8]], dtype=torch.uint8)
SCALE_2x2 = torch.tensor([[0.5, 2.0], [1.0, 0.25]])


def test_dequantize_sym_group4_by_hand():
    qw = QuantizedWeight.from_codes(CODES_2x8, "int4", (1, 4), SCALE_2x2)
    # value = (code - 8) * scale of the code's group
    expected = torch.tensor([[-4.0, -3.5, -3.0, -2.5, -8.0, -6.0, -4.0, -2.0],
                             [7.0, 6.0, 5.0, 4.0, 0.75, 0.5, 0.25, 0.0]])
    assert torch.equal(qw.dequantize(), expected)
    assert qw.symmetric and qw.group_size == 4 and qw.bits == 4
    assert qw.dequantize(torch.float16).dtype == torch.float16


def test_dequantize_asym_group4_by_hand():
    zero = torch.tensor([[3.0, 4.0], [8.0, 10.0]])
    qw = QuantizedWeight.from_codes(CODES_2x8, "uint4", (1, 4), SCALE_2x2, zero)
    # value = (code - zero) * scale
    expected = torch.tensor([[-1.5, -1.0, -0.5, 0.0, 0.0, 2.0, 4.0, 6.0],
                             [7.0, 6.0, 5.0, 4.0, 0.25, 0.0, -0.25, -0.5]])
    assert torch.equal(qw.dequantize(), expected)
    assert not qw.symmetric


def test_short_last_group_in10_group4():
    codes = torch.tensor([[8, 9, 10, 11, 12, 13, 14, 15, 0, 1],
                          [7, 7, 7, 7, 9, 9, 9, 9, 8, 15]], dtype=torch.uint8)
    scale = torch.tensor([[1.0, 0.5, 0.25], [2.0, 3.0, 4.0]])
    qw = QuantizedWeight.from_codes(codes, "int4", (1, 4), scale)
    assert qw.scale.shape == (2, 3) and qw.data.shape == (2, 2)  # 40 bits -> 2 words
    expected = torch.tensor([[0.0, 1.0, 2.0, 3.0, 2.0, 2.5, 3.0, 3.5, -2.0, -1.75],
                             [-2.0, -2.0, -2.0, -2.0, 3.0, 3.0, 3.0, 3.0, 0.0, 28.0]])
    assert torch.equal(qw.dequantize(), expected)
    zero = torch.tensor([[8.0, 8.0, 1.0], [7.0, 9.0, 15.0]])
    qa = QuantizedWeight.from_codes(codes, "uint4", (1, 4), scale, zero)
    assert qa.dequantize()[:, 8:].tolist() == [[-0.25, 0.0], [-28.0, 0.0]]


def test_2d_block_with_short_edges():
    codes = torch.arange(15, dtype=torch.uint8).reshape(3, 5)
    scale = torch.tensor([[1.0, 10.0], [100.0, 1000.0]])  # block (2, 4): rows {0,1},{2}; cols {0..3},{4}
    w = QuantizedWeight.from_codes(codes, "uint4", (2, 4), scale).dequantize()
    s = torch.tensor([[1.0] * 4 + [10.0]] * 2 + [[100.0] * 4 + [1000.0]])
    assert torch.equal(w, codes.float() * s)


def test_g_idx_gather():
    codes = torch.full((2, 8), 9, dtype=torch.uint8)  # value 1 everywhere
    g_idx = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0], dtype=torch.int32)
    qw = QuantizedWeight.from_codes(codes, "int4", (1, 4), SCALE_2x2, g_idx=g_idx)
    assert torch.equal(qw.dequantize(), SCALE_2x2[:, g_idx.long()])
    zero = torch.tensor([[9.0, 8.0], [7.0, 9.0]])
    qa = QuantizedWeight.from_codes(codes, "uint4", (1, 4), SCALE_2x2, zero, g_idx=g_idx)
    # code 9 - zero[g] : row0 groups (0,1) -> (0, 1); row1 -> (2, 0)
    assert qa.dequantize().tolist() == [[2.0, 0.0, 2.0, 0.0, 0.0, 2.0, 2.0, 0.0],
                                        [0.0, 2.0, 0.0, 2.0, 2.0, 0.0, 0.0, 2.0]]


def test_codebook_and_float8():
    codes = torch.tensor([[0, 7, 15, 1]], dtype=torch.uint8)
    nf4 = QuantizedWeight.from_codes(codes, "nf4", (1, 4), torch.tensor([[2.0]]))
    assert nf4.dequantize()[0, :3].tolist() == [-2.0, 0.0, 2.0]
    f8 = torch.tensor([[1.0, -2.0, 0.5, 448.0]]).to(torch.float8_e4m3fn)
    q8 = QuantizedWeight.from_codes(f8, "float8_e4m3fn", (1, 4), torch.tensor([[0.5]]))
    assert q8.data.dtype == torch.float8_e4m3fn and q8.dequantize().tolist() == [[0.5, -1.0, 0.25, 224.0]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_storage_layout_and_codes(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (4, 40), generator=g, dtype=torch.uint8)
    qw = QuantizedWeight.from_codes(codes, f"uint{bits}", (1, 40), torch.ones(4, 1))
    if bits == 8:
        assert qw.data.dtype == torch.uint8 and qw.data.shape == (4, 40)
    else:
        assert torch.equal(qw.data, pack(codes, bits))
    assert torch.equal(qw.codes, codes)
    assert qw.group_size == -1


def test_nbytes_exact():
    codes = torch.zeros(16, 64, dtype=torch.uint8)
    scale = torch.ones(16, 2, dtype=torch.float16)
    zero = torch.zeros(16, 2, dtype=torch.uint8)
    g_idx = torch.arange(64, dtype=torch.int32) // 32
    qw = QuantizedWeight.from_codes(codes, "uint4", (1, 32), scale, zero, g_idx=g_idx)
    # 16 rows x 8 int32 words + 32 fp16 scales + 32 uint8 zeros + 64 int32 g_idx
    assert qw.nbytes() == 16 * 8 * 4 + 32 * 2 + 32 + 64 * 4
    q3 = QuantizedWeight.from_codes(torch.zeros(10, 33, dtype=torch.uint8), "int3", (1, 33), torch.ones(10, 1))
    assert q3.nbytes() == 10 * 4 * 4 + 10 * 4  # ceil(99/32)=4 words per row, fp32 scales
    q8 = QuantizedWeight.from_codes(torch.zeros(3, 5, dtype=torch.uint8), "int8", (1, 5), torch.ones(3, 1))
    assert q8.nbytes() == 15 + 12


def test_validation_errors():
    with pytest.raises(ValueError, match="scale shape"):
        QuantizedWeight.from_codes(CODES_2x8, "int4", (1, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="scale shape"):
        QuantizedWeight.from_codes(torch.zeros(2, 10, dtype=torch.uint8), "int4", (1, 4), torch.ones(2, 2))
    with pytest.raises(ValueError, match="zero shape"):
        QuantizedWeight.from_codes(CODES_2x8, "uint4", (1, 4), SCALE_2x2, torch.zeros(2, 1))
    with pytest.raises(ValueError, match="g_idx"):
        QuantizedWeight.from_codes(CODES_2x8, "int4", (1, 4), SCALE_2x2, g_idx=torch.zeros(7, dtype=torch.int32))
    with pytest.raises(ValueError, match="g_idx"):
        QuantizedWeight.from_codes(CODES_2x8, "int4", (2, 4), torch.ones(1, 2), g_idx=torch.zeros(8, dtype=torch.int32))
    with pytest.raises(ValueError, match="block"):
        QuantizedWeight.from_codes(CODES_2x8, "int4", (0, 4), SCALE_2x2)
    with pytest.raises(ValueError, match="data shape"):
        QuantizedWeight("int4", (2, 8), (1, 4), torch.zeros(2, 2, dtype=torch.int32), SCALE_2x2)
    with pytest.raises(ValueError, match="unknown qtype"):
        QuantizedWeight.from_codes(CODES_2x8, "int17", (1, 4), SCALE_2x2)
    with pytest.raises(ValueError, match="out of range"):  # a 5-bit code cannot be stored as 4 bits
        QuantizedWeight.from_codes(CODES_2x8 + 16, "int4", (1, 4), SCALE_2x2)
