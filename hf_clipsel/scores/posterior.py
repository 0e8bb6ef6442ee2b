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
        posterior = scoring.class_posterior(
            inputs.image_features,
            inputs.class_features,
            inputs.labels,
            inputs.logit_scale,
            inputs.logit_bias,
            inputs.posterior_link,
        )
        posterior = torch.where(inputs.valid, posterior, 0.0)
        return {
            "class_posterior": posterior.numpy(),
            "class_posterior_normalized": scoring.min_max(posterior, inputs.valid).numpy(),
        }
