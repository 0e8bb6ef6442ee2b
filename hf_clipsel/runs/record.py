"""The run record: what a run is, what it wrote, and whether a folder holds it whole. Every command asks here.

A run's folder (``output_dir``) holds ``run_record.json``: the run's identity (every setting that changes results,
per stage; the source's size and labels digest; the checkpoint), what each stage recorded, and the sha256 of every
artefact (scores, subsets, adapters, report, configuration, summary). It is written last, atomically. A folder
whose record is missing, or whose files do not match it, is an *incomplete* run: ``push`` refuses it, ``load_run``
refuses it, and the card (README.md, which makes the folder a dataset) is then a placeholder whose configs match no
file, so ``load_dataset(output_dir)`` refuses it too. Writing a run's folder (lock, staging, swap) is
hf_clipsel.runs.folder's business; reading a finished run, hf_clipsel.runs.load's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..configs import CONFIG_CLASSES, AdapterConfig, ClipselConfig, DataConfig, ModelConfig, ScoringConfig
from ..core.names import (
    ADAPTER_DIR,
    CARD,
    RECORD,
    REPORT_DIR,
    RUN_CONFIG,
    RUN_SUMMARY,
    SCORES_DIR,
    SUBSETS_DIR,
)
from ..outputs import library_versions
from ..selection import SelectionConfig

logger = logging.getLogger(__name__)

RECORD_FORMAT = 1
# The run's own entries of output_dir, swapped whole by a commit. Anything else there (the embedding cache, a
# user's files) is left alone.
ARTEFACTS = (SCORES_DIR, SUBSETS_DIR, ADAPTER_DIR, REPORT_DIR, RUN_CONFIG, RUN_SUMMARY)
STAGES = ("embed", "adapt", "score", "select")
# The settings each stage's results depend on. Settings in no stage change no number (where to write, push, etc.).
STAGE_SETTINGS = {
    "embed": (
        *(f.name for f in dataclasses.fields(DataConfig) if f.name != "streaming"),
        *(f.name for f in dataclasses.fields(ModelConfig)),
        "batch_size",
        "jpeg_draft",
        "embedding_chunk_size",
    ),
    "adapt": (*(f.name for f in dataclasses.fields(AdapterConfig)), "seed"),
    "score": tuple(f.name for f in dataclasses.fields(ScoringConfig)),
    # and the chosen selector's own options (stage_settings adds them)
    "select": tuple(f.name for f in dataclasses.fields(SelectionConfig) if f.init),
}
# The folder entries each stage writes (run_config.yaml is rewritten by every stage from the record).
STAGE_ARTEFACTS = {
    "adapt": ("adapter",),
    "score": ("scores", "run_config.yaml"),
    "select": ("scores", "subsets", "report", "run_config.yaml", "run_summary.json"),
}
SELECT_KEYS = (*(f.name for f in dataclasses.fields(DataConfig)), *STAGE_SETTINGS["select"])
# What a record without a setting (written before the setting existed) ran with, where its settings group declares
# it (``ABSENT_MEANS``): a new setting whose default changes the results then disagrees with such a record rather
# than passing for what it did. A setting that declares nothing agrees with a record that lacks it.
ABSENT_MEANS = {name: value for group in CONFIG_CLASSES for name, value in getattr(group, "ABSENT_MEANS", {}).items()}
INCOMPLETE_CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: this-hf-clipsel-run-is-incomplete/*
tags:
- hf-clipsel
---
# An incomplete hf-clipsel run

This folder holds no finished selection: a run is writing it, or one was stopped before it finished. `hf-clipsel
run` with the same settings finishes it (the embedding cache is reused); `run_record.json` appears when it is whole.
"""


class IncompleteRunError(ValueError):
    """A folder whose record is missing or does not match its files."""


def stage_settings(config: ClipselConfig, stage: str) -> dict:
    flat = config.to_flat()
    keys = STAGE_SETTINGS[stage]
    options = config.selection.selector_options
    if stage == "select" and options is not None:
        keys = (*keys, *(f.name for f in dataclasses.fields(options)))
    return {key: flat[key] for key in keys}


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def _artefact_files(root: Path) -> list[Path]:
    files = []
    for entry in ARTEFACTS:
        path = root / entry
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(p for p in sorted(path.rglob("*")) if p.is_file())
    return [p for p in files if not any(part.startswith(".") for part in p.relative_to(root).parts)]


def artefact_sizes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in _artefact_files(root)}


