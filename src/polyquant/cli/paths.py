"""The command line's checks of its inputs and outputs, done before any work."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from polyquant.cli.base import UsageError

__all__ = ["check_model_arg", "is_checkpoint", "source_of", "load_any", "check_output", "read_text_arg",
           "recorded_source", "dir_bytes", "resume_dir_for", "RECORD_FILE"]

RECORD_FILE = "polyquant.json"  # polyquant's own record in a checkpoint (see polyquant.formats.api)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_arg(spec: str, allow_checkpoint: bool = True) -> str:
    """Refuse, before any loading, what polyquant cannot load: a missing path, a hub id (no
    downloads), a folder without config.json, a non-GGUF file."""
    if spec == "default":
        return spec
    p = Path(spec).expanduser()
    if not p.exists():
        if _HUB_ID.match(spec):
            raise UsageError(f"{spec!r} is not a local path and polyquant does not download models: download it "
                             f"yourself and give the local folder (or 'default', or a .gguf file)")
        raise UsageError(f"model {spec!r} does not exist (give 'default', a local Hugging Face folder or a .gguf file)")
    if p.is_file():
        if p.suffix != ".gguf":
            raise UsageError(f"model {spec!r} is a file but not a .gguf (give a Hugging Face folder or a .gguf file)")
        return spec
    if not (p / "config.json").is_file():
        raise UsageError(f"model folder {spec!r} has no config.json: not a Hugging Face model folder")
    if not allow_checkpoint and is_checkpoint(p):
        raise UsageError(f"{spec!r} is already a quantized checkpoint; give the unquantized model")
    return spec


def is_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    cfg = p / "config.json"
    if not (p.is_dir() and cfg.is_file()):
        return False
    try:
        return bool(json.loads(cfg.read_text()).get("quantization_config"))
    except (OSError, ValueError):
        return False


def source_of(spec: str) -> str:
    return "default" if spec == "default" else str(Path(spec).expanduser().resolve())


def load_any(spec: str):
    """(model, tokenizer) for 'default', a HF folder, a .gguf, or a quantized checkpoint."""
    import polyquant
    if is_checkpoint(spec):
        from polyquant.formats import load
        return load(spec)
    return polyquant.load_model(spec)


def _writable_folder(folder: Path) -> str | None:
    """Why files cannot be created in ``folder`` (None: they can). Probes by creating and
    removing an empty hidden folder, which also catches read-only and pseudo file systems
    (/proc, /sys) where permission bits say yes."""
    if not folder.is_dir():
        return f"{folder} is not a folder"
    try:
        probe = tempfile.mkdtemp(prefix=".polyquant-probe-", dir=folder)
    except OSError as e:
        return f"cannot create files in {folder} ({e.strerror or type(e).__name__})"
    os.rmdir(probe)
    return None


def check_output(out: Path, overwrite: bool, what: str = "output") -> None:
    """Refuse, before any work, an output that cannot be written: an existing file, an existing
    folder without ``--overwrite`` (or, with it, a folder that is not a model folder), or a
    parent that is not a writable folder."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{what} {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"{what} folder {out} already exists; pass --overwrite to replace it")
        if not (out / "config.json").is_file():  # a typo must not wipe an unrelated folder
            raise UsageError(f"refusing to overwrite {out}: it is not empty and not a model folder (no config.json)")
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    reason = _writable_folder(parent)
    if reason:
        raise UsageError(f"cannot write the {what} {out}: {reason}; choose another -o")


def resume_dir_for(out: Path) -> Path:
    """Where ``quantize`` keeps per-block calibration checkpoints for ``out`` (a rerun resumes)."""
    out = Path(out)
    return out.parent / f".{out.name}.calibration-resume"


def read_text_arg(path: str | None, flag: str) -> str | None:
    if path is None:
        return None
    from polyquant.data import load_text
    try:
        return load_text(path)
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file") from None
    except UnicodeDecodeError:
        raise UsageError(f"{flag} {path}: not a UTF-8 text file") from None


def recorded_source(path: str | Path) -> str | None:
    """The unquantized model a polyquant checkpoint was made from (``source`` in polyquant.json)."""
    p = Path(path) / RECORD_FILE
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    src = rec.get("source") if isinstance(rec, dict) else None
    return src if isinstance(src, str) and src else None


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
