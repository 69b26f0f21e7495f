"""The shape of the feature cache: `Features`, one modality's frozen features (a batch's tensors, or a cached
split's memory maps), and `read_rows`, which reads rows of a cached split without mapping them."""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import numpy as np
import torch

class Features(NamedTuple):
    """One modality's frozen features: tensors for a batch, or numpy memmaps for a cached dataset."""
    pooled: torch.Tensor  # N×D
    tokens: torch.Tensor  # N×T×D (float16 on disk)
    mask: torch.Tensor  # N×T bool, True where a token is real (text is padded)

    def batch(self, index, device="cpu") -> "Features":
        """Rows `index` as float32 tensors on `device`; a memmap is read from disk only here (read_rows)."""
        pooled, tokens, mask = (torch.as_tensor(read_rows(a, index)) for a in self)
        return Features(pooled.to(device, torch.float32), tokens.to(device, torch.float32), mask.to(device))

    def mean_token(self, batch_size: int = 1024) -> torch.Tensor:
        """T×D: the mean feature of each token position over the real tokens of every row, read batch by
        batch (a cached split is a memory map)."""
        total, count = 0.0, 0.0
        for start in range(0, len(self.pooled), batch_size):
            part = self.batch(np.arange(start, min(start + batch_size, len(self.pooled))))
            weight = part.mask.to(torch.float32)[..., None]
            total, count = total + (part.tokens * weight).sum(0), count + weight.sum(0)
        return total / count.clamp(min=1)


def read_rows(array, index):
    """array[index]. A whole .npy memmap (as np.load opens a cache file) is read with one os.preadv per run of
    consecutive rows, in file order: the rows never enter this process's memory map (a memmap's pages count as
    resident once touched, so reading a cache larger than memory through it would fill the resident set)."""
    if not (isinstance(array, np.memmap) and array.flags.c_contiguous
            and array.offset + array.nbytes == os.path.getsize(array.filename)):  # a view of part of a file
        return array[index]
    index = np.asarray(index)
    order = np.argsort(index, kind="stable")
    rows = index[order]
    out = np.empty((len(rows), *array.shape[1:]), array.dtype)
    row_bytes = array.itemsize * math.prod(array.shape[1:])
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    with open(array.filename, "rb", buffering=0) as file:
        for start, stop in zip([0, *breaks], [*breaks, len(rows)]):
            buffer = memoryview(out[start:stop]).cast("B")
            if os.preadv(file.fileno(), [buffer], array.offset + int(rows[start]) * row_bytes) != len(buffer):
                raise OSError(f"{array.filename} ended before row {rows[stop - 1]}: the file was truncated; "
                              "delete its cache folder and it is rebuilt")
    if (order == np.arange(len(order))).all():
        return out
    result = np.empty_like(out)
    result[order] = out
    return result
