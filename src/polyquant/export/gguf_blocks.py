"""The block side of the GGUF export (:mod:`polyquant.export.gguf`): GGUF's block layouts packed from
polyquant's own codes and scales, and whether a quantized layer fits one of them as it is. numpy and
torch only (gguf-py for block sizes).

Blocks of 32 weights (gguf-py ``quants.py``): ``Q4_0`` = fp16 d + 16 bytes, byte j holding element j
(low nibble) and j + 16 (high nibble), value ``(q - 8) d``; ``Q4_1`` = fp16 d, fp16 m, 16 bytes,
value ``d q + m``; ``Q8_0`` = fp16 d + 32 int8, value ``d q``.

polyquant's value ``(code - offset - zero) * scale`` lands on those grids without re-rounding when
the layer's groups are multiples of 32 and it has no act-order:

- ``Q4_0``: ``offset + zero == 8`` everywhere (symmetric int4, and int2 / int3 codes re-centred);
- ``Q4_1``: any integer layout of at most 4 bits, with ``d = scale``, ``m = -(offset + zero) scale``
  (m is rounded to fp16: "exact up to the fp16 rounding of the offset");
- ``Q8_0``: an integer ``offset + zero`` and ``code - offset - zero`` in [-128, 127] (int8, and any
  symmetric or integer-zero 2..8-bit layout).

Ternary codes (``bitnet``) go to llama.cpp's 256-weight types when in_features is a multiple of 256 and
a scale spans whole blocks (per tensor, per channel, groups of 256k): ``TQ2_0`` = 64 bytes of 2-bit codes
(``t + 1``; within each 128 weights byte m holds m, m+32, m+64, m+96) + fp16 d, 2.06 bits a weight;
``TQ1_0`` = 48 bytes of five trits each + 4 bytes of four trits (base 3, most significant first,
scaled to a byte by ceiling division) + fp16 d, 1.69 bits a weight. Otherwise (576-wide SmolLM) they
land exactly on Q4_0 (codes 7, 8, 9). llama.cpp runs TQ layers with its own 8-bit activations (per 256
weights, Q8_K), a finer grid than BitLinear's per-token absmax.

d is fp16 in every type, so a scale that is not an fp16 number is rounded (the exporter reports it).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["GGUF_TYPES", "TERNARY_TYPES", "pack_q4_0", "pack_q4_1", "pack_q8_0", "pack_tq1_0", "pack_tq2_0",
           "gguf_blocks", "gguf_check_layer", "natural_type", "block_len"]

GGUF_TYPES = ("Q4_0", "Q4_1", "Q8_0", "TQ1_0", "TQ2_0")
TERNARY_TYPES = ("TQ2_0", "TQ1_0")  # llama.cpp's ternary types, 256-weight blocks; TQ2_0 decodes fastest


# -- block packing (our own: keeps our codes and scales) ----------------------------------------
def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8).reshape(*x.shape, 2)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """``[..., 32]`` codes 0..15 -> ``[..., 16]`` bytes: byte j = element j | element j+16 << 4."""
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def pack_q4_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``q`` uint8 ``[rows, cols]`` in 0..15 (value ``(q - 8) d``), ``d`` ``[rows, cols / 32]`` ->
    GGUF Q4_0 bytes ``[rows, cols / 32 * 18]``."""
    rows, cols = q.shape
    qb = q.reshape(rows, cols // 32, 32)
    return np.concatenate([_fp16_bytes(d), _nibbles(qb)], axis=-1).reshape(rows, -1)


def pack_q4_1(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Value ``d q + m``; ``[rows, cols / 32 * 20]``."""
    rows, cols = q.shape
    qb = q.reshape(rows, cols // 32, 32)
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(m), _nibbles(qb)], axis=-1).reshape(rows, -1)


def pack_q8_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``q`` int8 ``[rows, cols]`` (value ``d q``) -> ``[rows, cols / 32 * 34]``."""
    rows, cols = q.shape
    qb = np.ascontiguousarray(q.astype(np.int8)).view(np.uint8).reshape(rows, cols // 32, 32)
    return np.concatenate([_fp16_bytes(d), qb], axis=-1).reshape(rows, -1)


def pack_tq2_0(t: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``t`` uint8 ``[rows, cols]`` ternary codes 0, 1, 2 (value ``(t - 1) d``), ``d`` ``[rows, cols / 256]`` ->
    GGUF TQ2_0 bytes ``[rows, cols / 256 * 66]``: per block 64 bytes of 2-bit codes, then fp16 ``d``. Within each
    128 weights, byte ``m`` holds weights ``m, m + 32, m + 64, m + 96`` in bits 0-1, 2-3, 4-5, 6-7."""
    rows, cols = t.shape
    q = t.reshape(rows, cols // 256, 2, 4, 32).astype(np.uint8)
    qs = q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)
    return np.concatenate([qs.reshape(rows, cols // 256, 64), _fp16_bytes(d)], axis=-1).reshape(rows, -1)


def _trits(t: np.ndarray, n: int) -> np.ndarray:
    """``t [..., n, k]`` trits -> ``[..., k]`` bytes: the base-3 number with ``t[..., 0, :]`` as its most
    significant of five trits, scaled to a byte by ceiling division (``ceil(v * 256 / 243)``, llama.cpp's
    encoding: the decoder's ``(b * 3**i * 3) >> 8`` then reads trit ``i`` back)."""
    v = np.zeros(t.shape[:-2] + t.shape[-1:], dtype=np.uint16)
    for i in range(n):
        v = v * 3 + t[..., i, :]
    if n == 4:
        v = v * 3  # four trits sit in the top four places
    return ((v * 256 + 242) // 243).astype(np.uint8)


def pack_tq1_0(t: np.ndarray, d: np.ndarray) -> np.ndarray:
    """GGUF TQ1_0 (1.6875 bits a weight): per 256-weight block 48 bytes of five trits each (weights 0-159:
    byte ``m`` of 32 holds ``m + 32 i``; weights 160-239: byte ``m`` of 16 holds ``160 + m + 16 i``), 4 bytes
    of four trits (weights 240-255: byte ``j`` holds ``240 + j + 4 i``), then fp16 ``d``."""
    rows, cols = t.shape
    b = t.reshape(rows, cols // 256, 256).astype(np.uint16)
    qs0 = _trits(b[..., :160].reshape(rows, -1, 5, 32), 5)
    qs1 = _trits(b[..., 160:240].reshape(rows, -1, 5, 16), 5)
    qh = _trits(b[..., 240:].reshape(rows, -1, 4, 4), 4)
    return np.concatenate([qs0, qs1, qh, _fp16_bytes(d)], axis=-1).reshape(rows, -1)


def _ternary_reason(qw) -> str | None:
    """Why ``qw`` cannot be stored as TQ1_0 / TQ2_0 from its own codes (or None)."""
    out, inp = qw.shape
    if qw.qt.kind != "ternary":
        return f"qtype {qw.qtype} is not ternary (TQ1_0 / TQ2_0 hold codes -1, 0, 1)"
    if qw.g_idx is not None:
        return "act-order (g_idx) cannot be represented in any GGUF type; quantize without act-order"
    if inp % 256:
        return f"in_features {inp} is not a multiple of the ternary types' 256-weight blocks"
    c = qw.block[1]
    if c < inp and c % 256:
        return f"group size {c} is not a multiple of 256"
    if qw.zero is not None or qw.extras:
        return "zero points or extra tensors have no TQ1_0 / TQ2_0 counterpart"
    return None


def _grid_reason(qw) -> str | None:
    """Why ``qw``'s groups cannot map onto 32-weight blocks (or None)."""
    out, inp = qw.shape
    if qw.g_idx is not None:
        return "act-order (g_idx) cannot be represented in any GGUF type; quantize without act-order"
    if qw.qt.kind not in ("int", "ternary"):
        return f"qtype {qw.qtype} is not an integer grid (GGUF Q4_0 / Q4_1 / Q8_0 hold integer codes)"
    if inp % 32:
        return f"in_features {inp} is not a multiple of GGUF's 32-weight blocks"
    c = qw.block[1]
    if c < inp and c % 32:
        return f"group size {c} is not a multiple of 32"
    if qw.extras:
        return f"extra tensors {sorted(qw.extras)} (e.g. sparse outliers) have no GGUF counterpart"
    return None


def gguf_blocks(qw, gtype: str, rows: torch.Tensor | None = None) -> tuple[np.ndarray | None, str | None]:
    """Pack a ``QuantizedWeight`` as GGUF ``gtype`` from its own codes and scales.

    Returns ``(bytes [rows, nbytes], None)``, or ``(None, reason)`` when its grid is not ``gtype``'s
    (then only re-rounding can store it). ``rows`` optionally reorders the output rows."""
    if gtype in TERNARY_TYPES:
        reason = _ternary_reason(qw)
        if reason is not None:
            return None, reason
        scale, codes = qw.full_scale().to(torch.float32)[:, ::256], qw.codes
        if rows is not None:
            scale, codes = scale[rows], codes[rows]
        if not torch.isfinite(scale).all() or scale.abs().max() > 65504:
            return None, "a scale outside fp16's range"
        pack = pack_tq2_0 if gtype == "TQ2_0" else pack_tq1_0
        return pack(codes.numpy(), scale.numpy()), None
    reason = _grid_reason(qw)
    if reason is not None:
        return None, reason
    out, inp = qw.shape
    scale = qw.full_scale().to(torch.float32)[:, ::32]
    zero = qw.full_zero()
    offset = torch.full_like(scale, float(qw.qt.code_offset))
    if zero is not None:
        offset = offset + zero.to(torch.float32)[:, ::32]
    codes = qw.codes
    if rows is not None:
        scale, offset, codes = scale[rows], offset[rows], codes[rows]
    if not torch.isfinite(scale).all() or scale.abs().max() > 65504:
        return None, "a scale outside fp16's range"
    integral = bool((offset == offset.round()).all())
    if gtype == "Q4_1":
        if qw.bits > 4:
            return None, f"{qw.bits}-bit codes do not fit Q4_1's 4-bit nibbles"
        m = -offset * scale
        if m.abs().max() > 65504:
            return None, "an offset outside fp16's range"
        return pack_q4_1(codes.numpy(), scale.numpy(), m.numpy()), None
    if not integral:
        return None, f"non-integer zero points cannot be stored in {gtype} (Q4_1 holds them)"
    off_full = offset.repeat_interleave(32, dim=1)
    if gtype == "Q4_0":
        q = codes.to(torch.int16) - off_full.to(torch.int16) + 8
        if q.min() < 0 or q.max() > 15:
            return None, ("zero points other than 8 (asymmetric codes) cannot be stored in Q4_0 (Q4_1 holds "
                          "them)" if qw.zero is not None else f"{qw.qtype} codes exceed Q4_0's range")
        return pack_q4_0(q.to(torch.uint8).numpy(), scale.numpy()), None
    if gtype == "Q8_0":
        q = codes.to(torch.int16) - off_full.to(torch.int16)
        if q.min() < -128 or q.max() > 127:
            return None, "codes minus zero points exceed Q8_0's int8 range"
        return pack_q8_0(q.numpy().astype(np.int8), scale.numpy()), None
    raise ValueError(f"unknown GGUF type {gtype!r}; choose one of {GGUF_TYPES}")


def _candidates(qw) -> tuple[str, ...]:
    """GGUF types that may hold ``qw`` as it is, smaller (or, for ternary, faster) first."""
    if qw.qt.kind == "ternary":
        return TERNARY_TYPES + ("Q4_0", "Q8_0")
    return ("Q4_0", "Q4_1", "Q8_0") if qw.bits <= 4 else ("Q8_0",)


def natural_type(qw) -> str:
    """The GGUF type that holds ``qw`` exactly, preferring the smaller (Q8_0 for everything else; ternary
    weights TQ2_0 where rows are multiples of 256, else Q4_0)."""
    for t in _candidates(qw):
        data, _ = gguf_blocks(qw, t)
        if data is not None:
            return t
    return "Q8_0"


def gguf_check_layer(qw) -> str | None:
    """None when some GGUF type (Q4_0 / Q4_1 / Q8_0, TQ2_0 / TQ1_0 for ternary) holds ``qw``'s codes and scales as they are (up to
    fp16 rounding of the scales / offsets); the reason otherwise (then only re-rounding stores it)."""
    reasons = []
    for t in _candidates(qw):
        data, why = gguf_blocks(qw, t)
        if data is not None:
            return None
        reasons.append(why)
    return reasons[0] if len(set(reasons)) == 1 else "; ".join(dict.fromkeys(reasons))


def block_len(gtype: str) -> int:
    """Weights per block of GGUF type ``gtype`` (32 for Q4_0 / Q4_1 / Q8_0, 256 for TQ1_0 / TQ2_0)."""
    import gguf
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[gtype]][0]
