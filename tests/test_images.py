"""Every kind of image a real dataset holds: converted to RGB and embedded, or flagged with a reason."""

import io

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image, load_dataset
from PIL import Image as PILImage

from hf_clipsel.data import decode_rgb
from hf_clipsel.pipeline import run
from tests.conftest import run_config


def _encode(image: PILImage.Image, format: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


def _noise(size=(24, 16), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    return PILImage.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def _sixteen_bit() -> bytes:
    array = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    return _encode(PILImage.fromarray(array))  # uint16 gives mode I;16


def _transparent_palette() -> bytes:
    image = _noise(mode="RGB").convert("P", palette=PILImage.Palette.ADAPTIVE, colors=8)
    image.info["transparency"] = 0
    return _encode(image, transparency=0)


CONVERTED = {
    "rgb": _encode(_noise()),
    "grayscale": _encode(_noise(mode="L")),
    "rgba": _encode(_noise(mode="RGBA")),
    "palette": _encode(_noise(mode="P")),
    "palette with transparency": _transparent_palette(),
    "cmyk jpeg": _encode(_noise(mode="CMYK"), format="JPEG"),
    "16-bit": _sixteen_bit(),
    "1x1": _encode(_noise(size=(1, 1))),
    "bilevel": _encode(_noise(mode="1")),
    "huge jpeg": _encode(PILImage.new("RGB", (6000, 4500), (200, 30, 30)), format="JPEG", quality=50),
}
FLAGGED = {
    "zero bytes": (b"", "image is empty"),
    "not an image": (b"%PDF-1.4 definitely not a picture", "image failed to decode: UnidentifiedImageError"),
    "truncated png": (_encode(_noise(size=(64, 64)))[:300], "image failed to decode"),
    "truncated jpeg": (_encode(_noise(size=(64, 64)), format="JPEG")[:400], "image failed to decode"),
}


@pytest.mark.parametrize("kind", sorted(CONVERTED))
def test_image_kinds_are_converted_to_rgb(kind):
    image, reason = decode_rgb({"bytes": CONVERTED[kind], "path": None})
    assert reason == "" and image.mode == "RGB"


@pytest.mark.parametrize("kind", sorted(FLAGGED))
def test_broken_images_are_flagged_with_a_reason(kind):
    data, reason = FLAGGED[kind]
    image, flagged = decode_rgb({"bytes": data, "path": None})
    assert image is None and flagged.startswith(reason)


@pytest.mark.parametrize(
    "mode, format", [("RGB", "PNG"), ("I;16", "PNG"), ("P", "PNG"), ("CMYK", "TIFF"), ("RGB", "JPEG")]
)
def test_huge_images_are_reduced_as_they_are_decoded(mode, format):
    """A batch must not hold full-size decodes of huge images (a 144-megapixel PNG took 2.9 GB): every format comes
    back at a scale that keeps both sides at least 1024 pixels, not at full size."""
    gradient = np.tile(np.linspace(0, 255, 6000), (4500, 1))
    if mode == "I;16":  # 16-bit pixels span 0..65535
        huge = PILImage.fromarray((gradient * 257).astype(np.uint16))
    else:
        huge = PILImage.fromarray(np.dstack([gradient.astype(np.uint8)] * 3)).convert(mode)
    image, reason = decode_rgb({"bytes": _encode(huge, format), "path": None})
    assert reason == "" and image.mode == "RGB"
    assert 1024 <= min(image.size) and max(image.size) <= 4096, image.size
    assert image.size[0] * 4500 == image.size[1] * 6000  # the aspect ratio is kept
    # what it shows is the same picture: dark on the left, bright on the right
    pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels[:, :10].mean() < 20 and pixels[:, -10:].mean() > 230


def test_conversions_keep_what_a_viewer_shows():
    # transparent pixels become white, not black
    clear = PILImage.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert decode_rgb({"bytes": _encode(clear), "path": None})[0].getpixel((0, 0)) == (255, 255, 255)
    # 16-bit greyscale maps its range onto 0..255 instead of clipping to white
    image, _ = decode_rgb({"bytes": _sixteen_bit(), "path": None})
    values = np.asarray(image)[..., 0]
    assert values.min() == 0 and values.max() == 255 and 100 < values.mean() < 155
    # a huge JPEG decodes at a reduced scale, keeping its aspect ratio
    huge, _ = decode_rgb({"bytes": CONVERTED["huge jpeg"], "path": None})
    assert max(huge.size) <= 6000 // 2 and abs(huge.size[0] / huge.size[1] - 6000 / 4500) < 0.01


def test_a_run_over_every_kind_finishes_and_flags_the_broken_rows(tmp_path, tiny_clip_path):
    kinds = sorted(CONVERTED) + sorted(FLAGGED)
    cells = [CONVERTED[k] if k in CONVERTED else FLAGGED[k][0] for k in kinds]
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b"])})
    data = Dataset.from_dict(
        {"image": [{"bytes": c, "path": None} for c in cells], "label": [i % 2 for i in range(len(cells))]},
        features=features,
    )
    data.to_parquet(str(tmp_path / "kinds.parquet"))
    summary = run(run_config(tmp_path / "kinds.parquet", tiny_clip_path, tmp_path / "out", selection_ratios=[0.5]))
    scores = load_dataset(str(tmp_path / "out"), "scores", split="train")
    flagged = {kinds[i] for i, reason in enumerate(scores["flag_reason"][:]) if reason}
    assert flagged == set(FLAGGED)
    assert summary.num_flagged == len(FLAGGED) and summary.ratios["0.5"].kept == len(kinds) // 2


@pytest.mark.parametrize(
    "size, format, expected",
    [((1000, 750), "JPEG", (500, 375)), ((2000, 1500), "JPEG", (500, 375)), ((4032, 3024), "JPEG", (504, 378)),
     ((447, 600), "JPEG", (447, 600)), ((1000, 750), "MPO", (500, 375)), ((1000, 750), "PNG", (1000, 750))],
)  # fmt: skip
def test_jpeg_draft_decodes_at_the_smallest_scale_that_keeps_the_target(size, format, expected):
    """draft_size (jpeg_draft): a JPEG (or MPO, the multi-picture JPEG of cameras and phones) at least twice the
    target on both sides decodes at 1/2, 1/4 or 1/8 scale, never below the target; a smaller JPEG, or another
    format, decodes at full size."""
    picture = PILImage.fromarray(np.dstack([np.tile(np.linspace(0, 255, size[0]), (size[1], 1)).astype(np.uint8)] * 3))
    extra = dict(save_all=True, append_images=[picture]) if format == "MPO" else {}
    image, reason = decode_rgb({"bytes": _encode(picture, format, **extra), "path": None}, draft_size=(224, 224))
    assert reason == "" and image.size == expected
    assert min(image.size) >= 224
    pixels = np.asarray(image.convert("L"), dtype=np.float64)  # the same picture: dark left, bright right
    assert pixels[:, :5].mean() < 20 and pixels[:, -5:].mean() > 230
