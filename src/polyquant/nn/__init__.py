"""Modules: ``QuantLinear`` and ``quantize_model`` (walk, select, swap, record)."""
from polyquant.nn.quant_linear import QuantLinear
from polyquant.nn.quantize import QuantRecord, get_record, kernel_summary, quantize_model, replace_module, set_kernels
from polyquant.nn.select import find_blocks, select_linears

__all__ = ["QuantLinear", "QuantRecord", "find_blocks", "get_record", "kernel_summary", "quantize_model",
           "replace_module", "select_linears", "set_kernels"]
