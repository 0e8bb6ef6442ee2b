"""The stages of a run as plain functions: embed, adapt, score, select, write.

`run` chains them; the CLI's stage commands call one each, reading the previous stage's outputs from
`output_dir`. Under `accelerate launch` every process embeds its share of the images; the stages after it run
on the main process only (they work on the cache and are cheap), so one and several processes give the same
numbers. The encoder LoRA preset is the exception: its training needs full forwards and uses every process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from datasets import ClassLabel, Dataset, Features, IterableDataset, Value

from . import scoring
from .adaptation import adapt_stage, adapter_fingerprint, read_adapter_check, trained_model, uses_encoder_adapters
from .cards import write_dataset_card
from .configs import ClipselConfig, SelectionConfig, budget
from .context import RunContext, check_budgets, load_context, make_accelerator, prompts_of, valid_rows
from .data import ROW_ID, load_source, with_row_ids
from .embedding import embed_class_prompts, embed_images, pooled_matrix
from .hub import load_scores, push_outputs
from .image_quality import QUALITY_COLUMNS, damage_flags
from .modeling import class_text_features, image_features, logit_scale
from .noise import NOISE_COLUMNS, kept_noise
from .outputs import (
    ADAPTER_DIR,
    RUN_SUMMARY,
    SCORES_DIR,
    drop_reason_column,
    read_run_config,
    reward_column,
    scores_files,
    selected_column,
    write_run_config,
    write_run_summary,
    write_scores,
    write_subsets,
)
from .reasons import REASONS, drop_reasons
from .report import write_report
from .selection import SelectionInputs, select
from .streaming import embed_stream, stream_identity, write_subsets_from_stream

logger = logging.getLogger(__name__)

# The stages, each a plain function; the CLI and the recipes call these.
__all__ = [
    "RunContext",
    "make_accelerator",
    "load_context",
    "embed_stage",
    "adapt_stage",
    "trained_model",
    "scoring_embeddings",
    "score_stage",
    "select_stage",
    "write_stage",
    "push_stage",
    "read_scores",
    "select_from_scores",
    "run",
]

# Per row: "" or the damage the pixel check found ("noisy", "low contrast", "blurry"); written by every selection.
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
# Settings that change no number in scores or subsets: a rerun that differs only in these may reuse output_dir.
OUTPUT_NEUTRAL_KEYS = {
    "scores_from",
    "streaming",
    "output_dir",
    "overwrite_output_dir",
    "push_to_hub",
    "hub_dataset_id",
    "hub_model_id",
    "hub_private",
    "cache_dir",
}


def changed_settings(config: ClipselConfig) -> list[str] | None:
    """The settings (that change results) in which ``config`` differs from the run saved in its output_dir; None
    when no run is saved there."""
    previous = read_run_config(Path(config.run.output_dir))
    if previous is None:
        return None
    current = config.to_flat()
    return sorted(k for k in current if k not in OUTPUT_NEUTRAL_KEYS and previous.get(k) != current[k])


def check_output_dir(config: ClipselConfig) -> None:
    """Refuse to replace another run's results unless asked: a rerun of the same run may reuse the folder."""
    output_dir = Path(config.run.output_dir)
    if config.run.overwrite_output_dir or not (output_dir / SCORES_DIR).exists():
        return
    changed = changed_settings(config)
    if changed:
        raise FileExistsError(
            f"{output_dir} holds the results of a run with other settings ({', '.join(changed)}); pass "
            "--overwrite_output_dir to replace them, or choose another --output_dir."
        )


def embed_stage(context: RunContext, model=None) -> Dataset:
    """Pooled vision-tower outputs of every row (cached), with decode flags."""
    model = model or context.model
    fingerprint = context.model_fingerprint
    if model is not context.model:  # encoder adapters change the tower: their weights join the cache key
        fingerprint += "-" + adapter_fingerprint(model)
    if isinstance(context.dataset, IterableDataset):
        processor = context.processor.image_processor
        key = hashlib.sha256(
            f"{stream_identity(context.config.data)}-{fingerprint}-{processor.to_json_string()}-"
            f"{context.config.run.batch_size}-{context.config.run.embedding_chunk_size}".encode()
        ).hexdigest()[:16]
        return embed_stream(
            context.dataset,
            context.source.num_rows,
            context.source.image_column,
            model,
            processor,
            key,
            context.cache_dir,
            context.accelerator,
            batch_size=context.config.run.batch_size,
            chunk_size=context.config.run.embedding_chunk_size,
        )
    return embed_images(
        context.dataset,
        context.source.image_column,
        model,
        context.processor.image_processor,
        fingerprint,
        context.cache_dir,
        context.accelerator,
        batch_size=context.config.run.batch_size,
        chunk_size=context.config.run.embedding_chunk_size,
    )


