"""A tiny CLIP saved like a real checkpoint, randomly initialised or briefly trained on labelled images, and a tiny
random model of every other family (:func:`build_tiny_model`), built offline: configs from dicts, tokenizers from
in-memory vocabularies.

The tests use the random ones, so that the real `from_pretrained` / `AutoProcessor` loading path runs without the Hub
(their scores carry no meaning). `hf-clipsel demo` trains one for seconds on images it then never
selects from (:func:`train_tiny_clip`), so that the demonstration's scores mean something.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    GemmaTokenizer,
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
    XLMRobertaTokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789.,'-"


def tiny_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP tokenizer: every byte and its end-of-word form, no merges."""
    vocab = {}
    for char in bytes_to_unicode().values():
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def build_tiny_clip(
    output_dir: str | Path,
    image_size: int = 32,
    hidden_size: int = 32,
    projection_dim: int = 16,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Write a tiny CLIPModel and its CLIPProcessor to ``output_dir`` and return the path."""
    output_dir = Path(output_dir)
    tokenizer = tiny_tokenizer()
    special = dict(
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(EOS),
    )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=2,
            max_position_embeddings=77,
            **special,
        ),
        vision_config=dict(
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=max(image_size // 4, 1),
        ),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    model.save_pretrained(output_dir)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(output_dir)
    return output_dir


def train_tiny_clip(
    output_dir: str | Path,
    images: list,
    labels: list[int],
    class_names: list[str],
    template: str = "a photo of a {}.",
    epochs: int = 20,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    seed: int = 0,
    **size,
) -> Path:
    """A tiny CLIP (:func:`build_tiny_clip`, ``size`` passed on) trained on ``images`` (PIL, RGB) and ``labels`` with
    the cross-entropy of each image against every class prompt, saved to ``output_dir`` with its processor.

    Stands in for a pretrained CLIP where none can be downloaded: a few seconds on a CPU for a thousand 32x32 images.
    """
    output_dir = build_tiny_clip(output_dir, seed=seed, **size)
    model = CLIPModel.from_pretrained(output_dir)
    processor = CLIPProcessor.from_pretrained(output_dir)
    pixels = processor.image_processor(images=images, return_tensors="pt").pixel_values
    targets = torch.as_tensor(labels)
    prompts = processor.tokenizer([template.format(name) for name in class_names], padding=True, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(targets), generator=generator).split(batch_size):
            image_embeds = F.normalize(model.get_image_features(pixel_values=pixels[batch]).pooler_output, dim=-1)
            text_embeds = F.normalize(model.get_text_features(**prompts).pooler_output, dim=-1)
            logits = model.logit_scale.exp().clamp(max=100) * image_embeds @ text_embeds.T
            loss = F.cross_entropy(logits, targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    model.save_pretrained(output_dir)
    return output_dir


def _towers(hidden_size: int, num_layers: int, **extra) -> dict:
    return dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        **extra,
    )


def gemma_tokenizer(input_ids_only: bool = False) -> GemmaTokenizer:
    """A character-level Gemma-style tokenizer (SigLIP 2's kind), padding on the right as SigLIP's do.
    ``input_ids_only``: it returns no attention mask, like the SigLIP checkpoints' tokenizers."""
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\u2581"])}
    vocab.update({char: len(vocab) + i for i, char in enumerate(CHARACTERS)})
    names = dict(model_input_names=["input_ids"]) if input_ids_only else {}
    return GemmaTokenizer(vocab=vocab, merges=[], padding_side="right", **names)


def xlm_roberta_tokenizer() -> XLMRobertaTokenizer:
    """A character-level XLM-R tokenizer (MetaCLIP 2's kind)."""
    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    return XLMRobertaTokenizer(vocab=pieces + [(char, -1.0) for char in CHARACTERS])


def build_tiny_metaclip2(output_dir, image_size=32, hidden_size=32, num_layers=2, seed=0) -> Path:
    """A tiny MetaClip2Model with an XLM-R tokenizer and a CLIPProcessor (as the MetaCLIP 2 checkpoints)."""
    tokenizer = xlm_roberta_tokenizer()
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = MetaClip2Config(
        text_config=_towers(hidden_size, num_layers, vocab_size=len(tokenizer), max_position_embeddings=77, **special),
        vision_config=_towers(hidden_size, num_layers, image_size=image_size, patch_size=max(image_size // 4, 1)),
        projection_dim=hidden_size // 2,
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return _save(
        MetaClip2Model, config, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer), output_dir, seed
    )


def build_tiny_siglip(output_dir, image_size=32, hidden_size=32, num_layers=2, seed=0) -> Path:
    """A tiny SiglipModel whose tokenizer returns ``input_ids`` only and pads to 64 (max_position_embeddings, the
    length transformers' zero-shot pipeline pads SigLIP prompts to), with a SiglipImageProcessor squashing to
    ``image_size`` (mean and std 0.5)."""
    tokenizer = gemma_tokenizer(input_ids_only=True)
    config = SiglipConfig(
        text_config=_towers(
            hidden_size, num_layers, vocab_size=len(tokenizer), max_position_embeddings=64, pad_token_id=0
        ),
        vision_config=_towers(hidden_size, num_layers, image_size=image_size, patch_size=max(image_size // 4, 1)),
    )
    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    processor = SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return _save(SiglipModel, config, processor, output_dir, seed)


def build_tiny_siglip2(output_dir, image_size=32, hidden_size=32, num_layers=2, seed=0) -> Path:
    """A tiny NaFlex Siglip2Model: patches of ``image_size // 4`` pixels, at most 16 per image (any aspect ratio);
    prompts padded to 16 tokens."""
    tokenizer = gemma_tokenizer()
    patch_size = max(image_size // 4, 1)
    config = Siglip2Config(
        text_config=_towers(
            hidden_size, num_layers, vocab_size=len(tokenizer), max_position_embeddings=16, pad_token_id=0
        ),
        vision_config=_towers(hidden_size, num_layers, patch_size=patch_size, num_patches=16),
    )
    image_processor = Siglip2ImageProcessor(patch_size=patch_size, max_num_patches=16)
    processor = Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer)
    return _save(Siglip2Model, config, processor, output_dir, seed)


def _save(model_class, config, processor, output_dir, seed: int) -> Path:
    output_dir = Path(output_dir)
    torch.manual_seed(seed)
    model = model_class(config)
    if hasattr(model, "logit_bias"):  # SigLIP's initialisation (its paper): scale 10, bias -10; transformers' is 0
        model.logit_scale.data.fill_(math.log(10.0))
        model.logit_bias.data.fill_(-10.0)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


# The tiny builder of each family, by model_type (hf_clipsel.models); a new family adds its own here.
TINY_BUILDERS = {
    "clip": build_tiny_clip,
    "metaclip_2": build_tiny_metaclip2,
    "siglip": build_tiny_siglip,
    "siglip2": build_tiny_siglip2,
}


def build_tiny_model(model_type: str, output_dir: str | Path, **size) -> Path:
    """A tiny random model of the family registered for ``model_type``, saved with its processor to ``output_dir``
    (``size``: image_size, hidden_size, num_layers, seed)."""
    if model_type not in TINY_BUILDERS:
        raise ValueError(f"no tiny builder for model_type {model_type!r}; there are: {', '.join(TINY_BUILDERS)}.")
    return TINY_BUILDERS[model_type](output_dir, **size)
