"""bitsandbytes' quantizers: 4-bit NF4 / FP4 blockwise absmax (with optional double quantization of
the absmax values) and LLM.int8's row-wise int8 weights. Registered as ``bnb-nf4``, ``bnb-fp4`` and
``bnb-int8``.

4-bit (QLoRA; bitsandbytes ``quantize_4bit``, its pure-PyTorch backend, which is what runs on CPU):

- the weight is flattened row-major and cut into blocks of ``blocksize`` (64) values; each block's
  absmax (fp32) is its scale; ``x * (1 / absmax)`` (the last, short block divides instead) is
  clamped to [-1, 1] and bucketized at the midpoints of the sorted code book (a value exactly on a
  midpoint takes the lower entry); for FP4 the sorted index maps back to the bit-pattern code
  (bitsandbytes' order, in which a small positive value gets the code of -0 and a small negative one
  the code of +0: both decode to 0).
- a block of ``blocksize`` consecutive flattened elements is ``block=(1, blocksize)`` when
  ``in_features % blocksize == 0`` and ``block=(blocksize // in_features, in_features)`` (whole
  rows) when ``blocksize % in_features == 0``; any other shape straddles rows in a way
  ``QuantizedWeight`` cannot express and is refused by name.
- double quantization (``double_quant``): ``offset = mean(absmax)``; ``absmax - offset`` is
  quantized blockwise (256 values per block) against the signed 8-bit dynamic map
  (:func:`dynamic_map`) with the same nearest-entry rule; ``QuantizedWeight.scale`` holds the
  dequantized absmax ``map[q] * nested_absmax + offset``, so ``dequantize()`` equals bitsandbytes'
  ``dequantize_4bit``. The compressed form rides along in ``extras`` (``absmax_q``,
  ``nested_absmax``, ``nested_offset``, ``nested_quant_map``) for the checkpoint format.

LLM.int8 (bitsandbytes ``int8_vectorwise_quant`` as ``Int8Params`` calls it): the weight is cast to
float16 (``quant_dtype``), ``SCB[n] = max |W[n, :]|`` and ``CB = round(W * (127 / SCB))`` (int8);
``QuantizedWeight``: qtype ``int8``, ``block=(1, in)``, ``scale = SCB / 127``, and ``SCB`` itself in
``extras`` so that a checkpoint stores bitsandbytes' exact statistics. The run-time activation rule
(per-token int8 with the outlier-column decomposition) lives in :mod:`polyquant.kernels.bnb_int8`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from polyquant.methods.base import MethodConfig, check_choice, check_int
from polyquant.methods.registry import MethodSpec, register_method
from polyquant.methods.traits import BENCH, Preset, Prior, rel
from polyquant.qtypes import get_qtype
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["Bnb4bitConfig", "BnbNF4Config", "BnbFP4Config", "BnbInt8Config", "dynamic_map", "code_book",
           "bnb_block", "quantize_4bit_flat", "quantize_blockwise_flat", "dequantize_blockwise_flat",
           "double_quant_absmax", "bnb_quantize_4bit", "bnb_quantize_int8", "int8_weight_from_scb",
           "BLOCKSIZES", "NESTED_BLOCKSIZE"]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
DTYPES = ("float32", "float16", "bfloat16")


# -- code books ----------------------------------------------------------------------------

def code_book(quant_type: str) -> torch.Tensor:
    """The 16-entry NF4 / FP4 code book (fp32, bit-pattern order) as bitsandbytes stores it in
    ``weight.quant_map``: the qtype table values."""
    check_choice("quant_type", quant_type, ("nf4", "fp4"))
    return torch.tensor(get_qtype(quant_type).values, dtype=torch.float32)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" map (``create_dynamic_map()``: 7 exponent bits), sorted,
    256 fp32 values in [-0.99297, 1].

    For exponent step ``i`` in 0..6 there are ``2**i`` fraction values: the midpoints of
    ``linspace(0.1, 1, 2**i + 1)`` (fp32) times ``10**(i - 6)``, with both signs; then 0 and 1.
    """
    vals: list[float] = []
    for i in range(7):
        b = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        mid = (b[:-1] + b[1:]) / 2.0
        vals += ((10 ** (i - 6)) * mid).tolist()
        vals += (-(10 ** (i - 6)) * mid).tolist()
    vals += [0.0, 1.0]
    return torch.tensor(sorted(vals), dtype=torch.float32)


