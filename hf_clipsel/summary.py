"""The run summary (``run_summary.json``): counts of a selection, per ratio and per class, and what the checks
found, as a typed record (:class:`RunSummary`). Written by the write stage; the CLI, the report and the card read it
through :meth:`RunSummary.read`."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, IterableDataset

from .adaptation import read_adapter_check
from .configs import ClipselConfig, budget
from .core.names import drop_reason_column
from .kept_noise import NOISE_COLUMNS, kept_noise
from .outputs import ADAPTER_DIR, EMBEDDINGS_DIR, RUN_SUMMARY, directory_bytes, write_atomic_text
from .reasons import reason_order
from .scores import drop_reason_order, flag_columns
from .scores.duplicate import GROUP_COLUMN
from .scores_table import selection_inputs
from .selection import select
from .selection.registry import kept_share
from .tables import numpy_columns


@dataclass
class RatioSummary:
    """One ratio of a selection: its budget k, the rows kept (``shortfall``: rows the budget missed because too few
    rows are usable), the method's diagnostics, the dropped rows per drop reason and the kept rows per class."""

    budget: int = 0
    kept: int = 0
    shortfall: int = 0
    alpha: float | None = None
    diagnostics: dict = field(default_factory=dict)
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    kept_per_class: dict[str, int] = field(default_factory=dict)


@dataclass
class RunSummary:
    """What a selection did. ``ratios`` is keyed by the ratio as written in config names ("0.3", "1");
    ``adapter_check`` is the held-out check's verdict (None when it did not run); ``flags`` counts what each
    flagging score found, by flag column and finding (``{"damage": {"noisy": 3}}``); ``injected_noise`` is filled
    for sources carrying the record columns of hf_clipsel.benchmarking.noise."""

    num_rows: int = 0
    num_valid: int = 0
    num_flagged: int = 0
    class_names: list[str] = field(default_factory=list)
    rows_per_class: dict[str, int] = field(default_factory=dict)
    dataset: str | None = None
    dataset_revision: str | None = None
    model: str | None = None
    model_revision: str | None = None
    selection_method: str | None = None
    ratios: dict[str, RatioSummary] = field(default_factory=dict)
    adapter_check: dict | None = None
    flags: dict[str, dict[str, int]] = field(default_factory=dict)
    injected_noise: dict | None = None
    embedding_cache_bytes: int = 0
    # for each pair of neighbouring ratios "a->b": the share of a's subset that b's keeps too (1: nested subsets)
    ratio_overlap: dict[str, float] = field(default_factory=dict)
    # for each ratio: the mean share of its subset that selections with adapters trained on other seeds keep too
    # (hf_clipsel.stability; empty unless stability_seeds was set)
    seed_overlap: dict[str, float] = field(default_factory=dict)
    # near-duplicate groups (hf_clipsel.scores.duplicate): how many, their rows, the largest ({"group", "rows"})
    duplicate_groups: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict) -> RunSummary:
        """From ``run_summary.json``'s mapping; keys it does not know (or lacks, from older runs) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in (values or {}).items() if key in known}
        ratio_keys = {f.name for f in dataclasses.fields(RatioSummary)}
        values["ratios"] = {
            ratio: RatioSummary(**{k: v for k, v in info.items() if k in ratio_keys})
            for ratio, info in (values.get("ratios") or {}).items()
        }
        return cls(**values)

    @classmethod
    def read(cls, directory: str | Path) -> RunSummary:
        """The summary written in ``directory``; an empty one where there is none."""
        path = Path(directory) / RUN_SUMMARY
        return cls.from_dict(json.loads(path.read_text())) if path.exists() else cls()

    def write(self, directory: str | Path) -> None:
        write_atomic_text(Path(directory) / RUN_SUMMARY, json.dumps(dataclasses.asdict(self), indent=2))


def injected_noise(dataset, scores: Dataset, masks: dict, config: ClipselConfig) -> dict | None:
    """For a source that carries hf_clipsel.benchmarking.noise's record columns (``is_noisy``...): the injected noise
    in the pool, and per ratio in the subset and in a random subset of the same size (the ``random`` selector, same
    seed)."""
    if isinstance(dataset, IterableDataset) or "is_noisy" not in dataset.column_names:
        return None
    present = [name for name in NOISE_COLUMNS if name in dataset.column_names]
    table = numpy_columns(scores)
    columns = {**numpy_columns(dataset, present), "label": table["label"]}
    random_config = dataclasses.replace(config.selection, selection_method="random", class_balanced=False)
    # the flags select_stage found and wrote, not found again: the random draw sees the same valid rows
    flags = {column: table[column].astype(object) for column in flag_columns() if column in table}
    random_masks = select(selection_inputs(table, random_config, flags), random_config)
    return {
        "pool": kept_noise(columns),
        "ratios": {
            f"{ratio:g}": {"selected": kept_noise(columns, mask), "random": kept_noise(columns, random_masks[ratio])}
            for ratio, mask in masks.items()
        },
    }


def summarize(
    scores: Dataset,
    masks: dict,
    config: ClipselConfig,
    dataset=None,
    directory=None,
    settings: dict | None = None,
    seed_overlap: dict | None = None,
) -> RunSummary:
    """The summary of a selection. ``directory`` holds the run being written (its adapters' check); ``settings``
    the run's recorded configuration (default: ``config``'s); ``seed_overlap`` hf_clipsel.stability's measure."""
    settings = settings or config.to_flat()
    directory = Path(directory or config.run.output_dir)
    # counted by numpy and Arrow, not row by row in Python: at ImageNet-21k's size (13M rows, 21,000 classes) a
    # Python object per row, or a pass over the rows per class, would take hours
    table = numpy_columns(scores, ["label", "flag_reason"])
    labels = table["label"]
    class_names = scores.features["label"].names
    valid = table["flag_reason"] == ""
    del table
    labelled = labels >= 0  # -1: a missing or out-of-range label, in no class
    ratios = {}
    for ratio, mask in masks.items():
        reasons = value_counts(scores, drop_reason_column(ratio))
        k = budget(ratio, len(labels))
        kept_per_class = np.bincount(labels[mask & labelled], minlength=len(class_names))
        diagnostics = getattr(masks, "diagnostics", {}).get(ratio, {})
        ratios[f"{ratio:g}"] = RatioSummary(
            alpha=config.selection.alpha_for(ratio),
            budget=k,
            kept=int(mask.sum()),
            # rows missing from the budget because too few rows are usable (sgd's own miss is in diagnostics)
            shortfall=int(diagnostics.get("shortfall", max(k - mask.sum(), 0))),
            diagnostics={name: _plain(value) for name, value in diagnostics.items()},
            dropped_by_reason={
                reason: reasons[reason] for reason in reason_order(drop_reason_order()) if reason and reasons[reason]
            },
            kept_per_class={class_names[c]: int(kept_per_class[c]) for c in range(len(class_names))},
        )
    # a finding "kind: detail" (e.g. "duplicate: row 12 kept") is counted by its kind
    found = {column: Counter() for column in flag_columns() if column in scores.column_names}
    for column, counts in found.items():
        for value, count in value_counts(scores, column).items():
            counts[str(value).split(": ", 1)[0]] += count
    rows_per_class = np.bincount(labels[labelled], minlength=len(class_names))
    cache_dir = Path(config.run.cache_dir or Path(config.run.output_dir) / EMBEDDINGS_DIR)
    return RunSummary(
        adapter_check=read_adapter_check(directory / ADAPTER_DIR),
        flags={column: {kind: n for kind, n in sorted(counts.items()) if kind} for column, counts in found.items()},
        num_rows=len(labels),
        num_valid=int(valid.sum()),
        num_flagged=int((~valid).sum()),
        class_names=list(class_names),
        rows_per_class={class_names[c]: int(rows_per_class[c]) for c in range(len(class_names))},
        dataset=settings.get("dataset_name"),
        dataset_revision=settings.get("dataset_revision"),
        model=settings.get("model_name_or_path"),
        model_revision=settings.get("model_revision"),
        selection_method=config.selection.selection_method,
        ratios=ratios,
        injected_noise=None if dataset is None else injected_noise(dataset, scores, masks, config),
        # the embedding caches on disk (all of them: `hf-clipsel clean` removes those no run record names)
        embedding_cache_bytes=directory_bytes(cache_dir),
        ratio_overlap=ratio_overlap(masks),
        seed_overlap=seed_overlap or {},
        duplicate_groups=duplicate_groups(scores),
    )


