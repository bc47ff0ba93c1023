"""The EETQ format (``quant_method: eetq``; written by EETQ / transformers' ``EetqConfig`` on a GPU,
read by transformers' ``EetqLinear`` with the ``kernels-community/quantization-eetq`` kernels).

Per Linear ``[N=out, K=in]`` (transformers ``EetqLinear``):

===================  =========  ========  ===============================================================
tensor               dtype      shape     content
===================  =========  ========  ===============================================================
``weight``           int8       ``[K, N]``  the transposed int8 weight *preprocessed for the CUTLASS
                                            mixed-dtype GEMM of one GPU architecture* (below)
``weight_scales``    float16    ``[N]``     per-output-channel scale; ``w = q * scale``
``bias``             model      ``[N]``     optional
===================  =========  ========  ===============================================================

``quantization_config``: ``{"quant_method": "eetq", "weights": "int8", "modules_to_not_convert": [...]}``.

**The byte layout of ``weight`` depends on the GPU the checkpoint was made on** (EETQ /
FasterTransformer ``preprocess_weights_for_mixed_gemm(weight, INT8_WEIGHT_ONLY, sm)``), and nothing
in the checkpoint says which one. For ``Wt = W^T`` ``[K, N]`` of signed int8:

- ``sm75``-``sm89`` (Turing, Ampere, Ada: T4, A10, A100, L4, RTX 30/40 - the layout polyquant
  writes and assumes when reading): (1) permute the rows of ``Wt`` in groups of 16 as
  ``0 1 8 9 2 3 10 11 4 5 12 13 6 7 14 15``; (2) transpose to column-major (``[N, K]`` row-major
  bytes); (3) interleave pairs of columns in tiles of 64 rows (``ColumnMajorTileInterleave<64, 2>``:
  output row ``n//2`` holds, for each 64-element tile of ``K``, the tile of column ``2*(n//2)`` then
  the same tile of column ``2*(n//2)+1``); (4) add 128 to every byte (offset binary, i.e. our
  codes); (5) swap bytes 1 and 2 of every 4-byte word. Needs ``K`` and ``N`` multiples of 64.
- ``sm70`` (Volta): row-major ``Wt`` with steps (4) and (5) only. Checkpoints made on a V100 are
  byte-for-byte indistinguishable from sm75+ ones of the same shape; polyquant reads every checkpoint
  as sm75+, so a V100-made one loads with scrambled weights. Convert such a file first:
  ``eetq_preprocess(eetq_unpreprocess(w, 70), 80)`` per ``weight`` tensor.
- ``sm90``+ (Hopper): EETQ's preprocessor raises "Unsupported Arch", so no such checkpoints exist.

Saving refuses layers that are not int8 symmetric per-channel (EETQ's only layout) or whose shape
does not tile (``K``, ``N`` multiples of 64).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from polyquant.formats.base import (CheckpointError, Format, layer_bias, linears_with_key, plain_grid_reason,
                                     register_format, require_tensors)
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["EETQFormat", "eetq_preprocess", "eetq_unpreprocess", "WRITE_ARCH", "ARCHS"]

WRITE_ARCH = 80
ARCHS = (70, 75, 80, 86, 89)
_ROW_PERM = torch.tensor([0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15])


def _check_arch(arch: int) -> bool:
    """True for the tiled (sm75-sm89) layout, False for Volta's row-major one."""
    if arch not in ARCHS:
        raise ValueError(f"EETQ preprocesses int8 weights for sm70-sm89, got arch {arch!r}")
    return arch >= 75


def _swap_bytes_12(b: torch.Tensor) -> torch.Tensor:
    flat = b.reshape(-1, 4)
    return flat[:, [0, 2, 1, 3]].reshape(b.shape)


