"""Modules: ``QuantLinear``, the model record and module surgery (``QuantRecord``, ``replace_module``,
``set_kernels``), layer selection. ``quantize_model`` is :mod:`polyquant.methods.apply`."""
from polyquant.nn.quant_linear import QuantLinear
from polyquant.nn.quantize import (QuantRecord, get_record, kernel_summary, module_device, replace_module,
                                   set_kernels)
from polyquant.nn.select import find_blocks, select_linears

__all__ = ["QuantLinear", "QuantRecord", "find_blocks", "get_record", "kernel_summary", "module_device", "replace_module",
           "select_linears", "set_kernels"]
