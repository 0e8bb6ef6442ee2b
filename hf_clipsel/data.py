"""Load the source dataset, find its image and label columns, give every row a stable id, check labels.

The source is never modified: every function returns new datasets, and the subsets written later are drawn
from the source exactly as it was loaded.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, Image, IterableDataset, Value, load_dataset, load_from_disk
from PIL import Image as PILImage
from PIL import ImageOps
from PIL.JpegImagePlugin import JpegImageFile

from .class_names import prompt_names, read_class_names_file
from .configs import DataConfig
from .hub_access import check_hub_reachable

logger = logging.getLogger(__name__)

ROW_ID = "row_id"
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "class", "target")
HUGE_SIDE = 4096  # pixels; images with a longer side are reduced as they are decoded (JPEG) or right after...
DRAFT_SIDE = 1024  # ...to a scale that keeps both sides at least this long, so a batch holds small images only
# Formats PIL renders by running an outside interpreter (Ghostscript): never handed to one, whatever is installed.
INTERPRETED_FORMATS = ("EPS", "PS", "PDF")
# Rows of a huge image converted at once where its mode cannot be reduced first (16-bit, palette, bilevel): about this
# many pixels a band, so that converting never holds more than a band at a wider type (float64 for 16-bit).
BAND_PIXELS = 1 << 22
DATA_FILE_TYPES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


@dataclass
class Source:
    """The loaded source dataset and what hf_clipsel needs to know about it."""

    dataset: Dataset | IterableDataset  # exactly as loaded, with every original column
    image_column: str
    label_column: str
    class_names: list[str]
    labels: np.ndarray  # int64[N]; -1 where the label is missing or names no class
    label_problems: list[str]  # "" for a usable label, else why the row cannot be scored
    given_labels: list[str]  # each row's label as the source gives it, as text ("" when missing)
    in_memory_fingerprint: str | None = None  # the `datasets` fingerprint of a source passed in memory, else None
    readable_names: list[str] | None = None  # what the prompts say for WordNet-id classes (class_names.prompt_names)
    # A stream's rows in each of its shards, in order, counted by the label pass (None: not streamed, max_samples
    # set, or one shard); what lets each process read its own shards (hf_clipsel.streaming.stream_share).
    shard_rows: list[int] | None = None

    @property
    def prompt_names(self) -> list[str]:
        """The class names the prompts say: readable names for WordNet ids, else ``class_names`` as they are."""
        return self.readable_names or self.class_names

    @property
    def num_rows(self) -> int:
        return len(self.labels)

    @property
    def description(self) -> str | None:
        """How the run names a source passed in memory (it has no dataset_name); None for a named one."""
        return f"in-memory Dataset (fingerprint {self.in_memory_fingerprint})" if self.in_memory_fingerprint else None


def load_source(config: DataConfig, dataset: Dataset | IterableDataset | None = None) -> Dataset:
    """Load ``config.dataset_name``: a `save_to_disk` directory, a folder or file of data files, or a Hub id; or take
    ``dataset``, a `datasets.Dataset` already in memory (then dataset_name must be unset). ``max_samples`` applies to
    both; the dataset given is never modified (every step returns a new one)."""
    if dataset is not None:
        return _in_memory(config, dataset)
    if not config.dataset_name:
        raise ValueError("dataset_name is not set; pass --dataset_name with a Hub id, a local directory or a file.")
    try:
        dataset = _load(config)
    except ValueError as error:
        if "corresponds to no data" in str(error):  # datasets' words for an empty split
            raise ValueError(
                f"the dataset {config.dataset_name!r} (split {config.dataset_split!r}) has no rows."
            ) from error
        raise
    if config.streaming and isinstance(dataset, Dataset):  # a save_to_disk folder is on disk already
        dataset = dataset.to_iterable_dataset()
    if config.max_samples is not None:
        if isinstance(dataset, IterableDataset):
            dataset = dataset.take(config.max_samples)
        else:
            dataset = dataset.select(range(min(config.max_samples, len(dataset))))
    return dataset


def _in_memory(config: DataConfig, dataset) -> Dataset:
    """The checks of a source passed in memory; a run names it by its fingerprint, so it must have one."""
    if config.dataset_name:
        raise ValueError(
            f"both a dataset and dataset_name={config.dataset_name!r} were given; pass one of them (dataset_name: "
            "null to select from the dataset in memory)."
        )
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            "an IterableDataset has no fingerprint that would identify the run (and name its embedding cache): pass "
            "a Dataset (e.g. `Dataset.from_generator(lambda: iter(stream), features=stream.features)`), or name the "
            "stream with dataset_name and streaming: true."
        )
    if not isinstance(dataset, Dataset):
        raise ValueError(f"dataset must be a datasets.Dataset, not {type(dataset).__name__}.")
    if config.streaming:
        raise ValueError("the dataset given is in memory already: drop streaming (it is for named sources).")
    if config.max_samples is not None:
        dataset = dataset.select(range(min(config.max_samples, len(dataset))))
    return dataset


def _load(config: DataConfig) -> Dataset:
    name = config.dataset_name
    path = Path(name)
    if path.is_dir() and (path / "dataset_info.json").exists() and (path / "state.json").exists():
        if not json.loads((path / "state.json").read_text()).get("_data_files", [None]):
            # datasets' load_from_disk fails with an IndexError on the empty dataset save_to_disk writes
            raise ValueError(f"the dataset {name!r} has no rows (save_to_disk wrote no data files).")
        dataset = load_from_disk(str(path))
        if not isinstance(dataset, Dataset):
            dataset = dataset[config.dataset_split]
    elif path.is_file():
        builder = DATA_FILE_TYPES.get(path.suffix)
        if builder is None:
            raise ValueError(f"cannot read {name}: expected one of {', '.join(DATA_FILE_TYPES)} files.")
        dataset = load_dataset(
            builder,
            data_files={config.dataset_split: str(path)},
            split=config.dataset_split,
            streaming=config.streaming,
        )
    else:
        # A Hub id or a local directory: `load_dataset` infers parquet, arrow and image folders from the files.
        check_hub_reachable(name, "load the dataset")
        dataset = load_dataset(
            name,
            config.dataset_config_name,
            split=config.dataset_split,
            revision=config.dataset_revision,
            streaming=config.streaming,
        )
    return dataset


def _is_string_column(dataset: Dataset, column: str) -> bool:
    feature = (dataset.features or {}).get(column)
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def detect_image_column(dataset: Dataset, image_column: str | None = None) -> str:
    if image_column is not None:
        if image_column not in dataset.column_names:
            raise ValueError(f"image_column={image_column!r} is not a column; columns: {dataset.column_names}.")
        if not isinstance(dataset.features[image_column], Image):
            raise ValueError(
                f"column {image_column!r} is {dataset.features[image_column]}, neither an Image feature nor a column "
                "of image file paths; name the column that holds the images with --image_column."
            )
        return image_column
    for name, feature in dataset.features.items():
        if isinstance(feature, Image):
            return name
    raise ValueError(f"no Image column among {dataset.column_names}; pass --image_column or cast one to Image().")


def detect_label_column(dataset: Dataset, label_column: str | None = None) -> str:
    if label_column is not None:
        if label_column not in dataset.column_names:
            raise ValueError(f"label_column={label_column!r} is not a column; columns: {dataset.column_names}.")
        return label_column
    for name, feature in dataset.features.items():
        if isinstance(feature, ClassLabel):
            return name
    for name in LABEL_COLUMN_NAMES:
        if name in dataset.column_names:
            return name
    if all(isinstance(feature, Image) for feature in dataset.features.values()):  # an image folder without labels
        raise ValueError(
            "the images have no labels: an image folder gets them from the folder each image is in, and only when "
            "every image lies at the same depth in a folder named after its class (<folder>/<class name>/<image>); "
            "move the images so, or give a dataset with a label column (--label_column names it)."
        )
    raise ValueError(
        f"no label column found among {dataset.column_names}: hf_clipsel needs a labelled dataset. Pass "
        "--label_column with the column that holds each image's class."
    )


def resolve_labels(dataset: Dataset, label_column: str, class_names: list[str] | None, raw: list | None = None):
    """Return (class_names, int64 labels with -1 for missing or out of range, per-row problem text, each row's label
    as given, as text). ``raw``: the label column's values, when read already (:func:`stream_labels_by_shard`)."""
    feature = dataset.features[label_column]
    if raw is None and isinstance(dataset, IterableDataset):  # one pass over the label column only
        raw = [row[label_column] for row in dataset.select_columns([label_column])]
    elif raw is None:
        raw = dataset[label_column][:]
    if isinstance(feature, ClassLabel):
        names = list(class_names) if class_names else list(feature.names)
        if class_names and len(class_names) != feature.num_classes:
            raise ValueError(
                f"{len(class_names)} class_names given but the ClassLabel feature has {feature.num_classes} classes."
            )
        labels = raw
    elif isinstance(feature, Value) and feature.dtype.startswith(("int", "uint")):
        if not class_names:
            raise ValueError(
                f"label column {label_column!r} holds integers without class names; pass --class_names in label "
                "order (the prompts need them), or cast the column to a ClassLabel."
            )
        names, labels = list(class_names), raw
    elif isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        raw = [None if v is None or not v.strip() else v for v in raw]  # an empty label names no class: missing
        names = list(class_names) if class_names else sorted({v for v in raw if v is not None})
        index = {name: i for i, name in enumerate(names)}
        labels = [None if v is None else index.get(v, len(names)) for v in raw]
    else:
        raise ValueError(f"label column {label_column!r} has type {feature}; expected ClassLabel, int or string.")
    if not names:
        raise ValueError(f"label column {label_column!r} defines no classes.")

    problems = []
    array = np.full(len(labels), -1, dtype=np.int64)
    for row, label in enumerate(labels):
        if label is None or label == -1:
            problems.append("label missing")
        elif not 0 <= label < len(names):
            problems.append(f"label {raw[row]!r} outside the {len(names)} classes")
        else:
            problems.append("")
            array[row] = label
    texts = {}  # one string object per distinct label: at 13M rows a pointer a row, not a string a row (0.7 GiB)
    return names, array, problems, ["" if value is None else texts.setdefault(value, str(value)) for value in raw]


