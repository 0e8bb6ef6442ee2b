"""The projected image features of a run, out of core: written once, block by block, and read in blocks.

The score stage needs the ``[N, d]`` image features twice: row by row (alignment, class posterior, the predicted
label) and class by class (diversity's kNN, the ``moderate`` selector). At ImageNet-21k's size (13M rows, 768-d)
that matrix is 37 GiB, so it is never held: :class:`FeatureStore` keeps it in one float32 file (or float16, half
the disk and the reads: ``ScoringConfig.feature_store_dtype``; it is read back as float32, so every score computes in
float32 on the rounded values), written once as the projection runs over the embedding cache, with its rows **sorted
by class** (by label, then row id), so that a class is one contiguous read and a pass over all rows is a sequential
one. Memory is bounded by a block, not by N.

A store holds rows of any number type: the duplicate score's uint8 pixel thumbnails (64 bytes a row, 0.8 GiB at
13M rows) sit in a second store that shares the features' order (``FeatureStore(features, 64, path,
dtype=np.uint8)``), so that they are read class by class too, not held through all of scoring.

Reads are explicit (``os.preadv`` into a fresh buffer), writes are ``os.pwrite``: the file is never memory-mapped,
so its pages live in the kernel's page cache and are not counted in (or held by) the process's resident memory,
which :mod:`recipes/benchmarks/bench_selection.py` ``--parts scale`` measures. A store built without a path holds
the same layout in one array (small inputs, tests): the same code path, the block reads become slices.

Work is shared out by :class:`Share` (this process's index, the process count and an all-gather): row blocks
round-robin, classes by the longest-processing-time rule on their kNN cost (rows squared), so that several
Accelerate processes split scoring as they split embedding, and each process ends with every row's values.
"""

from __future__ import annotations

import heapq
import logging
import os
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

# The folder of a run's cache (hf_clipsel.context.RunContext.cache_dir) that holds its feature stores while it runs.
FEATURES_DIR = "features"
# Bytes of features per block of a pass over every row (FeatureStore.block_rows: 16,384 rows at 768-d; the
# projection's pass over the cached vectors too). A pass holds a
# few such arrays at once (the read, a normalised copy, a gathered one), a fixed part of the peak memory, so blocks are
# no larger; and no smaller than glibc malloc's largest mmap threshold (32 MiB): arrays under it come from malloc's
# heap, which keeps them resident after they are freed (24 MiB blocks left 0.5 GiB more resident after a pass over
# 300k rows than 96 MiB ones, which go back to the system when freed).
BLOCK_BYTES = 48 * 1024**2
# Rows read at once when gathering scattered rows whose storage positions are close: reading a gap of up to this
# many unwanted rows is cheaper than another read call.
_GAP_ROWS = 64


