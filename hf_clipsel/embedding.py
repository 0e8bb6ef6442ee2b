"""Embed every image once with the frozen vision tower: batched `datasets.map`, split across processes by
Accelerate, cached on disk in chunks so that a rerun (or a run killed half way) reuses what is done.

The cache holds the pooled vision-tower outputs, before the projection: the projection preset's adapters act
after it, so training and scoring run on this cache without touching an image again. It also holds three pixel
statistics per image (hf_clipsel.image_quality), measured here because this is the one pass that decodes the images.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset, Features, Image, IterableDataset, List, Value, concatenate_datasets

from .data import ROW_ID, decode_rgb
from .image_quality import QUALITY_COLUMNS, UNMEASURED, pixel_statistics
from .modeling import clip_of, text_tower_outputs, vision_tower_outputs

logger = logging.getLogger(__name__)

VISION_POOLED = "vision_pooled"
# Bump when the cached numbers would change for the same model and data.
CACHE_FORMAT_VERSION = 4  # 2: pixel statistics; 3: sharpness; 4: measured on a 256-pixel centre crop


def embedding_features(hidden_size: int) -> Features:
    return Features(
        {
            ROW_ID: Value("int64"),
            VISION_POOLED: List(Value("float32"), length=hidden_size),
            "decode_ok": Value("bool"),
            "decode_error": Value("string"),
            **{name: Value("float32") for name in QUALITY_COLUMNS},
        }
    )


def prepare_batch(cells: list, image_processor) -> dict:
    """The CPU half of a batch: decode to RGB, measure the pixels, preprocess; what cannot be decoded (or
    preprocessed) is flagged with its reason. Runs in a DataLoader worker when ``preprocessing_num_workers`` > 0."""
    decoded = [decode_rgb(cell) for cell in cells]
    errors = [error for _, error in decoded]
    statistics = [pixel_statistics(image) if image is not None else UNMEASURED for image, _ in decoded]
    rows, pixel_values = _preprocess([image for image, _ in decoded], image_processor, errors)
    return {"rows": rows, "pixel_values": pixel_values, "errors": errors, "statistics": statistics}


def embed_prepared(batch: dict, prepared, model, hidden_size: int) -> dict:
    """One `datasets.map` batch: the next prepared batch (from ``prepared``, an iterator over the same rows in the
    same order) through the vision tower."""
    ready = next(prepared)
    if len(ready["errors"]) != len(batch[ROW_ID]):
        raise RuntimeError("the prepared batches went out of step with the rows being embedded.")
    pooled = np.zeros((len(ready["errors"]), hidden_size), dtype=np.float32)
    if ready["rows"]:
        with torch.inference_mode():
            pooled[ready["rows"]] = vision_tower_outputs(model, ready["pixel_values"]).cpu().numpy()
    return {
        ROW_ID: batch[ROW_ID],
        VISION_POOLED: pooled,
        "decode_ok": [not error for error in ready["errors"]],
        "decode_error": ready["errors"],
        **{name: [row[i] for row in ready["statistics"]] for i, name in enumerate(QUALITY_COLUMNS)},
    }


class _PreparedBatches(torch.utils.data.Dataset):
    """The batches of one chunk, prepared (:func:`prepare_batch`) by index, for a DataLoader's workers."""

    def __init__(self, chunk: Dataset, image_column: str, image_processor, batch_size: int):
        self.chunk, self.image_column = chunk, image_column
        self.processor, self.batch_size = image_processor, batch_size

    def __len__(self) -> int:
        return -(-len(self.chunk) // self.batch_size)

    def __getitem__(self, index: int) -> dict:
        rows = self.chunk[index * self.batch_size : (index + 1) * self.batch_size]
        return prepare_batch(rows[self.image_column], self.processor)


def embed_chunk(
    chunk: Dataset,
    image_column: str,
    model,
    image_processor,
    path: Path,
    fingerprint: str,
    batch_size: int,
    num_workers: int = 0,
    desc: str = "Embedding images",
) -> None:
    """Embed one chunk (``row_id`` and an undecoded image column) into the `datasets.map` cache file ``path``,
    written whole or not at all. With ``num_workers`` > 0, DataLoader workers decode and preprocess the next batches
    while the tower runs this one (two batches ahead per worker); the numbers are those of the serial path."""
    if path.exists():
        return
    hidden_size = clip_of(model).config.vision_config.hidden_size
    loader = torch.utils.data.DataLoader(
        _PreparedBatches(chunk, image_column, image_processor, batch_size),
        batch_size=None,  # the dataset yields whole batches
        num_workers=num_workers,
        prefetch_factor=2 if num_workers else None,
    )
    chunk.map(
        embed_prepared,
        batched=True,
        batch_size=batch_size,
        fn_kwargs=dict(prepared=iter(loader), model=model, hidden_size=hidden_size),
        remove_columns=chunk.column_names,
        features=embedding_features(hidden_size),
        cache_file_name=str(path),
        load_from_cache_file=True,
        # Named explicitly so that datasets never hashes the model or the loader passed in fn_kwargs.
        new_fingerprint=fingerprint,
        desc=desc,
    )


def _preprocess(images: list, image_processor, errors: list[str]):
    """Pixel values of the decoded images; an image the processor rejects is flagged in ``errors`` in place."""
    rows = [row for row, image in enumerate(images) if image is not None]
    if not rows:
        return [], None
    try:
        return rows, image_processor(images=[images[row] for row in rows], return_tensors="pt").pixel_values
    except Exception:  # find the culprit(s) one by one, keep the rest of the batch
        kept, tensors = [], []
        for row in rows:
            try:
                tensors.append(image_processor(images=[images[row]], return_tensors="pt").pixel_values)
                kept.append(row)
            except Exception as error:
                errors[row] = f"image could not be preprocessed: {type(error).__name__}: {error}"
        return kept, (torch.cat(tensors) if tensors else None)


def cache_key(
    dataset: Dataset, image_column: str, model_fingerprint: str, image_processor, batch_size: int, chunk_size: int
) -> str:
    """Names a cache from what determines its numbers; the weights enter through their fingerprint only."""
    identity = {
        "version": CACHE_FORMAT_VERSION,
        "data": dataset._fingerprint,
        "image_column": image_column,
        "model": model_fingerprint,
        "processor": image_processor.to_json_string(),
        "batch_size": batch_size,
        "chunk_size": chunk_size,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def embed_images(
    dataset: Dataset,
    image_column: str,
    model,
    image_processor,
    model_fingerprint: str,
    cache_dir: str | Path,
    accelerator: Accelerator,
    batch_size: int = 64,
    chunk_size: int = 4096,
    num_workers: int = 0,
) -> Dataset:
    """Pooled vision-tower outputs for every row of ``dataset`` (which must carry ``row_id``), in row order.

    Chunks of ``chunk_size`` rows are shared out between processes; each chunk is one `datasets.map` cache file,
    written whole or not at all, so a rerun skips finished chunks. Every process returns the full result.
    """
    if chunk_size % batch_size:
        raise ValueError(f"chunk_size ({chunk_size}) must be a multiple of batch_size ({batch_size}).")
    source = dataset.select_columns([ROW_ID, image_column]).cast_column(image_column, Image(decode=False))
    key = cache_key(source, image_column, model_fingerprint, image_processor, batch_size, chunk_size)
    directory = Path(cache_dir) / key
    directory.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:  # a killed run leaves the temporary file of the chunk it was writing
        for stale in directory.glob("tmp*"):
            stale.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    num_chunks = -(-len(source) // chunk_size)
    paths = [directory / f"chunk-{i:05d}-of-{num_chunks:05d}.arrow" for i in range(num_chunks)]

    with accelerator.split_between_processes(list(range(num_chunks))) as my_chunks:
        done = [i for i in my_chunks if paths[i].exists()]
        logger.info(
            "process %d of %d: chunks %s of %d (%d cached)",
            accelerator.process_index,
            accelerator.num_processes,
            _ranges(my_chunks),
            num_chunks,
            len(done),
        )
        for i in my_chunks:
            rows = range(i * chunk_size, min((i + 1) * chunk_size, len(source)))
            embed_chunk(
                source.select(rows),
                image_column,
                model,
                image_processor,
                paths[i],
                f"{key}-{i}",
                batch_size,
                num_workers,
                desc=f"Embedding images [chunk {i + 1}/{num_chunks}, process {accelerator.process_index}]",
            )
    accelerator.wait_for_everyone()
    embeddings = concatenate_datasets([Dataset.from_file(str(path)) for path in paths])
    flagged = len(embeddings) - sum(embeddings["decode_ok"])
    if flagged and accelerator.is_main_process:  # every process holds all of them: one says so
        logger.warning(
            "%d of %d images could not be decoded; they are flagged and kept out of selection.",
            flagged,
            len(embeddings),
        )
    return embeddings


def embed_stage(context, model=None, fingerprint: str | None = None) -> Dataset:
    """The embed stage: pooled vision-tower outputs of every row of the run's source (cached), with decode flags
    and pixel statistics. ``model`` (default: the frozen CLIP) and ``fingerprint`` (default: its checkpoint's) name
    another tower, e.g. one with encoder adapters."""
    from .streaming import embed_stream, stream_identity  # the streamed source's engine (it imports this module)

    model = model or context.model
    fingerprint = fingerprint or context.model_fingerprint
    run, processor = context.config.run, context.processor.image_processor
    sizes = dict(
        batch_size=run.batch_size, chunk_size=run.embedding_chunk_size, num_workers=run.preprocessing_num_workers
    )
    if isinstance(context.dataset, IterableDataset):
        key = hashlib.sha256(
            f"{stream_identity(context.config.data)}-{fingerprint}-{processor.to_json_string()}-"
            f"{run.batch_size}-{run.embedding_chunk_size}".encode()
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
            **sizes,
        )
    return embed_images(
        context.dataset,
        context.source.image_column,
        model,
        processor,
        fingerprint,
        context.cache_dir,
        context.accelerator,
        **sizes,
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
