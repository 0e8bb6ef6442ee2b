"""Near-duplicates and conflicting labels (hf_clipsel.duplicates): each row's nearest neighbour within its class and
across classes, its near-duplicate group, and at selection time one kept copy per group and label.

Two scores share this file because they read the same columns: ``duplicate`` (the columns; flags every copy of a
group and label but the best one, drop reason ``duplicate``) and ``conflicting_labels`` (no columns of its own; flags
the copies of an image filed under several labels, drop reason ``conflicting labels``). Flagged rows are ranked after
every other row, so a selection takes a second copy only when the budget exceeds the rows that are not flagged.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref

import numpy as np
import torch

from ..duplicates import (
    CROP_SIMILARITY,
    DUPLICATE_SIMILARITY,
    FEATURE_AGREEMENT,
    THUMBNAIL_SIMILARITY,
    find_duplicates,
)
from ..features import FeatureStore
from ..selection.registry import alignment_term
from ..thumbnails import CROP_SIDE, THUMBNAIL_SIDE, thumbnail
from .base import Column, Score, ScoreInputs, register_score

# In a group of several labels, keep the copies of the label the model prefers (True) or none (False). Measured on
# recipes/benchmarks/bench_duplicates.py's cross-class copies (README there): the proxy CLIP preferred the true label
# in 32 of the 37 groups found (0.86), so keeping its choice would keep a wrong label in about one group of seven;
# keeping none costs one correct image per group and keeps no wrong label.
KEEP_PREFERRED_LABEL = False

logger = logging.getLogger(__name__)

GROUP_COLUMN = "duplicate_group"
THUMBNAIL = "pixel_thumbnail"
CROP_THUMBNAIL = "pixel_thumbnail_fine"


def preference(table: dict, selection) -> np.ndarray:
    """float32 ``[N]``: which copy of a group a selection keeps, higher first: the reward's alignment term as the
    selection builds it (:func:`hf_clipsel.selection.registry.alignment_term`: SAS~, the class posterior~, or
    both, as ``alignment`` says). The reward itself depends on each ratio's alpha, and copies are each other's
    nearest neighbours, so their diversity terms are nearly equal: alignment decides."""
    posterior = table.get("class_posterior_normalized") if selection.alignment != "sas" else None
    return alignment_term(
        np.array(table["semantic_alignment_normalized"], dtype=np.float32),  # own, writable copies
        None if posterior is None else np.array(posterior, dtype=np.float32),
        np.asarray(table["flag_reason"]) == "",
        posterior_alone=selection.alignment == "posterior",
    ).numpy()


class _LastFindings:
    """The findings of the last (table, selection): both scores' flags (and their drop reasons) come from one
    search of the groups per selection. Keyed on the identity of the columns read (weak references, so no table is
    kept alive) and on the selection's settings, and let go with the table's group column: two object arrays of N
    (16 bytes a row) are not held after the selection that read them."""

    def __init__(self):
        self.references: list | None = None
        self.settings: tuple | None = None
        self.found: tuple[np.ndarray, np.ndarray] | None = None

    def get(self, table: dict, selection, compute) -> tuple[np.ndarray, np.ndarray]:
        columns = [table.get(name) for name in _READ_COLUMNS]
        settings = dataclasses.astuple(selection)
        if (
            self.references is not None
            and settings == self.settings
            and all(
                column is None if reference is None else reference() is column
                for reference, column in zip(self.references, columns)
            )
        ):
            return self.found
        try:
            references = [None if column is None else weakref.ref(column) for column in columns]
        except TypeError:  # a column that cannot be referenced weakly (a list): nothing to key on
            return compute()
        self.references, self.settings, self.found = references, settings, compute()
        weakref.finalize(columns[0], self._forget, references)  # columns[0]: the group column, never None here
        return self.found

    def _forget(self, references: list) -> None:
        if self.references is references:  # not a later table's findings
            self.references = self.settings = self.found = None


_READ_COLUMNS = (GROUP_COLUMN, "label", "flag_reason", "semantic_alignment_normalized", "class_posterior_normalized")
_LAST = _LastFindings()


def findings(table: dict, selection) -> tuple[np.ndarray, np.ndarray] | None:
    """``(duplicate, conflict)`` flags of :func:`duplicate_findings` (all ``""`` when
    ``selection.duplicate_check`` is off); None for scores without the group column (from an older hf_clipsel).
    Computed once per table and selection settings, however many of the two scores' flags ask."""
    if GROUP_COLUMN not in table:
        return None
    if not selection.duplicate_check:
        none = np.full(len(table["label"]), "", dtype=object)
        return none, none

    def compute() -> tuple[np.ndarray, np.ndarray]:
        return duplicate_findings(
            np.asarray(table[GROUP_COLUMN], dtype=np.int64),
            np.asarray(table["label"], dtype=np.int64),
            preference(table, selection),
            np.asarray(table["flag_reason"]) == "",
            KEEP_PREFERRED_LABEL,
        )

    return _LAST.get(table, selection, compute)


