"""Per-row scores as a registry (:mod:`hf_clipsel.scores.base`): each score one file. Importing this package
registers the built-in ones, in the scores table's column order."""

from __future__ import annotations

# isort: off
from . import alignment, diversity, posterior, damage, duplicate  # noqa: F401  (registers them, in this order)

# isort: on
from .base import (
    SCORES,
    Column,
    Score,
    ScoreInputs,
    drop_reason_order,
    flag_columns,
    measure_image,
    measured_columns,
    measured_specs,
    measurement_versions,
    register_score,
    registered_scores,
    score_columns,
)

__all__ = [
    "SCORES",
    "Column",
    "Score",
    "ScoreInputs",
    "drop_reason_order",
    "flag_columns",
    "measure_image",
    "measured_columns",
    "measured_specs",
    "measurement_versions",
    "register_score",
    "registered_scores",
    "score_columns",
]