def scoring_embeddings(context: RunContext, model, embeddings: Dataset) -> Dataset:
    """Encoder adapters change the vision tower's outputs: embed again through it (every process)."""
    if model is not context.model and uses_encoder_adapters(model):
        return embed_stage(context, model)
    return embeddings


def score_stage(context: RunContext, model, embeddings: Dataset) -> tuple[Dataset, torch.Tensor]:
    """Per-row scores (scores dataset keyed by row_id) and the image features they were computed from.

    ``embeddings`` must come from the vision tower of ``model`` (see :func:`scoring_embeddings`).
    """
    valid = valid_rows(context, embeddings)
    with torch.no_grad():
        features = image_features(model, pooled_matrix(embeddings)).cpu()
        text_pooled = embed_class_prompts(model, context.processor.tokenizer, prompts_of(context))
        class_features = class_text_features(model, text_pooled).cpu()
    labels = torch.from_numpy(context.source.labels)
    valid_t = torch.from_numpy(valid)
    sas = scoring.semantic_alignment(features, class_features, labels.clamp(min=0))
    sas = torch.where(valid_t, sas, torch.zeros_like(sas))
    sds = scoring.sample_diversity(features, labels, context.config.scoring.knn_k, valid=valid_t)
    posterior = scoring.class_posterior(features, class_features, labels.clamp(min=0), logit_scale(model))
    posterior = torch.where(valid_t, posterior, torch.zeros_like(posterior))
    # The class the (adapted) CLIP prefers: where it differs from the given label, the row is a suspect.
    predicted = torch.where(valid_t, (F.normalize(features, dim=-1) @ class_features.T).argmax(dim=-1), -1)
    problems = [
        label_problem or (f"{error}" if not ok else "")
        for label_problem, ok, error in zip(
            context.source.label_problems, embeddings["decode_ok"][:], embeddings["decode_error"][:]
        )
    ]
    scores = Dataset.from_dict(
        {
            ROW_ID: np.arange(len(labels), dtype=np.int64),
            "label": context.source.labels,
            "predicted_label": predicted.numpy(),
            "decode_ok": np.asarray(embeddings["decode_ok"][:], dtype=bool),
            "flag_reason": problems,
            "semantic_alignment": sas.numpy(),
            "sample_diversity": sds.numpy(),
            "semantic_alignment_normalized": scoring.min_max(sas, valid_t).numpy(),
            "sample_diversity_normalized": scoring.min_max(sds, valid_t).numpy(),
            "class_posterior": posterior.numpy(),
            "class_posterior_normalized": scoring.min_max(posterior, valid_t).numpy(),
            **{name: np.asarray(embeddings[name][:], dtype=np.float32) for name in QUALITY_COLUMNS},
        },
        features=Features(
            {
                ROW_ID: Value("int64"),
                "label": ClassLabel(names=context.source.class_names),
                "predicted_label": ClassLabel(names=context.source.class_names),
                "decode_ok": Value("bool"),
                "flag_reason": Value("string"),
                **{name: Value("float32") for name in SCORE_COLUMNS},
            }
        ),
    )
    return scores, features


def _required_column(table: dict, column: str, setting: str) -> np.ndarray:
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
    statistics = [_required_column(table, column, "damage_check") for column in QUALITY_COLUMNS]
    return damage_flags(*statistics, table["flag_reason"] == "", selection.damage_threshold)


def selection_inputs(
    table: dict, selection: SelectionConfig, damage: np.ndarray, image_features: torch.Tensor | None = None
) -> SelectionInputs:
    """What the selectors read: the scores ``table`` (numpy columns), the selection settings and the damage found
    (:func:`damaged_rows`)."""
    gate = posterior = None
    if selection.diversity_gate == "agreement":
        gate = _required_column(table, "predicted_label", "diversity_gate agreement") == table["label"]
    if selection.alignment == "sas+posterior":
        posterior = _required_column(table, "class_posterior_normalized", "alignment sas+posterior")
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


