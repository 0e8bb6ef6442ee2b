"""Arrow tables of a run's rows: built from N-value columns in one step, in memory or in a file of the run's cache
read back through its memory map (so that a table of ImageNet-21k's size need not sit in this process's memory), and
read back as numpy columns without a Python object per value."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset, DatasetInfo, Features
from datasets.fingerprint import generate_random_fingerprint
from datasets.table import InMemoryTable

# The folder of a run's cache (hf_clipsel.context.RunContext.cache_dir) where the score and select stages write their
# tables' columns, read back through the files' memory maps (each file is deleted once mapped: the folder stays
# empty).
TABLES_DIR = "tables"


def arrow_dataset(columns: dict, features: Features, directory: str | Path | None = None) -> Dataset:
    """A `Dataset` of ``columns`` (numpy or Arrow arrays or lists, N values each) typed by ``features``, built as one
    Arrow table: ``Dataset.from_dict`` and ``add_column`` encode each ClassLabel value in Python and hash every
    column, minutes at ImageNet-21k's size. With ``directory``, the table is written to an Arrow file there and read
    back through its memory map: its bytes are the kernel's page cache (written back and dropped under pressure),
    in this process's resident memory only while they are read.

    ``columns`` is emptied as the table is built, one column at a time in the order of ``features``: a column the
    caller holds nowhere else is let go as soon as it is Arrow, so that a column of Python strings (the image paths:
    an object and a pointer per row) and its Arrow copy are alive together for that column alone. (A number column
    without nulls becomes Arrow without a copy: Arrow reads the numpy array's own buffer.)"""
    arrays = []
    for field in features.arrow_schema:
        values = columns.pop(field.name)
        arrays.append((values if isinstance(values, pa.Array) else pa.array(values)).cast(field.type))
        del values
    if columns:
        raise ValueError(f"columns {sorted(columns)} are not in the table's features")
    table = pa.Table.from_arrays(arrays, schema=features.arrow_schema)
    del arrays
    if directory is not None:
        table = mapped_table(table.schema, table.to_batches(), Path(directory))  # one batch: one array per column
    return Dataset(
        InMemoryTable(table), info=DatasetInfo(features=features), fingerprint=generate_random_fingerprint()
    )


def mapped_table(schema: pa.Schema, batches: Iterable[pa.RecordBatch], directory: Path) -> pa.Table:
    """``batches`` written to a file in ``directory`` and read back zero-copy from its memory map. The file is deleted
    once mapped: the map keeps its bytes until the table is let go, and a run that is killed leaves nothing behind.
    (So the table is wrapped as datasets' InMemoryTable, which pickles its values, not as a MemoryMappedTable,
    which would open its file again by name.) Few, large batches: opening the stream maps the pages around each
    batch's header (about 64 KiB each)."""
    path = directory / f"tmp-table-{uuid.uuid4().hex}.arrow"
    directory.mkdir(parents=True, exist_ok=True)
    try:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
        return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    finally:
        path.unlink(missing_ok=True)


def numpy_columns(dataset: Dataset, columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """``{column: [N] numpy array}`` of ``dataset``'s ``columns`` (default: all), read through Arrow: a number
    column is a read-only view of the table's own buffer (no copy), a text column an object array. (The ``numpy``
    format of `datasets` builds a Python object per row and value first, then copies them into an array: at a
    million rows, seconds and tens of bytes a row for every column.)"""
    if columns is not None:
        dataset = dataset.select_columns(columns)
    table = dataset.with_format("arrow")[:]
    return {name: table.column(name).to_numpy() for name in table.column_names}
