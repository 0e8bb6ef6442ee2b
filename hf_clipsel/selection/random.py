"""``random`` baseline: a uniformly random subset of the valid rows, reproducible from ``config.seed``."""

from __future__ import annotations

import numpy as np

from hf_clipsel.selection.config import SelectionConfig
from hf_clipsel.selection.registry import (
    SelectionInputs,
    SelectionResult,
    ratio_budgets,
    register_selector,
    top_k,
)


@register_selector("random")
def select_random(inputs: SelectionInputs, ratios: list[float], config: SelectionConfig) -> SelectionResult:
    """k valid rows drawn uniformly without replacement (per class with ``class_balanced``), seeded.

    One random order of the rows serves every ratio, so the subsets are nested (unless class-balanced), as a
    smaller random subset of a larger one is again uniform.
    """
    priority = np.random.default_rng(config.seed).permutation(inputs.num_rows)
    result = SelectionResult()
    for ratio, k in ratio_budgets(inputs, ratios).items():
        result.add(ratio, top_k(priority, inputs, k, config.class_balanced), k, int(inputs.valid.sum()))
    return result
