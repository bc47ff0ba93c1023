"""Resumable calibration: after each block the driver saves that block's quantized weights
(``block_NNNN.safetensors``) and a small ``state.json`` (what run this is, how many blocks are done).
Both are written to a temporary name and renamed, so a crash never leaves a half-written file.

A restarted run with the same model, method config, targets and calibration data loads the
finished blocks instead of recomputing them; any other run refuses the folder.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from polyquant.tensor.quantized_weight import QuantizedWeight

__all__ = ["ResumeState", "run_key"]

STATE_FORMAT = "polyquant-calibration-resume"
STATE_VERSION = 1


def _sha(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:32]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return str((t.dtype, tuple(t.shape))).encode() + t.view(torch.uint8).numpy().tobytes()


def run_key(model: torch.nn.Module, method: str, config: dict[str, Any], targets: list[tuple[str, Any]],
            samples: list[dict[str, torch.Tensor]]) -> dict[str, str]:
    """Fingerprints of what determines the result: method config, targets and model weights
    (names, shapes, first and last rows), calibration tokens."""
    cfg = _sha([method.encode(), json.dumps(config, sort_keys=True, default=str).encode()])
    parts = [type(model).__name__.encode()]
    for name, lin in targets:
        w = lin.weight
        parts += [name.encode(), _tensor_bytes(w[:1]), _tensor_bytes(w[-1:])]
    calib = _sha([_tensor_bytes(v) for s in samples for _, v in sorted(s.items())])
    return {"config": cfg, "model": _sha(parts), "calibration": calib}


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class ResumeState:
    """The resume folder of one calibration run."""

    def __init__(self, folder: str | os.PathLike, key: dict[str, str], n_blocks: int) -> None:
        self.folder = Path(folder).expanduser()
        self.key = dict(key)
        self.n_blocks = n_blocks
        self.blocks_done = 0
        self.folder.mkdir(parents=True, exist_ok=True)
        state = self.folder / "state.json"
        if state.is_file():
            try:
                d = json.loads(state.read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"resume state {state} is unreadable ({e}); delete the folder to start over") from e
            if d.get("format") != STATE_FORMAT or d.get("version") != STATE_VERSION:
                raise ValueError(f"{state} is not a polyquant calibration resume state (version {STATE_VERSION})")
            diff = [k for k in sorted(set(self.key) | set(d.get("key", {}))) if d.get("key", {}).get(k) != self.key.get(k)]
            if diff or d.get("n_blocks") != n_blocks:
                what = ", ".join(diff) or "number of blocks"
                raise ValueError(f"resume folder {self.folder} belongs to a different run ({what} changed); "
                                 "use another folder or delete it to start over")
            self.blocks_done = int(d.get("blocks_done", 0))
            for i in range(self.blocks_done):
                if not self._block_path(i).is_file():
                    raise ValueError(f"resume folder {self.folder} says {self.blocks_done} blocks are done "
                                     f"but {self._block_path(i).name} is missing; delete the folder to start over")

    def _block_path(self, i: int) -> Path:
        return self.folder / f"block_{i:04d}.safetensors"

    def save_block(self, i: int, weights: dict[str, QuantizedWeight], errors: dict[str, float],
                   floats: dict[str, torch.Tensor] | None = None) -> None:
        """Save block ``i``'s quantized weights, then mark it done (both atomically). ``floats``:
        float state-dict entries of the block that the method changed (e.g. AWQ's folded norms)."""
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {}
        for name, qw in weights.items():
            meta[name] = {"qtype": qw.qtype, "shape": list(qw.shape), "block": list(qw.block),
                          "fields": sorted(qw.tensors())}
            for field, t in qw.tensors().items():
                tensors[f"{name}::{field}"] = t.detach().cpu().contiguous()
        for key, t in (floats or {}).items():
            tensors[f"float::{key}"] = t.detach().cpu().contiguous()
        metadata = {"layers": json.dumps(meta), "errors": json.dumps(errors)}
        _atomic_write_bytes(self._block_path(i), lambda p: save_file(tensors, str(p), metadata=metadata))
        self.blocks_done = i + 1
        state = {"format": STATE_FORMAT, "version": STATE_VERSION, "key": self.key, "n_blocks": self.n_blocks,
                 "blocks_done": self.blocks_done}
        _atomic_write_bytes(self.folder / "state.json", lambda p: p.write_text(json.dumps(state, indent=1)))

    def load_floats(self, i: int) -> dict[str, torch.Tensor]:
        """The float state-dict entries saved with block ``i`` (empty when none were)."""
        tensors = load_file(str(self._block_path(i)))
        return {k[len("float::"):]: v for k, v in tensors.items() if k.startswith("float::")}

    def load_block(self, i: int) -> tuple[dict[str, QuantizedWeight], dict[str, float]]:
        from safetensors import safe_open
        path = self._block_path(i)
        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
        tensors = load_file(str(path))
        try:
            meta = json.loads(md["layers"])
            errors = json.loads(md.get("errors", "{}"))
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path} has no valid layer metadata; delete the resume folder to start over") from e
        out = {}
        for name, m in meta.items():
            t = {f: tensors[f"{name}::{f}"] for f in m["fields"]}
            # the inverse of tensors(): extras, code books and sparse outliers (SpQR) come back too
            out[name] = QuantizedWeight.from_tensors(m["qtype"], tuple(m["shape"]), tuple(m["block"]), t)
        return out, errors
