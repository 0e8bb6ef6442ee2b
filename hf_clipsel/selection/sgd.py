"""``sgd``: the released straight-through-estimator optimiser (README.md, "The method", step 3), for reproduction.

A learnable ``w`` (one entry per valid row, initialised at 0.01 so every row starts selected) gives the soft mask
``x = sigmoid(100 w)``. The loss is

    -mean(x * SAS~/mean(SAS~)) - alpha * mean(x * SDS~/mean(SDS~)) + beta * |sum(STE(x)) - k| / N

where ``STE(x)`` is ``x > 0.5`` in the forward pass and the identity in the backward pass. SGD (momentum 0.9) runs
until the budget term drops below 1e-3 (that is, |count - k| < 0.0005 N at beta = 2) or the iteration cap. The
final mask is ``x > 0.5``: within that tolerance of k, not exactly k. ``sgd_exact_trim`` then drops the
lowest-reward selected rows, or adds the highest-reward unselected ones, until exactly k.

Rows that may not be selected (``valid`` is False) are left out of the optimisation: the means run over the valid
rows, while N in the budget term stays the dataset size, as k is computed from it.

The budget term is checked before each step, so the mask returned is exactly the one that met the stopping criterion
(a check after the step could let that step move a few more rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from hf_clipsel.core.checks import check_positive
from hf_clipsel.scoring import scale_by_mean
from hf_clipsel.selection.config import SelectionConfig
from hf_clipsel.selection.registry import (
    SelectionInputs,
    SelectionResult,
    kept_share,
    ranking,
    ratio_budgets,
    register_selector,
    top_k,
)

# The released code's constants, kept as they are for reproduction.
INITIAL_WEIGHT = 0.01
SIGMOID_SHARPNESS = 100.0
MOMENTUM = 0.9
STOP_BELOW = 1e-3


def run_released_sgd(
    alignment_term: torch.Tensor,
    diversity_term: torch.Tensor,
    k: int,
    num_rows: int,
    alpha: float,
    beta: float,
    learning_rate: float,
    max_iterations: int,
) -> tuple[np.ndarray, dict[str, float]]:
    """Run the released procedure over ``n`` candidate rows.

    Args:
        alignment_term: ``[n]`` SAS~ / mean(SAS~) of the candidates.
        diversity_term: ``[n]`` SDS~ / mean(SDS~) of the candidates.
        k: the budget.
        num_rows: N in the budget term (the dataset size, as released).
        alpha, beta, learning_rate, max_iterations: as in :class:`SelectionConfig` and :class:`SgdOptions`.

    Returns:
        ``bool[n]`` final mask ``x > 0.5``, and diagnostics: ``iterations`` (SGD steps taken), ``converged`` (the
        budget term fell below 1e-3), ``budget_term`` and ``objective`` (the loss) at the returned mask.
    """
    alignment_term = alignment_term.to(torch.float32)
    diversity_term = diversity_term.to(torch.float32)
    weights = torch.full(alignment_term.shape, INITIAL_WEIGHT, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.SGD([weights], lr=learning_rate, momentum=MOMENTUM)
    iterations = 0
    while True:
        soft = torch.sigmoid(SIGMOID_SHARPNESS * weights)
        hard = (soft > 0.5).to(soft.dtype)
        # Straight-through: the forward value is exactly `hard`, the gradient is that of `soft`.
        straight_through = hard + soft - soft.detach()
        budget_term = beta * (straight_through.sum() - k).abs() / num_rows
        loss = -(soft * alignment_term).mean() - alpha * (soft * diversity_term).mean() + budget_term
        converged = budget_term.item() < STOP_BELOW
        if converged or iterations >= max_iterations:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        iterations += 1
    diagnostics = {
        "iterations": iterations,
        "converged": converged,
        "budget_term": budget_term.item(),
        "objective": loss.item(),
    }
    return hard.detach().numpy().astype(bool), diagnostics


def trim_to_budget(mask: np.ndarray, order: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    """Drop the lowest-ranked selected rows, or add the highest-ranked unselected valid rows, until ``k`` are selected.

    ``order`` ranks the rows best first (by reward). With fewer than ``k`` valid rows, all valid rows.
    """
    order = order[valid[order]]
    selected_in_order = mask[order]
    trimmed = np.zeros_like(mask)
    count = int(selected_in_order.sum())
    if count >= k:
        trimmed[order[selected_in_order][:k]] = True
    else:
        trimmed[order[selected_in_order]] = True
        trimmed[order[~selected_in_order][: k - count]] = True
    return trimmed


@dataclass
class SgdOptions:
    """The sgd selector's own settings (flat configuration keys, as the other settings)."""

    beta: float = field(default=2.0, metadata={"help": "sgd: weight of the budget term in the objective."})
    sgd_learning_rate: float = field(default=1e-3, metadata={"help": "sgd: SGD learning rate (released: 1e-3)."})
    sgd_max_iterations: int = field(default=100_000, metadata={"help": "sgd: iteration cap (released: 100,000)."})
    sgd_exact_trim: bool = field(
        default=False, metadata={"help": "sgd: trim or fill the final mask to exactly k rows by reward."}
    )

    def __post_init__(self):
        check_positive("beta", self.beta)
        check_positive("sgd_learning_rate", self.sgd_learning_rate)
        check_positive("sgd_max_iterations", self.sgd_max_iterations)


