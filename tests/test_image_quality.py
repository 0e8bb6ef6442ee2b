"""The pixel damage check: its statistics on synthetic images, its flags, and a run that demotes damaged images."""

import io

import numpy as np
import pandas as pd
import pytest
from datasets import load_dataset
from PIL import Image, ImageFilter
from scipy.stats import norm

from hf_clipsel.benchmarking import noise
from hf_clipsel.image_quality import (
    BLURRY,
    COMMON_SIDE,
    FLAG_SHARE_WARNING,
    LOW_CONTRAST,
    MAX_ASPECT,
    NOISY,
    beyond_mirror,
    damage_flags,
    flag_share_warning,
    pixel_statistics,
    robust_z,
)
from hf_clipsel.pipeline import run
from tests.conftest import CIFAR10, run_config


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
    # at the common scale already, so that nothing is resized: Immerkaer's estimate of the added sigma
    pixels = 128 + np.random.default_rng(0).normal(0, 10, (COMMON_SIDE, COMMON_SIDE))
    noise_level, contrast, _ = pixel_statistics(Image.fromarray(np.uint8(np.clip(pixels, 0, 255))))
    assert noise_level * 255 == pytest.approx(10, rel=0.1)
    assert contrast * 255 == pytest.approx(10, rel=0.1)
    assert pixel_statistics(Image.new("RGB", (3, 3))) == (0.0, 0.0, 1.0)  # too small to measure: nothing to flag


def test_blur_lowers_sharpness_and_noise_raises_it():
    scene = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).resize((256, 256))
    sharpness = pixel_statistics(scene)[2]
    assert pixel_statistics(scene.filter(ImageFilter.GaussianBlur(8)))[2] < sharpness  # 2 pixels at the common scale
    assert (
        pixel_statistics(with_noise(scene.convert("RGB").resize((64, 64)), 0.1))[2]
        > pixel_statistics(scene.convert("RGB").resize((64, 64)))[2]
    )


def test_images_are_measured_at_a_common_scale_and_strips_on_their_centre():
    picture = scene(0, size=COMMON_SIDE)
    # the same picture at twice and four times the size reads nearly as it does at the common scale
    for factor in (2, 4):
        larger = picture.resize((COMMON_SIDE * factor,) * 2, Image.Resampling.BICUBIC)
        np.testing.assert_allclose(pixel_statistics(larger), pixel_statistics(picture), rtol=0.25)
    strip = np.random.default_rng(0).integers(0, 256, (100, 100 * MAX_ASPECT * 3), dtype=np.uint8)
    left = (strip.shape[1] - 100 * MAX_ASPECT) // 2
    centre = strip[:, left : left + 100 * MAX_ASPECT]
    assert pixel_statistics(Image.fromarray(strip)) == pixel_statistics(Image.fromarray(centre))


def _encoded(image: Image.Image, size: tuple[int, int], format: str) -> bytes:
    buffer = io.BytesIO()
    (image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)).save(buffer, format)
    return buffer.getvalue()


@pytest.mark.slow
def test_clean_images_of_mixed_sizes_are_not_flagged(tiny_clip_path, tmp_path):
    """Issue 29: native 32x32 images beside upscaled copies were all flagged noisy (the statistics were measured on
    the native pixels). An imagefolder of undamaged CIFAR-10 images as 32x32 PNG, 224x224 JPEG and 500x375 JPEG, run
    end to end: at most 5% of the rows flagged, and no size flagged more than another."""
    source = load_dataset("parquet", data_files=str(CIFAR10 / "train-00000-of-00001.parquet"), split="train")
    names = source.features["label"].names
    formats = [((32, 32), "PNG"), ((224, 224), "JPEG"), ((500, 375), "JPEG")]
    sizes = []
    for row in range(90):
        (size, format), item = formats[row % 3], source[row]
        folder = tmp_path / "folder" / names[item["label"]]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{row:03d}.{format.lower()}").write_bytes(_encoded(item["img"].convert("RGB"), size, format))
        sizes.append(size)
    run(run_config(tmp_path / "folder", tiny_clip_path, tmp_path / "out", selection_ratios=[0.5]))
    scores = pd.read_parquet(tmp_path / "out" / "scores")
    assert len(scores) == 90 and (scores["flag_reason"] == "").all()
    flagged = scores["damage"] != ""
    assert flagged.sum() <= 0.05 * len(scores), scores.loc[flagged, ["row_id", "damage", "noise_level"]]
    assert flag_share_warning(scores["damage"].to_numpy(object), np.ones(90, dtype=bool)) is None


