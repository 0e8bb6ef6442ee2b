"""The scores table: one row per source row, keyed by ``row_id``. This module owns its column names, Features and
value ranges, builds it, reads it (the one reader that the pipeline, the Hub loader, the report and the card use),
and turns it into what the selectors read.

Columns (README.md, "Outputs", has the same table for users):

- ``row_id`` int64, the row's position in the source split; ``label`` the given label (ClassLabel; -1 where it is
  missing or out of range); ``given_label`` the label exactly as the source gives it, as text (so an out-of-range
  value is kept); ``predicted_label`` the class CLIP prefers (-1 for a flagged row); ``decode_ok``;
  ``flag_reason`` ("" for a usable row).
- ``semantic_alignment`` in [-1, 1] (higher: better aligned with its label's prompt); ``sample_diversity`` >= 0
  (higher: a sparser part of its class); ``class_posterior`` in [0, 1]; each with ``*_normalized`` (min-max over
  usable rows, in [0, 1]).
- ``noise_level``, ``contrast``, ``sharpness``: pixel statistics of the damage check.
- Written by a selection: ``damage`` ("" or what the pixel check found), and per ratio ``reward_ratio_<r>``,
  ``is_selected_ratio_<r>``, ``drop_reason_ratio_<r>``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, Features, Value

from . import scoring
from .configs import ClipselConfig, SelectionConfig, ratio_name
from .data import ROW_ID
from .image_quality import QUALITY_COLUMNS, damage_flags
from .outputs import SCORES_DIR
from .reasons import drop_reasons
from .selection import SelectionInputs, select

DAMAGE = "damage"
SCORE_COLUMNS = (
    "semantic_alignment",
    "sample_diversity",
    "semantic_alignment_normalized",
    "sample_diversity_normalized",
    "class_posterior",
    "class_posterior_normalized",
    *QUALITY_COLUMNS,
)
SELECTION_PREFIXES = ("reward_", "is_selected_", "drop_reason_")
# The methods that rank rows by the reward, and so write it (``reward_ratio_<r>``, higher kept first); the baselines
# (random, clip_score, moderate, ccs) rank by something else and write no reward column.
RANKED_BY_REWARD = ("exact", "sgd")


def selected_column(selection_ratio: float) -> str:
    return f"is_selected_{ratio_name(selection_ratio)}"


def drop_reason_column(selection_ratio: float) -> str:
    return f"drop_reason_{ratio_name(selection_ratio)}"


def reward_column(selection_ratio: float) -> str:
    return f"reward_{ratio_name(selection_ratio)}"


def selected_ratios(column_names: list[str]) -> list[float]:
    """The ratios a table with these columns holds a selection for, ascending."""
    prefix = "is_selected_ratio_"  # selected_column(r) is this plus f"{r:g}"
    return sorted(float(name.removeprefix(prefix)) for name in column_names if name.startswith(prefix))


def scores_features(class_names: list[str]) -> Features:
    return Features(
        {
            ROW_ID: Value("int64"),
            "label": ClassLabel(names=class_names),
            "given_label": Value("string"),
            "predicted_label": ClassLabel(names=class_names),
            "decode_ok": Value("bool"),
            "flag_reason": Value("string"),
            **{name: Value("float32") for name in SCORE_COLUMNS},
        }
    )


def score_stage(context, model, embeddings: Dataset) -> tuple[Dataset, torch.Tensor]:
    """The score stage: the scores table of every row, and the image features it was computed from.
    ``embeddings`` come from the vision tower of ``model`` (adaptation.scoring_embeddings)."""
    from .context import prompts_of, valid_rows
    from .embedding import embed_class_prompts, pooled_matrix
    from .modeling import class_text_features, image_features, logit_bias, logit_scale, posterior_link

    valid = valid_rows(context, embeddings)
    with torch.no_grad():
        features = image_features(model, pooled_matrix(embeddings)).cpu()
        text_pooled = embed_class_prompts(model, context.processor.tokenizer, prompts_of(context))
        class_features = class_text_features(model, text_pooled).cpu()
    labels = torch.from_numpy(context.source.labels)
    valid_t = torch.from_numpy(valid)
    given = labels.clamp(min=0)
    sas = torch.where(valid_t, scoring.semantic_alignment(features, class_features, given), 0.0)
    sds = scoring.sample_diversity(features, labels, context.config.scoring.knn_k, valid=valid_t)
    posterior = scoring.class_posterior(
        features, class_features, given, logit_scale(model), logit_bias(model), posterior_link(model)
    )
    posterior = torch.where(valid_t, posterior, 0.0)
    # The class the (adapted) CLIP prefers: where it differs from the given label, the row is a suspect.
    predicted = torch.where(valid_t, (F.normalize(features, dim=-1) @ class_features.T).argmax(dim=-1), -1)
    flag_reason = [
        label_problem or (f"{error}" if not ok else "")
        for label_problem, ok, error in zip(
            context.source.label_problems, embeddings["decode_ok"][:], embeddings["decode_error"][:]
        )
    ]
    columns = {
        "semantic_alignment": sas,
        "sample_diversity": sds,
        "semantic_alignment_normalized": scoring.min_max(sas, valid_t),
        "sample_diversity_normalized": scoring.min_max(sds, valid_t),
        "class_posterior": posterior,
        "class_posterior_normalized": scoring.min_max(posterior, valid_t),
        **{name: embeddings[name][:] for name in QUALITY_COLUMNS},
    }
    scores = Dataset.from_dict(
        {
            ROW_ID: np.arange(len(labels), dtype=np.int64),
            "label": context.source.labels,
            "given_label": context.source.given_labels,
            "predicted_label": predicted.numpy(),
            "decode_ok": np.asarray(embeddings["decode_ok"][:], dtype=bool),
            "flag_reason": flag_reason,
            **{name: np.asarray(values, dtype=np.float32) for name, values in columns.items()},
        },
        features=scores_features(context.source.class_names),
    )
    return scores, features


def select_stage(scores: Dataset, config: ClipselConfig, image_features: torch.Tensor | None = None):
    """The select stage: masks per ratio, and the scores with the selection's columns for every ratio."""
    table = scores.with_format("numpy")[:]  # read once: the inputs, the damage and the reasons all come from it
    damage = damaged_rows(table, config.selection)
    inputs = selection_inputs(table, config.selection, damage, image_features)
    masks = select(inputs, config.selection)
    scores = without_selection(scores).add_column(DAMAGE, damage.tolist(), feature=Value("string"))
    rewards = {}  # one reward per distinct alpha: with a fixed alpha every ratio shares it
    for ratio in config.selection.selection_ratios:
        alpha = config.selection.alpha_for(ratio)
        if alpha not in rewards and config.selection.selection_method in RANKED_BY_REWARD:
            rewards[alpha] = inputs.reward(alpha)
            rewards[alpha] = np.where(np.isfinite(rewards[alpha]), rewards[alpha], np.nan).astype(np.float32)
        reward = rewards.get(alpha)
        reasons = drop_reasons(
            masks[ratio],
            table["decode_ok"],
            ~inputs.valid,
            inputs.labels,
            table.get("predicted_label"),
            inputs.sample_diversity_normalized,
            inputs.demoted,
        )
        if config.selection.selection_method in RANKED_BY_REWARD:
            scores = scores.add_column(reward_column(ratio), reward, feature=Value("float32"))
        scores = scores.add_column(selected_column(ratio), masks[ratio], feature=Value("bool"))
        scores = scores.add_column(drop_reason_column(ratio), reasons.tolist(), feature=Value("string"))
    return masks, scores


