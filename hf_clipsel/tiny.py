"""A tiny, randomly initialised CLIP saved like a real checkpoint.

Used by `hf-clipsel demo` and by the tests, so that the real `CLIPModel.from_pretrained` / `AutoProcessor`
loading path runs without the Hub. Its scores carry no meaning: it exists to exercise the machinery.
"""

from __future__ import annotations

from pathlib import Path

import torch
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
