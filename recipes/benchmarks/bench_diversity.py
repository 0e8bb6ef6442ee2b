"""Sample diversity: hf_clipsel.scoring.sample_diversity against the released approach (scikit-learn).

The released approach, per class: NearestNeighbors(n_neighbors=K+1).fit(class_rows), kneighbors(class_rows), drop
the first column (self), mean of the rest. It is run here on rows grouped by label (the released code sliced
contiguous blocks, which is only right for class-sorted rows; the grouping is included in its time and is cheap).

Shapes (synthetic 512-d float32 features shaped like CLIP's: a large common component, class centres, noise):
CIFAR-10 (50,000 rows, 10 classes, K=100), CIFAR-100 (50,000, 100, K=50), ImageNet-1k (1,281,167, 1000, K=50).
Each shape: both methods interleaved, median of --repeats. For ImageNet-1k, scikit-learn runs on the first
--imagenet-class-fraction of the classes (default 0.2 = 200 classes) and its full time is EXTRAPOLATED by the
fraction of rows (labelled); the library runs on the same classes (for the ratio) and on all classes (measured).
The two must agree: max abs difference of the scores over the rows both computed.

Default runtime on a 2-core CPU: about 5 minutes. --imagenet-class-fraction 1 measures scikit-learn on all classes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import footer, header, interleaved, load_1min, load_average, median, setup, table, timed
from sklearn.neighbors import NearestNeighbors

from hf_clipsel.scoring import sample_diversity

SHAPES = {
    "CIFAR-10": (50_000, 10, 100),
    "CIFAR-100": (50_000, 100, 50),
    "ImageNet-1k": (1_281_167, 1000, 50),
}


def synthetic_features(num_rows: int, num_classes: int, dim: int = 512, seed: int = 0):
    """float32 [N, dim] features (common component + class centre + noise) and uniform random labels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (num_rows,), generator=generator)
    common = torch.randn(dim, generator=generator) * 0.4
    centres = torch.randn(num_classes, dim, generator=generator) * 0.15 + common
    features = torch.randn(num_rows, dim, generator=generator).mul_(0.2)
    for start in range(0, num_rows, 65_536):  # in place, in blocks: no [N, dim] temporary
        features[start : start + 65_536] += centres[labels[start : start + 65_536]]
    return features, labels


def released_diversity(features: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """The released computation: one scikit-learn NearestNeighbors per class, K+1 neighbours, self dropped."""
    diversity = np.zeros(len(labels), dtype=np.float32)
    order = np.argsort(labels, kind="stable")
    for rows in np.split(order, np.flatnonzero(np.diff(labels[order])) + 1):
        class_features = features[rows]
        distances, _ = NearestNeighbors(n_neighbors=k + 1).fit(class_features).kneighbors(class_features)
        diversity[rows] = distances[:, 1:].mean(axis=1)
    return diversity


def run_shape(name: str, fraction: float, repeats: int) -> dict:
    num_rows, num_classes, k = SHAPES[name]
    features, labels = synthetic_features(num_rows, num_classes)
    row = {"shape": name, "N": num_rows, "classes": num_classes, "K": k}
    if fraction < 1:
        # The first classes' rows only: both methods on the same subset, for the ratio and the agreement check.
        kept_classes = max(1, round(fraction * num_classes))
        subset = (labels < kept_classes).nonzero().squeeze(1)
        sub_features, sub_labels = features[subset].contiguous(), labels[subset]
        row["sklearn on"] = f"{kept_classes} of {num_classes} classes ({len(subset):,} rows)"
    else:
        sub_features, sub_labels = features, labels
        row["sklearn on"] = "all classes"
    results = {}

    def library():
        results["library"] = sample_diversity(sub_features, sub_labels, k).numpy()

    def sklearn():
        results["sklearn"] = released_diversity(sub_features.numpy(), sub_labels.numpy(), k)

    times = interleaved({"library": library, "sklearn": sklearn}, repeats)
    row["library s (same rows)"] = median(times["library"])
    row["sklearn s (same rows)"] = median(times["sklearn"])
    row["library min s"], row["sklearn min s"] = min(times["library"]), min(times["sklearn"])
    row["speedup"] = row["sklearn s (same rows)"] / row["library s (same rows)"]
    if fraction < 1:
        row["library s (all rows, measured)"] = timed(sample_diversity, features, labels, k)[0]
        row["sklearn s (all rows, EXTRAPOLATED)"] = row["sklearn s (same rows)"] * num_rows / len(sub_labels)
    difference = np.abs(results["library"] - results["sklearn"])
    row["max abs diff"] = float(difference.max())
    row["max rel diff"] = float((difference / np.maximum(results["sklearn"], 1e-12)).max())
    row["mean SDS"] = float(results["sklearn"].mean())
    row["load (1 min)"] = load_1min()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per shape (median reported)")
    parser.add_argument("--imagenet-class-fraction", type=float, default=0.2, help="share of classes sklearn runs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    setup(args.threads)
    started = time.perf_counter()
    header("bench_diversity: per-class kNN, hf_clipsel vs released (scikit-learn)")
    rows = []
    for name in args.shapes:
        fraction = args.imagenet_class_fraction if name == "ImageNet-1k" else 1.0
        rows.append(run_shape(name, fraction, args.repeats))
        print(load_average(), "|", name, "done")
    columns = list(dict.fromkeys(c for row in rows for c in row))
    table(rows, columns)
    print(
        f"(times: median of {args.repeats} interleaved runs, and the fastest run; speedup = ratio of the medians;"
        " EXTRAPOLATED = time on the subset x N / subset rows)"
    )
    footer(started)


if __name__ == "__main__":
    main()
