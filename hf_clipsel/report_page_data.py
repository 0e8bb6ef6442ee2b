"""The data files of the interactive report page: the scores table as paged, typed columns the page loads itself.

    report/data/manifest.js               CLIPSEL_MANIFEST({...}): rows, classes, ratios, columns, score meanings
    report/data/<column>-<page>.js        CLIPSEL_CHUNK("<column>", <page>, "<base64>"): PAGE_ROWS rows of one column

Each chunk is the little-endian bytes of a typed array (int8/16/32, uint8/16/32 or float32), base64-encoded inside a
JavaScript call, so the page loads it with a ``<script>`` tag: that works over ``file://``, where Chromium blocks
``fetch()`` of local files, and from any static host. Base64 of typed arrays parses an order of magnitude faster
than the same numbers as JSON text (a 1.28M-row column decodes in tens of milliseconds), and per-column files let
the page load only what it shows: the "core" columns (labels, outcome and reason per ratio) when it opens, a score
column when it sorts by it, one page of every column when it shows a row's details.

Text columns (``flag_reason``, ``given_label``, ``damage``, ``drop_reason_ratio_<r>``) are dictionary codes plus
the dictionary in the manifest; labels are the ClassLabel integers (-1: no usable label) plus the class names.
``path`` (each row's file, where the source names one) is a "text" column: each chunk a base64 UTF-8 JSON array.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .core.names import PATH, drop_reason_column, reward_column, selected_column, selected_ratios
from .scores import Column
from .scores import score_columns as score_columns_of_registry

DATA_DIR = "data"
MANIFEST = "manifest.js"
PAGE_ROWS = 65_536  # rows per chunk file: a row's details load one page of each column, ~256 KiB of float32
DUPLICATE_GROUP = "duplicate_group"  # a score some runs carry: rows of one group are near-duplicates


# The numeric columns the page shows and sorts by: the registered scores' (hf_clipsel.scores.Column: name, meaning,
# value range), and the reward of each ratio.
ScoreColumn = Column

REWARD_MEANING = ScoreColumn(
    "reward", "the reward the selection ranked by (norm. SAS and SDS, weighted)", "higher: kept first"
)

_TYPES = {  # numpy dtype -> the page's typed array
    np.dtype("int8"): "i8",
    np.dtype("uint8"): "u8",
    np.dtype("int16"): "i16",
    np.dtype("uint16"): "u16",
    np.dtype("int32"): "i32",
    np.dtype("uint32"): "u32",
    np.dtype("float32"): "f32",
    np.dtype("object"): "text",  # strings, one per row (the path), not a dictionary: they are mostly unique
}


def file_stem(column: str) -> str:
    """The chunk files' name stem of a column: its name with anything but letters, digits, '.', '_' replaced."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", column)


def smallest_int(values: np.ndarray) -> np.ndarray:
    """``values`` (integers) in the smallest signed type that holds them, int8 to int32."""
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return values.astype(dtype)
    raise ValueError(f"a column holds integers outside int32 ({low}..{high}); the report page cannot show them.")


def dictionary_codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """A text column as (codes, dictionary): codes in the smallest unsigned type, null read as ""."""
    encoded = pc.fill_null(column, "").combine_chunks().dictionary_encode()
    dictionary = [str(text) for text in encoded.dictionary.to_pylist()]
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    dtype = np.uint8 if len(dictionary) <= 2**8 else np.uint16 if len(dictionary) <= 2**16 else np.uint32
    return codes.astype(dtype), dictionary


@dataclass
class PageColumn:
    """One column as the page stores it: values, whether the page loads it on opening, and its dictionary."""

    values: np.ndarray
    core: bool
    dictionary: list[str] | None = None


def page_columns(
    table: pa.Table, thumbnail_rows: np.ndarray, score_columns: Sequence[ScoreColumn]
) -> tuple[dict[str, PageColumn], list[ScoreColumn]]:
    """The columns the page needs from the scores ``table``, and the score columns it holds (those of
    ``score_columns`` present in the table, then the reward of each ratio that has one).

    ``thumbnail_rows``: bool per row, whether a thumbnail was written (the page shows a placeholder otherwise).
    """
    names = set(table.column_names)

    def numpy(name: str) -> np.ndarray:
        return table.column(name).to_numpy(zero_copy_only=False)

    columns = {
        "row_id": PageColumn(smallest_int(numpy("row_id").astype(np.int64)), core=True),
        "label": PageColumn(smallest_int(pc.fill_null(table.column("label"), -1).to_numpy()), core=True),
        "thumbnail": PageColumn(thumbnail_rows.astype(np.uint8), core=True),
    }
    predicted = table.column("predicted_label") if "predicted_label" in names else pa.nulls(len(table), pa.int64())
    columns["predicted_label"] = PageColumn(smallest_int(pc.fill_null(predicted, -1).to_numpy()), core=True)
    for name, core in (("flag_reason", True), ("damage", True), ("given_label", False)):
        if name in names:
            codes, dictionary = dictionary_codes(table.column(name).cast(pa.string()))
            columns[name] = PageColumn(codes, core, dictionary)
    paths = pc.fill_null(table.column(PATH), "") if PATH in names else None
    if paths is not None and pc.any(pc.not_equal(paths, "")).as_py():  # a source of bytes only names no file
        columns[PATH] = PageColumn(np.asarray(paths.to_pylist(), dtype=object), core=False)
    if DUPLICATE_GROUP in names:
        columns[DUPLICATE_GROUP] = PageColumn(
            smallest_int(pc.fill_null(table.column(DUPLICATE_GROUP), -1).to_numpy()), core=True
        )
    for ratio in selected_ratios(table.column_names):
        columns[selected_column(ratio)] = PageColumn(numpy(selected_column(ratio)).astype(np.uint8), core=True)
        codes, dictionary = dictionary_codes(table.column(drop_reason_column(ratio)))
        columns[drop_reason_column(ratio)] = PageColumn(codes, True, dictionary)
    # float scores only: an int column (a group or row id) is shown as its own filter, or not at all
    shown = [score for score in score_columns if score.name in names and score.dtype == "float32"]
    shown += [
        ScoreColumn(reward_column(ratio), f"{REWARD_MEANING.meaning} at ratio {ratio:g}", REWARD_MEANING.value_range)
        for ratio in selected_ratios(table.column_names)
        if reward_column(ratio) in names
    ]
    for score in shown:
        columns[score.name] = PageColumn(numpy(score.name).astype(np.float32), core=False)
    return columns, shown