# The released objective has one global budget term, not one per class: no class balance. Its mask meets the budget
# only as closely as the optimiser converged, unless trimmed (sgd_exact_trim).
@register_selector("sgd", options=SgdOptions, ranks_by_reward=True, supports_class_balance=False, exact_budget=False)
def select_sgd(inputs: SelectionInputs, ratios: list[float], config: SelectionConfig) -> SelectionResult:
    """The released STE optimiser, once per ratio, over the valid rows only (invalid rows stay unselected).

    Diagnostics per ratio (``result.diagnostics[ratio]``): ``iterations``, ``converged``, ``objective``,
    ``budget_term``, ``count_before_trim``, ``count_error`` (|count - k| before trim), ``overlap_with_exact`` (the
    fraction of the exact top-k that the optimiser also selected, before trim), and the common ``budget``,
    ``num_selected``, ``shortfall``.

    Demoted rows (``inputs.demoted``, e.g. damaged images) are left out of the optimisation whenever the other valid
    rows number more than ``k``, so they are selected only when the budget needs them, as with ``exact``.

    When ``k`` is at least the number of valid rows, all valid rows are selected without running the optimiser
    (it could not reach the budget and would run to the iteration cap). Its settings are ``config.selector_options``
    (:class:`SgdOptions`).
    """
    options = config.selector_options
    valid = inputs.valid
    num_valid = int(valid.sum())
    preferred = inputs.preferred()
    result = SelectionResult()
    for ratio, k in ratio_budgets(inputs, ratios).items():
        alpha = config.alpha_for(ratio)
        reward = inputs.reward(alpha)
        exact = top_k(reward, inputs, k, class_balanced=False)
        if k >= num_valid:
            mask = valid.copy()
            diagnostics = {"iterations": 0, "converged": True, "budget_term": float("nan"), "objective": float("nan")}
        else:
            # Demoted rows (damaged images) join the optimisation only when the other valid rows cannot fill k.
            pool = preferred if preferred.sum() > k else valid
            pool_mask, diagnostics = run_released_sgd(
                *_terms(inputs, pool),
                k,
                inputs.num_rows,
                alpha,
                options.beta,
                options.sgd_learning_rate,
                options.sgd_max_iterations,
            )
            mask = np.zeros(inputs.num_rows, dtype=bool)
            mask[pool] = pool_mask
        count = int(mask.sum())
        diagnostics["count_before_trim"] = count
        diagnostics["count_error"] = abs(count - k)
        diagnostics["overlap_with_exact"] = kept_share(exact, mask)
        if options.sgd_exact_trim:
            mask = trim_to_budget(mask, ranking(reward, inputs.row_id), valid, k)
        result.add(ratio, mask, k, num_valid, alpha=alpha, **diagnostics)
    return result


def _terms(inputs: SelectionInputs, pool: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward's alignment and (gated) diversity terms over the ``pool`` rows, each scaled by its mean there."""
    pool_tensor = torch.from_numpy(pool)
    alignment_term = scale_by_mean(inputs.alignment(), pool_tensor)
    diversity_term = scale_by_mean(torch.from_numpy(inputs.sample_diversity_normalized), pool_tensor)
    if inputs.diversity_gate is not None:
        diversity_term = diversity_term * torch.from_numpy(inputs.diversity_gate.astype(np.float64))
    return alignment_term[pool_tensor], diversity_term[pool_tensor]
