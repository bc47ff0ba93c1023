"""The AWQ format: bit-exact packing of each layout (GEMM's interleaved order, GEMV's padded zeros,
llm-awq's int16 tiles) against words built here with Python ints, save -> load -> identical
logits for gemm / gemv / compressed-tensors, foreign checkpoints written independently per the
specification, and refusals (unknown versions, shapes disagreeing with the config)."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import AUTO_INT4, tiny_llama, tiny_qwen2
from safetensors.torch import save_file
from torch import nn

import polyquant
from polyquant.formats import CheckpointError, load, save
from polyquant.formats.awq import (awq_layer_tensors, llm_awq_index, normalize_awq_config, pack_awq_order,
                                   unpack_awq_order, zeros_width)
from polyquant.methods.awq import AWQConfig, awq_quantize
from polyquant.nn.quant_linear import QuantLinear
from polyquant.tensor.quantized_weight import QuantizedWeight

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's GEMM order: nibble i of a word holds column 8c + ORDER[i]


pytestmark = pytest.mark.usefixtures("one_thread")


def _i32(v: int) -> int:
    return v - (1 << 32) if v >= 1 << 31 else v


def _i16(v: int) -> int:
    return v - (1 << 16) if v >= 1 << 15 else v


# -- independent packers (Python ints, straight from the layout definitions) --------------------

def _gemm_words(mat: list[list[int]]) -> list[list[int]]:
    """``mat [rows][cols]`` -> words ``[rows][cols/8]``: word c holds cols 8c + ORDER[i] at nibble i."""
    return [[_i32(sum(row[8 * c + ORDER[i]] << (4 * i) for i in range(8))) for c in range(len(row) // 8)]
            for row in mat]


def _seq_words(mat: list[list[int]]) -> list[list[int]]:
    return [[_i32(sum(row[8 * c + i] << (4 * i) for i in range(8))) for c in range(len(row) // 8)] for row in mat]


def _llm_awq_words(codes: list[list[int]]) -> list[list[int]]:
    """llm-awq ``pack_intweight(interleave=4, kstride=64)`` written out: permute each 32 inputs
    (new[i1*8 + i0*2 + i2] = old[i0*8 + i1*2 + i2]), reorder each 8 (new[j1*4 + j0] = old[j0*2 + j1]),
    then each 4-row x 64-column tile, read row-major, gives 64 int16 words of 4 nibbles."""
    N, K = len(codes), len(codes[0])
    perm = []
    for row in codes:
        r1 = [0] * K
        for base in range(0, K, 32):
            for i0 in range(4):
                for i1 in range(4):
                    for i2 in range(2):
                        r1[base + i1 * 8 + i0 * 2 + i2] = row[base + i0 * 8 + i1 * 2 + i2]
        r2 = [0] * K
        for base in range(0, K, 8):
            for j0 in range(4):
                for j1 in range(2):
                    r2[base + j1 * 4 + j0] = r1[base + j0 * 2 + j1]
        perm.append(r2)
    words = [[0] * K for _ in range(N // 4)]
    for nb in range(N // 4):
        for kb in range(K // 64):
            flat = [perm[nb * 4 + r][kb * 64 + kk] for r in range(4) for kk in range(64)]
            for w in range(64):
                words[nb][kb * 64 + w] = _i16(sum(flat[4 * w + j] << (4 * j) for j in range(4)))
    return words


def _qw(codes: torch.Tensor, gs: int, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    out, inp = codes.shape
    G = inp // gs
    scale = (torch.rand(out, G, generator=g) * 0.1 + 0.01).to(torch.float16).float()
    zero = torch.randint(0, 16, (out, G), generator=g).float()
    return QuantizedWeight.from_codes(codes.to(torch.uint8), "uint4", (1, gs), scale, zero)


def _codes(out, inp):
    n = torch.arange(out).view(-1, 1)
    k = torch.arange(inp).view(1, -1)
    return ((n * 5 + k * 3 + k // 16) % 16).to(torch.uint8)


# -- packing, hand-checked ------------------------------------------------------------------------

def test_gemm_order_on_a_hand_checked_word():
    codes = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [3, 4, 5, 6, 7, 8, 9, 10]], dtype=torch.uint8)
    # nibble i holds element ORDER[i]: row 0 -> 0,2,4,6,1,3,5,7 from the low nibble up
    assert pack_awq_order(codes, dim=1).tolist() == [[0x75316420], [_i32(0xA8649753)]]
    assert torch.equal(unpack_awq_order(pack_awq_order(codes, dim=1), 8, dim=1), codes)


def test_gemm_layer_tensors_match_the_definition():
    out, inp, gs = 16, 64, 32
    qw = _qw(_codes(out, inp), gs)
    t = awq_layer_tensors(qw, "gemm")
    codes = qw.codes.tolist()
    qweight_expected = _gemm_words([[codes[n][k] for n in range(out)] for k in range(inp)])  # [in][out/8]
    zeros = qw.zero.long().tolist()
    qzeros_expected = _gemm_words([[zeros[n][g] for n in range(out)] for g in range(inp // gs)])
    assert t["qweight"].dtype == torch.int32 and t["qweight"].tolist() == qweight_expected
    assert t["qzeros"].dtype == torch.int32 and t["qzeros"].tolist() == qzeros_expected
    assert t["scales"].dtype == torch.float16 and tuple(t["scales"].shape) == (inp // gs, out)
    assert torch.equal(t["scales"].float(), qw.scale.t())


@pytest.mark.parametrize("inp,gs,width", [(576, 64, 2), (1536, 64, 4), (128, 32, 4), (1024, 128, 1),
                                          (4096, 128, 4), (2048, 256, 1)])
def test_gemv_zeros_width_is_autoawq_calculate_zeros_width(inp, gs, width):
    assert zeros_width(inp, gs) == width
    with pytest.raises(ValueError, match="group size 16"):
        zeros_width(128, 16)


def test_gemv_layer_tensors_match_the_definition():
    out, inp, gs = 8, 192, 64  # G = 3 -> Z = ceil(3/8) = 1 -> rounded to a multiple of 2: 2 words, 16 slots
    qw = _qw(_codes(out, inp), gs, seed=1)
    t = awq_layer_tensors(qw, "gemv")
    codes = qw.codes.tolist()
    assert t["qweight"].tolist() == _seq_words(codes)
    assert t["qweight"][0, 0].item() == _i32(sum(codes[0][i] << (4 * i) for i in range(8)))
    zeros = qw.zero.long().tolist()
    padded = [row + [0] * (16 - len(row)) for row in zeros]
    assert tuple(t["qzeros"].shape) == (out, 2) and t["qzeros"].tolist() == _seq_words(padded)
    assert tuple(t["scales"].shape) == (out, 16) and t["scales"].dtype == torch.float16
    assert torch.equal(t["scales"][:, :3].float(), qw.scale) and not t["scales"][:, 3:].any()
    # GEMV qweight is exactly QuantizedWeight.data (the dense stream along in)
    assert torch.equal(t["qweight"], qw.data)


def test_llm_awq_index_matches_pack_intweight():
    N, K = 8, 128
    codes = _codes(N, K)
    words = _llm_awq_words(codes.tolist())
    c = codes.tolist()
    assert words[0][0] == _i16(c[0][0] | c[0][8] << 4 | c[0][16] << 8 | c[0][24] << 12)  # rows interleave by 64s
    assert words[0][16] == _i16(c[1][0] | c[1][8] << 4 | c[1][16] << 8 | c[1][24] << 12)
    assert words[0][1] == _i16(c[0][1] | c[0][9] << 4 | c[0][17] << 8 | c[0][25] << 12)
    assert words[0][2] == _i16(c[0][2] | c[0][10] << 4 | c[0][18] << 8 | c[0][26] << 12)
    idx = llm_awq_index(N, K)
    flat = codes.reshape(-1).long()
    packed = (flat[idx] << torch.tensor([0, 4, 8, 12])).sum(-1)
    assert [[_i16(int(v)) for v in row] for row in packed.tolist()] == words


# -- save -> load round trips ---------------------------------------------------------------------

def _calib(n=4, seqlen=32):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (1, seqlen), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def awq_models():
    out = {}
    for make in (tiny_llama, tiny_qwen2):
        model = make()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(".bias"):
                    p.copy_(torch.randn_like(p) * 0.5)
        out[make.__name__] = polyquant.quantize(model, AWQConfig(bits=4, group_size=32), calibration=_calib(),
                                                show_progress=False)
    return out


@pytest.mark.parametrize("fmt,version", [("awq", "gemm"), ("awq", "gemv"), ("compressed-tensors", None)])
@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen2"])
def test_save_load_gives_identical_logits(tmp_path, awq_models, fmt, version, which):
    q = awq_models[which]
    q.polyquant.config["version"] = version or "gemm"
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = q(x).logits
    path = save(q, tmp_path / "ck", format=fmt)
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    if fmt == "awq":
        assert qcfg == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                        "version": version, "modules_to_not_convert": None}
        assert json.loads((path / "quant_config.json").read_text()) == {
            "zero_point": True, "q_group_size": 32, "w_bit": 4, "version": version.upper(),
            "modules_to_not_convert": None}
    else:
        assert qcfg["config_groups"]["group_0"]["weights"]["symmetric"] is False
    loaded, _ = load(path)
    with torch.no_grad():
        got = loaded(x).logits
    assert torch.equal(got, ref)
    for n, m in loaded.named_modules():
        if isinstance(m, QuantLinear):
            a, b = m.quantized_weight, q.get_submodule(n).quantized_weight
            assert torch.equal(a.dequantize(), b.dequantize()), n
            assert m.kernel_name == AUTO_INT4 and a.qtype == "uint4"
    if fmt == "awq":  # re-saving a loaded checkpoint keeps its layout
        again = save(loaded, tmp_path / "again", format="awq")
        assert json.loads((again / "config.json").read_text())["quantization_config"]["version"] == version


def test_symmetric_awq_saves_as_zero_8_and_loads_back_signed(tmp_path):
    q = polyquant.quantize(tiny_llama(), AWQConfig(bits=4, group_size=32, zero_point=False), calibration=_calib(),
                           show_progress=False)
    path = save(q, tmp_path / "ck", format="awq")
    assert json.loads((path / "config.json").read_text())["quantization_config"]["zero_point"] is False
    loaded, _ = load(path)
    m = loaded.model.layers[0].mlp.up_proj
    assert m.quantized_weight.qtype == "int4" and m.quantized_weight.zero is None
    assert torch.equal(m.quantized_weight.dequantize(), q.model.layers[0].mlp.up_proj.quantized_weight.dequantize())


def test_save_refusals(tmp_path):
    q3 = polyquant.quantize(tiny_llama(), AWQConfig(bits=3, group_size=32), calibration=_calib(2),
                            show_progress=False)
    with pytest.raises(ValueError, match="compressed-tensors"):
        save(q3, tmp_path / "a", format="awq")
    assert not (tmp_path / "a").exists()
    save(q3, tmp_path / "ct", format="compressed-tensors")  # W3 asym groups: compressed-tensors stores them
    q16 = polyquant.quantize(tiny_llama(), AWQConfig(bits=4, group_size=16, version="gemv"), calibration=_calib(2),
                             show_progress=False)
    with pytest.raises(ValueError, match="GEMV.*group size 16"):
        save(q16, tmp_path / "b", format="awq")
    q16.polyquant.config["version"] = "gemm"
    save(q16, tmp_path / "c", format="awq")  # GEMM has no such restriction


def test_modules_to_not_convert_lists_float_linears(tmp_path):
    q = polyquant.quantize(tiny_llama(), AWQConfig(bits=4, group_size=32, exclude=[r"mlp\.down_proj"]),
                           calibration=_calib(2), show_progress=False)
    path = save(q, tmp_path / "ck", format="awq")
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qcfg["modules_to_not_convert"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    loaded, _ = load(path)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, nn.Linear)


# -- foreign checkpoints, written per the specification ---------------------------------------------

def _foreign_layer(qw: QuantizedWeight, layout: str) -> dict[str, torch.Tensor]:
    out, inp = qw.shape
    gs = qw.block[1]
    G = inp // gs
    codes, zeros = qw.codes.tolist(), qw.zero.long().tolist()
    scale = qw.scale.to(torch.float16)
    if layout == "gemm":
        return {"qweight": torch.tensor(_gemm_words([[codes[n][k] for n in range(out)] for k in range(inp)]),
                                        dtype=torch.int32),
                "qzeros": torch.tensor(_gemm_words([[zeros[n][g] for n in range(out)] for g in range(G)]),
                                       dtype=torch.int32),
                "scales": scale.t().contiguous()}
    width = {32: 4, 64: 2}.get(gs, 1)
    Z = -(-(-(-G // 8)) // width) * width  # ceil(ceil(G/8) / width) * width
    if layout == "gemv":
        s = torch.zeros(out, 8 * Z, dtype=torch.float16)
        s[:, :G] = scale
        return {"qweight": torch.tensor(_seq_words(codes), dtype=torch.int32),
                "qzeros": torch.tensor(_seq_words([r + [0] * (8 * Z - G) for r in zeros]), dtype=torch.int32),
                "scales": s}
    s = torch.zeros(8 * Z, out, dtype=torch.float16)
    s[:G] = scale.t()
    sz = torch.zeros(8 * Z, out, dtype=torch.float16)
    sz[:G] = -(scale.t().float() * qw.zero.t()).to(torch.float16)
    return {"qweight": torch.tensor(_llm_awq_words(codes), dtype=torch.int16), "scales": s, "scaled_zeros": sz}


def _write_foreign(folder, model, qws: dict[str, QuantizedWeight], qcfg: dict, layout: str) -> None:
    folder.mkdir()
    cfg = model.config.to_dict()
    cfg["quantization_config"] = qcfg
    (folder / "config.json").write_text(json.dumps(cfg))
    tensors = {}
    for k, v in model.state_dict().items():
        if k.rsplit(".", 1)[0] in qws and k.endswith(".weight"):
            continue
        if k == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        tensors[k] = v.detach().clone().contiguous()
    for name, qw in qws.items():
        for k, t in _foreign_layer(qw, layout).items():
            tensors[f"{name}.{k}"] = t
    save_file(tensors, str(folder / "model.safetensors"))


def _foreign(tmp_path, layout, qcfg_extra=None, gs=64, seed=0):
    model = tiny_llama(seed=seed)
    qws = {n: awq_quantize(m.weight.data, AWQConfig(group_size=gs, clip=False))
           for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    qcfg = {"quant_method": "awq", "bits": 4, "group_size": gs, "zero_point": True, "version": layout,
            "modules_to_not_convert": None, **(qcfg_extra or {})}
    folder = tmp_path / f"foreign-{layout}"
    _write_foreign(folder, model, qws, qcfg, layout)
    return folder, model, qws


@pytest.mark.parametrize("layout,extra", [("gemm", None), ("gemv", None), ("exllama", {"version": "exllama"}),
                                          ("llm-awq", {"backend": "llm-awq", "version": "gemv"})])
def test_foreign_checkpoints_load_and_match(tmp_path, layout, extra):
    folder, model, qws = _foreign(tmp_path, "gemm" if layout == "exllama" else layout, extra)
    loaded, _ = load(folder, kernel="reference")
    ref = tiny_llama(seed=0)
    with torch.no_grad():
        for n, qw in qws.items():
            if layout == "llm-awq":  # W = q * s + scaled_zeros, with the fp16 product as stored
                s = qw.full_scale()
                sz = -(qw.scale.float() * qw.zero).to(torch.float16).float().repeat_interleave(64, 1)
                w = qw.codes.float() * s + sz
            else:
                w = qw.dequantize()
            ref.get_submodule(n).weight.copy_(w)
            got = loaded.get_submodule(n).quantized_weight
            assert got.qtype == "uint4" and got.block == (1, 64), n
            assert torch.allclose(got.dequantize(), w, rtol=0, atol=1e-6), n
            if layout != "llm-awq":
                assert torch.equal(got.codes, qw.codes) and torch.equal(got.zero, qw.zero), n
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        a, b = loaded(x).logits, ref(x).logits
    assert (a - b).abs().max() < 1e-4
    loaded.get_submodule("model.layers.0.mlp.up_proj").set_kernel("auto")
    assert loaded.get_submodule("model.layers.0.mlp.up_proj").kernel_name == AUTO_INT4  # the 4-bit fast path


def _patch_config(folder, **changes):
    p = folder / "config.json"
    cfg = json.loads(p.read_text())
    cfg["quantization_config"].update(changes)
    p.write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,needle", [
    ({"version": "marlin"}, "marlin"),
    ({"version": "gemv_fast"}, "gemv_fast"),
    ({"version": "int8"}, "unknown AWQ version 'int8'"),
    ({"bits": 8}, "4-bit"),
    ({"group_size": 32}, r"qzeros has shape \(2, 8\), expected \(4, 8\)|shape"),
    ({"version": "gemv"}, "gemv layout"),
    ({"zero_point": "yes"}, "zero_point"),
])
def test_bad_checkpoints_are_refused(tmp_path, changes, needle):
    folder, _, _ = _foreign(tmp_path, "gemm")
    _patch_config(folder, **changes)
    with pytest.raises(CheckpointError, match=needle):
        load(folder)


def test_wrong_tensor_dtype_and_missing_tensor(tmp_path):
    from safetensors.torch import load_file
    folder, _, _ = _foreign(tmp_path, "gemm")
    t = load_file(str(folder / "model.safetensors"))
    t["model.layers.0.self_attn.q_proj.qweight"] = t["model.layers.0.self_attn.q_proj.qweight"].to(torch.int16)
    save_file(t, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="q_proj.*qweight has dtype torch.int16"):
        load(folder)
    del t["model.layers.0.self_attn.q_proj.qzeros"]
    t["model.layers.0.self_attn.q_proj.qweight"] = t["model.layers.0.self_attn.q_proj.qweight"].to(torch.int32)
    save_file(t, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor 'qzeros'"):
        load(folder)


def test_config_normalization_reads_autoawq_and_transformers_spellings():
    c = normalize_awq_config({"w_bit": 4, "q_group_size": 128, "zero_point": True, "version": "GEMM"})
    assert (c["bits"], c["group_size"], c["layout"]) == (4, 128, "gemm")
    c = normalize_awq_config({"quant_method": "awq", "bits": 4, "group_size": 64, "format": "gemv", "backend": "auto"})
    assert c["layout"] == "gemv"
    assert normalize_awq_config({"bits": 4, "format": "llm-awq"})["layout"] == "llm-awq"
    assert normalize_awq_config({"bits": 4, "version": "ipex"})["layout"] == "gemm"
