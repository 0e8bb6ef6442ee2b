"""A proxy CLIP for machines without the Hub: a small CLIPModel trained contrastively on CIFAR-10 test rows.

No pretrained CLIP can be downloaded offline, so the quality benchmark (bench_quality.py) builds its own: a ViT image
tower sized for 32x32 images on a CPU, a small text tower with hf_clipsel.tiny's character-level tokenizer, trained
with the cross-entropy of each image against the C class prompts ("a photo of a {class}."), logits = logit_scale x
cosine, which is the objective hf_clipsel's adapters use. Light augmentation: 4-pixel zero-padded random crop and
horizontal flip. The result is saved with save_pretrained (model + CLIPProcessor), so the pipeline loads it through
its normal path (`model_name_or_path`), and its zero-shot accuracy is measured through that same path.

Other families (``family``, :data:`FAMILIES`), same data, size, schedule and augmentation: ``siglip``, a SiglipModel
(MAP head, no projections; a Gemma-style character tokenizer returning ``input_ids`` only, prompts padded to
``max_position_embeddings``; SiglipImageProcessor, mean and std 0.5) trained with SigLIP's pairwise sigmoid loss:
every (image, class prompt) pair an independent binary decision on ``exp(logit_scale) * cosine + logit_bias``, both
learned, initialised as the paper (scale 10, bias -10), summed over the prompts, averaged over the images;
``siglip2``, the NaFlex SigLIP 2: a Siglip2Model of the siglip proxy's size, tokenizer and loss, whose image tower
reads patch sequences (Siglip2ImageProcessor, patch 8 and at most 16 patches, so a 32x32 image is the siglip proxy's
4x4 tokens); the training batches are patchified in torch as that processor does (:func:`naflex_patches`); and
``metaclip2``, a MetaClip2Model (CLIP's architecture, XLM-R tokenizer) trained as the CLIP proxy.

The proxy trains on rows the downstream evaluation never sees (bench_quality: test rows 0..7999; evaluation on
8000..9999). It is a weak CLIP: its zero-shot accuracy is reported next to every result that depends on it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    MetaClip2Config,
    MetaClip2Model,
    Siglip2Config,
    Siglip2ImageProcessor,
    Siglip2Model,
    Siglip2Processor,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipProcessor,
)

from hf_clipsel.configs import ModelConfig
from hf_clipsel.embedding import embed_class_prompts
from hf_clipsel.metrics import load_accuracy_metric
from hf_clipsel.modeling import class_text_features, image_features, load_clip, vision_tower_outputs
from hf_clipsel.tiny import BOS, EOS, gemma_tokenizer, tiny_tokenizer, xlm_roberta_tokenizer

TEMPLATE = "a photo of a {}."
# Views of an image the proxy can be pre-trained on. "greyscale" (PIL's luminance, copied to the three channels)
# gives a proxy whose zero-shot alignment is weak on ordinary colour pools: the domain-shift case of bench_quality.
VIEWS = ("colour", "greyscale")


def in_view(image, view: str = "colour"):
    """``image`` (PIL) as RGB in ``view``."""
    if view == "greyscale":
        return image.convert("L").convert("RGB")
    if view != "colour":
        raise ValueError(f"unknown view {view!r}; choose one of {VIEWS}.")
    return image.convert("RGB")


@dataclass
class ProxySpec:
    """Size and training of the proxy. Defaults: 2.3M parameters (1.8M in the image tower), ~0.5 s per training
    batch of 128 on one CPU thread; 12 epochs over 8,000 images took 6.6 minutes here."""

    vision_hidden: int = 192
    vision_layers: int = 4
    vision_heads: int = 3
    patch_size: int = 8  # 4x4 tokens at 32x32; patch 4 (8x8 tokens) costs ~4x more per step on a CPU
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 2
    projection_dim: int = 128
    image_size: int = 32
    epochs: int = 12
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    seed: int = 0


def decode_uint8(dataset, image_column: str = "img", view: str = "colour") -> torch.Tensor:
    """Every image of ``dataset`` as one uint8 tensor [N, 3, H, W] (RGB in ``view``; all images must share one
    size)."""
    images = [np.asarray(in_view(image, view)) for image in dataset[image_column]]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation on a uint8 batch [B, 3, H, W]: zero-padded random crop, random horizontal flip.
    Returns float pixels in [0, 255]."""
    batch, _, height, width = images.shape
    padded = F.pad(images.float(), (padding,) * 4)
    top = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    rows = (top[:, None] + torch.arange(height))[:, None, :, None]
    cols = (left[:, None] + torch.arange(width))[:, None, None, :]
    cropped = padded[torch.arange(batch)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    flip = torch.rand(batch, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(-1), cropped)


def text_tower(spec: ProxySpec, tokenizer, max_positions: int, **extra) -> dict:
    """The text tower's config of every family's proxy (``extra``: special tokens, SigLIP's head width)."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=4 * spec.text_hidden,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=max_positions,
        **extra,
    )


def vision_tower(spec: ProxySpec) -> dict:
    """The image tower's config of every family's proxy."""
    return dict(
        hidden_size=spec.vision_hidden,
        intermediate_size=4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )


def special_tokens(tokenizer) -> dict:
    return dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )


def build_config(spec: ProxySpec, tokenizer) -> CLIPConfig:
    special = dict(
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(EOS),
    )
    return CLIPConfig(
        text_config=text_tower(spec, tokenizer, 77, **special),
        vision_config=vision_tower(spec),
        projection_dim=spec.projection_dim,
    )


def siglip_text_tower(spec: ProxySpec, tokenizer) -> dict:
    return text_tower(
        spec,
        tokenizer,
        SIGLIP_TEXT_LENGTH,
        projection_size=spec.vision_hidden,  # text_model.head maps onto the image embedding's width
        **special_tokens(tokenizer),
    )


def build_siglip_config(spec: ProxySpec, tokenizer) -> SiglipConfig:
    return SiglipConfig(text_config=siglip_text_tower(spec, tokenizer), vision_config=vision_tower(spec))


def naflex_patch_budget(spec: ProxySpec) -> int:
    """NaFlex's ``max_num_patches``: the fixed-size towers' token count at ``image_size``, so a square image is cut
    into the same grid."""
    return (spec.image_size // spec.patch_size) ** 2


def build_siglip2_config(spec: ProxySpec, tokenizer) -> Siglip2Config:
    vision = {key: value for key, value in vision_tower(spec).items() if key != "image_size"}  # NaFlex: no fixed size
    return Siglip2Config(
        text_config=siglip_text_tower(spec, tokenizer),
        vision_config=dict(vision, num_patches=naflex_patch_budget(spec)),
    )


def build_metaclip2_config(spec: ProxySpec, tokenizer) -> MetaClip2Config:
    return MetaClip2Config(
        text_config=text_tower(spec, tokenizer, 77, **special_tokens(tokenizer)),
        vision_config=vision_tower(spec),
        projection_dim=spec.projection_dim,
    )


# SigLIP prompts are padded to this length (the family pads to text_config.max_position_embeddings, as SigLIP trains).
SIGLIP_TEXT_LENGTH = 64


def image_batch(pixels: torch.Tensor, spec: ProxySpec) -> dict:
    """The image tower's inputs of the fixed-resolution families: the normalised batch itself."""
    return {"pixel_values": pixels}


def naflex_patches(pixels: torch.Tensor, spec: ProxySpec) -> dict:
    """A normalised batch [B, 3, H, W] as Siglip2ImageProcessor returns it (tests/test_proxy_families.py checks
    the equality): pixel_values [B, (H/p)(W/p), p*p*3], each patch's pixels row by row with the channels last;
    every patch real (``pixel_attention_mask`` all ones); ``spatial_shapes`` the (H/p, W/p) grid. ``H`` and ``W``
    are multiples of the patch size whose grid is the whole budget, as for the proxy's 32x32 crops, so the
    processor's resize and padding have nothing to do."""
    batch, channels, height, width = pixels.shape
    size = spec.patch_size
    rows, cols = height // size, width // size
    if rows * size != height or cols * size != width or rows * cols != naflex_patch_budget(spec):
        raise ValueError(
            f"a {height}x{width} batch is not a whole {size}-pixel grid of {naflex_patch_budget(spec)} patches."
        )
    patches = pixels.reshape(batch, channels, rows, size, cols, size).permute(0, 2, 4, 3, 5, 1)
    return {
        "pixel_values": patches.reshape(batch, rows * cols, size * size * channels),
        "pixel_attention_mask": torch.ones(batch, rows * cols, dtype=torch.int32),
        "spatial_shapes": torch.tensor([[rows, cols]] * batch),
    }


def clip_embeds(model, vision_inputs, text_inputs):
    image_embeds = F.normalize(model.visual_projection(model.vision_model(**vision_inputs).pooler_output))
    text_embeds = F.normalize(model.text_projection(model.text_model(**text_inputs).pooler_output))
    return image_embeds, text_embeds


def clip_logits(model, image_embeds, text_embeds):
    return model.logit_scale.exp().clamp(max=100) * image_embeds @ text_embeds.T


def siglip_embeds(model, vision_inputs, text_inputs):
    image_embeds = F.normalize(model.vision_model(**vision_inputs).pooler_output)  # after the MAP head
    text_embeds = F.normalize(model.text_model(**text_inputs).pooler_output)  # text_model.head on the last token
    return image_embeds, text_embeds


def siglip_logits(model, image_embeds, text_embeds):
    return model.logit_scale.exp() * image_embeds @ text_embeds.T + model.logit_bias


def sigmoid_loss(logits, labels):
    """SigLIP's loss: -log sigmoid(z * logit) for every (image, prompt) pair, z = 1 for the image's own class and -1
    otherwise, summed over the prompts, averaged over the images."""
    targets = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(labels)


def init_siglip(model):
    # The paper's initialisation (transformers' is scale 1, bias 0): with one positive among the classes the bias
    # starts the pairs near their negative majority.
    model.logit_scale.data.fill_(math.log(10.0))
    model.logit_bias.data.fill_(-10.0)


@dataclass(frozen=True)
class ProxyFamily:
    """What differs between the proxies of the families: model, config, tokenizer and image processor (from the
    ProxySpec), processor, prompt padding, the embeddings the loss sees, the logits, the loss, the initialisation,
    and the image tower's inputs made from a normalised batch (``vision_inputs(pixels, spec)``)."""

    model_class: type
    build_config: object
    tokenizer: object
    image_processor: object
    processor_class: type
    padding: dict
    embeds: object
    logits: object
    loss: object
    init: object = None
    vision_inputs: object = image_batch


def clip_like(model_class: type, build_config, tokenizer) -> ProxyFamily:
    """CLIP's recipe (projections, softmax contrastive loss, a shortest-edge image processor) for a model of CLIP's
    shape: CLIP itself and MetaCLIP 2."""
    return ProxyFamily(
        model_class,
        build_config,
        tokenizer,
        lambda spec: CLIPImageProcessor(
            size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size}
        ),
        CLIPProcessor,
        dict(padding=True),
        clip_embeds,
        clip_logits,
        F.cross_entropy,
    )


