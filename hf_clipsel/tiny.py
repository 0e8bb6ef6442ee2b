"""A tiny CLIP saved like a real checkpoint, randomly initialised or briefly trained on labelled images.

The tests use the random one, so that the real `CLIPModel.from_pretrained` / `AutoProcessor` loading path runs
without the Hub (its scores carry no meaning). `hf-clipsel demo` trains one for seconds on images it then never
selects from (:func:`train_tiny_clip`), so that the demonstration's scores mean something.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


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
