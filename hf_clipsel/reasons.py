"""Why a row was not kept: one reason code per row and ratio, so that users can audit a selection.

    ""                    kept
    "undecodable"         the image could not be decoded (never selectable)
    "unusable label"      the label is missing or outside the classes (never selectable)
    "damaged"             the pixel check flagged the image (noisy, low contrast, blurry): ranked after every other row
    "misaligned"          CLIP prefers another class than the given label: likely mislabelled or damaged
    "redundant"           aligned with its label, but in a dense part of its class (diversity below the class median)
    "outside the budget"  aligned and not redundant, but its reward fell below the k-th

The rules are checked in that order; "misaligned" and "redundant" describe the row, whatever the method that
dropped it.
"""

from __future__ import annotations

import numpy as np

KEPT, UNDECODABLE, UNUSABLE_LABEL, DAMAGED, MISALIGNED, REDUNDANT, OUTSIDE_BUDGET = (
    "",
    "undecodable",
    "unusable label",
    "damaged",
    "misaligned",
    "redundant",
    "outside the budget",
)
REASONS = (KEPT, UNDECODABLE, UNUSABLE_LABEL, DAMAGED, MISALIGNED, REDUNDANT, OUTSIDE_BUDGET)


def drop_reasons(
    selected: np.ndarray,
    decode_ok: np.ndarray,
    flagged: np.ndarray,
    labels: np.ndarray,
    predicted_labels: np.ndarray | None,
    diversity: np.ndarray,
    damaged: np.ndarray | None = None,
) -> np.ndarray:
    """One reason per row (object array of the strings above). ``flagged`` marks rows kept out of selection,
    ``damaged`` the rows the damage check demoted."""
    reasons = np.full(len(selected), OUTSIDE_BUDGET, dtype=object)
    usable = ~flagged
    below_median = np.zeros(len(selected), dtype=bool)
    for label in np.unique(labels[usable]):
        members = usable & (labels == label)
        below_median[members] = diversity[members] < np.median(diversity[members])
    reasons[below_median] = REDUNDANT
    if predicted_labels is not None:
        reasons[predicted_labels != labels] = MISALIGNED
    if damaged is not None:
        reasons[damaged] = DAMAGED
    reasons[flagged] = UNUSABLE_LABEL
    reasons[~decode_ok] = UNDECODABLE
    reasons[selected] = KEPT
    return reasons