def prepare_source(dataset: Dataset, config: DataConfig, warn: bool = True) -> Source:
    """Find columns, class names and labels; rows with unusable labels are flagged, not dropped. ``warn``: say what
    is odd about the data (under several processes, only the main one says it). Without ``config.dataset_name`` the
    dataset is one passed in memory (:func:`load_source`), named by its fingerprint."""
    if dataset.features is None:
        raise ValueError(
            f"the stream {config.dataset_name!r} does not declare its features; load it without "
            "--streaming, or cast its columns first."
        )
    fingerprint = None if config.dataset_name else dataset._fingerprint
    name = repr(config.dataset_name) if config.dataset_name else "given in memory"
    if config.image_column and _is_string_column(dataset, config.image_column):
        # A column of file paths named as the images (a CSV of file names, say): read them as images.
        _refuse_urls(dataset, config.image_column)
        dataset = dataset.cast_column(config.image_column, Image())
    image_column = detect_image_column(dataset, config.image_column)
    label_column = detect_label_column(dataset, config.label_column)
    named = config.class_names or (read_class_names_file(config.class_names_file) if config.class_names_file else None)
    raw, shard_rows = None, None
    if isinstance(dataset, IterableDataset) and config.max_samples is None and dataset.num_shards > 1:
        raw, shard_rows = stream_labels_by_shard(dataset, label_column)  # `take` (max_samples) would not shard
    class_names, labels, problems, given = resolve_labels(dataset, label_column, named, raw)
    if len(labels) == 0:
        raise ValueError(f"the dataset {name} (split {config.dataset_split!r}) has no rows.")
    flagged = sum(bool(p) for p in problems)
    if flagged == len(problems):
        raise ValueError(f"no row of {name} has a usable label (first problem: {problems[0]}).")
    if flagged and warn:
        logger.warning("%d of %d rows have an unusable label and are kept out of selection.", flagged, len(labels))
    if len(class_names) == 1 and warn:
        logger.warning(
            "the dataset has one class (%r): CLIP's class posterior is 1 for every row and its preferred class is "
            "always the label, so the alignment term and the diversity gate cannot tell rows apart; only the "
            "semantic alignment, the diversity and the damage check do.",
            class_names[0],
        )
    readable = prompt_names(class_names, warn=warn)
    return Source(
        dataset, image_column, label_column, class_names, labels, problems, given, fingerprint, readable, shard_rows
    )


