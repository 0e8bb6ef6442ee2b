"""The pixel damage check: its statistics on synthetic images, its flags, and a run that demotes damaged images."""

import numpy as np
import pandas as pd
import pytest
from datasets import load_dataset
from PIL import Image, ImageFilter
from scipy.stats import norm

from hf_clipsel.benchmarking import noise
from hf_clipsel.image_quality import (
    BLURRY,
    LOW_CONTRAST,
    MAX_SIDE,
    NOISY,
    damage_flags,
    pixel_statistics,
    robust_z,
)
from hf_clipsel.pipeline import run
from tests.conftest import run_config


def scene(seed: int, size: int = 64) -> Image.Image:
    """A random scene: a tilted gradient, a soft blob and a fine texture (nothing beyond 8-bit rounding noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    angle, cx, cy = rng.uniform(0, np.pi), *rng.uniform(0.2, 0.8, 2)
    texture = np.asarray(Image.fromarray(rng.uniform(0, 255, (size // 2, size // 2))).resize((size, size))) / 255
    gray = 0.2 + 0.3 * (np.cos(angle) * x + np.sin(angle) * y) + 0.3 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.05)
    return Image.fromarray(np.uint8(np.clip(gray + 0.15 * texture, 0, 1) * 255)).convert("RGB")


def with_noise(image: Image.Image, sigma: float, seed: int = 0) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float64) / 255 + np.random.default_rng(seed).normal(0, sigma, (64, 64, 1))
    return Image.fromarray(np.uint8(np.clip(pixels, 0, 1) * 255))


def test_noise_level_estimates_the_added_noise_and_contrast_the_pixel_spread():
    flat = Image.new("RGB", (256, 256), (128, 128, 128))
    assert pixel_statistics(flat) == (0.0, 0.0, 1.0)
    noisy = Image.fromarray(np.uint8(np.clip(128 + np.random.default_rng(0).normal(0, 10, (256, 256)), 0, 255)))
    noise_level, contrast, _ = pixel_statistics(noisy)
    assert noise_level * 255 == pytest.approx(10, rel=0.05)  # Immerkaer's estimate of the added sigma
    assert contrast * 255 == pytest.approx(10, rel=0.05)
    assert pixel_statistics(Image.new("RGB", (3, 3))) == (0.0, 0.0, 1.0)  # too small to measure: nothing to flag


def test_blur_lowers_sharpness_and_noise_raises_it():
    scene = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).resize((256, 256))
    sharpness = pixel_statistics(scene)[2]
    assert pixel_statistics(scene.filter(ImageFilter.GaussianBlur(2)))[2] < sharpness
    assert (
        pixel_statistics(with_noise(scene.convert("RGB").resize((64, 64)), 0.1))[2]
        > pixel_statistics(scene.convert("RGB").resize((64, 64)))[2]
    )


def test_large_images_are_measured_on_a_centre_crop():
    pixels = np.random.default_rng(0).integers(0, 256, (1200, 2000), dtype=np.uint8)
    top, left = (1200 - MAX_SIDE) // 2, (2000 - MAX_SIDE) // 2
    centre = pixels[top : top + MAX_SIDE, left : left + MAX_SIDE]
    assert pixel_statistics(Image.fromarray(pixels)) == pixel_statistics(Image.fromarray(centre))
    assert pixel_statistics(Image.fromarray(pixels)) != pixel_statistics(Image.fromarray(centre[1:, 1:]))


def test_flags_name_the_noisy_and_the_blank_images_and_nothing_else():
    images = [scene(seed) for seed in range(60)]
    images[3] = with_noise(images[3], 0.15)
    images[17] = with_noise(images[17], 0.1, seed=1)
    images[40] = Image.new("RGB", (64, 64), (20, 20, 20))
    images[50] = images[50].filter(ImageFilter.GaussianBlur(3))
    statistics = np.array([pixel_statistics(image) for image in images]).T
    usable = np.ones(60, dtype=bool)
    usable[41] = False
    flags = damage_flags(*statistics, usable, threshold=3.0)
    assert {row: flag for row, flag in enumerate(flags) if flag} == {3: NOISY, 17: NOISY, 40: LOW_CONTRAST, 50: BLURRY}
    # a rerun of the same rows with one more unusable row: that row is never flagged
    usable[3] = False
    assert damage_flags(*statistics, usable, threshold=3.0)[3] == ""


def test_a_blank_or_tiny_image_is_low_contrast_whatever_the_dataset():
    # contrasts spread so widely that a blank image is not 3 robust SDs below the median: still flagged
    images = [scene(seed).point(lambda v, s=seed: v * (0.1 + s / 20)) for seed in range(40)]
    images[5] = Image.new("RGB", (64, 64), (128, 90, 200))  # one colour
    images[9] = Image.new("RGB", (1, 1), (255, 0, 0))  # one pixel: too small to measure anything else
    statistics = np.array([pixel_statistics(image) for image in images]).T
    contrast_z = (statistics[1] - np.median(statistics[1])) / (
        1.4826 * np.median(np.abs(statistics[1] - np.median(statistics[1])))
    )
    assert contrast_z[5] > -3, "the construction must not be flagged by the relative test alone"
    flags = damage_flags(*statistics, np.ones(40, dtype=bool), threshold=3.0)
    assert flags[5] == LOW_CONTRAST and flags[9] == LOW_CONTRAST


def test_robust_z_ignores_unusable_rows_and_a_zero_spread():
    values = np.array([1.0, 2.0, 3.0, 100.0, -50.0])
    usable = np.array([True, True, True, True, False])
    # median and MAD over the usable rows only: 2.5 and median(1.5, 0.5, 0.5, 97.5) = 1.0
    # 1 / Phi^-1(3/4) = 1.4826...: the MAD of a normal sample estimates its standard deviation
    np.testing.assert_allclose(robust_z(values, usable), (values - 2.5) * norm.ppf(0.75))
    assert not robust_z(np.ones(4), np.ones(4, dtype=bool)).any()


@pytest.mark.slow
def test_the_default_drops_damaged_images_first_and_says_why(cifar_slice, tiny_clip_path, tmp_path):
    source = load_dataset("parquet", data_files=str(cifar_slice), split="train")
    damaged, record = noise.corrupt_images(source, 0.05, "gaussian_noise", 3, seed=0, parameters="imagenet")
    damaged.to_parquet(str(tmp_path / "damaged.parquet"))
    damaged_rows = sorted(record["row_id"])
    assert len(damaged_rows) == 12

    run(run_config(tmp_path / "damaged.parquet", tiny_clip_path, tmp_path / "out", selection_ratios=[0.5, 0.96]))
    scores = pd.read_parquet(tmp_path / "out" / "scores").set_index("row_id").sort_index()
    assert scores.index[scores["damage"] == NOISY].tolist() == damaged_rows
    assert not scores.loc[damaged_rows, "is_selected_ratio_0.5"].any()
    assert (scores.loc[damaged_rows, "drop_reason_ratio_0.5"] == "damaged").all()
    # 230 of 240 rows asked: all 228 undamaged rows, then the two damaged rows with the best reward
    kept = scores.loc[damaged_rows, "is_selected_ratio_0.96"]
    assert kept.sum() == 2 and scores["is_selected_ratio_0.96"].sum() == 230
    assert (
        scores.loc[kept.index[kept], "reward_ratio_0.96"].min()
        > scores.loc[kept.index[~kept], "reward_ratio_0.96"].max()
    )
