"""The CPU half of embedding: decode, measure and preprocess a batch of image cells, in DataLoader workers when
``preprocessing_num_workers`` is above 0, and the last step where the tower runs. One DataLoader serves every chunk
of a process (:func:`prepared_chunks`): its sampler hands out one task a batch, so its workers start once.

With a torchvision-backed image processor (transformers' default) whose output is an image batch [B, 3, H, W] (the
family says so: ``device_normalisation``), the workers stop before the processor's fused rescale-and-normalise and
ship uint8 crops, a quarter of float32's bytes; that last step runs where the tower runs (on the GPU, from pinned
memory) with the processor's own arithmetic, so the pixel values are bit-identical. Other processors (SigLIP 2
NaFlex's patch sequences, a slow PIL processor) run whole in the workers, every tensor they return handed over.
With ``jpeg_draft`` a JPEG at least twice the processor's resize target is decoded at a reduced DCT scale: faster for
large photos, not bit-identical (off by default; recipes/benchmarks/README.md, "JPEG draft decoding").
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from datasets import Dataset

from .data import decode_rgb
from .scores import measure_image


class Preprocessing:
    """An image processor, split where the tower runs. For a torchvision-backed processor that rescales and
    normalises an image batch, :meth:`prepare` stops before that fused last step and returns uint8 crops, and
    :meth:`finish` does it on the tower's device with the processor's own constants and operation, so the pixel
    values are bit-identical to the processor's. Any other processor (or ``device_normalisation`` off) runs whole in
    :meth:`prepare`.

    ``jpeg_draft``: JPEGs at least twice the processor's resize target are decoded at a reduced scale that keeps
    both sides at least that long (``draft_size``; see :func:`hf_clipsel.data.decode_rgb`)."""

    def __init__(self, image_processor, jpeg_draft: bool = False, device_normalisation: bool = True):
        self.processor = image_processor
        self.draft_size = resize_target(image_processor) if jpeg_draft else None
        self.deferred = (
            device_normalisation
            and getattr(image_processor, "backend", None) == "torchvision"
            and bool(getattr(image_processor, "do_rescale", False))
            and bool(getattr(image_processor, "do_normalize", False))
        )
        if self.deferred:  # what TorchvisionBackend.rescale_and_normalize computes (mean and std / rescale factor)
            self.mean = torch.tensor(image_processor.image_mean) * (1.0 / image_processor.rescale_factor)
            self.std = torch.tensor(image_processor.image_std) * (1.0 / image_processor.rescale_factor)
        self._buffer: torch.Tensor | None = None

    def prepare(self, images: list) -> dict[str, torch.Tensor]:
        """Every tensor the processor returns for ``images`` (``pixel_values`` uint8 if deferred)."""
        stop_early = dict(do_rescale=False, do_normalize=False) if self.deferred else {}
        return dict(self.processor(images=images, return_tensors="pt", **stop_early))

    def finish(self, pixel_values: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The model's pixel values on ``device``. With a deferred normalisation the result lives in one reused
        buffer, valid until the next call: a fresh float32 batch (38.5 MB for 64 x 3 x 224 x 224) costs five times
        the arithmetic in page faults on a CPU."""
        pixel_values = pixel_values.to(device, non_blocking=True)  # from pinned memory on CUDA; uint8 if deferred
        if not self.deferred:
            return pixel_values
        from torchvision.transforms.v2 import functional as tvF

        buffer = self._buffer
        if buffer is None or buffer.shape != pixel_values.shape or buffer.device != device:
            buffer = self._buffer = torch.empty(pixel_values.shape, dtype=torch.float32, device=device)
            self.mean, self.std = self.mean.to(device), self.std.to(device)  # moved once, with the buffer
        buffer.copy_(pixel_values)  # uint8 to float32 on the device, after the copy across
        return tvF.normalize(buffer, self.mean, self.std, inplace=True)

    def finish_inputs(self, prepared: dict, device: torch.device) -> dict[str, torch.Tensor]:
        """The vision tower's inputs on ``device`` from a :func:`prepare_batch` result: the finished pixel values
        and the processor's other tensors (NaFlex: ``pixel_attention_mask``, ``spatial_shapes``)."""
        other = {name: value.to(device, non_blocking=True) for name, value in prepared["other_inputs"].items()}
        return {"pixel_values": self.finish(prepared["pixel_values"], device), **other}


def resize_target(image_processor) -> tuple[int, int] | None:
    """The (width, height) both sides of an image keep at least after the processor's resize, or None where that is
    not known (no resize, or a rule other than a shortest edge or a fixed size, e.g. NaFlex's patch budget)."""
    size = image_processor.size if getattr(image_processor, "do_resize", False) else None
    if size is None:
        return None
    if size.get("shortest_edge"):
        return (size["shortest_edge"],) * 2
    if size.get("height") and size.get("width"):
        return size["width"], size["height"]
    return None


