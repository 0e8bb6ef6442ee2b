"""The commands: each is the stage driver (hf_clipsel.runs.stages) run to a stage, or a step on a finished run. The
CLI calls these and nothing else.

    run                     load, embed, adapt, score, select, write (then push, with push_to_hub)
    embed / adapt / score   the same flow up to that stage; earlier stages are reused from the run's folder
    select_from_scores      select again from saved scores (this run's or ``scores_from``), without a model
    report, push, clean     on a finished run

Stages take what they need and return a named result, so a user can also call them one by one:
``embed_stage(context) -> embeddings``, ``adapt_stage(context, embeddings, directory) -> model``,
``score_stage(context, model, embeddings) -> (scores, features)``, ``select_stage(scores, config, features) ->
(masks, scores)``, ``write_stage(config, dataset, scores, masks, ..., directory) -> summary``.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

from accelerate import Accelerator
from datasets import Dataset, IterableDataset

from .adaptation import scoring_embeddings, trained_model
from .cards import render_dataset_card
from .configs import ClipselConfig
from .context import cache_dir_of, check_budgets, make_accelerator
from .data import load_source, prepare_source, with_row_ids
from .hub import push_outputs
from .hub_access import check_hub_reachable
from .outputs import EMBEDDINGS_DIR
from .report import write_report
from .runs.folder import RunFolder, held_by_main_process
from .runs.load import read_scores
from .runs.record import SELECT_KEYS, STAGES, read_record, unused_caches, verify
from .runs.stages import drive, write_stage
from .scores_table import check_scores_belong_to, select_stage
from .selection import selector_spec
from .summary import RunSummary
from .tables import TABLES_DIR

STAGE_FUNCTIONS = ["load_context", "embed_stage", "adapt_stage", "score_stage", "select_stage", "write_stage"]
COMMANDS = ["run", "embed", "adapt", "score", "select_from_scores", "push", "report", "clean"]
__all__ = [
    *STAGE_FUNCTIONS,
    *COMMANDS,
    "push_stage",
    "trained_model",
    "scoring_embeddings",
    "read_scores",
    "make_accelerator",
]


def run(
    config: ClipselConfig,
    accelerator: Accelerator | None = None,
    command: list[str] | None = None,
    dataset: Dataset | IterableDataset | None = None,
):
    """The whole pipeline (load, embed, adapt, score, select, write), then the push when ``push_to_hub`` is on.

    Args:
        config: the run's settings (:class:`~hf_clipsel.configs.ClipselConfig`; ``config.run.output_dir`` is the
            run's folder).
        accelerator: the processes to share the embedding with (default: one made for this machine).
        command: the command line, recorded in the run record and the card.
        dataset: a ``datasets.Dataset`` in memory to select from, in place of ``dataset_name`` (which must then be
            unset); the run names it by its fingerprint. The stage commands take it too.

    Returns:
        The :class:`~hf_clipsel.summary.RunSummary` on the main process, None on the others.
    """
    _, summary = drive(config, "run", accelerator, command, dataset)
    if summary is not None:
        push_stage(config)
    return summary


def embed(
    config: ClipselConfig,
    accelerator: Accelerator | None = None,
    command: list[str] | None = None,
    dataset: Dataset | IterableDataset | None = None,
):
    """Fill the embedding cache and record the embed stage (arguments as :func:`run`).

    Returns:
        The embeddings (a ``datasets.Dataset``: ``row_id``, the cached vector, decode flags, pixel statistics).
    """
    return drive(config, "embed", accelerator, command, dataset)[0].embeddings


def adapt(
    config: ClipselConfig,
    accelerator: Accelerator | None = None,
    command: list[str] | None = None,
    dataset: Dataset | IterableDataset | None = None,
):
    """Train the adapters (on the embedding cache) and add them to the run (arguments as :func:`run`).

    Returns:
        The adapted model (a ``peft.PeftModel``), or the frozen model for ``adapter_preset none``.
    """
    return drive(config, "adapt", accelerator, command, dataset)[0].model


def score(
    config: ClipselConfig,
    accelerator: Accelerator | None = None,
    command: list[str] | None = None,
    dataset: Dataset | IterableDataset | None = None,
):
    """Score every row with the run's adapters and add the scores to the run (arguments as :func:`run`).

    Returns:
        The scores table (a ``datasets.Dataset``, one row per source row) on the main process, None on the others.
    """
    return drive(config, "score", accelerator, command, dataset)[0].scores


def push_stage(config: ClipselConfig):
    """Push the finished run when asked (main process only)."""
    return push(config) if config.run.push_to_hub else None


def select_from_scores(config, command=None, scores=None, image_features=None, dataset=None) -> RunSummary:
    """Select from saved scores (this run's, or ``scores_from``) and the source dataset (``dataset``: one in memory,
    in place of ``dataset_name``), without a model.
    ``image_features`` (row order) serve the selectors that need them (registered with ``needs_image_features``,
    e.g. ``moderate``)."""
    method = config.selection.selection_method
    if image_features is None and selector_spec(method).needs_image_features:
        raise ValueError(
            f"selection_method {method} measures distances between image features, which saved scores do not hold: "
            f"select with it in `hf-clipsel run --selection_method {method}` (the features come from the cache)."
        )
    config = _with_added_ratios(config)
    with held_by_main_process(config, Accelerator(cpu=True), "select") as (folder, record):
        location, tables = config.run.scores_from or config.run.output_dir, cache_dir_of(config) / TABLES_DIR
        scores = scores if scores is not None else read_scores(location, into=tables)
        source = prepare_source(load_source(config.data, dataset), config.data)
        check_scores_belong_to(scores, source, location)
        check_budgets(config, len(scores))
        masks, scores = select_stage(scores, config, image_features, tables)
        staging = folder.stage(keep=record.artefacts_of_stages())
        record = record.done(config, "select", scores_from=config.run.scores_from)
        record = record.described(source if not record.source else None, command)
        dataset = source.dataset if config.data.streaming else with_row_ids(source.dataset)
        summary = write_stage(config, dataset, scores, masks, command, staging, record.configuration(config))
        folder.commit(record, str(render_dataset_card(staging, location=folder.output_dir)))
    push_stage(config)
    return summary


def _with_added_ratios(config: ClipselConfig) -> ClipselConfig:
    """``select --selection_ratios 0.4`` in a finished run whose other selection settings all agree adds the ratio:
    the run selects again from its scores at its ratios and the new ones (a ratio's subset depends on the scores and
    the settings alone, so the earlier ones come out the same). Any other change is refused by the record."""
    previous = read_record(config.run.output_dir)
    if config.run.scores_from or config.run.overwrite_output_dir or previous is None or not previous.selected:
        return config
    if previous.disagreements(config, STAGES, SELECT_KEYS) != ["selection_ratios"]:
        return config
    config = copy.deepcopy(config)
    config.selection.selection_ratios = sorted({*previous.ratios, *config.selection.selection_ratios})
    config.run.overwrite_output_dir = True  # the select stage only: the earlier ones agree, so the record keeps them
    return config


def report(output_dir: str | Path, gallery_ratio: float | None = None, thumbnails: str = "sample") -> Path:
    """Write the report of a finished run again (e.g. at another gallery ratio); returns its index.html."""
    with RunFolder(output_dir, need_run=True) as folder:
        record = verify(output_dir, deep=True)  # the report reads the whole run, and records it again
        staging = folder.stage()
        write_report(staging, gallery_ratio, thumbnails)
        folder.commit(record, str(render_dataset_card(staging, location=folder.output_dir)))
    return Path(output_dir) / "report" / "index.html"


def push(config: ClipselConfig):
    """Push a finished run: refused unless its folder holds exactly the files its record lists."""
    verify(config.run.output_dir, deep=True)
    check_hub_reachable(config.run.hub_dataset_id, "push to")
    return push_outputs(
        config.run.output_dir, config.run.hub_dataset_id, config.run.hub_model_id, private=config.run.hub_private
    )


def clean(config: ClipselConfig) -> list[Path]:
    """Remove the embedding caches in output_dir/embeddings that the run's record does not name; returns them."""
    if config.run.cache_dir:
        raise ValueError(
            f"--cache_dir {config.run.cache_dir} may hold the caches of other runs too: remove what you no longer "
            "need by hand (each folder there is one cache)."
        )
    cache_dir = Path(config.run.output_dir) / EMBEDDINGS_DIR
    with RunFolder(config.run.output_dir, need_run=True):
        removed = unused_caches(config.run.output_dir, cache_dir)
        for path in removed:
            shutil.rmtree(path)
    return removed
