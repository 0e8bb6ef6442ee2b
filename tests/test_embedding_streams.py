"""A stream under several processes: each reads its own shards, the reads add up to the stream once, and the
chunks each process cuts carry the rows (and row ids) of the stream read whole."""

import io
from collections import Counter

import pytest
from datasets import ClassLabel, Features, Image, IterableDataset
from PIL import Image as PILImage

from hf_clipsel.data import stream_labels_by_shard
from hf_clipsel.embedding import _chunks
from hf_clipsel.streaming import StreamReader, stream_share

CHUNK = 32


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (4, 4), (value % 256, value // 256, 7)).save(buffer, "PNG")
    return buffer.getvalue()


def counting_stream(shard_sizes: list[int], reads: Counter) -> IterableDataset:
    """A stream of ``len(shard_sizes)`` shards (as data files would be) that counts every row it yields, per shard."""
    offsets = [sum(shard_sizes[:i]) for i in range(len(shard_sizes))]

    def rows(shards):
        for shard in shards:
            for row_id in range(offsets[shard], offsets[shard] + shard_sizes[shard]):
                reads[shard] += 1
                yield {"img": {"bytes": _png(row_id), "path": None}, "label": row_id % 3}

    features = Features({"img": Image(decode=False), "label": ClassLabel(names=["a", "b", "c"])})
    return IterableDataset.from_generator(
        rows, gen_kwargs={"shards": list(range(len(shard_sizes)))}, features=features
    )


def read_as_processes(shard_sizes: list[int], world_size: int, shard_rows) -> tuple[dict, list[int]]:
    """Each process's chunks, cut as embed_images cuts them, and the rows each process read."""
    num_rows, chunks, reads_per_process = sum(shard_sizes), {}, []
    for rank in range(world_size):
        reads = Counter()
        stream = counting_stream(shard_sizes, reads)
        share = stream_share(shard_rows, rank, world_size, CHUNK, num_rows)
        for index, chunk in _chunks(stream, "img", share.chunks, CHUNK, num_rows, StreamReader(stream, share)):
            assert index not in chunks, "a chunk is embedded by one process only"
            chunks[index] = chunk.to_list()
        reads_per_process.append(sum(reads.values()))
    return chunks, reads_per_process


@pytest.mark.parametrize(
    ("shard_sizes", "world_size", "overlap"),
    [
        ([32, 64, 32, 30], 2, 0),  # shard blocks that end on chunk boundaries: the stream is read exactly once
        ([30, 50, 40, 30], 2, 16),  # rows 80-95 of the chunk that straddles the boundary: read by both
        ([30, 50, 40, 30, 20], 3, 26),  # 5 shards, 3 processes: blocks of 2, 2 and 1 shards; rows 80-95, 150-159
    ],
)
def test_each_process_reads_its_own_shards_once(shard_sizes, world_size, overlap):
    num_rows = sum(shard_sizes)
    labels, shard_rows = stream_labels_by_shard(counting_stream(shard_sizes, Counter()), "label")
    assert shard_rows == shard_sizes and labels == [row_id % 3 for row_id in range(num_rows)]

    chunks, reads = read_as_processes(shard_sizes, world_size, shard_rows)
    assert sum(reads) == num_rows + overlap  # less than a chunk more at each boundary between processes
    assert overlap < (world_size - 1) * CHUNK

    whole = [dict(row, row_id=row_id) for row_id, row in enumerate(counting_stream(shard_sizes, Counter()))]
    assert sorted(chunks) == list(range(-(-num_rows // CHUNK)))
    cut = [row for index in sorted(chunks) for row in chunks[index]]
    assert [row["row_id"] for row in cut] == list(range(num_rows))
    assert [row["img"]["bytes"] for row in cut] == [row["img"]["bytes"] for row in whole]


def test_fewer_shards_than_processes_read_from_the_start():
    shard_sizes = [50, 50]
    share = stream_share(shard_sizes, 2, 3, CHUNK, 100)
    assert share.shards == 0 and share.chunks == [3]  # chunks shared out as a loaded dataset's
    chunks, reads = read_as_processes(shard_sizes, 3, shard_sizes)
    assert reads == [64, 96, 100]  # each reads up to its last chunk: today's reads, what the shard split avoids
    assert [row["row_id"] for index in sorted(chunks) for row in chunks[index]] == list(range(100))
