"""`hf-clipsel demo`: the method at work, offline, in about a minute on a 2-core CPU.

It runs on scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes). A tiny CLIP is trained for
seconds on the first part of them (standing in for a pretrained CLIP, which cannot be downloaded offline); the
other part becomes the pool to select from, with seeded label noise (20% of the rows get a wrong label) and a few
damaged images (Gaussian noise) injected by :mod:`hf_clipsel.benchmarking.noise`. Its record columns (`is_noisy`,
`clean_label`, `corruption`) stay in the pool, so every subset carries them, and the summary and the report say how
much of the injected noise each ratio kept, against the pool and against a random subset of the same size.

It is a toy: a 30-thousand-parameter CLIP on 8x8 digits. The pipeline and the defaults are the real ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage

from .benchmarking.noise import corrupt_images, symmetric_label_noise
from .configs import ClipselConfig
from .tiny import train_tiny_clip

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATE = "a photo of the digit {}."
REFERENCE_ROWS = 800  # the tiny CLIP learns from these; the pool is the rest, so it is scored on unseen images
LABEL_NOISE = 0.2
DAMAGED = 0.03
RATIOS = [0.3, 0.5, 0.8]
NOTICE = (
    "DEMONSTRATION: a tiny CLIP trained for seconds on scikit-learn's 8x8 digits selects from other digits with 20% "
    "injected label noise and 3% damaged images. A toy; the pipeline and its defaults are the real ones. For a real "
    "run see README.md (openai/clip-vit-base-patch32)."
)


def digits_dataset() -> Dataset:
    """The digits as 32x32 RGB images (`image`: Image, `label`: ClassLabel), in scikit-learn's order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 255).astype(np.uint8)
    return Dataset.from_dict(
        {
            "image": [PILImage.fromarray(image).resize((32, 32), PILImage.NEAREST).convert("RGB") for image in images],
            "label": digits.target.tolist(),
        },
        features=Features({"image": Image(), "label": ClassLabel(names=DIGIT_NAMES)}),
    )


def prepare_demo(work_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write the demo's pool (parquet, with the noise record columns) and its trained tiny CLIP under
    ``work_dir``; return (pool file, model folder). Reused when already there."""
    work_dir = Path(work_dir)
    pool_file, model_dir = work_dir / "pool" / "digits_pool.parquet", work_dir / "tiny_clip"
    if pool_file.exists() and (model_dir / "model.safetensors").exists():
        return pool_file, model_dir
    digits = digits_dataset()
    reference = digits.select(range(REFERENCE_ROWS))
    train_tiny_clip(
        model_dir, list(reference["image"]), reference["label"], DIGIT_NAMES, TEMPLATE, epochs=80, seed=seed
    )
    pool = digits.select(range(REFERENCE_ROWS, len(digits)))
    pool, _ = symmetric_label_noise(pool, LABEL_NOISE, seed=seed, add_noise_columns=True)
    pool, _ = corrupt_images(pool, DAMAGED, "gaussian_noise", 5, seed=seed, add_noise_columns=True)
    pool_file.parent.mkdir(parents=True, exist_ok=True)
    pool.to_parquet(str(pool_file))
    return pool_file, model_dir


def demo_config(output_dir: str | Path, work_dir: str | Path | None = None) -> ClipselConfig:
    """The demo's run: the package defaults, with the pool and model of :func:`prepare_demo` (in ``work_dir``,
    default ``<output_dir>_inputs`` beside the output folder)."""
    output_dir = Path(output_dir)
    work_dir = Path(work_dir) if work_dir else output_dir.with_name(output_dir.name + "_inputs")
    pool_file, model_dir = prepare_demo(work_dir)
    return ClipselConfig.from_flat(
        dict(
            dataset_name=str(pool_file),
            model_name_or_path=str(model_dir),
            selection_ratios=RATIOS,
            knn_k=20,
            prompt_templates=[TEMPLATE],
            batch_size=128,
            embedding_chunk_size=1024,
            output_dir=str(output_dir),
            overwrite_output_dir=True,
        )
    )