def duplicate_groups(scores: Dataset, largest: int = 5) -> dict:
    """``{"groups", "rows", "largest": [{"group": id, "rows": n}]}`` of the scores' near-duplicate groups; {} for
    scores without them."""
    if GROUP_COLUMN not in scores.column_names:
        return {}
    group = np.asarray(numpy_columns(scores, [GROUP_COLUMN])[GROUP_COLUMN], dtype=np.int64)
    ids, sizes = np.unique(group[group >= 0], return_counts=True)
    order = np.lexsort((ids, -sizes))[:largest]
    return {
        "groups": len(ids),
        "rows": int(sizes.sum()),
        "largest": [{"group": int(ids[i]), "rows": int(sizes[i])} for i in order],
    }


def value_counts(scores: Dataset, column: str) -> Counter:
    """How many rows hold each value of ``column``, counted by Arrow: only the distinct values become Python
    objects."""
    counted = pc.value_counts(scores.select_columns([column]).with_format("arrow")[:].column(column))
    return Counter(dict(zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist())))


def ratio_overlap(masks: dict) -> dict[str, float]:
    """Selection stability across neighbouring ratios: for each ratio and the next larger one, the share of the
    smaller subset that the larger one keeps too, in [0, 1] (1 when the subsets are nested, as exact's are)."""
    ratios = sorted(masks)
    return {
        f"{small:g}->{large:g}": kept_share(masks[small], masks[large]) for small, large in zip(ratios, ratios[1:])
    }


def _plain(value):
    """A JSON-friendly copy of a numpy scalar."""
    return value.item() if hasattr(value, "item") else value
