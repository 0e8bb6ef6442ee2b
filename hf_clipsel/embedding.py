"""Embed every image once with the frozen vision tower: batched `datasets.map`, split across processes by
Accelerate, cached on disk in chunks so that a rerun (or a run killed half way) reuses what is done.

One engine for both sources: a map-style `Dataset` is cut into chunks by `select`, a streamed `IterableDataset` is read
once and cut into the same chunks as it comes; either way each chunk is one `datasets.map` cache file under one
cache-key scheme. The cache holds one vector per image at the model family's cache boundary (hf_clipsel.models; CLIP:
the pooled vision-tower output, before the projection): the projection preset's adapters act after it, so training
and scoring run on this cache without touching an image again.

The same decode pass measures what the pixel-measuring scores measure (hf_clipsel.scores: the damage check's pixel
statistics), stored in a cache of their own that names neither the model nor the processor: a change to the check
recomputes them with a decode-only pass and never invalidates the (expensive) embeddings, and another model reuses
them.

Decoding and preprocessing run ahead of the tower in DataLoader workers (``preprocessing_num_workers``), as
hf_clipsel.preprocessing describes (uint8 hand-over, normalisation on the device, ``jpeg_draft``): one loader per
process serves all of its chunks, so the workers start once and stay ahead across chunk boundaries.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from datasets import Dataset, Features, Image, IterableDataset, List, Value, concatenate_datasets
from datasets.arrow_writer import ArrowWriter

from .data import ROW_ID
from .features import rows_per_block
from .modeling import cached_size, clip_of, normalises_on_device, text_tower_outputs, vision_tower_outputs
from .preprocessing import ChunkWork, Preprocessing, prepared_chunks
from .scores import measured_columns, measured_specs, measurement_versions
from .streaming import StreamReader, stream_identity, stream_share

# accelerate's logger: warnings come from the main process only; per-process lines say main_process_only=False
logger = get_logger(__name__)

VISION_POOLED = "vision_pooled"
# Bump when the cached embeddings would change for the same model and data.
CACHE_FORMAT_VERSION = 6  # 2-4: pixel statistics inside; 5: statistics in a cache of their own; 6: EXIF orientation
STATISTICS_DIR_PREFIX = "pixel-statistics-"


def embedding_features(hidden_size: int) -> Features:
    return Features(
        {
            ROW_ID: Value("int64"),
            VISION_POOLED: List(Value("float32"), length=hidden_size),
            "decode_ok": Value("bool"),
            "decode_error": Value("string"),
        }
    )


def statistics_features() -> Features:
    measured = {
        column.name: Value(column.dtype) if column.length is None else List(Value(column.dtype), length=column.length)
        for column in measured_specs()
    }
    return Features({ROW_ID: Value("int64"), **measured})


def embed_prepared(row_ids: list[int], prepared, model, hidden_size: int, preprocessing: Preprocessing) -> dict:
    """One `datasets.map` batch (its ``row_id`` column only: the main process never reads the image bytes): the next
    prepared batch (from ``prepared``, an iterator over the same rows in the same order) through the vision tower."""
    ready = next(prepared)
    if len(ready["errors"]) != len(row_ids):
        raise RuntimeError("the prepared batches went out of step with the rows being embedded.")
    pooled = np.zeros((len(ready["errors"]), hidden_size), dtype=np.float32)
    if ready["rows"]:
        with torch.inference_mode():
            inputs = preprocessing.finish_inputs(ready, clip_of(model).device)
            pooled[ready["rows"]] = vision_tower_outputs(model, inputs).cpu().numpy()
    return {
        ROW_ID: row_ids,
        VISION_POOLED: pooled,
        "decode_ok": [not error for error in ready["errors"]],
        "decode_error": ready["errors"],
    }


def embed_chunk(
    chunk: ChunkWork,
    batches: Iterator[dict],
    model,
    preprocessing: Preprocessing,
    paths: tuple[Path, Path],
    fingerprint: str,
    batch_size: int,
    desc: str = "Embedding images",
) -> None:
    """Embed one chunk into ``paths`` from its prepared batches (:func:`~hf_clipsel.preprocessing.prepared_chunks`):
    its `datasets.map` cache file of embeddings (when ``chunk.preprocess``) and its file of pixel statistics (when
    ``chunk.measure``), each written whole or not at all, so that a run killed later keeps this chunk."""
    embeddings_path, statistics_path = paths
    statistics: list = []
    prepared = _collecting(batches, statistics)
    if chunk.preprocess:
        hidden_size = cached_size(model)
        chunk.rows.map(
            embed_prepared,
            batched=True,
            batch_size=batch_size,
            input_columns=[ROW_ID],
            fn_kwargs=dict(prepared=prepared, model=model, hidden_size=hidden_size, preprocessing=preprocessing),
            remove_columns=chunk.rows.column_names,
            features=embedding_features(hidden_size),
            cache_file_name=str(embeddings_path),
            load_from_cache_file=True,
            # Named explicitly so that datasets never hashes the model or the loader passed in fn_kwargs.
            new_fingerprint=fingerprint,
            desc=desc,
        )
        _in_blocks(embeddings_path, rows_per_block(hidden_size))
    else:
        for _ in prepared:  # the statistics alone are missing: decode, measure, no forward
            pass
    if chunk.measure:
        _write_statistics(statistics_path, chunk.rows[ROW_ID], statistics)


def _in_blocks(path: Path, block_rows: int) -> None:
    """Rewrite an Arrow cache file in record batches of about ``block_rows`` (a block of features) instead of the
    forward's ``batch_size`` rows that `datasets.map` writes: opening a file touches every batch's header, and the
    kernel maps about 64 KiB of file around each into the process for as long as it is open. At 64-row batches that
    was 1 KiB a row resident while scoring (measured; 13 GiB at 13M rows, EXTRAPOLATED: recipes/benchmarks/README.md,
    "The thumbnails out of memory"). Written beside and renamed in, as the chunk's own files are."""
    partial = path.with_name(f"tmp-{path.name}")
    with pa.OSFile(str(path)) as source, pa.OSFile(str(partial), "wb") as sink:
        reader = pa.ipc.open_stream(source)
        with pa.ipc.new_stream(sink, reader.schema) as writer:
            pending, rows = [], 0
            for batch in reader:
                pending.append(batch)
                rows += batch.num_rows
                if rows >= block_rows:
                    writer.write_table(pa.Table.from_batches(pending, reader.schema).combine_chunks())
                    pending, rows = [], 0
            if pending:
                writer.write_table(pa.Table.from_batches(pending, reader.schema).combine_chunks())
    os.replace(partial, path)