@register_score
class NearDuplicates(Score):
    name = "duplicate"
    columns = (
        Column(
            "duplicate_similarity_same_class",
            "cosine of the row's zero-mean grey thumbnail and its nearest other row's of the same class",
            f"[-1, 1] (-1: none); >= {THUMBNAIL_SIMILARITY} with a feature agreement >= {FEATURE_AGREEMENT}: a "
            f"near-duplicate (scores without thumbnails: centred feature cosine, >= {DUPLICATE_SIMILARITY})",
        ),
        Column(
            "duplicate_similarity_other_class",
            "the same with its nearest row of another class among the rows of the same predicted class",
            f"[-1, 1] (-1: none); >= {THUMBNAIL_SIMILARITY} with a feature agreement >= {FEATURE_AGREEMENT}: the "
            "same image under another label",
        ),
        Column(
            GROUP_COLUMN,
            "near-duplicate group (rows joined by thumbnail and feature cosine, and with the scoring setting "
            f"duplicate_crops, crops whose boxes align at >= {CROP_SIMILARITY}): its smallest row_id",
            "a row_id; -1: no near-duplicate",
            dtype="int64",
        ),
        Column(
            "nearest_duplicate",
            "row_id of the row's most similar near-duplicate, either class",
            "a row_id; -1: none",
            dtype="int64",
        ),
    )
    # The thumbnail is measured while embedding (cached with the pixel statistics) and compared here; the scores
    # table shows the similarities, not the grids.
    measures_pixels = True
    measured = (
        Column(
            THUMBNAIL,
            f"grey levels averaged over a {THUMBNAIL_SIDE}x{THUMBNAIL_SIDE} grid of the whole image",
            "[0, 255] each",
            dtype="uint8",
            length=THUMBNAIL_SIDE**2,
        ),
        Column(
            CROP_THUMBNAIL,
            f"the same over a {CROP_SIDE}x{CROP_SIDE} grid: the crop search's boxes are cut from it",
            "[0, 255] each",
            dtype="uint8",
            length=CROP_SIDE**2,
        ),
    )
    version = 2  # 2: the finer thumbnail
    # A dropped copy of an image whose group keeps a better copy of the same label.
    # Between misaligned (20) and damaged (30): which copy a group keeps says more than "misaligned" does, and a pixel
    # defect (or a score another package adds at 25) says more than that the image has a copy.
    drop_reason = "duplicate"
    reason_rank = 22
    flag_column = "duplicate"

    def measure(self, image) -> tuple[list[int], list[int]]:
        grey = None if image is None else image.convert("L")  # converted once for both grids
        return thumbnail(grey), thumbnail(grey, CROP_SIDE)

    def compute(self, inputs: ScoreInputs) -> dict[str, np.ndarray]:
        thumbnails = _thumbnails(inputs.statistics.get(THUMBNAIL), THUMBNAIL_SIDE**2)
        crop_thumbnails = None
        if inputs.duplicate_crops:
            crop_thumbnails = _thumbnails(inputs.statistics.get(CROP_THUMBNAIL), CROP_SIDE**2)
            if thumbnails is not None and crop_thumbnails is None:  # without thumbnails, the features decide
                logger.warning(
                    f"duplicate_crops: no {CROP_THUMBNAIL} (16x16 thumbnails) in these statistics, cropped copies "
                    "not searched."
                )
        found = find_duplicates(
            inputs.image_features,
            inputs.class_features,
            inputs.labels,
            inputs.valid,
            share=inputs.share,
            thumbnails=thumbnails,
            crop_thumbnails=crop_thumbnails,
            predicted_classes=inputs.predicted,
        )
        return {
            "duplicate_similarity_same_class": found["same_class"],
            "duplicate_similarity_other_class": found["other_class"],
            GROUP_COLUMN: found["group"],
            "nearest_duplicate": found["nearest"],
        }

    def flags(self, table: dict, selection) -> np.ndarray | None:
        """``"duplicate: row <r> kept"`` for every copy of a group and label but its best ``r``."""
        found = findings(table, selection)
        return None if found is None else found[0]


