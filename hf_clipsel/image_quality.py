"""Damaged-image check from the pixels: three statistics per image, outliers flagged against the dataset's own spread.

CLIP can be blind to damage that still hurts a model trained on the image (recipes/benchmarks/README.md: with the
benchmark's proxy CLIP, images under CIFAR-10-C Gaussian noise score like clean ones), so the method's reward does not
see it. Three cheap statistics, computed while the images are decoded for embedding, do:

- ``noise_level``: Immerkaer's (1996) estimate of the standard deviation of additive pixel noise, on grayscale in
  [0, 1]: the mean absolute response to a 3x3 kernel that cancels smooth image structure (up to second order);
- ``contrast``: the standard deviation of the grayscale pixels (near 0 for blank or washed-out images);
- ``sharpness``: the mean absolute difference of neighbouring pixels, divided by the same at half resolution (2x2
  means). Natural images have similar ratios whatever their content; blur removes the finest scale first and
  lowers it.

A row is flagged ``noisy`` when log(noise_level) lies more than ``threshold`` robust standard deviations (median and
MAD over the usable rows) above the dataset's median, ``low contrast`` when its contrast lies that far below, and
``blurry`` when log(sharpness) does. (Too little noise is no sign of damage: smooth photos have little.) A blank
image (one colour; also an image under 4x4 pixels) is ``low contrast`` whatever the dataset.
The check is relative, so it adapts to each dataset's resolution and compression; it finds damage that affects a
minority of the rows, not a dataset that is noisy throughout.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

NOISE_LEVEL, CONTRAST, SHARPNESS = "noise_level", "contrast", "sharpness"
QUALITY_COLUMNS = (NOISE_LEVEL, CONTRAST, SHARPNESS)
NOISY, LOW_CONTRAST, BLURRY = "noisy", "low contrast", "blurry"
# Larger images are measured on a centre crop of this many pixels a side: a crop keeps the noise statistics (a resize
# would average the noise away) and bounds the cost per image to 1-3 ms on one core of the development machine
# (bench_damage_check.py times it; 512 a side took 10 ms; CLIP ViT-B/32 takes about 77 ms there).
MAX_SIDE = 256
# Bump when pixel_statistics would give other numbers for the same image: the statistics' cache (hf_clipsel.embedding)
# is named by it, and the CLIP embeddings beside it are not.
STATISTICS_VERSION = 1
# Floor of the noise level and of the gradients: 1e-4 is 0.03 grey levels, so a flat image's ratios stay finite.
_FLOOR = 1e-4
# The statistics of an image too small to measure (or not decoded): nothing in them is flagged.
UNMEASURED = (0.0, 0.0, 1.0)
# A contrast below half a grey level is a blank image (a single colour, or too small to show anything): low contrast
# whatever the rest of the dataset looks like.
BLANK_CONTRAST = 0.5 / 255


def pixel_statistics(image: Image.Image) -> tuple[float, float, float]:
    """``(noise_level, contrast, sharpness)`` of one image (see the module docstring). Images under 4x4 pixels give
    (0, 0, 1): too small to measure, and flagged as blank (low contrast)."""
    width, height = image.size
    if width > MAX_SIDE or height > MAX_SIDE:  # crop first: converting the whole image would cost more than the rest
        left, top = max((width - MAX_SIDE) // 2, 0), max((height - MAX_SIDE) // 2, 0)
        image = image.crop((left, top, left + min(width, MAX_SIDE), top + min(height, MAX_SIDE)))
    pixels = np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    if min(pixels.shape) < 4:
        return UNMEASURED
    # The kernel [[1, -2, 1], [-2, 4, -2], [1, -2, 1]] as shifted slices (no scipy): the difference of two
    # Laplacians, zero on any locally quadratic surface, so what remains is mostly noise.
    p = pixels
    response = (
        p[:-2, :-2] - 2 * p[:-2, 1:-1] + p[:-2, 2:]
        - 2 * p[1:-1, :-2] + 4 * p[1:-1, 1:-1] - 2 * p[1:-1, 2:]
        + p[2:, :-2] - 2 * p[2:, 1:-1] + p[2:, 2:]
    )  # fmt: skip
    noise_level = np.sqrt(np.pi / 2) * np.abs(response).mean() / 6
    height, width = (p.shape[0] // 2) * 2, (p.shape[1] // 2) * 2
    half = p[:height, :width].reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))
    sharpness = (_mean_gradient(p) + _FLOOR) / (_mean_gradient(half) + _FLOOR)
    return float(noise_level), float(pixels.std()), float(sharpness)


def _mean_gradient(pixels: np.ndarray) -> float:
    return float(np.abs(np.diff(pixels, axis=0)).mean() + np.abs(np.diff(pixels, axis=1)).mean())


def robust_z(values: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """``(values - median) / (1.4826 * MAD)``, median and MAD over the usable rows; 0 where the spread is 0."""
    from scipy.stats import median_abs_deviation

    values = np.asarray(values, dtype=np.float64)
    z = np.zeros(values.shape, dtype=np.float64)
    if not usable.any():
        return z
    median = np.median(values[usable])
    spread = median_abs_deviation(values[usable], scale="normal")  # the MAD scaled to a normal's standard deviation
    if spread > 0:
        z = (values - median) / spread
    return z


def damage_flags(
    noise_level: np.ndarray, contrast: np.ndarray, sharpness: np.ndarray, usable: np.ndarray, threshold: float
) -> np.ndarray:
    """Per row ``""``, ``"noisy"``, ``"low contrast"`` or ``"blurry"`` (object array; one flag per row, in that order
    of precedence); rows not ``usable`` get ``""``."""
    usable = np.asarray(usable, dtype=bool)
    # log: noise levels spread multiplicatively (a textured photo has several times a smooth one's); the floor keeps
    # a clean image's level of ~0 finite.
    noise_z = robust_z(_floored_log(noise_level), usable)
    contrast_z = robust_z(contrast, usable)
    sharpness_z = robust_z(_floored_log(sharpness), usable)
    flags = np.full(noise_z.shape, "", dtype=object)
    flags[sharpness_z < -threshold] = BLURRY
    flags[(contrast_z < -threshold) | (np.asarray(contrast) < BLANK_CONTRAST)] = LOW_CONTRAST
    flags[noise_z > threshold] = NOISY
    flags[~usable] = ""
    return flags


def _floored_log(values) -> np.ndarray:
    return np.log(np.maximum(np.asarray(values, dtype=np.float64), _FLOOR))