def _collecting(batches: Iterator[dict], statistics: list) -> Iterator[dict]:
    """The prepared batches, their pixel statistics appended to ``statistics`` on the way."""
    for batch in batches:
        statistics.extend(batch["statistics"])
        yield batch


def _write_statistics(path: Path, row_ids: list[int], statistics: list) -> None:
    """One chunk's pixel statistics as an Arrow file, written beside and renamed in (whole or absent)."""
    if len(statistics) != len(row_ids):
        raise RuntimeError("the pixel statistics went out of step with the rows being embedded.")
    columns = {name: [row[i] for row in statistics] for i, name in enumerate(measured_columns())}
    partial = path.with_name(f"tmp-{path.name}")  # `tmp*`: swept up with datasets' own leftovers
    # one record batch: each maps 64 KiB when the file is opened (_in_blocks)
    with ArrowWriter(
        features=statistics_features(), path=str(partial), writer_batch_size=max(len(row_ids), 1)
    ) as writer:
        writer.write_batch({ROW_ID: list(row_ids), **columns})
        writer.finalize()
    os.replace(partial, path)


def _key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def cache_key(
    source_identity: str,
    image_column: str,
    model_fingerprint: str,
    image_processor,
    batch_size: int,
    chunk_size: int,
    draft_size: tuple[int, int] | None = None,
) -> str:
    """Names an embedding cache from what determines its numbers; the weights enter through their fingerprint only.
    ``source_identity``: a map-style dataset's fingerprint, or a stream's
    :func:`~hf_clipsel.streaming.stream_identity`."""
    return _key(
        {
            "version": CACHE_FORMAT_VERSION,
            "data": source_identity,
            "image_column": image_column,
            "model": model_fingerprint,
            "processor": image_processor.to_json_string(),
            "batch_size": batch_size,
            "chunk_size": chunk_size,
            **_decoding(draft_size),
        }
    )


def statistics_key(
    source_identity: str, image_column: str, chunk_size: int, draft_size: tuple[int, int] | None = None
) -> str:
    """Names a pixel-statistics cache: the source, the pixel-measuring scores and their versions, and the decoding
    scale (no model)."""
    identity = {"version": measurement_versions(), "data": source_identity, "image_column": image_column}
    return _key({**identity, "chunk_size": chunk_size, **_decoding(draft_size)})


def _decoding(draft_size: tuple[int, int] | None) -> dict:
    # Named only when JPEGs are drafted, so that the caches of full-scale decoding keep the names they had before
    # jpeg_draft existed.
    return {"jpeg_draft": list(draft_size)} if draft_size else {}


