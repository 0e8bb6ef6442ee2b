"""Class posterior: the model's zero-shot probability of each row's given label over all classes."""

from __future__ import annotations

import numpy as np
import torch

from .. import scoring
from .base import Column, Score, ScoreInputs, register_score


@register_score
class ClassPosterior(Score):
    name = "class_posterior"
    columns = (
        Column(
            "class_posterior", "the model's probability of the given label over all classes", "[0, 1]; higher: surer"
        ),
        Column("class_posterior_normalized", "class posterior min-max scaled over the usable rows", "[0, 1]"),
    )

    def compute(self, inputs: ScoreInputs) -> dict[str, np.ndarray]:
        def block(rows: np.ndarray, features: torch.Tensor) -> np.ndarray:
            labels = inputs.labels[torch.from_numpy(rows)]
            return scoring.class_posterior(
                features, inputs.class_features, labels, inputs.logit_scale, inputs.logit_bias, inputs.posterior_link
            ).numpy()

        # [block, C] logits per block: the block's rows are bounded by the class count (64 MiB of logits) and by the
        # store's block (few classes would otherwise read 65,536 rows of features at once: 192 MiB at 768-d).
        block_rows = min(scoring.logit_block_rows(inputs.class_features.shape[0]), inputs.features.block_rows)
        posterior = torch.from_numpy(inputs.features.map_rows(block, inputs.share, block_rows))
        posterior = torch.where(inputs.valid, posterior, 0.0)
        return {
            "class_posterior": posterior.numpy(),
            "class_posterior_normalized": scoring.min_max(posterior, inputs.valid).numpy(),
        }
