"""The interactive part of the report page: every row, filtered, sorted and looked at one by one, in the browser.

    report/data/                   the scores as paged typed columns (report_page_data)
    report/images/<k>/<row>.webp   THUMBNAIL_SIDE-pixel thumbnails, k = row_id // 1000 (lazily loaded by the page)

The page (hf_clipsel/templates/report_page.html, .js and .css, i.e. model_cards/ in the repository; inlined into
report/index.html) is vanilla JavaScript with no
CDN and no server: it opens by ``file://`` and from any static host. It shows a grid of thumbnails with filters
(ratio, class, kept or dropped, drop reason, damage, given label differs from CLIP's, duplicate group when the scores
have ``duplicate_group``), sorting by each score, counts of kept and dropped rows per class and per reason for the
current filter, and a row's details (every score with its meaning, the labels, why each ratio kept or dropped it).

Thumbnails: ``"all"`` writes one per row; ``"sample"`` (the default) does so up to SAMPLE_ALL_UP_TO rows and beyond
that writes, for every ratio, up to SAMPLE_PER_GROUP rows (at random, fixed seed) of each class and outcome (kept,
or each drop reason), so that every cell of the page's counts has images to look at.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from importlib.resources import files
from pathlib import Path

import numpy as np
import pyarrow as pa
from jinja2 import Environment, StrictUndefined
from markupsafe import Markup
from PIL import Image as PILImage

from .core.names import drop_reason_column, selected_column, selected_ratios
from .report_page_data import DATA_DIR, DUPLICATE_GROUP, MANIFEST, ScoreColumn, write_data
from .scores_table import read_scores_in

logger = logging.getLogger(__name__)

IMAGES_DIR = "images"
THUMBNAIL_SIDE = 96  # pixels; small images (CIFAR's 32) are enlarged by whole steps without smoothing
THUMBNAIL_FORMAT = "webp"
THUMBNAIL_QUALITY = 80
THUMBNAIL_MODES = ("sample", "all")
SAMPLE_ALL_UP_TO = 20_000  # rows: below this, "sample" writes every thumbnail
SAMPLE_PER_GROUP = 3
ROWS_PER_FOLDER = 1_000  # so that no folder of a large run holds more than this many thumbnails
TEMPLATE_DIR = "templates"
TEMPLATE, SCRIPT, STYLE = "report_page.html", "report_page.js", "report_page.css"

# (row ids) -> one RGB image or None (it did not decode) per id, in that order
ImageReader = Callable[[list[int]], list[PILImage.Image | None]]


def thumbnail_path(row_id: int) -> str:
    """A row's thumbnail, relative to report/ (the page's script builds the same path)."""
    return f"{IMAGES_DIR}/{row_id // ROWS_PER_FOLDER}/{row_id}.{THUMBNAIL_FORMAT}"


def sample_rows(table: pa.Table, mode: str, seed: int = 0) -> np.ndarray:
    """Bool per row of the scores ``table``: whether it gets a thumbnail (see the module doc for ``mode``)."""
    if mode not in THUMBNAIL_MODES:
        raise ValueError(f"thumbnails must be one of {THUMBNAIL_MODES}, not {mode!r}.")
    num_rows = len(table)
    if mode == "all" or num_rows <= SAMPLE_ALL_UP_TO:
        return np.ones(num_rows, dtype=bool)
    order = np.random.default_rng(seed).permutation(num_rows)  # a random pick within each group
    labels = table.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
    chosen = np.zeros(num_rows, dtype=bool)
    for ratio in selected_ratios(table.column_names):
        reasons = table.column(drop_reason_column(ratio)).combine_chunks().dictionary_encode().indices.to_numpy()
        kept = table.column(selected_column(ratio)).to_numpy(zero_copy_only=False).astype(bool)
        outcome = np.where(kept, 0, reasons.astype(np.int64) + 1)
        group = (labels[order] + 1) * (int(outcome.max()) + 1) + outcome[order]
        by_group = np.argsort(group, kind="stable")
        sorted_groups = group[by_group]
        first_of_group = np.searchsorted(sorted_groups, sorted_groups, side="left")
        rank = np.arange(num_rows) - first_of_group  # place of the row within its group, in the random order
        chosen[order[by_group[rank < SAMPLE_PER_GROUP]]] = True
    return chosen


def fit_thumbnail(image: PILImage.Image, side: int = THUMBNAIL_SIDE) -> PILImage.Image:
    """Fit into ``side`` pixels: enlarge tiny images by whole steps without smoothing, shrink big ones."""
    scale = side / max(image.size)
    if scale >= 2:
        factor = int(scale)
        return image.resize((image.width * factor, image.height * factor), PILImage.NEAREST)
    if scale < 1:
        image = image.copy()
        image.thumbnail((side, side), PILImage.LANCZOS)
    return image


def source_reader(source) -> ImageReader:
    """An :data:`ImageReader` over the run's source: ``(dataset, image_column)`` as report.load_gallery_source
    gives it."""
    from datasets import Image

    from .data import decode_rgb

    dataset, image_column = source
    undecoded = dataset.cast_column(image_column, Image(decode=False))

    def read(row_ids: list[int]) -> list[PILImage.Image | None]:
        return [decode_rgb(cell)[0] for cell in undecoded.select(row_ids)[image_column]]

    return read


def write_thumbnails(
    report_dir: Path, row_ids: np.ndarray, read_images: ImageReader | None, batch_size: int = 512
) -> np.ndarray:
    """Write the thumbnail of each of ``row_ids``; return a bool per id, whether it was written (its image
    decoded). ``read_images`` None (no source) writes none."""
    written = np.zeros(len(row_ids), dtype=bool)
    if read_images is None:
        return written
    for start in range(0, len(row_ids), batch_size):
        batch = [int(row) for row in row_ids[start : start + batch_size]]
        for offset, (row_id, image) in enumerate(zip(batch, read_images(batch))):
            if image is None:
                continue
            path = report_dir / thumbnail_path(row_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            fit_thumbnail(image).save(path, quality=THUMBNAIL_QUALITY)
            written[start + offset] = True
    return written


def _template_text(name: str) -> str:
    return files("hf_clipsel").joinpath(TEMPLATE_DIR, name).read_text(encoding="utf-8")


def render_explorer(manifest: dict) -> Markup:
    """The page's explorer section (markup, its style and script inlined), for report/index.html's template."""
    environment = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    template = environment.from_string(_template_text(TEMPLATE))
    script = _template_text(SCRIPT)
    if "</script" in script.lower():
        raise ValueError(f"{SCRIPT} must not contain '</script': it is inlined into the page.")
    return Markup(
        template.render(
            manifest=manifest,
            manifest_path=f"{DATA_DIR}/{MANIFEST}",
            style=Markup(_template_text(STYLE)),
            script=Markup(script),
            has_duplicates=DUPLICATE_GROUP in manifest["columns"],
        )
    )


def write_page(
    output_dir: str | Path,
    report_dir: str | Path,
    read_images: ImageReader | None,
    thumbnails: str = "sample",
    score_columns: Sequence[ScoreColumn] | None = None,
) -> Markup:
    """Write the explorer's data and thumbnails into ``report_dir`` and return its section of the page.

    Args:
        output_dir: a run folder (or one being written) holding scores/ with a selection.
        report_dir: the report folder being written (report/ or its staging copy).
        read_images: reads the source's images by row id (:func:`source_reader`); None: placeholders only.
        thumbnails: ``"sample"`` or ``"all"`` (see the module doc).
        score_columns: the numeric columns to show and sort by: (name, meaning, range); default: every registered
            score's.

    Returns:
        The explorer's HTML (style and script inlined); it loads data/manifest.js and the chunks it names.
    """
    scores = read_scores_in(output_dir)
    table = scores.data.table
    class_names = list(getattr(scores.features["label"], "names", []))
    report_dir = Path(report_dir)
    wanted = sample_rows(table, thumbnails)
    row_ids = table.column("row_id").to_numpy(zero_copy_only=False).astype(np.int64)
    has_thumbnail = np.zeros(len(table), dtype=bool)
    has_thumbnail[wanted] = write_thumbnails(report_dir, row_ids[wanted], read_images)
    logger.info("report page: %d thumbnails of %d rows (%s)", has_thumbnail.sum(), len(table), thumbnails)
    folder = {"folder": IMAGES_DIR, "per_folder": ROWS_PER_FOLDER, "side": THUMBNAIL_SIDE}
    manifest = write_data(
        table,
        class_names,
        report_dir,
        has_thumbnail,
        {**folder, "format": THUMBNAIL_FORMAT, "mode": thumbnails},
        score_columns,
    )
    return render_explorer(manifest)
