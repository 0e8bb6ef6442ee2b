"""The score stage's settings (:class:`ScoringConfig`), one group of the flat configuration of
:mod:`hf_clipsel.configs` (which re-exports it), beside the selection's (:mod:`hf_clipsel.selection.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .core.checks import check_choice, check_positive

# Number types of the class-sorted feature store (hf_clipsel.features.FeatureStore) the score stage writes.
FEATURE_STORE_DTYPES = ("float32", "float16")


@dataclass
class ScoringConfig:
    knn_k: int = field(
        default=100,
        metadata={
            "help": "Neighbours per sample for the diversity score, within the sample's class (paper: 100 for "
            "CIFAR-10, 50 for CIFAR-100). Classes with fewer than K+1 rows use all their other rows."
        },
    )
    knn_block_rows: int = field(
        default=8192,
        metadata={
            "help": "Rows of a class the diversity kNN holds at once: a larger class is read in blocks of this many "
            "rows (queries and keys), so memory is about 4 x knn_block_rows^2 bytes whatever its size (8192: 256 MiB)."
        },
    )

    duplicate_crops: bool = field(
        # Measured (recipes/benchmarks/README.md, "What the duplicate check costs"): on a clean 10,000-image CIFAR-10
        # pool the crop search joined 154 rows into groups of distinct images (ships at sea with aeroplanes, trucks,
        # cars: every group under several labels looked at), against 45 rows in 22 groups without it.
        default=False,
        metadata={
            "help": "The duplicate score finds cropped copies too (0.85-0.95 of each side). Off by default: with "
            "the benchmark's proxy CLIP it also joins distinct images of the same simple layout (ships at sea)."
        },
    )
    feature_store_dtype: str = field(
        default="float32",
        metadata={
            "help": "Number type of the class-sorted copy of the image features that scoring writes to the cache "
            "(N x d values: 37 GiB at 13M rows x 768-d in float32). float16 halves its disk and its reads; every "
            "score still computes in float32, on features rounded to float16, so scores differ from float32's by "
            "about 1e-3 (recipes/benchmarks/README.md, 'A float16 feature store')."
        },
    )

    def __post_init__(self):
        check_positive("knn_k", self.knn_k)
        check_positive("knn_block_rows", self.knn_block_rows)
        check_choice("feature_store_dtype", self.feature_store_dtype, FEATURE_STORE_DTYPES)
