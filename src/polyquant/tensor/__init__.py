"""Quantized tensors: ``QuantizedWeight`` (the ground truth) and bit packing."""
from polyquant.tensor.packing import pack, packed_length, unpack
from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["QuantizedWeight", "pack", "unpack", "packed_length"]
