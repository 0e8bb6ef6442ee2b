"""Configuration dataclasses for every stage.

YAML keys are field names, and field names are unique across the dataclasses, so one flat YAML file (or one
set of CLI flags) configures a whole run. Each dataclass validates itself in ``__post_init__`` so a bad value
fails at parse time with a message that says how to fix it, not deep inside torch.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields

from .core.checks import check_choice, check_fraction, check_positive
from .core.names import budget, ratio_name  # noqa: F401  (part of this module's public names)
from .scoring_config import ScoringConfig
from .selection import SELECTORS, SelectionConfig


@dataclass(frozen=True)
class AdapterPreset:
    """What an adapter preset does; the stages ask this, never the preset's name.

    Attributes:
        adapts: trains adapters (False: zero-shot features).
        on_cache: trains on the embedding cache, on the main process, so any number of processes trains the same
            adapters (False: full forwards over the images on every process, gradients averaged).
        wraps_encoders: wraps modules before the cache boundary (the family's ``encoder_targets``), so the adapted
            features must be embedded again.
    """

    adapts: bool
    on_cache: bool
    wraps_encoders: bool


ADAPTER_PRESETS = {
    "projection": AdapterPreset(adapts=True, on_cache=True, wraps_encoders=False),
    "encoder_lora": AdapterPreset(adapts=True, on_cache=False, wraps_encoders=True),
    "none": AdapterPreset(adapts=False, on_cache=False, wraps_encoders=False),
}
OBJECTIVES = ("class_ce", "infonce")
DTYPES = ("auto", "float32", "bfloat16")
# `preset: paper` reproduces the published method: alpha = ratio (the paper's text), adapters trained on every
# row for the fixed schedule, no held-out check, no gate, SAS alone as the alignment term, no damage or duplicate
# check. Values given explicitly still win.
PRESETS = {
    "paper": {
        "alpha": None,
        "beta": 2.0,
        "adapter_holdout_fraction": 0.0,
        "diversity_gate": "none",
        "alignment": "sas",
        "damage_check": False,
        "duplicate_check": False,
        "adapter_preset": "projection",
        "objective": "class_ce",
        "adapter_epochs": 30,
    },
}
DEFAULT_TEMPLATES = ["a photo of a {}."]


_TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}
_LIST_WORDS = {float: "a list of numbers (e.g. [0.3, 0.5])", str: 'a list of strings (e.g. ["a photo of a {}."])'}


def _typed(key: str, value, annotation):
    """``value`` (e.g. from a YAML file) checked against the field's type (``int | None``, ``list[float]``...),
    numbers widened where that loses nothing; a one-line error that names the key, the value and the type."""
    arguments = typing.get_args(annotation)
    optional = type(None) in arguments
    base = next((a for a in arguments if a is not type(None)), annotation) if optional else annotation
    if value is None:
        if optional:
            return None
        raise ValueError(f"{key} cannot be empty (null); give {_expected(base, optional)}.")
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        items = value if isinstance(value, (list, tuple)) else [value] if key == "selection_ratios" else None
        if items is None:
            raise ValueError(f"{key}: {value!r} is not a list; give {_expected(base, optional)}.")
        return [_typed(key, element, item) for element in items]
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
    }.get(base, True)
    if not ok:
        raise ValueError(f"{key}: {value!r} is not {_expected(base, optional)}.")
    return float(value) if base is float else value


def _expected(base, optional: bool) -> str:
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        text = _LIST_WORDS.get(item, f"a list of {getattr(item, '__name__', item)}")
    else:
        text = _TYPE_WORDS.get(base, getattr(base, "__name__", str(base)))
    return text + (" or null" if optional else "")


@dataclass
class DataConfig:
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Source dataset: a Hub id, a local directory (parquet/arrow files, an image folder or a "
            "`save_to_disk` directory), or a parquet/arrow file."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration, if any."})
    dataset_split: str = field(default="train", metadata={"help": "Split to select from."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    image_column: str | None = field(
        default=None, metadata={"help": "Image column. Default: the first column with an Image feature."}
    )
    label_column: str | None = field(
        default=None, metadata={"help": "Label column. Default: the first ClassLabel column, else `label`/`labels`."}
    )
    class_names: list[str] | None = field(
        default=None,
        metadata={
            "help": "Class names in label order (for a string label column: its values, in the order wanted). "
            "Default: the names of the label column's ClassLabel feature; WordNet ids (ImageNet's n01440764) are "
            "said in the prompts by their ImageNet names (timm's), the labels keep the ids."
        },
    )
    class_names_file: str | None = field(
        default=None,
        metadata={"help": "A text file of class names, one per line in label order: --class_names from a file."},
    )
    max_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N rows of the split (for trials and tests)."}
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the source instead of downloading it whole (datasets that do not fit on disk): "
            "one pass reads the labels, one embeds, one writes the subsets."
        },
    )

    def __post_init__(self):
        check_positive("max_samples", self.max_samples)
        if self.class_names and self.class_names_file:
            raise ValueError("class_names and class_names_file are both given; give one of them.")


@dataclass
class ModelConfig:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "CLIP checkpoint: Hub id (e.g. openai/clip-vit-base-patch32) or a local folder."},
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision of the checkpoint."})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights and activations of the frozen CLIP's image tower: float32, bfloat16 (about 2x faster "
            "on CPU; its scores rank within 0.001 of float32's, recipes/benchmarks/README.md), or auto: bfloat16 on "
            "a GPU, float32 on a CPU. The text tower and the projections stay float32; scores are always float32."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modelling code from the checkpoint repo. Off unless asked."}
    )

    def __post_init__(self):
        check_choice("dtype", self.dtype, DTYPES)


@dataclass
class AdapterConfig:
    adapter_preset: str = field(
        default="projection",
        metadata={
            "help": "projection: LoRA on what runs after the cached vector (CLIP: visual_projection and "
            "text_projection, paper-faithful; SigLIP: the heads; README.md, 'Supported encoders'), trained on the "
            "embedding cache. encoder_lora: LoRA inside both encoders' attention too (no cache possible). none: "
            "zero-shot, no adaptation."
        },
    )
    adapter_path: str | None = field(
        default=None, metadata={"help": "Load trained adapters (PEFT directory or Hub id) instead of training."}
    )
    lora_rank: int = field(
        default=0,
        metadata={
            "help": "LoRA rank. 0 means full rank (the projection dimension), which spans the same maps as "
            "the paper's Linear(d, d) adapters."
        },
    )
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha. Default: equal to the rank."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    objective: str = field(
        default="class_ce",
        metadata={
            "help": "class_ce: cross-entropy of each image against all class prompts (no same-class false "
            "negatives). infonce: in-batch symmetric InfoNCE."
        },
    )
    adapter_epochs: int = field(default=30, metadata={"help": "Adapter training epochs (paper: 30)."})
    adapter_learning_rate: float = field(default=1e-4, metadata={"help": "Adam learning rate (paper: 1e-4)."})
    adapter_lr_step_epochs: int = field(default=30, metadata={"help": "Multiply the lr by 0.1 every N epochs."})
    adapter_batch_size: int = field(default=256, metadata={"help": "Adapter training batch size (paper: 256)."})
    adapter_holdout_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Fraction of the usable rows held out of adapter training (seeded). On them the adapters "
            "stop early at the epoch that agrees best with the given labels, and if they end up agreeing less "
            "than zero-shot CLIP, hf_clipsel says so and scores with zero-shot features. 0 turns both off "
            "(the paper's fixed schedule)."
        },
    )
    adapter_check_confidence: float = field(
        default=0.95,
        metadata={
            "help": "The held-out check keeps the adapters only if they agree with the given labels more often "
            "than zero-shot CLIP at this confidence (one-sided sign test on the held-out rows where the two "
            "disagree); otherwise the scores use zero-shot features. A gain of a few rows is noise, and adapters "
            "that learned structured label noise (e.g. cat<->dog flips) gain a little on held-out rows that share "
            "it. 0 keeps them unless they agree less."
        },
    )
    stability_seeds: int = field(
        default=0,
        metadata={
            "help": "Train the adapters again with this many other seeds (seed + 1, ...), select again with each, "
            "and report in the run summary and the report the share of each ratio's kept rows that those "
            "selections keep too (selection stability across adapter-training seeds). Each seed costs an adapter "
            "training, a scoring and a selection on the embedding cache. Projection preset only; measured by "
            "`hf-clipsel run`. 0: off."
        },
    )
    prompt_templates: list[str] = field(
        default_factory=lambda: list(DEFAULT_TEMPLATES),
        metadata={
            "help": "Prompt templates with one `{}` for the class name. Several: the mean of their normalised "
            "embeddings (a template ensemble)."
        },
    )

    @property
    def preset_traits(self) -> AdapterPreset:
        return ADAPTER_PRESETS[self.adapter_preset]

    def __post_init__(self):
        check_choice("adapter_preset", self.adapter_preset, ADAPTER_PRESETS)
        check_choice("objective", self.objective, OBJECTIVES)
        check_positive("lora_rank", self.lora_rank, allow_zero=True)
        check_positive("lora_alpha", self.lora_alpha)
        check_fraction("lora_dropout", self.lora_dropout)
        check_positive("adapter_epochs", self.adapter_epochs, allow_zero=True)
        check_positive("adapter_learning_rate", self.adapter_learning_rate)
        check_positive("adapter_lr_step_epochs", self.adapter_lr_step_epochs)
        check_positive("adapter_batch_size", self.adapter_batch_size)
        if not 0 <= self.adapter_check_confidence < 1:
            raise ValueError(
                f"adapter_check_confidence must be in [0, 1), got {self.adapter_check_confidence}; e.g. 0.95."
            )
        check_fraction("adapter_holdout_fraction", self.adapter_holdout_fraction)
        check_positive("stability_seeds", self.stability_seeds, allow_zero=True)
        if self.stability_seeds and (not self.preset_traits.on_cache or self.adapter_path):
            raise ValueError(
                "stability_seeds retrains the projection adapters on the embedding cache; it needs adapter_preset "
                "projection and no adapter_path (set stability_seeds 0 otherwise)."
            )
        if not self.prompt_templates:
            raise ValueError("prompt_templates is empty; give at least one template such as 'a photo of a {}.'.")
        for template in self.prompt_templates:
            if template.count("{}") != 1:
                raise ValueError(f"prompt template {template!r} must contain exactly one '{{}}' for the class name.")


@dataclass
class RunConfig:
    output_dir: str = field(default="outputs/clipsel", metadata={"help": "Where every output of the run is written."})
    batch_size: int = field(default=64, metadata={"help": "Images per forward pass when embedding."})
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={
            "help": "DataLoader worker processes that decode and preprocess the next batches while the vision tower "
            "runs this one (per process under accelerate). 0: decode in the main process. Default: on a GPU, the "
            "CPU cores of this process's share of the machine less one (at most 8); on a CPU, 0, since there the "
            "tower is the limit (recipes/benchmarks/README.md, 'Decode-bound embedding'). Scores are the same."
        },
    )
    jpeg_draft: bool = field(
        default=False,
        metadata={
            "help": "Decode a JPEG at least twice the image processor's resize target at a reduced scale (1/2, 1/4 "
            "or 1/8) that keeps both sides at least that long: faster decoding of large photos, slightly different "
            "pixels (and pixel statistics for the damage check). Measured in recipes/benchmarks/README.md, 'JPEG "
            "draft decoding'."
        },
    )
    embedding_chunk_size: int = field(
        default=4096,
        metadata={"help": "Rows per embedding cache file. A killed run resumes at the first unfinished chunk."},
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Embedding cache directory. Default: <output_dir>/embeddings."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace scores and subsets already in output_dir."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Push subsets, scores and adapters at the end."})
    hub_dataset_id: str | None = field(default=None, metadata={"help": "Dataset repo to push to (org/name)."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Model repo for the adapters (org/name)."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repos as private."})
    scores_from: str | None = field(
        default=None,
        metadata={
            "help": "select: read the scores from this Hub dataset repo (its `scores` config) or output "
            "folder instead of output_dir/scores, to select again without a model."
        },
    )

    def __post_init__(self):
        if self.push_to_hub and not self.hub_dataset_id:
            raise ValueError("push_to_hub is on but hub_dataset_id is not set; pass --hub_dataset_id org/name.")
        check_positive("batch_size", self.batch_size)
        if self.preprocessing_num_workers is not None:
            check_positive("preprocessing_num_workers", self.preprocessing_num_workers, allow_zero=True)
        check_positive("embedding_chunk_size", self.embedding_chunk_size)
        if self.embedding_chunk_size % self.batch_size:
            # Chunks made of whole batches keep batch boundaries, and so the numbers, identical across
            # process counts.
            raise ValueError(
                f"embedding_chunk_size ({self.embedding_chunk_size}) must be a multiple of batch_size "
                f"({self.batch_size})."
            )


CONFIG_CLASSES = (DataConfig, ModelConfig, AdapterConfig, ScoringConfig, SelectionConfig, RunConfig)


@dataclass
class ClipselConfig:
    """Every stage's configuration, grouped. Build it with :func:`hf_clipsel.parser.parse_config` or directly."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def from_flat(cls, values: dict) -> ClipselConfig:
        """Build from one flat mapping of field names (a YAML file's keys); unknown keys are an error.

        ``preset`` (e.g. ``paper``) fills the keys that ``values`` does not give. The keys of a registered selector's
        options go to that selector's options; given for another selector than the chosen one, they must keep their
        defaults (a parser fills every flag with its default)."""
        values = dict(values)
        preset = values.pop("preset", None)
        if preset is not None:
            check_choice("preset", preset, PRESETS)
            values = {**PRESETS[preset], **values}
        owners = selector_option_classes()
        classes = flag_classes()
        known = {f.name: klass for klass in classes for f in fields(klass) if f.init}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(
                f"unknown configuration keys: {', '.join(unknown)}. Run `hf-clipsel run --help` for the valid ones."
            )
        annotations = {name: hint for klass in classes for name, hint in typing.get_type_hints(klass).items()}
        groups = {klass: {} for klass in classes}
        for key, value in values.items():
            groups[known[key]][key] = _typed(key, value, annotations[key])
        method = groups[SelectionConfig].get("selection_method", "exact")
        check_choice("selection_method", method, SELECTORS.names())
        chosen = SELECTORS[method].options
        for klass, owner in owners.items():
            changed = [
                key for key, value in groups[klass].items() if klass is not chosen and value != _default(klass, key)
            ]
            if changed:
                raise ValueError(
                    f"{changed[0]} is an option of selection_method {owner}, not of {method}; choose "
                    f"--selection_method {owner} or leave {changed[0]} out."
                )
        options = chosen(**groups[chosen]) if chosen else None
        stages = [klass(**groups[klass]) for klass in CONFIG_CLASSES if klass is not SelectionConfig]
        selection = SelectionConfig(**groups[SelectionConfig], options=options)
        data, model, adapter, scoring, run = stages
        return cls(data, model, adapter, scoring, selection, run)

    def to_flat(self) -> dict:
        """The flat mapping :meth:`from_flat` reads back: every setting, and the chosen selector's options."""
        flat = {}
        groups = (self.data, self.model, self.adapter, self.scoring, self.selection, self.run)
        for group in (*groups, self.selection.selector_options):
            if group is not None:
                flat.update({f.name: getattr(group, f.name) for f in fields(group) if f.init})
        return flat


def selector_option_classes() -> dict[type, str]:
    """Each registered selector's options dataclass, mapped to the selector's name."""
    return {SELECTORS[name].options: name for name in SELECTORS.names() if SELECTORS[name].options is not None}


def flag_classes() -> tuple[type, ...]:
    """Every dataclass whose fields are flat configuration keys (YAML keys, ``--flags``): the stage groups and the
    registered selectors' options. ``ValueError`` when a selector's option takes the name of another setting."""
    classes = (*CONFIG_CLASSES, *selector_option_classes())
    owner = {}
    for klass in classes:
        for f in fields(klass):
            if f.init and owner.setdefault(f.name, klass) is not klass:
                raise ValueError(
                    f"the setting {f.name} is defined by both {owner[f.name].__name__} and {klass.__name__}; a "
                    "selector's options must have names of their own."
                )
    return classes


def _default(klass: type, name: str):
    f = next(f for f in fields(klass) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