def read_scores_in(directory: str | Path) -> Dataset:
    """The scores table written in ``directory`` (a run folder, or one being built), read in memory with pyarrow:
    nothing is copied into the datasets cache. :func:`read_scores` checks a finished folder first."""
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


def read_scores(location: str | Path, revision: str | None = None, token: str | None = None) -> Dataset:
    """The scores of a run: from its ``output_dir`` (checked against its record) or from the Hub dataset repo it was
    pushed to (its ``scores`` config)."""
    if Path(location).is_dir():
        from .run_record import verify

        verify(location, need_selection=False)
        return read_scores_in(location)
    from datasets import load_dataset
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return load_dataset(str(location), "scores", split="train", revision=revision, token=token)
    except RepositoryNotFoundError as error:
        raise FileNotFoundError(f"{location} is neither a local directory nor a dataset repo you can read.") from error


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


def damaged_rows(table: dict, selection: SelectionConfig) -> np.ndarray:
    """``""`` or the damage found (``noisy``, ``low contrast``, ``blurry``) per row of the scores ``table`` (numpy
    columns); all ``""`` when damage_check is off."""
    if not selection.damage_check:
        return np.full(len(table[ROW_ID]), "", dtype=object)
    statistics = [required_column(table, column, "damage_check") for column in QUALITY_COLUMNS]
    return damage_flags(*statistics, table["flag_reason"] == "", selection.damage_threshold)


def selection_inputs(
    table: dict, selection: SelectionConfig, damage: np.ndarray, image_features: torch.Tensor | None = None
) -> SelectionInputs:
    """What the selectors read: the scores ``table`` (numpy columns), the selection settings and the damage found
    (:func:`damaged_rows`)."""
    gate = posterior = None
    if selection.diversity_gate == "agreement":
        gate = required_column(table, "predicted_label", "diversity_gate agreement") == table["label"]
    if selection.alignment == "sas+posterior":
        posterior = required_column(table, "class_posterior_normalized", "alignment sas+posterior")
    return SelectionInputs(
        row_id=table[ROW_ID].astype(np.int64),
        labels=table["label"].astype(np.int64),
        semantic_alignment_normalized=table["semantic_alignment_normalized"].astype(np.float32),
        sample_diversity_normalized=table["sample_diversity_normalized"].astype(np.float32),
        valid=table["flag_reason"] == "",
        image_features=image_features,
        diversity_gate=gate,
        class_posterior_normalized=posterior,
        demoted=damage != "",
    )


def without_selection(scores: Dataset) -> Dataset:
    """The table without any selection's columns (what a new selection replaces)."""
    return scores.remove_columns([c for c in scores.column_names if c.startswith(SELECTION_PREFIXES) or c == DAMAGE])
