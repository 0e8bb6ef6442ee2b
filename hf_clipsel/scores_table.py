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
  the duplicate score's similarities and its int64 ``duplicate_group``, ``nearest_duplicate``; and those of any score
  registered by another package), float32 unless the column says otherwise, each with its documented range.
- Written by a selection: each flagging score's flag column (``damage``, ``duplicate``, ``conflicting_labels``: ""
  or what was found), and per ratio ``reward_ratio_<r>`` (selectors that rank by the reward),
  ``is_selected_ratio_<r>``, ``drop_reason_ratio_<r>``.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from accelerate.utils import broadcast_object_list, gather_object
from datasets import ClassLabel, Dataset, Features, Image, IterableDataset, Value, concatenate_datasets
from datasets.table import InMemoryTable

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
from .embedding import VISION_POOLED
from .features import FEATURES_DIR, FeatureStore, Share, rows_per_block
from .reasons import drop_reasons
from .scores import ScoreInputs, flag_columns, measured_specs, registered_scores, score_columns
from .scoring import logit_block_rows
from .selection import SelectionConfig, SelectionInputs, select, selector_spec
from .tables import TABLES_DIR, arrow_dataset, mapped_table, numpy_columns


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
            **{column.name: Value(column.dtype) for column in score_columns()},
        }
    )


def score_stage(context, model, embeddings: Dataset, together: bool = False) -> tuple[Dataset | None, FeatureStore]:
    """The score stage: the scores table of every row (every registered score), and the image features it was
    computed from (a :class:`~hf_clipsel.features.FeatureStore` in the run's cache, deleted with it). ``embeddings``
    come from the vision tower of ``model`` (adaptation.scoring_embeddings).

    Out of core: the features are projected block by block into the store and every score reads them in blocks, so
    memory is bounded by a block and the largest class, not by N. ``together``: every process of the run calls it
    and they share the work (projection, row blocks, classes by size); only the main process builds the table (None
    on the others). Otherwise this process does it all alone."""
    from .context import prompts_of, valid_rows
    from .embedding import embed_class_prompts
    from .modeling import class_text_features, image_features, logit_bias, logit_scale, posterior_link

    accelerator = context.accelerator
    share = process_share(accelerator) if together else Share()
    valid = valid_rows(context, embeddings)
    labels = np.clip(np.asarray(context.source.labels, dtype=np.int64), 0, None)
    with torch.no_grad():
        text_pooled = embed_class_prompts(model, context.processor.tokenizer, prompts_of(context))
        class_features = class_text_features(model, text_pooled).cpu()
        dtype = context.config.scoring.feature_store_dtype
        store = feature_store(
            embeddings,
            lambda pooled: image_features(model, torch.from_numpy(pooled)).cpu(),
            labels,
            store_path(context.cache_dir, accelerator if together else None, dtype),
            share,
            owner=share.process_index == 0,
            dtype=dtype,
        )
        inputs = ScoreInputs(
            features=store,
            class_features=class_features,
            labels=torch.from_numpy(labels),
            valid=torch.from_numpy(valid),
            logit_scale=logit_scale(model),
            logit_bias=logit_bias(model),
            posterior_link=posterior_link(model),
            knn_k=context.config.scoring.knn_k,
            knn_block_rows=context.config.scoring.knn_block_rows,
            duplicate_crops=context.config.scoring.duplicate_crops,
            statistics=measured_statistics(embeddings, store, share),
            share=share,
        )
        columns = score_values(inputs)
    del inputs  # its pixel statistics (12 bytes a row, and the thumbnails' store) are not in the table
    if share.process_index != 0:
        return None, store
    return scores_table(context, embeddings, columns), store


def process_share(accelerator) -> Share:
    """The part of the scoring work of this Accelerate process, gathered with accelerate's ``gather_object``."""
    if accelerator.num_processes == 1:
        return Share()
    return Share(accelerator.process_index, accelerator.num_processes, gather_object)


def store_path(cache_dir: str | Path, accelerator=None, dtype: str = "float32") -> Path:
    """A fresh name for a feature store of ``dtype`` under ``cache_dir``; with ``accelerator``, the main process's
    name, the same on every process."""
    name = [f"tmp-features-{uuid.uuid4().hex}.f{np.dtype(dtype).itemsize * 8}"]
    if accelerator is not None and accelerator.num_processes > 1:
        broadcast_object_list(name)
    directory = Path(cache_dir) / FEATURES_DIR
    directory.mkdir(parents=True, exist_ok=True)
    return directory / name[0]


