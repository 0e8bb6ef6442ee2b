"""``exact`` (default): the optimum of the paper's objective under the exact budget.

With the count fixed at k, the objective sum_i x_i c_i is separable, so its maximum is the k largest rewards. Ties
are broken by row id (ascending), which makes the result deterministic and independent of the row order.
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


@register_selector("exact", ranks_by_reward=True)
def select_exact(inputs: SelectionInputs, ratios: list[float], config: SelectionConfig) -> SelectionResult:
    """The ``k = budget(ratio, N)`` valid rows with the largest reward, for each ratio.

    With a fixed ``alpha`` one reward serves every ratio (each ratio then costs one O(N) partition), and since all
    cuts follow the same order, a larger ratio's subset contains a smaller one's (not guaranteed with
    ``class_balanced``: see :func:`~hf_clipsel.selection.registry.class_quotas`). With ``alpha=None``
    (alpha = ratio) the reward, and so the order, differs per ratio.
    """
    result = SelectionResult()
    shared_reward = None if config.alpha is None else inputs.reward(config.alpha)
    for ratio, k in ratio_budgets(inputs, ratios).items():
        reward = shared_reward if shared_reward is not None else inputs.reward(config.alpha_for(ratio))
        result.add(
            ratio,
            top_k(reward, inputs, k, config.class_balanced),
            k,
            int(inputs.valid.sum()),
            alpha=config.alpha_for(ratio),
        )
    return result
