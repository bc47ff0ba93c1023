"""polyquant: quantize Hugging Face transformer models with every major method, natively in
PyTorch, run them on CPU or GPU, read and write the ecosystem's checkpoint formats, and measure
the accuracy / size / speed trade-offs.

Public API (thin: it calls the layers below)::

    model, tok = polyquant.load_model("default")
    q = polyquant.quantize(model, polyquant.RTNConfig(bits=4, group_size=64))
    polyquant.save(q, "out/rtn-w4", tokenizer=tok)
    q2, tok2 = polyquant.load("out/rtn-w4")
    print(polyquant.evaluate(q2, tok2))
"""
from polyquant.methods import METHODS, MethodConfig, RTNConfig, config_from_dict, get_method, list_methods
from polyquant.methods.apply import quantize_model
from polyquant.nn import QuantLinear, set_kernels
from polyquant.tensor import QuantizedWeight

from polyquant.version import __version__  # noqa: E402


def quantize(model, config, calibration=None, *, inplace: bool = False, show_progress: bool = True,
             kernel: str = "auto"):
    """Quantize ``model`` with a method config (e.g. ``RTNConfig(bits=4)``); returns the quantized
    model (a copy unless ``inplace=True``). ``kernel``: ``auto`` or a kernel name (a runtime
    choice: ``set_kernels`` changes it later)."""
    return quantize_model(model, config, calibration, inplace=inplace, show_progress=show_progress, kernel=kernel)


def __getattr__(name):  # lazy: keep `import polyquant` light
    if name in ("load_model", "default_model_path"):
        from polyquant import formats, models  # noqa: F401  (formats: the loader of quantized folders)
        return getattr(models, name)
    if name in ("save", "load", "detect_format", "checkpoint_info"):
        from polyquant import formats
        return getattr(formats, name)
    if name in ("evaluate",):
        from polyquant import eval as _eval
        return getattr(_eval, name)
    if name == "export":  # the package is callable: polyquant.export(model, to="gguf", out=...)
        import importlib
        return importlib.import_module("polyquant.export")
    if name == "calibration_data":
        from polyquant import calibration
        return calibration.calibration_data
    raise AttributeError(f"module 'polyquant' has no attribute {name!r}")


__all__ = ["METHODS", "MethodConfig", "QuantLinear", "QuantizedWeight", "RTNConfig", "config_from_dict",
           "get_method", "list_methods", "quantize", "quantize_model", "set_kernels", "load_model", "save",
           "load", "evaluate", "detect_format", "checkpoint_info", "calibration_data"]