def feature_store(
    embeddings: Dataset,
    project: Callable[[np.ndarray], torch.Tensor],
    labels: np.ndarray,
    path: Path | None,
    share: Share | None = None,
    owner: bool = True,
    dtype: str = "float32",
) -> FeatureStore:
    """The image features ``project(cached [b, hidden]) -> [b, d]`` of every row of the embedding cache, written to
    a :class:`~hf_clipsel.features.FeatureStore` of ``dtype`` at ``path`` (None: in memory) sorted by ``labels``
    (``>= 0``), one block at a time; the processes of ``share`` project their blocks each and wait for one another."""
    share = share or Share()
    first = next(pooled_blocks(embeddings, 1))[1]
    dim = project(first).shape[1]
    store = FeatureStore(labels, dim, path, owner=owner, dtype=dtype)
    block_rows = rows_per_block(max(first.shape[1], dim))  # the wider of the pooled and the projected rows
    blocks = ((start, project(pooled).numpy()) for start, pooled in pooled_blocks(embeddings, block_rows, share))
    return _filled(store, blocks, share)


def _filled(store: FeatureStore, blocks: Iterator[tuple[int, np.ndarray]], share: Share) -> FeatureStore:
    """``store`` with this process's ``(first row, [b, d])`` ``blocks`` written, once every process's are."""
    for start, block in blocks:
        store.write(start, block)
    store.flush()
    share.gather([])  # a barrier: every block is written and flushed before anyone reads
    if share.num_processes > 1:
        store.reopen()  # opened after the others' flushes: their writes are seen, on one machine or several
    return store


def measured_statistics(embeddings: Dataset, features: FeatureStore, share: Share | None = None) -> dict:
    """:attr:`~hf_clipsel.scores.ScoreInputs.statistics`: what the pixel-measuring scores measured while embedding.
    A number per row is float32 ``[N]``, read through Arrow. A descriptor (the duplicate score's uint8 thumbnail: 64
    bytes a row, 0.8 GiB at 13M rows) goes to a store of its dtype beside ``features`` (a file named after theirs,
    or memory), sorted as they are, so that a score reads it class by class and it is never held whole; the
    processes of ``share`` write their blocks each, as for the features."""
    share = share or Share()
    statistics = {}
    for spec in measured_specs():
        if spec.length is None:  # a copy of Arrow's read-only buffer (torch.from_numpy warns about those)
            statistics[spec.name] = np.array(embeddings.with_format("arrow")[spec.name].to_numpy(), np.float32)
            continue
        path = None if features.path is None else features.path.with_name(f"{features.path.stem}-{spec.name}.bin")
        store = FeatureStore(features, spec.length, path, owner=features.owner, dtype=spec.dtype)
        blocks = pooled_blocks(embeddings, store.block_rows, share, spec.name, store.dtype)
        statistics[spec.name] = _filled(store, blocks, share)
    return statistics


