"""What a family of image-text encoders tells the rest of hf_clipsel, and the registry of families.

A family is one small class per architecture (one file in this package), registered under the ``model_type`` of the
checkpoints it loads. It says how to load model and processor, where the cache boundary is (the per-image vector the
embed stage computes once) and what runs after it, which modules each adapter preset wraps, how class prompts are
tokenised, and the logits and class posterior. Nothing elsewhere asks which architecture a model is: it asks the
model's family (:func:`family_of`).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import file_exists
from transformers import AutoProcessor, PretrainedConfig

from ..core.registry import Registry

# third-party families: `model_type = "package.module:FamilyClass"`, a module whose import registers the family
ENTRY_POINT_GROUP = "hf_clipsel.families"
OPEN_CLIP_CONFIG = "open_clip_config.json"


class EncoderFamily:
    """The protocol, with CLIP's answers where a dual encoder with projections shares them.

    Attributes (class level; a subclass sets what differs):
        model_type: the checkpoints' ``config.json`` ``model_type`` this family loads.
        model_class: the transformers class loaded with ``from_pretrained``.
        examples: Hub ids of checkpoints it loads (documentation).
        projection_targets: module names (PEFT ``target_modules``) the ``projection`` preset wraps; all of them run
            after the cache boundary, so that preset trains on the embedding cache.
        encoder_targets: what ``encoder_lora`` wraps besides ``projection_targets`` (a regex or names).
        float32_modules: submodules kept in float32 when the image tower runs in bfloat16: what runs after the cache
            boundary and the text tower (the prompts run once; bfloat16 prompts moved the SAS ranking measurably).
        posterior: ``"softmax"`` over the classes or ``"sigmoid"`` of the given label's logit
            (scoring.class_posterior).
        prompt_templates: the templates the checkpoints were evaluated with (documentation; ``prompt_templates``
            in the configuration decides).
        device_normalisation: whether the image processor's output is an image batch [B, 3, H, W] whose rescale and
            normalisation may run on the tower's device after uint8 crops crossed over (hf_clipsel.preprocessing).
    """

    model_type: str = ""
    model_class: type | None = None
    examples: tuple[str, ...] = ()
    projection_targets: tuple[str, ...] = ("visual_projection", "text_projection")
    encoder_targets: str | tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    float32_modules: tuple[str, ...] = ("visual_projection", "text_projection", "text_model")
    posterior: str = "softmax"
    prompt_templates: tuple[str, ...] = ("a photo of a {}.",)
    device_normalisation: bool = True

    # Loading ---------------------------------------------------------------------------------------------------
    def load(self, path: str, dtype: torch.dtype, **kwargs):
        """Model (frozen, eval mode, safetensors only) and processor from ``path`` (a Hub id or a folder)."""
        model = self.model_class.from_pretrained(path, dtype=dtype, use_safetensors=True, **kwargs)
        processor = AutoProcessor.from_pretrained(path, **kwargs)
        model.requires_grad_(False)
        model.eval()
        for name in self.float32_modules:
            model.get_submodule(name).float()
        return model, processor

    def tower_dtype(self, model) -> torch.dtype:
        return model.vision_model.embeddings.patch_embedding.weight.dtype

    def cached_size(self, model_config) -> int:
        """Length of the cached per-image vector."""
        return model_config.vision_config.hidden_size

    def default_lora_rank(self, model_config) -> int:
        """``lora_rank`` 0: full rank of the maps the projection preset wraps."""
        return model_config.projection_dim

    def adapter_targets(self, wraps_encoders: bool) -> list[str] | str:
        """PEFT ``target_modules`` of a preset: ``projection_targets``, and with ``wraps_encoders`` (``encoder_lora``)
        ``encoder_targets`` too."""
        if not wraps_encoders:
            return list(self.projection_targets)
        if isinstance(self.encoder_targets, str):  # a regex: PEFT matches it against the whole module name
            return "|".join([self.encoder_targets, *map(re.escape, self.projection_targets)])
        return list(self.encoder_targets) + list(self.projection_targets)

    def wraps_encoders(self, target_modules) -> bool:
        """Whether adapters with these ``target_modules`` change what runs before the cache boundary."""
        if isinstance(target_modules, str):
            return True
        return any(target not in self.projection_targets for target in target_modules)

    # The image side ------------------------------------------------------------------------------------------------
    def vision_tower_outputs(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The cached vector, float32 [B, cached_size]. CLIP: the pooled vision output before the projection."""
        return model.vision_model(**self._to_tower(model, inputs)).pooler_output.float()

    def image_features(self, model, cached: torch.Tensor) -> torch.Tensor:
        """What runs after the cache: features [N, d] (not normalised) equal to ``get_image_features``'s."""
        return model.visual_projection(cached.to(device=model.device, dtype=torch.float32))

    def _to_tower(self, model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = self.tower_dtype(model)
        return {
            name: value.to(device=model.device, dtype=dtype if value.is_floating_point() else value.dtype)
            for name, value in inputs.items()
        }

    # The text side --------------------------------------------------------------------------------------------------
    def tokenize(self, tokenizer, prompts: list[str], model_config) -> dict[str, torch.Tensor]:
        """Class prompts as the checkpoints were trained on them. CLIP: padded to the longest, truncated."""
        return dict(tokenizer(prompts, padding=True, truncation=True, return_tensors="pt"))

    def text_tower_outputs(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled text-tower outputs before what ``projection`` wraps, float32 [P, hidden]."""
        inputs = {name: value.to(model.device) for name, value in inputs.items()}
        return model.text_model(**inputs).pooler_output.float()

    def text_features(self, model, text_pooled: torch.Tensor) -> torch.Tensor:
        """Text features [P, d] (not normalised) from :meth:`text_tower_outputs`."""
        return model.text_projection(text_pooled.to(device=model.device, dtype=torch.float32))

    # Logits, loss and posterior -----------------------------------------------------------------------------------
    def logit_scale(self, model) -> float:
        return float(model.logit_scale.exp())

    def logit_bias(self, model) -> float:
        return 0.0

    def class_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The adapters' ``class_ce`` loss from [B, C] logits (scale * cosine + bias): the pretraining loss applied
        to each image against every class prompt. CLIP: softmax cross-entropy."""
        return F.cross_entropy(logits, labels)


# model_type -> family; other packages' families come through the entry points, loaded on first use (one that names
# an EncoderFamily subclass is registered, decorated or not)
FAMILIES = Registry("model family", entry_point_group=ENTRY_POINT_GROUP, adopt=lambda family: register_family(family))


def register_family(family: type[EncoderFamily]) -> type[EncoderFamily]:
    """Class decorator: register ``family`` under its ``model_type``. A second family for the same ``model_type`` or
    something that is not an :class:`EncoderFamily` subclass raises ``ValueError``."""
    if not (isinstance(family, type) and issubclass(family, EncoderFamily)):
        raise ValueError(f"register_family takes an EncoderFamily subclass, not {family!r}.")
    if not family.model_type:
        raise ValueError(f"{family.__name__} has no model_type; set the checkpoints' config.json model_type.")
    FAMILIES.register(family.model_type, family())
    return family


def supported() -> str:
    return ", ".join(FAMILIES.names())


def get_family(model_type: str | None) -> EncoderFamily:
    """The family registered for ``model_type`` (the entry points of ``hf_clipsel.families`` included); a one-line
    ``ValueError`` naming the supported ones otherwise."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not a supported image-text encoder; supported model types: {supported()} "
            "(a new one is a file in hf_clipsel/models/ or a `hf_clipsel.families` entry point)."
        )
    return FAMILIES[model_type]


def family_for(path: str, revision: str | None = None, **kwargs) -> EncoderFamily:
    """The family of the checkpoint at ``path`` (Hub id or folder), read from its config.json's ``model_type``
    without loading any weights. An OpenCLIP-only checkpoint (open_clip_config.json, no config.json) or another
    architecture: a one-line ``ValueError``."""
    try:
        config, _ = PretrainedConfig.get_config_dict(path, revision=revision, **kwargs)
    except OSError as error:
        config, failure = {}, error
    else:
        failure = None
    if config.get("model_type") is None and _has_open_clip_config(path, revision):
        raise ValueError(
            f"{path} is an OpenCLIP checkpoint ({OPEN_CLIP_CONFIG}, no transformers config.json); hf_clipsel "
            f"loads transformers checkpoints of the model types {supported()}: use that model's transformers "
            "conversion."
        )
    if failure is not None:
        raise OSError(f"{path} has no readable config.json: {str(failure).splitlines()[0]}") from None
    return get_family(config.get("model_type"))


def _has_open_clip_config(path: str, revision: str | None) -> bool:
    if Path(path).is_dir():
        return (Path(path) / OPEN_CLIP_CONFIG).exists()
    with contextlib.suppress(Exception):  # a network or an auth error says nothing about the file
        return file_exists(path, OPEN_CLIP_CONFIG, revision=revision)
    return False


def family_of(model) -> EncoderFamily:
    """The family of a loaded model (a PeftModel's base model)."""
    return get_family(model.config.model_type)
