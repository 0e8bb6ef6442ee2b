"""What every stage of a run needs: the configuration, the loaded source and model, and the accelerator."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset, IterableDataset

from .configs import ClipselConfig, budget
from .data import Source, class_prompts, load_source, prepare_source, with_row_ids
from .hub_access import check_hub_reachable
from .modeling import load_model, model_fingerprint
from .models import family_for
from .outputs import EMBEDDINGS_DIR


@dataclass
class RunContext:
    """What every stage needs: the configuration, the loaded source and model, the accelerator."""

    config: ClipselConfig
    accelerator: Accelerator
    source: Source
    dataset: Dataset  # the source with row_id
    model: object
    processor: object
    model_fingerprint: str

    @property
    def output_dir(self) -> Path:
        return Path(self.config.run.output_dir)

    @property
    def cache_dir(self) -> Path:
        return cache_dir_of(self.config)


def cache_dir_of(config: ClipselConfig) -> Path:
    """The run's cache: ``cache_dir``, or ``embeddings/`` in its folder."""
    return Path(config.run.cache_dir or Path(config.run.output_dir) / EMBEDDINGS_DIR)


def make_accelerator() -> Accelerator:
    """Accelerate picks the device. Several processes without CUDA (`accelerate launch --multi_gpu` or torchrun on
    a CPU machine) would each run alone unless asked for CPU explicitly: ask, so they share the work."""
    several_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=several_processes and not torch.cuda.is_available())


def load_context(
    config: ClipselConfig, accelerator: Accelerator | None = None, dataset: Dataset | IterableDataset | None = None
) -> RunContext:
    """The source and the model of ``config``; ``dataset``: a `datasets.Dataset` in memory to select from instead of
    ``dataset_name`` (:func:`~hf_clipsel.data.load_source`). A checkpoint of no supported family fails first, before
    any data is read (hf_clipsel.models.family_for reads its config.json only)."""
    accelerator = accelerator or make_accelerator()
    check_hub_reachable(config.model.model_name_or_path, "load the model")  # seconds, not a minute of retries
    if config.model.model_name_or_path:
        family_for(config.model.model_name_or_path, revision=config.model.model_revision)
    preset = config.adapter.preset_traits
    if config.data.streaming and preset.adapts and not preset.on_cache and not config.adapter.adapter_path:
        raise ValueError(
            "the encoder_lora preset trains on full forwards over the images, which a stream cannot "
            "replay; use --adapter_preset projection with --streaming, or load the data whole."
        )
    source = prepare_source(load_source(config.data, dataset), config.data, warn=accelerator.is_main_process)
    check_budgets(config, source.num_rows)
    model, processor = load_model(config.model, accelerator.device)
    model.to(accelerator.device)
    return RunContext(
        config,
        accelerator,
        source,
        source.dataset if config.data.streaming else with_row_ids(source.dataset),
        model,
        processor,
        model_fingerprint(config.model, model),
    )


def check_budgets(config: ClipselConfig, num_rows: int) -> None:
    """A ratio that keeps no row is a mistake: say so before any work is done."""
    for ratio in config.selection.selection_ratios:
        if budget(ratio, num_rows) == 0:
            raise ValueError(
                f"selection ratio {ratio:g} keeps 0 of {num_rows} rows; use a ratio of at least "
                f"{1 / num_rows:.2g} for this dataset."
            )


def valid_rows(context: RunContext, embeddings: Dataset) -> np.ndarray:
    """Rows that may be trained on, scored and selected: a decodable image and a usable label."""
    decode_ok = np.asarray(embeddings["decode_ok"][:], dtype=bool)
    return decode_ok & (context.source.labels >= 0)


def prompts_of(context: RunContext) -> list[list[str]]:
    """The prompts of every template and class (``[t][c]``), saying the source's prompt names (readable names for
    WordNet ids: :attr:`~hf_clipsel.data.Source.prompt_names`)."""
    return class_prompts(context.source.prompt_names, context.config.adapter.prompt_templates)
