"""A float model read lazily from its safetensors folder: the skeleton on the meta device, the
tensors of one module at a time read when asked (positioned reads of the safetensors data) and released again.

:class:`LazyModel` is what streaming quantization (:mod:`polyquant.formats.stream`) walks: it
materializes the embeddings, each decoder layer and the head in turn (plain positioned reads of
each tensor's bytes, see :meth:`LazyModel.read`), so the memory held is one
of them at a time, whatever the depth. Modules outside the repeated blocks can also be
materialized on demand: :meth:`LazyModel.autoload` hooks them so that the first forward through
one reads its tensors (the calibration capture runs the embeddings that way).

Every tensor read goes through :meth:`LazyModel.read` (tests count them).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from polyquant.formats.accounting import _account_for_tensors, _tied_keys
from polyquant.formats.base import CheckpointError
from polyquant.formats.io import SafetensorsIndex, read_config

__all__ = ["LazyModel"]


def _owner(key: str) -> tuple[str, str]:
    mod, _, leaf = key.rpartition(".")
    return mod, leaf


class LazyModel:
    """The model of a float safetensors folder, on the meta device until parts are materialized.

    Attributes:
        folder: the source folder.
        model: the skeleton (transformers class from config.json; parameters on the meta device,
            non-persistent buffers such as rotary frequencies computed as usual).
        index: the folder's :class:`~polyquant.formats.io.SafetensorsIndex`.
        dtype: float tensors are converted to it when read (as ``load_model(dtype=)`` does).
        source_key: state-dict key -> the key it is stored under (a tied head reads the embedding).
    """

    def __init__(self, folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 trust_remote_code: bool = False) -> None:
        from polyquant.formats.api import _skeleton
        self.folder = Path(folder)
        self.config_dict = read_config(self.folder)
        if self.config_dict.get("quantization_config"):
            raise CheckpointError(f"{self.folder} is a quantized checkpoint; streaming reads float models")
        self.index = SafetensorsIndex(self.folder)
        self.model = _skeleton(self.folder, self.config_dict, trust_remote_code)
        self.model.eval()
        _account_for_tensors(self.folder, self.model, self.index, [])  # every tensor, before any is read
        self.dtype = dtype
        self.state_keys = list(self.model.state_dict())
        stored = self.index.keys()
        self.source_key: dict[str, str] = {}
        by_id: dict[int, list[str]] = {}
        for k, t in self.model.state_dict(keep_vars=True).items():
            by_id.setdefault(id(t), []).append(k)
        ties = getattr(self.model, "all_tied_weights_keys", None) or getattr(self.model, "_tied_weights_keys", None)
        ties = ties if isinstance(ties, dict) else {}
        for group in by_id.values():
            src = next((k for k in group if k in stored), None)
            for k in group:
                if k not in stored and src is None and ties.get(k) in stored:
                    self.source_key[k] = ties[k]
                    continue
                if k in stored:
                    self.source_key[k] = k
                elif src is not None:
                    self.source_key[k] = src
                else:
                    raise CheckpointError(f"{self.folder}: no tensor for {k!r}")
        self.tied = _tied_keys(self.model) if getattr(self.model.config, "tie_word_embeddings", False) else set()
        self.held: dict[str, int] = {}  # key -> bytes materialized now
        self._file_offsets: dict[Path, dict[str, int]] = {}
        self._hooks: list = []
        self._stack = None
        self._load_generation_config()

    def _load_generation_config(self) -> None:
        """The generation config ``from_pretrained`` would give: the folder's file, else one read from its
        config.json (not the skeleton's ``from_model_config``, which adds ``output_attentions`` /
        ``output_hidden_states``: a streamed checkpoint's generation_config.json would then differ)."""
        if getattr(self.model, "generation_config", None) is None:
            return
        from transformers import GenerationConfig
        path = self.folder / "generation_config.json"
        try:
            if path.is_file():
                self.model.generation_config = GenerationConfig.from_pretrained(str(self.folder))
            else:
                self.model.generation_config = GenerationConfig.from_pretrained(
                    str(self.folder), config_file_name="config.json", _from_model_config=True)
        except Exception:  # noqa: BLE001 - transformers keeps the one from the model config then
            pass

    # -- reading ------------------------------------------------------------------------------
    def __enter__(self) -> "LazyModel":
        self.index.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.remove_autoload()
        self.index.__exit__(*exc)

    def _offsets(self, file: Path) -> dict[str, int]:
        """Absolute byte offset of each tensor of ``file`` (from its header, checked by the index)."""
        got = self._file_offsets.get(file)
        if got is None:
            with open(file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            got = {k: 8 + n + int(v["data_offsets"][0]) for k, v in header.items() if k != "__metadata__"}
            self._file_offsets[file] = got
        return got

    def read(self, key: str) -> torch.Tensor:
        """The tensor of state-dict key ``key`` from the folder (float tensors in :attr:`dtype`).

        Read with a positioned ``read`` into a fresh tensor rather than from safetensors' memory
        map: mapped pages that were touched count in the process's resident memory for as long as
        the file stays open, so a memory map of a model bigger than RAM is not "one layer"."""
        info = self.index.tensors[self.source_key[key]]
        dtype = info.torch_dtype
        if dtype is None:
            t = self.index.get(self.source_key[key])
        else:
            t = torch.empty(info.shape, dtype=dtype)
            buf = t.reshape(-1).view(torch.uint8).numpy()
            with open(info.file, "rb", buffering=0) as f:
                f.seek(self._offsets(info.file)[info.name])
                got = f.readinto(buf) if buf.size else 0
            if got != buf.size:
                raise CheckpointError(f"{info.file}: tensor {info.name!r} is truncated ({got} of {buf.size} bytes)")
        return t.to(self.dtype) if t.is_floating_point() and t.dtype != self.dtype else t

    def keys_under(self, prefix: str) -> list[str]:
        """State-dict keys of module ``prefix`` ('' for all)."""
        if not prefix:
            return list(self.state_keys)
        return [k for k in self.state_keys if k.startswith(prefix + ".")]

    def _assign(self, key: str, value: torch.Tensor) -> None:
        mod_name, leaf = _owner(key)
        mod = self.model.get_submodule(mod_name)
        if leaf in mod._parameters:
            mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        elif leaf in mod._buffers:
            mod._buffers[leaf] = value
        else:
            raise KeyError(key)

    def _current(self, key: str):
        mod_name, leaf = _owner(key)
        try:
            mod = self.model.get_submodule(mod_name)
        except AttributeError:
            return None
        return mod._parameters.get(leaf, mod._buffers.get(leaf))

    def materialize(self, keys: Iterable[str]) -> None:
        """Read ``keys`` into the skeleton (those already in memory are left as they are)."""
        for k in keys:
            cur = self._current(k)
            if cur is not None and not cur.is_meta:
                continue
            t = self.read(k)
            self._assign(k, t)
            self.held[k] = t.numel() * t.element_size()

    def release(self, keys: Iterable[str]) -> None:
        """Put ``keys`` back on the meta device (their memory is freed once nothing else holds it)."""
        for k in keys:
            cur = self._current(k)
            if cur is not None and not cur.is_meta:
                self._assign(k, torch.empty(cur.shape, dtype=cur.dtype, device="meta"))
            self.held.pop(k, None)

    def held_bytes(self) -> int:
        return sum(self.held.values())

    # -- on-demand loading -------------------------------------------------------------------
    def autoload(self, exclude_prefix: str) -> None:
        """Hook every module outside ``exclude_prefix`` (the blocks) that owns parameters so that
        its first forward materializes them (e.g. the embeddings during the calibration capture)."""
        for name, mod in self.model.named_modules():
            if not name or name == exclude_prefix or name.startswith(exclude_prefix + "."):
                continue
            own = [f"{name}.{leaf}" for leaf in list(mod._parameters) + list(mod._buffers)
                   if f"{name}.{leaf}" in self.source_key]
            if own:
                self._hooks.append(mod.register_forward_pre_hook(lambda m, a, own=own: self.materialize(own)))

    def remove_autoload(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
