"""Load the frozen CLIP, attach or load PEFT adapters, and turn cached tower outputs into features.

Features are always computed in two steps, tower then projection, so that the projection preset can run on
cached tower outputs and give the same numbers as a full forward through the PEFT model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import file_exists
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoProcessor, CLIPModel

from .configs import AdapterConfig, ModelConfig

logger = logging.getLogger(__name__)

PROJECTIONS = ["visual_projection", "text_projection"]
ENCODER_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
PRESET_TARGETS = {"projection": PROJECTIONS, "encoder_lora": ENCODER_ATTENTION + PROJECTIONS}
SAFETENSORS_ADAPTER = "adapter_model.safetensors"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def tower_dtype(config: ModelConfig, device: torch.device | str | None = None) -> str:
    """The image tower's dtype: the configured one, or for ``auto`` bfloat16 on a GPU and float32 elsewhere (the
    rank check of recipes/benchmarks/bench_embedding.py holds for bfloat16: Spearman 0.9993 SAS, 0.9999 SDS)."""
    if config.dtype != "auto":
        return config.dtype
    return "bfloat16" if torch.device(device or "cpu").type == "cuda" else "float32"


def load_clip(config: ModelConfig, device: torch.device | str | None = None) -> tuple[CLIPModel, AutoProcessor]:
    """The CLIP checkpoint, frozen and in eval mode, with its processor, for ``device`` (which decides ``auto``
    dtypes; the caller moves the model there). Weights come from safetensors only."""
    if not config.model_name_or_path:
        raise ValueError("model_name_or_path is not set; pass e.g. --model_name_or_path openai/clip-vit-base-patch32.")
    kwargs = dict(revision=config.model_revision, trust_remote_code=config.trust_remote_code)
    dtype = TORCH_DTYPES[tower_dtype(config, device)]
    model = CLIPModel.from_pretrained(config.model_name_or_path, dtype=dtype, use_safetensors=True, **kwargs)
    processor = AutoProcessor.from_pretrained(config.model_name_or_path, **kwargs)
    model.requires_grad_(False)
    model.eval()
    # The projections are tiny and are what the paper-faithful adapters act on: keep them (and so the
    # features and the adapters' training) in float32 even when the image tower runs in bfloat16. The text
    # tower runs once per class prompt, so float32 costs nothing there, and it keeps every row's alignment
    # measured against the same exact class features (bfloat16 prompts moved the SAS ranking measurably:
    # recipes/benchmarks/README.md, "Embedding").
    model.visual_projection.float()
    model.text_projection.float()
    model.text_model.float()
    return model, processor


def model_fingerprint(config: ModelConfig, model: CLIPModel) -> str:
    """Identifies the weights without hashing them: checkpoint id, revision, commit and config, dtype."""
    identity = {
        "model": config.model_name_or_path,
        "revision": config.model_revision,
        "commit": getattr(model.config, "_commit_hash", None),
        "config": model.config.to_json_string(use_diff=False),
        "dtype": str(clip_of(model).vision_model.embeddings.patch_embedding.weight.dtype).removeprefix("torch."),
    }
    local = Path(config.model_name_or_path)
    if local.is_dir():  # a local checkpoint has no commit hash: its weight files' sizes and times stand in
        identity["files"] = sorted(
            (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in local.glob("*.safetensors")
        )
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def attach_adapters(model: CLIPModel, config: AdapterConfig) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters for ``config.adapter_preset``; B = 0, so it starts at zero-shot."""
    rank = config.lora_rank or model.config.projection_dim
    lora = LoraConfig(
        r=rank,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else rank,
        lora_dropout=config.lora_dropout,
        target_modules=PRESET_TARGETS[config.adapter_preset],
        bias="none",
    )
    return get_peft_model(model, lora)


def load_adapters(model: CLIPModel, adapter_path: str) -> PeftModel:
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


def clip_of(model: CLIPModel | PeftModel) -> CLIPModel:
    """The CLIPModel inside a PeftModel (its LoRA layers stay active), or the model itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def vision_tower_outputs(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Pooled vision-tower outputs (before the projection), float32 [B, hidden]."""
    clip = clip_of(model)
    dtype = clip.vision_model.embeddings.patch_embedding.weight.dtype
    pixel_values = pixel_values.to(device=clip.device, dtype=dtype)
    return clip.vision_model(pixel_values=pixel_values).pooler_output.float()


def text_tower_outputs(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Pooled text-tower outputs (before the projection), float32 [P, hidden]."""
    clip = clip_of(model)
    inputs = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(clip.device)
    return clip.text_model(**inputs).pooler_output.float()


def image_features(model, vision_pooled: torch.Tensor) -> torch.Tensor:
    """Projected image features f_i = A_I(E_I(x_i)), float32 [N, d], not normalised."""
    clip = clip_of(model)
    return clip.visual_projection(vision_pooled.to(device=clip.device, dtype=torch.float32))


def class_text_features(model, text_pooled: torch.Tensor) -> torch.Tensor:
    """Class features g_c from pooled prompt outputs [T, C, hidden]: mean over templates of the normalised
    projections, float32 [C, d] (normalised again, so cosines need no further care)."""
    clip = clip_of(model)
    templates, classes, hidden = text_pooled.shape
    projected = clip.text_projection(text_pooled.reshape(-1, hidden).to(device=clip.device, dtype=torch.float32))
    projected = F.normalize(projected, dim=-1).reshape(templates, classes, -1).mean(dim=0)
    return F.normalize(projected, dim=-1)


def logit_scale(model) -> float:
    return float(clip_of(model).logit_scale.exp())
