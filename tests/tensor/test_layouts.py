"""The three layout families of ``QuantizedWeight`` (scalar, ternary, vector code books) and sparse
outliers: dequantization against the definitions written out element by element, storage
round trips and stored bytes, the refusals."""
import pytest
import torch

from polyquant.kernels import get_kernel, select_kernel
from polyquant.nn.quant_linear import QuantLinear
from polyquant.qtypes import vector_qtype
from polyquant.tensor.quantized_weight import QuantizedWeight
from polyquant.tensor.sparse import SparseOutliers


def _vector(m=2, bits=8, og=1, ig=8, out=12, inp=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    cb = torch.randn(m, 2 ** bits, og, ig, generator=g).half()
    codes = torch.randint(0, 2 ** bits, (out // og, inp // ig, m), generator=g)
    scale = (torch.rand(out // og, generator=g) + 0.5).half()
    return cb, codes, scale


def _loop_dequant(cb, codes, scale):
    m, _, og, ig = cb.shape
    ob, ib, _ = codes.shape
    w = torch.zeros(ob * og, ib * ig)
    for o in range(ob):
        for i in range(ib):
            v = torch.zeros(og, ig)
            for j in range(m):
                v += cb[j, codes[o, i, j]].float()
            w[o * og:(o + 1) * og, i * ig:(i + 1) * ig] = v * scale[o].float()
    return w


@pytest.mark.parametrize("m,bits,og,ig", [(1, 16, 1, 8), (2, 8, 1, 8), (1, 8, 1, 8), (4, 8, 1, 8),
                                          (8, 8, 1, 8), (2, 4, 2, 4)])
def test_vector_dequantize_is_the_sum_of_codewords(m, bits, og, ig):
    cb, codes, scale = _vector(m, bits, og, ig, out=4 * og, inp=4 * ig)
    qw = QuantizedWeight.from_vector_codes(codes, cb, scale)
    assert qw.layout == "vector" and qw.qtype == f"vq{bits}"
    assert torch.allclose(qw.dequantize(), _loop_dequant(cb, codes, scale), rtol=0, atol=1e-5)
    assert torch.equal(qw.codes, codes.int())  # unsigned indices survive the storage type
    assert qw.data.dtype == (torch.uint8 if bits <= 8 else torch.int16)


def test_vector_16bit_codes_use_twos_complement_storage():
    cb, _, scale = _vector(1, 16, 1, 8, out=2, inp=16)
    codes = torch.tensor([[[0], [32767]], [[32768], [65535]]])
    qw = QuantizedWeight.from_vector_codes(codes, cb, scale)
    assert qw.data.flatten().tolist() == [0, 32767, -32768, -1]  # AQLM's signed int16 codes
    assert qw.codes.flatten().tolist() == [0, 32767, 32768, 65535]


def test_vector_stored_bytes_count_the_code_books():
    cb, codes, scale = _vector(2, 8, 1, 8, out=64, inp=64)
    qw = QuantizedWeight.from_vector_codes(codes, cb, scale)
    want = codes.numel() * 1 + cb.numel() * 2 + scale.numel() * 2
    assert qw.nbytes() == want
    assert qw.bits_per_weight == pytest.approx(want * 8 / (64 * 64))


def test_vector_refusals():
    cb, codes, scale = _vector(2, 8, 1, 8, out=4, inp=16)
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        QuantizedWeight.from_vector_codes(codes + 256, cb, scale)
    qw = QuantizedWeight.from_vector_codes(codes, cb, scale)
    with pytest.raises(ValueError, match="needs codebooks"):
        QuantizedWeight(qw.qtype, qw.shape, qw.block, qw.data, qw.scale)
    with pytest.raises(ValueError, match="256-entry"):
        QuantizedWeight(qw.qtype, qw.shape, qw.block, qw.data, qw.scale, codebooks=cb[:, :128])
    with pytest.raises(ValueError, match="stored as torch.uint8"):
        QuantizedWeight(qw.qtype, qw.shape, qw.block, qw.data.to(torch.int16), qw.scale, codebooks=cb)
    with pytest.raises(ValueError, match="codebooks belong"):
        QuantizedWeight("int4", (4, 16), (1, 16), torch.zeros(4, 2, dtype=torch.int32), torch.ones(4, 1),
                        codebooks=cb)
    with pytest.raises(ValueError, match="1..16"):
        vector_qtype(17)


def test_sparse_outliers_csr_and_products():
    g = torch.Generator().manual_seed(1)
    vals = torch.randn(9, 40, generator=g)
    mask = torch.rand(9, 40, generator=g) < 0.1
    mask[3] = False  # an empty row
    so = SparseOutliers.from_dense_mask(vals, mask)
    dense = vals.half().float() * mask
    assert so.nnz == int(mask.sum()) and so.cols.dtype == torch.int16
    assert torch.equal(so.to_dense(), dense)
    # row-major CSR: offsets are the running row counts
    assert so.row_offsets.tolist() == [0] + mask.sum(1).cumsum(0).tolist()
    x = torch.randn(5, 40, generator=g)
    assert torch.allclose(so.matmul(x), x @ dense.T, atol=1e-5)
    assert so.nbytes() == 10 * 4 + so.nnz * (2 + 2)


def test_outliers_are_added_after_dequantization_for_every_layout():
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (8, 32), dtype=torch.uint8, generator=g)
    scale = torch.rand(8, 2, generator=g) + 0.1
    dense = QuantizedWeight.from_codes(codes, "int4", (1, 16), scale)
    corr = torch.randn(8, 32, generator=g)
    mask = torch.rand(8, 32, generator=g) < 0.2
    so = SparseOutliers.from_dense_mask(corr, mask)
    qw = QuantizedWeight.from_codes(codes, "int4", (1, 16), scale)
    qw.outliers = so
    assert torch.allclose(qw.dequantize(), dense.dequantize() + corr.half().float() * mask, atol=1e-6)
    assert qw.nbytes() == dense.nbytes() + so.nbytes()
    assert qw.without_outliers().outliers is None
    with pytest.raises(ValueError, match="outliers shape"):
        QuantizedWeight.from_codes(codes, "int4", (1, 16), scale).__class__(
            "int4", (8, 32), (1, 16), dense.data, scale, outliers=SparseOutliers.empty((8, 16)))


def test_bad_csr_is_refused():
    with pytest.raises(ValueError, match="row_offsets must have 3"):
        SparseOutliers((2, 4), torch.zeros(2, dtype=torch.int32), torch.zeros(0, dtype=torch.int16), torch.zeros(0))
    with pytest.raises(ValueError, match="cols must lie"):
        SparseOutliers((2, 4), torch.tensor([0, 1, 1], dtype=torch.int32), torch.tensor([4], dtype=torch.int16),
                       torch.ones(1))
    with pytest.raises(ValueError, match="run from 0 to nnz"):
        SparseOutliers((2, 4), torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([0], dtype=torch.int16),
                       torch.ones(1))


def test_ternary_layout_per_tensor_scale():
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 3, (6, 20), dtype=torch.uint8, generator=g)
    qw = QuantizedWeight.from_codes(codes, "ternary", (6, 20), torch.tensor([[0.25]]))
    assert qw.layout == "ternary"
    assert torch.equal(qw.dequantize(), (codes.float() - 1) * 0.25)
    assert qw.bits_per_weight == pytest.approx((6 * 2 * 4 + 4) * 8 / 120)  # 40 bits a row: 2 int32 words


def test_zero_points_are_in_the_code_domain():
    codes = torch.randint(0, 16, (4, 32), dtype=torch.uint8)
    s = torch.ones(4, 2)
    sym = QuantizedWeight.from_codes(codes, "int4", (1, 16), s)
    assert torch.equal(sym.zero_points(), torch.full((4, 2), 8.0))
    asym = QuantizedWeight.from_codes(codes, "uint4", (1, 16), s, zero=torch.full((4, 2), 3.0))
    assert torch.equal(asym.zero_points(), torch.full((4, 2), 3.0))
    w = (codes.float() - asym.zero_points().repeat_interleave(16, 1)) * 1.0
    assert torch.equal(asym.dequantize(), w)


def test_kernels_refuse_layouts_they_do_not_run_and_the_layer_round_trips():
    cb, codes, scale = _vector(2, 8, 1, 8, out=16, inp=32)
    so = SparseOutliers.from_dense_mask(torch.randn(16, 32), torch.rand(16, 32) < 0.05)
    qw = QuantizedWeight.from_vector_codes(codes, cb, scale, outliers=so)
    k, skipped = select_kernel(qw, "cpu")
    assert k.name == "reference"
    # kernels of scalar layouts decline the vector codes; a vector kernel declines the outliers
    assert skipped and all("vector codes are not supported" in r or "sparse outliers are not supported" in r
                           for r in skipped.values())
    layer = QuantLinear(qw)
    back = layer.quantized_weight
    assert torch.equal(back.dequantize(), qw.dequantize()) and back.outliers.nnz == so.nnz
    x = torch.randn(3, 32)
    assert torch.allclose(layer(x), x @ qw.dequantize().T, atol=1e-5)
    # an integer layout with outliers: only kernels that add sparse outliers themselves may run it
    icodes = torch.randint(0, 16, (16, 32), dtype=torch.uint8)
    iq = QuantizedWeight.from_codes(icodes, "int4", (1, 16), torch.rand(16, 2) + 0.1)
    iq.outliers = so
    k, skipped = select_kernel(iq, "cpu")
    assert k.sparse_outliers
    assert all(not get_kernel(n).sparse_outliers for n, r in skipped.items() if "sparse outliers" in r)
    assert torch.allclose(QuantLinear(iq)(x), x @ iq.dequantize().T, atol=1e-4)
