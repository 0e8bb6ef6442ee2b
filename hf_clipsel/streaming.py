"""The streaming input path (`streaming: true`), for datasets that do not fit on disk.

The source is read as a `datasets.IterableDataset`, never downloaded whole: one pass reads the labels, one pass
embeds the images (hf_clipsel.embedding cuts it into the chunks of the map-style path, so a killed run resumes),
and one pass after selection writes the selected rows. Row ids are positions in the stream's order, which is
fixed for a given dataset revision and file list.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path

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
