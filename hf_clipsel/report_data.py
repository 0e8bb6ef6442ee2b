"""The score columns the report reads (:class:`RunScores`), read once from the run's scores table; the page and
the figures both take them from here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .core.names import PATH, drop_reason_column, reward_column, selected_column, selected_ratios
from .scores.damage import DamageCheck
from .scores.duplicate import GROUP_COLUMN
from .scores_table import read_scores_in


@dataclass
class RunScores:
    """The score columns the report uses, as numpy arrays (one entry per source row)."""

    row_id: np.ndarray
    label: np.ndarray  # -1 where the label is unusable
    predicted_label: np.ndarray  # -1 for a flagged row
    flag_reason: np.ndarray  # "" for a usable row
    path: np.ndarray  # each row's image file as the source names it; "" where it has none
    damage: np.ndarray  # what the damage check found ("noisy", ...); "" where it found nothing or did not run
    semantic_alignment: np.ndarray
    sample_diversity: np.ndarray
    semantic_alignment_normalized: np.ndarray
    sample_diversity_normalized: np.ndarray
    selected: dict[float, np.ndarray]  # ratio -> bool mask, ratios ascending
    reward: dict[float, np.ndarray]
    drop_reason: dict[float, np.ndarray]  # ratio -> each row's drop reason (hf_clipsel.reasons; "" if kept)
    class_names: list[str]
    duplicate_group: np.ndarray | None = None  # int64 near-duplicate group (-1: none); None: scores without it

    @property
    def usable(self) -> np.ndarray:
        return self.flag_reason == ""

    @property
    def ratios(self) -> list[float]:
        return list(self.selected)


def read_scores(output_dir: Path) -> RunScores:
    """The scores of the run written in ``output_dir`` (scores_table's reader) as :class:`RunScores`."""
    from datasets import ClassLabel

    scores = read_scores_in(output_dir)
    label_feature = scores.features["label"]
    if not isinstance(label_feature, ClassLabel):
        raise ValueError(f"{output_dir}: the scores' `label` column has no class names; was it written by hf-clipsel?")
    table = scores.data.table

    def column(name: str) -> np.ndarray:
        return table.column(name).to_numpy(zero_copy_only=False)

    names = table.column_names
    ratios = selected_ratios(names)
    num_rows = table.num_rows

    def text(name: str) -> np.ndarray:
        """A text column as an object array, "" for null and where the column is absent (older runs)."""
        values = table.column(name).to_pylist() if name in names else [""] * num_rows
        return np.asarray([value or "" for value in values], dtype=object)

    return RunScores(
        row_id=column("row_id").astype(np.int64),
        label=column("label").astype(np.int64),
        # Runs scored before predicted_label existed have none: -1 shows no CLIP class.
        predicted_label=(
            column("predicted_label").astype(np.int64)
            if "predicted_label" in table.column_names
            else np.full(num_rows, -1, dtype=np.int64)
        ),
        flag_reason=text("flag_reason"),
        path=text(PATH),
        damage=text(DamageCheck.flag_column),
        semantic_alignment=column("semantic_alignment").astype(np.float64),
        sample_diversity=column("sample_diversity").astype(np.float64),
        semantic_alignment_normalized=column("semantic_alignment_normalized").astype(np.float64),
        sample_diversity_normalized=column("sample_diversity_normalized").astype(np.float64),
        selected={r: column(selected_column(r)).astype(bool) for r in ratios},
        # only the methods that rank by the reward write it (exact, sgd)
        reward={r: column(reward_column(r)).astype(np.float64) for r in ratios if reward_column(r) in names},
        drop_reason={r: text(drop_reason_column(r)) for r in ratios},
        class_names=list(label_feature.names),
        duplicate_group=column(GROUP_COLUMN).astype(np.int64) if GROUP_COLUMN in names else None,
    )