def pooled_blocks(
    embeddings: Dataset, block_rows: int, share: Share | None = None, column: str = VISION_POOLED, dtype=np.float32
) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, [b, hidden])`` blocks of the cached vectors (or of another fixed-length ``column`` of the
    cache, such as a pixel descriptor), as ``dtype``, in row order (this process's blocks of ``share``). The cache's
    Arrow files are read with plain reads, not through their memory maps: pages of a mapped file would count in this
    process's resident memory while they stay cached."""
    share = share or Share()
    files = _column_files(embeddings, column)
    if files is None:  # not a plain concatenation of cache files (a dataset in memory, a selection of rows)
        table = embeddings.with_format("numpy", columns=[column])
        for block, start in enumerate(range(0, len(embeddings), block_rows)):
            if block % share.num_processes == share.process_index:
                yield start, np.asarray(table[start : start + block_rows][column], dtype=dtype)
        return
    first = 0
    for index, (path, num_rows) in enumerate(files):
        if index % share.num_processes == share.process_index:
            with pa.OSFile(path) as handle:
                reader, done = pa.ipc.open_stream(handle), 0
                pending: list[np.ndarray] = []
                for batch in reader:
                    values = batch.column(column)
                    pending.append(values.flatten().to_numpy(zero_copy_only=False).reshape(len(batch), -1))
                    if sum(len(part) for part in pending) >= block_rows or done + len(batch) == num_rows:
                        block = np.concatenate(pending).astype(dtype, copy=False)
                        yield first + done + len(batch) - len(block), block
                        pending = []
                    done += len(batch)
        first += num_rows


def _column_files(embeddings: Dataset, column: str) -> list[tuple[str, int]] | None:
    """``(path, rows)`` of the cache files holding ``column``, in row order, when ``embeddings`` is exactly their
    concatenation (the cached vectors' files; the pixel statistics' files beside them); else None."""
    if embeddings._indices is not None or not embeddings.cache_files:
        return None
    files = []
    for cache_file in embeddings.cache_files:
        with pa.memory_map(cache_file["filename"]) as source:  # headers only: no page of the data is touched
            reader = pa.ipc.open_stream(source)
            if column in reader.schema.names:
                files.append((cache_file["filename"], sum(batch.num_rows for batch in reader)))
    return files if files and sum(rows for _, rows in files) == len(embeddings) else None


def score_values(inputs: ScoreInputs) -> dict[str, np.ndarray]:
    """``{column: values[N]}``: every registered score's columns, and ``predicted_label`` (the class the model
    prefers, -1 for a row that is not valid). Every process of ``inputs.share`` calls it and gets all of them."""

    def preferred(rows: np.ndarray, features: torch.Tensor) -> np.ndarray:
        return (F.normalize(features, dim=-1) @ inputs.class_features.T).argmax(dim=-1).numpy()

    # The class the (adapted) model prefers: where it differs from the given label, the row is a suspect. Computed
    # first, once (N x C x d), and handed to the scores: the duplicate score groups rows by it.
    block_rows = min(logit_block_rows(inputs.class_features.shape[0]), inputs.features.block_rows)
    predicted = inputs.features.map_rows(preferred, inputs.share, block_rows)
    inputs = dataclasses.replace(inputs, predicted=torch.from_numpy(np.asarray(predicted, dtype=np.int64)))
    columns = {}
    for score in registered_scores():
        columns.update(score.compute(inputs))
    columns["predicted_label"] = np.where(inputs.valid.numpy(), predicted, -1).astype(np.int64)
    return columns


def scores_table(context, embeddings: Dataset, columns: dict[str, np.ndarray]) -> Dataset:
    """The scores table of the run's source from :func:`score_values`' ``columns``, in a file of the run's cache
    (:data:`TABLES_DIR`) that it reads through the file's memory map: the selection reads a few of its columns, and
    the rest (the image paths, the raw scores) need not be in memory."""
    decoded = numpy_columns(embeddings, ["decode_ok", "decode_error"])  # read once, not as Python lists
    problems = zip(context.source.label_problems, decoded["decode_ok"], decoded["decode_error"])
    flag_reason = [problem or (f"{error}" if not ok else "") for problem, ok, error in problems]
    return arrow_dataset(
        {
            ROW_ID: np.arange(len(embeddings), dtype=np.int64),
            "label": context.source.labels,
            "given_label": context.source.given_labels,
            PATH: image_paths(context.source),
            "predicted_label": columns["predicted_label"],
            "decode_ok": decoded["decode_ok"],
            "flag_reason": flag_reason,
            **{column.name: np.asarray(columns[column.name], dtype=column.dtype) for column in score_columns()},
        },
        features=scores_features(context.source.class_names),
        directory=context.cache_dir / TABLES_DIR,
    )


def image_paths(source) -> pa.Array:
    """Each row's image file as the source (a :class:`~hf_clipsel.data.Source`) names it ("" where a cell holds bytes
    only or no image): the answer a user acts on. Arrow text read from the undecoded Arrow column: no image is
    decoded, and no path becomes a Python string (at 13M rows, an object per row of a gigabyte or more). A stream is
    not read again for it (all "")."""
    if isinstance(source.dataset, IterableDataset):
        return pa.repeat("", source.num_rows)
    cells = source.dataset.select_columns([source.image_column]).cast_column(source.image_column, Image(decode=False))
    return cells.with_format("arrow")[:].column(source.image_column).combine_chunks().field("path").fill_null("")


def select_stage(
    scores: Dataset,
    config: ClipselConfig,
    image_features: FeatureStore | torch.Tensor | None = None,
    directory: str | Path | None = None,
):
    """The select stage: masks per ratio, and the scores with the selection's columns for every ratio: the scores'
    flags, and per ratio the reward (for selectors that rank by it), the mask and each row's drop reason.
    ``directory`` (:data:`TABLES_DIR` of a run's cache): the selection's columns are written there as they are made
    and the table reads them from the files' memory maps (:func:`arrow_dataset`), so that they are not held in
    memory (78 bytes a row at five ratios, 1 GiB at 13M rows); None: in memory."""
    # read once (the inputs, the flags and the reasons come from it), less the text no selection reads: at 13M rows
    # their Python strings would cost gigabytes
    unread = {PATH, "given_label"}
    table = numpy_columns(scores, [c for c in scores.column_names if c not in unread])
    flags = score_flags(table, config.selection)
    inputs = selection_inputs(table, config.selection, flags, image_features)
    # Each group of columns becomes Arrow (and goes to ``directory``) as soon as it exists, and what no later step
    # reads is let go: the flags and the reasons of five ratios held as Python objects would cost more than the table.
    parts = [without_selection(scores)]
    if flags:
        strings = {column: (pa.array(values, pa.string()), Value("string")) for column, values in flags.items()}
        parts.append(_columns(strings, directory))
    del flags
    explained = explained_drops(table, config.selection)
    decode_ok = table["decode_ok"]
    del table
    masks = select(inputs, config.selection)
    ranks_by_reward = selector_spec(config.selection.selection_method).ranks_by_reward
    rewards = {}  # one reward per distinct alpha: with a fixed alpha every ratio shares it
    for alpha in {config.selection.alpha_for(ratio) for ratio in config.selection.selection_ratios}:
        if ranks_by_reward:
            reward = inputs.reward(alpha)
            rewards[alpha] = reward.astype(np.float32)
            rewards[alpha][~np.isfinite(reward)] = np.nan
            del reward
    not_valid = ~inputs.valid
    del inputs
    for ratio in config.selection.selection_ratios:
        added = {}
        if ranks_by_reward:
            added[reward_column(ratio)] = (rewards[config.selection.alpha_for(ratio)], Value("float32"))
        added[selected_column(ratio)] = (masks[ratio], Value("bool"))
        reasons = drop_reasons(masks[ratio], decode_ok, not_valid, explained)
        added[drop_reason_column(ratio)] = (reasons, Value("string"))
        parts.append(_columns(added, directory))
    return masks, concatenate_datasets(parts, axis=1)


def _columns(columns: dict[str, tuple], directory: str | Path | None) -> Dataset:
    """A `Dataset` of ``{name: (values, feature)}`` (:func:`arrow_dataset`)."""
    values = {name: value for name, (value, _) in columns.items()}
    return arrow_dataset(values, Features({name: feature for name, (_, feature) in columns.items()}), directory)


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


def read_scores_in(directory: str | Path, into: str | Path | None = None) -> Dataset:
    """The scores table written in ``directory`` (a run folder, or one being built), read with pyarrow: nothing is
    copied into the datasets cache. In memory, or with ``into`` (:data:`TABLES_DIR` of a run's cache) copied there
    batch by batch and read from the copy's memory map (:func:`arrow_dataset`): at 13M rows the table is 1.3 GiB
    and more with real image paths. :func:`hf_clipsel.runs.load.read_scores` checks a finished folder first."""
    shards = sorted((Path(directory) / SCORES_DIR).glob("*.parquet"))  # one file or several, in row order by name
    if not shards:
        raise FileNotFoundError(
            f"no scores in {Path(directory) / SCORES_DIR}; run `hf-clipsel score` (or `run`) first, or pass "
            "--scores_from."
        )
    if into is None:
        return Dataset(InMemoryTable(pa.concat_tables([pq.read_table(shard) for shard in shards])))
    files = [pq.ParquetFile(shard) for shard in shards]
    batches = (batch for file in files for batch in file.iter_batches())  # 65,536 rows each
    return Dataset(InMemoryTable(mapped_table(files[0].schema_arrow, batches, Path(into))))


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
    table: dict,
    selection: SelectionConfig,
    flags: dict[str, np.ndarray],
    image_features: FeatureStore | torch.Tensor | None = None,
) -> SelectionInputs:
    """What the selectors read: the scores ``table`` (numpy columns), the selection settings and the scores' flags
    (:func:`score_flags`: flagged rows are demoted)."""
    gate = posterior = None
    if selection.diversity_gate == "agreement":
        gate = required_column(table, "predicted_label", "diversity_gate agreement") == table["label"]
    if selection.alignment != "sas":  # sas+posterior, posterior
        posterior = required_column(table, "class_posterior_normalized", f"alignment {selection.alignment}")
    return SelectionInputs(
        # SelectionInputs copies what it keeps: no copy here
        row_id=table[ROW_ID],
        labels=table["label"],
        semantic_alignment_normalized=table["semantic_alignment_normalized"],
        sample_diversity_normalized=table["sample_diversity_normalized"],
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