def eetq_preprocess(codes: torch.Tensor, arch: int = WRITE_ARCH) -> torch.Tensor:
    """Our int8 codes ``[N, K]`` (uint8, ``q + 128``) -> EETQ's stored ``weight`` (int8 ``[K, N]``)."""
    n, k = codes.shape
    wt = codes.t()  # [K, N]; the +128 of step (4) is already in the codes and commutes with the moves
    if _check_arch(arch):
        if k % 64 or n % 64:
            raise ValueError(f"EETQ's sm{arch} layout needs in_features and out_features multiples of 64, "
                             f"got [{n}, {k}]")
        wt = wt.reshape(k // 16, 16, n)[:, _ROW_PERM, :].reshape(k, n)   # (1)
        cm = wt.t()                                                       # (2) [N, K]
        cm = cm.reshape(n // 2, 2, k // 64, 64).permute(0, 2, 1, 3)       # (3)
        flat = cm.reshape(-1)
    else:
        if (k * n) % 4:
            raise ValueError("EETQ's sm70 layout needs a multiple of 4 elements")
        flat = wt.reshape(-1)
    return _swap_bytes_12(flat.contiguous()).view(torch.int8).reshape(k, n)


def eetq_unpreprocess(weight: torch.Tensor, arch: int = WRITE_ARCH) -> torch.Tensor:
    """Inverse of :func:`eetq_preprocess`: stored ``weight`` int8 ``[K, N]`` -> codes ``[N, K]`` uint8."""
    k, n = weight.shape
    flat = _swap_bytes_12(weight.contiguous().view(torch.uint8).reshape(-1))
    if _check_arch(arch):
        if k % 64 or n % 64:
            raise ValueError(f"EETQ's sm{arch} layout needs both dims multiples of 64, got weight [{k}, {n}]")
        cm = flat.reshape(n // 2, k // 64, 2, 64).permute(0, 2, 1, 3).reshape(n, k)
        wt = cm.t().reshape(k // 16, 16, n)
        inv = torch.empty_like(_ROW_PERM)
        inv[_ROW_PERM] = torch.arange(16)
        wt = wt[:, inv, :].reshape(k, n)
    else:
        wt = flat.reshape(k, n)
    return wt.t().contiguous()


def _plan(qw: QuantizedWeight) -> str | None:
    n, k = qw.shape
    if qw.qtype != "int8" or qw.zero is not None:
        return f"EETQ stores symmetric int8 weights, got {qw.qtype}{'' if qw.zero is None else ' with zero points'}"
    if qw.block != (1, k):
        return f"EETQ stores per-channel scales, got block {qw.block}"
    if why := plain_grid_reason(qw, "EETQ"):
        return why
    if k % 64 or n % 64:
        return f"EETQ's CUTLASS layout needs in_features and out_features multiples of 64, got [{n}, {k}]"
    return None


def _fail(name: str, msg: str) -> CheckpointError:
    return CheckpointError(f"eetq layer {name!r}: {msg}")


class EETQFormat(Format):
    name = "eetq"
    quant_method = "eetq"
    untested_readers = {"transformers": "needs the eetq library and a CUDA GPU (no eetq distribution installs "
                                        "from PyPI on a CPU machine)"}
    untested_writers = {"eetq": "CUDA only; no eetq distribution installs from PyPI on a CPU machine"}
    description = "int8 per-channel weights preprocessed for EETQ's CUTLASS W8A16 GEMM (sm75-sm89 layout), fp16 scales"

    def check_layer(self, name: str, qw: QuantizedWeight, module: nn.Module) -> str | None:
        reason = _plan(qw)
        if reason is None and getattr(module, "act_quant", None) is not None:
            reason = "EETQ is weight-only (the layer has activation quantization)"
        return reason

    def layer_tensors(self, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        qw = module.quantized_weight
        return {"weight": eetq_preprocess(qw.codes, WRITE_ARCH), "weight_scales": qw.scale.detach().reshape(-1)}

    def quantization_config(self, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Any]:
        from polyquant.nn.quant_linear import QuantLinear
        floats = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear)]
        return {"quant_method": "eetq", "weights": "int8", "modules_to_not_convert": floats}

    def quantized_layers(self, qcfg: dict[str, Any], model: nn.Module, keys: set[str]) -> list[str]:
        if qcfg.get("weights", "int8") != "int8":
            raise CheckpointError(f"eetq weights {qcfg.get('weights')!r}: only int8 exists")
        return linears_with_key(model, keys, "weight_scales", "eetq")

    def layers_from_keys(self, qcfg: dict[str, Any], keys: set[str]) -> list[str] | None:
        return sorted(k[: -len(".weight_scales")] for k in keys if k.endswith(".weight_scales"))

    def describe(self, qcfg: dict[str, Any]) -> dict[str, Any]:
        return {"bits": 8, "group_size": -1, "sym": True}

    def load_layer(self, name: str, qcfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                   module: nn.Linear) -> nn.Module:
        from polyquant.nn.quant_linear import QuantLinear
        n, k = module.out_features, module.in_features
        unexpected = sorted(set(tensors) - {"weight", "weight_scales", "bias"})
        if unexpected:
            raise _fail(name, f"unexpected tensor(s) {unexpected}")
        w, s = require_tensors(tensors, ("weight", "weight_scales"), lambda m: _fail(name, m))
        if w.dtype != torch.int8 or tuple(w.shape) != (k, n):
            raise _fail(name, f"weight must be int8 [{k}, {n}] (in, out), got {w.dtype} {list(w.shape)}")
        if not s.is_floating_point() or s.numel() != n:
            raise _fail(name, f"weight_scales must hold {n} floats, got {s.dtype} {list(s.shape)}")
        try:
            codes = eetq_unpreprocess(w, WRITE_ARCH)
        except ValueError as e:
            raise _fail(name, str(e)) from None
        qw = QuantizedWeight.from_codes(codes, "int8", (1, k), s.reshape(n, 1))
        bias = layer_bias(tensors, n, lambda m: _fail(name, m))
        return QuantLinear(qw, bias, kernel="reference", method="")


register_format(EETQFormat)
