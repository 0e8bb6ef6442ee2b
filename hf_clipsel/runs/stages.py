"""The stages of a run as one table, and the driver that runs a command through them.

    load ─► embed ─► adapt ─► embed_adapted ─► score ─► select ─► stability ─► write     (push: after, if asked)

Each :class:`Stage` names the function that does it, the function that takes what an earlier command left of it
(when the command only reuses it: `hf-clipsel score` loads the adapters `hf-clipsel adapt` trained) and which
processes run it; the folder entries it writes and the settings its results depend on (what a record compares) are
read from the record's tables (hf_clipsel.runs.record). :func:`drive` is every command that
computes: it holds the run's folder (lock, staging, record: hf_clipsel.runs.folder), runs the stages up to the
command's last one, doing those the command owns and reusing the others, then records and commits what it did. Under
`accelerate launch` every process embeds its share of the images, trains the adapters together and scores its share
of the rows and classes; the main process gathers the scores and does the rest, so one and several processes give
the same numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator
from datasets import Dataset, IterableDataset

from ..adaptation import adapt_stage, scoring_embeddings, trained_model
from ..cards import render_dataset_card
from ..configs import ClipselConfig
from ..context import RunContext, load_context, make_accelerator
from ..embedding import cache_keys, embed_stage
from ..features import FeatureStore
from ..outputs import write_run_config, write_scores, write_subsets
from ..report import write_report
from ..scores_table import score_stage, select_stage
from ..stability import seed_overlap
from ..streaming import write_subsets_from_stream
from ..summary import RunSummary, summarize
from ..tables import TABLES_DIR
from .folder import held_by_main_process
from .record import STAGE_ARTEFACTS, STAGE_SETTINGS

logger = logging.getLogger(__name__)


@dataclass
class RunState:
    """What the stages hand each other. ``scoring`` are the embeddings the scores are computed on (those of the
    adapted tower when the adapters sit inside the encoder, else ``embeddings``)."""

    context: RunContext
    embeddings: Dataset | None = None
    model: object = None
    scoring: Dataset | None = None
    scores: Dataset | None = None
    features: FeatureStore | None = None
    masks: dict = field(default_factory=dict)
    stability: dict | None = None


def _embed(state: RunState, staging: Path | None) -> None:
    state.embeddings = embed_stage(state.context)


def _adapt(state: RunState, staging: Path | None) -> None:
    state.model = adapt_stage(state.context, state.embeddings, staging)


def _load_adapters(state: RunState, staging: Path | None) -> None:
    state.model = trained_model(state.context)


def _embed_adapted(state: RunState, staging: Path | None) -> None:
    state.scoring = scoring_embeddings(state.context, state.model, state.embeddings)


def _score(state: RunState, staging: Path | None) -> None:
    state.scores, state.features = score_stage(state.context, state.model, state.scoring, together=True)


def _select(state: RunState, staging: Path | None) -> None:
    directory = state.context.cache_dir / TABLES_DIR
    state.masks, state.scores = select_stage(state.scores, state.context.config, state.features, directory)
    state.features = None  # the store's file in the cache goes with its last reference


def _stability(state: RunState, staging: Path | None) -> None:
    state.stability = seed_overlap(state.context, state.embeddings, state.masks)


@dataclass(frozen=True)
class Stage:
    """One stage: ``run`` does it; ``reuse`` takes what an earlier command left of it (None: nothing to take);
    ``every_process``: run by every process (else the main one alone); ``recorded``: the run record notes it as done.
    What it writes and the settings its results depend on are the record's to know (a lower layer): see
    :attr:`writes` and :attr:`settings`."""

    name: str
    run: Callable[[RunState, Path | None], None]
    reuse: Callable[[RunState, Path | None], None] | None
    every_process: bool
    recorded: bool = True

    @property
    def writes(self) -> tuple[str, ...]:
        """The entries of the run's folder it writes."""
        return STAGE_ARTEFACTS.get(self.name, ())

    @property
    def settings(self) -> tuple[str, ...]:
        """The settings its results depend on (a selection adds its selector's options)."""
        return STAGE_SETTINGS.get(self.name, ())


STAGES = (
    Stage("embed", _embed, _embed, every_process=True),  # the cache makes reusing it the same call
    # training (and the stability stage's) waits for every process
    Stage("adapt", _adapt, _load_adapters, every_process=True),
    # adapters inside the vision tower change its outputs: the images are embedded again through it (cached)
    Stage("embed_adapted", _embed_adapted, None, every_process=True, recorded=False),
    # every process scores a share of the rows and classes; the main one gathers them and alone writes
    Stage("score", _score, None, every_process=True),
    Stage("select", _select, None, every_process=False),
    Stage("stability", _stability, None, every_process=True, recorded=False),
)
# The stages each computing command does itself (the ones before its last that it does not do, it reuses).
COMMAND_STAGES = {
    "embed": ("embed",),
    "adapt": ("embed", "adapt"),
    "score": ("embed", "embed_adapted", "score"),
    "run": ("embed", "adapt", "embed_adapted", "score", "select", "stability"),
}


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


def drive(
    config: ClipselConfig,
    command: str,
    accelerator: Accelerator | None = None,
    command_line: list[str] | None = None,
    dataset: Dataset | IterableDataset | None = None,
) -> tuple[RunState, RunSummary | None]:
    """Run ``command`` (a key of :data:`COMMAND_STAGES`) through the stages up to its last one, and commit what it
    did to the run's folder; ``dataset``: a source in memory instead of ``dataset_name``. Returns the stages' state
    and, where the command selected, the summary (main process; None on the others)."""
    accelerator = accelerator or make_accelerator()
    owned = COMMAND_STAGES[command]
    stages = STAGES[: max(i for i, stage in enumerate(STAGES) if stage.name in owned) + 1]
    main = accelerator.is_main_process
    summary = None
    with held_by_main_process(config, accelerator, command) as (folder, record):
        state = RunState(load_context(config, accelerator, dataset))
        # `run` builds the run anew; a stage command starts from what the recorded stages wrote
        staging = folder.stage(keep=() if command == "run" else record.artefacts_of_stages()) if main else None
        for stage in stages:
            action = stage.run if stage.name in owned else stage.reuse
            if action is not None and (stage.every_process or main):
                action(state, staging)
        if main:
            done = [stage.name for stage in stages if stage.name in owned and stage.recorded]
            caches = cache_keys(*[e for e in (state.embeddings, state.scoring) if e is not None])
            record = record.done(
                config, *done, caches=caches, checkpoint=state.context.model_fingerprint,
                processes=accelerator.num_processes,
            )  # fmt: skip
            record = record.described(state.context.source, command_line)
            settings = record.configuration(config)
            if state.masks:
                summary = write_stage(
                    config, state.context.dataset, state.scores, state.masks, command_line, staging, settings,
                    state.stability,
                )  # fmt: skip
            else:
                if state.scores is not None:
                    write_scores(staging, state.scores)
                write_run_config(staging, settings, command_line)
            card = render_dataset_card(staging, location=config.run.output_dir) if state.masks else None
            folder.commit(record, str(card) if card else None)
        accelerator.wait_for_everyone()
    return state, summary
