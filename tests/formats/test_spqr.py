"""SpQR checkpoints: the 64-bit word layout against a literal port of the reference packer, an
independent decoder written from the specification, a checkpoint written by a helper (not our
writer), save -> load, refusals."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

import polyquant
from polyquant.formats import CheckpointError
from polyquant.formats.spqr import pack_dense_words, spqr_layer_tensors, unpack_dense_words
from polyquant.methods.spqr import SpQRConfig
from polyquant.nn import QuantLinear


def _h(x: float) -> int:
    """float16 bit pattern."""
    return struct.unpack("<H", struct.pack("<e", x))[0]


def _hf(b: int) -> float:
    return struct.unpack("<e", struct.pack("<H", b & 0xFFFF))[0]


def reference_pack(m, n, W, W_s, W_z, W_s_s, W_s_z, W_z_s, W_z_z):
    """A literal Python port of ``tensor_compress_interleaved`` + ``TileArray::push`` (spqr_cuda.cpp,
    common.cuh) for 3 bits, beta1 = beta2 = 16. ``W`` row-major [m*n] codes; ``W_s``/``W_z`` indexed
    ``tile_j * tile_m * 16 + tile_i * 16 + k``; second-order arrays by ``tile_j * tile_m + tile_i``
    (float16 bit patterns)."""
    beta1 = beta2 = 16
    BITS = 3
    out = []
    tile_m = -(-m // beta1)
    for i in range(0, m, beta1):
        for j in range(0, n, beta2):
            ti, tj = i // beta1, j // beta2
            tid = tj * tile_m + ti
            v = W_s_s[tid] | (W_z_s[tid] << 16) | (W_s_z[tid] << 32) | (W_z_z[tid] << 48)  # half2 ss, half2 zz
            to_add = 0
            for k in range(beta1):
                if i + k >= m:
                    out.append(0)
                    continue
                tile = [0] * 16
                sid = tj * tile_m * beta1 + ti * beta1 + k
                for idx, l in enumerate(range(beta2)):
                    if j + l >= n:
                        break
                    tile[idx] = W[(i + k) * n + j + l]
                    if k == 0:
                        to_add += 1
                partial = (v >> ((k // 2) * 8)) & 0xFF
                b = (W_z[sid] << BITS) | W_s[sid]
                for q in range(to_add):
                    b |= tile[q] << ((q + 2) * BITS)
                out.append(b | (partial << (BITS * (beta2 + 2))))
    return out


def spec_decode(m, n, words, row_offsets, col_vals, in_perm):
    """An independent decoder from the specification (dequantize_compressed in float16 arithmetic,
    outliers added, then the input permutation undone): the float32 weight [m, n] in input order."""
    tn = -(-n // 16)
    Wp = [[0.0] * n for _ in range(m)]
    half = lambda x: float(torch.tensor(x, dtype=torch.float16))  # noqa: E731
    for ti in range(m // 16):
        for tj in range(tn):
            base = (ti * tn + tj) * 16
            rec = 0
            for k in range(16):
                rec |= ((words[base + k] >> 54) & 0xFF) << (8 * (k // 2))
            wss, wzs, wsz, wzz = (_hf(rec >> s) for s in (0, 16, 32, 48))
            for k in range(16):
                wd = words[base + k]
                s = half(wss * half((wd & 7) - wsz))
                z = half(wzs * half(((wd >> 3) & 7) - wzz))
                for l in range(16):
                    c = tj * 16 + l
                    if c < n:
                        Wp[ti * 16 + k][c] = half(s * half(((wd >> (6 + 3 * l)) & 7) - z))
    for r in range(m):
        for e in range(row_offsets[r], row_offsets[r + 1]):
            cv = col_vals[e] & 0xFFFFFFFF
            Wp[r][cv & 0xFFFF] += _hf(cv >> 16)
    perm = list(range(n))
    if in_perm:
        perm = []
        for p in in_perm:
            p &= 0xFFFFFFFF
            perm += [p & 0xFFFF, p >> 16]
    W = [[0.0] * n for _ in range(m)]
    for r in range(m):
        for p in range(n):
            W[r][perm[p]] = Wp[r][p]
    return torch.tensor(W)


def _random_layer(m, n, g):
    G = -(-n // 16)
    codes = torch.randint(0, 8, (m, n), generator=g, dtype=torch.uint8)
    qs = torch.randint(0, 8, (m, G), generator=g, dtype=torch.uint8)
    qz = torch.randint(0, 8, (m, G), generator=g, dtype=torch.uint8)
    rec = torch.stack([torch.rand(m // 16, G, generator=g) * 0.01 + 0.001, -torch.rand(m // 16, G, generator=g) * 3,
                       torch.rand(m // 16, G, generator=g) + 0.1, -torch.rand(m // 16, G, generator=g)], -1).half()
    return codes, qs, qz, rec


def _reference_words(codes, qs, qz, rec):
    m, n = codes.shape
    G = qs.shape[1]
    Ws = [int(qs[r, j]) for j in range(G) for r in range(m)]  # [tile_j][row]
    Wz = [int(qz[r, j]) for j in range(G) for r in range(m)]
    so = [[_h(float(rec[ti, tj, f])) for tj in range(G) for ti in range(m // 16)] for f in range(4)]
    return reference_pack(m, n, codes.reshape(-1).tolist(), Ws, Wz, so[0], so[1], so[2], so[3])


def test_word_layout_matches_the_reference_packer_on_a_hand_checked_tile():
    codes = torch.zeros(16, 16, dtype=torch.uint8)
    codes[0] = torch.arange(16) % 8  # row 0: w_l = l mod 8
    qs = torch.zeros(16, 1, dtype=torch.uint8)
    qz = torch.zeros(16, 1, dtype=torch.uint8)
    qs[0, 0], qz[0, 0], qs[1, 0], qz[1, 0] = 5, 2, 7, 7
    rec = torch.tensor([[[1.0, -2.0, 0.5, 3.0]]], dtype=torch.float16)  # W_s_s, W_s_z, W_z_s, W_z_z
    words = pack_dense_words(codes, qs, qz, rec).tolist()
    # by hand: record = 0x3C00 | 0x3800 << 16 | 0xC000 << 32 | 0x4200 << 48
    record = 0x4200_C000_3800_3C00
    w0 = 5 | (2 << 3) | sum((l % 8) << (6 + 3 * l) for l in range(16)) | ((record & 0xFF) << 54)
    assert words[0] == w0 == 0x3E_B1A2_3EB1_A215  # (0xFAC688 twice: octal 76543210) << 6 | z << 3 | s
    assert words[1] == 7 | (7 << 3) | ((record & 0xFF) << 54)  # row 1 carries byte 0 again
    assert words[2] == ((record >> 8) & 0xFF) << 54 and words[15] == (record >> 56) << 54
    assert words == _reference_words(codes, qs, qz, rec)
    # several tiles, a partial last tile column (n = 40): identical to the literal port
    g = torch.Generator().manual_seed(0)
    c, a, b, r = _random_layer(32, 40, g)
    got = pack_dense_words(c, a, b, r)
    assert got.dtype == torch.int64 and got.tolist() == _reference_words(c, a, b, r)
    back = unpack_dense_words(got, 32, 40)
    assert torch.equal(back[0], c) and torch.equal(back[1], a) and torch.equal(back[2], b) and torch.equal(back[3], r)


def _quantized(act_order=True, bits=3, seed=0):
    from helpers import tiny_llama
    model = tiny_llama(layers=1, seed=seed)
    calib = [torch.randint(0, 250, (1, 32), generator=torch.Generator().manual_seed(k)) for k in range(4)]
    return polyquant.quantize(model, SpQRConfig(bits=bits, act_order=act_order), calibration=calib,
                              show_progress=False)


@pytest.mark.parametrize("act_order", [True, False])
def test_our_layer_decodes_with_the_independent_decoder(act_order):
    q = _quantized(act_order)
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"):
        qw = q.get_submodule(name).quantized_weight
        t = spqr_layer_tensors(qw)
        assert t["in_perm"].numel() == (qw.shape[1] // 2 if act_order else 0)
        m, n = qw.shape
        ref = spec_decode(m, n, t["dense_weights"].tolist(), t["row_offsets"].tolist(), t["col_vals"].tolist(),
                          t["in_perm"].tolist())
        ours = qw.dequantize()
        # same weights up to the float16 rounding of s * (q - z) that the CUDA decode adds
        assert torch.allclose(ours, ref, rtol=2e-3, atol=1e-5), float((ours - ref).abs().max())
        assert t["row_offsets"].numel() == m + 1 and t["col_vals"].numel() == qw.outliers.nnz > 0


def _write_spec_checkpoint(folder, seed=0, ptcsr_layer=None):
    """A SpQR checkpoint written from the specification alone (reference_pack, CSR / PTCSR by hand)."""
    from helpers import tiny_llama
    model = tiny_llama(layers=1, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    state = {k: v.half() for k, v in model.state_dict().items()}
    shapes, expected = {}, {}
    names = [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and n != "lm_head"]
    for name in names:
        m, n = model.get_submodule(name).weight.shape
        codes, qs, qz, rec = _random_layer(m, n, g)
        words = _reference_words(codes, qs, qz, rec)
        perm = torch.randperm(n, generator=g)
        mask = torch.rand(m, n, generator=g) < 0.03
        vals = (torch.randn(m, n, generator=g) * 0.1).half()
        ro, cv = [0], []
        for r in range(m):
            for c in range(n):
                if mask[r, c]:
                    cv.append((_h(float(vals[r, c])) << 16) | c)
            ro.append(len(cv))
        if name == ptcsr_layer:  # per 16-row block, entries interleaved by row, padded with zeros
            pro, pcv = [0], []
            for b in range(m // 16):
                cnt = max(ro[b * 16 + j + 1] - ro[b * 16 + j] for j in range(16))
                block = [0] * (cnt * 16)
                for j in range(16):
                    for t, e in enumerate(range(ro[b * 16 + j], ro[b * 16 + j + 1])):
                        block[t * 16 + j] = cv[e]
                pcv += block
                pro.append(len(pcv))
            ro, cv = pro, pcv
        tens = {"dense_weights": torch.tensor(words, dtype=torch.int64), "row_offsets": torch.tensor(ro, dtype=torch.int32),
                "col_vals": torch.tensor([x - (1 << 32) if x >= 1 << 31 else x for x in cv], dtype=torch.int32),
                "in_perm": torch.tensor([int(perm[2 * k]) | (int(perm[2 * k + 1]) << 16) for k in range(n // 2)],
                                        dtype=torch.int32)}
        del state[name + ".weight"]
        for k, v in tens.items():
            state[f"{name}.{k}"] = v
            shapes[f"{name}.{k}.shape"] = v.numel()
        expected[name] = (m, n, words, tens)
    folder.mkdir()
    state.pop("lm_head.weight", None)  # tied
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "spqr", "bits": 3, "beta1": 16, "beta2": 16, "shapes": shapes,
                                  "modules_to_not_convert": ["lm_head.weight"]}
    (folder / "config.json").write_text(json.dumps(cfg))
    return model, expected


def test_reads_a_checkpoint_written_from_the_specification(tmp_path):
    ptcsr = "model.layers.0.mlp.up_proj"
    _, expected = _write_spec_checkpoint(tmp_path / "ext", ptcsr_layer=ptcsr)
    q, _ = polyquant.load(tmp_path / "ext")
    for name, (m, n, words, t) in expected.items():
        qw = q.get_submodule(name).quantized_weight
        if name == ptcsr:  # decode the CSR we rebuilt against the words and our outliers' CSR
            o = qw.outliers
            ro, cv = o.row_offsets.tolist(), []
            perm = [int(x) for p in t["in_perm"].tolist() for x in (p & 0xFFFF, (p & 0xFFFFFFFF) >> 16)]
            pos = {c: i for i, c in enumerate(perm)}
            for c, v in zip(o.cols.tolist(), o.values.tolist()):
                cv.append((_h(v) << 16) | pos[c])
            ref = spec_decode(m, n, words, ro, cv, t["in_perm"].tolist())
            nnz_csr = int((t["col_vals"] != 0).sum())
            assert o.nnz == nnz_csr
        else:
            ref = spec_decode(m, n, words, t["row_offsets"].tolist(), t["col_vals"].tolist(), t["in_perm"].tolist())
        got = qw.dequantize()
        assert torch.allclose(got, ref, rtol=2e-3, atol=1e-4), (name, float((got - ref).abs().max()))
    out = q(torch.randint(0, 250, (1, 8))).logits
    assert torch.isfinite(out).all()


def test_a_checkpoint_whose_shapes_disagree_is_refused_naming_the_layer(tmp_path):
    _write_spec_checkpoint(tmp_path / "bad")
    cfg = json.loads((tmp_path / "bad" / "config.json").read_text())
    cfg["quantization_config"]["shapes"]["model.layers.0.self_attn.v_proj.col_vals.shape"] += 1
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.v_proj.*col_vals"):
        polyquant.load(tmp_path / "bad")
    del cfg["quantization_config"]["shapes"]["model.layers.0.self_attn.v_proj.col_vals.shape"]
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"v_proj.*has no"):
        polyquant.load(tmp_path / "bad")


@pytest.mark.parametrize("fmt,bits", [("spqr", 3), ("polyquant-spqr", 2), ("polyquant-spqr", 4)])
def test_save_load_identical_logits(tmp_path, fmt, bits):
    q = _quantized(bits=bits)
    x = torch.randint(0, 250, (1, 12))
    ref = q(x).logits
    polyquant.save(q, tmp_path / "m", format=fmt)
    q2, _ = polyquant.load(tmp_path / "m", kernel="reference")
    for n, mod in q.named_modules():
        if isinstance(mod, QuantLinear):
            a, b = mod.quantized_weight, q2.get_submodule(n).quantized_weight
            assert torch.equal(a.dequantize(), b.dequantize()) and a.nbytes() == b.nbytes(), n
    polyquant.set_kernels(q, "reference")
    assert torch.equal(q2(x).logits, q(x).logits) and torch.allclose(ref, q(x).logits, atol=1e-5)
    if fmt == "spqr":
        qc = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
        assert qc["bits"] == 3 and qc["beta1"] == qc["beta2"] == 16 and "lm_head" in qc["modules_to_not_convert"]
        assert qc["shapes"]["model.layers.0.self_attn.q_proj.dense_weights.shape"] == 4 * 4 * 16


def test_widths_the_transformers_layout_cannot_hold_are_refused_by_name(tmp_path):
    q = _quantized(bits=2)
    with pytest.raises(ValueError, match="polyquant-spqr"):
        polyquant.save(q, tmp_path / "m", format="spqr")