def _bounds(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints of the sorted code and the sorted-index -> code map (stable: +0 sorts before -0)."""
    order = torch.sort(code, stable=True).indices
    s = code[order]
    return (s[:-1] + s[1:]) / 2, order


# -- blockwise primitives over a flattened tensor (bitsandbytes' pure-PyTorch backend) -------

def _normalize_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """absmax per block and the values scaled into [-1, 1]: full blocks multiply by the
    reciprocal, a short last block divides (both as bitsandbytes' default backend does)."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    body = flat[:full].reshape(-1, blocksize)
    absmax = body.abs().amax(-1) if full else flat.new_zeros(0)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(-1), -1, 1).reshape(-1)
    if rem:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return absmax, scaled


def _count_below(x: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """``torch.bucketize(x, bounds)`` (the number of sorted ``bounds`` strictly below each value; a
    value equal to a bound counts it as not below) as int32, by a vectorized binary search: for the
    15 / 255 bounds here 2-3x faster than ``bucketize`` on CPU."""
    m = bounds.numel()
    levels = 1 << max(0, (m).bit_length() - 1)  # largest power of two <= m
    pad = bounds.new_full((2 * levels - m,), float("inf"))
    bb = torch.cat([bounds.to(x.dtype), pad.to(x.dtype)])
    idx = torch.zeros(x.shape, dtype=torch.int32, device=x.device)
    lv = levels
    while lv >= 1:
        idx += (x > bb.index_select(0, idx + (lv - 1))).to(torch.int32) * lv
        lv //= 2
    return idx


def quantize_4bit_flat(flat: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit codes (uint8, one per element) and fp32 absmax per block of a 1-D tensor."""
    code = code_book(quant_type).to(flat.device)
    absmax, scaled = _normalize_blocks(flat.float(), blocksize)
    bounds, order = _bounds(code)
    q = order.to(torch.uint8).index_select(0, _count_below(scaled, bounds))
    return q, absmax


def quantize_blockwise_flat(flat: torch.Tensor, code: torch.Tensor, blocksize: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization against a sorted 256-entry ``code`` (``quantize_blockwise``)."""
    absmax, scaled = _normalize_blocks(flat.float(), blocksize)
    bounds = (code[:-1] + code[1:]) / 2
    return _count_below(scaled, bounds).to(torch.uint8), absmax


def dequantize_blockwise_flat(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int
                              ) -> torch.Tensor:
    """``code[q] * absmax[block]`` (fp32), as ``dequantize_blockwise``."""
    vals = code.float()[q.long()]
    n = vals.numel()
    idx = torch.arange(n, device=vals.device) // blocksize
    return vals * absmax.float()[idx]


def double_quant_absmax(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    """Double quantization of the fp32 absmax vector: ``absmax_q`` (uint8), ``nested_absmax`` (fp32
    per 256 values), ``nested_offset`` (fp32, shape [1]), ``nested_quant_map`` (the dynamic map) and
    ``absmax`` (the dequantized absmax: ``map[q] * nested_absmax + offset``)."""
    offset = absmax.mean()
    code = dynamic_map().to(absmax.device)
    q, nested = quantize_blockwise_flat(absmax - offset, code, NESTED_BLOCKSIZE)
    deq = dequantize_blockwise_flat(q, nested, code, NESTED_BLOCKSIZE) + offset
    return {"absmax_q": q, "nested_absmax": nested, "nested_offset": offset.reshape(1).float(),
            "nested_quant_map": code, "absmax": deq}


def bnb_block(shape: tuple[int, int], blocksize: int) -> tuple[int, int]:
    """The ``QuantizedWeight`` block equal to ``blocksize`` consecutive elements of the flattened
    ``[out, in]`` weight; ValueError when no rectangle is."""
    out, inp = shape
    if inp % blocksize == 0:
        return (1, blocksize)
    if blocksize % inp == 0:
        return (blocksize // inp, inp)
    raise ValueError(f"bitsandbytes blocks of {blocksize} flattened values straddle rows of a weight with "
                     f"in_features={inp} (neither divides the other); QuantizedWeight cannot express that "
                     f"layout - use a blocksize that divides in_features or exclude this layer")


# -- configs ---------------------------------------------------------------------------------

@dataclass
class Bnb4bitConfig(MethodConfig):
    """bitsandbytes 4-bit (QLoRA). Defaults are transformers' ``BitsAndBytesConfig`` defaults.

    Attributes:
        blocksize: flattened values per absmax block (32..4096, powers of two; bnb's default 64).
        double_quant: quantize the absmax values again (``bnb_4bit_use_double_quant``).
        compute_dtype: ``bnb_4bit_compute_dtype`` recorded in the checkpoint (float32/float16/bfloat16);
            polyquant runs the layer in the activation dtype.
    """

    blocksize: int = 64
    double_quant: bool = False
    compute_dtype: str = "float32"

    group_field: ClassVar[str | None] = "blocksize"

    quant_type = "nf4"  # class attribute, set per registered subclass

    def validate(self) -> None:
        check_int("blocksize", self.blocksize)
        check_choice("blocksize", self.blocksize, BLOCKSIZES)
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant must be a bool, got {self.double_quant!r}")
        check_choice("compute_dtype", self.compute_dtype, DTYPES)

    def describe(self) -> str:
        return f"bnb {self.quant_type} b{self.blocksize}{' dq' if self.double_quant else ''}"


@dataclass
class BnbNF4Config(Bnb4bitConfig):
    """NF4 (normal-float 4-bit) blockwise absmax quantization."""

    quant_type = "nf4"


@dataclass
class BnbFP4Config(Bnb4bitConfig):
    """FP4 (e2m1, bitsandbytes' bias-2 variant) blockwise absmax quantization."""

    quant_type = "fp4"


@dataclass
class BnbInt8Config(MethodConfig):
    """LLM.int8(): row-wise absmax int8 weights; at run time per-token int8 activations with the
    outlier decomposition.

    Attributes:
        threshold: ``llm_int8_threshold``: input columns holding any ``|x| >= threshold`` run in
            float against the dequantized weight columns; 0 (or inf) disables the decomposition.
        quant_dtype: dtype weights and activations are cast to before their absmax / codes are
            computed (bitsandbytes casts both to float16; ``float32`` keeps full precision).
    """

    threshold: float = 6.0
    quant_dtype: str = "float16"

    def validate(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise ValueError(f"threshold must be a number, got {self.threshold!r}")
        if not float(self.threshold) >= 0:
            raise ValueError(f"threshold must be >= 0 (0 disables the decomposition), got {self.threshold}")
        check_choice("quant_dtype", self.quant_dtype, ("float16", "float32"))

    def describe(self) -> str:
        t = float(self.threshold)
        return f"llm.int8 t{t:g}" if 0 < t < float("inf") else "llm.int8 (no decomposition)"


# -- quantize functions -----------------------------------------------------------------------

def _check_weight(w: torch.Tensor, what: str) -> torch.Tensor:
    if w.dim() != 2:
        raise ValueError(f"{what} quantizes 2-D weights, got shape {tuple(w.shape)}")
    return w.detach()


def _check_finite(stat: torch.Tensor) -> None:
    """NaN / Inf anywhere in the weight shows in its per-block absmax (cheaper than scanning it)."""
    if not bool(torch.isfinite(stat).all()):
        raise ValueError("weight contains NaN or Inf values")


def bnb_quantize_4bit(weight: torch.Tensor, config: Bnb4bitConfig, stats: dict | None = None) -> QuantizedWeight:
    """NF4 / FP4 blockwise absmax over the flattened weight (optionally double-quantized)."""
    w = _check_weight(weight, "bitsandbytes 4-bit")
    shape = (int(w.shape[0]), int(w.shape[1]))
    block = bnb_block(shape, config.blocksize)
    codes, absmax = quantize_4bit_flat(w.reshape(-1), config.quant_type, config.blocksize)
    _check_finite(absmax)
    extras: dict[str, torch.Tensor] = {}
    if config.double_quant:
        dq = double_quant_absmax(absmax)
        absmax = dq.pop("absmax")
        extras = dq
    grid = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    return QuantizedWeight.from_codes(codes.reshape(shape), config.quant_type, block,
                                      absmax.reshape(grid).contiguous(), extras=extras)


def int8_weight_from_scb(cb: torch.Tensor, scb: torch.Tensor) -> QuantizedWeight:
    """``QuantizedWeight`` for bitsandbytes' int8 codes ``CB`` ``[out, in]`` and ``SCB`` ``[out]``."""
    codes = (cb.to(torch.int16) + 128).to(torch.uint8)
    scb = scb.float().contiguous()
    scale = (scb / 127.0).reshape(-1, 1)
    return QuantizedWeight.from_codes(codes, "int8", (1, int(cb.shape[1])), scale, extras={"SCB": scb})


def bnb_quantize_int8(weight: torch.Tensor, config: BnbInt8Config, stats: dict | None = None) -> QuantizedWeight:
    """Row-wise absmax int8 (``int8_vectorwise_quant`` of the ``quant_dtype`` weight)."""
    w = _check_weight(weight, "LLM.int8")
    dt = getattr(torch, config.quant_dtype)
    amax = w.abs().amax(dim=1)
    _check_finite(amax)
    # rounding is monotone, so the row absmax of the cast weight is the cast of the row absmax
    scb = amax.to(dt)
    if not bool(torch.isfinite(scb).all()):
        raise ValueError(f"weight overflows {config.quant_dtype} (bitsandbytes quantizes int8 weights in "
                         "float16); use quant_dtype='float32'")
    scb = scb.float()
    b = w.to(dt)
    safe = torch.where(scb > 0, scb, torch.ones_like(scb))
    cb = torch.round(b * (127.0 / safe).unsqueeze(-1)).to(torch.int8)
    return int8_weight_from_scb(cb, scb)


def _llm_int8_rule(config: BnbInt8Config):
    from polyquant.activations.llm_int8 import LLMInt8Activation
    return LLMInt8Activation(float(config.threshold), config.quant_dtype)


_REF = "bitsandbytes (Dettmers et al.); QLoRA arXiv 2305.14314"
register_method(MethodSpec(
    name="bnb-nf4", config_cls=BnbNF4Config, quantize_weight=bnb_quantize_4bit, needs_calibration=False,
    family="codebook", bits=(4,), formats=("bitsandbytes",),
    description="bitsandbytes NF4: normal-float code book, absmax blocks of 64 flattened values, optional double quant",
    reference=_REF, order=50, presets=(Preset("bnb-nf4"),),
    priors=(Prior(4, None, None, rel(18.204), BENCH + ": bitsandbytes NF4 (bnb-nf4-dq) 18.204"),)))
register_method(MethodSpec(
    name="bnb-fp4", config_cls=BnbFP4Config, quantize_weight=bnb_quantize_4bit, needs_calibration=False,
    family="codebook", bits=(4,), formats=("bitsandbytes",),
    description="bitsandbytes FP4 (e2m1): absmax blocks of 64 flattened values, optional double quant",
    reference=_REF, order=51, presets=(Preset("bnb-fp4"),),
    priors=(Prior(4, None, None, rel(20.900), BENCH + ": bitsandbytes FP4 20.900"),)))
register_method(MethodSpec(
    name="bnb-int8", config_cls=BnbInt8Config, quantize_weight=bnb_quantize_int8, needs_calibration=False,
    family="integer weight-only", bits=(8,), formats=("bitsandbytes",),
    activations="int8 dynamic per token, outlier columns in float (LLM.int8)",
    description="LLM.int8(): row-wise absmax int8 weights; int8 x int8 matmul with float outlier columns",
    reference="LLM.int8() arXiv 2208.07339; bitsandbytes",
    act_rule=_llm_int8_rule, order=52, presets=(Preset("bnb-llm.int8"),),
    priors=(Prior(8, None, None, rel(14.233), BENCH + ": bitsandbytes LLM.int8 14.233"),)))
