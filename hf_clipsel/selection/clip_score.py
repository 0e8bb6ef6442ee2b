"""``clip_score`` baseline: keep the rows whose image agrees best with its label (DataComp's CLIP-score filter).

DataComp thresholds the CLIP image-text similarity; with a row budget the threshold is the k-th largest semantic
alignment. The diversity score is not used.
"""

from __future__ import annotations

from hf_clipsel.selection.config import SelectionConfig
from hf_clipsel.selection.registry import (
    SelectionInputs,
    SelectionResult,
    ratio_budgets,
    register_selector,
    top_k,
)


@register_selector("clip_score")
def select_clip_score(inputs: SelectionInputs, ratios: list[float], config: SelectionConfig) -> SelectionResult:
    """The k valid rows with the highest SAS~ (ties by row id); nested across ratios unless class-balanced."""
    result = SelectionResult()
    for ratio, k in ratio_budgets(inputs, ratios).items():
        mask = top_k(inputs.semantic_alignment_normalized, inputs, k, config.class_balanced)
        result.add(ratio, mask, k, int(inputs.valid.sum()))
    return result
