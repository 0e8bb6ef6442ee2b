"""Selection (README.md, "The method", step 3): from per-row scores to one boolean mask per selection ratio.

Selectors, by ``SelectionConfig.selection_method``:

- ``exact`` (default): the k largest rewards, ties by row id; the optimum of the paper's objective at exactly k.
- ``sgd``: the released straight-through optimiser, for reproduction (optionally trimmed to exactly k).
- Baselines on the same scores: ``random``, ``clip_score`` (DataComp), ``moderate`` (Moderate-DS), ``ccs``
  (coverage-centric coreset selection).

Every selector takes ``(inputs, ratios, config)`` and returns a :class:`SelectionResult`: ``{ratio: bool[N]}`` with
``k = budget(ratio, N)`` rows selected among the valid ones (all valid rows if fewer than k; ``diagnostics[ratio]
["shortfall"]`` says by how many), plus per-ratio ``diagnostics``.
"""

from __future__ import annotations

from hf_clipsel.configs import SelectionConfig
from hf_clipsel.selection import ccs, clip_score, exact, moderate, random, sgd  # noqa: F401  (registers them)
from hf_clipsel.selection.registry import (
    SELECTORS,
    SelectionInputs,
    SelectionResult,
    class_quotas,
    get_selector,
    register_selector,
)


def select(inputs: SelectionInputs, config: SelectionConfig) -> SelectionResult:
    """Run ``config.selection_method`` for every ratio of ``config.selection_ratios``."""
    return get_selector(config.selection_method)(inputs, list(config.selection_ratios), config)


__all__ = [
    "SELECTORS",
    "SelectionInputs",
    "SelectionResult",
    "class_quotas",
    "get_selector",
    "register_selector",
    "select",
]
