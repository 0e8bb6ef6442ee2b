"""What grows per row with N in the scale benchmark (`bench_selection.py --parts scale`), each part alone.

1. The duplicate search's pass over a predicted class (hf_clipsel.duplicates): the benchmark's 100 text classes make
   its predicted classes about N / 100 rows, searched in k-means cells of at most GROUP_ROWS (hf_clipsel.partition):
   for one group of N / 100 random 8x8 uint8 thumbnails (16 labels), the cells, the comparisons per row (the sum of
   the cells' squared sizes over n, what the search's time per row follows) and the seconds per million rows of the
   cells and `nearest_across` in each, as `find_duplicates` runs them.
2. The projection's writes into the class-sorted feature store (hf_clipsel.features.FeatureStore.write): blocks in
   row order, each row in a random class of the class count the benchmark has at 1M, 3M and 13M rows, so a block
   touches more classes (one `pwrite` each) as N grows; ``--store-rows`` rows, small enough to stay in the page cache.

    python recipes/benchmarks/explore_scale_growth.py [--rows 1000000 3000000 13000000] [--store-rows 300000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hf_clipsel.duplicates import GROUP_ROWS, THUMBNAIL_SIMILARITY, nearest_across, thumbnail_vectors
from hf_clipsel.features import FeatureStore, rows_per_block
from hf_clipsel.partition import cells

IMAGENET21K_ROWS, IMAGENET21K_CLASSES, TEXT_CLASSES, DIM = 13_000_000, 21_000, 100, 768


def predicted_group(rows: int) -> str:
    n = rows // TEXT_CLASSES
    rng = np.random.default_rng(0)
    grids = torch.from_numpy(rng.integers(0, 256, (n, 64), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, 16, n))
    started = time.perf_counter()
    found = cells(F.normalize(thumbnail_vectors(grids), dim=-1), GROUP_ROWS)
    for cell in found:
        nearest_across(thumbnail_vectors(grids[cell]), labels[cell], THUMBNAIL_SIMILARITY)
    seconds = time.perf_counter() - started
    sizes = np.array([len(cell) for cell in found], dtype=np.float64)
    return (f"{rows:>10,} rows: a predicted class of {n:,} rows in {len(found)} cells, {sizes @ sizes / n:,.0f} "
            f"comparisons per row, {seconds / n * 1e6:.0f} s per million rows")  # fmt: skip


def store_writes(rows: int, store_rows: int, directory: Path) -> str:
    classes = round(IMAGENET21K_CLASSES * rows / IMAGENET21K_ROWS)
    rng = np.random.default_rng(0)
    store = FeatureStore(rng.integers(0, classes, store_rows), DIM, directory / f"store-{classes}.f32")
    block = rng.standard_normal((rows_per_block(DIM), DIM), dtype=np.float32)
    started = time.perf_counter()
    for start in range(0, store_rows, len(block)):
        store.write(start, block[: min(len(block), store_rows - start)])
    store.flush()
    seconds = time.perf_counter() - started
    return f"{rows:>10,} rows: {classes:,} classes, store writes {seconds / store_rows * 1e6:.1f} s per million rows"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 3_000_000, IMAGENET21K_ROWS])
    parser.add_argument("--store-rows", type=int, default=300_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for rows in args.rows:
        print(predicted_group(rows), flush=True)
    with tempfile.TemporaryDirectory() as directory:
        for rows in args.rows:
            print(store_writes(rows, args.store_rows, Path(directory)), flush=True)


if __name__ == "__main__":
    main()
