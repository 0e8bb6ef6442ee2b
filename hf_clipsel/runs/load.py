"""Reading a finished run: its scores (the one checked reader) and :func:`load_run` (scores, subsets, summary and
record), from its folder, checked against its record first, or from the Hub dataset repo it was pushed to."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset

from ..core.names import RECORD, RUN_SUMMARY, SCORES_DIR, SUBSETS_DIR, ratio_name
from ..hub_access import is_hub_repo_id
from ..scores_table import read_scores_in
from ..summary import RunSummary
from .record import IncompleteRunError, RunRecord, file_digest, verify


def is_local(location: str | Path) -> bool:
    """Whether ``location`` names a folder of this machine rather than a Hub repo id; a name that is neither (a path
    that does not exist, or no valid repo id) is a one-line error."""
    text = str(location)
    if Path(text).expanduser().is_dir():
        return True
    if not is_hub_repo_id(text):
        raise FileNotFoundError(
            f"{text} is not a folder: give the output_dir of a finished run, or the Hub dataset repo id (org/name) "
            "it was pushed to."
        )
    return False


def read_scores(
    location: str | Path, revision: str | None = None, token: str | None = None, into: str | Path | None = None
) -> Dataset:
    """The scores of a run: from its ``output_dir``, or from the Hub dataset repo it was pushed to, checked against
    the run's record (the pushed one on the Hub) first. ``into``: a folder where a local run's scores are copied and
    read from the copy's memory map rather than held in memory (:func:`~hf_clipsel.scores_table.read_scores_in`)."""
    if is_local(location):
        verify(location, deep=(SCORES_DIR,), need_selection=False)
        return read_scores_in(location, into)
    fetch = _hub_fetch(str(location), revision, token)
    return _read_entry(SCORES_DIR, _pushed_record(fetch, str(location)), str(location), fetch)


def _hub_fetch(repo_id: str, revision: str | None, token: str | None):
    """``fetch(name) -> local path`` of a file of the dataset repo ``repo_id`` (downloaded into the Hub cache)."""
    from huggingface_hub import hf_hub_download

    def fetch(name: str) -> str:
        return hf_hub_download(repo_id, name, repo_type="dataset", revision=revision, token=token)

    return fetch


def _pushed_record(fetch, repo_id: str) -> RunRecord:
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError

    try:
        return RunRecord.from_json(Path(fetch(RECORD)).read_text())
    except RepositoryNotFoundError as error:
        raise FileNotFoundError(f"{repo_id} is neither a local directory nor a dataset repo you can read.") from error
    except RemoteEntryNotFoundError as error:
        raise IncompleteRunError(
            f"{repo_id} holds no {RECORD}, which says what the run wrote: push the run again from its output_dir."
        ) from error


def _read_entry(entry: str, record: RunRecord, location: str, fetch, local: bool = False) -> Dataset:
    """The parquet files of ``entry`` (``scores``, ``subsets/ratio_0.3``) that ``record`` lists, as one dataset; a
    downloaded file is checked against the record first."""
    from datasets import load_dataset

    names = sorted(name for name in record.artefacts if name.startswith(f"{entry}/") and name.endswith(".parquet"))
    if not names:
        raise IncompleteRunError(f"{location} holds no {entry}/ in its {RECORD}: is it a finished run?")
    files = [fetch(name) if local else _checked(fetch, name, record, location) for name in names]
    return load_dataset("parquet", data_files=files, split="train")


@dataclass
class FinishedRun:
    """What :func:`load_run` returns. ``subsets`` maps each selection ratio to its subset (every source column, plus
    ``row_id``); ``scores`` has one row per source row; ``summary`` is the run's ``run_summary.json``."""

    location: str
    scores: object  # datasets.Dataset
    subsets: dict = field(default_factory=dict)
    summary: RunSummary | None = None
    record: RunRecord | None = None

    @property
    def ratios(self) -> list[float]:
        return sorted(self.subsets)


def load_run(repo_or_dir: str | Path, revision: str | None = None, token: str | None = None) -> FinishedRun:
    """The scores, subsets and summary of a finished run: its ``output_dir``, or the Hub dataset repo it was pushed
    to. The files read are checked against the run's record first (their sha256), so a file changed or replaced
    since the run wrote it is refused, locally or on the Hub."""
    location = str(repo_or_dir)
    local = is_local(location)
    if local:
        record = verify(location, deep=(SCORES_DIR, SUBSETS_DIR, RUN_SUMMARY))
        summary = RunSummary.read(location)

        def fetch(name: str) -> str:
            return str(Path(location) / name)
    else:
        fetch = _hub_fetch(location, revision, token)
        record = _pushed_record(fetch, location)
        summary = RunSummary.from_dict(json.loads(Path(_checked(fetch, RUN_SUMMARY, record, location)).read_text()))
    scores = _read_entry(SCORES_DIR, record, location, fetch, local)
    subsets = {
        ratio: _read_entry(f"{SUBSETS_DIR}/{ratio_name(ratio)}", record, location, fetch, local)
        for ratio in record.ratios
    }
    return FinishedRun(location, scores, subsets, summary, record)


def _checked(fetch, name: str, record: RunRecord, location: str) -> str:
    """The downloaded file ``name``, refused unless it has the sha256 that the pushed record gives it."""
    path = fetch(name)
    if record.artefacts.get(name) != file_digest(Path(path)):
        raise IncompleteRunError(
            f"{location}: {name} is not the file its {RECORD} lists (its sha256 differs): it was changed after the "
            "push; push the run again from its output_dir."
        )
    return path
