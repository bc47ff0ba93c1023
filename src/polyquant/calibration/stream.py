"""The sequential driver one step at a time, for callers that hold only one block in memory
(streaming quantization, :mod:`polyquant.formats.stream`).

:func:`~polyquant.calibration.driver.run_sequential` walks a model that is in memory. A
:class:`SequentialRun` does the same computation (the same capture, the same per-block
processing, the same tail) but lets the caller load each block before :meth:`SequentialRun.block`
and release it afterwards; the block's input activations (``inputs``) are the only state carried
from one block to the next, and a caller can save them and restore them to resume at a later
block. The results are those of ``run_sequential`` on the same model, bit for bit.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from polyquant.calibration.capture import _capture
from polyquant.calibration.data import as_samples
from polyquant.calibration.driver import _process_block, _process_tail, resolve_autocast
from polyquant.calibration.stats import collector_factory
from polyquant.nn.select import find_blocks

__all__ = ["SequentialRun"]


class SequentialRun:
    """One calibration run over ``targets`` (``(name, Linear)`` pairs of ``model``), stepped by the caller.

    Order of calls: :meth:`capture` (needs whatever runs before the first block and block 0 itself
    in memory), then :meth:`block` for ``i`` in ``range(start, n_run)`` with block ``i`` in memory,
    then :meth:`tail` when :attr:`tail_names` is not empty (needs the whole forward outside the
    blocks). ``inputs`` may be replaced after :meth:`capture` to resume at a later block.
    """

    def __init__(self, model: nn.Module, spec, config, targets: list[tuple[str, nn.Module]], samples: Any,
                 autocast: torch.dtype | str | None = "auto", device: str | torch.device | None = None) -> None:
        self.model, self.spec, self.config = model, spec, config
        self.samples = as_samples(samples)
        self.prefix, self.blocks = find_blocks(model)
        n = len(self.blocks)
        self.per_block: list[dict[str, nn.Module]] = [{} for _ in range(n)]
        self.tail_names: list[str] = []
        for name, _ in targets:
            idx, _, rel = name[len(self.prefix) + 1:].partition(".") if name.startswith(self.prefix + ".") \
                else ("", "", "")
            if idx.isdigit() and int(idx) < n and rel:
                self.per_block[int(idx)][rel] = None  # the module itself is looked up when the block is loaded
            else:
                self.tail_names.append(name)
        self.factory = collector_factory(spec)
        self.true_seq = bool(getattr(config, "true_sequential", True))
        self.device = torch.device(device) if device is not None else None
        self.autocast = resolve_autocast(autocast, model, self.device)
        # blocks after the last one with targets matter only to Linears outside the blocks
        self.n_run = n if self.tail_names else 1 + max((i for i in range(n) if self.per_block[i]), default=-1)
        self.inputs: list[torch.Tensor] = []
        self._recs: list[list] = []
        self._struct = None

    def capture(self) -> None:
        """Block 0's inputs and every block's call arguments (one forward per sample)."""
        self.inputs, self._recs, self._struct = _capture(self.model, self.blocks[:max(self.n_run, 1)],
                                                         self.samples, self.device)

    def block(self, i: int) -> dict[str, float]:
        """Quantize block ``i``'s targets (the block must be in memory): its Linears become
        ``QuantLinear`` and :attr:`inputs` become the block's outputs. Returns the per-Linear errors."""
        blk = self.blocks[i]
        lins = {rel: blk.get_submodule(rel) for rel in self.per_block[i]}
        return _process_block(self.model, blk, i, lins, self.spec, self.config, self.factory, self.true_seq,
                              self.inputs, [r[i] for r in self._recs], self.device, None, self.autocast)

    def tail(self) -> dict[str, float]:
        """Quantize the targets outside the blocks (after the last block)."""
        tail = {n: self.model.get_submodule(n) for n in self.tail_names}
        return _process_tail(self.model, self.blocks, tail, self.spec, self.config, self.factory, self.samples,
                             self.inputs, self._struct)

    @property
    def autocast_name(self) -> str | None:
        return str(self.autocast).replace("torch.", "") if self.autocast else None