def stream_labels_by_shard(stream: IterableDataset, label_column: str) -> tuple[list, list[int]]:
    """A stream's label column read shard after shard (the stream's own order: its shards are its data files, read in
    turn), and the rows of each shard: one pass, as reading it whole would be."""
    labels_only = stream.select_columns([label_column])
    raw, shard_rows = [], []
    for index in range(stream.num_shards):
        shard = [row[label_column] for row in labels_only.shard(stream.num_shards, index, contiguous=True)]
        raw.extend(shard)
        shard_rows.append(len(shard))
    return raw, shard_rows


def _refuse_urls(dataset: Dataset | IterableDataset, column: str, sample: int = 100) -> None:
    """Refuse a column of image URLs: images are read from files and bytes, never fetched from the web."""
    if isinstance(dataset, IterableDataset):
        values = [row[column] for row in itertools.islice(dataset.select_columns([column]), sample)]
    else:
        values = dataset.select_columns([column])[:sample][column]
    url = next((value for value in values if isinstance(value, str) and "://" in value), None)
    if url is not None:
        raise ValueError(
            f"column {column!r} holds URLs ({url}): hf_clipsel reads images from local files or bytes and never "
            "fetches them; download the images first and give their local paths."
        )


def with_row_ids(dataset: Dataset) -> Dataset:
    """The dataset with an int64 ``row_id`` column: the row's position in the source, carried everywhere."""
    if ROW_ID in dataset.column_names:
        raise ValueError(f"the source already has a {ROW_ID!r} column; rename it before selecting.")
    return dataset.add_column(ROW_ID, np.arange(len(dataset), dtype=np.int64), feature=Value("int64"))