def _thumbnails(grids, length: int) -> torch.Tensor | FeatureStore | None:
    """Thumbnails of ``length`` values as the search reads them, by row ids: the class-sorted store the score stage
    writes (read a class at a time), or ``[N, length]`` grids in memory (inputs built by hand). None where there are
    none (inputs without them, e.g. a benchmark's synthetic statistics): the features alone decide, or without the
    finer grids, crops are not searched."""
    if isinstance(grids, FeatureStore):
        return grids if grids.dim == length else None
    grids = np.asarray(() if grids is None else grids)
    return torch.from_numpy(grids) if grids.shape[1:] == (length,) else None


@register_score
class ConflictingLabels(Score):
    name = "conflicting_labels"
    # A dropped copy of an image that the source files under several labels.
    drop_reason = "conflicting labels"
    reason_rank = 24
    flag_column = "conflicting_labels"

    def flags(self, table: dict, selection) -> np.ndarray | None:
        """``"conflicting labels: row <r> is labelled <label>"`` for the copies of an image under several labels."""
        found = findings(table, selection)
        return None if found is None else found[1]


def duplicate_findings(
    group: np.ndarray, labels: np.ndarray, preference: np.ndarray, usable: np.ndarray, keep_preferred_label: bool
) -> tuple[np.ndarray, np.ndarray]:
    """What a selection flags in the near-duplicate groups: copies within a class, and labels that conflict.

    Args:
        group: int64 ``[N]`` group ids (-1: none), as :func:`find_duplicates` gives them.
        labels: ``[N]`` given labels.
        preference: ``[N]`` float, higher is better: the row a group keeps of each label is its best.
        usable: ``[N]`` bool; other rows are in no group.
        keep_preferred_label: in a group of several labels, keep the copies of the label of its best row (the one
            the model prefers) and flag the others; False: flag every copy of such a group.

    Returns:
        ``(duplicate, conflict)``: object ``[N]`` of ``""`` or ``"duplicate: row <r> kept"`` (every row of a group
        and label but its best ``r``), and ``""`` or ``"conflicting labels: row <r> is labelled <label>"``.
    """
    num_rows = len(group)
    duplicate = np.full(num_rows, "", dtype=object)
    conflict = np.full(num_rows, "", dtype=object)
    members = np.nonzero(usable & (group >= 0))[0]
    if members.size == 0:
        return duplicate, conflict
    # Sorted by group, then label, then best first (ties: lowest row id): each (group, label) run starts at its best.
    members = members[np.lexsort((members, -preference[members], labels[members], group[members]))]
    member_group, member_label = group[members], labels[members]
    new_group = np.r_[True, member_group[1:] != member_group[:-1]]
    new_run = new_group | np.r_[True, member_label[1:] != member_label[:-1]]
    run_best = members[new_run][np.cumsum(new_run) - 1]
    for row, best in zip(members[~new_run], run_best[~new_run]):
        duplicate[row] = f"duplicate: row {best} kept"
    # Groups of several labels: every run's best row, and the group's best of them (the label the model prefers).
    group_bounds = np.r_[np.nonzero(new_group)[0], len(members)]
    labels_per_group = np.add.reduceat(new_run.astype(np.int64), group_bounds[:-1])
    for index in np.nonzero(labels_per_group > 1)[0]:
        begin, end = group_bounds[index], group_bounds[index + 1]
        bests = members[begin:end][new_run[begin:end]]
        preferred = bests[np.lexsort((bests, -preference[bests]))[0]]
        for row in members[begin:end]:
            if keep_preferred_label and labels[row] == labels[preferred]:
                continue
            # name a copy under another label: the preferred one, or for its own copies the best of another label
            other = preferred if labels[row] != labels[preferred] else bests[bests != preferred][0]
            conflict[row] = f"conflicting labels: row {other} is labelled {labels[other]}"
    return duplicate, conflict
