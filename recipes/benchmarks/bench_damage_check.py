"""What the damage check finds: per corruption and severity, the share of damaged images it flags and the share of
clean images it flags, on real CIFAR-10 images.

For each of the five corruptions of hf_clipsel.benchmarking.noise (Hendrycks & Dietterich's CIFAR-10-C parameters) at
each severity, 5% of a pool of CIFAR-10 training images (seeded) are corrupted, the pixel statistics of every image are
measured (hf_clipsel.image_quality, as the pipeline does while embedding) and flagged against the pool's own
median and spread with the package's default threshold. No model is involved. Last, the cost of the statistics
per image at two photo sizes.

    python recipes/benchmarks/bench_damage_check.py            # about 20 seconds on one core
    python recipes/benchmarks/bench_damage_check.py --pool_size 2000 --threshold 2.5
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import DATA_DIR_HELP, load_cifar10
from PIL import Image

from hf_clipsel.benchmarking.noise import CORRUPTIONS, corrupt_images
from hf_clipsel.configs import SelectionConfig
from hf_clipsel.image_quality import damage_flags, pixel_statistics

# The pool is drawn from the first third of the training split (the recorded figures used exactly these rows).
FIRST_THIRD = 16_667


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None, help=DATA_DIR_HELP)
    parser.add_argument("--pool_size", type=int, default=5000)
    parser.add_argument("--fraction", type=float, default=0.05, help="Share of the pool that is corrupted.")
    parser.add_argument("--threshold", type=float, default=SelectionConfig.damage_threshold)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    shard = load_cifar10(args.data_dir, split="train").select(range(FIRST_THIRD))
    pool = shard.shuffle(seed=args.seed).select(range(args.pool_size))
    clean = np.array([pixel_statistics(image) for image in pool["img"]])
    usable = np.ones(len(pool), dtype=bool)
    flags = damage_flags(*clean.T, usable, args.threshold)
    print(f"pool: {len(pool)} CIFAR-10 training images (seed {args.seed}), threshold {args.threshold}")
    print(f"no corruption: {np.mean(flags != ''):.2%} of the images flagged\n")
    print("| corruption | " + " | ".join(f"severity {s}" for s in range(1, 6)) + " |")
    print("|---|" + "---|" * 5)
    for corruption in CORRUPTIONS:
        cells = []
        for severity in range(1, 6):
            damaged, record = corrupt_images(pool, args.fraction, corruption, severity, seed=args.seed)
            rows = np.asarray(record["row_id"])
            statistics = clean.copy()
            statistics[rows] = [pixel_statistics(image) for image in damaged.select(rows)["img"]]
            flagged = damage_flags(*statistics.T, usable, args.threshold) != ""
            is_damaged = np.zeros(len(pool), dtype=bool)
            is_damaged[rows] = True
            cells.append(f"{flagged[is_damaged].mean():.0%} / {flagged[~is_damaged].mean():.1%}")
        print(f"| {corruption} | " + " | ".join(cells) + " |")
    print("\ncells: damaged images flagged / clean images flagged")
    # Cost per image beside the embedding: random RGB pixels at two photo sizes (larger ones use a centre crop).
    rng = np.random.default_rng(args.seed)
    for width, height in ((500, 375), (1024, 768)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        rounds = [_seconds_per_call(pixel_statistics, image, 100) for _ in range(5)]
        print(f"pixel_statistics on a {width}x{height} RGB image: {min(rounds) * 1000:.2f} ms (best of 5 x 100)")
    print(f"seconds: {time.perf_counter() - start:.0f}")


def _seconds_per_call(fn, argument, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(argument)
    return (time.perf_counter() - start) / calls


if __name__ == "__main__":
    main()
