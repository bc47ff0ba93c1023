"""Methods: pure algorithms (float weight [+ statistics] -> QuantizedWeight), one module each,
registered by name. Importing this package registers every built-in method."""
from polyquant.methods.base import MethodConfig
from polyquant.methods.registry import (METHODS, MethodSpec, config_from_dict, get_method, list_methods,
                                        register_method, unregister_method)
from polyquant.methods import rtn  # noqa: F401  (registers)
from polyquant.methods import hqq, bnb  # noqa: F401,E402  (registers hqq, bnb-nf4, bnb-fp4, bnb-int8)
from polyquant.methods import gptq  # noqa: F401,E402  (registers gptq)
from polyquant.methods import awq  # noqa: F401,E402  (registers awq)
from polyquant.methods import fp8  # noqa: F401,E402  (registers fbgemm-fp8, fp8-block, fp8, fp8-static)
from polyquant.methods import eetq, quanto, torchao  # noqa: F401,E402  (registers eetq, quanto, torchao-*)
from polyquant.methods import aqlm  # noqa: F401,E402  (registers aqlm)
from polyquant.methods import bitnet  # noqa: F401,E402  (registers bitnet)
from polyquant.methods import spqr  # noqa: F401,E402  (registers spqr)
from polyquant.methods.gptq import GPTQConfig  # noqa: E402
from polyquant.methods.rtn import RTNConfig
from polyquant.methods.apply import quantize_model  # noqa: E402

__all__ = ["MethodConfig", "MethodSpec", "METHODS", "RTNConfig", "config_from_dict", "get_method",
           "list_methods", "quantize_model", "register_method", "unregister_method"]

from polyquant.plugins import load_plugins as _load_plugins  # noqa: E402

# third-party methods (entry points ``polyquant.methods``), after the built-ins
_load_plugins("polyquant.methods", register_method, lambda obj: isinstance(obj, MethodSpec))
