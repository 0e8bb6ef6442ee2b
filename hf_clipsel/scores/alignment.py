"""Semantic alignment (the method's SAS): each image's cosine with its given label's prompt."""

from __future__ import annotations

import numpy as np
import torch

from .. import scoring
from .base import Column, Score, ScoreInputs, register_score


@register_score
class SemanticAlignment(Score):
    name = "semantic_alignment"
    columns = (
        Column(
            "semantic_alignment",
            "cosine of the image feature and the text feature of its given label's prompt (SAS)",
            "[-1, 1]; higher: the image matches its label better",
        ),
        Column(
            "semantic_alignment_normalized", "SAS min-max scaled over the usable rows, as the reward uses it", "[0, 1]"
        ),
    )
    # A dropped row whose image the model puts in another class than its label: likely mislabelled or damaged.
    drop_reason = "misaligned"
    reason_rank = 20

    def compute(self, inputs: ScoreInputs) -> dict[str, np.ndarray]:
        def block(rows: np.ndarray, features: torch.Tensor) -> np.ndarray:
            labels = inputs.labels[torch.from_numpy(rows)]
            return scoring.semantic_alignment(features, inputs.class_features, labels).numpy()

        alignment = torch.from_numpy(inputs.features.map_rows(block, inputs.share))
        alignment = torch.where(inputs.valid, alignment, 0.0)
        return {
            "semantic_alignment": alignment.numpy(),
            "semantic_alignment_normalized": scoring.min_max(alignment, inputs.valid).numpy(),
        }

    def explains(self, table: dict, selection) -> np.ndarray | None:
        if "predicted_label" not in table:
            return None
        return np.asarray(table["predicted_label"]) != np.asarray(table["label"])