def select_stage(scores: Dataset, config: ClipselConfig, image_features: torch.Tensor | None = None):
    """Masks per ratio, and the scores with reward and is_selected columns for every ratio."""
    table = scores.with_format("numpy")[:]  # read once: the inputs, the damage and the reasons all come from it
    damage = damaged_rows(table, config.selection)
    inputs = selection_inputs(table, config.selection, damage, image_features)
    masks = select(inputs, config.selection)
    scores = scores.remove_columns(
        [c for c in scores.column_names if c.startswith(("reward_", "is_selected_", "drop_reason_")) or c == DAMAGE]
    )
    scores = scores.add_column(DAMAGE, damage.tolist(), feature=Value("string"))
    rewards = {}  # one reward per distinct alpha: with a fixed alpha every ratio shares it
    for ratio in config.selection.selection_ratios:
        alpha = config.selection.alpha_for(ratio)
        if alpha not in rewards:
            rewards[alpha] = inputs.reward(alpha)
        reward = rewards[alpha]
        scores = scores.add_column(
            reward_column(ratio),
            np.where(np.isfinite(reward), reward, np.nan).astype(np.float32),
            feature=Value("float32"),
        )
        scores = scores.add_column(selected_column(ratio), masks[ratio], feature=Value("bool"))
        reasons = drop_reasons(
            masks[ratio],
            table["decode_ok"],
            ~inputs.valid,
            inputs.labels,
            table.get("predicted_label"),
            inputs.sample_diversity_normalized,
            inputs.demoted,
        )
        scores = scores.add_column(drop_reason_column(ratio), reasons.tolist(), feature=Value("string"))
    return masks, scores


def injected_noise(dataset, scores: Dataset, masks: dict, config: ClipselConfig) -> dict | None:
    """For a source that carries hf_clipsel.noise's record columns (``is_noisy``...): the injected noise in the pool,
    and per ratio in the subset and in a random subset of the same size (the ``random`` selector, same seed)."""
    if isinstance(dataset, IterableDataset) or "is_noisy" not in dataset.column_names:
        return None
    present = [name for name in NOISE_COLUMNS if name in dataset.column_names]
    columns = {**dataset.select_columns(present).with_format("numpy")[:], "label": np.asarray(scores["label"][:])}
    table = scores.with_format("numpy")[:]
    random_config = dataclasses.replace(config.selection, selection_method="random", class_balanced=False)
    random_masks = select(selection_inputs(table, random_config, damaged_rows(table, random_config)), random_config)
    return {
        "pool": kept_noise(columns),
        "ratios": {
            f"{ratio:g}": {"selected": kept_noise(columns, mask), "random": kept_noise(columns, random_masks[ratio])}
            for ratio, mask in masks.items()
        },
    }


def summarize(scores: Dataset, masks: dict, config: ClipselConfig, dataset=None) -> dict:
    labels = np.asarray(scores["label"][:])
    class_names = scores.features["label"].names
    valid = np.asarray(scores["flag_reason"][:]) == ""
    ratios = {}
    for ratio, mask in masks.items():
        reasons = Counter(scores[drop_reason_column(ratio)][:])
        k = budget(ratio, len(labels))
        kept_per_class = Counter(labels[mask].tolist())
        diagnostics = getattr(masks, "diagnostics", {}).get(ratio, {})
        ratios[f"{ratio:g}"] = {
            "alpha": config.selection.alpha_for(ratio),
            "budget": k,
            "kept": int(mask.sum()),
            # rows missing from the budget because too few rows are usable (sgd's own miss is in diagnostics)
            "shortfall": int(diagnostics.get("shortfall", max(k - mask.sum(), 0))),
            "diagnostics": {name: _plain(value) for name, value in diagnostics.items()},
            "dropped_by_reason": {reason: reasons[reason] for reason in REASONS if reason and reasons[reason]},
            "kept_per_class": {class_names[c]: int(kept_per_class.get(c, 0)) for c in range(len(class_names))},
        }
    damage = Counter(scores[DAMAGE][:])  # select_stage wrote it
    return {
        "adapter_check": read_adapter_check(Path(config.run.output_dir) / ADAPTER_DIR),
        "damaged": {kind: count for kind, count in sorted(damage.items()) if kind},
        "num_rows": len(labels),
        "num_valid": int(valid.sum()),
        "num_flagged": int((~valid).sum()),
        "class_names": class_names,
        "rows_per_class": {class_names[c]: int((labels == c).sum()) for c in range(len(class_names))},
        "dataset": config.data.dataset_name,
        "dataset_revision": config.data.dataset_revision,
        "model": config.model.model_name_or_path,
        "model_revision": config.model.model_revision,
        "selection_method": config.selection.selection_method,
        "ratios": ratios,
        "injected_noise": None if dataset is None else injected_noise(dataset, scores, masks, config),
    }


