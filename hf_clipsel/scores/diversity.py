"""Sample diversity (the method's SDS): each image's mean distance to its K nearest neighbours of the same class."""

from __future__ import annotations

import numpy as np
import torch

from .. import scoring
from .base import Column, Score, ScoreInputs, register_score


def below_class_median(values: np.ndarray, labels: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """``bool[N]``: usable rows whose value is below the median of their class's usable rows (``np.median``'s: the
    middle value, or the mean of the two middle ones; a class holding a NaN has none below)."""
    values, labels = np.asarray(values), np.asarray(labels)
    below = np.zeros(len(values), dtype=bool)
    rows = np.flatnonzero(usable)
    if rows.size == 0:
        return below
    # One sort by (label, value) for all classes: a pass over every row per class is O(N C), hours at 21,000 classes.
    order = rows[np.lexsort((values[rows], labels[rows]))]
    sorted_values, sorted_labels = values[order], labels[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_labels[1:] != sorted_labels[:-1]]))
    sizes = np.diff(np.append(starts, len(order)))
    medians = (sorted_values[starts + (sizes - 1) // 2] + sorted_values[starts + sizes // 2]) / 2
    if np.issubdtype(sorted_values.dtype, np.floating):
        medians[np.add.reduceat(np.isnan(sorted_values), starts) > 0] = np.nan
    below[order] = sorted_values < np.repeat(medians, sizes)
    return below


@register_score
class SampleDiversity(Score):
    name = "sample_diversity"
    columns = (
        Column(
            "sample_diversity",
            "mean distance to the row's K nearest neighbours of the same class (SDS)",
            ">= 0; higher: rarer in its class, lower: redundant",
        ),
        Column(
            "sample_diversity_normalized", "SDS min-max scaled over the usable rows, as the reward uses it", "[0, 1]"
        ),
    )
    # A dropped row in a dense part of its class (diversity below the class median).
    drop_reason = "redundant"
    reason_rank = 10

    def compute(self, inputs: ScoreInputs) -> dict[str, np.ndarray]:
        store = inputs.features

        def one_class(rows: np.ndarray) -> np.ndarray:  # a class's valid rows, ascending: read in blocks
            def read(start: int, stop: int) -> torch.Tensor:
                return store.rows(rows[start:stop])

            return scoring.class_diversity(read, len(rows), inputs.knn_k, inputs.knn_block_rows).numpy()

        # One class at a time (memory bounded by the largest class, or by knn_block_rows), classes shared out
        # between the processes by size; the same numbers as scoring.sample_diversity on the whole matrix.
        diversity = torch.from_numpy(store.map_classes(one_class, inputs.valid.numpy(), inputs.share))
        return {
            "sample_diversity": diversity.numpy(),
            "sample_diversity_normalized": scoring.min_max(diversity, inputs.valid).numpy(),
        }

    def explains(self, table: dict, selection) -> np.ndarray | None:
        usable = np.asarray(table["flag_reason"]) == ""
        return below_class_median(np.asarray(table["sample_diversity_normalized"]), np.asarray(table["label"]), usable)