def embed_images(
    dataset: Dataset | IterableDataset,
    image_column: str,
    model,
    image_processor,
    model_fingerprint: str,
    cache_dir: str | Path,
    accelerator: Accelerator,
    batch_size: int = 64,
    chunk_size: int = 4096,
    num_workers: int = 0,
    num_rows: int | None = None,
    source_identity: str | None = None,
    jpeg_draft: bool = False,
    shard_rows: list[int] | None = None,
) -> Dataset:
    """Pooled vision-tower outputs and pixel statistics of every row of ``dataset``, in row order.

    A map-style ``dataset`` must carry ``row_id``; a streamed one needs ``num_rows`` and ``source_identity`` (what
    names its cache, :func:`~hf_clipsel.streaming.stream_identity`), and its row ids are positions in the stream.
    Chunks of ``chunk_size`` rows are shared out between processes; each chunk is one `datasets.map` cache file (and
    one file of statistics), written whole or not at all, so a rerun skips finished chunks. Every process returns the
    full result. ``jpeg_draft``: see :class:`Preprocessing`. ``shard_rows``: a stream's rows in each of its shards, in
    order (:attr:`~hf_clipsel.data.Source.shard_rows`); with at least one shard a process, each process reads its own
    shards only (:func:`~hf_clipsel.streaming.stream_share`), else every process reads the stream from its start.
    One DataLoader per process prepares all of its chunks (:func:`~hf_clipsel.preprocessing.prepared_chunks`), so
    ``num_workers`` workers start once whatever ``chunk_size`` is.
    """
    if chunk_size % batch_size:
        raise ValueError(f"chunk_size ({chunk_size}) must be a multiple of batch_size ({batch_size}).")
    streamed = isinstance(dataset, IterableDataset)
    if streamed:
        source = dataset.select_columns([image_column]).cast_column(image_column, Image(decode=False))
    else:
        source = dataset.select_columns([ROW_ID, image_column]).cast_column(image_column, Image(decode=False))
        num_rows, source_identity = len(source), source._fingerprint
    preprocessing = Preprocessing(image_processor, jpeg_draft, normalises_on_device(model))
    draft_size = preprocessing.draft_size
    if jpeg_draft and draft_size is None:
        logger.warning(
            "jpeg_draft is on, but the image processor does not resize to a shortest edge or a fixed size; JPEGs are "
            "decoded at full scale."
        )
    directories = (
        Path(cache_dir) / cache_key(source_identity, image_column, model_fingerprint, image_processor, batch_size,
                                    chunk_size, draft_size),
        Path(cache_dir) / (STATISTICS_DIR_PREFIX + statistics_key(source_identity, image_column, chunk_size,
                                                                  draft_size)),
    )  # fmt: skip
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True)
        if accelerator.is_main_process:  # a killed run leaves the temporary file of the chunk it was writing
            for stale in directory.glob("tmp*"):
                stale.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    num_chunks = -(-num_rows // chunk_size)
    names = [f"chunk-{i:05d}-of-{num_chunks:05d}.arrow" for i in range(num_chunks)]
    paths = [(directories[0] / name, directories[1] / name) for name in names]

    rank, world_size = accelerator.process_index, accelerator.num_processes
    share = stream_share(shard_rows, rank, world_size, chunk_size, num_rows) if streamed else None
    with accelerator.split_between_processes(list(range(num_chunks))) as my_chunks:
        my_chunks = share.chunks if share else my_chunks
        todo = [i for i in my_chunks if not all(path.exists() for path in paths[i])]
        logger.info(
            "process %d of %d: chunks %s of %d (%d cached)%s",
            rank,
            world_size,
            _ranges(my_chunks),
            num_chunks,
            len(my_chunks) - len(todo),
            f", {share.describe()}" if share else "",
            main_process_only=False,
        )
        reader = StreamReader(source, share) if streamed else None
        chunks = _chunks(source, image_column, todo, chunk_size, num_rows, reader)
        work = (ChunkWork(i, rows, i * chunk_size, *(not path.exists() for path in paths[i])) for i, rows in chunks)
        pin_memory = clip_of(model).device.type == "cuda"
        loader_source = None if streamed else source  # a stream's batches carry their cells
        prepared = prepared_chunks(
            work, loader_source, image_column, preprocessing, batch_size, num_workers, pin_memory
        )
        for chunk, batches in prepared if todo else ():  # nothing to do: no workers started
            i = chunk.index
            embed_chunk(
                chunk,
                batches,
                model,
                preprocessing,
                paths[i],
                f"{directories[0].name}-{i}",
                batch_size,
                desc=f"Embedding images [chunk {i + 1}/{num_chunks}, process {rank}]",
            )
        if reader:
            logger.info("process %d of %d: read %d rows of the stream", rank, world_size, reader.rows_read,
                        main_process_only=False)  # fmt: skip
    accelerator.wait_for_everyone()
    embeddings = concatenate_datasets([Dataset.from_file(str(path)) for path, _ in paths])
    statistics = concatenate_datasets([Dataset.from_file(str(path)) for _, path in paths]).remove_columns(ROW_ID)
    flagged = len(embeddings) - sum(embeddings["decode_ok"])
    if flagged and flagged == len(embeddings):  # nothing to adapt on, score or select
        first = next(reason for reason in embeddings["decode_error"] if reason)
        raise ValueError(
            f"none of the {flagged} images could be decoded (the first: {first}); check the image column."
        )
    if flagged:  # every process holds all of them: the main one says so (accelerate's logger)
        logger.warning(
            "%d of %d images could not be decoded; they are flagged and kept out of selection.",
            flagged,
            len(embeddings),
        )
    return concatenate_datasets([embeddings, statistics], axis=1)


def _chunks(
    source: Dataset | IterableDataset,
    image_column: str,
    wanted: list[int],
    chunk_size: int,
    num_rows: int,
    reader: StreamReader | None = None,
) -> Iterator[tuple[int, Dataset]]:
    """``(index, chunk)`` for each chunk index in ``wanted`` (ascending): a `Dataset` of ``row_id`` and the undecoded
    image column. A map-style source is cut by `select`; a stream is read by ``reader`` (this process's share, from
    where it starts) up to the last wanted chunk, holding one chunk in memory at a time."""
    if isinstance(source, Dataset):
        for i in wanted:
            yield i, source.select(range(i * chunk_size, min((i + 1) * chunk_size, num_rows)))
        return
    features = Features({ROW_ID: Value("int64"), image_column: Image(decode=False)})
    rows: list[dict] = []
    if not wanted:
        return
    wanted_set = set(wanted)
    for row_id, row in reader.rows():
        chunk = row_id // chunk_size
        if chunk not in wanted_set:
            continue
        rows.append({ROW_ID: row_id, image_column: row[image_column]})
        if len(rows) == chunk_size or row_id == num_rows - 1:
            yield chunk, Dataset.from_list(rows, features=features)
            rows = []
            if chunk == wanted[-1]:  # stop reading: the rest of the stream is other processes' (or done)
                return


def preprocessing_workers(configured: int | None, accelerator: Accelerator) -> int:
    """``preprocessing_num_workers``, or its default: on a GPU the cores of this process's share of the machine less
    one for the process itself (at most 8), since there decoding is the limit (bench_embedding.py --case decode: 2
    workers embed 1.6-1.8x as fast as one process on 2 cores); on a CPU none, since there the tower is (ViT-B/32 embeds
    13-30 images/s on 2 cores against 240 decoded, and workers would take its cores)."""
    if configured is not None:
        return configured
    if accelerator.device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    return max(1, min(8, cores // processes_here - 1))


def embed_stage(context, model=None, fingerprint: str | None = None) -> Dataset:
    """The embed stage: pooled vision-tower outputs of every row of the run's source (cached), with decode flags
    and pixel statistics. ``model`` (default: the frozen CLIP) and ``fingerprint`` (default: its checkpoint's) name
    another tower, e.g. one with encoder adapters."""
    run = context.config.run
    streamed = isinstance(context.dataset, IterableDataset)
    return embed_images(
        context.dataset,
        context.source.image_column,
        model or context.model,
        context.processor.image_processor,
        fingerprint or context.model_fingerprint,
        context.cache_dir,
        context.accelerator,
        batch_size=run.batch_size,
        chunk_size=run.embedding_chunk_size,
        num_workers=preprocessing_workers(run.preprocessing_num_workers, context.accelerator),
        num_rows=context.source.num_rows if streamed else None,
        source_identity=stream_identity(context.config.data) if streamed else None,
        jpeg_draft=run.jpeg_draft,
        shard_rows=context.source.shard_rows if streamed else None,
    )


def cache_keys(*embeddings: Dataset) -> list[str]:
    """The names of the cache folders the given embeddings were read from (what a run's record keeps)."""
    return sorted({Path(f["filename"]).parent.name for e in embeddings for f in e.cache_files})


def _ranges(indices: list[int]) -> str:
    return f"{indices[0]}-{indices[-1]}" if indices else "none"


def pooled_matrix(embeddings: Dataset) -> torch.Tensor:
    """The cached pooled outputs as one float32 tensor [N, hidden]."""
    return torch.from_numpy(np.asarray(embeddings.with_format("numpy")[VISION_POOLED][:], dtype=np.float32))


@torch.no_grad()  # not inference_mode: adapters train on these tensors
def embed_class_prompts(model, tokenizer, prompts: list[list[str]], batch_size: int = 256) -> torch.Tensor:
    """Pooled text-tower outputs of ``prompts[t][c]``, float32 [T, C, hidden]."""
    flat = [prompt for per_template in prompts for prompt in per_template]
    pooled = torch.cat(
        [text_tower_outputs(model, tokenizer, flat[i : i + batch_size]) for i in range(0, len(flat), batch_size)]
    )
    return pooled.reshape(len(prompts), len(prompts[0]), -1).cpu()
