"""The scores table: one row per source row, keyed by ``row_id``. This module owns its columns and Features,
builds it (the score stage), adds a selection to it (the select stage), reads it (the one reader that the
pipeline, the Hub loader, the report and the card use), and turns it into what the selectors read.

Columns (README.md, "Outputs", has the same table for users):

- ``row_id`` int64, the row's position in the source split; ``label`` the given label (ClassLabel; -1 where it is
  missing or out of range); ``given_label`` the label exactly as the source gives it, as text (so an out-of-range
  value is kept); ``path`` the row's image file as the source names it (an image folder, a column of paths, an
  ``Image`` feature holding paths; "" where it holds bytes only, and for a stream); ``predicted_label`` the class
  the model prefers (-1 for a flagged row); ``decode_ok``; ``flag_reason`` ("" for a usable row).
- The registered scores' columns (hf_clipsel.scores: ``semantic_alignment``, ``sample_diversity``,
  ``class_posterior``, each with ``*_normalized``; the damage check's ``noise_level``, ``contrast``, ``sharpness``;
  and those of any score registered by another package), float32, each with its documented range.
- Written by a selection: each flagging score's flag column (``damage``: "" or what the pixel check found), and per
  ratio ``reward_ratio_<r>`` (selectors that rank by the reward), ``is_selected_ratio_<r>``, ``drop_reason_ratio_<r>``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, Features, Image, IterableDataset, Value

from .configs import ClipselConfig
from .core.names import (
    PATH,
    ROW_ID,
    SCORES_DIR,
    SELECTION_PREFIXES,
    drop_reason_column,
    reward_column,
    selected_column,
)
from .reasons import drop_reasons
from .scores import ScoreInputs, flag_columns, measured_columns, registered_scores, score_columns
from .selection import SelectionConfig, SelectionInputs, select, selector_spec


def scores_features(class_names: list[str]) -> Features:
    return Features(
        {
            ROW_ID: Value("int64"),
            "label": ClassLabel(names=class_names),
            "given_label": Value("string"),
            PATH: Value("string"),
            "predicted_label": ClassLabel(names=class_names),
            "decode_ok": Value("bool"),
            "flag_reason": Value("string"),
            **{column.name: Value("float32") for column in score_columns()},
        }
    )


def score_stage(context, model, embeddings: Dataset) -> tuple[Dataset, torch.Tensor]:
    """The score stage: the scores table of every row (every registered score), and the image features it was
    computed from. ``embeddings`` come from the vision tower of ``model`` (adaptation.scoring_embeddings)."""
    from .context import prompts_of, valid_rows
    from .embedding import embed_class_prompts, pooled_matrix
    from .modeling import class_text_features, image_features, logit_bias, logit_scale, posterior_link

    valid = valid_rows(context, embeddings)
    with torch.no_grad():
        features = image_features(model, pooled_matrix(embeddings)).cpu()
        text_pooled = embed_class_prompts(model, context.processor.tokenizer, prompts_of(context))
        class_features = class_text_features(model, text_pooled).cpu()
    valid_t = torch.from_numpy(valid)
    inputs = ScoreInputs(
        image_features=features,
        class_features=class_features,
        labels=torch.from_numpy(context.source.labels).clamp(min=0),
        valid=valid_t,
        logit_scale=logit_scale(model),
        logit_bias=logit_bias(model),
        posterior_link=posterior_link(model),
        knn_k=context.config.scoring.knn_k,
        statistics={name: np.asarray(embeddings[name][:], dtype=np.float32) for name in measured_columns()},
    )
    columns = {}
    for score in registered_scores():
        columns.update(score.compute(inputs))
    # The class the (adapted) model prefers: where it differs from the given label, the row is a suspect.
    predicted = torch.where(valid_t, (F.normalize(features, dim=-1) @ class_features.T).argmax(dim=-1), -1)
    flag_reason = [
        label_problem or (f"{error}" if not ok else "")
        for label_problem, ok, error in zip(
            context.source.label_problems, embeddings["decode_ok"][:], embeddings["decode_error"][:]
        )
    ]
    scores = Dataset.from_dict(
        {
            ROW_ID: np.arange(len(valid), dtype=np.int64),
            "label": context.source.labels,
            "given_label": context.source.given_labels,
            PATH: image_paths(context.source),
            "predicted_label": predicted.numpy(),
            "decode_ok": np.asarray(embeddings["decode_ok"][:], dtype=bool),
            "flag_reason": flag_reason,
            **{column.name: np.asarray(columns[column.name], dtype=np.float32) for column in score_columns()},
        },
        features=scores_features(context.source.class_names),
    )
    return scores, features


def image_paths(source) -> list[str]:
    """Each row's image file as the source (a :class:`~hf_clipsel.data.Source`) names it ("" where a cell holds bytes
    only or no image): the answer a user acts on. Read from the undecoded Arrow column (no image is decoded, no bytes
    become Python objects); a stream is not read again for it (all "")."""
    if isinstance(source.dataset, IterableDataset):
        return [""] * source.num_rows
    cells = source.dataset.select_columns([source.image_column]).cast_column(source.image_column, Image(decode=False))
    column = cells.with_format("arrow")[:].column(source.image_column).combine_chunks()
    return ["" if path is None else path for path in column.field("path").to_pylist()]


def select_stage(scores: Dataset, config: ClipselConfig, image_features: torch.Tensor | None = None):
    """The select stage: masks per ratio, and the scores with the selection's columns for every ratio: the scores'
    flags, and per ratio the reward (for selectors that rank by it), the mask and each row's drop reason."""
    table = scores.with_format("numpy")[:]  # read once: the inputs, the flags and the reasons all come from it
    flags = score_flags(table, config.selection)
    inputs = selection_inputs(table, config.selection, flags, image_features)
    masks = select(inputs, config.selection)
    scores = without_selection(scores)
    for column, values in flags.items():
        scores = scores.add_column(column, values.tolist(), feature=Value("string"))
    explained = explained_drops(table, config.selection)
    ranks_by_reward = selector_spec(config.selection.selection_method).ranks_by_reward
    rewards = {}  # one reward per distinct alpha: with a fixed alpha every ratio shares it
    for ratio in config.selection.selection_ratios:
        alpha = config.selection.alpha_for(ratio)
        if ranks_by_reward:
            if alpha not in rewards:
                reward = inputs.reward(alpha)
                rewards[alpha] = np.where(np.isfinite(reward), reward, np.nan).astype(np.float32)
            scores = scores.add_column(reward_column(ratio), rewards[alpha], feature=Value("float32"))
        reasons = drop_reasons(masks[ratio], table["decode_ok"], ~inputs.valid, explained)
        scores = scores.add_column(selected_column(ratio), masks[ratio], feature=Value("bool"))
        scores = scores.add_column(drop_reason_column(ratio), reasons.tolist(), feature=Value("string"))
    return masks, scores


