"""Selection stability across adapter-training seeds (``stability_seeds``): the adapters trained again with other
seeds on the embedding cache, each selection made again, and the share of each ratio's kept rows that the other
selections keep too. (Stability across neighbouring ratios needs no retraining: hf_clipsel.summary.ratio_overlap.)"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile

import numpy as np
from datasets import Dataset

from .adaptation import adapt_stage
from .context import RunContext
from .modeling import load_clip
from .scores_table import score_stage, select_stage
from .selection.registry import kept_share

logger = logging.getLogger(__name__)


def seed_overlap(context: RunContext, embeddings: Dataset, masks: dict) -> dict[str, float]:
    """``{ratio: share}``: for each ratio of ``masks`` (the run's selection), the mean over ``stability_seeds``
    other seeds (seed + 1, seed + 2, ...) of the share of its kept rows that the selection with adapters trained on
    that seed keeps too; 1 when every seed keeps the same rows. Empty when ``stability_seeds`` is 0. Every process
    calls it (adapter training waits for all of them); the main process's result is the one to use."""
    count = context.config.adapter.stability_seeds
    shares: dict[float, list[float]] = {ratio: [] for ratio in masks}
    for offset in range(1, count + 1):
        config = copy.deepcopy(context.config)
        config.selection.seed += offset
        logger.info("stability: training the adapters again with seed %d", config.selection.seed)
        model, _ = load_clip(config.model, context.accelerator.device)  # fresh weights: the run's carry its adapters
        other = dataclasses.replace(context, config=config, model=model.to(context.accelerator.device))
        with tempfile.TemporaryDirectory(prefix="hf_clipsel_stability_") as directory:
            trained = adapt_stage(other, embeddings, directory)
        if context.accelerator.is_main_process and masks:
            scores, features = score_stage(other, trained, embeddings)
            again, _ = select_stage(scores, config, features)
            for ratio, mask in masks.items():
                shares[ratio].append(kept_share(mask, again[ratio]))
    return {f"{ratio:g}": float(np.mean(values)) for ratio, values in shares.items() if values}
