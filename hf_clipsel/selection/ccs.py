"""``ccs`` baseline: coverage-centric coreset selection (Zheng et al., ICLR 2023), on the alignment score.

Difficulty is ``1 - SAS~`` (a row that agrees badly with its label is hard, or mislabelled). The hardest rows are
pruned first, the remaining difficulty range is cut into equal-width strata, and the budget is spread over the
strata so that every part of the range stays covered.
"""

from __future__ import annotations

import numpy as np

from hf_clipsel.selection.config import SelectionConfig
from hf_clipsel.selection.registry import (
    SelectionInputs,
    SelectionResult,
    quota_array,
    ratio_budgets,
    register_selector,
    split_by_label,
)

# CCS's "hard cutoff" rate (the paper calls it beta; unrelated to sgd's beta). The authors tune it per
# dataset and pruning rate; it is fixed at a moderate 0.1 here because this is a baseline, not a method we tune.
HARD_CUTOFF = 0.1
NUM_STRATA = 50


def coverage_centric_sample(
    difficulty: np.ndarray, row_id: np.ndarray, k: int, rng: np.random.Generator
) -> np.ndarray:
    """Positions (into ``difficulty``) of ``min(k, n)`` rows chosen by CCS.

    1. Drop the ``HARD_CUTOFF`` fraction of hardest rows (highest difficulty, ties by row id), but never so many
       that fewer than ``k`` remain.
    2. Cut the remaining difficulty range into ``NUM_STRATA`` equal-width strata.
    3. Visit the non-empty strata from the smallest up; each takes ``min(size, remaining budget // strata left)``
       rows, uniformly at random. The last stratum takes whatever budget is left.
    """
    num_rows = difficulty.shape[0]
    k = min(k, num_rows)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    num_pruned = min(int(HARD_CUTOFF * num_rows), num_rows - k)
    hardest_first = np.lexsort((row_id, -difficulty))
    kept = np.sort(hardest_first[num_pruned:])
    values = difficulty[kept]
    low, high = values.min(), values.max()
    width = (high - low) / NUM_STRATA
    stratum = np.zeros(kept.shape[0], dtype=np.int64) if width == 0 else ((values - low) / width).astype(np.int64)
    stratum = np.minimum(stratum, NUM_STRATA - 1)  # the maximum itself belongs to the last stratum
    strata = [kept[stratum == s] for s in np.unique(stratum)]
    strata.sort(key=len)  # Python's sort is stable: equal sizes stay in difficulty order, so the result is seeded
    # Smallest first keeps the budget reachable: a stratum that cannot take its share is smaller than every later
    # one, and those can absorb what it leaves (at most one row each more than their share), so exactly k are taken.
    chosen = []
    remaining = k
    for position, members in enumerate(strata):
        take = min(len(members), remaining // (len(strata) - position))
        chosen.append(rng.choice(members, size=take, replace=False))
        remaining -= take
    return np.concatenate(chosen)


@register_selector("ccs")
def select_ccs(inputs: SelectionInputs, ratios: list[float], config: SelectionConfig) -> SelectionResult:
    """k valid rows by coverage-centric sampling of ``1 - SAS~`` (per class with ``class_balanced``), seeded.

    Each ratio is sampled independently from the same seed, so subsets of two ratios are not nested.
    """
    difficulty = 1.0 - inputs.semantic_alignment_normalized.astype(np.float64)
    valid_rows = np.flatnonzero(inputs.valid)
    result = SelectionResult()
    for ratio, k in ratio_budgets(inputs, ratios).items():
        rng = np.random.default_rng(config.seed)
        mask = np.zeros(inputs.num_rows, dtype=bool)
        if config.class_balanced:
            _, quotas = quota_array(inputs.labels[valid_rows], k)
            for rows, quota in zip(split_by_label(valid_rows, inputs.labels), quotas):
                mask[rows[coverage_centric_sample(difficulty[rows], inputs.row_id[rows], int(quota), rng)]] = True
        else:
            picked = coverage_centric_sample(difficulty[valid_rows], inputs.row_id[valid_rows], k, rng)
            mask[valid_rows[picked]] = True
        result.add(ratio, mask, k, valid_rows.shape[0])
    return result
