"""Load the frozen image-text encoder, attach or load PEFT adapters, and turn cached tower outputs into features.

Every architecture-specific answer comes from the checkpoint's family (hf_clipsel.models); this module is the one
the stages call. Features are always computed in two steps, tower then what runs after the cache boundary, so that
the projection preset can run on cached tower outputs and give the same numbers as a full forward through the PEFT
model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import file_exists
from peft import LoraConfig, PeftModel, get_peft_model

from .configs import AdapterConfig, ModelConfig
from .models import family_for, family_of

logger = logging.getLogger(__name__)

SAFETENSORS_ADAPTER = "adapter_model.safetensors"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def tower_dtype(config: ModelConfig, device: torch.device | str | None = None) -> str:
    """The image tower's dtype: the configured one, or for ``auto`` bfloat16 on a GPU and float32 elsewhere (the
    rank check of recipes/benchmarks/bench_embedding.py holds for bfloat16: Spearman 0.9993 SAS, 0.9999 SDS)."""
    if config.dtype != "auto":
        return config.dtype
    return "bfloat16" if torch.device(device or "cpu").type == "cuda" else "float32"


def load_model(config: ModelConfig, device: torch.device | str | None = None):
    """The checkpoint of a supported family (hf_clipsel.models), frozen and in eval mode, with its processor, for
    ``device`` (which decides ``auto`` dtypes; the caller moves the model there). Weights come from safetensors only.
    What runs after the cache boundary and the text tower stay float32 (the family's ``float32_modules``)."""
    if not config.model_name_or_path:
        raise ValueError("model_name_or_path is not set; pass e.g. --model_name_or_path openai/clip-vit-base-patch32.")
    kwargs = dict(revision=config.model_revision, trust_remote_code=config.trust_remote_code)
    family = family_for(config.model_name_or_path, revision=config.model_revision)
    return family.load(config.model_name_or_path, TORCH_DTYPES[tower_dtype(config, device)], **kwargs)


load_clip = load_model  # the name callers used when CLIP was the only family


def model_fingerprint(config: ModelConfig, model) -> str:
    """Identifies the weights without hashing them: checkpoint id, revision, commit and config (which names the
    model_type), dtype."""
    base = clip_of(model)
    identity = {
        "model": config.model_name_or_path,
        "revision": config.model_revision,
        "commit": getattr(base.config, "_commit_hash", None),
        "config": base.config.to_json_string(use_diff=False),
        "dtype": str(family_of(base).tower_dtype(base)).removeprefix("torch."),
    }
    local = Path(config.model_name_or_path)
    if local.is_dir():  # a local checkpoint has no commit hash: its weight files' sizes and times stand in
        identity["files"] = sorted(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in local.glob("*.safetensors")
        )
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def attach_adapters(model, config: AdapterConfig) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters on the modules its family names for ``config.adapter_preset``;
    B = 0, so it starts at zero-shot."""
    family = family_of(model)
    rank = config.lora_rank or family.default_lora_rank(model.config)
    lora = LoraConfig(
        r=rank,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else rank,
        lora_dropout=config.lora_dropout,
        target_modules=family.adapter_targets(config.preset_traits.wraps_encoders),
        bias="none",
    )
    return get_peft_model(model, lora)


def load_adapters(model, adapter_path: str) -> PeftModel:
    """Adapters saved with save_pretrained, from a folder or a Hub repo; safetensors only (no pickle)."""
    local = Path(adapter_path)
    if local.is_dir():
        has_safetensors = (local / SAFETENSORS_ADAPTER).exists()
    else:
        has_safetensors = file_exists(adapter_path, SAFETENSORS_ADAPTER)
    if not has_safetensors:
        raise ValueError(
            f"{adapter_path} has no {SAFETENSORS_ADAPTER}; hf_clipsel loads weights from safetensors only. Save the "
            "adapters with save_pretrained (safetensors is its default)."
        )
    peft_model = PeftModel.from_pretrained(model, adapter_path, is_trainable=False)
    peft_model.eval()
    return peft_model


def clip_of(model):
    """The transformers model inside a PeftModel (its LoRA layers stay active), or the model itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def uses_encoder_adapters(model) -> bool:
    """Whether ``model`` carries adapters that change the vision tower's outputs (and so the embedding cache)."""
    config = getattr(model, "peft_config", {}).get("default")
    return config is not None and family_of(clip_of(model)).wraps_encoders(config.target_modules)


def vision_tower_outputs(model, inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The cached per-image vectors (the family's cache boundary), float32 [B, cached_size]. ``inputs``: the image
    processor's output, or its ``pixel_values`` alone."""
    base = clip_of(model)
    inputs = dict(inputs) if isinstance(inputs, Mapping) else {"pixel_values": inputs}
    return family_of(base).vision_tower_outputs(base, inputs)


def text_tower_outputs(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Pooled text-tower outputs before what the projection preset wraps, float32 [P, hidden]; the prompts are
    tokenised as the family says."""
    base = clip_of(model)
    family = family_of(base)
    return family.text_tower_outputs(base, family.tokenize(tokenizer, prompts, base.config))


def image_features(model, vision_pooled: torch.Tensor) -> torch.Tensor:
    """Image features f_i (what ``get_image_features`` returns, through the adapters), float32 [N, d], not
    normalised, from the cached vectors."""
    base = clip_of(model)
    return family_of(base).image_features(base, vision_pooled)


def class_text_features(model, text_pooled: torch.Tensor) -> torch.Tensor:
    """Class features g_c from pooled prompt outputs [T, C, hidden]: mean over templates of the normalised text
    features, float32 [C, d] (normalised again, so cosines need no further care)."""
    base = clip_of(model)
    templates, classes, hidden = text_pooled.shape
    projected = family_of(base).text_features(base, text_pooled.reshape(-1, hidden))
    projected = F.normalize(projected, dim=-1).reshape(templates, classes, -1).mean(dim=0)
    return F.normalize(projected, dim=-1)


def logit_scale(model) -> float:
    """``exp(logit_scale)``: logits are this times the cosine, plus :func:`logit_bias`."""
    base = clip_of(model)
    return family_of(base).logit_scale(base)


def logit_bias(model) -> float:
    """The family's logit bias (SigLIP's learned one; 0 for CLIP)."""
    base = clip_of(model)
    return family_of(base).logit_bias(base)


def cached_size(model) -> int:
    """Length of the per-image vector the embed stage caches (the family's cache boundary)."""
    base = clip_of(model)
    return family_of(base).cached_size(base.config)


def normalises_on_device(model) -> bool:
    """Whether the family's image processor output may be finished (rescaled, normalised) on the tower's device
    after uint8 crops crossed over (hf_clipsel.preprocessing)."""
    return family_of(clip_of(model)).device_normalisation


def posterior_link(model) -> str:
    """How the family turns logits into the class posterior: ``softmax`` or ``sigmoid`` (scoring.class_posterior)."""
    return family_of(clip_of(model)).posterior