def _plain(value):
    """A JSON-friendly copy of a numpy scalar."""
    return value.item() if hasattr(value, "item") else value


def write_stage(
    config: ClipselConfig, dataset_with_ids: Dataset, scores: Dataset, masks: dict, command: list[str] | None = None
) -> dict:
    """Write subsets, scores, configuration, summary and card (main process only).

    The card (README.md) is what makes the folder a dataset `load_dataset` reads: it goes first out and last in,
    so a run killed while writing leaves a folder without it, never one whose card points at a mix of runs.
    """
    output_dir = Path(config.run.output_dir)
    (output_dir / "README.md").unlink(missing_ok=True)
    (output_dir / RUN_SUMMARY).unlink(missing_ok=True)
    if isinstance(dataset_with_ids, IterableDataset):
        write_subsets_from_stream(output_dir, dataset_with_ids, masks)
    else:
        write_subsets(output_dir, dataset_with_ids, masks)
    write_scores(output_dir, scores)
    write_run_config(output_dir, config.to_flat(), command)
    summary = summarize(scores, masks, config, dataset_with_ids)
    write_run_summary(output_dir, summary)
    try:
        write_report(output_dir)  # before the card, which shows the report's figures
    except Exception as error:  # the results are written: a report problem must not cost them their card
        logger.warning("no report: %s; `hf-clipsel report --output_dir %s` writes it again.", error, output_dir)
    write_dataset_card(output_dir)
    return summary


def push_stage(config: ClipselConfig):
    """Push the written outputs when asked (main process only): subsets and scores, then the adapters."""
    if not config.run.push_to_hub:
        return None
    return push_outputs(
        config.run.output_dir, config.run.hub_dataset_id, config.run.hub_model_id, private=config.run.hub_private
    )


def read_scores(config: ClipselConfig) -> Dataset:
    """The scores to select from: `scores_from` (a Hub dataset repo or a run's folder), else output_dir/scores."""
    if config.run.scores_from:
        return load_scores(config.run.scores_from)
    files = scores_files(config.run.output_dir)
    if not files:
        raise FileNotFoundError(
            f"no scores in {Path(config.run.output_dir) / SCORES_DIR}; run `hf-clipsel score` (or `run`) first, or "
            "pass --scores_from."
        )
    return Dataset.from_parquet([str(path) for path in files])


def select_from_scores(config: ClipselConfig, command: list[str] | None = None, scores: Dataset | None = None) -> dict:
    """Select from saved scores and the source dataset, without a model."""
    scores = scores if scores is not None else read_scores(config)
    source = load_source(config.data)
    if isinstance(source, Dataset) and len(source) != len(scores):
        raise ValueError(
            f"the scores have {len(scores)} rows but the source dataset has {len(source)}; select "
            "with the same dataset_name, split and max_samples as the run that scored it."
        )
    check_budgets(config, len(scores))
    masks, scores = select_stage(scores, config)
    return write_stage(
        config, source if isinstance(source, IterableDataset) else with_row_ids(source), scores, masks, command
    )


def run(config: ClipselConfig, accelerator: Accelerator | None = None, command: list[str] | None = None):
    """The whole pipeline. Returns the summary on the main process, None on the others."""
    check_output_dir(config)
    context = load_context(config, accelerator)
    embeddings = embed_stage(context)
    model = adapt_stage(context, embeddings)
    embeddings = scoring_embeddings(context, model, embeddings)
    summary = None
    if context.accelerator.is_main_process:
        scores, features = score_stage(context, model, embeddings)
        masks, scores = select_stage(scores, config, features)
        summary = write_stage(config, context.dataset, scores, masks, command)
        push_stage(config)
    context.accelerator.wait_for_everyone()
    return summary
