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
import pyarrow as pa

KEPT, UNDECODABLE, UNUSABLE_LABEL, OUTSIDE_BUDGET = "", "undecodable", "unusable label", "outside the budget"


def reason_order(score_reasons: list[str]) -> tuple[str, ...]:
    """Every reason, kept first, in the order of precedence above (``score_reasons``: strongest first)."""
    return (KEPT, UNDECODABLE, UNUSABLE_LABEL, *score_reasons, OUTSIDE_BUDGET)


def drop_reasons(
    selected: np.ndarray, decode_ok: np.ndarray, flagged: np.ndarray, explained: list[tuple[str, np.ndarray]]
) -> pa.StringArray:
    """One reason per row (an Arrow string array of the reasons above). ``flagged`` marks rows kept out of
    selection; ``explained`` lists ``(reason, bool[N] rows it explains)`` weakest first, so a stronger reason wins."""
    # Each row's reason as an index into the reasons, which Arrow then turns into the strings: no Python object per
    # row. (Strings put into an object array by np.full or a mask each became a new string object, about 90 bytes a
    # row at 2M rows; an object array sharing one string per reason still cost 8 bytes a row and Arrow's conversion
    # of it 55 more at its peak.)
    names = [OUTSIDE_BUDGET, *(reason for reason, _ in explained), UNUSABLE_LABEL, UNDECODABLE, KEPT]
    codes = np.zeros(len(selected), dtype=np.min_scalar_type(len(names)))
    for code, (_, rows) in enumerate(explained, start=1):
        codes[np.asarray(rows, dtype=bool)] = code
    codes[np.asarray(flagged, dtype=bool)] = names.index(UNUSABLE_LABEL)
    codes[~np.asarray(decode_ok, dtype=bool)] = names.index(UNDECODABLE)
    codes[np.asarray(selected, dtype=bool)] = names.index(KEPT)
    return pa.array(names, pa.string()).take(pa.array(codes))
