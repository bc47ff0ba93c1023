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

Three layout families share this one class (``layout``):

``scalar``   one code per weight (int, nf4/fp4, float8), the table above.
``ternary``  the same with qtype ``ternary`` (values -1, 0, 1); BitNet uses one per-tensor scale,
             ``block = (out, in)``, ``scale [1, 1]``.
``vector``   AQLM-style additive code books. ``codebooks [M, 2**b, og, ig]`` (float); ``data``
             holds the codes ``[out/og, in/ig, M]``: uint8 for ``b <= 8``, int16 for ``b <= 16``
             (two's complement of the unsigned index: AQLM's own signed storage), qtype ``vq{b}``;
             ``scale [out/og, 1]`` with ``block = (og, in)`` (one scale per output group).
             ``w[og-block o, ig-group i] = scale[o] * sum_m codebooks[m, codes[o, i, m]]``.

Any layout may carry ``outliers`` (:class:`~polyquant.tensor.sparse.SparseOutliers`, SpQR-style
CSR float corrections) which ``dequantize`` *adds* after the dense part.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from polyquant.qtypes import QType, get_qtype, vector_qtype
from polyquant.tensor.packing import pack, unpack
from polyquant.tensor.sparse import SparseOutliers

__all__ = ["QuantizedWeight", "expand_blocks", "vector_weight"]


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
    codebooks: torch.Tensor | None = None
    outliers: SparseOutliers | None = None

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.block = (int(self.block[0]), int(self.block[1]))
        qt = self.qt
        out, inp = self.shape
        r, c = self.block
        if r < 1 or c < 1:
            raise ValueError(f"block must be positive, got {self.block}")
        if self.outliers is not None and tuple(self.outliers.shape) != self.shape:
            raise ValueError(f"outliers shape {self.outliers.shape} != weight shape {self.shape}")
        if qt.kind == "vector":
            self._check_vector()
        elif self.codebooks is not None:
            raise ValueError(f"codebooks belong to vector qtypes (vq*), not {self.qtype}")
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

    def _check_vector(self) -> None:
        cb, qt = self.codebooks, self.qt
        out, inp = self.shape
        if cb is None or cb.dim() != 4:
            raise ValueError(f"{self.qtype} needs codebooks [M, 2**b, og, ig], got "
                             f"{None if cb is None else tuple(cb.shape)}")
        m, k, og, ig = cb.shape
        if k != qt.n_codes:
            raise ValueError(f"{self.qtype} indexes {qt.n_codes}-entry code books, codebooks have {k} entries")
        if out % og or inp % ig:
            raise ValueError(f"code book groups {og}x{ig} must divide the weight {self.shape}")
        if self.block != (og, inp):
            raise ValueError(f"vector codes take block (out_group, in_features) = {(og, inp)}, got {self.block}")
        if self.zero is not None or self.g_idx is not None:
            raise ValueError("vector codes have no zero points or g_idx")
        want = torch.uint8 if qt.bits <= 8 else torch.int16
        if self.data.dtype != want:
            raise ValueError(f"{self.qtype} codes are stored as {want}, got {self.data.dtype}")

    # -- construction -------------------------------------------------------------------
    def _data_shape(self, qt: QType, shape: tuple[int, int]) -> tuple[int, ...]:
        out, inp = shape
        if qt.kind == "vector":
            m, _, og, ig = self.codebooks.shape
            return (out // og, inp // ig, m)
        if qt.kind == "float" or qt.bits == 8:
            return (out, inp)
        return (out, (inp * qt.bits + 31) // 32)

    @classmethod
    def from_vector_codes(cls, codes: torch.Tensor, codebooks: torch.Tensor, scale: torch.Tensor,
                          outliers: SparseOutliers | None = None) -> "QuantizedWeight":
        """Build a ``vector`` weight from unsigned code indices ``[out/og, in/ig, M]`` (any int dtype),
        code books ``[M, 2**b, og, ig]`` and per-output-group scales ``[out/og]`` or ``[out/og, 1]``."""
        m, k, og, ig = codebooks.shape
        bits = int(k).bit_length() - 1
        if k != 1 << bits:
            raise ValueError(f"code books must have a power-of-two number of entries, got {k}")
        qt = vector_qtype(bits)
        c = codes.to(torch.int32)
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= k):
            raise ValueError(f"codes must lie in [0, {k}), got [{int(c.min())}, {int(c.max())}]")
        data = c.to(torch.uint8) if bits <= 8 else torch.where(c >= 32768, c - 65536, c).to(torch.int16)
        ob, ib, _ = codes.shape
        shape = (ob * og, ib * ig)
        return cls(qt.name, shape, (og, shape[1]), data, scale.reshape(ob, 1), codebooks=codebooks,
                   outliers=outliers)

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
    def group_columns(self) -> int:
        """Input columns per scale, counted: ``in_features`` for per-channel (the stored formats'
        ``group_size`` and kernels' group length; :attr:`group_size` says -1 there)."""
        return min(self.block[1], self.shape[1])

    @property
    def layout(self) -> str:
        """``scalar``, ``ternary`` or ``vector`` (see the module docstring)."""
        kind = self.qt.kind
        return kind if kind in ("ternary", "vector") else "scalar"

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    def zero_points(self) -> torch.Tensor:
        """Zero points in the *code* domain ``[rows, cols]`` (float32) such that
        ``w = (code - z) * scale`` for integer qtypes: the code offset plus ``zero``
        (the convention GPTQ, AWQ and compressed-tensors store)."""
        qt = self.qt
        if qt.kind != "int":
            raise ValueError(f"zero points are defined for integer qtypes, not {self.qtype}")
        z = torch.full(tuple(self.scale.shape), float(qt.code_offset), device=self.scale.device)
        if self.zero is not None:
            z = z + self.zero.detach().float()
        return z

    @property
    def codes(self) -> torch.Tensor:
        """Unpacked codes ``[out, in]`` (uint8; float8 for float types); for vector codes the
        unsigned indices ``[out/og, in/ig, M]`` as int32."""
        qt = self.qt
        if qt.kind == "vector":
            c = self.data.to(torch.int32)
            return c if qt.bits <= 8 else c & 0xFFFF
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

    def _dequantize_vector(self) -> torch.Tensor:
        return vector_weight(self.codebooks.to(torch.float32), self.codes, self.scale.to(torch.float32), self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ground truth: ``(decode(code) - zero) * scale`` as a dense ``[out, in]`` tensor
        (through the code books for vector codes), plus the sparse outliers."""
        if self.qt.kind == "vector":
            w = self._dequantize_vector()
            if self.outliers is not None:
                self.outliers.add_to(w)
            return w.to(dtype)
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
        if self.outliers is not None:
            self.outliers.add_to(w)
        return w.to(dtype)

    def without_outliers(self) -> "QuantizedWeight":
        """The dense part alone (same tensors)."""
        if self.outliers is None:
            return self
        return QuantizedWeight(self.qtype, self.shape, self.block, self.data, self.scale, self.zero,
                               self.g_idx, dict(self.extras), self.codebooks, None)

    def derived_fields(self) -> tuple[str, ...]:
        """Fields decoded from a compact encoding held in ``extras``, hence not stored bytes: SpQR's
        two-level statistics (``extras['qq_stats']`` and the codes beside it) give ``scale`` and
        ``zero``; its input permutation (``extras['in_perm']``) gives ``g_idx``."""
        d: tuple[str, ...] = ("scale", "zero") if "qq_stats" in self.extras else ()
        return d + (("g_idx",) if "in_perm" in self.extras and self.g_idx is not None else ())

    def nbytes(self) -> int:
        """Bytes this weight occupies when stored (codes, scales, zeros, index, extras, code books,
        sparse outliers; not the :meth:`derived_fields`)."""
        derived = self.derived_fields()
        tensors = [self.data, *(getattr(self, f) for f in ("scale", "zero", "g_idx") if f not in derived),
                   self.codebooks, *self.extras.values()]
        n = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return n + (self.outliers.nbytes() if self.outliers is not None else 0)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight, everything counted (:meth:`nbytes` x 8 / weights)."""
        return self.nbytes() * 8 / (self.shape[0] * self.shape[1])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors, by field name (for ``QuantLinear`` buffers)."""
        d = {"data": self.data, "scale": self.scale}
        if self.zero is not None:
            d["zero"] = self.zero
        if self.g_idx is not None:
            d["g_idx"] = self.g_idx
        if self.codebooks is not None:
            d["codebooks"] = self.codebooks
        if self.outliers is not None:
            d.update({f"outliers_{k}": v for k, v in self.outliers.tensors().items()})
        d.update({f"extra_{k}": v for k, v in self.extras.items()})
        return d

    @classmethod
    def from_tensors(cls, qtype: str, shape: tuple[int, int], block: tuple[int, int],
                     t: dict[str, torch.Tensor]) -> "QuantizedWeight":
        """Inverse of :meth:`tensors`."""
        outliers = None
        if "outliers_row_offsets" in t:
            outliers = SparseOutliers(shape, t["outliers_row_offsets"], t["outliers_cols"], t["outliers_values"])
        extras = {k[len("extra_"):]: v for k, v in t.items() if k.startswith("extra_")}
        return cls(qtype, shape, block, t["data"], t["scale"], t.get("zero"), t.get("g_idx"), extras,
                   t.get("codebooks"), outliers)

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeight(self.qtype, self.shape, self.block, mv(self.data), mv(self.scale),
                               mv(self.zero), mv(self.g_idx),
                               {k: v.to(device) for k, v in self.extras.items()}, mv(self.codebooks),
                               None if self.outliers is None else self.outliers.to(device))

    def __repr__(self) -> str:
        extra = ""
        if self.codebooks is not None:
            m, k, og, ig = self.codebooks.shape
            extra = f", codebooks={m}x{k.bit_length() - 1}bit {og}x{ig}"
        if self.outliers is not None:
            extra += f", outliers={self.outliers.nnz}"
        return (f"QuantizedWeight({self.qtype}, shape={self.shape}, block={self.block}, "
                f"{'sym' if self.symmetric else 'asym'}{', act-order' if self.g_idx is not None else ''}{extra})")


def vector_weight(codebooks: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, shape) -> torch.Tensor:
    """The dense ``[out, in]`` weight of vector codes: ``scale[o] * sum_m codebooks[m, codes[o, i, m]]``
    (code books ``[M, 2**b, og, ig]``, unsigned codes ``[out/og, in/ig, M]``, scales ``[out/og]``); summed in
    code book order, and differentiable in ``codebooks`` and ``scale`` (AQLM's block fine-tuning)."""
    m, k, og, ig = codebooks.shape
    codes = codes.long()
    ob, ib, _ = codes.shape
    idx = codes + torch.arange(m, device=codes.device) * k
    blocks = codebooks.reshape(m * k, og * ig)[idx.reshape(-1, m)].sum(dim=1)  # [ob*ib, og*ig]
    blocks = blocks.view(ob, ib, og, ig) * scale.reshape(ob, 1, 1, 1)
    return blocks.permute(0, 2, 1, 3).reshape(tuple(shape))
