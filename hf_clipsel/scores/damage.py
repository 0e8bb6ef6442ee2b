"""The damage check: three pixel statistics measured while decoding, flagged against the dataset's own spread
(hf_clipsel.image_quality). Flagged rows are ranked after every other row and dropped ones are ``damaged``."""

from __future__ import annotations

import logging

import numpy as np

from ..image_quality import STATISTICS_VERSION, UNMEASURED, damage_flags, flag_share_warning, pixel_statistics
from .base import Column, Score, register_score

logger = logging.getLogger(__name__)
_WARNED: set[str] = set()


@register_score
class DamageCheck(Score):
    name = "damage"
    columns = (
        Column(
            "noise_level",
            "estimated standard deviation of additive pixel noise (damage check)",
            ">= 0, grey levels in [0, 1]; higher: noisier",
        ),
        Column("contrast", "standard deviation of the grey pixels (damage check)", "[0, 0.5]; near 0: blank"),
        Column(
            "sharpness",
            "fine-scale detail relative to half resolution (damage check)",
            "> 0; lower: blurrier than the dataset's usual",
        ),
    )
    measures_pixels = True
    version = STATISTICS_VERSION
    drop_reason = "damaged"
    reason_rank = 30
    flag_column = "damage"

    def measure(self, image) -> tuple[float, ...]:
        return UNMEASURED if image is None else pixel_statistics(image)

    def flags(self, table: dict, selection) -> np.ndarray | None:
        """``noisy``, ``low contrast`` or ``blurry`` per row when ``selection.damage_check`` is on; all ``""`` off."""
        if not selection.damage_check:
            return np.full(len(table["label"]), "", dtype=object)
        missing = [column.name for column in self.columns if column.name not in table]
        if missing:
            raise ValueError(
                f"damage_check needs the scores' {missing[0]} column, which these scores (from an older hf_clipsel) "
                "lack; score again with `hf-clipsel score`, or select with the setting off."
            )
        statistics = [table[column.name] for column in self.columns]
        usable = np.asarray(table["flag_reason"]) == ""
        flags = damage_flags(*statistics, usable, selection.damage_threshold, selection.damage_false_discovery)
        warning = flag_share_warning(flags, usable)
        # A check meant for a damaged minority that flags many rows: say so, and how to turn it off; once (the
        # stability stage selects again with each seed, from the same statistics).
        if warning and warning not in _WARNED:
            _WARNED.add(warning)
            logger.warning(warning)
        return flags
