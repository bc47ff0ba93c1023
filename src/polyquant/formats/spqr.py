"""SpQR checkpoints: transformers' / ``spqr_quant``'s layout (``quant_method: spqr``) and
polyquant's own layout for the widths that one cannot hold (``quant_method: polyquant-spqr``).

**``spqr``** (transformers ``SpQRConfig`` + ``spqr_quant.QuantizedLinear``; packer
``tensor_compress_interleaved`` in ``inference_kernels/spqr_cuda.cpp``, ``common.cuh``). Per Linear
``[m = out, n = in]``, all in the *permuted* input order (column ``p`` is input ``in_perm[p]``):

=================  =====  ===================================  ====================================
tensor             dtype  shape                                content
=================  =====  ===================================  ====================================
``dense_weights``  int64  ``[ceil(m/16) * ceil(n/16) * 16]``    one word per tile row, row-tile-major:
                                                               word ``(ti * ceil(n/16) + tj) * 16 + k``
                                                               is row ``16 ti + k`` of tile column
                                                               ``tj`` (inputs ``16 tj .. 16 tj + 15``)
``row_offsets``    int32  ``[m + 1]``                          CSR row starts of the outliers (a
                                                               different length is PTCSR: read, not
                                                               written)
``col_vals``       int32  ``[nnz]``                            float16 value in bits 31:16, int16
                                                               (permuted) column in 15:0; columns
                                                               ascending within a row
``in_perm``        int32  ``[n/2]`` or ``[0]``                 uint16 pairs, element ``2k`` in the low
                                                               half; empty: no permutation
=================  =====  ===================================  ====================================

A word, LSB first: ``s`` (3-bit scale code) bits 0-2, ``z`` (3-bit zero code) 3-5, the 16 weights
``w_l`` at ``6 + 3 l`` (0 beyond ``n``), an 8-bit fragment of the tile's second-order record at
54-61, bits 62-63 zero. The record (64 bits) is the float16 bit patterns ``W_s_s`` (scale of the
scales) 0-15, ``W_z_s`` (scale of the zeros) 16-31, ``W_s_z`` (zero of the scales) 32-47,
``W_z_z`` (zero of the zeros) 48-63; row ``k`` carries byte ``k // 2`` (each byte twice; the
kernel ORs them). Decoding (float16 arithmetic, as ``dequantize_compressed``):
``s = W_s_s (q_s - W_s_z)``, ``z = W_z_s (q_z - W_z_z)``, ``w = s (q - z)``, plus the outliers.
The weight is ``W[:, in_perm] = dense + sparse``; ``y = W x`` is computed on ``x[in_perm]``.

``quantization_config``: ``{"quant_method": "spqr", "bits": 3, "beta1": 16, "beta2": 16,
"shapes": {"<layer>.dense_weights.shape": len, ".row_offsets.shape", ".col_vals.shape",
".in_perm.shape"}, "modules_to_not_convert": [...]}``; transformers allocates the tensors from
``shapes`` (a checkpoint whose ``shapes`` disagree with its tensors is refused naming the layer)
and converts *every* Linear not listed (names and ``name.weight``). The layout holds 3-bit
weights with 3-bit statistics in 16 x 16 tiles, ``m`` a multiple of 16, ``n <= 32767``, no bias;
anything else is refused by name (use ``polyquant-spqr``). transformers and ``spqr_quant`` need
CUDA (the CPU side is checked against an independent decoder in the tests; see
``benchmarks/gpu_check_spqr.py``).

**``polyquant-spqr``** (polyquant only): the ``QuantizedWeight`` encoding of
:mod:`polyquant.methods.spqr` as stored tensors, any ``bits`` (2-4) / group sizes / qq bits, bias
allowed. Per Linear: ``qweight`` int32 ``[out, ceil(in*bits/32)]`` (codes in input order,
:mod:`polyquant.tensor.packing`), ``qq_scale_codes``, ``qq_zero_codes``, ``qq_stats``, ``qq_meta``
and ``in_perm`` (act-order) as in the method's docstring, outliers ``row_offsets`` int32
``[out+1]``, ``cols`` int16 / int32, ``values`` float16 (original input columns). Config:
``{"quant_method": "polyquant-spqr", "layout_version": 1, "bits", "group_size", "qq_scale_bits",
"qq_zero_bits", "qq_groupsize", "modules_to_not_convert"}``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from polyquant.formats.base import (CheckpointError, Format, check_linears, layer_bias, layer_names,
                                     register_format, require_tensors)
from polyquant.methods.spqr import decode_stats, spqr_stats
from polyquant.tensor.packing import pack, packed_length, unpack
from polyquant.tensor.quantized_weight import QuantizedWeight
from polyquant.tensor.sparse import SparseOutliers

__all__ = ["SpQRFormat", "PolyquantSpQRFormat", "pack_dense_words", "unpack_dense_words", "spqr_layer_tensors",
           "spqr_weight_from_tensors", "check_spqr_hf", "BETA"]

BETA = 16  # tile height (beta1, rows) and width (beta2, input columns)
_BITS = 3
_FRAG = 54  # bit offset of the second-order fragment: 3 * (16 + 2)


def _to_i32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> the int32 with the same bits."""
    return torch.where(x >= 2 ** 31, x - 2 ** 32, x).to(torch.int32)


