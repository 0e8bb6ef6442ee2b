"""Files as answers: the rows a finished run dropped (or kept) at one ratio, as a CSV a user acts on: each row's file,
its given label, why it was dropped and its scores. `hf-clipsel export` writes it."""

from __future__ import annotations

import logging
from pathlib import Path

from .core.names import PATH, ROW_ID, drop_reason_column, reward_column, selected_column, selected_ratios
from .runs.load import read_scores
from .scores import flag_columns, score_columns

logger = logging.getLogger(__name__)

DROP_REASON = "drop_reason"  # the exported name of the ratio's drop_reason_ratio_<r> column


def export_rows(output_dir: str | Path, ratio: float, kept: bool = False, to: str | Path | None = None) -> Path:
    """Write the rows the run in ``output_dir`` dropped at ``ratio`` (with ``kept``: those it kept) as a CSV.

    Args:
        output_dir: the folder of a finished run (checked against its record first).
        ratio: one of the run's selection ratios, in (0, 1].
        kept: export the kept rows instead of the dropped ones.
        to: the CSV file to write; default ``dropped_ratio_<r>.csv`` (or ``kept_...``) in the current directory.

    Returns:
        The path of the CSV written. Columns: ``row_id``, ``path`` (the row's image file, "" where the source holds
        bytes only), ``given_label``, ``drop_reason`` ("" for a kept row), ``flag_reason``, the flags (``damage``),
        every score column, and the ratio's reward where its selector ranks by one; rows in source order.
    """
    scores = read_scores(output_dir)
    ratios = selected_ratios(scores.column_names)
    if selected_column(ratio) not in scores.column_names:
        listed = ", ".join(f"{r:g}" for r in ratios) or "none"
        raise ValueError(
            f"the run in {output_dir} has no selection at ratio {ratio:g} (its ratios: {listed}); pass one of them, "
            f"or add it with `hf-clipsel select --output_dir {output_dir} --selection_ratios {ratio:g}`."
        )
    if PATH not in scores.column_names:  # scores from before the path column
        logger.warning("the scores of %s name no files (an older hf_clipsel); the path column is empty.", output_dir)
        scores = scores.add_column(PATH, [""] * len(scores))
    selected = scores[selected_column(ratio)][:]
    rows = [row for row, is_kept in enumerate(selected) if is_kept == kept]
    scores = scores.rename_column(drop_reason_column(ratio), DROP_REASON)
    wanted = [
        ROW_ID,
        PATH,
        "given_label",
        DROP_REASON,
        "flag_reason",
        *flag_columns(),
        *(column.name for column in score_columns()),
        reward_column(ratio),
    ]
    table = scores.select_columns([name for name in wanted if name in scores.column_names]).select(rows)
    which = "kept" if kept else "dropped"
    to = Path(to) if to else Path(f"{which}_ratio_{ratio:g}.csv")
    table.to_csv(to, index=False)
    return to
