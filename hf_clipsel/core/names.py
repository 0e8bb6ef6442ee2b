"""Names every layer shares: budgets, ratio names, the run folder's entries and the scores table's per-ratio columns.

A leaf: whoever writes a file or a column and whoever reads it take its name from here.
"""

from __future__ import annotations

import math
from fractions import Fraction

# The row's position in the source split, carried through every artefact.
ROW_ID = "row_id"
# The scores table's column of each row's image file ("" where the source holds bytes only).
PATH = "path"

# The entries of a run's folder (output_dir); README.md, "Outputs", shows the layout.
SCORES_DIR = "scores"
SUBSETS_DIR = "subsets"
ADAPTER_DIR = "adapter"
EMBEDDINGS_DIR = "embeddings"
REPORT_DIR = "report"
RUN_CONFIG = "run_config.yaml"
RUN_SUMMARY = "run_summary.json"
RECORD = "run_record.json"
CARD = "README.md"
# The report's figures, in the order the report and the dataset card show them.
REPORT_FIGURES = ("score_distributions.png", "alignment_vs_diversity.png", "kept_per_class.png")

# The per-ratio columns a selection adds to the scores table.
SELECTION_PREFIXES = ("reward_", "is_selected_", "drop_reason_")


def ratio_name(selection_ratio: float) -> str:
    """Name of a ratio's subset config and the suffix of its score columns: 0.3 -> "ratio_0.3", 1.0 -> "ratio_1"."""
    return f"ratio_{selection_ratio:g}"


def budget(selection_ratio: float, num_rows: int) -> int:
    """Number of rows kept at ``selection_ratio``: floor(ratio * N) without float artefacts.

    ``0.57 * 50000`` is 28499.999... in binary floating point; the decimal reading of the ratio gives 28500.
    """
    return math.floor(Fraction(str(selection_ratio)) * num_rows)


def selected_column(selection_ratio: float) -> str:
    return f"is_selected_{ratio_name(selection_ratio)}"


def drop_reason_column(selection_ratio: float) -> str:
    return f"drop_reason_{ratio_name(selection_ratio)}"


def reward_column(selection_ratio: float) -> str:
    return f"reward_{ratio_name(selection_ratio)}"


def selected_ratios(column_names: list[str]) -> list[float]:
    """The ratios a table with these columns holds a selection for, ascending."""
    prefix = "is_selected_ratio_"  # selected_column(r) is this plus f"{r:g}"
    return sorted(float(name.removeprefix(prefix)) for name in column_names if name.startswith(prefix))
