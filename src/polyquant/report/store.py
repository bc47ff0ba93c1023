"""The results store of a sweep: one JSON record per run, appended to ``runs.jsonl`` as soon as
the run finishes, plus ``results.json`` (the current sweep, rewritten atomically).

A record is keyed by ``key`` (a hash of the run's exact config and the evaluation settings), so
an interrupted sweep resumes without redoing finished runs, and a sweep with other settings never
reuses them. A torn last line (the process was killed mid-write) is ignored on reading.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["ResultsStore", "atomic_write_bytes", "atomic_write_text", "to_jsonable"]

log = logging.getLogger(__name__)


def to_jsonable(obj: Any) -> Any:
    """Plain JSON values: non-finite floats become None; tensors, numpy scalars, paths,
    dataclasses and tuples become their plain equivalents."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "tolist"):  # torch tensors, numpy arrays and scalars
        return to_jsonable(obj.tolist())
    if hasattr(obj, "item"):
        return to_jsonable(obj.item())
    return str(obj)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``:
    readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


class ResultsStore:
    """Records of one output folder.

    Args:
        folder: the sweep's output folder (created at the first write).
    """

    JSONL = "runs.jsonl"
    RESULTS = "results.json"

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"output {self.folder} exists and is not a folder")

    @property
    def jsonl_path(self) -> Path:
        return self.folder / self.JSONL

    @property
    def results_path(self) -> Path:
        return self.folder / self.RESULTS

    def records(self) -> list[dict[str, Any]]:
        """Every record appended so far, oldest first (unreadable lines are skipped with a warning)."""
        if not self.jsonl_path.is_file():
            return []
        out = []
        for i, line in enumerate(self.jsonl_path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d is not a complete record (interrupted write?); ignored", self.jsonl_path, i)
                continue
            if isinstance(rec, dict) and "key" in rec:
                out.append(rec)
        return out

    def latest(self) -> dict[str, dict[str, Any]]:
        """The newest record for each key."""
        return {rec["key"]: rec for rec in self.records()}

    def finished(self) -> dict[str, dict[str, Any]]:
        """The newest record of each key whose run succeeded (failed runs are tried again)."""
        return {k: r for k, r in self.latest().items() if r.get("status") == "ok"}

    def append(self, record: dict[str, Any]) -> None:
        """Append one record durably (one write, flushed and fsynced)."""
        if "key" not in record:
            raise ValueError("a record needs a 'key'")
        line = json.dumps(to_jsonable(record), sort_keys=True, allow_nan=False) + "\n"
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.jsonl_path
        if path.is_file() and path.stat().st_size:
            with open(path, "rb") as f:  # a torn last line must not swallow this record
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def write_results(self, payload: dict[str, Any]) -> Path:
        """Atomically (re)write ``results.json``."""
        text = json.dumps(to_jsonable(payload), indent=2, sort_keys=False, allow_nan=False) + "\n"
        return atomic_write_text(self.results_path, text)
