"""``exact`` (default): the optimum of the paper's objective under the exact budget.

With the count fixed at k, the objective sum_i x_i c_i is separable, so its maximum is the k largest rewards. Ties
are broken by row id (ascending), which makes the result deterministic and independent of the row order.
"""

from __future__ import annotations

import numpy as np

from hf_clipsel.configs import SelectionConfig
from hf_clipsel.selection.registry import (
    SelectionInputs,
    SelectionResult,
    ranking,
    ratio_budgets,
    register_selector,
    top_of_ranking,
)


def reward_ranking(inputs: SelectionInputs, alpha: float) -> np.ndarray:
    """Row positions by reward, highest first, ties by row id ascending (invalid rows, at -inf, come last)."""
    return ranking(inputs.reward(alpha), inputs.row_id)


@register_selector("exact")
def select_exact(inputs: SelectionInputs, ratios: list[float], config: SelectionConfig) -> SelectionResult:
    """The ``k = budget(ratio, N)`` valid rows with the largest reward, for each ratio.

    With a fixed ``alpha`` one ranking serves every ratio, so a larger ratio's subset contains a smaller one's (not
    guaranteed with ``class_balanced``: see :func:`~hf_clipsel.selection.registry.class_quotas`). With
    ``alpha=None`` (alpha = ratio) the reward, and so the ranking, differs per ratio.
    """
    result = SelectionResult()
    shared_order = None if config.alpha is None else reward_ranking(inputs, config.alpha)
    for ratio, k in ratio_budgets(inputs, ratios).items():
        order = shared_order if shared_order is not None else reward_ranking(inputs, config.alpha_for(ratio))
        result.add(
            ratio,
            top_of_ranking(order, inputs, k, config.class_balanced),
            k,
            int(inputs.valid.sum()),
            alpha=config.alpha_for(ratio),
        )
    return result
