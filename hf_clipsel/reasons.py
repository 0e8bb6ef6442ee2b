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
    # Each row's reason as an index into the reasons, then the reasons themselves: every row shares one Python string
    # per reason. (Strings put into an object array by np.full or a mask each became a new string object: about 90
    # bytes a row at the selection's peak, measured at 2M rows.)
    names = [OUTSIDE_BUDGET, *(reason for reason, _ in explained), UNUSABLE_LABEL, UNDECODABLE, KEPT]
    codes = np.zeros(len(selected), dtype=np.min_scalar_type(len(names)))
    for code, (_, rows) in enumerate(explained, start=1):
        codes[np.asarray(rows, dtype=bool)] = code
    codes[np.asarray(flagged, dtype=bool)] = names.index(UNUSABLE_LABEL)
    codes[~np.asarray(decode_ok, dtype=bool)] = names.index(UNDECODABLE)
    codes[np.asarray(selected, dtype=bool)] = names.index(KEPT)
    table = np.empty(len(names), dtype=object)
    table[:] = names
    return table[codes]
