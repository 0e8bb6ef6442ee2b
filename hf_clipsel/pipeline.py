"""A run, as the sequence of its stages, and one function per command (the CLI calls these and nothing else).

Stages take what they need and return a named result: ``embed_stage(context) -> embeddings``, ``adapt_stage(context,
embeddings, directory) -> model``, ``score_stage(context, model, embeddings) -> (scores, features)``,
``select_stage(scores, config, features) -> (masks, scores)``, ``write_stage(config, dataset, scores, masks, ...,
directory) -> summary``. Each command holds the run's folder around them (run_record.RunFolder: locked, built beside
the run and swapped in whole, recorded last). Under `accelerate launch` every process embeds its share of the
images; the main process does the rest, so one and several processes give the same numbers.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from accelerate import Accelerator
from datasets import IterableDataset

from .adaptation import adapt_stage, scoring_embeddings, trained_model
from .cards import render_dataset_card
from .configs import ClipselConfig
from .context import RunContext, check_budgets, load_context, make_accelerator
from .data import load_source, prepare_source, with_row_ids
from .embedding import cache_keys, embed_stage
from .hub import push_outputs
from .outputs import EMBEDDINGS_DIR, write_run_config, write_scores, write_subsets
from .report import write_report
from .run_record import STAGES, RunFolder, held_by_main_process, unused_caches, verify
from .scores_table import check_scores_belong_to, read_scores, score_stage, select_stage
from .stability import seed_overlap
from .streaming import write_subsets_from_stream
from .summary import RunSummary, summarize

logger = logging.getLogger(__name__)

STAGE_FUNCTIONS = ["load_context", "embed_stage", "adapt_stage", "score_stage", "select_stage", "write_stage"]
COMMANDS = ["run", "embed", "adapt", "score", "select_from_scores", "push", "report", "clean"]
__all__ = [*STAGE_FUNCTIONS, *COMMANDS, "push_stage", "trained_model", "scoring_embeddings", "read_scores"]


def write_stage(
    config, dataset_with_ids, scores, masks, command=None, directory=None, settings=None, stability=None
) -> RunSummary:
    """Subsets, scores, configuration (``settings``; default: ``config``'s), summary (with ``stability``, the
    overlap across adapter-training seeds) and report of a selection, into ``directory`` (a run folder's staging
    area; default output_dir). Main process only."""
    directory = Path(directory or config.run.output_dir)
    if isinstance(dataset_with_ids, IterableDataset):
        write_subsets_from_stream(directory, dataset_with_ids, masks)
    else:
        write_subsets(directory, dataset_with_ids, masks)
    write_scores(directory, scores)
    write_run_config(directory, settings or config.to_flat(), command)
    summary = summarize(scores, masks, config, dataset_with_ids, directory, settings, stability)
    summary.write(directory)
    try:
        write_report(directory)
    except Exception as error:  # the results are written: a report problem must not cost them the run
        logger.warning("no report: %s; `hf-clipsel report --output_dir %s` writes it.", error, config.run.output_dir)
    return summary


def push_stage(config: ClipselConfig):
    """Push the finished run when asked (main process only)."""
    return push(config) if config.run.push_to_hub else None


def run(config: ClipselConfig, accelerator: Accelerator | None = None, command: list[str] | None = None):
    """The whole pipeline. Returns the summary on the main process, None on the others."""
    accelerator = accelerator or make_accelerator()
    summary = None
    with held_by_main_process(config, accelerator, "run") as (folder, record):
        context = load_context(config, accelerator)
        embeddings = embed_stage(context)
        staging = folder.stage(keep=()) if folder else None
        model = adapt_stage(context, embeddings, staging)
        scoring = scoring_embeddings(context, model, embeddings)
        masks = {}
        if folder:
            scores, features = score_stage(context, model, scoring)
            masks, scores = select_stage(scores, config, features)
        stability = seed_overlap(context, embeddings, masks)  # every process: adapter training waits for all
        if folder:
            record = record.done(
                config, *STAGES, caches=cache_keys(embeddings, scoring), checkpoint=context.model_fingerprint
            )
            record = record.described(context.source, command)
            settings = record.configuration(config)
            summary = write_stage(config, context.dataset, scores, masks, command, staging, settings, stability)
            folder.commit(record, str(render_dataset_card(staging)))
        accelerator.wait_for_everyone()
    if summary is not None:
        push_stage(config)
    return summary


def embed(config: ClipselConfig, accelerator: Accelerator | None = None, command: list[str] | None = None):
    """Fill the embedding cache and record the embed stage; returns the embeddings."""
    accelerator = accelerator or make_accelerator()
    with held_by_main_process(config, accelerator, "embed") as (folder, record):
        context = load_context(config, accelerator)
        embeddings = embed_stage(context)
        if folder:
            _commit_stage(
                folder,
                record.done(config, "embed", caches=cache_keys(embeddings), checkpoint=context.model_fingerprint),
                context,
                command,
            )
        accelerator.wait_for_everyone()
    return embeddings


def adapt(config: ClipselConfig, accelerator: Accelerator | None = None, command: list[str] | None = None):
    """Train the adapters and add them to the run; returns the adapted model."""
    accelerator = accelerator or make_accelerator()
    with held_by_main_process(config, accelerator, "adapt") as (folder, record):
        context = load_context(config, accelerator)
        embeddings = embed_stage(context)
        staging = folder.stage(keep=record.artefacts_of_stages()) if folder else None
        model = adapt_stage(context, embeddings, staging)
        if folder:
            record = record.done(
                config, "embed", "adapt", caches=cache_keys(embeddings), checkpoint=context.model_fingerprint
            )
            _commit_stage(folder, record, context, command, staged=True)
        accelerator.wait_for_everyone()
    return model


def score(config: ClipselConfig, accelerator: Accelerator | None = None, command: list[str] | None = None):
    """Score every row with the run's adapters and add the scores to the run; returns them (main process)."""
    accelerator = accelerator or make_accelerator()
    scores = None
    with held_by_main_process(config, accelerator, "score") as (folder, record):
        context = load_context(config, accelerator)
        embeddings = embed_stage(context)
        model = trained_model(context)
        scoring = scoring_embeddings(context, model, embeddings)
        if folder:
            scores, _ = score_stage(context, model, scoring)
            staging = folder.stage(keep=record.artefacts_of_stages())
            write_scores(staging, scores)
            record = record.done(
                config, "embed", "score", caches=cache_keys(embeddings, scoring), checkpoint=context.model_fingerprint
            )
            _commit_stage(folder, record, context, command, staged=True)
        accelerator.wait_for_everyone()
    return scores