@dataclass
class RunRecord:
    """What a run is and what it wrote. ``stages`` maps each stage done to ``{"settings": {...}, ...}`` (the embed
    stage also names its cache; a selection from saved scores names them); ``artefacts`` maps every file of the run,
    relative to its folder, to its sha256."""

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    stages: dict[str, dict] = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    artefacts: dict[str, str] = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    command: str | None = None
    written: str | None = None
    format: int = RECORD_FORMAT

    @classmethod
    def from_json(cls, text: str) -> RunRecord:
        values = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False)

    @property
    def selected(self) -> bool:
        return "select" in self.stages

    @property
    def ratios(self) -> list[float]:
        return sorted(
            float(r) for r in (self.stages.get("select", {}).get("settings", {}).get("selection_ratios") or [])
        )

    def settings(self) -> dict:
        """Every recorded setting, across stages."""
        merged = {}
        for stage in STAGES:
            merged.update(self.stages.get(stage, {}).get("settings", {}))
        return merged

    def disagreements(self, config: ClipselConfig, stages=STAGES, keys=None) -> list[str]:
        """The settings of ``stages`` (those recorded; only ``keys`` when given) in which ``config`` differs."""
        changed = []
        for stage in stages:
            recorded = self.stages.get(stage, {}).get("settings")
            if recorded is None:
                continue
            current = stage_settings(config, stage)
            for key, value in current.items():
                if (keys and key not in keys) or (key not in recorded and key not in ABSENT_MEANS):
                    continue
                if recorded.get(key, ABSENT_MEANS.get(key)) != value:
                    changed.append(key)
        return sorted(set(changed))

    def cache_keys(self) -> list[str]:
        return list(self.stages.get("embed", {}).get("caches", []))

    def done(
        self, config: ClipselConfig, *stages: str, caches=None, checkpoint=None, scores_from=None, processes=1
    ) -> RunRecord:
        """This record with ``stages`` done under ``config``; the embed stage names the ``caches`` it used and the
        ``checkpoint``'s identity (modeling.model_fingerprint: id, revision, commit, config, dtype, local weight
        files), the adapt stage the number of ``processes`` that trained (``encoder_lora``'s adapters depend on it),
        a selection from saved scores names where they came from (``scores_from``)."""
        recorded = dict(self.stages)
        for stage in stages:
            extra = {}
            if stage == "embed":
                extra = {key: value for key, value in (("caches", caches), ("checkpoint", checkpoint)) if value}
            if stage == "adapt":
                extra["processes"] = int(processes)
            if stage == "select" and scores_from:
                extra["scores_from"] = scores_from
            recorded[stage] = {"settings": stage_settings(config, stage), **extra}
        return dataclasses.replace(self, stages=recorded)

    def described(self, source, command: list[str] | None) -> RunRecord:
        """This record with the source's identity (a :class:`~hf_clipsel.data.Source`, or None to keep the one
        recorded), the library versions and the command line."""
        identity = self.source
        if source is not None:
            labels = np.ascontiguousarray(source.labels, dtype=np.int64)
            identity = {
                "num_rows": int(source.num_rows),
                "class_names": list(source.class_names),
                "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest(),
                "image_column": source.image_column,
                "label_column": source.label_column,
            }
            if source.description:  # a source passed in memory has no dataset_name: its fingerprint names it
                identity["description"] = source.description
        return dataclasses.replace(
            self, source=identity, versions=library_versions(), command=" ".join(command) if command else None
        )

    def configuration(self, config: ClipselConfig) -> dict:
        """The flat configuration that produced this run: each recorded stage's own settings (so a later stage
        command never rewrites what an earlier one used), and ``config``'s for the rest: the settings that change no
        result, and those of stages this run took from elsewhere (``select --scores_from`` keeps the dataset it was
        given)."""
        # `source` says which columns were used (found when not given) and what was scored: rows and labels
        return {**config.to_flat(), **self.settings(), "source": self.source}

    def artefacts_of_stages(self) -> tuple[str, ...]:
        """The folder entries the recorded stages wrote (what a stage that extends this record keeps)."""
        kept = {entry for stage in self.stages for entry in STAGE_ARTEFACTS.get(stage, ())}
        return tuple(entry for entry in ARTEFACTS if entry in kept)


def read_record(output_dir: str | Path) -> RunRecord | None:
    path = Path(output_dir) / RECORD
    if not path.is_file():
        return None
    try:
        return RunRecord.from_json(path.read_text())
    except (ValueError, TypeError):
        return None


def incomplete_message(output_dir: Path, why: str) -> str:
    return (
        f"{output_dir} holds an incomplete run ({why}): it was stopped before it finished, or its files were "
        "changed afterwards. Run `hf-clipsel run` again with the same settings to finish it (the embedding cache is "
        "reused), or pass --overwrite_output_dir to start over."
    )


