"""A finished run, read back: its scores, its subsets and its summary, from its folder or its Hub dataset repo."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, load_dataset

from .outputs import RUN_SUMMARY, ratio_name


@dataclass
class FinishedRun:
    """What :func:`load_run` returns. ``subsets`` maps each selection ratio to its subset (every source column, plus
    ``row_id``); ``scores`` has one row per source row; ``summary`` is the run's ``run_summary.json``."""

    location: str
    scores: Dataset
    subsets: dict[float, Dataset] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    @property
    def ratios(self) -> list[float]:
        return sorted(self.subsets)


def _summary(location: str, revision: str | None, token: str | None) -> dict:
    path = Path(location)
    if path.is_dir():
        return json.loads((path / RUN_SUMMARY).read_text()) if (path / RUN_SUMMARY).exists() else {}
    from huggingface_hub import hf_hub_download

    local = hf_hub_download(location, RUN_SUMMARY, repo_type="dataset", revision=revision, token=token)
    return json.loads(Path(local).read_text())


def load_run(repo_or_dir: str | Path, revision: str | None = None, token: str | None = None) -> FinishedRun:
    """The scores, subsets and summary of a finished run: its ``output_dir``, or the dataset repo it was pushed to."""
    location = str(repo_or_dir)
    summary = _summary(location, revision, token)
    options = dict(revision=revision, token=token) if not Path(location).is_dir() else {}
    scores = load_dataset(location, "scores", split="train", **options)
    ratios = [float(ratio) for ratio in summary.get("ratios", {})]
    subsets = {ratio: load_dataset(location, ratio_name(ratio), split="train", **options) for ratio in ratios}
    return FinishedRun(location, scores, subsets, summary)
