"""Sparse outliers: a CSR matrix of float corrections added to a dense dequantized weight.

SpQR keeps the few weights that quantize worst in 16-bit floats outside the dense grid; the
layout is a CSR matrix ``S`` of the weight's shape, and the layer's weight is
``dequantize(dense) + S`` (the outlier value is *added*: the dense code at that position still
counts). Rows are output features, columns input features.

=============  ======================  =========================================
tensor         shape / dtype           meaning
=============  ======================  =========================================
row_offsets    ``[out + 1]`` int32     entries of row ``r`` are ``row_offsets[r]:row_offsets[r+1]``
cols           ``[nnz]`` int16/int32   input column of each entry (int16 while ``in <= 32767``)
values         ``[nnz]`` float16/32    the correction added at (row, col)
=============  ======================  =========================================
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SparseOutliers"]


@dataclass
class SparseOutliers:
    """CSR corrections for an ``[out, in]`` weight (see the module docstring)."""

    shape: tuple[int, int]
    row_offsets: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        out, inp = self.shape
        ro, c, v = self.row_offsets, self.cols, self.values
        if ro.dim() != 1 or ro.numel() != out + 1:
            raise ValueError(f"outliers row_offsets must have {out + 1} entries for {out} rows, got {tuple(ro.shape)}")
        if ro.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"outliers row_offsets must be int32/int64, got {ro.dtype}")
        if c.dim() != 1 or v.dim() != 1 or c.numel() != v.numel():
            raise ValueError(f"outliers cols {tuple(c.shape)} and values {tuple(v.shape)} must be 1-D of equal length")
        if c.dtype not in (torch.int16, torch.int32, torch.int64):
            raise ValueError(f"outliers cols must be an integer tensor, got {c.dtype}")
        if not v.is_floating_point():
            raise ValueError(f"outliers values must be floats, got {v.dtype}")
        if ro.numel() and (int(ro[0]) != 0 or int(ro[-1]) != c.numel()):
            raise ValueError(f"outliers row_offsets must run from 0 to nnz={c.numel()}, got "
                             f"{int(ro[0])}..{int(ro[-1])}")
        if ro.numel() > 1 and bool((ro[1:] < ro[:-1]).any()):
            raise ValueError("outliers row_offsets must be non-decreasing")
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= inp):
            raise ValueError(f"outliers cols must lie in [0, {inp}), got [{int(c.min())}, {int(c.max())}]")

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_dense_mask(cls, values: torch.Tensor, mask: torch.Tensor,
                        dtype: torch.dtype = torch.float16) -> "SparseOutliers":
        """The entries of ``values [out, in]`` where ``mask`` is true, row-major."""
        out, inp = values.shape
        rows, cols = mask.nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=out)
        ro = torch.zeros(out + 1, dtype=torch.int32)
        ro[1:] = counts.cumsum(0).to(torch.int32)
        cdt = torch.int16 if inp <= 32767 else torch.int32
        return cls((out, inp), ro, cols.to(cdt), values[rows, cols].to(dtype))

    @classmethod
    def empty(cls, shape: tuple[int, int], dtype: torch.dtype = torch.float16) -> "SparseOutliers":
        out, inp = shape
        cdt = torch.int16 if inp <= 32767 else torch.int32
        return cls(shape, torch.zeros(out + 1, dtype=torch.int32), torch.zeros(0, dtype=cdt),
                   torch.zeros(0, dtype=dtype))

    # -- views ----------------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return int(self.cols.numel())

    @property
    def fraction(self) -> float:
        """Share of the weight's entries held as outliers."""
        return self.nnz / max(1, self.shape[0] * self.shape[1])

    def rows(self) -> torch.Tensor:
        """Row index of each entry (COO rows), int64."""
        counts = (self.row_offsets[1:] - self.row_offsets[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.shape[0], device=counts.device), counts)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = torch.zeros(self.shape, dtype=dtype, device=self.values.device)
        w[self.rows(), self.cols.long()] = self.values.to(dtype)
        return w

    def add_to(self, w: torch.Tensor) -> torch.Tensor:
        """``w += S`` in place (entries are unique, so index_put accumulation is exact)."""
        w.index_put_((self.rows().to(w.device), self.cols.long().to(w.device)), self.values.to(w.dtype),
                     accumulate=True)
        return w

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ S^T`` for ``x [..., in]`` -> ``[..., out]`` (float32 accumulation)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).float()
        y = torch.zeros(x2.shape[0], self.shape[0], dtype=torch.float32, device=x.device)
        if self.nnz:
            contrib = x2[:, self.cols.long()] * self.values.float()
            y.index_add_(1, self.rows().to(x.device), contrib)
        return y.reshape(*lead, self.shape[0]).to(x.dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.row_offsets, self.cols, self.values))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"row_offsets": self.row_offsets, "cols": self.cols, "values": self.values}

    def to(self, device: torch.device | str) -> "SparseOutliers":
        return SparseOutliers(self.shape, self.row_offsets.to(device), self.cols.to(device), self.values.to(device))
