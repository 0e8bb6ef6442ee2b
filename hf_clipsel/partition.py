"""Cells of a large group of rows, for a search that compares each row with its own cell only (the duplicate search,
hf_clipsel.duplicates): its time is then linear in the rows, whatever the group's size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Spherical k-means iterations.
_ITERATIONS = 10
# Cosines held at once while assigning rows to centres: 2**24 float32 = 64 MiB.
_BLOCK_ELEMENTS = 1 << 24


def cells(vectors: Tensor, max_rows: int) -> list[Tensor]:
    """Positions of the rows of ``vectors`` (``[n, s]`` unit vectors, or zeros) in cells of about ``max_rows`` rows,
    for a search that compares a row with its own cell only: seeded spherical k-means (SemDeDup's partition) with
    ``ceil(n / max_rows)`` centres, a cell split again while it holds more than ``max_rows`` rows and splitting still
    divides it (identical rows, e.g. blank images, stay together). Near-duplicates (cosine near 1) share a cell unless
    they sit on either side of a boundary (measured: recipes/benchmarks/explore_duplicate_cells.py). One cell when
    ``n <= max_rows``."""
    num_rows = vectors.shape[0]
    if num_rows <= max_rows:
        return [torch.arange(num_rows)]
    count = -(-num_rows // max_rows)
    generator = torch.Generator().manual_seed(0)  # the same cells every run: the same groups
    centres = vectors[torch.randperm(num_rows, generator=generator)[:count]]
    block = max(1, _BLOCK_ELEMENTS // count)
    for _ in range(_ITERATIONS):
        nearest = torch.cat([(vectors[start : start + block] @ centres.T).argmax(dim=1)
                             for start in range(0, num_rows, block)])  # fmt: skip
        centres = F.normalize(torch.zeros_like(centres).index_add_(0, nearest, vectors), dim=-1)
    found = []
    for cell in ((nearest == centre).nonzero().squeeze(1) for centre in range(count)):
        if max_rows < cell.numel() < num_rows:
            found.extend(cell[part] for part in cells(vectors[cell], max_rows))
        elif cell.numel():
            found.append(cell)
    return found