def verify(output_dir: str | Path, deep: bool | tuple[str, ...] = False, need_selection: bool = True) -> RunRecord:
    """The record of the run in ``output_dir``, after checking that the folder holds exactly its files (presence;
    with ``deep`` also their sha256: True for every file, or a tuple of entries, e.g. ``("scores",)``, for the files
    under those alone: a reader checks the files it reads). Raises :class:`IncompleteRunError` with what is wrong."""
    output_dir = Path(output_dir)
    record = read_record(output_dir)
    if record is None:
        card = output_dir / CARD
        if card.is_file() and card.read_text(encoding="utf-8") != INCOMPLETE_CARD and (output_dir / "scores").is_dir():
            raise IncompleteRunError(
                f"{output_dir} was written by an hf_clipsel from before run records (it has no {RECORD}), so nothing "
                "vouches that its files belong to one run; run `hf-clipsel run` again with its settings (`--config "
                f"{output_dir}/run_config.yaml`; the embedding cache is reused) to make it a recorded run."
            )
        raise IncompleteRunError(incomplete_message(output_dir, f"no readable {RECORD}"))
    if need_selection and not record.selected:
        raise IncompleteRunError(
            f"{output_dir} holds a run that has not selected yet (stages done: {', '.join(record.stages) or 'none'});"
            " run `hf-clipsel select` (or `hf-clipsel run`) first."
        )
    present = {p.relative_to(output_dir).as_posix(): p for p in _artefact_files(output_dir)}
    missing = sorted(set(record.artefacts) - set(present))
    extra = sorted(set(present) - set(record.artefacts))
    if missing or extra:
        what = (f"missing {', '.join(missing[:3])}" if missing else "") + (
            f"{'; ' if missing else ''}not of this run: {', '.join(extra[:3])}" if extra else ""
        )
        raise IncompleteRunError(incomplete_message(output_dir, what))
    if deep:
        checked = {
            name: digest for name, digest in record.artefacts.items() if deep is True or name.split("/")[0] in deep
        }
        changed = [name for name, digest in checked.items() if file_digest(present[name]) != digest]
        if changed:
            raise IncompleteRunError(
                incomplete_message(output_dir, f"changed since written: {', '.join(changed[:3])}")
            )
    return record


def extend_record(previous: RunRecord | None, config: ClipselConfig, stage: str) -> RunRecord:
    """The record that ``stage`` (or ``"run"``, every stage) starts from in a folder whose record is ``previous``.

    A run may be repeated, and a stage may add to a run, only where every recorded setting agrees; a stage already
    done is not redone. ``--overwrite_output_dir`` replaces the stage and the ones after it (a whole run: all).
    """
    output_dir = Path(config.run.output_dir)
    if previous is None:
        return RunRecord()
    order = STAGES.index(stage) if stage in STAGES else len(STAGES) - 1
    # What the command uses: the settings of its stage and the earlier ones; a selection reads saved scores, so of
    # the earlier stages only the dataset (the model and its training are the scores' business).
    keys = SELECT_KEYS if stage == "select" else None
    changed = previous.disagreements(config, STAGES[: order + 1], keys)
    later = [s for s in previous.stages if STAGES.index(s) >= order]
    if not config.run.overwrite_output_dir:
        if changed:
            raise FileExistsError(
                f"{output_dir} holds the results of a run with other settings ({', '.join(changed)}); pass "
                "--overwrite_output_dir to replace them, or choose another --output_dir"
                + (
                    f" (`hf-clipsel select --scores_from {output_dir}` selects there from these scores)."
                    if stage == "select"
                    else "."
                )
            )
        if later and stage != "run":
            raise FileExistsError(
                f"{output_dir} has done the {stage} stage already (stages done: {', '.join(previous.stages)}); pass "
                f"--overwrite_output_dir to redo it and the stages after it, or choose another --output_dir."
            )
    if stage == "run":
        return RunRecord()
    kept = {}
    for name in STAGES[:order]:  # earlier stages stay only while they agree, and only as a prefix
        if name not in previous.stages or previous.disagreements(config, [name], keys):
            break
        kept[name] = previous.stages[name]
    if not kept:
        return RunRecord()
    return dataclasses.replace(previous, stages=kept, artefacts={})


def unused_caches(output_dir: str | Path, cache_dir: str | Path) -> list[Path]:
    """Embedding caches in ``cache_dir`` that the record of the run in ``output_dir`` does not name. A folder without a
    record may be a killed run whose cache a rerun resumes from: nothing of it counts as unused."""
    record = read_record(output_dir)
    if record is None:
        raise IncompleteRunError(incomplete_message(Path(output_dir), f"no readable {RECORD}; its caches stay"))
    keep = set(record.cache_keys())
    return sorted(p for p in Path(cache_dir).glob("*") if p.is_dir() and p.name not in keep)
