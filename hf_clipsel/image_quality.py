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

Every image is measured at a common scale, its shorter side resized (bicubic) to ``COMMON_SIDE`` pixels, so that
images of mixed sizes compare: on native pixels a 32x32 image's fine structure reads as a noise level 13 times an
upscaled copy's, and a folder of clean CIFAR-10 images at mixed sizes had every 32x32 image flagged ``noisy``
(recipes/benchmarks/README.md, "What the damage check finds", measures this and chooses the scale).

A row is flagged ``noisy`` when log(noise_level) lies more than ``threshold`` robust standard deviations (median and
MAD over the usable rows) above the dataset's median, ``low contrast`` when its contrast lies that far below, and
``blurry`` when log(sharpness) does. (Too little noise is no sign of damage: smooth photos have little.) A blank
image (one colour; also an image under 4x4 pixels) is ``low contrast`` whatever the dataset.
The check is relative, so it adapts to each dataset's resolution and compression; it finds damage that affects a
minority of the rows, not a dataset that is noisy throughout.

Undamaged photos have heavy tails too (grainy, textured, dark): at 3.5 robust SDs about 0.3-0.4% of clean CIFAR-10
images lie beyond the threshold, and ranked last they give their places to worse rows. So a tail is flagged only
where it holds more rows than its mirror image: with ``false_discovery`` q, each statistic's cut is the lowest t
beyond the threshold at which one more than the rows as far out on the other side (read as undamaged rows spread
symmetrically: the knockoff+ estimate of the false flags) is at most q times the rows beyond t. A clean dataset,
whose tails are alike, gets no flag; a damaged minority stands out beyond its mirror and is flagged with the clean
rows as far out; fewer than 1/q damaged images are not (a blank one still is). recipes/benchmarks/README.md ("A
damage check that flags a tail only beyond its mirror") measures it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

NOISE_LEVEL, CONTRAST, SHARPNESS = "noise_level", "contrast", "sharpness"
QUALITY_COLUMNS = (NOISE_LEVEL, CONTRAST, SHARPNESS)
NOISY, LOW_CONTRAST, BLURRY = "noisy", "low contrast", "blurry"
# The common scale: the shorter side of every image is resized to this many pixels before it is measured. Measured on
# CIFAR-10 images at mixed sizes (bench_damage_check.py): at 64 clean images of every size flag alike (0-3%) and
# Gaussian noise and blur added at any of the sizes are found; at 32 (the native size) noise and blur added to larger
# copies average away; at 96 and above (224 is CLIP's scale) noise added to a 32x32 image is smoothed out by the
# upscaling. Damage is judged as it shows at this scale: grain finer than it, in a large photo, averages away.
COMMON_SIDE = 64
# At most this many times as long as it is wide (or high): a longer image is measured on its centre, which bounds the
# cost (1.2 ms per 1024x768 image on one core of the development machine; CLIP ViT-B/32 takes about 77 ms there).
MAX_ASPECT = 4
# Bump when pixel_statistics would give other numbers for the same image: the statistics' cache (hf_clipsel.embedding)
# is named by it, and the CLIP embeddings beside it are not.
STATISTICS_VERSION = 2
# Share of the usable rows above which the flags are reported as suspicious: the check looks for a damaged minority.
# Clean images flagged 0-3% at every size measured (0.78% of a pool of 5,000 native CIFAR-10 images); the 5% of
# injected damage the benchmarks use stays below it; a folder whose sizes confused the check (37%) does not.
FLAG_SHARE_WARNING = 0.10
# Floor of the noise level and of the gradients: 1e-4 is 0.03 grey levels, so a flat image's ratios stay finite.
_FLOOR = 1e-4
# The statistics of an image too small to measure (or not decoded): nothing in them is flagged.
UNMEASURED = (0.0, 0.0, 1.0)
# A contrast below half a grey level is a blank image (a single colour, or too small to show anything): low contrast
# whatever the rest of the dataset looks like.
BLANK_CONTRAST = 0.5 / 255


def pixel_statistics(image: Image.Image, side: int = COMMON_SIDE) -> tuple[float, float, float]:
    """``(noise_level, contrast, sharpness)`` of one image (see the module docstring), measured on its grayscale
    with the shorter side resized to ``side`` pixels (at least 4; the benchmark compares scales). Images under 4x4
    pixels give (0, 0, 1): too small to measure, and flagged as blank (low contrast)."""
    width, height = image.size
    if min(width, height) < 4:
        return UNMEASURED
    short = min(width, height)
    if max(width, height) > MAX_ASPECT * short:  # a strip: its centre, so that the resized image stays small
        keep_width, keep_height = min(width, MAX_ASPECT * short), min(height, MAX_ASPECT * short)
        left, top = (width - keep_width) // 2, (height - keep_height) // 2
        image = image.crop((left, top, left + keep_width, top + keep_height))
        width, height = image.size
    scale = side / short
    size = (max(round(width * scale), side), max(round(height * scale), side))
    # Grayscale first (a third of the pixels to resize); reducing_gap: a box reduction before the bicubic filter for
    # large images, 3x faster than the exact filter at 1024x768, and a box average is what noise statistics need.
    gray = image.convert("L").resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    p = np.asarray(gray, dtype=np.float64) / 255.0
    # The kernel [[1, -2, 1], [-2, 4, -2], [1, -2, 1]] as shifted slices (no scipy): the difference of two
    # Laplacians, zero on any locally quadratic surface, so what remains is mostly noise.
    response = (
        p[:-2, :-2] - 2 * p[:-2, 1:-1] + p[:-2, 2:]
        - 2 * p[1:-1, :-2] + 4 * p[1:-1, 1:-1] - 2 * p[1:-1, 2:]
        + p[2:, :-2] - 2 * p[2:, 1:-1] + p[2:, 2:]
    )  # fmt: skip
    noise_level = np.sqrt(np.pi / 2) * np.abs(response).mean() / 6
    height, width = (p.shape[0] // 2) * 2, (p.shape[1] // 2) * 2
    half = p[:height, :width].reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))
    sharpness = (_mean_gradient(p) + _FLOOR) / (_mean_gradient(half) + _FLOOR)
    return float(noise_level), float(p.std()), float(sharpness)


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
    noise_level: np.ndarray,
    contrast: np.ndarray,
    sharpness: np.ndarray,
    usable: np.ndarray,
    threshold: float,
    false_discovery: float | None = None,
) -> np.ndarray:
    """Per row ``""``, ``"noisy"``, ``"low contrast"`` or ``"blurry"`` (object array; one flag per row, in that order
    of precedence); rows not ``usable`` get ``""``. ``false_discovery``: q of :func:`beyond_mirror` (None: every row
    beyond ``threshold`` is flagged)."""
    usable = np.asarray(usable, dtype=bool)
    # log: noise levels spread multiplicatively (a textured photo has several times a smooth one's); the floor keeps
    # a clean image's level of ~0 finite. Each z is signed so that damage lies on its positive side.
    noise_z = robust_z(_floored_log(noise_level), usable)
    contrast_z = -robust_z(contrast, usable)
    sharpness_z = -robust_z(_floored_log(sharpness), usable)
    flags = np.full(noise_z.shape, "", dtype=object)
    flags[beyond_mirror(sharpness_z, usable, threshold, false_discovery)] = BLURRY
    flags[beyond_mirror(contrast_z, usable, threshold, false_discovery) | (np.asarray(contrast) < BLANK_CONTRAST)] = (
        LOW_CONTRAST
    )
    flags[beyond_mirror(noise_z, usable, threshold, false_discovery)] = NOISY
    flags[~usable] = ""
    return flags


