"""The AWQ checkpoint format (``quant_method: awq``: AutoAWQ, transformers ``AwqConfig``, vLLM).

Per quantized Linear ``[out, in]`` (4-bit codes ``q``, group size ``gs``, ``G = in / gs``):

========  =========  ======  ===================  ================================================
layout    tensor     dtype   shape                content
========  =========  ======  ===================  ================================================
gemm      qweight    int32   ``[in, out/8]``      ``q[n, k]`` of ``W.T``, packed along out in the
                                                  AWQ order: nibble i of word c holds column
                                                  ``8c + AWQ_ORDER[i]``, ``AWQ_ORDER = [0, 2, 4, 6,
                                                  1, 3, 5, 7]``
          qzeros     int32   ``[G, out/8]``       zero points, same packing (raw, no -1 offset)
          scales     fp16    ``[G, out]``
gemv      qweight    int32   ``[out, in/8]``      packed along in, nibble i = column ``8c + i``
          qzeros     int32   ``[out, Z]``         same packing, zero-padded; ``Z =
                                                  calculate_zeros_width(in, gs)`` = ``ceil(G/8)``
                                                  rounded up to a multiple of 2 (gs 64) or 4
                                                  (gs 32); other group sizes below 128 do not exist
          scales     fp16    ``[out, 8Z]``        zero-padded past ``G``
llm-awq   qweight    int16   ``[out/4, in]``      ``pack_intweight(q, interleave=4, kstride=64)``:
          (read                                   in each 32 inputs the order ``[0, 1, 8, 9, 16,
          only)                                   17, 24, 25, 2, 3, ...]``, then each 8 reordered
                                                  ``[0, 2, 4, 6, 1, 3, 5, 7]``; then every 4 rows x
                                                  64 columns tile (row-major) is read as 64 runs of
                                                  4 nibbles, one int16 each (bits 0, 4, 8, 12)
          scales     fp16    ``[8Z, out]``        zero-padded past ``G``
          scaled_    fp16    ``[8Z, out]``        ``-(scale * zero)``: ``W = q * s + scaled_zeros``
          zeros
========  =========  ======  ===================  ================================================

``W[n, k] = (q[n, k] - z[n, k // gs]) * s[n, k // gs]``. Sources: AutoAWQ ``awq/modules/linear/
gemm.py``, ``gemv.py`` (``from_linear``, ``calculate_zeros_width``), ``awq/models/_config.py``;
llm-awq ``awq/quantize/qmodule.py`` (``WQLinear``, ``pack_intweight``).

Config: ``{"quant_method": "awq", "bits": 4, "group_size": gs, "zero_point": true, "version":
"gemm"|"gemv", "modules_to_not_convert": [...] | null}`` in config.json, and AutoAWQ's
``quant_config.json`` (``w_bit``, ``q_group_size``, ``zero_point``, ``version``). Saving writes
``gemm`` or ``gemv`` (the method config's ``version``); loading reads ``gemm``, ``gemv`` and
llm-awq (``backend``/``version``/``format`` ``llm-awq``). ``exllama`` and ``ipex`` name load-time
kernels over GEMM tensors (AutoAWQ's ``WQLinear_Exllama``/``WQLinear_IPEX`` have GEMM's buffers)
and are read as ``gemm``; ``marlin`` and ``gemv_fast`` (other tile layouts) are refused by name.

Loaded layers are ordinary ``QuantizedWeight`` objects (``uint4`` codes, integer zeros, fp16
scales), so the 4-bit kernels (``cpu-int4``, ``triton-w4a16``) run them; llm-awq's zeros are
``-scaled_zeros / scale`` (exact in float, usually not an integer after the fp16 product).
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from polyquant.formats.base import (GPU_SERVING_NOTE, VIA_GPTQMODEL_NOTE, CheckpointError, Format, check_linears,
                                    checkpoint_group_size, float_dtype, layer_bias, layer_names, layer_weights,
                                    output_head_names, register_format)
from polyquant.tensor.packing import pack, unpack
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["AWQFormat", "AWQ_ORDER", "AWQ_REVERSE_ORDER", "normalize_awq_config", "zeros_width",
           "pack_awq_order", "unpack_awq_order", "awq_layer_tensors", "awq_weight_from_tensors",
           "llm_awq_index"]

log = logging.getLogger(__name__)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
WRITE_VERSIONS = ("gemm", "gemv")
READ_LAYOUTS = ("gemm", "gemv", "llm-awq")
_AS_GEMM = ("exllama", "ipex")  # load-time kernel choices over GEMM-layout tensors
_REFUSED = {
    "marlin": "AutoAWQ's Marlin layout (qweight [in/16, out*2] in Marlin's tile permutation, symmetric "
              "zero-free weights) is not read; use a gemm checkpoint (vLLM repacks gemm to Marlin at load)",
    "gemv_fast": "AutoAWQ's gemv_fast layout (int16 interleaved qweight with different scale/zero packing) "
                 "is not read; use a gemm or gemv checkpoint",
}
_FP16_MAX = 65504.0


# -- config --------------------------------------------------------------------------------
def normalize_awq_config(qcfg: dict[str, Any]) -> dict[str, Any]:
    """Canonical ``bits``, ``group_size``, ``zero_point``, ``layout`` (gemm / gemv / llm-awq),
    ``modules_to_not_convert`` from an AWQ ``quantization_config`` or ``quant_config.json``
    (AutoAWQ's ``w_bit`` / ``q_group_size`` aliases; ``version`` or transformers' ``format``).
    Raises CheckpointError for an unreadable version or value."""
    c = dict(qcfg)
    bits = c.get("bits", c.get("w_bit", 4))
    if isinstance(bits, bool) or bits != 4:
        raise CheckpointError(f"AWQ checkpoints store 4-bit weights; this one says bits={bits!r}")
    gs = c.get("group_size", c.get("q_group_size", 128))
    if isinstance(gs, bool) or not isinstance(gs, int) or (gs != -1 and gs < 1):
        raise CheckpointError(f"AWQ group_size must be -1 or a positive integer, got {gs!r}")
    zp = c.get("zero_point", True)
    if not isinstance(zp, bool):
        raise CheckpointError(f"AWQ zero_point must be true or false, got {zp!r}")
    version = c.get("version") or c.get("format") or "gemm"
    if not isinstance(version, str):
        raise CheckpointError(f"AWQ version must be a string, got {version!r}")
    version = version.lower()
    backend = str(c.get("backend") or "").lower()
    if backend == "llm-awq" or version in ("llm-awq", "llm_awq"):
        layout = "llm-awq"
    elif version in _REFUSED:
        raise CheckpointError(f"AWQ version {version!r}: {_REFUSED[version]}")
    elif version in _AS_GEMM:
        layout = "gemm"
    elif version in ("gemm", "gemv"):
        layout = version
    else:
        raise CheckpointError(f"unknown AWQ version {version!r}; readable: gemm, gemv, llm-awq "
                              f"(and {', '.join(_AS_GEMM)} over gemm tensors)")
    mnc = c.get("modules_to_not_convert")
    if mnc is not None and not (isinstance(mnc, list) and all(isinstance(x, str) for x in mnc)):
        raise CheckpointError(f"AWQ modules_to_not_convert must be a list of names or null, got {mnc!r}")
    return {"bits": 4, "group_size": gs, "zero_point": zp, "layout": layout, "version": version,
            "modules_to_not_convert": mnc}


def zeros_width(in_features: int, group_size: int, pad_multiple: bool = True) -> int:
    """AutoAWQ's ``calculate_zeros_width``: int32 words of zeros per row in the GEMV layout
    (``ceil(G / 8)``, rounded up to a multiple of 2 for group 64 and of 4 for group 32;
    ``pad_multiple=False``: the plain ``ceil(G / 8)`` some llm-awq versions use). Raises
    ValueError for group sizes below 128 other than 32 and 64 (AutoAWQ has none)."""
    if group_size >= 128:
        mult = 1
    elif group_size == 64:
        mult = 2
    elif group_size == 32:
        mult = 4
    else:
        raise ValueError(f"group size {group_size} has no GEMV zeros layout (32, 64 or >= 128)")
    width = math.ceil((in_features // group_size) / 8)
    return math.ceil(width / mult) * mult if pad_multiple else width


# -- packing -------------------------------------------------------------------------------
def pack_awq_order(codes: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """4-bit codes -> int32 words along ``dim`` in the AWQ (GEMM) order: nibble i of word c holds
    element ``8c + AWQ_ORDER[i]``. The length along ``dim`` must be a multiple of 8."""
    x = codes.movedim(dim, -1)
    n = x.shape[-1]
    if n % 8:
        raise ValueError(f"AWQ packs 8 values per word; {n} is not a multiple of 8")
    seq = x.reshape(*x.shape[:-1], n // 8, 8)[..., list(AWQ_ORDER)].reshape(x.shape)
    return pack(seq, 4, dim=-1).movedim(-1, dim)


def unpack_awq_order(words: torch.Tensor, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_awq_order` (uint8 codes of length ``n`` along ``dim``)."""
    seq = unpack(words.movedim(dim, -1).contiguous(), 4, n, dim=-1)
    codes = seq.reshape(*seq.shape[:-1], n // 8, 8)[..., list(AWQ_REVERSE_ORDER)].reshape(seq.shape)
    return codes.movedim(-1, dim)


def llm_awq_index(out_features: int, in_features: int) -> torch.Tensor:
    """``[out/4, in, 4]``: for int16 word ``[r, c]`` of an llm-awq ``qweight``, nibble j holds the
    code at flat position ``index[r, c, j]`` of the ``[out, in]`` code matrix (the permutation
    ``pack_intweight(interleave=4, kstride=64)`` applies)."""
    N, K = out_features, in_features
    if N % 4 or K % 64:
        raise ValueError(f"llm-awq needs out % 4 == 0 and in % 64 == 0, got {N}x{K}")
    a = torch.arange(N * K, dtype=torch.int64)
    a = a.reshape(N, K // 32, 4, 4, 2).permute(0, 1, 3, 2, 4).reshape(N, K // 32, 32)
    a = a.reshape(N, K // 32, 4, 4, 2).permute(0, 1, 2, 4, 3).reshape(N, K)
    a = a.reshape(N // 4, 4, K // 64, 64).permute(0, 2, 1, 3).reshape(N // 4, K // 64, 64, 4)
    return a.reshape(N // 4, K, 4)


# -- saving ----------------------------------------------------------------------------------
def check_awq_weight(qw: QuantizedWeight, version: str = "gemm") -> str | None:
    """None when the AWQ ``version`` layout can store ``qw``; otherwise why not."""
    out, inp = qw.shape
    if qw.qt.kind != "int" or qw.bits != 4:
        return f"AWQ stores 4-bit integer weights, not {qw.qtype} (save other widths as compressed-tensors)"
    if qw.block[0] != 1:
        return f"AWQ groups run along the input dim only (row blocks of 1), got block {qw.block}"
    if qw.g_idx is not None:
        return "AWQ has no act-order (g_idx)"
    if qw.extras:
        return f"AWQ cannot store extra tensors {sorted(qw.extras)}"
    gs = qw.group_columns
    if inp % gs:
        return f"AWQ needs a group size that divides in_features ({gs} does not divide {inp})"
    if out % 8 or inp % 8:
        return f"AWQ packs 8 values per int32: out and in features must be multiples of 8 (got {out}x{inp})"
    if version == "gemv":
        try:
            zeros_width(inp, gs)
        except ValueError as e:
            return f"AutoAWQ's GEMV layout: {e}"
    z = qw.zero_points().cpu()
    if not bool(torch.equal(z, z.round())):
        return "AWQ zero points must be integers"
    if float(z.min()) < 0 or float(z.max()) > 15:
        return f"AWQ zero points must lie in [0, 15], got [{float(z.min()):g}, {float(z.max()):g}]"
    s = qw.scale.detach().float()
    if not bool(torch.isfinite(s).all()) or float(s.abs().max()) > _FP16_MAX:
        return "AWQ stores fp16 scales: a scale is not finite or exceeds the fp16 range"
    return None


def awq_layer_tensors(qw: QuantizedWeight, version: str = "gemm") -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales`` of one weight in the ``gemm`` or ``gemv`` layout."""
    if version not in WRITE_VERSIONS:
        raise ValueError(f"AWQ version must be one of {WRITE_VERSIONS}, got {version!r}")
    if reason := check_awq_weight(qw, version):
        raise ValueError(reason)
    qw = qw.to("cpu")
    out, inp = qw.shape
    codes = qw.codes                                   # [out, in]
    zeros = qw.zero_points().cpu().to(torch.uint8)             # [out, G]
    scales = qw.scale.detach().to(torch.float16)       # [out, G]
    if version == "gemm":
        return {"qweight": pack_awq_order(codes.t().contiguous(), dim=1).contiguous(),
                "qzeros": pack_awq_order(zeros.t().contiguous(), dim=1).contiguous(),
                "scales": scales.t().contiguous()}
    gs = qw.group_columns
    G, Z = zeros.shape[1], zeros_width(inp, gs)
    zpad = torch.zeros(out, 8 * Z, dtype=torch.uint8)
    zpad[:, :G] = zeros
    spad = torch.zeros(out, 8 * Z, dtype=torch.float16)
    spad[:, :G] = scales
    return {"qweight": pack(codes, 4, dim=1).contiguous(), "qzeros": pack(zpad, 4, dim=1).contiguous(),
            "scales": spad.contiguous()}


# -- loading ---------------------------------------------------------------------------------
def _fail(name: str, msg: str) -> CheckpointError:
    return CheckpointError(f"AWQ layer {name!r}: {msg}")


def _expect(name: str, tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], dtype, what: str):
    if key not in tensors:
        raise _fail(name, f"missing tensor {key!r} ({what} layout)")
    t = tensors[key]
    if tuple(t.shape) != shape:
        raise _fail(name, f"{key} has shape {tuple(t.shape)}, expected {shape} for the {what} layout")
    if dtype == "float":
        if not t.dtype.is_floating_point:
            raise _fail(name, f"{key} has dtype {t.dtype}, expected a float dtype (fp16)")
    elif t.dtype != dtype:
        raise _fail(name, f"{key} has dtype {t.dtype}, expected {dtype}")
    return t


def awq_weight_from_tensors(name: str, cfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                            in_features: int, out_features: int) -> QuantizedWeight:
    """The ``QuantizedWeight`` of one layer from its AWQ tensors (``cfg`` normalized).
    Raises CheckpointError naming the layer when a tensor disagrees with the config."""
    layout = cfg["layout"]
    gs = cfg["group_size"]
    gs = in_features if gs == -1 or gs > in_features else gs
    N, K = out_features, in_features
    if K % gs:
        raise _fail(name, f"group_size {cfg['group_size']} does not divide in_features {K}")
    if N % 8 or K % 8:
        raise _fail(name, f"a {K}x{N} layer cannot be packed 8 values per int32")
    G = K // gs
    extra = sorted(set(tensors) - {"qweight", "qzeros", "scales", "scaled_zeros", "bias"})
    if extra:
        raise _fail(name, f"unexpected tensors {extra}")
    if layout == "gemm":
        qweight = _expect(name, tensors, "qweight", (K, N // 8), torch.int32, "gemm")
        qzeros = _expect(name, tensors, "qzeros", (G, N // 8), torch.int32, "gemm")
        scales = _expect(name, tensors, "scales", (G, N), "float", "gemm")
        codes = unpack_awq_order(qweight, N, dim=1).t().contiguous()        # [N, K]
        zeros = unpack_awq_order(qzeros, N, dim=1).t().float().contiguous()  # [N, G]
        scale = scales.t().contiguous()
        data = pack(codes, 4, dim=1)
    elif layout == "gemv":
        try:
            Z = zeros_width(K, gs)
        except ValueError as e:
            raise _fail(name, f"the gemv layout: {e}") from None
        qweight = _expect(name, tensors, "qweight", (N, K // 8), torch.int32, "gemv")
        qzeros = _expect(name, tensors, "qzeros", (N, Z), torch.int32, "gemv")
        scales = _expect(name, tensors, "scales", (N, 8 * Z), "float", "gemv")
        zeros = unpack(qzeros.contiguous(), 4, 8 * Z, dim=1)[:, :G].float().contiguous()
        scale = scales[:, :G].contiguous()
        data = qweight.contiguous()  # the dense LSB-first stream along in: QuantizedWeight.data itself
    else:
        if N % 4 or K % 64:
            raise _fail(name, f"the llm-awq layout needs out % 4 == 0 and in % 64 == 0, got {N}x{K}")
        qweight = _expect(name, tensors, "qweight", (N // 4, K), torch.int16, "llm-awq")
        if "scales" not in tensors or "scaled_zeros" not in tensors:
            raise _fail(name, "missing tensor 'scales' or 'scaled_zeros' (llm-awq layout)")
        rows = tensors["scales"].shape[0] if tensors["scales"].dim() == 2 else -1
        allowed = set()
        for pad in (True, False):
            try:
                allowed.add(8 * zeros_width(K, gs, pad))
            except ValueError:
                pass
        if rows not in allowed:
            raise _fail(name, f"scales has shape {tuple(tensors['scales'].shape)}, expected "
                              f"({' or '.join(map(str, sorted(allowed))) or '?'}, {N}) for the llm-awq layout")
        scales = _expect(name, tensors, "scales", (rows, N), "float", "llm-awq")
        szeros = _expect(name, tensors, "scaled_zeros", (rows, N), "float", "llm-awq")
        words = qweight.to(torch.int32) & 0xFFFF
        nibbles = (words.unsqueeze(-1) >> torch.tensor([0, 4, 8, 12], dtype=torch.int32)) & 0xF
        flat = torch.empty(N * K, dtype=torch.uint8)
        flat[llm_awq_index(N, K).reshape(-1)] = nibbles.reshape(-1).to(torch.uint8)
        codes = flat.reshape(N, K)
        scale = scales[:G].t().contiguous()                 # [N, G]
        sz = szeros[:G].t().float()
        s32 = scale.float()
        dead = s32 == 0
        if bool((dead & (sz != 0)).any()):
            raise _fail(name, "a group with scale 0 has a nonzero scaled_zero (not representable)")
        zeros = torch.where(dead, torch.zeros_like(sz), -sz / torch.where(dead, torch.ones_like(s32), s32))
        data = pack(codes, 4, dim=1)
    if not bool(torch.isfinite(scale.float()).all()):
        raise _fail(name, "scales are not finite")
    if not cfg["zero_point"] and bool((zeros == 8).all()):  # AWQ's symmetric quantizer: signed int4
        return QuantizedWeight("int4", (N, K), (1, gs), data, scale, None)
    return QuantizedWeight("uint4", (N, K), (1, gs), data, scale, zeros)


# -- the Format ------------------------------------------------------------------------------
def _version_of(model: nn.Module) -> str:
    rec = getattr(model, "polyquant", None)
    cfg = dict(getattr(rec, "config", {}) or {}) if rec is not None else {}
    v = cfg.get("version")
    if v is None and rec is not None:  # a loaded AWQ checkpoint: the layout it came in
        q = (getattr(rec, "extra", {}) or {}).get("quantization_config") or {}
        if q.get("quant_method") == "awq":
            try:
                layout = normalize_awq_config(q)["layout"]
                v = layout if layout in WRITE_VERSIONS else None
            except CheckpointError:
                v = None
    v = str(v or "gemm").lower()
    if v not in WRITE_VERSIONS:
        raise ValueError(f"AWQ checkpoints are written as version {' or '.join(WRITE_VERSIONS)}, not {v!r}")
    return v


class AWQFormat(Format):
    """AWQ checkpoints: writes AutoAWQ's ``gemm`` (default) or ``gemv``; reads those and llm-awq."""

    name = "awq"
    quant_method = "awq"
    untested_readers = {"transformers": VIA_GPTQMODEL_NOTE, "autoawq": "not in the test extra (deprecated; CUDA kernels)",
                        "vllm": GPU_SERVING_NOTE}
    untested_writers = {"autoawq": "not in the test extra (deprecated; CUDA kernels)",
                        "llm-compressor": "not in the test extra"}
    description = "AWQ int32-packed 4-bit weights with fp16 group scales and integer zeros (gemm/gemv; llm-awq read)"

    def __init__(self, version: str = "gemm") -> None:
        if version not in WRITE_VERSIONS:
            raise ValueError(f"AWQ version must be one of {WRITE_VERSIONS}, got {version!r}")
        self.version = version

    # -- saving ---------------------------------------------------------------------------
    def for_model(self, model: nn.Module) -> "AWQFormat":
        """A copy writing the model's ``version`` (its AWQ config's, or the layout it was loaded from)."""
        return AWQFormat(_version_of(model))

    def for_config(self, qcfg: dict[str, Any]) -> "AWQFormat":
        """A copy for the checkpoint's layout (gemm / gemv), so the generic tensor check compares
        against that layout; llm-awq's (read only) keeps this one, whose check it does not run."""
        layout = normalize_awq_config(qcfg).get("layout")
        return AWQFormat(layout) if layout in WRITE_VERSIONS else _ReadOnlyAWQ(self.version)

    def check_layer(self, name: str, qw: QuantizedWeight, module: nn.Module) -> str | None:
        return check_awq_weight(qw, self.version)

    def layer_tensors(self, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        return awq_layer_tensors(module.quantized_weight, self.version)

    def _settings(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Any]:
        version = self.version
        qws = layer_weights(layers)
        gs = checkpoint_group_size(qws, "AWQ")
        zero_point = not all(qw.qtype == "int4" and qw.zero is None for qw in qws.values())
        head = output_head_names(model)
        floats = sorted(n for n, m in model.named_modules()
                        if isinstance(m, nn.Linear) and n not in layers and n not in head)
        return {"bits": 4, "group_size": gs, "zero_point": zero_point, "version": version,
                "modules_to_not_convert": floats or None}

    def quantization_config(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Any]:
        s = self._settings(model, layers)
        return {"quant_method": "awq", "bits": s["bits"], "group_size": s["group_size"],
                "zero_point": s["zero_point"], "version": s["version"],
                "modules_to_not_convert": s["modules_to_not_convert"]}

    def extra_files(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Any]:
        s = self._settings(model, layers)
        return {"quant_config.json": {"zero_point": s["zero_point"], "q_group_size": s["group_size"],
                                      "w_bit": s["bits"], "version": s["version"].upper(),
                                      "modules_to_not_convert": s["modules_to_not_convert"]}}

    # -- loading --------------------------------------------------------------------------
    def layers_from_keys(self, qcfg: dict[str, Any], keys: set[str]) -> list[str] | None:
        return layer_names(keys, "qweight")

    def describe(self, qcfg: dict[str, Any]) -> dict[str, Any]:
        try:
            c = normalize_awq_config(qcfg)
        except CheckpointError:
            return super().describe(qcfg)
        return {"bits": c["bits"], "group_size": c["group_size"], "sym": not c["zero_point"],
                "zero_point": c["zero_point"], "version": c["layout"]}

    def quantized_layers(self, qcfg: dict[str, Any], model: nn.Module, keys: set[str]) -> list[str]:
        normalize_awq_config(qcfg)  # refuses unreadable versions before any tensor is read
        return check_linears(layer_names(keys, "qweight"), model, "AWQ")

    def load_layer(self, name: str, qcfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                   module: nn.Linear) -> nn.Module:
        from polyquant.nn.quant_linear import QuantLinear
        cfg = normalize_awq_config(qcfg)
        qw = awq_weight_from_tensors(name, cfg, tensors, module.in_features, module.out_features)
        bias = layer_bias(tensors, module.out_features, lambda m: _fail(name, m), float_dtype(module))
        return QuantLinear(qw, bias, kernel="reference", method="awq")


class _ReadOnlyAWQ(AWQFormat):
    """AWQ for a layout polyquant reads but does not write (llm-awq): its reader checks every shape."""

    def tensor_mismatch(self, key: str, found: torch.Tensor, written: torch.Tensor) -> str | None:
        return None


register_format(AWQFormat())
