"""The resume state of a streaming quantization: ``OUT.partial/`` beside the output folder.

It holds the finished units' output shards (exactly the files the checkpoint will have), for
each finished unit a small summary of its quantized layers (what ``quantization_config`` needs
once the layers themselves are released), the calibration state after the last finished block
(the next block's input activations and the RNG state), and ``manifest.json``: the run's
arguments, a fingerprint of the source folder, the unit plan and how many units are done.

Every file is written to a temporary name, fsynced and renamed, and the manifest is written
after the files it counts, so a process killed at any moment (SIGKILL, power loss, a full disk)
leaves a state that a rerun either resumes exactly or refuses with the reason. A rerun with other
arguments or a changed source is refused with the differences named.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from polyquant.formats.base import CheckpointError

__all__ = ["PartialState", "ResumeMismatch", "partial_dir_for", "source_fingerprint"]

MANIFEST = "manifest.json"
#: written into ``OUT.partial`` just before the assembled checkpoint is renamed into place: a partial
#: folder holding it beside an output at least as new is the leftover of a run killed between that
#: rename and the folder's removal (see :func:`clear_stale_partial`)
ASSEMBLED = "assembled"
STATE_FORMAT = "polyquant-stream-partial"
STATE_VERSION = 1


class ResumeMismatch(ValueError):
    """The resume state beside the output belongs to a run with other arguments or another source."""


def partial_dir_for(out: str | os.PathLike) -> Path:
    """``OUT.partial`` beside ``OUT``."""
    out = Path(out)
    return out.parent / f"{out.name}.partial"


def clear_stale_partial(out: str | os.PathLike) -> bool:
    """Remove ``OUT.partial`` when it is the leftover of a finished run (its ``assembled`` marker is
    there and ``OUT`` is a folder written at or after it); True when it was removed. A marker with no
    output, or with an older output (an ``--overwrite`` run that failed while assembling), is kept:
    every unit is done and a rerun assembles again."""
    out = Path(out)
    folder = partial_dir_for(out)
    marker = folder / ASSEMBLED
    try:
        if marker.is_file() and out.is_dir() and out.stat().st_mtime >= marker.stat().st_mtime:
            shutil.rmtree(folder, ignore_errors=True)
            return True
    except OSError:
        return False
    return False


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_file(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then fsync and rename to ``path`` (a crash leaves the old file or the new one)."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    _fsync_file(tmp)
    os.replace(tmp, path)


_ST_NAMES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
             torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
             torch.float64: "F64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def write_safetensors_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file whose bytes depend on its contents only: the header lists the metadata
    sorted and the tensors in safetensors' own order (alignment, then name). (safetensors'
    ``save_file`` keeps metadata in a hash map: its order, hence the file's bytes, vary between
    processes, which would make a resumed checkpoint differ from an uninterrupted one.)"""
    order = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    off = 0
    for k, t in order:
        if t.dtype not in _ST_NAMES:
            raise ValueError(f"tensor {k!r}: dtype {t.dtype} has no safetensors name here")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, t in order:
            if t.numel():
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def source_fingerprint(folder: Path) -> dict[str, Any]:
    """What identifies the source model's files: config.json's hash and, for every safetensors
    file, its size, modification time and the hash of its header (the first MiB)."""
    files: dict[str, Any] = {}
    for p in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
        st = p.stat()
        h = hashlib.sha256()
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
        files[p.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256_head": h.hexdigest()[:32]}
    return files


def _diff(old: dict[str, Any], new: dict[str, Any], what: str) -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                out += _diff(a, b, f"{what}{k}.")
            else:
                out.append(f"{what}{k}: {json.dumps(a, default=str)} -> {json.dumps(b, default=str)}")
    return out


class PartialState:
    """``OUT.partial``: create it for a new run, or open it to resume the same run."""

    def __init__(self, folder: Path, args: dict[str, Any], source: dict[str, Any], units: list[str],
                 shards: list[str]) -> None:
        self.folder = Path(folder)
        self.args = json.loads(json.dumps(args, default=str))
        self.source, self.units, self.shards = source, list(units), list(shards)
        self.done = 0
        self.unit_keys: list[list[str]] = []
        self.unit_bytes: list[int] = []
        self.errors: dict[str, float] = {}
        manifest = self.folder / MANIFEST
        if manifest.is_file():
            self._open(manifest)
        else:
            if self.folder.exists():
                shutil.rmtree(self.folder)  # a folder killed before its first manifest holds nothing to keep
            self.folder.mkdir(parents=True)
            self._write_manifest()

    def _open(self, manifest: Path) -> None:
        try:
            d = json.loads(manifest.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"resume state {manifest} is unreadable ({e}); delete {self.folder} "
                                  "(or pass --overwrite) to start over") from None
        if d.get("format") != STATE_FORMAT or d.get("version") != STATE_VERSION:
            raise CheckpointError(f"{manifest} is not a polyquant streaming resume state (version {STATE_VERSION})")
        diffs = _diff(d.get("args", {}), self.args, "")
        diffs += _diff(d.get("source", {}), self.source, "source file ")
        if d.get("units") != self.units:
            diffs.append("the unit plan (module layout) changed")
        if diffs:
            raise ResumeMismatch(f"the resume state {self.folder} was left by a different run: "
                                 f"{'; '.join(diffs[:6])}{' ...' if len(diffs) > 6 else ''}. Rerun with the "
                                 "same arguments to resume, or pass --overwrite to discard it and start over")
        self.done = int(d["done"])
        self.unit_keys, self.unit_bytes = d["unit_keys"][:self.done], d["unit_bytes"][:self.done]
        self.errors = dict(d.get("errors", {}))
        for i in range(self.done):
            for p in (self.folder / self.shards[i], self.summary_path(i)):
                if not p.is_file():
                    raise CheckpointError(f"resume state {self.folder} counts {self.done} units done but {p.name} "
                                          "is missing; delete it (or pass --overwrite) to start over")
        for p in self.folder.iterdir():  # files of a unit that was not finished, temporary files
            if p.name.endswith(".tmp"):
                p.unlink()

    def _write_manifest(self) -> None:
        d = {"format": STATE_FORMAT, "version": STATE_VERSION, "args": self.args, "source": self.source,
             "units": self.units, "shards": self.shards, "done": self.done, "unit_keys": self.unit_keys,
             "unit_bytes": self.unit_bytes, "errors": self.errors}
        atomic_file(self.folder / MANIFEST, lambda p: p.write_text(json.dumps(d, indent=1, sort_keys=True)))

    def summary_path(self, i: int) -> Path:
        return self.folder / f"summary-{i:05d}.safetensors"

    def finish_unit(self, i: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                    summary: tuple[dict[str, torch.Tensor], dict[str, str]],
                    calib: dict[str, torch.Tensor] | None, errors: dict[str, float]) -> None:
        """Write unit ``i``'s shard, its summary and the calibration state, then count it done."""
        from safetensors.torch import save_file
        if i != self.done:
            raise AssertionError(f"unit {i} finished out of order (done: {self.done})")
        atomic_file(self.folder / self.shards[i], lambda p: write_safetensors_file(p, tensors, metadata))
        st, sm = summary
        atomic_file(self.summary_path(i), lambda p: save_file(st, str(p), metadata=sm))
        if calib is not None:  # the state *before* unit i + 1: a kill before the manifest leaves it unused
            atomic_file(self._calib_path(i + 1), lambda p: save_file(calib, str(p)))
        self.unit_keys.append(sorted(tensors))
        self.unit_bytes.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        self.errors.update(errors)
        self.done = i + 1
        self._write_manifest()
        for p in self.folder.glob("calibration-state-*.safetensors"):
            if p != self._calib_path(self.done):
                p.unlink()

    def _calib_path(self, i: int) -> Path:
        return self.folder / f"calibration-state-{i:05d}.safetensors"

    def calibration_state(self) -> dict[str, torch.Tensor] | None:
        """The calibration state saved before unit :attr:`done` (None when there is none)."""
        from safetensors.torch import load_file
        p = self._calib_path(self.done)
        return load_file(str(p)) if p.is_file() else None

    def summary(self, i: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        from safetensors import safe_open
        p = self.summary_path(i)
        with safe_open(str(p), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})

    def mark_assembled(self) -> None:
        atomic_file(self.folder / ASSEMBLED, lambda p: p.write_text("the checkpoint was assembled from this state\n"))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
