"""Why a row was not kept: one reason per row and ratio, so that users can audit a selection.

    ""                    kept
    "undecodable"         the image could not be decoded (never selectable)
    "unusable label"      the label is missing or outside the classes (never selectable)
    <a score's reason>    a registered score explains the drop (hf_clipsel.scores), strongest first: "damaged" (the
                          pixel check flagged the image), "misaligned" (the model prefers another class than the
                          given label), "redundant" (in a dense part of its class: diversity below the class median)
    "outside the budget"  none of the above: its reward, or the selector's own ranking, fell below the k-th

A score's reason describes the row, whatever the method that dropped it.
"""

from __future__ import annotations

import numpy as np

KEPT, UNDECODABLE, UNUSABLE_LABEL, OUTSIDE_BUDGET = "", "undecodable", "unusable label", "outside the budget"


def reason_order(score_reasons: list[str]) -> tuple[str, ...]:
    """Every reason, kept first, in the order of precedence above (``score_reasons``: strongest first)."""
    return (KEPT, UNDECODABLE, UNUSABLE_LABEL, *score_reasons, OUTSIDE_BUDGET)


def drop_reasons(
    selected: np.ndarray, decode_ok: np.ndarray, flagged: np.ndarray, explained: list[tuple[str, np.ndarray]]
) -> np.ndarray:
    """One reason per row (object array of the strings above). ``flagged`` marks rows kept out of selection;
    ``explained`` lists ``(reason, bool[N] rows it explains)`` weakest first, so a stronger reason wins."""
    reasons = np.full(len(selected), OUTSIDE_BUDGET, dtype=object)
    for reason, rows in explained:
        reasons[np.asarray(rows, dtype=bool)] = reason
    reasons[np.asarray(flagged, dtype=bool)] = UNUSABLE_LABEL
    reasons[~np.asarray(decode_ok, dtype=bool)] = UNDECODABLE
    reasons[np.asarray(selected, dtype=bool)] = KEPT
    return reasons
