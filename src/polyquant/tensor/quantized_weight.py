"""``QuantizedWeight``: codes + scales (+ zeros) + block shape + qtype; ``dequantize()`` is the
ground truth that every kernel and every format is tested against.

Granularity has one description, ``block = (rows, cols)``: the rectangle of the ``[out, in]``
weight that shares one scale (and zero).

====================  =====================
per-tensor            ``(out, in)``
per-channel (row)     ``(1, in)``
group of g inputs     ``(1, g)``
2-D block             ``(128, 128)``
====================  =====================

Scales (and zeros) have shape ``[ceil(out/rows), ceil(in/cols)]``: a last, shorter group or
block is allowed. With ``g_idx`` (act-order), input column ``k`` uses scale column ``g_idx[k]``.

Dequantization: ``w = (decode(code) - zero) * scale`` where ``decode`` comes from the qtype
table (for signed ints: ``code - 2**(bits-1)``; for code books: the table value).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from polyquant.qtypes import QType, get_qtype
from polyquant.tensor.packing import pack, unpack

__all__ = ["QuantizedWeight", "expand_blocks"]


def expand_blocks(t: torch.Tensor, block: tuple[int, int], shape: tuple[int, int],
                  g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Broadcast a per-block tensor ``[ceil(out/r), ceil(in/c)]`` to the full ``[out, in]``."""
    r, c = block
    out, inp = shape
    if r > 1:
        t = t.repeat_interleave(r, dim=0)[:out]
    elif t.shape[0] == 1 and out > 1:
        t = t.expand(out, t.shape[1])
    if g_idx is not None:
        return t[:, g_idx.long()]
    if c > 1:
        t = t.repeat_interleave(c, dim=1)[:, :inp]
    elif t.shape[1] == 1 and inp > 1:
        t = t.expand(t.shape[0], inp)
    return t


