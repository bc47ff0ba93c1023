"""EETQ format: the CUTLASS preprocessing against an element-by-element transcription of
FasterTransformer's ``preprocess_weights_for_mixed_gemm`` (EETQ cannot run without CUDA), a
hand-placed byte, exact save -> load, the on-disk layout and refusals."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import polyquant
from helpers import tiny_llama
from polyquant.formats import CheckpointError
from polyquant.formats.eetq import eetq_preprocess, eetq_unpreprocess
from polyquant.methods.eetq import EETQConfig



def _ft_preprocess(wt_signed: torch.Tensor, arch: int) -> torch.Tensor:
    """Loop transcription of cutlass_preprocessors.cc for INT8_WEIGHT_ONLY: ``wt_signed`` is the
    row-major int8 [K, N] (W transposed); returns the int8 [K, N] buffer."""
    k, n = wt_signed.shape
    src = [int(v) for v in wt_signed.reshape(-1).tolist()]
    words = lambda buf: [buf[i:i + 4] for i in range(0, len(buf), 4)]  # noqa: E731
    if arch >= 75:
        # permute_B_rows_for_mixed_gemm: 4-byte words, ELTS_PER_REG 4, B_ROWS_PER_MMA 16
        vec_cols = n // 4
        w_in = words(src)
        w_out = [None] * len(w_in)
        for base in range(0, k, 16):
            for tile_row in range(16):
                read_row = base + 8 * ((tile_row % 4) // 2) + tile_row % 2 + 2 * (tile_row // 4)
                for c in range(vec_cols):
                    w_out[(base + tile_row) * vec_cols + c] = w_in[read_row * vec_cols + c]
        src = [b for w in w_out for b in w]
        # subbyte_transpose (int8): column-major
        src = [src[r * n + c] for c in range(n) for r in range(k)]
        # interleave_column_major_tensor: rows_per_tile 64, 2 columns interleaved, 4-byte words
        vec_rows, vrpt, inter = k // 4, 16, 2
        w_in = words(src)
        w_out = [None] * len(w_in)
        for read_col in range(n):
            write_col = read_col // inter
            for base_vec_row in range(0, vec_rows, vrpt):
                for vec_read_row in range(base_vec_row, min(vec_rows, base_vec_row + vrpt)):
                    vec_write_row = inter * base_vec_row + vrpt * (read_col % inter) + vec_read_row % vrpt
                    w_out[write_col * vec_rows * inter + vec_write_row] = w_in[read_col * vec_rows + vec_read_row]
        src = [b for w in w_out for b in w]
    # add_bias_and_interleave_int8s_inplace: +128 (int8 wraparound), then swap bytes 1 and 2
    src = [((v + 128 + 128) % 256) - 128 for v in src]
    for base in range(0, len(src), 4):
        src[base + 1], src[base + 2] = src[base + 2], src[base + 1]
    return torch.tensor(src, dtype=torch.int8).reshape(k, n)


@pytest.mark.parametrize("arch", [80, 70])
@pytest.mark.parametrize("n,k", [(64, 64), (128, 64), (64, 192)])
def test_preprocess_matches_fastertransformer_transcription(arch, n, k):
    codes = torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(n + k))
    signed_t = (codes.to(torch.int16) - 128).to(torch.int8).t().contiguous()
    ours = eetq_preprocess(codes, arch)
    assert ours.dtype == torch.int8 and ours.shape == (k, n)
    assert torch.equal(ours, _ft_preprocess(signed_t, arch))
    assert torch.equal(eetq_unpreprocess(ours, arch), codes)


def test_one_byte_lands_where_the_layout_says():
    # q = 5 at W[n=1, k=8], zeros elsewhere. sm80: row 8 of W^T is read by tile row 2 (perm), so after
    # the transpose it is column-major byte (col 1, row 2); interleaving puts column 1 in the second
    # half (offset 64) of output row 0: byte 66; the byte swap of each word moves offset 2 to 1: 65.
    codes = torch.full((64, 64), 128, dtype=torch.uint8)
    codes[1, 8] = 133
    flat = eetq_preprocess(codes, 80).reshape(-1)
    assert flat[65].item() == 133 - 256 and int((flat != -128).sum()) == 1


def test_shape_checks():
    with pytest.raises(ValueError, match="multiples of 64"):
        eetq_preprocess(torch.zeros(32, 64, dtype=torch.uint8), 80)
    with pytest.raises(ValueError, match="sm70-sm89"):
        eetq_preprocess(torch.zeros(64, 64, dtype=torch.uint8), 90)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    m = tiny_llama(hidden=128)
    q = polyquant.quantize(m, EETQConfig(), show_progress=False)
    out = polyquant.save(q, tmp_path_factory.mktemp("eetq") / "ck")
    return m, q, out


def test_on_disk_layout(saved):
    _, q, out = saved
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "eetq", "weights": "int8", "modules_to_not_convert": ["lm_head"]}
    t = load_file(str(out / "model.safetensors"))
    w, s = t["model.layers.0.mlp.down_proj.weight"], t["model.layers.0.mlp.down_proj.weight_scales"]
    assert w.dtype == torch.int8 and w.shape == (256, 128)  # [in, out]
    assert s.dtype == torch.float16 and s.shape == (128,)
    qw = q.model.layers[0].mlp.down_proj.quantized_weight
    assert torch.equal(w, eetq_preprocess(qw.codes, 80))
    assert "lm_head.weight" not in t and "model.layers.0.mlp.down_proj.weight._data" not in t
    assert polyquant.detect_format(out) == "eetq"


def test_refusals(tmp_path):
    m = tiny_llama()  # k/v projections have 32 outputs
    q = polyquant.quantize(m, EETQConfig(), show_progress=False)
    with pytest.raises(ValueError, match="k_proj.*multiples of 64"):
        polyquant.save(q, tmp_path / "a")
    r = polyquant.quantize(tiny_llama(hidden=128), polyquant.RTNConfig(bits=8, group_size=32), show_progress=False)
    with pytest.raises(ValueError, match="per-channel"):
        polyquant.save(r, tmp_path / "b", format="eetq")


def test_corrupt_checkpoint(saved, tmp_path):
    _, _, out = saved
    bad = tmp_path / "bad"
    import shutil
    shutil.copytree(out, bad)
    t = load_file(str(bad / "model.safetensors"))
    t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"][:, :64].contiguous()
    from safetensors.torch import save_file
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="down_proj.*int8 \\[256, 128\\]"):
        polyquant.load(bad)
