"""The run summary (``run_summary.json``): counts of a selection, per ratio and per class, and what the checks
found. Written by the write stage; the CLI, the report and the card read it."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
from datasets import Dataset, IterableDataset

from .adaptation import read_adapter_check
from .configs import ClipselConfig, budget
from .noise import NOISE_COLUMNS, kept_noise
from .outputs import ADAPTER_DIR, EMBEDDINGS_DIR
from .reasons import REASONS
from .run_record import directory_bytes
from .scores_table import DAMAGE, damaged_rows, drop_reason_column, selection_inputs
from .selection import select


def injected_noise(dataset, scores: Dataset, masks: dict, config: ClipselConfig) -> dict | None:
    """For a source that carries hf_clipsel.noise's record columns (``is_noisy``...): the injected noise in the pool,
    and per ratio in the subset and in a random subset of the same size (the ``random`` selector, same seed)."""
    if isinstance(dataset, IterableDataset) or "is_noisy" not in dataset.column_names:
        return None
    present = [name for name in NOISE_COLUMNS if name in dataset.column_names]
    columns = {**dataset.select_columns(present).with_format("numpy")[:], "label": np.asarray(scores["label"][:])}
    table = scores.with_format("numpy")[:]
    random_config = dataclasses.replace(config.selection, selection_method="random", class_balanced=False)
    random_masks = select(selection_inputs(table, random_config, damaged_rows(table, random_config)), random_config)
    return {
        "pool": kept_noise(columns),
        "ratios": {
            f"{ratio:g}": {"selected": kept_noise(columns, mask), "random": kept_noise(columns, random_masks[ratio])}
            for ratio, mask in masks.items()
        },
    }


def summarize(
    scores: Dataset, masks: dict, config: ClipselConfig, dataset=None, directory=None, settings: dict | None = None
) -> dict:
    """The summary of a selection. ``directory`` holds the run being written (its adapters' check); ``settings``
    the run's recorded configuration (default: ``config``'s)."""
    settings = settings or config.to_flat()
    directory = Path(directory or config.run.output_dir)
    labels = np.asarray(scores["label"][:])
    class_names = scores.features["label"].names
    valid = np.asarray(scores["flag_reason"][:]) == ""
    ratios = {}
    for ratio, mask in masks.items():
        reasons = Counter(scores[drop_reason_column(ratio)][:])
        k = budget(ratio, len(labels))
        kept_per_class = Counter(labels[mask].tolist())
        diagnostics = getattr(masks, "diagnostics", {}).get(ratio, {})
        ratios[f"{ratio:g}"] = {
            "alpha": config.selection.alpha_for(ratio),
            "budget": k,
            "kept": int(mask.sum()),
            # rows missing from the budget because too few rows are usable (sgd's own miss is in diagnostics)
            "shortfall": int(diagnostics.get("shortfall", max(k - mask.sum(), 0))),
            "diagnostics": {name: _plain(value) for name, value in diagnostics.items()},
            "dropped_by_reason": {reason: reasons[reason] for reason in REASONS if reason and reasons[reason]},
            "kept_per_class": {class_names[c]: int(kept_per_class.get(c, 0)) for c in range(len(class_names))},
        }
    damage = Counter(scores[DAMAGE][:])  # select_stage wrote it
    cache_dir = Path(config.run.cache_dir or Path(config.run.output_dir) / EMBEDDINGS_DIR)
    return {
        "adapter_check": read_adapter_check(directory / ADAPTER_DIR),
        "damaged": {kind: count for kind, count in sorted(damage.items()) if kind},
        "num_rows": len(labels),
        "num_valid": int(valid.sum()),
        "num_flagged": int((~valid).sum()),
        "class_names": class_names,
        "rows_per_class": {class_names[c]: int((labels == c).sum()) for c in range(len(class_names))},
        "dataset": settings.get("dataset_name"),
        "dataset_revision": settings.get("dataset_revision"),
        "model": settings.get("model_name_or_path"),
        "model_revision": settings.get("model_revision"),
        "selection_method": config.selection.selection_method,
        "ratios": ratios,
        "injected_noise": None if dataset is None else injected_noise(dataset, scores, masks, config),
        # the embedding caches on disk (all of them: `hf-clipsel clean` removes those no run record names)
        "embedding_cache_bytes": directory_bytes(cache_dir),
    }


def _plain(value):
    """A JSON-friendly copy of a numpy scalar."""
    return value.item() if hasattr(value, "item") else value