def rows_per_block(dim: int, itemsize: int = 4) -> int:
    """Rows of ``dim`` values of ``itemsize`` bytes (float32 features by default) in one block of a pass
    (:data:`BLOCK_BYTES`, whatever the width)."""
    return max(1, BLOCK_BYTES // (itemsize * dim))


def _gather_locally(part: list) -> list:
    return list(part)


@dataclass(frozen=True)
class Share:
    """This process's part of the work and how the parts come together.

    Attributes:
        process_index: this process, in ``[0, num_processes)``.
        num_processes: processes sharing the work, ``>= 1``.
        gather: an all-gather of Python lists: every process passes its list and gets the concatenation of all of
            them (accelerate's ``gather_object``); one process: the list itself.
    """

    process_index: int = 0
    num_processes: int = 1
    gather: Callable[[list], list] = field(default=_gather_locally, compare=False)


def class_assignment(costs: np.ndarray, num_processes: int) -> list[list[int]]:
    """Longest processing time first: the classes (indices of ``costs``), costliest first, each to the process with
    the least cost so far. Returns one list of class indices per process (within 4/3 of the best split)."""
    loads = [(0.0, process) for process in range(num_processes)]
    assigned: list[list[int]] = [[] for _ in range(num_processes)]
    for label in np.argsort(-np.asarray(costs, dtype=np.float64), kind="stable"):
        load, process = heapq.heappop(loads)
        assigned[process].append(int(label))
        heapq.heappush(loads, (load + float(costs[label]), process))
    return assigned


class FeatureStore:
    """``[N, d]`` float32 features (or rows of another ``dtype``), stored class-sorted in a file (or, without
    ``path``, in memory). A float16 store reads back as float32 (:attr:`read_dtype`).

    Args:
        labels: ``int[N]`` class of each row, ``>= 0`` (the store's order; rows whose label is unusable go to any
            class, e.g. 0, and are left out by the ``valid`` masks of the passes); or another store, whose order
            this one shares (the same arrays, not a copy: 8 bytes a row).
        dim: values a row, ``d >= 1``.
        path: the file (created, or opened by the other processes of a run, at ``N * d`` values); None: memory.
        owner: whether this store deletes the file when it is garbage (the process that created the name).
        dtype: the values' number type as stored. Reads give tensors of it, except a float narrower than float32
            (float16: half the disk and the reads of float32), which reads as float32 so that whoever computes on
            the features computes in float32, as with a float32 store.
    """

    def __init__(
        self,
        labels: np.ndarray | FeatureStore,
        dim: int,
        path: str | Path | None = None,
        owner: bool = True,
        dtype=np.float32,
    ):
        if isinstance(labels, FeatureStore):
            self.labels, self.num_rows = labels.labels, labels.num_rows
            self.order, self.position, self.class_starts = labels.order, labels.position, labels.class_starts
        else:
            self._sort(labels)
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        self.read_dtype = np.promote_types(self.dtype, np.float32) if self.dtype.kind == "f" else self.dtype
        self.path = None if path is None else Path(path)
        self.owner = owner
        self._row_bytes = self.dim * self.dtype.itemsize
        # A block as read: float16 rows become float32 ones, and a pass holds those (BLOCK_BYTES of them).
        self.block_rows = rows_per_block(self.dim, self.read_dtype.itemsize)
        if self.path is None:
            self._array = np.zeros((self.num_rows, self.dim), dtype=self.dtype)
            return
        self._array = None
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(self._fd, self.num_rows * self._row_bytes)  # the same size from every process: no data lost
        self._finalizer = weakref.finalize(self, _close, self._fd, self.path if owner else None)

    def _sort(self, labels: np.ndarray) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.ndim != 1 or (labels.size and labels.min() < 0):
            raise ValueError("the feature store's labels must be one non-negative class per row.")
        self.labels = labels
        self.num_rows = labels.shape[0]
        # Row ids in storage order (by label, then row id), each row's storage position, and each class's span; int32
        # below 2**31 rows: they stay in memory for the whole run, 8 bytes a row instead of 16 (handed out as int64).
        index_dtype = np.int32 if self.num_rows < 2**31 else np.int64
        self.order = np.argsort(labels, kind="stable").astype(index_dtype)
        self.position = np.empty_like(self.order)
        self.position[self.order] = np.arange(self.num_rows, dtype=index_dtype)
        self.class_starts = np.concatenate([[0], np.cumsum(np.bincount(labels))]).astype(np.int64)

    @classmethod
    def from_tensor(cls, features: torch.Tensor, labels: np.ndarray | None = None) -> FeatureStore:
        """An in-memory store of ``features`` ([N, d], row order), sorted by ``labels`` (default: one class)."""
        array = np.asarray(features.detach().to(torch.float32).cpu().numpy())
        store = cls(np.zeros(len(array), np.int64) if labels is None else np.clip(labels, 0, None), array.shape[1])
        store.write(0, array)
        return store

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_rows, self.dim)

    def __len__(self) -> int:
        return self.num_rows

    # ----- writing

    def write(self, start: int, block: np.ndarray) -> None:
        """Store rows ``start .. start + len(block)`` (row order) of the features: ``block`` is ``[b, d]``."""
        given = np.asarray(block)
        with np.errstate(over="ignore"):  # a narrowing that overflows is refused below, with the setting to change
            block = np.ascontiguousarray(given, dtype=self.dtype)
        if block.ndim != 2 or block.shape[1] != self.dim or start + len(block) > self.num_rows:
            raise ValueError(f"a block of shape {block.shape} does not fit rows {start}.. of a {self.shape} store.")
        if self.dtype.kind == "f" and given.dtype.itemsize > self.dtype.itemsize and _overflowed(given, block):
            raise ValueError(
                f"features beyond {self.dtype}'s range (|x| > {float(np.finfo(self.dtype).max):g}) do not fit a "
                f"{self.dtype} feature store; set feature_store_dtype float32."
            )
        destination = self.position[start : start + len(block)].astype(np.int64)
        if self._array is not None:
            self._array[destination] = block
            return
        # Rows of one class within consecutive row ids have consecutive positions: one write per class run.
        by_position = np.argsort(destination, kind="stable")
        sorted_positions = destination[by_position]
        breaks = np.flatnonzero(np.diff(sorted_positions) != 1) + 1
        for run in np.split(np.arange(len(block)), breaks):
            rows = block[by_position[run]]
            _write_all(self._fd, memoryview(rows).cast("B"), int(sorted_positions[run[0]]) * self._row_bytes)

    def flush(self) -> None:
        """Push this process's writes to the file (``fsync``): before a barrier, so that the others can read them."""
        if self._array is None:
            os.fsync(self._fd)

    def reopen(self) -> None:
        """Open the file again, after the other processes flushed their writes: a filesystem shared by several
        machines (NFS, close-to-open consistency) shows a file's writes to those who open it afterwards."""
        if self._array is None:
            self._finalizer.detach()
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_RDWR)
            self._finalizer = weakref.finalize(self, _close, self._fd, self.path if self.owner else None)

    # ----- reading

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows at storage positions ``[start, stop)`` as a ``[stop - start, d]`` tensor of :attr:`read_dtype` (a
        fresh buffer)."""
        if self._array is not None:
            return torch.from_numpy(self._array[start:stop].astype(self.read_dtype))  # astype copies
        out = np.empty((max(stop - start, 0), self.dim), dtype=self.dtype)
        _read_all(self._fd, memoryview(out).cast("B"), start * self._row_bytes)
        return torch.from_numpy(out.astype(self.read_dtype, copy=False))

    def rows(self, index) -> torch.Tensor:
        """The rows ``index`` (row ids, any order, repeats allowed), ``[len(index), d]``, in the order asked. Rows
        that are close in storage (a class's rows) are read together: a class is one read. Scattered rows (another
        grouping than the store's) are read in spans that skip long gaps and hold at most :attr:`block_rows` rows,
        so a read is never much larger than what was asked, nor than a block."""
        index = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64).reshape(-1)
        if index.size == 0:
            return torch.from_numpy(np.empty((0, self.dim), dtype=self.read_dtype))
        positions = self.position[index].astype(np.int64)
        first, last = int(positions.min()), int(positions.max())
        if last - first + 1 <= len(positions) + _GAP_ROWS:
            return self.read(first, last + 1)[torch.from_numpy(positions - first)]
        by_position = np.argsort(positions, kind="stable")
        sorted_positions = positions[by_position]
        blocks = sorted_positions // self.block_rows
        breaks = np.flatnonzero((np.diff(sorted_positions) > _GAP_ROWS) | (np.diff(blocks) != 0)) + 1
        out = torch.from_numpy(np.empty((len(index), self.dim), dtype=self.read_dtype))
        for run in np.split(np.arange(len(index)), breaks):
            low, high = int(sorted_positions[run[0]]), int(sorted_positions[run[-1]])
            out[torch.from_numpy(by_position[run])] = self.read(low, high + 1)[
                torch.from_numpy(sorted_positions[run] - low)
            ]
        return out

    def __getitem__(self, index) -> torch.Tensor:
        """``store[rows]``: :meth:`rows` (an integer array or tensor of row ids), as a tensor's indexing reads."""
        return self.rows(index)

    def chunks(
        self, block_rows: int | None = None, share: Share | None = None
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """``(row ids, features [b, d])`` of every row, ``block_rows`` at a time (default :attr:`block_rows`) in
        storage order (this process's blocks of ``share``: block ``i`` is process ``i % num_processes``'s)."""
        share = share or Share()
        block_rows = block_rows or self.block_rows
        starts = range(0, self.num_rows, block_rows)
        for block, start in enumerate(starts):
            if block % share.num_processes == share.process_index:
                stop = min(start + block_rows, self.num_rows)
                yield self.order[start:stop].astype(np.int64), self.read(start, stop)

    # ----- passes that share their work out and gather it

    def map_rows(
        self,
        function: Callable[[np.ndarray, torch.Tensor], np.ndarray],
        share: Share | None = None,
        block_rows: int | None = None,
    ) -> np.ndarray:
        """``[N]`` values of ``function(row_ids, features)`` (one value per row of each block of ``block_rows`` rows,
        default :attr:`block_rows`), on every process of ``share`` (each computes its blocks; the parts are
        gathered)."""
        share = share or Share()
        values = ((rows, np.asarray(function(rows, features))) for rows, features in self.chunks(block_rows, share))
        return _assembled(values if share.num_processes == 1 else share.gather(list(values)), self.num_rows)

    def map_classes(
        self, function: Callable[[np.ndarray], np.ndarray], valid: np.ndarray, share: Share | None = None
    ) -> np.ndarray:
        """``float32[N]`` values of ``function(row_ids)`` for each class's ``valid`` rows (ascending row ids; the
        function reads them with :meth:`rows`), 0 for the other rows. Classes are spread over the processes of
        ``share`` by :func:`class_assignment` on their rows squared (a kNN's cost); every process gets all values."""
        share = share or Share()
        valid = np.asarray(valid, dtype=bool)
        sizes = np.bincount(self.labels[valid], minlength=len(self.class_starts) - 1)
        mine = class_assignment(sizes.astype(np.float64) ** 2, share.num_processes)[share.process_index]
        if share.num_processes > 1:
            work_here = int((sizes[mine] ** 2).sum())
            logger.info(
                "process %d of %d: %d of %d classes (%d rows, %.0f%% of the kNN work)",
                share.process_index, share.num_processes, len(mine), int((sizes > 0).sum()), int(sizes[mine].sum()),
                100 * work_here / max(int((sizes**2).sum()), 1),
            )  # fmt: skip

        def part():
            for label in sorted(mine):  # storage order: one forward sweep over the file
                rows = self.order[self.class_starts[label] : self.class_starts[label + 1]].astype(np.int64)
                rows = rows[valid[rows]]
                if rows.size:
                    yield rows, np.asarray(function(rows), dtype=np.float32)

        parts = part() if share.num_processes == 1 else share.gather(list(part()))
        return _assembled(parts, self.num_rows, default=np.float32).astype(np.float32, copy=False)


def _assembled(parts: Iterable[tuple[np.ndarray, np.ndarray]], num_rows: int, default=None) -> np.ndarray:
    """One ``[N]`` array from ``(row ids, values)`` parts (of the first part's dtype); rows no part names are 0.
    ``parts`` may be a generator (one process): each part is written as it comes and let go, so the row ids of
    every part (8 bytes a row) are never held at once."""
    out = None
    for rows, values in parts:
        if out is None:
            out = np.zeros(num_rows, dtype=values.dtype)
        out[rows] = values
    return np.zeros(num_rows, dtype=default or np.float32) if out is None else out


def _overflowed(given: np.ndarray, stored: np.ndarray) -> bool:
    """Whether narrowing ``given`` to ``stored`` turned finite values into infinities (float16 tops out at 65504)."""
    infinite = np.count_nonzero(np.isinf(stored))
    return infinite > 0 and infinite > np.count_nonzero(np.isinf(given))


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _read_all(fd: int, buffer: memoryview, offset: int) -> None:
    while len(buffer):
        read = os.preadv(fd, [buffer], offset)
        if read == 0:
            raise OSError("the feature store's file is shorter than its rows: it was truncated while in use.")
        buffer, offset = buffer[read:], offset + read


def _close(fd: int, path: Path | None) -> None:
    os.close(fd)
    if path is not None:
        path.unlink(missing_ok=True)
