"""What the damage check finds: per corruption and severity, the share of damaged images it flags and the share of
clean images it flags, on real CIFAR-10 images.

For each of the five corruptions of hf_clipsel.benchmarking.noise (Hendrycks & Dietterich's CIFAR-10-C parameters)
at each severity, 5% of a pool of CIFAR-10 training images (seeded) are corrupted, the pixel statistics of every image
are measured (hf_clipsel.image_quality, as the pipeline does while embedding) and flagged against the pool's own
median and spread with the package's default threshold and damage_false_discovery (--false_discovery; --fractions
repeats the table for several shares of damaged images). No model is involved.

Then mixed sizes, as a user's folder holds them: each image of a second pool (seeded) is saved at one of five sizes
in turn (32x32 PNG, the native size; 64x48, 224x224, 500x375 and 375x500 JPEG, quality 90, upscaled bicubic), 5% of
them with Gaussian noise (std 0.08) and 5% with Gaussian blur (sigma 1 pixel at the 32-pixel scale, scaled with the
image) added at the saved size before encoding; decoded by hf_clipsel.data.decode_rgb. Per size: the share of clean
images flagged, of noisy ones found, of blurred ones found, for each scale in --sides (the shorter side the
statistics resize every image to; the package's is image_quality.COMMON_SIDE). Last, the cost of the statistics per
image at two photo sizes.

    python recipes/benchmarks/bench_damage_check.py            # about 30 seconds on one core
    python recipes/benchmarks/bench_damage_check.py --pool_size 2000 --threshold 2.5 --sides 32 64 96 224
    python recipes/benchmarks/bench_damage_check.py --fractions 0.05 0.01 0.002 --false_discovery 0.5
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from _common import DATA_DIR_HELP, load_cifar10
from PIL import Image, ImageFilter

from hf_clipsel.benchmarking.noise import CORRUPTIONS, corrupt_images
from hf_clipsel.configs import SelectionConfig
from hf_clipsel.data import decode_rgb
from hf_clipsel.image_quality import COMMON_SIDE, damage_flags, pixel_statistics

# The pool is drawn from the first third of the training split (the recorded figures used exactly these rows).
FIRST_THIRD = 16_667
# The mixed-size pool: (width, height) and format, assigned in turn.
SIZES = (((32, 32), "PNG"), ((64, 48), "JPEG"), ((224, 224), "JPEG"), ((500, 375), "JPEG"), ((375, 500), "JPEG"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None, help=DATA_DIR_HELP)
    parser.add_argument("--pool_size", type=int, default=5000)
    parser.add_argument("--fraction", type=float, default=0.05, help="Share of the pool that is corrupted.")
    parser.add_argument("--threshold", type=float, default=SelectionConfig.damage_threshold)
    parser.add_argument(
        "--false_discovery",
        type=lambda value: None if value.lower() in ("none", "null") else float(value),
        default=SelectionConfig.damage_false_discovery,
        help="The check's damage_false_discovery: a tail flagged only beyond its mirror (default: the package's); "
        "none: every image beyond the threshold.",
    )
    parser.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=None,
        help="Run the corruption table once per share of damaged images (default: --fraction alone).",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed_size", type=int, default=1000, help="Images in the mixed-size pool.")
    parser.add_argument(
        "--sides", type=int, nargs="+", default=[COMMON_SIDE], help="Scales the mixed pool is measured at."
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    shard = load_cifar10(args.data_dir, split="train").select(range(FIRST_THIRD))
    pool = shard.shuffle(seed=args.seed).select(range(args.pool_size))
    clean = np.array([pixel_statistics(image) for image in pool["img"]])
    usable = np.ones(len(pool), dtype=bool)
    flags = damage_flags(*clean.T, usable, args.threshold, args.false_discovery)
    print(
        f"pool: {len(pool)} CIFAR-10 training images (seed {args.seed}), threshold {args.threshold}, "
        f"false_discovery {args.false_discovery}"
    )
    print(f"no corruption: {np.mean(flags != ''):.2%} of the images flagged\n")
    for fraction in args.fractions or [args.fraction]:
        corruption_table(pool, clean, usable, fraction, args)
    mixed_sizes(shard, args)
    # Cost per image beside the embedding: random RGB pixels at two photo sizes.
    rng = np.random.default_rng(args.seed)
    for width, height in ((500, 375), (1024, 768)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        rounds = [_seconds_per_call(pixel_statistics, image, 100) for _ in range(5)]
        print(f"pixel_statistics on a {width}x{height} RGB image: {min(rounds) * 1000:.2f} ms (best of 5 x 100)")
    print(f"seconds: {time.perf_counter() - start:.0f}")


def corruption_table(pool, clean: np.ndarray, usable: np.ndarray, fraction: float, args) -> None:
    """Per corruption and severity: the share of the damaged images flagged and of the clean ones, with ``fraction``
    of the pool damaged."""
    print(f"{fraction:.1%} of the pool damaged\n")
    print("| corruption | " + " | ".join(f"severity {s}" for s in range(1, 6)) + " |")
    print("|---|" + "---|" * 5)
    for corruption in CORRUPTIONS:
        cells = []
        for severity in range(1, 6):
            damaged, record = corrupt_images(pool, fraction, corruption, severity, seed=args.seed)
            rows = np.asarray(record["row_id"])
            statistics = clean.copy()
            statistics[rows] = [pixel_statistics(image) for image in damaged.select(rows)["img"]]
            flagged = damage_flags(*statistics.T, usable, args.threshold, args.false_discovery) != ""
            is_damaged = np.zeros(len(pool), dtype=bool)
            is_damaged[rows] = True
            cells.append(f"{flagged[is_damaged].mean():.0%} / {flagged[~is_damaged].mean():.1%}")
        print(f"| {corruption} | " + " | ".join(cells) + " |")
    print("\ncells: damaged images flagged / clean images flagged\n")


def mixed_sizes(shard, args) -> None:
    rng = np.random.default_rng(args.seed)
    pool = shard.shuffle(seed=args.seed + 1).select(range(args.mixed_size))
    damage = np.full(len(pool), "clean", dtype=object)
    chosen = rng.choice(len(pool), 2 * round(0.05 * len(pool)), replace=False)
    damage[chosen[: len(chosen) // 2]], damage[chosen[len(chosen) // 2 :]] = "noise", "blur"
    size_of, images = np.arange(len(pool)) % len(SIZES), []
    for row, image in enumerate(pool["img"]):
        (size, format), image = SIZES[size_of[row]], image.convert("RGB")
        image = image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)
        if damage[row] == "noise":
            pixels = np.asarray(image, dtype=np.float64) / 255 + rng.normal(0, 0.08, (size[1], size[0], 3))
            image = Image.fromarray(np.uint8(np.clip(pixels, 0, 1) * 255 + 0.5))
        elif damage[row] == "blur":
            image = image.filter(ImageFilter.GaussianBlur(min(size) / 32))
        encoded = io.BytesIO()
        image.save(encoded, format, **({"quality": 90} if format == "JPEG" else {}))
        images.append(decode_rgb({"bytes": encoded.getvalue(), "path": None})[0])
    print(f"mixed sizes: {len(pool)} CIFAR-10 training images (seed {args.seed + 1}), 5% noised, 5% blurred\n")
    print("| scale | " + " | ".join(f"{w}x{h} {format}" for (w, h), format in SIZES) + " | all |")
    print("|---|" + "---|" * (len(SIZES) + 1))
    for side in args.sides:
        statistics = np.array([pixel_statistics(image, side) for image in images])
        everyone = np.ones(len(pool), dtype=bool)
        flagged = damage_flags(*statistics.T, everyone, args.threshold, args.false_discovery) != ""
        cells = []
        for rows in [size_of == index for index in range(len(SIZES))] + [np.ones(len(pool), dtype=bool)]:
            cells.append(
                " / ".join(f"{flagged[rows & (damage == kind)].mean():.0%}" for kind in ("clean", "noise", "blur"))
            )
        print(f"| {side} | " + " | ".join(cells) + " |")
    print("\ncells: clean images flagged / noisy images found / blurred images found\n")


def _seconds_per_call(fn, argument, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(argument)
    return (time.perf_counter() - start) / calls


if __name__ == "__main__":
    main()
