"""The storage-type table: one row per quantized element type.

Every other layer reads this table (like ggml's type traits): a ``QType`` says how many bits an
element takes, which integer codes or float values it can hold, and gives the reference
``encode`` (value in the quantized domain -> code) and ``decode`` (code -> value) functions.

Integer types are stored *unsigned* (offset binary): a signed int4 value v in [-8, 7] is the code
v + 8 in [0, 15]. Codebook types (nf4, fp4) store an index into their value table. Float8 types
store the float8 tensor itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["QType", "QTYPES", "get_qtype", "int_qtype", "vector_qtype", "e4m3fn_to_float32"]

# bitsandbytes' NF4 code book (normal-float quantiles, index order as stored on disk).
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# bitsandbytes' FP4 (e2m1) code book in its index order (sign bit = bit 3).
FP4_VALUES = (
    0.0, 0.005208333333333333, 0.6666666666666666, 1.0, 0.3333333333333333, 0.5,
    0.16666666666666666, 0.25, -0.0, -0.005208333333333333, -0.6666666666666666, -1.0,
    -0.3333333333333333, -0.5, -0.16666666666666666, -0.25,
)


@dataclass(frozen=True)
class QType:
    """One storage type.

    Attributes:
        name: registry key (``int4``, ``uint4``, ``nf4``, ``float8_e4m3fn`` ...).
        bits: bits per stored element.
        kind: ``int`` (affine integer), ``codebook`` (index into ``values``), ``float``
            (a torch float8 dtype), ``ternary`` (values -1, 0, 1 stored as codes 0, 1, 2),
            ``vector`` (an index into one of a weight's own learned code books of ``2**bits``
            vectors, AQLM-style: the values live with the weight, see ``QuantizedWeight.codebooks``).
        signed: for ``int``: whether the *value* range is signed (codes are always unsigned).
        values: code book values for ``codebook`` types.
        torch_dtype: storage dtype for ``float`` types.
    """

    name: str
    bits: int
    kind: str
    signed: bool = False
    values: tuple[float, ...] = field(default=(), repr=False)
    torch_dtype: torch.dtype | None = None

    @property
    def n_codes(self) -> int:
        return 1 << self.bits

    @property
    def qmin(self) -> int:
        """Smallest value (signed domain for signed ints; -1 for ternary)."""
        if self.kind == "ternary":
            return -1
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        if self.kind == "ternary":
            return 1
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def code_offset(self) -> int:
        """code = value + code_offset for integer and ternary types (ternary: codes 0, 1, 2 = -1, 0, 1)."""
        return -self.qmin

    @property
    def max_value(self) -> float:
        if self.kind == "float":
            return float(torch.finfo(self.torch_dtype).max)
        if self.kind == "codebook":
            return max(abs(v) for v in self.values)
        if self.kind == "ternary":
            return 1.0
        if self.kind == "vector":
            raise ValueError(f"{self.name}: vector codes have no value range of their own (learned code books)")
        return float(self.qmax)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Reference quantizer for values already divided by their scale: nearest code."""
        if self.kind == "int" or self.kind == "ternary":
            return (torch.clamp(torch.round(x), self.qmin, self.qmax) + self.code_offset).to(torch.uint8)
        if self.kind == "codebook":
            table = torch.tensor(self.values, dtype=torch.float32, device=x.device)
            x = x.float().unsqueeze(-1)
            d = (x - table).abs()
            # among equally near entries (fp4: +0 / -0) keep the sign of x (a sign bit, as in bnb CUDA kernels)
            key = (d > d.amin(-1, keepdim=True)).to(torch.uint8) * 2 + (torch.signbit(x) != torch.signbit(table))
            return torch.argmin(key, dim=-1).to(torch.uint8)
        if self.kind == "float":
            m = self.max_value
            return torch.clamp(x.float(), -m, m).to(self.torch_dtype)
        if self.kind == "vector":
            raise ValueError(f"{self.name}: vector codes are chosen by search against learned code books, "
                             "not encoded element-wise")
        raise ValueError(f"unknown qtype kind {self.kind!r}")

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes -> float32 values (before the scale is applied)."""
        if self.kind == "int":
            v = codes.to(torch.float32)
            return v - self.code_offset if self.code_offset else v
        if self.kind == "ternary":
            return codes.to(torch.float32) - 1
        if self.kind == "codebook":
            table = torch.tensor(self.values, dtype=torch.float32, device=codes.device)
            # index_select with an int32 index: ~5x faster than table[codes.long()] on CPU, same values
            return table.index_select(0, codes.reshape(-1).to(torch.int32)).view(codes.shape)
        if self.kind == "float":
            if codes.dtype == torch.float8_e4m3fn:
                return e4m3fn_to_float32(codes)
            return codes.to(torch.float32)
        if self.kind == "vector":
            raise ValueError(f"{self.name}: vector codes decode through the weight's code books "
                             "(QuantizedWeight.dequantize)")
        raise ValueError(f"unknown qtype kind {self.kind!r}")


def e4m3fn_to_float32(codes: torch.Tensor) -> torch.Tensor:
    """``codes.to(torch.float32)`` for float8_e4m3fn, the same values ~3x faster on CPU (torch's
    float8 -> float32 cast is a scalar loop there; this is a few vectorized integer passes).

    The bits ``s eeee mmm`` placed at bits 15 and 13..7 of a float16 are that float16's
    ``s 0eeee mmm0000000``: the same value times ``2**-8`` (exponent bias 15 instead of 7), e4m3's
    subnormals included (float16 subnormals of the same significand), so ``* 256`` is exact. Only the
    NaN codes (``0x7f`` / ``0xff``) have no float16 counterpart: a tensor holding one takes torch's cast.
    """
    if codes.device.type != "cpu":
        return codes.to(torch.float32)
    u = codes.view(torch.uint8)
    if u.numel() and int(torch.bitwise_and(u, 0x7F).amax()) == 0x7F:  # a NaN code
        return codes.to(torch.float32)
    h = u.view(torch.int8).to(torch.int16)  # sign-extended: s...s eeee mmm
    h.bitwise_left_shift_(7).bitwise_and_(-16385)  # sign at bit 15, clear bit 14 (0xBFFF)
    return h.view(torch.float16).to(torch.float32).mul_(256.0)


def _build() -> dict[str, QType]:
    table: dict[str, QType] = {}
    for b in range(1, 9):
        table[f"int{b}"] = QType(f"int{b}", b, "int", signed=True)
        table[f"uint{b}"] = QType(f"uint{b}", b, "int", signed=False)
    table["ternary"] = QType("ternary", 2, "ternary", signed=True)
    table["nf4"] = QType("nf4", 4, "codebook", signed=True, values=NF4_VALUES)
    table["fp4"] = QType("fp4", 4, "codebook", signed=True, values=FP4_VALUES)
    table["float8_e4m3fn"] = QType("float8_e4m3fn", 8, "float", True, torch_dtype=torch.float8_e4m3fn)
    table["float8_e5m2"] = QType("float8_e5m2", 8, "float", True, torch_dtype=torch.float8_e5m2)
    for b in range(1, 17):  # indices into 2**b-entry learned code books (AQLM: 1x16, 2x8, ...)
        table[f"vq{b}"] = QType(f"vq{b}", b, "vector")
    return table


QTYPES: dict[str, QType] = _build()


def get_qtype(name: str) -> QType:
    try:
        return QTYPES[name]
    except KeyError:
        raise ValueError(f"unknown qtype {name!r}; known: {sorted(QTYPES)}") from None


def int_qtype(bits: int, signed: bool) -> QType:
    return get_qtype(f"{'int' if signed else 'uint'}{bits}")


def vector_qtype(bits: int) -> QType:
    """The index type of a ``2**bits``-entry code book (1 to 16 bits)."""
    if not 1 <= int(bits) <= 16:
        raise ValueError(f"code book index bits must be 1..16, got {bits}")
    return get_qtype(f"vq{int(bits)}")
