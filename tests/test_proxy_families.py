"""The quality benchmark's proxy of the NaFlex family (recipes/benchmarks/proxy_clip.py, ``siglip2``): its training
batches are patchified in torch, so they must equal what Siglip2ImageProcessor gives the pipeline for the same
images, or the proxy would be trained on inputs it never sees when it selects."""

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F
from datasets import load_dataset

from hf_clipsel.configs import ModelConfig
from hf_clipsel.modeling import image_features, load_clip, vision_tower_outputs
from hf_clipsel.models import family_of
from tests.conftest import CIFAR10, REPO

_spec = importlib.util.spec_from_file_location("proxy_clip", REPO / "recipes" / "benchmarks" / "proxy_clip.py")
proxy_clip = sys.modules["proxy_clip"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(proxy_clip)

# A proxy small enough to train for one epoch in seconds; the benchmark's patch size and image size.
SPEC = proxy_clip.ProxySpec(
    vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=1, text_heads=2, epochs=1,
    batch_size=16,
)  # fmt: skip
NAFLEX = proxy_clip.FAMILIES["siglip2"]


@pytest.fixture(scope="module")
def rows():
    return load_dataset("parquet", data_dir=str(CIFAR10), split="test").select(range(32))


def normalised(images: torch.Tensor, image_processor) -> torch.Tensor:
    """uint8 [B, 3, H, W] normalised as train_proxy does."""
    mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def test_naflex_patches_equal_the_image_processor(rows):
    image_processor = NAFLEX.image_processor(SPEC)
    expected = image_processor(images=[image.convert("RGB") for image in rows["img"]], return_tensors="pt")
    got = NAFLEX.vision_inputs(normalised(proxy_clip.decode_uint8(rows), image_processor), SPEC)
    assert set(got) == set(expected) == {"pixel_values", "pixel_attention_mask", "spatial_shapes"}
    assert expected["pixel_values"].shape == (len(rows), 16, 8 * 8 * 3)  # 32x32 at patch 8: the siglip proxy's 4x4
    torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], rtol=0, atol=1e-6)
    assert torch.equal(got["pixel_attention_mask"], expected["pixel_attention_mask"])
    assert torch.equal(got["spatial_shapes"], expected["spatial_shapes"])


def test_naflex_patches_refuse_a_batch_off_the_patch_grid():
    with pytest.raises(ValueError, match="not a whole 8-pixel grid of 16 patches"):
        NAFLEX.vision_inputs(torch.zeros(2, 3, 28, 32), SPEC)


def test_the_naflex_proxy_loads_as_siglip2_and_sees_in_training_what_the_pipeline_gives_it(rows, tmp_path):
    images, labels = proxy_clip.decode_uint8(rows), torch.tensor(rows["label"])
    class_names = rows.features["label"].names
    proxy_clip.train_proxy(tmp_path / "proxy", images, labels, class_names, SPEC, family="siglip2")
    model, processor = load_clip(ModelConfig(model_name_or_path=str(tmp_path / "proxy")))
    assert type(family_of(model)).__name__ == "Siglip2Family" and model.config.model_type == "siglip2"
    with torch.no_grad():
        pipeline = image_features(
            model,
            vision_tower_outputs(model, processor.image_processor(images=list(rows["img"]), return_tensors="pt")),
        )
        text_inputs = processor.tokenizer(["a photo of a cat."], return_tensors="pt", **NAFLEX.padding)
        trained, _ = NAFLEX.embeds(
            model, NAFLEX.vision_inputs(normalised(images, processor.image_processor), SPEC), text_inputs
        )
    torch.testing.assert_close(F.normalize(pipeline), trained, rtol=0, atol=1e-5)
    top1 = proxy_clip.zero_shot_accuracy(tmp_path / "proxy", rows, class_names)
    assert 0.0 <= top1 <= 1.0