def beyond_mirror(z: np.ndarray, usable: np.ndarray, threshold: float, false_discovery: float | None) -> np.ndarray:
    """Rows whose ``z`` lies beyond the cut t: without ``false_discovery``, t = ``threshold`` (strictly beyond); with
    it (q), the lowest t > ``threshold`` among the usable rows' z at which 1 + #(usable z <= -t) <= q #(usable z >= t),
    none when no t passes. Counted over the usable rows only."""
    if false_discovery is None:
        return z > threshold
    values = np.sort(z[usable])
    mirrored = np.sort(-values)
    cuts = values[values > threshold]  # ascending: the first cut that passes is the lowest
    beyond = len(values) - np.searchsorted(values, cuts, side="left")
    mirror = len(mirrored) - np.searchsorted(mirrored, cuts, side="left")
    # 1 + mirror: the knockoff+ estimate (Barber and Candes, 2015), which bounds the expected share of false flags by
    # q; without the 1, the few most extreme clean rows of a tail are flagged whenever they pass the other tail's
    # most extreme row. The price: fewer than 1/q damaged rows beyond the clean ones are never flagged.
    passing = np.flatnonzero(1 + mirror <= false_discovery * beyond)
    if not len(passing):
        return np.zeros(z.shape, dtype=bool)
    return z >= cuts[passing[0]]


def _floored_log(values) -> np.ndarray:
    return np.log(np.maximum(np.asarray(values, dtype=np.float64), _FLOOR))


def flag_share_warning(flags: np.ndarray, usable: np.ndarray, share: float = FLAG_SHARE_WARNING) -> str | None:
    """A warning when the damage check flagged more than ``share`` (in [0, 1]) of the ``usable`` rows, else None.

    Args:
        flags: per row ``""`` or a flag of :func:`damage_flags`.
        usable: per row, whether it was judged (a decoded image and a usable label).
        share: the largest share of flagged rows that passes without a warning (``FLAG_SHARE_WARNING``).

    Returns:
        One line naming how many rows each flag took and how to turn the check off, or None.
    """
    flags, usable = np.asarray(flags, dtype=object), np.asarray(usable, dtype=bool)
    total = int(usable.sum())
    flagged = (flags != "") & usable
    if total == 0 or flagged.sum() <= share * total:
        return None
    kinds, counts = np.unique(flags[flagged].astype(str), return_counts=True)
    found = ", ".join(f"{count} {kind}" for kind, count in zip(kinds, counts))
    count = int(flagged.sum())
    return (
        f"the damage check flagged {count} of {total} usable rows ({count / total:.0%}: {found}); it is meant to "
        "find a damaged minority, so the images may differ in a way it reads as damage (their source, compression or "
        "content). Look at the flagged rows (the scores' `damage` column); if they are not damaged, select with "
        "`--damage_check false`."
    )