def write_chunks(name: str, values: np.ndarray, data_dir: Path) -> int:
    """Write one column as ``<stem>-<page>.js`` files of PAGE_ROWS rows; return the number of pages."""
    strings = values.dtype == object
    little_endian = values if strings else values.astype(values.dtype.newbyteorder("<"), copy=False)
    pages = max(1, -(-len(values) // PAGE_ROWS))
    for page in range(pages):
        part = little_endian[page * PAGE_ROWS : (page + 1) * PAGE_ROWS]
        payload = base64.b64encode(json.dumps(part.tolist()).encode() if strings else part.tobytes()).decode()
        text = f'CLIPSEL_CHUNK({json.dumps(name)},{page},"{payload}");\n'
        (data_dir / f"{file_stem(name)}-{page:05d}.js").write_text(text, encoding="ascii")
    return pages


def map_text_column(data_dir: Path, name: str, change) -> None:
    """Rewrite the chunk files of the text column ``name`` in ``data_dir`` with ``change(text) -> text`` applied to
    each row (what a push publishes in place of this machine's paths). Each file is replaced, not written through,
    so a hard link to it (the run's own report) keeps its contents."""
    for path in sorted(data_dir.glob(f"{file_stem(name)}-*.js")):
        match = re.fullmatch(
            r'CLIPSEL_CHUNK\((".*?"),(\d+),"([A-Za-z0-9+/=]*)"\);\n', path.read_text(encoding="ascii")
        )
        if match is None:
            raise ValueError(f"{path} is not a chunk file of the report page; write the report again.")
        rows = [change(text) for text in json.loads(base64.b64decode(match[3]))]
        payload = base64.b64encode(json.dumps(rows).encode()).decode()
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(f'CLIPSEL_CHUNK({match[1]},{match[2]},"{payload}");\n', encoding="ascii")
        temporary.replace(path)


def write_data(
    table: pa.Table,
    class_names: list[str],
    report_dir: Path,
    thumbnail_rows: np.ndarray,
    thumbnails: dict,
    score_columns: Sequence[ScoreColumn] | None = None,
) -> dict:
    """Write report_dir/data/ (manifest and chunks) from the scores ``table``; return the manifest.

    Args:
        table: the scores table (scores_table's columns), in row order.
        class_names: the names of the label classes, in label order.
        report_dir: the report folder being written.
        thumbnail_rows: bool per row, True where report_dir holds its thumbnail.
        thumbnails: what the page says about them: ``{"folder", "side", "format", "mode"}``.
        score_columns: the numeric columns to show (name, meaning, range; default: every registered score's); those
            absent from the table are skipped.
    """
    data_dir = report_dir / DATA_DIR
    data_dir.mkdir(parents=True, exist_ok=True)
    columns, shown = page_columns(table, thumbnail_rows, score_columns or score_columns_of_registry())
    pages = 1
    for name, column in columns.items():
        pages = write_chunks(name, column.values, data_dir)
    manifest = {
        "num_rows": len(table),
        "data_dir": DATA_DIR,
        "page_rows": PAGE_ROWS,
        "num_pages": pages,
        "class_names": list(class_names),
        "ratios": [
            {
                "name": f"{ratio:g}",
                "selected": selected_column(ratio),
                "reason": drop_reason_column(ratio),
                "reward": reward_column(ratio) if reward_column(ratio) in columns else None,
            }
            for ratio in selected_ratios(table.column_names)
        ],
        "columns": {
            name: {
                "type": _TYPES[column.values.dtype],
                "core": column.core,
                "file": file_stem(name),
                **({"dictionary": column.dictionary} if column.dictionary is not None else {}),
            }
            for name, column in columns.items()
        },
        "scores": [{"name": s.name, "meaning": s.meaning, "range": s.value_range} for s in shown],
        "thumbnails": {**thumbnails, "count": int(thumbnail_rows.sum())},
    }
    (data_dir / MANIFEST).write_text(f"CLIPSEL_MANIFEST({json.dumps(manifest)});\n", encoding="utf-8")
    return manifest
