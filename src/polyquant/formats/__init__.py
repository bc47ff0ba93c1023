"""Formats: one module per on-disk format (detect, save, load), plus the generic save/load."""
from polyquant.formats.base import FORMATS, CheckpointError, Format, get_format, list_formats, register_format
from polyquant.formats import gptq as _gptq  # noqa: F401,E402  (registers gptq, gptq_v2)
from polyquant.formats import compressed_tensors as _ct  # noqa: F401,E402  (registers compressed-tensors)
from polyquant.formats import awq as _awq  # noqa: F401,E402  (registers awq)
from polyquant.formats import eetq as _eetq, quanto as _quanto, torchao as _ao  # noqa: F401,E402  (registers)
from polyquant.formats import hqq as _hqq, bitsandbytes as _bnb  # noqa: F401,E402  (registers hqq, bitsandbytes)
from polyquant.formats import fbgemm_fp8 as _fbgemm_fp8, fp8 as _fp8  # noqa: F401,E402  (registers fbgemm_fp8, fp8)
from polyquant.formats import aqlm as _aqlm  # noqa: F401,E402  (registers aqlm)
from polyquant.formats import bitnet as _bitnet  # noqa: F401,E402  (registers bitnet)
from polyquant.formats import spqr as _spqr  # noqa: F401,E402  (registers spqr, polyquant-spqr)
from polyquant.formats.api import detect_format, load, save  # noqa: E402
from polyquant.formats.info import checkpoint_info  # noqa: E402

__all__ = ["FORMATS", "CheckpointError", "Format", "get_format", "list_formats", "register_format",
           "save", "load", "detect_format", "checkpoint_info"]

from polyquant import models as _models  # noqa: E402
from polyquant.plugins import load_plugins as _load_plugins  # noqa: E402

if load not in _models.QUANTIZED_LOADERS:  # models.load_model hands quantized folders to load()
    _models.QUANTIZED_LOADERS.append(load)

# third-party formats (entry points ``polyquant.formats``), after the built-ins
_load_plugins("polyquant.formats", register_format, lambda obj: isinstance(obj, type) and issubclass(obj, Format))