def _commit_stage(folder: RunFolder, record, context: RunContext, command, staged: bool = False) -> None:
    """Commit a stage that selects nothing: its own artefacts (already in the staging folder when ``staged``) and
    the run's configuration as recorded."""
    staging = folder.staging if staged else folder.stage(keep=record.artefacts_of_stages())
    record = record.described(context.source, command)
    write_run_config(staging, record.configuration(context.config), command)
    folder.commit(record, None)


def select_from_scores(config, command=None, scores=None, image_features=None) -> RunSummary:
    """Select from saved scores (this run's, or ``scores_from``) and the source dataset, without a model.
    ``image_features`` (row order) serve the selectors that need them (``moderate``)."""
    if image_features is None and config.selection.selection_method == "moderate":
        raise ValueError(
            "selection_method moderate measures distances between image features, which saved scores do not hold: "
            "select with it in `hf-clipsel run --selection_method moderate` (the features come from the cache)."
        )
    with held_by_main_process(config, Accelerator(cpu=True), "select") as (folder, record):
        location = config.run.scores_from or config.run.output_dir
        scores = scores if scores is not None else read_scores(location)
        source = prepare_source(load_source(config.data), config.data)
        check_scores_belong_to(scores, source, location)
        check_budgets(config, len(scores))
        masks, scores = select_stage(scores, config, image_features)
        staging = folder.stage(keep=record.artefacts_of_stages())
        record = record.done(config, "select", scores_from=config.run.scores_from)
        record = record.described(source if not record.source else None, command)
        dataset = source.dataset if config.data.streaming else with_row_ids(source.dataset)
        summary = write_stage(config, dataset, scores, masks, command, staging, record.configuration(config))
        folder.commit(record, str(render_dataset_card(staging)))
    push_stage(config)
    return summary


def report(output_dir: str | Path, gallery_ratio: float | None = None, thumbnails: str = "sample") -> Path:
    """Write the report of a finished run again (e.g. at another gallery ratio); returns its index.html."""
    with RunFolder(output_dir) as folder:
        record = verify(output_dir)
        staging = folder.stage()
        write_report(staging, gallery_ratio, thumbnails)
        folder.commit(record, str(render_dataset_card(staging)))
    return Path(output_dir) / "report" / "index.html"


def push(config: ClipselConfig):
    """Push a finished run: refused unless its folder holds exactly the files its record lists."""
    verify(config.run.output_dir, deep=True)
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
    with RunFolder(config.run.output_dir):
        removed = unused_caches(config.run.output_dir, cache_dir)
        for path in removed:
            shutil.rmtree(path)
    return removed
