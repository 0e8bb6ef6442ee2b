"""The streaming input path (`streaming: true`), for datasets that do not fit on disk.

The source is read as a `datasets.IterableDataset`, never downloaded whole: one pass reads the labels, one pass
embeds the images (hf_clipsel.embedding cuts it into the chunks of the map-style path, so a killed run resumes),
and one pass after selection writes the selected rows. Row ids are positions in the stream's order, which is
fixed for a given dataset revision and file list.

Under several processes each reads its own share of the stream for embedding (:func:`stream_share`): with at least
as many shards (data files) as processes, a contiguous block of whole shards, so that what the processes read adds up
to the stream once (plus, at each boundary between two processes, the rest of the chunk that straddles it); with
fewer shards, the chunks are shared out as a loaded dataset's and every process reads from the start of the stream up
to its last chunk. The label pass counted each shard's rows (:attr:`hf_clipsel.data.Source.shard_rows`), so the row
ids stay positions in the whole stream: `datasets.distributed.split_dataset_by_node` gives whole shards too, but
interleaved across processes and without their offsets, and its split by rows reads the whole stream on every node.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, Image, IterableDataset, Value

from .data import ROW_ID
from .outputs import SUBSETS_DIR, ShardWriter, atomic_directory, ratio_name, remove_stale_subsets

logger = logging.getLogger(__name__)


def stream_identity(config) -> str:
    """What names a stream's cache: where it comes from, and for local files their sizes and times."""
    identity = {
        "name": config.dataset_name,
        "config": config.dataset_config_name,
        "split": config.dataset_split,
        "revision": config.dataset_revision,
        "max_samples": config.max_samples,
    }
    local = Path(config.dataset_name)
    if local.exists():
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        identity["files"] = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StreamShare:
    """One process's share of a stream: the chunks it embeds, and where it starts reading: at shard ``first_shard``,
    whose first row has id ``first_row``; ``shards``: how many shards the stream has (0: it is read whole, from its
    start)."""

    chunks: list[int]
    first_shard: int = 0
    first_row: int = 0
    shards: int = 0

    def describe(self) -> str:
        if not self.shards:
            return "reading the stream from its start (fewer shards than processes)"
        return f"reading from shard {self.first_shard} of {self.shards} (row {self.first_row})"


def stream_share(
    shard_rows: list[int] | None, rank: int, world_size: int, chunk_size: int, num_rows: int
) -> StreamShare:
    """Process ``rank``'s share of a stream of ``num_rows`` rows in chunks of ``chunk_size``.

    Args:
        shard_rows: the rows of each shard, in stream order (None or fewer than ``world_size``: not split by shard).
        rank: this process, 0 to ``world_size`` - 1.
        world_size: the number of processes, at least 1.
        chunk_size: rows per cache chunk, at least 1.
        num_rows: the stream's rows (the sum of ``shard_rows`` when given).

    Returns:
        With enough shards: the process's contiguous block of whole shards (as `numpy.array_split` cuts them: the same
        count each when it divides), and the chunks that start inside them. Else the chunks as
        `Accelerator.split_between_processes` shares them out, read from the stream's start.
    """
    if shard_rows and len(shard_rows) >= world_size and world_size > 1:
        mine = np.array_split(np.arange(len(shard_rows)), world_size)[rank]
        offsets = np.concatenate([[0], np.cumsum(shard_rows)])
        begin, end = int(offsets[mine[0]]), int(offsets[mine[-1] + 1])
        chunks = list(range(-(-begin // chunk_size), -(-end // chunk_size)))  # those whose first row is mine
        return StreamShare(chunks, int(mine[0]), begin, len(shard_rows))
    num_chunks = -(-num_rows // chunk_size)
    return StreamShare(np.array_split(np.arange(num_chunks), world_size)[rank].tolist())


class StreamReader:
    """``(row_id, row)`` of a stream from where a :class:`StreamShare` starts, counting the rows it reads
    (``rows_read``); the caller stops when it has what it needs."""

    def __init__(self, stream: IterableDataset, share: StreamShare):
        self.stream, self.share, self.rows_read = stream, share, 0

    def rows(self) -> Iterator[tuple[int, dict]]:
        share = self.share
        parts = (
            [
                self.stream.shard(share.shards, index, contiguous=True)
                for index in range(share.first_shard, share.shards)
            ]
            if share.shards
            else [self.stream]
        )
        row_id = share.first_row
        for part in parts:
            for row in part:
                self.rows_read += 1
                yield row_id, row
                row_id += 1


def write_subsets_from_stream(
    output_dir: Path, stream: IterableDataset, masks: dict, rows_per_part: int = 10_000
) -> dict[float, int]:
    """One pass over the source: each ratio's selected rows, with every original column plus row_id, written
    in parts of ``rows_per_part`` rows as they come (memory holds one part per ratio)."""
    undecoded = Features(
        {
            name: Image(decode=False) if isinstance(f, Image) else f
            for name, f in {**stream.features, ROW_ID: Value("int64")}.items()
        }
    )
    subsets = Path(output_dir) / SUBSETS_DIR
    buffers = {ratio: [] for ratio in masks}
    written = dict.fromkeys(masks, 0)
    with contextlib.ExitStack() as stack:
        writers = {
            ratio: ShardWriter(stack.enter_context(atomic_directory(subsets / ratio_name(ratio)))) for ratio in masks
        }

        def flush(ratio):
            if buffers[ratio]:
                part = Dataset.from_list(buffers[ratio], features=undecoded)
                writers[ratio].add(part.cast(Features({**stream.features, ROW_ID: Value("int64")})))
                written[ratio] += len(buffers[ratio])
                buffers[ratio] = []

        image_columns = [name for name, f in stream.features.items() if isinstance(f, Image)]
        rows = stream.cast_column(image_columns[0], Image(decode=False)) if image_columns else stream
        for row_id, row in enumerate(rows):
            for ratio, mask in masks.items():
                if row_id < len(mask) and mask[row_id]:
                    buffers[ratio].append({**row, ROW_ID: row_id})
                    if len(buffers[ratio]) == rows_per_part:
                        flush(ratio)
        for ratio in masks:
            flush(ratio)
            if not written[ratio]:  # every candidate was flagged: an empty subset, still a readable config
                writers[ratio].add(Dataset.from_list([], features=undecoded))
            writers[ratio].close()
    remove_stale_subsets(output_dir, masks)
    return written