def _u16(t: torch.Tensor) -> torch.Tensor:
    """float16 -> its bit pattern as int64 in [0, 65536)."""
    return t.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF


def _f16(bits: torch.Tensor) -> torch.Tensor:
    """int64 bit patterns in [0, 65536) -> float16."""
    return torch.where(bits >= 32768, bits - 65536, bits).to(torch.int16).view(torch.float16)


# -- the 64-bit words -------------------------------------------------------------------------------
def pack_dense_words(codes: torch.Tensor, qs: torch.Tensor, qz: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """``dense_weights`` of one layer: ``codes [m, n]`` (permuted order, 0..7), first-order codes
    ``qs`` / ``qz`` ``[m, G]``, second-order record ``rec`` float16 ``[m/16, G, 4]`` as (W_s_s, W_s_z,
    W_z_s, W_z_z). ``m`` a multiple of 16."""
    m, n = codes.shape
    G = -(-n // BETA)
    mt = m // BETA
    c = torch.zeros(m, G * BETA, dtype=torch.int64)
    c[:, :n] = codes.to(torch.int64)
    c = c.view(mt, BETA, G, BETA).permute(0, 2, 1, 3)  # [ti, tj, k, l]
    shifts = 6 + _BITS * torch.arange(BETA, dtype=torch.int64)
    w = (c << shifts).sum(-1)  # disjoint bit fields: the sum is the OR
    w |= qs.to(torch.int64).view(mt, BETA, G).permute(0, 2, 1)
    w |= qz.to(torch.int64).view(mt, BETA, G).permute(0, 2, 1) << 3
    r = rec.to(torch.float16)
    record = _u16(r[..., 0]) | (_u16(r[..., 2]) << 16) | (_u16(r[..., 1]) << 32) | (_u16(r[..., 3]) << 48)
    k = torch.arange(BETA, dtype=torch.int64)
    frag = (record[..., None] >> (8 * (k // 2))) & 0xFF  # [ti, tj, k]
    w |= frag << _FRAG
    return w.reshape(-1).contiguous()


def unpack_dense_words(words: torch.Tensor, m: int, n: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_dense_words`: ``(codes [m, n], qs [m, G], qz [m, G], rec [m/16, G, 4])``
    (the record from the OR of each tile's fragments, as the kernels recover it)."""
    G = -(-n // BETA)
    mt = m // BETA
    w = words.to(torch.int64).view(mt, G, BETA)
    shifts = 6 + _BITS * torch.arange(BETA, dtype=torch.int64)
    c = (w[..., None] >> shifts) & 7  # [ti, tj, k, l]
    codes = c.permute(0, 2, 1, 3).reshape(m, G * BETA)[:, :n].to(torch.uint8)
    qs = (w & 7).permute(0, 2, 1).reshape(m, G).to(torch.uint8)
    qz = ((w >> 3) & 7).permute(0, 2, 1).reshape(m, G).to(torch.uint8)
    k = torch.arange(BETA, dtype=torch.int64)
    frag = ((w >> _FRAG) & 0xFF) << (8 * (k // 2))
    record = torch.zeros(mt, G, dtype=torch.int64)
    for kk in range(BETA):
        record |= frag[..., kk]
    parts = [_f16((record >> sh) & 0xFFFF) for sh in (0, 32, 16, 48)]  # W_s_s, W_s_z, W_z_s, W_z_z
    return codes, qs, qz, torch.stack(parts, dim=-1)


# -- QuantizedWeight <-> the transformers layout ----------------------------------------------------
def check_spqr_hf(qw: QuantizedWeight, has_bias: bool = False) -> str | None:
    """None when the transformers SpQR layout can store ``qw``; otherwise why not."""
    m, n = qw.shape
    if "qq_stats" not in qw.extras:
        return "not a SpQR weight (no two-level statistics in extras; quantize with --method spqr)"
    st = spqr_stats(qw)
    if qw.qtype != "uint3" or qw.block != (1, BETA) or (st["scale_bits"], st["zero_bits"], st["qq_groupsize"]) != (3, 3, 16):
        return (f"the transformers SpQR layout holds 3-bit weights in groups of 16 with 3-bit statistics in groups "
                f"of 16; this layer is {qw.qtype} block {qw.block}, statistics {st['scale_bits']}/{st['zero_bits']}-bit "
                f"x{st['qq_groupsize']} (save it with --format polyquant-spqr)")
    if m % BETA:
        return f"out_features {m} is not a multiple of 16 (SpQR tiles are 16 rows high)"
    if n > 32767:
        return f"in_features {n} exceeds the int16 columns of col_vals"
    if st["perm"] is not None and n % 2:
        return f"in_features {n} is odd: in_perm packs two uint16 per int32"
    if has_bias:
        return "spqr_quant's QuantizedLinear has no bias (save it with --format polyquant-spqr)"
    if qw.outliers is not None and qw.outliers.values.dtype != torch.float16:
        return f"outlier values must be float16, got {qw.outliers.values.dtype}"
    s, z = decode_stats(st["qs"], st["qz"], st["rec"], 16)
    if not (torch.equal(s.float(), qw.scale.float()) and torch.equal(z.float(), qw.zero.float())):
        return "scale / zero are not the values its two-level statistics decode to"
    return None


def spqr_layer_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``dense_weights`` / ``row_offsets`` / ``col_vals`` / ``in_perm`` of one layer."""
    if reason := check_spqr_hf(qw):
        raise ValueError(reason)
    qw = qw.to("cpu")
    m, n = qw.shape
    st = spqr_stats(qw)
    perm = st["perm"]
    codes = qw.codes if perm is None else qw.codes[:, perm]
    dense = pack_dense_words(codes, st["qs"], st["qz"], st["rec"])
    o = qw.outliers if qw.outliers is not None else SparseOutliers.empty((m, n))
    rows = o.rows()
    pos = o.cols.long() if perm is None else torch.argsort(perm)[o.cols.long()]
    order = torch.argsort(rows * n + pos)
    vals = _u16(o.values.to(torch.float16))[order]
    col_vals = _to_i32((vals << 16) | pos[order])
    if perm is None:
        in_perm = torch.zeros(0, dtype=torch.int32)
    else:
        in_perm = _to_i32((perm[1::2] << 16) | perm[0::2])
    return {"dense_weights": dense, "row_offsets": o.row_offsets.to(torch.int32).contiguous(),
            "col_vals": col_vals.contiguous(), "in_perm": in_perm.contiguous()}


def _fail(name: str, msg: str) -> CheckpointError:
    return CheckpointError(f"SpQR layer {name!r}: {msg}")


def _csr_from_ptcsr(name: str, ro: torch.Tensor, cv: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PTCSR (per 16-row block, entries interleaved by row) -> CSR ``(rows, col_vals)`` (padding
    entries, value +0, dropped)."""
    if ro.numel() != m // BETA + 1:
        raise _fail(name, f"row_offsets has {ro.numel()} entries: neither CSR ({m + 1}) nor PTCSR ({m // BETA + 1})")
    rows = []
    for b in range(m // BETA):
        j = torch.arange(int(ro[b]), int(ro[b + 1]))
        rows.append(b * BETA + j % BETA)
    r = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
    keep = (cv.to(torch.int64) >> 16) & 0xFFFF != 0
    return r[keep], cv[keep]


def spqr_weight_from_tensors(name: str, t: dict[str, torch.Tensor], m: int, n: int,
                             shapes: dict[str, Any] | None = None) -> QuantizedWeight:
    """Rebuild a ``QuantizedWeight`` (uint3, groups of 16, two-level statistics, outliers) from one
    layer's ``spqr`` tensors; ``shapes`` (the config's map) must agree with them."""
    for key in ("dense_weights", "row_offsets", "col_vals", "in_perm"):
        if key not in t:
            raise _fail(name, f"missing tensor {key!r}")
        if t[key].dim() != 1:
            raise _fail(name, f"{key} must be 1-D, got shape {list(t[key].shape)}")
        if shapes is not None:
            sk = f"{name}.{key}.shape"
            if sk not in shapes:
                raise _fail(name, f"quantization_config.shapes has no {sk!r}")
            if int(shapes[sk]) != t[key].numel():
                raise _fail(name, f"quantization_config.shapes[{sk!r}] = {shapes[sk]} but the tensor has "
                                  f"{t[key].numel()} entries")
    for key, dt in (("dense_weights", torch.int64), ("row_offsets", torch.int32), ("col_vals", torch.int32),
                    ("in_perm", torch.int32)):
        if t[key].dtype != dt:
            raise _fail(name, f"{key} must be {dt}, got {t[key].dtype}")
    if m % BETA:
        raise _fail(name, f"out_features {m} is not a multiple of 16")
    G = -(-n // BETA)
    want = (m // BETA) * G * BETA
    if t["dense_weights"].numel() != want:
        raise _fail(name, f"dense_weights has {t['dense_weights'].numel()} words, expected {want} for a [{m}, {n}] "
                          "weight in 16 x 16 tiles")
    codes_p, qs, qz, rec = unpack_dense_words(t["dense_weights"], m, n)
    ip = t["in_perm"].to(torch.int64) & 0xFFFFFFFF
    perm = None
    if ip.numel():
        if ip.numel() * 2 != n:
            raise _fail(name, f"in_perm has {ip.numel()} entries, expected {n // 2} (or 0)")
        perm = torch.stack([ip & 0xFFFF, ip >> 16], dim=1).reshape(-1)
        if not torch.equal(torch.sort(perm).values, torch.arange(n)):
            raise _fail(name, "in_perm is not a permutation of the input columns")
    ro, cv = t["row_offsets"], t["col_vals"]
    if ro.numel() == m + 1:
        if int(ro[0]) != 0 or int(ro[-1]) != cv.numel() or bool((ro[1:] < ro[:-1]).any()):
            raise _fail(name, f"row_offsets must rise from 0 to nnz={cv.numel()}")
        rows = torch.repeat_interleave(torch.arange(m), (ro[1:] - ro[:-1]).long())
    else:
        rows, cv = _csr_from_ptcsr(name, ro, cv, m)
    cv64 = cv.to(torch.int64) & 0xFFFFFFFF
    pos = cv64 & 0xFFFF
    if pos.numel() and int(pos.max()) >= n:
        raise _fail(name, f"col_vals holds column {int(pos.max())} >= in_features {n}")
    vals = _f16(cv64 >> 16)
    cols = pos if perm is None else perm[pos]
    counts = torch.bincount(rows, minlength=m)
    row_offsets = torch.zeros(m + 1, dtype=torch.int32)
    row_offsets[1:] = counts.cumsum(0).to(torch.int32)
    order = torch.argsort(rows, stable=True)
    outliers = SparseOutliers((m, n), row_offsets, cols[order].to(torch.int16), vals[order])
    scale, zero = decode_stats(qs, qz, rec, BETA)
    extras = {"qq_scale_codes": pack(qs, 3, dim=-1), "qq_zero_codes": pack(qz, 3, dim=-1), "qq_stats": rec,
              "qq_meta": torch.tensor([3, 3, BETA], dtype=torch.int32)}
    g_idx = None
    codes = codes_p
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes_p[:, inv]
        g_idx = (inv // BETA).to(torch.int32)
        extras["in_perm"] = perm.to(torch.int16)
    qw = QuantizedWeight.from_codes(codes.contiguous(), "uint3", (1, BETA), scale, zero, g_idx=g_idx, extras=extras)
    qw.outliers = outliers
    return qw


def _not_converted(model: nn.Module, layers: dict[str, nn.Module]) -> list[str]:
    """Every Linear-like module left in float (names and ``name.weight``: transformers 5 matches
    module names, the older convention weight paths)."""
    out: list[str] = []
    for n, mod in model.named_modules():
        if n and n not in layers and isinstance(mod, nn.Linear):
            out += [n, f"{n}.weight"]
    return out


def _bias(name: str, t: dict[str, torch.Tensor], out: int) -> torch.Tensor | None:
    return layer_bias(t, out, lambda m: _fail(name, m), torch.float32)


class SpQRFormat(Format):
    """transformers' / ``spqr_quant``'s SpQR layout (3-bit, 16 x 16 tiles)."""

    name = "spqr"
    quant_method = "spqr"
    untested_readers = {"transformers": "transformers' SpQR reader needs CUDA (spqr_quant kernels)",
                        "spqr_quant": "CUDA kernels; not installable on this CPU-only test machine"}
    untested_writers = {"SpQR (convert_to_hf.py)": "a script in the SpQR repository, not an installable package"}
    description = "SpQR: 3-bit codes and 3-bit two-level statistics in 64-bit tile words, fp16 CSR outliers"

    def check_layer(self, name: str, qw: QuantizedWeight, module: nn.Module) -> str | None:
        return check_spqr_hf(qw, getattr(module, "bias", None) is not None)

    def layer_tensors(self, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        return spqr_layer_tensors(module.quantized_weight)

    def quantization_config(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Any]:
        if not layers:
            raise ValueError("no quantized layers to describe")
        shapes: dict[str, int] = {}
        for n, m in layers.items():
            for k, v in spqr_layer_tensors(m.quantized_weight).items():
                shapes[f"{n}.{k}.shape"] = int(v.numel())
        return {"quant_method": "spqr", "bits": 3, "beta1": BETA, "beta2": BETA, "shapes": shapes,
                "modules_to_not_convert": _not_converted(model, layers)}

    def layers_from_keys(self, qcfg: dict[str, Any], keys: set[str]) -> list[str] | None:
        return layer_names(keys, "dense_weights")

    def quantized_layers(self, qcfg: dict[str, Any], model: nn.Module, keys: set[str]) -> list[str]:
        for k in ("bits", "beta1", "beta2"):
            want = 3 if k == "bits" else BETA
            if qcfg.get(k, want) != want:
                raise CheckpointError(f"SpQR checkpoint with {k}={qcfg.get(k)!r}: the layout holds bits=3, beta1=beta2=16")
        if not isinstance(qcfg.get("shapes", {}), dict):
            raise CheckpointError("SpQR quantization_config.shapes must be a map of tensor lengths")
        return check_linears(layer_names(keys, "dense_weights"), model, "SpQR")

    def load_layer(self, name: str, qcfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                   module: nn.Linear) -> nn.Module:
        from polyquant.nn.quant_linear import QuantLinear
        qw = spqr_weight_from_tensors(name, tensors, module.out_features, module.in_features, qcfg.get("shapes") or {})
        return QuantLinear(qw, _bias(name, tensors, module.out_features), kernel="reference", method="spqr")

    def tensor_mismatch(self, key: str, found: torch.Tensor, written: torch.Tensor) -> str | None:
        if key in ("row_offsets", "col_vals") and found.dtype == written.dtype:
            return None  # PTCSR is read and written back as CSR
        return super().tensor_mismatch(key, found, written)

    def describe(self, qcfg: dict[str, Any]) -> dict[str, Any]:
        return {"bits": qcfg.get("bits"), "group_size": qcfg.get("beta2"), "sym": False}


# -- polyquant's own layout -------------------------------------------------------------------------
_OWN_KEYS = ("qq_scale_codes", "qq_zero_codes", "qq_stats", "qq_meta")


def _own_params(qw: QuantizedWeight) -> dict[str, int]:
    st = spqr_stats(qw)
    return {"bits": qw.bits, "group_size": qw.block[1], "qq_scale_bits": st["scale_bits"],
            "qq_zero_bits": st["zero_bits"], "qq_groupsize": st["qq_groupsize"]}


class PolyquantSpQRFormat(Format):
    """polyquant's SpQR layout: any width, the method's encoding stored as is."""

    name = "polyquant-spqr"
    quant_method = "polyquant-spqr"
    untested_readers = {"polyquant": "polyquant's own format (no other tool reads it): round trips in tests/formats"}
    description = "SpQR at any width (2-4 bits, any group sizes): packed codes, packed two-level statistics, fp16 CSR outliers"

    def check_layer(self, name: str, qw: QuantizedWeight, module: nn.Module) -> str | None:
        if "qq_stats" not in qw.extras or qw.qt.kind != "int" or qw.qt.signed or qw.block[0] != 1:
            return "not a SpQR weight (unsigned codes in row groups with two-level statistics; quantize with --method spqr)"
        if qw.outliers is not None and qw.outliers.values.dtype != torch.float16:
            return f"outlier values must be float16, got {qw.outliers.values.dtype}"
        return None

    def layer_tensors(self, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        qw = module.quantized_weight.to("cpu")
        if reason := self.check_layer(name, qw, module):
            raise ValueError(reason)
        o = qw.outliers if qw.outliers is not None else SparseOutliers.empty(qw.shape)
        d = {"qweight": qw.data, **{k: qw.extras[k] for k in _OWN_KEYS},
             "row_offsets": o.row_offsets.to(torch.int32), "cols": o.cols, "values": o.values}
        if "in_perm" in qw.extras:
            d["in_perm"] = qw.extras["in_perm"]
        return {k: v.contiguous() for k, v in d.items()}

    def quantization_config(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Any]:
        if not layers:
            raise ValueError("no quantized layers to describe")
        params = {n: _own_params(m.quantized_weight) for n, m in layers.items()}
        distinct = {tuple(sorted(p.items())) for p in params.values()}
        if len(distinct) != 1:
            raise ValueError(f"polyquant-spqr stores one setting per model; layers differ: {sorted(distinct)}")
        return {"quant_method": "polyquant-spqr", "layout_version": 1, **next(iter(params.values())),
                "modules_to_not_convert": _not_converted(model, layers)}

    def layers_from_keys(self, qcfg: dict[str, Any], keys: set[str]) -> list[str] | None:
        return layer_names(keys, "qq_stats")

    def quantized_layers(self, qcfg: dict[str, Any], model: nn.Module, keys: set[str]) -> list[str]:
        if qcfg.get("layout_version") != 1:
            raise CheckpointError(f"polyquant-spqr layout_version {qcfg.get('layout_version')!r} is not 1")
        return check_linears(layer_names(keys, "qq_stats"), model, "polyquant-spqr")

    def load_layer(self, name: str, qcfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                   module: nn.Linear) -> nn.Module:
        from polyquant.nn.quant_linear import QuantLinear
        m, n = module.out_features, module.in_features
        require_tensors(tensors, ("qweight", *_OWN_KEYS, "row_offsets", "cols", "values"), lambda m: _fail(name, m))
        bits, gs = int(qcfg.get("bits", 0)), int(qcfg.get("group_size", 0))
        meta = [int(v) for v in tensors["qq_meta"].reshape(-1).tolist()]
        cfg_meta = [qcfg.get("qq_scale_bits"), qcfg.get("qq_zero_bits"), qcfg.get("qq_groupsize")]
        if meta != cfg_meta:
            raise _fail(name, f"qq_meta {meta} disagrees with the config's (qq_scale_bits, qq_zero_bits, "
                              f"qq_groupsize) {cfg_meta}")
        if bits not in (1, 2, 3, 4, 5, 6, 7, 8) or gs < 1:
            raise _fail(name, f"bits {bits} / group_size {gs} are not a SpQR setting")
        sb, zb, qg = meta
        G = -(-n // gs)
        want = {"qweight": (torch.int32, (m, packed_length(n, bits))),
                "qq_scale_codes": (torch.int32, (m, packed_length(G, sb))),
                "qq_zero_codes": (torch.int32, (m, packed_length(G, zb))),
                "qq_stats": (torch.float16, (-(-m // qg), G, 4))}
        for k, (dt, shp) in want.items():
            if tensors[k].dtype != dt or tuple(tensors[k].shape) != shp:
                raise _fail(name, f"{k} is {tensors[k].dtype} {list(tensors[k].shape)}, expected {dt} {list(shp)}")
        st = {"qs": unpack(tensors["qq_scale_codes"], sb, G), "qz": unpack(tensors["qq_zero_codes"], zb, G)}
        scale, zero = decode_stats(st["qs"], st["qz"], tensors["qq_stats"], qg)
        extras = {k: tensors[k] for k in _OWN_KEYS}
        g_idx = None
        if "in_perm" in tensors:
            p = tensors["in_perm"]
            perm = p.long() & 0xFFFF if p.dtype == torch.int16 else p.long()
            if p.dim() != 1 or not torch.equal(torch.sort(perm).values, torch.arange(n)):
                raise _fail(name, "in_perm is not a permutation of the input columns")
            g_idx = (torch.argsort(perm) // gs).to(torch.int32)
            extras["in_perm"] = p
        try:
            outliers = SparseOutliers((m, n), tensors["row_offsets"], tensors["cols"], tensors["values"])
            qw = QuantizedWeight(f"uint{bits}", (m, n), (1, gs), tensors["qweight"], scale, zero, g_idx, extras)
        except ValueError as e:
            raise _fail(name, str(e)) from None
        qw.outliers = outliers
        return QuantLinear(qw, _bias(name, tensors, m), kernel="reference", method="spqr")

    def describe(self, qcfg: dict[str, Any]) -> dict[str, Any]:
        return {"bits": qcfg.get("bits"), "group_size": qcfg.get("group_size"), "sym": False}


register_format(SpQRFormat)
register_format(PolyquantSpQRFormat)


def outlier_info(folder: Any) -> dict[str, Any] | None:
    """The outlier share of a SpQR checkpoint (either layout) from its safetensors headers: ``outliers``
    (entries), ``outlier_share`` (of the quantized weights) and ``outlier_share_by_layer``; None for
    other checkpoints. Weights per layer are counted in whole groups (``rows * groups * group_size``:
    exact when in_features is a multiple of the group size); PTCSR padding counts as entries."""
    from polyquant.formats.io import SafetensorsIndex, read_config
    config = read_config(folder)
    qc = config.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method not in ("spqr", "polyquant-spqr"):
        return None
    t = SafetensorsIndex(folder).tensors
    marker, nnz_key = ("dense_weights", "col_vals") if method == "spqr" else ("qq_stats", "values")
    by: dict[str, float] = {}
    total_nnz = total_w = 0
    for name in layer_names(set(t), marker):
        nnz = int(torch.Size(t[f"{name}.{nnz_key}"].shape).numel())
        rows = int(t[f"{name}.row_offsets"].shape[0]) - 1
        if method == "spqr":
            weights = int(t[f"{name}.dense_weights"].shape[0]) * BETA  # rows * groups * 16
            rows = max(rows, 1)
        else:
            _, groups, _ = t[f"{name}.qq_stats"].shape
            weights = rows * int(groups) * int(qc.get("group_size") or 1)
        by[name] = round(nnz / max(1, weights), 6)
        total_nnz += nnz
        total_w += weights
    return {"outliers": total_nnz, "outlier_share": round(total_nnz / max(1, total_w), 6),
            "outlier_share_by_layer": by}
