"""``clip_score`` baseline: keep the rows whose image agrees best with its label (DataComp's CLIP-score filter).

DataComp thresholds the CLIP image-text similarity; with a row budget the threshold is the k-th largest semantic
alignment. The diversity score is not used.
"""

from __future__ import annotations

from hf_clipsel.configs import SelectionConfig
from hf_clipsel.selection.registry import (
    SelectionInputs,
    SelectionResult,
    ranking,
    ratio_budgets,
    register_selector,
    top_of_ranking,
)


@register_selector("clip_score")
def select_clip_score(inputs: SelectionInputs, ratios: list[float], config: SelectionConfig) -> SelectionResult:
    """The k valid rows with the highest SAS~ (ties by row id); nested across ratios unless class-balanced."""
    order = ranking(inputs.semantic_alignment_normalized, inputs.row_id)
    result = SelectionResult()
    for ratio, k in ratio_budgets(inputs, ratios).items():
        result.add(ratio, top_of_ranking(order, inputs, k, config.class_balanced), k, int(inputs.valid.sum()))
    return result
