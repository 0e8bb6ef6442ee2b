"""Every kind of image a real dataset holds: converted to RGB and embedded, or flagged with a reason."""

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image, load_dataset
from PIL import EpsImagePlugin
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
    "eps": (_encode(_noise(), format="EPS"), "image is EPS, which needs an outside interpreter"),
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
    if mode in ("I;16", "P"):  # reduced a band of rows at a time: the same pixels as converting all, then reducing
        whole = PILImage.open(io.BytesIO(_encode(huge, format)))
        if mode == "I;16":
            whole = PILImage.fromarray((np.asarray(whole) / 257).round().astype(np.uint8))
        assert np.array_equal(np.asarray(image), np.asarray(whole.convert("RGB").reduce(4)))


# Peak memory of one decode in a fresh process: the kernel's high-water mark (VmHWM), reset to the current resident
# size just before (clear_refs 5). Not ru_maxrss, which a child inherits from the process that started it.
_PEAK_MEMORY = """
import sys
from hf_clipsel.data import decode_rgb

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

data = open(sys.argv[1], "rb").read()
open("/proc/self/clear_refs", "w").write("5")
before = kib("VmRSS")
image, reason = decode_rgb({"bytes": data, "path": None})
assert reason == "" and image.size == (1143, 1143), (reason, image.size)
print(kib("VmHWM") - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures peak memory through Linux's /proc")
def test_a_huge_sixteen_bit_png_decodes_in_bounded_memory(tmp_path):
    """Issue 24: a 12000x12000 16-bit PNG took 2.69 GB to decode (converted at full size to float64 before it was
    reduced). An 8000x8000 one, decoded in a fresh process: its peak memory grows by well under the float64 copy
    (488 MiB); the 16-bit pixels themselves take 122 MiB."""
    row = np.linspace(0, 65535, 8000).astype(np.uint16)
    PILImage.fromarray(np.broadcast_to(row, (8000, 8000)).copy()).save(tmp_path / "huge.png", compress_level=1)
    measured = subprocess.run(
        [sys.executable, "-c", _PEAK_MEMORY, str(tmp_path / "huge.png")], capture_output=True, text=True, check=True
    )
    growth_mib = int(measured.stdout) / 1024
    assert growth_mib < 0.6 * 8000 * 8000 * 8 / 2**20, growth_mib


@pytest.mark.parametrize("format", ["JPEG", "PNG"])
def test_exif_orientation_turns_the_image_as_datasets_does(format):
    """Issue 24: the scores saw a photo on its side while training on the subset (datasets applies the EXIF
    orientation) saw it upright. Orientation 6: the camera was turned; the picture is shown turned 90 degrees."""
    picture = np.zeros((20, 40, 3), dtype=np.uint8)
    picture[:, 20:] = 255  # dark on the left, bright on the right, as stored
    exif = PILImage.Exif()
    exif[PILImage.ExifTags.Base.Orientation] = 6
    data = _encode(PILImage.fromarray(picture), format, exif=exif.tobytes())
    image, reason = decode_rgb({"bytes": data, "path": None})
    assert reason == "" and image.size == (20, 40)
    gray = np.asarray(image.convert("L"))
    assert gray[:15].max() < 30 and gray[-15:].min() > 225  # upright: dark on top, bright below
    as_datasets_decodes = Image().decode_example({"bytes": data, "path": None}).convert("RGB")
    assert np.array_equal(np.asarray(image), np.asarray(as_datasets_decodes))


def test_eps_is_refused_and_never_handed_to_ghostscript(monkeypatch):
    """Issue 24: PIL renders EPS (and PostScript) by running Ghostscript where it is installed: an outside
    interpreter reading untrusted files. The row is flagged with the reason, and Ghostscript is never called."""
    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: calls.append(args))
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)  # as where it is installed
    image, reason = decode_rgb({"bytes": _encode(_noise(), format="EPS"), "path": None})
    assert image is None and reason.startswith("image is EPS, which needs an outside interpreter")
    assert calls == []


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
