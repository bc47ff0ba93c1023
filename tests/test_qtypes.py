"""The storage-type table: integer ranges, encode/decode inverses, code books, float8 saturation."""
import pytest
import torch

from polyquant.qtypes import FP4_VALUES, NF4_VALUES, QTYPES, get_qtype, int_qtype


@pytest.mark.parametrize("bits", range(1, 9))
def test_int_ranges(bits):
    s, u = get_qtype(f"int{bits}"), get_qtype(f"uint{bits}")
    assert (s.qmin, s.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert (u.qmin, u.qmax) == (0, 2 ** bits - 1)
    assert s.n_codes == u.n_codes == 2 ** bits
    assert s.code_offset == 2 ** (bits - 1) and u.code_offset == 0
    assert int_qtype(bits, True) is s and int_qtype(bits, False) is u


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("signed", [True, False])
def test_int_encode_decode_inverse_on_every_code(bits, signed):
    qt = int_qtype(bits, signed)
    codes = torch.arange(2 ** bits, dtype=torch.uint8)
    vals = qt.decode(codes)
    assert vals.dtype == torch.float32
    # offset binary: code c <-> value c - offset, covering exactly [qmin, qmax]
    assert vals.tolist() == list(range(qt.qmin, qt.qmax + 1))
    assert torch.equal(qt.encode(vals), codes)
    # rounding to nearest and saturation
    assert qt.encode(torch.tensor([qt.qmax + 5.0, qt.qmin - 5.0])).tolist() == [2 ** bits - 1, 0]
    assert qt.encode(torch.tensor([qt.qmin + 0.4, qt.qmin + 0.6])).tolist() == [0, min(1, 2 ** bits - 1)]


def test_int4_offset_binary_examples():
    qt = get_qtype("int4")
    assert qt.encode(torch.tensor([-8.0, -1.0, 0.0, 7.0])).tolist() == [0, 7, 8, 15]


def test_ternary():
    qt = get_qtype("ternary")
    assert qt.encode(torch.tensor([-3.0, -0.6, 0.2, 0.9])).tolist() == [0, 0, 1, 2]
    assert qt.decode(torch.tensor([0, 1, 2], dtype=torch.uint8)).tolist() == [-1.0, 0.0, 1.0]


@pytest.mark.parametrize("name,table", [("nf4", NF4_VALUES), ("fp4", FP4_VALUES)])
def test_codebook_tables(name, table):
    qt = get_qtype(name)
    assert qt.bits == 4 and len(qt.values) == 16 == len(table)
    codes = torch.arange(16, dtype=torch.uint8)
    vals = qt.decode(codes)
    assert torch.equal(vals, torch.tensor(table, dtype=torch.float32))
    assert torch.equal(qt.encode(vals), codes)
    assert qt.max_value == 1.0


def test_nf4_known_values_and_nearest():
    qt = get_qtype("nf4")
    assert qt.values[0] == -1.0 and qt.values[7] == 0.0 and qt.values[15] == 1.0
    # nearest code: 0.5 and 0.51 lie between 0.4407 (code 12) and 0.5626 (code 13), midpoint 0.5017
    assert qt.encode(torch.tensor([0.5, 0.51, -2.0, 2.0, 0.01, -0.05])).tolist() == [12, 13, 0, 15, 7, 6]


def test_fp4_sign_is_kept_for_tiny_negatives():
    # the sign bit is kept (as in bitsandbytes' CUDA dQuantizeFP4): a tiny negative rounds to -0 (code 8);
    # this also makes encode(decode(c)) == c for code 8 (-0.0)
    qt = get_qtype("fp4")
    assert qt.encode(torch.tensor([-0.001, 0.001, -1.0, 0.6])).tolist() == [8, 0, 11, 2]


def test_float8_e4m3_saturates():
    qt = get_qtype("float8_e4m3fn")
    assert qt.max_value == 448.0
    q = qt.encode(torch.tensor([1000.0, -1e6, 448.0, 1.0, 0.3]))
    assert q.dtype == torch.float8_e4m3fn
    back = qt.decode(q)
    assert back[:4].tolist() == [448.0, -448.0, 448.0, 1.0]
    assert abs(back[4].item() - 0.3) < 0.3 * 2 ** -3  # 3 mantissa bits
    e5 = get_qtype("float8_e5m2")
    assert e5.decode(e5.encode(torch.tensor([1e9]))).item() == 57344.0


def test_unknown_qtype():
    with pytest.raises(ValueError, match="unknown qtype"):
        get_qtype("int9")
    assert {"int4", "uint4", "nf4", "fp4", "ternary", "float8_e4m3fn", "float8_e5m2"} <= set(QTYPES)