@dataclass
class QuantizedWeight:
    """A quantized ``[out, in]`` weight.

    ``data`` holds the stored codes: int32 words (dense bit stream along the input dim, see
    :mod:`polyquant.tensor.packing`) for sub-8-bit types, uint8 for 8-bit integer types, the
    float8 tensor itself for float8 types. Build one with :meth:`from_codes`.
    """

    qtype: str
    shape: tuple[int, int]
    block: tuple[int, int]
    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.block = (int(self.block[0]), int(self.block[1]))
        qt = self.qt
        out, inp = self.shape
        r, c = self.block
        if r < 1 or c < 1:
            raise ValueError(f"block must be positive, got {self.block}")
        grid = (math.ceil(out / r), math.ceil(inp / c))
        if tuple(self.scale.shape) != grid:
            raise ValueError(f"scale shape {tuple(self.scale.shape)} does not match the block grid "
                             f"{grid} of a {self.shape} weight with block {self.block}")
        if self.zero is not None and tuple(self.zero.shape) != grid:
            raise ValueError(f"zero shape {tuple(self.zero.shape)} != scale grid {grid}")
        if self.g_idx is not None:
            if r != 1 or tuple(self.g_idx.shape) != (inp,):
                raise ValueError("g_idx needs row blocks of 1 and one entry per input column")
        expected = self._data_shape(qt, self.shape)
        if tuple(self.data.shape) != expected:
            raise ValueError(f"data shape {tuple(self.data.shape)} != {expected} for {self.qtype}")

    # -- construction -------------------------------------------------------------------
    @staticmethod
    def _data_shape(qt: QType, shape: tuple[int, int]) -> tuple[int, int]:
        out, inp = shape
        if qt.kind == "float" or qt.bits == 8:
            return (out, inp)
        return (out, (inp * qt.bits + 31) // 32)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, qtype: str, block: tuple[int, int],
                   scale: torch.Tensor, zero: torch.Tensor | None = None,
                   g_idx: torch.Tensor | None = None,
                   extras: dict[str, torch.Tensor] | None = None) -> "QuantizedWeight":
        """Build from unpacked codes ``[out, in]`` (uint8 codes, or a float8 tensor).

        Sub-byte uint8 codes are packed; the object also keeps a reference to them (not a field) that
        :attr:`codes` returns while neither tensor has been modified, so that a kernel prepared right
        after quantization does not unpack them again."""
        qt = get_qtype(qtype)
        if qt.kind == "float":
            data = codes.to(qt.torch_dtype)
        elif qt.bits == 8:
            data = codes.to(torch.uint8)
        else:
            data = pack(codes, qt.bits, dim=-1)
        qw = cls(qtype, tuple(codes.shape), block, data, scale, zero, g_idx, dict(extras or {}))
        if data is not codes and codes.dtype == torch.uint8:
            # the codes just packed, kept so that a kernel preparing this weight right away (quantize ->
            # QuantLinear) need not unpack them; used only while neither tensor has been modified
            qw._unpacked = (codes, data, codes._version, data._version)
        return qw

    # -- views ----------------------------------------------------------------------------
    @property
    def qt(self) -> QType:
        return get_qtype(self.qtype)

    @property
    def bits(self) -> int:
        return self.qt.bits

    @property
    def group_size(self) -> int:
        """Input columns per scale: -1 for per-channel (one group spans the row)."""
        r, c = self.block
        return -1 if c >= self.shape[1] else c

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def codes(self) -> torch.Tensor:
        """Unpacked codes ``[out, in]`` (uint8; float8 for float types)."""
        qt = self.qt
        if qt.kind == "float" or qt.bits == 8:
            return self.data
        cached = self.__dict__.get("_unpacked")
        if cached is not None:
            codes, data, cv, dv = cached
            if data is self.data and codes._version == cv and data._version == dv:
                return codes
        return unpack(self.data, qt.bits, self.shape[1], dim=-1)

    def full_scale(self) -> torch.Tensor:
        return expand_blocks(self.scale, self.block, self.shape, self.g_idx)

    def full_zero(self) -> torch.Tensor | None:
        if self.zero is None:
            return None
        return expand_blocks(self.zero, self.block, self.shape, self.g_idx)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ground truth: ``(decode(code) - zero) * scale`` as a dense ``[out, in]`` tensor."""
        codes = self.codes
        v = self.qt.decode(codes)
        if v.data_ptr() == codes.data_ptr():  # never scale the stored codes in place
            v = v.clone()
        out, inp = self.shape
        r, c = self.block
        if r == 1 and self.g_idx is None and (c >= inp or inp % c == 0):
            # row groups: broadcast each group's scale / zero instead of expanding them (same values)
            c = min(c, inp)
            # ``decode`` returns a new tensor: scaled in place (one allocation per weight)
            v = v.view(out, inp // c, c)
            if self.zero is not None:
                v.sub_(self.zero.to(torch.float32).reshape(out, -1)[:, : inp // c, None])
            w = v.mul_(self.scale.to(torch.float32).reshape(out, -1)[:, : inp // c, None]).view(out, inp)
        else:
            z = self.full_zero()
            if z is not None:
                v.sub_(z.to(torch.float32))
            w = v.mul_(self.full_scale().to(torch.float32))
        if "outliers" in self.extras:  # sparse float corrections (SpQR-style): [3, n] (row, col, value)
            o = self.extras["outliers"]
            w[o[0].long(), o[1].long()] = o[2].to(torch.float32)
        return w.to(dtype)

    def nbytes(self) -> int:
        """Bytes this weight occupies when stored (codes, scales, zeros, index, extras)."""
        tensors = [self.data, self.scale, self.zero, self.g_idx, *self.extras.values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors, by field name (for ``QuantLinear`` buffers)."""
        d = {"data": self.data, "scale": self.scale}
        if self.zero is not None:
            d["zero"] = self.zero
        if self.g_idx is not None:
            d["g_idx"] = self.g_idx
        d.update({f"extra_{k}": v for k, v in self.extras.items()})
        return d

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeight(self.qtype, self.shape, self.block, mv(self.data), mv(self.scale),
                               mv(self.zero), mv(self.g_idx),
                               {k: v.to(device) for k, v in self.extras.items()})

    def __repr__(self) -> str:
        return (f"QuantizedWeight({self.qtype}, shape={self.shape}, block={self.block}, "
                f"{'sym' if self.symmetric else 'asym'}{', act-order' if self.g_idx is not None else ''})")