def prepare_batch(cells: list, preprocessing: Preprocessing, preprocess: bool = True, measure: bool = True) -> dict:
    """The CPU half of a batch: decode to RGB, measure the pixels (``measure``), preprocess (``preprocess``; off: a
    pass for the statistics alone); what cannot be decoded (or preprocessed) is flagged with its reason. Runs in a
    DataLoader worker when ``preprocessing_num_workers`` is above 0. ``pixel_values`` and ``other_inputs`` (the
    processor's other tensors) hold the rows listed in ``rows``."""
    decoded = [decode_rgb(cell, preprocessing.draft_size) for cell in cells]
    errors = [error for _, error in decoded]
    statistics = [measure_image(image) for image, _ in decoded] if measure else []
    rows, inputs = [], {}
    if preprocess:
        rows, inputs = _preprocess([image for image, _ in decoded], preprocessing, errors)
    pixel_values = inputs.pop("pixel_values", None)
    return {
        "rows": rows,
        "pixel_values": pixel_values,
        "other_inputs": inputs,
        "errors": errors,
        "statistics": statistics,
    }


@dataclass(frozen=True)
class BatchTask:
    """One batch for a worker: rows ``start:stop`` of the loader's map-style source, or ``cells`` themselves (a
    stream's, read by the main process); ``preprocess`` and ``measure`` as in :func:`prepare_batch`."""

    start: int
    stop: int
    preprocess: bool
    measure: bool
    cells: list | None = None


class PreparedBatches(torch.utils.data.Dataset):
    """Prepares (:func:`prepare_batch`) the batch a :class:`BatchTask` names, in a DataLoader worker. The loader's
    sampler hands out the tasks, so one loader (and its workers) serves every chunk of a process: the workers start
    once, not once a chunk. ``source``: the map-style rows (``row_id`` and the undecoded image column) that tasks
    name by position; None for a stream, whose tasks carry their cells."""

    def __init__(self, source: Dataset | None, image_column: str, preprocessing: Preprocessing):
        self.source, self.image_column, self.preprocessing = source, image_column, preprocessing

    def __getitem__(self, task: BatchTask) -> dict:
        cells = task.cells if task.cells is not None else self.source[task.start : task.stop][self.image_column]
        return prepare_batch(cells, self.preprocessing, task.preprocess, task.measure)


@dataclass(frozen=True)
class ChunkWork:
    """One chunk to embed: its index, its rows (``row_id`` and the undecoded image column), the position of its
    first row in the loader's map-style source (unused for a stream), and what is missing from the cache."""

    index: int
    rows: Dataset
    first_row: int
    preprocess: bool
    measure: bool


def prepared_chunks(
    work: Iterator[ChunkWork],
    source: Dataset | None,
    image_column: str,
    preprocessing: Preprocessing,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[ChunkWork, Iterator[dict]]]:
    """``(chunk, its prepared batches)`` for each chunk of ``work`` in turn, from one DataLoader over them all: with
    ``num_workers`` > 0 its workers decode and preprocess two batches ahead each, across chunk boundaries, and live
    as long as this generator. Each chunk's batches must be consumed before the next chunk is asked for. ``work`` is
    read lazily, as the workers need tasks (a stream is read as it is embedded). The numbers are those of the serial
    path: the batches are the same rows, prepared by the same function, in order."""
    pending: deque[ChunkWork] = deque()  # chunks whose tasks the sampler has handed out, first in first out

    def tasks() -> Iterator[BatchTask]:
        for chunk in work:
            pending.append(chunk)
            for start in range(0, len(chunk.rows), batch_size):
                stop = min(start + batch_size, len(chunk.rows))
                if source is None:
                    cells = chunk.rows[start:stop][image_column]
                    yield BatchTask(start, stop, chunk.preprocess, chunk.measure, cells)
                else:
                    first = chunk.first_row
                    yield BatchTask(first + start, first + stop, chunk.preprocess, chunk.measure)

    loader = torch.utils.data.DataLoader(
        PreparedBatches(source, image_column, preprocessing),
        batch_size=None,  # each task is a whole batch
        sampler=tasks(),
        num_workers=num_workers,
        prefetch_factor=2 if num_workers else None,
        pin_memory=pin_memory,  # so that the copy to the device overlaps the forward
    )
    batches = iter(loader)
    for first in batches:  # a chunk's first batch: its tasks, and so the chunk, were handed out
        chunk = pending.popleft()
        yield chunk, itertools.chain([first], itertools.islice(batches, -(-len(chunk.rows) // batch_size) - 1))


def _preprocess(images: list, preprocessing: Preprocessing, errors: list[str]) -> tuple[list[int], dict]:
    """Processor outputs of the decoded images; an image the processor rejects is flagged in ``errors`` in place."""
    rows = [row for row, image in enumerate(images) if image is not None]
    if not rows:
        return [], {}
    try:
        return rows, preprocessing.prepare([images[row] for row in rows])
    except Exception:  # find the culprit(s) one by one, keep the rest of the batch
        kept, outputs = [], []
        for row in rows:
            try:
                outputs.append(preprocessing.prepare([images[row]]))
                kept.append(row)
            except Exception as error:
                errors[row] = f"image could not be preprocessed: {type(error).__name__}: {error}"
        if not outputs:
            return [], {}
        return kept, {name: torch.cat([output[name] for output in outputs]) for name in outputs[0]}
