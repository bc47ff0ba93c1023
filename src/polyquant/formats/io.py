"""Checkpoint files: atomic output folders, config.json reading, safetensors headers and lazy
tensor reads, sharded writes.

Nothing here knows about quantization: :mod:`polyquant.formats.api` builds on these helpers.
Only safetensors is ever read; pickle files (``.bin``/``.pt``) are refused, never opened.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from polyquant.formats.base import CheckpointError

__all__ = ["atomic_dir", "write_json", "read_json", "read_config", "SafetensorsIndex", "TensorInfo",
           "write_safetensors", "DEFAULT_MAX_SHARD_BYTES", "PICKLE_SUFFIXES"]

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default shard limit ("5GB")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype strings -> bytes per element (and torch dtype where torch has one)
_ST_DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    "BOOL": (1, torch.bool), "U8": (1, torch.uint8), "I8": (1, torch.int8),
    "F8_E4M3": (1, torch.float8_e4m3fn), "F8_E5M2": (1, torch.float8_e5m2),
    "I16": (2, torch.int16), "U16": (2, getattr(torch, "uint16", None)), "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16), "I32": (4, torch.int32), "U32": (4, getattr(torch, "uint32", None)),
    "F32": (4, torch.float32), "I64": (8, torch.int64), "U64": (8, getattr(torch, "uint64", None)),
    "F64": (8, torch.float64),
}
_FLOAT_ST = {"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"}


# -- output folders -------------------------------------------------------------------------
def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse before any work: an existing ``out`` without ``overwrite``; with ``overwrite``, a
    path that is not a folder, or a non-empty folder that does not look like a model folder
    (no ``config.json``), so that a typo cannot wipe an unrelated directory."""
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    if out.is_symlink() or not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; refusing to replace it")
    if any(out.iterdir()) and not (out / "config.json").is_file():
        raise FileExistsError(f"{out} is a non-empty folder without config.json (not a model folder); "
                              "refusing to replace it")


def _honour_umask(root: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    for dirpath, dirs, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Write a folder atomically: yields a temporary sibling folder; on success its files are
    fsynced and it is renamed to ``out_dir`` (an existing ``out_dir`` is swapped out and removed
    only once the new folder is in place). On any exception the temporary folder is removed and
    ``out_dir`` is left as it was."""
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _honour_umask(tmp)  # mkdtemp / temporary files are 0700 / 0600: give the modes save_pretrained gives
        _fsync_tree(tmp)
        if out.exists():
            check_output_dir(out, overwrite)  # re-check: it may have appeared meanwhile
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rmdir(old)
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)  # fails (does not clobber) if a non-empty out appeared meanwhile
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# -- reading --------------------------------------------------------------------------------
def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({what}): {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} ({what}) must hold a JSON object, got {type(data).__name__}")
    return data


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a model folder, with clear errors for a missing folder or file."""
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} is not a folder (a Hugging Face model folder is expected)")
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{folder} has no config.json: not a Hugging Face model folder")
    return read_json(cfg, "config.json")


class TensorInfo:
    """One tensor as described by a safetensors header (no data read)."""

    __slots__ = ("name", "file", "dtype", "shape", "nbytes")

    def __init__(self, name: str, file: Path, dtype: str, shape: tuple[int, ...], nbytes: int) -> None:
        self.name, self.file, self.dtype, self.shape, self.nbytes = name, file, dtype, shape, nbytes

    @property
    def is_float(self) -> bool:
        return self.dtype in _FLOAT_ST

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return _ST_DTYPES.get(self.dtype, (0, None))[1]

    def __repr__(self) -> str:
        return f"TensorInfo({self.name}, {self.dtype}, {list(self.shape)})"


def _read_header(file: Path) -> dict[str, TensorInfo]:
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file} is truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise CheckpointError(f"{file} is corrupt: its header claims {n} bytes but the file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is corrupt: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} is corrupt: the safetensors header is not an object")
    out: dict[str, TensorInfo] = {}
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = meta["dtype"], tuple(int(s) for s in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file} is corrupt: bad header entry for tensor {name!r}") from None
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has unknown dtype {dtype!r}")
        nbytes = math.prod(shape) * _ST_DTYPES[dtype][0]
        if b - a != nbytes or a < 0:
            raise CheckpointError(f"{file} is corrupt: tensor {name!r} ({dtype}, {list(shape)}) spans "
                                  f"{b - a} bytes, expected {nbytes}")
        end = max(end, b)
        out[name] = TensorInfo(name, file, dtype, shape, nbytes)
    if 8 + n + end > size:
        raise CheckpointError(f"{file} is truncated: its header describes {8 + n + end} bytes but the file "
                              f"has {size}")
    return out


class SafetensorsIndex:
    """All tensors of a model folder (``model.safetensors`` or a sharded index), from the
    headers only. ``get(names)`` reads just those tensors."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.files = self._find_files()
        self.tensors: dict[str, TensorInfo] = {}
        for f in self.files:
            for name, info in _read_header(f).items():
                if name in self.tensors:
                    raise CheckpointError(f"tensor {name!r} appears in both {self.tensors[name].file.name} "
                                          f"and {f.name}")
                self.tensors[name] = info
        self._handles: dict[Path, Any] = {}
        self._stack: contextlib.ExitStack | None = None

    def _find_files(self) -> list[Path]:
        index = self.folder / INDEX_NAME
        if index.is_file():
            data = read_json(index, "safetensors index")
            wm = data.get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise CheckpointError(f"{index} has no weight_map")
            files = sorted({self.folder / str(v) for v in wm.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} names shard files that are missing: {missing}")
            return files
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            extra = f" (found {pickles}: polyquant never loads pickle files)" if pickles else ""
            raise CheckpointError(f"{self.folder} has no .safetensors weights{extra}")
        return files

    def keys(self) -> set[str]:
        return set(self.tensors)

    def __enter__(self) -> "SafetensorsIndex":
        self._stack = contextlib.ExitStack()
        return self

    def __exit__(self, *exc) -> None:
        if self._stack is not None:
            self._stack.close()
        self._handles.clear()
        self._stack = None

    def _handle(self, file: Path):
        from safetensors import safe_open
        h = self._handles.get(file)
        if h is None:
            try:
                h = safe_open(str(file), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"cannot read {file}: {e}") from None
            if self._stack is not None and hasattr(h, "__exit__"):
                h = self._stack.enter_context(h)
            self._handles[file] = h
        return h

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        try:
            return self._handle(info.file).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {info.file}: {e}") from None

    def metadata(self) -> dict[str, str]:
        meta: dict[str, str] = {}
        for f in self.files:
            m = self._handle(f).metadata() or {}
            meta.update(m)
        return meta


def write_safetensors(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int | None,
                      metadata: dict[str, str] | None = None) -> list[str]:
    """Write ``model.safetensors`` or, above ``max_shard_bytes``, ``model-0000i-of-0000n.safetensors``
    shards plus ``model.safetensors.index.json`` (the transformers layout). Returns the file names."""
    from safetensors.torch import save_file
    meta = {"format": "pt", **(metadata or {})}
    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    total = sum(sizes.values())
    if not max_shard_bytes or total <= max_shard_bytes:
        save_file(tensors, str(folder / SINGLE_NAME), metadata=meta)
        return [SINGLE_NAME]
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for k, t in tensors.items():
        if shards[-1] and used + sizes[k] > max_shard_bytes:
            shards.append({})
            used = 0
        shards[-1][k] = t
        used += sizes[k]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata=meta)
        weight_map.update({k: name for k in shard})
    write_json(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names + [INDEX_NAME]
