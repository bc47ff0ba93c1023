"""What makes a sweep folder resumable: the sweep's identity (``sweep.json``: the evaluation
settings and a fingerprint of the source model), checked before a rerun reuses any
record, and a lock so two sweeps never write one folder at once.

A rerun whose settings or source model differ from the folder's is refused with every difference
named (start it over with ``fresh``, or use another folder). The run list is not part of the
identity, nor are the calibration settings: each record is keyed by its run's exact config, the
settings and (for a run given data) the calibration settings, so a rerun may add runs (or leave
some out), and one with other calibration settings redoes the runs that use data and reuses the rest.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from polyquant.report.store import atomic_write_text, to_jsonable

__all__ = ["source_fingerprint", "identity_differences", "SweepLock", "read_identity", "write_identity",
           "IDENTITY_FILE", "FULL_HASH_BYTES"]

IDENTITY_FILE = "sweep.json"
#: Files up to this size are hashed whole; larger ones by their size and 64 sampled 1 MiB pieces
#: (evenly spaced, first and last included), so a 100 GB model is fingerprinted in seconds.
FULL_HASH_BYTES = 2 << 30
_PIECE = 1 << 20
_PIECES = 64
_MODEL_FILES = (".safetensors", ".gguf", ".json", ".model", ".txt", ".bin", ".py", ".tiktoken")


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
            return h.hexdigest()[:32]
        h.update(f"sampled {size}".encode())
        for i in range(_PIECES):
            f.seek((size - _PIECE) * i // (_PIECES - 1))
            h.update(f.read(_PIECE))
    return "sampled:" + h.hexdigest()[:32]


def source_fingerprint(spec: str | os.PathLike) -> dict[str, str]:
    """``{file name: digest}`` of the model a sweep reads: the embedded default GGUF for
    ``default``, the file for a ``.gguf``, the model files of a folder (weights, configs,
    tokenizer; hidden files and sub-folders left out). A spec that is no local path maps to ``{}``
    (the loader refuses it later)."""
    if str(spec) == "default":
        from polyquant.models import default_model_path
        try:
            p = default_model_path()
        except FileNotFoundError:
            return {}
        return {p.name: _file_digest(p)}
    p = Path(spec).expanduser()
    if p.is_file():
        return {p.name: _file_digest(p)}
    if p.is_dir():
        return {f.name: _file_digest(f) for f in sorted(p.iterdir())
                if f.is_file() and not f.name.startswith(".") and f.name.endswith(_MODEL_FILES)}
    return {}


def read_identity(folder: Path) -> dict[str, Any] | None:
    """The identity stored in ``folder/sweep.json`` (None when there is none; a file that is not
    a sweep identity is refused naming it)."""
    path = folder / IDENTITY_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); remove it or start over with --fresh") from None
    if not isinstance(data, dict) or not isinstance(data.get("identity"), dict):
        raise ValueError(f"{path} is not a polyquant sweep identity (no 'identity' object)")
    return data["identity"]


def write_identity(folder: Path, identity: dict[str, Any], **extra: Any) -> Path:
    """Write ``folder/sweep.json`` atomically."""
    body = {"identity": to_jsonable(identity), **to_jsonable(extra)}
    return atomic_write_text(folder / IDENTITY_FILE, json.dumps(body, indent=2, sort_keys=True) + "\n")


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= 60 else s[:57] + "..."


def identity_differences(stored: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """One line per field whose value differs: ``seqlen: 512 in the folder, 256 now``; the source
    model's files as ``model file config.json changed`` / ``added`` / ``removed``."""
    out: list[str] = []
    for k in sorted(set(stored) | set(now)):
        a, b = stored.get(k), now.get(k)
        if a == b:
            continue
        if k == "source" and isinstance(a, dict) and isinstance(b, dict):
            for f in sorted(set(a) | set(b)):
                if f not in b:
                    out.append(f"source model file {f} removed")
                elif f not in a:
                    out.append(f"source model file {f} added")
                elif a[f] != b[f]:
                    out.append(f"source model file {f} changed (sha256 {str(a[f])[:12]}... -> {str(b[f])[:12]}...)")
        elif isinstance(a, dict) and isinstance(b, dict):
            out.extend(f"{k}.{line}" for line in identity_differences(a, b))
        else:
            out.append(f"{k}: {_short(a)} in the folder, {_short(b)} now")
    return out


class SweepLock:
    """An exclusive lock on a sweep folder (``.lock``, ``flock``; the kernel drops it when the
    process dies, so a killed sweep never leaves the folder locked). A second sweep on the same
    folder is refused naming the holder's pid."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "SweepLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            import fcntl
        except ImportError:  # no flock (Windows): no protection against a second sweep
            self.fd = fd
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ValueError(f"{self.path.parent} is in use by another polyquant compare (pid {holder}); "
                                 "wait for it to finish or use another output folder") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None
