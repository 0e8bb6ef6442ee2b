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

import dataclasses

from hf_clipsel.selection import ccs, clip_score, exact, moderate, random, sgd  # noqa: F401  (registers them)
from hf_clipsel.selection.config import SelectionConfig
from hf_clipsel.selection.registry import (
    SELECTORS,
    SelectionInputs,
    SelectionResult,
    SelectorSpec,
    check_result,
    class_quotas,
    get_selector,
    ranking,
    register_selector,
    selector_spec,
    top_k,
)
from hf_clipsel.selection.sgd import SgdOptions


def select(inputs: SelectionInputs, config: SelectionConfig) -> SelectionResult:
    """Run ``config.selection_method`` for every ratio of ``config.selection_ratios``.

    Args:
        inputs: what the selectors read, one entry per row (:class:`SelectionInputs`).
        config: the selection settings; ``config.selector_options`` holds the selector's own options.

    Returns:
        ``{ratio: bool[N]}`` with per-ratio ``diagnostics``, checked against what every selector promises
        (:func:`~hf_clipsel.selection.registry.check_result`).
    """
    spec = selector_spec(config.selection_method)
    if spec.options is not None and not isinstance(config.selector_options, spec.options):
        # e.g. selection_method set on an existing config: its options are the new selector's defaults, or a mistake
        if config.selector_options is not None:
            raise ValueError(
                f"selection_method={spec.name} takes options of type {spec.options.__name__}, not "
                f"{type(config.selector_options).__name__}."
            )
        config = dataclasses.replace(config, options=spec.options())
    if config.class_balanced and not spec.supports_class_balance:
        raise ValueError(f"selection_method={spec.name} does not support class_balanced; set class_balanced false.")
    if spec.needs_image_features and inputs.image_features is None:
        raise ValueError(
            f"selection_method {spec.name} needs image features, which saved scores do not hold: select with it in "
            f"`hf-clipsel run --selection_method {spec.name}` (the features come from the embedding cache)."
        )
    ratios = list(config.selection_ratios)
    result = spec.function(inputs, ratios, config)
    check_result(spec, result, inputs, ratios)
    return result


__all__ = [
    "SELECTORS",
    "SelectionConfig",
    "SelectionInputs",
    "SelectionResult",
    "SelectorSpec",
    "SgdOptions",
    "ranking",
    "selector_spec",
    "top_k",
    "class_quotas",
    "get_selector",
    "register_selector",
    "select",
]