def explained_drops(table: dict, selection: SelectionConfig) -> list[tuple[str, np.ndarray]]:
    """``(drop reason, bool[N] rows it explains)`` of every registered score that explains drops, weakest first (its
    ``reason_rank``), as :func:`~hf_clipsel.reasons.drop_reasons` takes them."""
    return [
        (score.drop_reason, rows)
        for score in sorted(registered_scores(), key=lambda score: score.reason_rank)
        if score.drop_reason and (rows := score.explains(table, selection)) is not None
    ]


def score_flags(table: dict, selection: SelectionConfig) -> dict[str, np.ndarray]:
    """``{flag column: object[N]}``: what each flagging score found ("" or its finding) in the scores ``table``."""
    found = {}
    for score in registered_scores():
        if score.flag_column and (flags := score.flags(table, selection)) is not None:
            found[score.flag_column] = np.asarray(flags, dtype=object)
    return found


def read_scores_in(directory: str | Path) -> Dataset:
    """The scores table written in ``directory`` (a run folder, or one being built), read in memory with pyarrow:
    nothing is copied into the datasets cache. :func:`hf_clipsel.runs.load.read_scores` checks a finished
    folder first."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.table import InMemoryTable

    shards = sorted((Path(directory) / SCORES_DIR).glob("*.parquet"))  # one file or several, in row order by name
    if not shards:
        raise FileNotFoundError(
            f"no scores in {Path(directory) / SCORES_DIR}; run `hf-clipsel score` (or `run`) first, or pass "
            "--scores_from."
        )
    return Dataset(InMemoryTable(pa.concat_tables([pq.read_table(shard) for shard in shards])))


def check_scores_belong_to(scores: Dataset, source, location) -> None:
    """Refuse scores of another dataset: the row count, the class names and every row's label must match the
    source's (a :class:`~hf_clipsel.data.Source`), so a same-sized dataset cannot pass for the scored one."""
    where = f"the scores from {location}"
    if len(scores) != source.num_rows:
        raise ValueError(
            f"{where} have {len(scores)} rows but the source dataset has {source.num_rows}; select with the same "
            "dataset_name, split and max_samples as the run that scored it."
        )
    names = getattr(scores.features.get("label"), "names", None)
    if names is not None and list(names) != list(source.class_names):
        raise ValueError(
            f"{where} have classes {_preview(names)} but the source dataset has {_preview(source.class_names)}: "
            "they were computed on another dataset."
        )
    differ = int((np.asarray(scores["label"][:]) != np.asarray(source.labels)).sum())
    if differ:
        raise ValueError(
            f"{where} give {differ} of {len(scores)} rows another label than the source dataset: they were computed "
            "on another dataset (or another version of it)."
        )


def _preview(names) -> str:
    names = list(names)
    return ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")


def required_column(table: dict, column: str, setting: str) -> np.ndarray:
    if column not in table:
        raise ValueError(
            f"{setting} needs the scores' {column} column, which these scores (from an older hf_clipsel) lack; "
            f"score again with `hf-clipsel score`, or select with the setting off."
        )
    return table[column]


def selection_inputs(
    table: dict, selection: SelectionConfig, flags: dict[str, np.ndarray], image_features: torch.Tensor | None = None
) -> SelectionInputs:
    """What the selectors read: the scores ``table`` (numpy columns), the selection settings and the scores' flags
    (:func:`score_flags`: flagged rows are demoted)."""
    gate = posterior = None
    if selection.diversity_gate == "agreement":
        gate = required_column(table, "predicted_label", "diversity_gate agreement") == table["label"]
    if selection.alignment != "sas":  # sas+posterior, posterior
        posterior = required_column(table, "class_posterior_normalized", f"alignment {selection.alignment}")
    return SelectionInputs(
        row_id=table[ROW_ID].astype(np.int64),
        labels=table["label"].astype(np.int64),
        semantic_alignment_normalized=table["semantic_alignment_normalized"].astype(np.float32),
        sample_diversity_normalized=table["sample_diversity_normalized"].astype(np.float32),
        valid=table["flag_reason"] == "",
        image_features=image_features,
        diversity_gate=gate,
        class_posterior_normalized=posterior,
        posterior_alone=selection.alignment == "posterior",
        demoted=np.any([values != "" for values in flags.values()], axis=0) if flags else None,
    )


def without_selection(scores: Dataset) -> Dataset:
    """The table without any selection's columns (what a new selection replaces)."""
    selection_columns = [c for c in scores.column_names if c.startswith(SELECTION_PREFIXES) or c in flag_columns()]
    return scores.remove_columns(selection_columns)
