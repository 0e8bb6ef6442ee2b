"""Module 1: PEFT adapters over CLIPModel, trained on the embedding cache."""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hf_clipsel.configs import AdapterConfig, ModelConfig
from hf_clipsel.data import class_prompts
from hf_clipsel.embedding import embed_class_prompts
from hf_clipsel.modeling import (
    attach_adapters,
    class_text_features,
    image_features,
    load_adapters,
    load_clip,
    vision_tower_outputs,
)
from hf_clipsel.scoring import semantic_alignment
from hf_clipsel.training import train_on_cache

CLASSES = ["cat", "dog", "ship"]


def _images(count, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]


def _trained(tiny_clip_path, preset="projection", epochs=3):
    model, processor = load_clip(ModelConfig(model_name_or_path=str(tiny_clip_path)))
    config = AdapterConfig(
        adapter_preset=preset,
        adapter_epochs=epochs,
        adapter_learning_rate=1e-2,
        adapter_batch_size=16,
        prompt_templates=["a photo of a {}.", "a {}."],
    )
    peft_model = attach_adapters(model, config)
    pixel_values = processor.image_processor(images=_images(48), return_tensors="pt").pixel_values
    labels = torch.arange(48) % len(CLASSES)
    with torch.no_grad():
        pooled = vision_tower_outputs(peft_model, pixel_values)
    text_pooled = embed_class_prompts(peft_model, processor.tokenizer, class_prompts(CLASSES, config.prompt_templates))
    history = train_on_cache(peft_model, pooled, labels, text_pooled, config, show_progress=False)
    return peft_model, processor, pixel_values, labels, text_pooled, history


def test_adapters_start_at_zero_shot_clip(tiny_clip_path):
    model, processor = load_clip(ModelConfig(model_name_or_path=str(tiny_clip_path)))
    pixel_values = processor.image_processor(images=_images(4), return_tensors="pt").pixel_values
    with torch.no_grad():
        before = model.get_image_features(pixel_values=pixel_values).pooler_output
        peft_model = attach_adapters(model, AdapterConfig())
        after = image_features(peft_model, vision_tower_outputs(peft_model, pixel_values))
    torch.testing.assert_close(after, before)
    # rank 0 means full rank: the projection dimension
    assert peft_model.peft_config["default"].r == model.config.projection_dim


def test_training_on_the_cache_lowers_the_loss(tiny_clip_path):
    *_, history = _trained(tiny_clip_path, epochs=5)
    assert history[-1] < history[0]


def test_cache_scores_equal_a_full_forward_through_the_peft_model(tiny_clip_path):
    peft_model, processor, pixel_values, labels, text_pooled, _ = _trained(tiny_clip_path)
    with torch.no_grad():
        cached = image_features(peft_model, vision_tower_outputs(peft_model, pixel_values))
        full = peft_model.get_image_features(pixel_values=pixel_values).pooler_output
        class_features = class_text_features(peft_model, text_pooled)
        prompts = class_prompts(CLASSES, ["a photo of a {}.", "a {}."])
        full_text = []
        for per_template in prompts:
            inputs = processor.tokenizer(per_template, padding=True, return_tensors="pt")
            full_text.append(F.normalize(peft_model.get_text_features(**inputs).pooler_output, dim=-1))
        full_class_features = F.normalize(torch.stack(full_text).mean(0), dim=-1)
    # the adapters really changed the features, and the cache path agrees with the full forward
    assert not torch.allclose(
        full,
        peft_model.get_base_model().visual_projection.base_layer(
            peft_model.get_base_model().vision_model(pixel_values=pixel_values).pooler_output
        ),
    )
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(class_features, full_class_features, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        semantic_alignment(cached, class_features, labels),
        semantic_alignment(full, full_class_features, labels),
        rtol=1e-5,
        atol=1e-6,
    )


def test_save_pretrained_from_pretrained_round_trip(tiny_clip_path, tmp_path):
    peft_model, _, pixel_values, *_ = _trained(tiny_clip_path)
    peft_model.save_pretrained(tmp_path / "adapter")
    fresh, _ = load_clip(ModelConfig(model_name_or_path=str(tiny_clip_path)))
    loaded = load_adapters(fresh, str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(
            image_features(loaded, vision_tower_outputs(loaded, pixel_values)),
            image_features(peft_model, vision_tower_outputs(peft_model, pixel_values)),
        )


def test_encoder_preset_targets_attention_and_projections(tiny_clip_path):
    model, _ = load_clip(ModelConfig(model_name_or_path=str(tiny_clip_path)))
    peft_model = attach_adapters(model, AdapterConfig(adapter_preset="encoder_lora", lora_rank=4))
    names = {
        name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in peft_model.named_parameters() if ".lora_A" in name
    }
    assert names == {"q_proj", "k_proj", "v_proj", "out_proj", "visual_projection", "text_projection"}