def decode_rgb(image: dict | None, draft_size: tuple[int, int] | None = None) -> tuple[PILImage.Image | None, str]:
    """Decode one undecoded ``Image`` cell ({"bytes", "path"}) to RGB; return (image, "") or (None, reason).

    Greyscale, palette, CMYK, 16-bit and transparent images are converted (transparency onto white), and turned
    upright by their EXIF orientation, as ``datasets`` decodes them for training; a file that is empty, truncated,
    not an image, a decompression bomb (PIL's limit), or in a format that needs an outside interpreter (EPS,
    PostScript, PDF) is flagged with the reason.
    ``draft_size`` (width, height): a JPEG at least twice that size is decoded at the smallest of the decoder's
    reduced scales (1/2, 1/4, 1/8) that keeps both sides at least that long (``jpeg_draft``).
    """
    if image is None:
        return None, "image missing"
    if not image.get("bytes") and not image.get("path"):
        return None, "image is empty (no bytes, no path)"
    try:
        source = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
        with PILImage.open(source) as opened:
            if opened.format in INTERPRETED_FORMATS:  # before load(): loading is what would run Ghostscript
                return None, (
                    f"image is {opened.format}, which needs an outside interpreter (Ghostscript) to render; "
                    "convert it to PNG or JPEG first"
                )
            # JpegImageFile includes MPO, the multi-picture JPEG many cameras and phones write.
            if isinstance(opened, JpegImageFile):
                huge = max(opened.size) > HUGE_SIDE
                # Let the JPEG decoder scale down by a power of two (it skips the finest DCT frequencies): a
                # 100-megapixel photo costs a fraction of the time and memory, and CLIP sees 224 pixels of it anyway.
                target = draft_size or ((DRAFT_SIDE, DRAFT_SIDE) if huge else None)
                if target:
                    opened.draft("RGB", target)
            opened.load()
            orientation = opened.getexif().get(PILImage.ExifTags.Base.Orientation)
            rgb = _reduced_rgb(opened)
            if orientation is not None:  # after the reduction: fewer pixels to turn
                rgb.getexif()[PILImage.ExifTags.Base.Orientation] = orientation
                rgb = ImageOps.exif_transpose(rgb)
            return rgb, ""
    except Exception as error:  # any decoder failure flags the row; the run goes on
        # PIL names the in-memory file by its address; drop it so that reruns give identical reasons.
        message = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the image bytes", str(error))
        return None, f"image failed to decode: {type(error).__name__}: {message}"


def _reduced_rgb(image: PILImage.Image) -> PILImage.Image:
    """RGB, and a huge image (a PNG or TIFF has no reduced-scale decoding) shrunk by an integer box filter before it
    is converted, so that a batch holds DRAFT_SIDE-scale images only, whatever it is given (CLIP sees 224 pixels
    anyway), and converting never copies the full-size pixels."""
    factor = min(image.size) // DRAFT_SIDE
    if max(image.size) <= HUGE_SIDE or factor < 2:
        return _to_rgb(image)
    try:
        return _to_rgb(image.reduce(factor))
    except ValueError:  # modes reduce() does not take (16-bit, palette, bilevel): a band of rows at a time
        width, height = image.size
        rows = max(BAND_PIXELS // width // factor, 1) * factor  # a multiple of the factor: the same boxes as reduce()
        reduced = PILImage.new("RGB", (-(-width // factor), -(-height // factor)))
        for top in range(0, height, rows):
            band = _to_rgb(image.crop((0, top, width, min(top + rows, height))))
            reduced.paste(band.reduce(factor), (0, top // factor))
        return reduced


def _to_rgb(image: PILImage.Image) -> PILImage.Image:
    if image.mode.startswith("I;16"):
        # 16-bit greyscale: map 0..65535 onto 0..255 (round(v / 257), in integers: 4 bytes a pixel, not float64's 8);
        # a plain convert("RGB") would clip most pixels to white.
        image = PILImage.fromarray(((np.asarray(image).astype(np.uint32) + 128) // 257).astype(np.uint8))
    elif image.mode in ("I", "F"):
        # 32-bit integer or float greyscale has no fixed range: stretch what is there to 0..255.
        array = np.asarray(image, dtype=np.float64)
        low, high = array.min(), array.max()
        image = PILImage.fromarray(((array - low) / ((high - low) or 1.0) * 255).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels onto white, as a viewer shows them; dropping alpha would expose arbitrary colours.
        rgba = image.convert("RGBA")
        background = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PILImage.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def class_prompts(class_names: list[str], templates: list[str]) -> list[list[str]]:
    """Prompts per template, then per class: ``prompts[t][c]``."""
    return [[template.format(name.replace("_", " ")) for name in class_names] for template in templates]