def test_the_flag_share_warning_says_how_many_and_how_to_turn_the_check_off():
    usable = np.ones(100, dtype=bool)
    flags = np.full(100, "", dtype=object)
    flags[: int(FLAG_SHARE_WARNING * 100)] = NOISY  # at the share: no warning
    assert flag_share_warning(flags, usable) is None
    flags[10:30] = BLURRY
    usable[:5] = False  # unusable rows count neither as flagged nor in the total
    message = flag_share_warning(flags, usable)
    assert message.startswith("the damage check flagged 25 of 95 usable rows (26%: 20 blurry, 5 noisy)")
    assert "--damage_check false" in message and "\n" not in message
    assert flag_share_warning(flags, np.zeros(100, dtype=bool)) is None


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


def test_the_mirror_check_flags_no_heavy_tail_of_clean_images_and_a_damaged_minority_beyond_it():
    # Clean images' log noise levels with tails heavier than a normal's on both sides (Student t, 3 degrees of
    # freedom): the fixed threshold flags their upper tail; the mirror check finds it no heavier than the lower one.
    rng = np.random.default_rng(0)
    log_noise = np.log(0.01) + 0.3 * rng.standard_t(3, 10_000)
    contrast, sharpness = rng.uniform(0.15, 0.25, 10_000), np.exp(rng.normal(0.5, 0.05, 10_000))
    usable = np.ones(10_000, dtype=bool)
    clean = np.exp(log_noise), contrast, sharpness
    assert (damage_flags(*clean, usable, threshold=3.5) == NOISY).sum() > 50
    for share in (0.1, 0.25):
        assert (damage_flags(*clean, usable, threshold=3.5, false_discovery=share) == "").all()
    # 100 damaged images far out (noise 20 times the median): they are flagged, with the clean rows as far out, and
    # never more clean rows than the fixed threshold flags.
    damaged = log_noise.copy()
    damaged[:100] = np.log(0.2) + 0.1 * rng.standard_normal(100)
    flags = damage_flags(np.exp(damaged), contrast, sharpness, usable, threshold=3.5, false_discovery=0.25)
    assert (flags[:100] == NOISY).all()
    fixed = damage_flags(np.exp(damaged), contrast, sharpness, usable, threshold=3.5)
    assert 0 < (flags[100:] != "").sum() <= (fixed[100:] != "").sum()


def test_beyond_mirror_cuts_at_the_lowest_passing_value_and_counts_usable_rows_only():
    z = np.array([0.0, 0.1, -0.1, 4.0, 5.0, 6.0, 6.5, 7.0, -4.5, -20.0])
    usable = np.ones(10, dtype=bool)
    # beyond 4: 5 rows, mirrored 2 (-4.5, -20): 1 + 2 > 0.5 * 5; beyond 5: 4 rows, 1 + 1 <= 0.5 * 4 passes
    np.testing.assert_array_equal(np.flatnonzero(beyond_mirror(z, usable, 3.0, 0.5)), [4, 5, 6, 7])
    # at 0.4 no cut passes (beyond 7: 1 row, 1 + 1 > 0.4): a handful of rows is never flagged
    assert not beyond_mirror(z, usable, 3.0, 0.4).any()
    usable[9] = False  # an unusable row is neither flagged nor counted in the mirror: beyond 4, 1 + 1 <= 0.4 * 5
    np.testing.assert_array_equal(np.flatnonzero(beyond_mirror(z, usable, 3.0, 0.4)), [3, 4, 5, 6, 7])
    # the cut is never at or below the threshold, and without a share it is the threshold itself
    assert not beyond_mirror(z, usable, 5.0, 0.5)[4]
    np.testing.assert_array_equal(np.flatnonzero(beyond_mirror(z, usable, 3.0, None)), [3, 4, 5, 6, 7])


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


def test_the_selection_warns_when_the_damage_check_flags_many_rows(caplog):
    """The warning reaches the user from the select stage, where the damage score flags the rows."""
    from hf_clipsel.scores.damage import DamageCheck
    from hf_clipsel.selection import SelectionConfig

    rng = np.random.default_rng(0)
    noise = np.exp(rng.normal(-5, 0.1, 100))
    noise[:30] *= 50  # 30% far noisier than the rest
    table = {"label": np.zeros(100), "flag_reason": np.full(100, "", dtype=object)}
    table.update(noise_level=noise, contrast=np.full(100, 0.2), sharpness=np.full(100, 1.5))
    with caplog.at_level("WARNING"):
        flags = DamageCheck().flags(table, SelectionConfig())
    assert (flags[:30] == NOISY).all()
    assert "the damage check flagged 30 of 100 usable rows" in caplog.text and "--damage_check false" in caplog.text
