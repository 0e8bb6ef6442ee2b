"""`hf-clipsel demo`: the whole pipeline offline, in about a minute on a laptop CPU.

It runs on scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes) and a tiny CLIP with
random weights built on the fly. It shows what a run does and writes; its scores mean nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage

from .configs import ClipselConfig
from .tiny import build_tiny_clip

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NOTICE = (
    "DEMONSTRATION: a tiny CLIP with random weights on scikit-learn's 8x8 digits. The pipeline is the real one; "
    "the scores carry no meaning. For a real run see README.md (openai/clip-vit-base-patch32)."
)


def write_digits_dataset(path: str | Path) -> Path:
    """The digits as a parquet file with an `image` (Image) and a `label` (ClassLabel) column."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 255).astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset = Dataset.from_dict(
        {
            "image": [PILImage.fromarray(image).resize((32, 32), PILImage.NEAREST).convert("RGB") for image in images],
            "label": digits.target.tolist(),
        },
        features=Features({"image": Image(), "label": ClassLabel(names=DIGIT_NAMES)}),
    )
    dataset.to_parquet(str(path))
    return path


def demo_config(output_dir: str | Path) -> ClipselConfig:
    output_dir = Path(output_dir)
    source = write_digits_dataset(output_dir / "demo_source" / "digits.parquet")
    model = build_tiny_clip(output_dir / "demo_tiny_clip")
    return ClipselConfig.from_flat(
        dict(
            dataset_name=str(source),
            model_name_or_path=str(model),
            selection_ratios=[0.3, 0.5, 0.8],
            knn_k=20,
            adapter_epochs=10,
            adapter_learning_rate=1e-3,
            adapter_batch_size=128,
            prompt_templates=["a photo of the digit {}.", "a handwritten {}."],
            batch_size=128,
            embedding_chunk_size=1024,
            output_dir=str(output_dir),
            overwrite_output_dir=True,
        )
    )
