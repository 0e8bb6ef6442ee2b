"""``moderate`` baseline: Moderate-DS (Xia et al., ICLR 2023), on the CLIP image features.

Each row's score is the Euclidean distance of its feature to its class's median feature (coordinate-wise median,
as in the authors' code). Rows of moderate difficulty are kept: those whose distance is closest to the median of all
distances. Neither SAS nor SDS is used.
"""

from __future__ import annotations

import numpy as np
import torch

from hf_clipsel.selection.config import SelectionConfig
from hf_clipsel.selection.registry import (
    SelectionInputs,
    SelectionResult,
    ratio_budgets,
    register_selector,
    split_by_label,
    top_k,
)


def distance_to_class_median(image_features, labels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``float64[N]`` distance (>= 0) of each valid row's feature to the median feature of its class (valid rows).

    ``image_features``: ``[N, d]``, a tensor or a :class:`~hf_clipsel.features.FeatureStore` (class-sorted on disk:
    a class is one read, so one class is in memory at a time). Invalid rows get NaN.
    """
    distance = np.full(labels.shape[0], np.nan)
    for class_rows in split_by_label(np.flatnonzero(valid), labels):
        if class_rows.size == 0:
            continue
        features = image_features[torch.from_numpy(class_rows)].detach().to(torch.float32).cpu().numpy()
        median = np.median(features, axis=0)
        distance[class_rows] = np.linalg.norm(features.astype(np.float64) - median, axis=1)
    return distance


@register_selector("moderate", needs_image_features=True)
def select_moderate(inputs: SelectionInputs, ratios: list[float], config: SelectionConfig) -> SelectionResult:
    """The k valid rows with the smallest ``|d_i - median(d)|`` (ties by row id); nested across ratios.

    Needs ``inputs.image_features`` (registered with ``needs_image_features``: :func:`~hf_clipsel.selection.select`
    refuses inputs without them). With ``class_balanced`` the same ranking is cut per class.
    """
    distance = distance_to_class_median(inputs.image_features, inputs.labels, inputs.valid)
    closeness = np.full(inputs.num_rows, -np.inf)
    if inputs.valid.any():
        closeness[inputs.valid] = -np.abs(distance[inputs.valid] - np.median(distance[inputs.valid]))
    result = SelectionResult()
    for ratio, k in ratio_budgets(inputs, ratios).items():
        result.add(ratio, top_k(closeness, inputs, k, config.class_balanced), k, int(inputs.valid.sum()))
    return result
