"""How much injected noise a selection kept: read from the record columns that the noise injectors of
hf_clipsel.benchmarking.noise add to a dataset (``add_noise_columns``). The run summary, the CLI and the report use
it for any source that carries those columns; the injection itself is an experiment tool, outside the core."""

from __future__ import annotations

import numpy as np

NOISE_COLUMNS = ("is_noisy", "clean_label", "corruption")
NOISE_NAMES = {"label_noise": "label noise", "damaged": "damaged", "noisy": "any injected noise"}


def kept_noise(columns: dict[str, np.ndarray], mask: np.ndarray | None = None) -> dict[str, float]:
    """The share of the rows in ``mask`` (all rows when None) that carry injected noise, read from the columns
    ``add_noise_columns`` writes: ``noisy`` (`is_noisy`: any injector changed the row), ``label_noise`` (`label`
    differs from `clean_label`) and ``damaged`` (`corruption` is set), each where its columns are in ``columns``.
    Values in [0, 1]; an empty selection gives 0."""
    mask = np.ones(len(next(iter(columns.values()))), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    flags = {}
    if "is_noisy" in columns:
        flags["noisy"] = np.asarray(columns["is_noisy"], dtype=bool)
    if "clean_label" in columns and "label" in columns:
        flags["label_noise"] = np.asarray(columns["label"]) != np.asarray(columns["clean_label"])
    if "corruption" in columns:
        flags["damaged"] = np.asarray(columns["corruption"], dtype=object) != ""
    return {name: float(flag[mask].mean()) if mask.any() else 0.0 for name, flag in flags.items()}


def describe_kept_noise(kept: dict[str, float], compared: dict[str, float] | None = None, against: str = "") -> str:
    """``kept`` (:func:`kept_noise`) in words, e.g. "label noise 2.0% (random 19.0%), damaged 0.0% (random 3.0%)";
    "any injected noise" only where neither of the finer kinds is known."""
    names = [n for n in ("label_noise", "damaged") if n in kept] or [n for n in ("noisy",) if n in kept]
    parts = []
    for name in names:
        part = f"{NOISE_NAMES[name]} {kept[name]:.1%}"
        if compared is not None and name in compared:
            part += f" ({against} {compared[name]:.1%})".replace("( ", "(")
        parts.append(part)
    return ", ".join(parts)
