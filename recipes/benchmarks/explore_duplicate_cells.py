"""What searching a large group in k-means cells costs the duplicate search in copies found, on real images.

``hf_clipsel.duplicates.find_duplicates`` searches a class or predicted class of more than ``GROUP_ROWS`` rows in
cells of about that many rows (``duplicates.cells``), so that its time is linear in N whatever the groups' sizes. A
copy whose original falls in another cell is lost. This script measures how many: CIFAR-10 training images (their
8x8 thumbnails, as the embed stage measures them) and copies of ``--copies`` of them per kind (exact, JPEG 60-90,
resized 0.7-1.3x, colour gains 0.9-1.1: the kinds the thumbnails find), all put in ONE group (one label, one
predicted class: the worst case, a model that piles every row into one class), searched whole and in cells of each
``--group_rows``. A copy counts as found when it is in its original's near-duplicate group. Features: a copy gets its
original's, every other row a random direction, so the features' check passes copies and nothing else (the
cells' effect alone is measured, not the features').

    python recipes/benchmarks/explore_duplicate_cells.py --data_dir path/to/cifar10 --threads 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import footer, header, load_cifar10, setup, table
from bench_duplicates import copy_image

from hf_clipsel.duplicates import find_duplicates
from hf_clipsel.thumbnails import thumbnail

KINDS = ("exact", "jpeg", "resize", "colour")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None, help="a local CIFAR-10 in the Hub's parquet layout (default: Hub)")
    parser.add_argument("--rows", type=int, default=50_000, help="CIFAR-10 training rows (default: all 50,000)")
    parser.add_argument("--copies", type=int, default=250, help="copies of each kind")
    parser.add_argument("--group_rows", type=int, nargs="+", default=[8192, 2048, 512])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    setup(args.threads)
    started = time.perf_counter()
    header("explore_duplicate_cells: copies found when one large group is searched in k-means cells")

    train = load_cifar10(args.data_dir, split="train")
    train = train.select(range(min(args.rows, len(train))))
    rng = np.random.default_rng(args.seed)
    originals = rng.choice(len(train), args.copies * len(KINDS), replace=False)
    grids = [thumbnail(row["img"].convert("RGB")) for row in train]
    kinds = []
    for index, original in enumerate(originals):
        kind = KINDS[index // args.copies]
        grids.append(thumbnail(copy_image(train[int(original)]["img"].convert("RGB"), kind, rng)))
        kinds.append(kind)
    num_rows = len(grids)
    thumbnails = torch.tensor(grids, dtype=torch.uint8)
    generator = torch.Generator().manual_seed(args.seed)
    features = torch.randn(num_rows, 64, generator=generator)
    copies = torch.arange(len(train), num_rows)
    features[copies] = features[torch.from_numpy(originals)]
    labels = torch.zeros(num_rows, dtype=torch.int64)
    text = torch.nn.functional.normalize(torch.ones(1, 64), dim=-1)
    valid = torch.ones(num_rows, dtype=torch.bool)
    print(f"{len(train):,} images and {len(originals):,} copies in one group of {num_rows:,} rows")

    rows = []
    for group_rows in [num_rows, *args.group_rows]:
        begin = time.perf_counter()
        group = find_duplicates(features, text, labels, valid, thumbnails=thumbnails, group_rows=group_rows)["group"]
        seconds = time.perf_counter() - begin
        found = (group[copies.numpy()] >= 0) & (group[copies.numpy()] == group[originals])
        row = {"cells of": "whole group" if group_rows == num_rows else f"{group_rows:,} rows", "seconds": seconds}
        for kind in KINDS:
            mine = np.array(kinds) == kind
            row[f"{kind} found"] = f"{found[mine].mean():.3f}"
        row["all copies found"] = f"{found.mean():.3f}"
        row["rows in a group"] = int((group >= 0).sum())
        rows.append(row)
    table(rows)
    footer(started)


if __name__ == "__main__":
    main()