FAMILIES = {
    "clip": clip_like(CLIPModel, build_config, tiny_tokenizer),
    "siglip": ProxyFamily(
        SiglipModel,
        build_siglip_config,
        lambda: gemma_tokenizer(input_ids_only=True),
        lambda spec: SiglipImageProcessor(size={"height": spec.image_size, "width": spec.image_size}),
        SiglipProcessor,
        dict(padding="max_length", max_length=SIGLIP_TEXT_LENGTH),
        siglip_embeds,
        siglip_logits,
        sigmoid_loss,
        init_siglip,
    ),
    "siglip2": ProxyFamily(
        Siglip2Model,
        build_siglip2_config,
        lambda: gemma_tokenizer(input_ids_only=True),
        lambda spec: Siglip2ImageProcessor(patch_size=spec.patch_size, max_num_patches=naflex_patch_budget(spec)),
        Siglip2Processor,
        dict(padding="max_length", max_length=SIGLIP_TEXT_LENGTH),
        siglip_embeds,
        siglip_logits,
        sigmoid_loss,
        init_siglip,
        naflex_patches,
    ),
    "metaclip2": clip_like(MetaClip2Model, build_metaclip2_config, xlm_roberta_tokenizer),
}


def train_proxy(
    output_dir: str | Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str],
    spec: ProxySpec,
    state_path: str | Path | None = None,
    family: str = "clip",
) -> dict:
    """Train the proxy of ``family`` (a key of :data:`FAMILIES`) on ``images`` (uint8 [N, 3, 32, 32]) and ``labels``;
    save model + processor to ``output_dir``.

    AdamW, linear warm-up then cosine decay, per step. With ``state_path`` the training state is saved after every
    epoch and a rerun resumes from it. Returns the training history (loss and accuracy per epoch on the training
    rows, seconds).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown proxy family {family!r}; choose one of {', '.join(FAMILIES)}.")
    kind = FAMILIES[family]
    output_dir, started = Path(output_dir), time.perf_counter()
    tokenizer = kind.tokenizer()
    processor = kind.processor_class(image_processor=kind.image_processor(spec), tokenizer=tokenizer)
    mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    torch.manual_seed(spec.seed)
    model = kind.model_class(kind.build_config(spec, tokenizer))
    if kind.init is not None:
        kind.init(model)
    text_inputs = tokenizer([TEMPLATE.format(name) for name in class_names], return_tensors="pt", **kind.padding)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.learning_rate,
    )
    steps_per_epoch = len(labels) // spec.batch_size
    total, warmup = spec.epochs * steps_per_epoch, max(1, int(spec.warmup_epochs * steps_per_epoch))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(spec.seed)
    history, start_epoch = [], 0
    if state_path and Path(state_path).exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        history, start_epoch = state["history"], state["epoch"] + 1
        print(f"proxy: resumed after epoch {start_epoch}", flush=True)
    for epoch in range(start_epoch, spec.epochs):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        loss_sum, correct, seen, epoch_start = 0.0, 0, 0, time.perf_counter()
        for step in range(steps_per_epoch):
            batch = order[step * spec.batch_size : (step + 1) * spec.batch_size]
            pixels = (random_crop_flip(images[batch], generator) / 255.0 - mean) / std
            image_embeds, text_embeds = kind.embeds(model, kind.vision_inputs(pixels, spec), text_inputs)
            logits = kind.logits(model, image_embeds, text_embeds)
            loss = kind.loss(logits, labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(batch)
            correct += (logits.argmax(-1) == labels[batch]).sum().item()
            seen += len(batch)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": round(loss_sum / seen, 4),
                "train_accuracy": round(correct / seen, 4),
                "seconds": round(time.perf_counter() - epoch_start, 1),
            }
        )
        print(f"proxy epoch {epoch + 1}/{spec.epochs}: {history[-1]}", flush=True)
        if state_path:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(),
                "history": history,
                "epoch": epoch,
            }
            torch.save(state, str(state_path) + ".tmp")
            Path(str(state_path) + ".tmp").replace(state_path)
    model.eval()
    # Written beside its place and renamed in: a folder with model.safetensors is a finished proxy.
    partial = output_dir.with_name(output_dir.name + ".partial")
    model.save_pretrained(partial)
    processor.save_pretrained(partial)
    (partial / "proxy_training.json").write_text(
        json.dumps(
            {"family": family, "spec": asdict(spec), "history": history, "num_train_rows": len(labels)}, indent=2
        )
    )
    if output_dir.exists():
        raise FileExistsError(f"{output_dir} appeared while the proxy trained; remove it and rerun.")
    partial.rename(output_dir)
    return {"history": history, "train_seconds": round(time.perf_counter() - started, 1)}


def zero_shot_accuracy(
    model_path: str | Path, dataset, class_names: list[str], image_column: str = "img", view: str = "colour"
) -> float:
    """Top-1 zero-shot accuracy of the checkpoint at ``model_path`` on ``dataset`` in ``view``, through hf_clipsel's
    own loading (load_clip: from_pretrained + AutoProcessor), prompt embedding, and accuracy metric module."""
    model, processor = load_clip(ModelConfig(model_name_or_path=str(model_path)))
    with torch.no_grad():
        text_pooled = embed_class_prompts(model, processor.tokenizer, [[TEMPLATE.format(c) for c in class_names]])
        class_features = class_text_features(model, text_pooled)
        logits = []
        for start in range(0, len(dataset), 256):
            rows = dataset[start : start + 256]
            # the whole output: NaFlex's patch sequences come with their mask and grid shapes
            inputs = processor.image_processor(
                images=[in_view(image, view) for image in rows[image_column]], return_tensors="pt"
            )
            features = F.normalize(image_features(model, vision_tower_outputs(model, inputs)), dim=-1)
            logits.append(features @ class_features.T)
    metric = load_accuracy_metric(keep_in_memory=True)
    result = metric.compute(predictions=torch.cat(logits).numpy(), references=np.asarray(dataset["label"]), top_k=[1])
    return float(result["top1"])
