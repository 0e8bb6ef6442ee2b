"""Seeded label noise and image corruptions for robustness experiments.

Each injector takes a `datasets.Dataset`, returns a NEW dataset plus a record of what it changed, and never
modifies its input. The record is a `Dataset` with one row per changed row: `row_id`, `noise`, `original_label`,
`new_label`, `corruption`, `severity`; after a selection run, joining it on `row_id` tells how many noisy rows
were removed. `row_id` is the dataset's own `row_id` column when it has one, else the row's position.

How many rows change: exactly round(fraction * N) with halves rounded up, computed on the decimal reading of
`fraction` (0.15 * 10 gives 2, never 1 from a float artefact). N is the number of rows, except for asymmetric
noise, where N counts only the rows whose class has a flip target (the usual convention: "40% asymmetric noise"
flips 40% of the truck, bird, deer, cat and dog images of CIFAR-10). Which rows change is drawn uniformly
without replacement from a generator seeded with (seed, injector), so the same seed gives the same rows, and
label noise and corruptions applied with one seed do not pick correlated rows.

    python -m hf_clipsel.benchmarking.noise --dataset uoft-cs/cifar10 --output_dir noisy --symmetric 0.2
    python -m hf_clipsel.benchmarking.noise --dataset parquet --data_dir path/to/cifar10 --output_dir noisy \
        --symmetric 0.2
"""

from __future__ import annotations

import argparse
import io
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, Features, Image, Value, concatenate_datasets, load_dataset
from datasets.fingerprint import Hasher
from PIL import Image as PILImage
from PIL import ImageFilter

# The standard CIFAR-10 asymmetric flips (Patrini et al., 2017): visually similar classes.
CIFAR10_ASYMMETRIC = {"truck": "automobile", "bird": "airplane", "deer": "horse", "cat": "dog", "dog": "cat"}

# Severity 1..5 parameters of Hendrycks & Dietterich (2019): CIFAR-10-C and ImageNet-C.
CORRUPTION_PARAMETERS = {
    "cifar": {
        "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # noise std on [0, 1] pixels
        "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # blur sigma in pixels
        "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # contrast factor around the per-channel mean
        "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
        "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # downscale factor
    },
    "imagenet": {
        "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
        "gaussian_blur": (1, 2, 3, 4, 6),
        "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
        "jpeg_compression": (25, 18, 15, 10, 7),
        "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
    },
}
CORRUPTIONS = tuple(CORRUPTION_PARAMETERS["cifar"])
_STREAMS = {"symmetric_label": 1, "asymmetric_label": 2, "corruption": 3}


def num_noisy(fraction: float, num_rows: int) -> int:
    """round(fraction * num_rows), halves up, on the decimal reading of ``fraction`` (in [0, 1])."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}.")
    return math.floor(Fraction(str(fraction)) * num_rows + Fraction(1, 2))


def _choose(kind: str, seed: int, candidates: np.ndarray, fraction: float) -> tuple[np.ndarray, np.random.Generator]:
    rng = np.random.default_rng([seed, _STREAMS[kind]])
    rows = rng.choice(candidates, size=num_noisy(fraction, len(candidates)), replace=False)
    return np.sort(rows), rng


def _column(dataset: Dataset, name: str) -> np.ndarray:
    return np.asarray(dataset.select_columns([name]).with_format("numpy")[name])


def _row_ids(dataset: Dataset) -> np.ndarray:
    return _column(dataset, "row_id") if "row_id" in dataset.column_names else np.arange(len(dataset))


def _class_label(dataset: Dataset, label_column: str) -> ClassLabel | None:
    feature = dataset.features[label_column]
    return feature if isinstance(feature, ClassLabel) else None


def _record(dataset, label_column, rows, original, new, kind, corruption=None, severity=None) -> Dataset:
    label_feature = dataset.features[label_column] if label_column in dataset.column_names else Value("int64")
    features = Features(
        row_id=Value("int64"),
        noise=Value("string"),
        original_label=label_feature,
        new_label=label_feature,
        corruption=Value("string"),
        severity=Value("int64"),
    )
    return Dataset.from_dict(
        {
            "row_id": _row_ids(dataset)[rows].tolist(),
            "noise": [kind] * len(rows),
            "original_label": list(original),
            "new_label": list(new),
            "corruption": [corruption] * len(rows),
            "severity": [severity] * len(rows),
        },
        features=features,
    )


def _flag_features(dataset: Dataset, label_column: str | None, corruption: bool = False) -> Features:
    features = dataset.features.copy()
    if label_column is not None and "clean_label" not in features:
        features["clean_label"] = dataset.features[label_column]
    features["is_noisy"] = Value("bool")
    if corruption:
        features["corruption"] = Value("string")
    return features


def _relabel_batch(batch, indices, label_column, new_labels, noisy, add_noise_columns):
    out = {label_column: new_labels[indices].tolist()}
    if add_noise_columns:
        # A second injector keeps the first one's clean label and OR-s its flag.
        out["clean_label"] = batch.get("clean_label", batch[label_column])
        out["is_noisy"] = (np.asarray(batch.get("is_noisy", False), dtype=bool) | noisy[indices]).tolist()
    return out


def _relabel(dataset, label_column, rows, new_labels, kind, fingerprint_args, add_noise_columns):
    noisy = np.zeros(len(dataset), dtype=bool)
    noisy[rows] = True
    features = _flag_features(dataset, label_column) if add_noise_columns else dataset.features
    noisy_dataset = dataset.map(
        _relabel_batch,
        batched=True,
        with_indices=True,
        fn_kwargs=dict(
            label_column=label_column, new_labels=new_labels, noisy=noisy, add_noise_columns=add_noise_columns
        ),
        features=features,
        new_fingerprint=Hasher.hash([dataset._fingerprint, kind, *fingerprint_args, add_noise_columns]),
        desc=f"Injecting {kind} noise",
    )
    labels = _column(dataset, label_column)
    return noisy_dataset, _record(dataset, label_column, rows, labels[rows], new_labels[rows], kind)


def symmetric_label_noise(
    dataset: Dataset,
    fraction: float,
    *,
    seed: int = 0,
    label_column: str = "label",
    num_classes: int | None = None,
    add_noise_columns: bool = False,
) -> tuple[Dataset, Dataset]:
    """Give round(fraction * N) rows a label drawn uniformly from the OTHER classes.

    ``num_classes`` defaults to the label column's ClassLabel. ``add_noise_columns`` adds `clean_label` and
    `is_noisy`. Returns (noisy dataset, record).
    """
    labels = _column(dataset, label_column)
    class_label = _class_label(dataset, label_column)
    num_classes = num_classes or (class_label.num_classes if class_label else None)
    if num_classes is None or num_classes < 2:
        raise ValueError("symmetric noise needs >= 2 classes: give num_classes or use a ClassLabel column.")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}).")
    rows, rng = _choose("symmetric_label", seed, np.arange(len(labels)), fraction)
    new_labels = labels.copy()
    # Adding 1..C-1 modulo C moves to each other class with probability 1/(C-1), never to the same one.
    new_labels[rows] = (labels[rows] + rng.integers(1, num_classes, size=len(rows))) % num_classes
    args = (fraction, seed, label_column, num_classes)
    return _relabel(dataset, label_column, rows, new_labels, "symmetric_label", args, add_noise_columns)


def _flip_targets(mapping, class_label: ClassLabel | None, num_classes: int) -> np.ndarray:
    names = class_label.names if class_label else None
    if mapping is None:
        is_cifar10 = names is not None and set(CIFAR10_ASYMMETRIC) | set(CIFAR10_ASYMMETRIC.values()) <= set(names)
        mapping = CIFAR10_ASYMMETRIC if is_cifar10 else {c: (c + 1) % num_classes for c in range(num_classes)}

    def class_id(value) -> int:
        if isinstance(value, str):
            if names is None or value not in names:
                raise ValueError(f"unknown class name {value!r} in the flip mapping.")
            return names.index(value)
        if not 0 <= int(value) < num_classes:
            raise ValueError(f"class id {value} in the flip mapping is outside [0, {num_classes}).")
        return int(value)

    targets = np.full(num_classes, -1)
    for source, target in mapping.items():
        if class_id(source) != class_id(target):
            targets[class_id(source)] = class_id(target)
    return targets


def asymmetric_label_noise(
    dataset: Dataset,
    fraction: float,
    mapping: dict | None = None,
    *,
    seed: int = 0,
    label_column: str = "label",
    num_classes: int | None = None,
    add_noise_columns: bool = False,
) -> tuple[Dataset, Dataset]:
    """Flip round(fraction * M) labels along ``mapping``, M = number of rows whose class has a flip target.

    ``mapping`` maps source class to target class, by name or id. Default: the CIFAR-10 flips
    (truck->automobile, bird->airplane, deer->horse, cat<->dog) when the ClassLabel has those names, else every
    class to the next one (c -> c+1 mod C). Rows are drawn uniformly from all flippable rows, so per-class counts
    vary around fraction * class size. Returns (noisy dataset, record).
    """
    labels = _column(dataset, label_column)
    class_label = _class_label(dataset, label_column)
    num_classes = num_classes or (class_label.num_classes if class_label else None)
    if num_classes is None:
        raise ValueError("give num_classes when the label column is not a ClassLabel.")
    targets = _flip_targets(mapping, class_label, num_classes)
    flippable = np.flatnonzero(targets[labels] >= 0)
    rows, _ = _choose("asymmetric_label", seed, flippable, fraction)
    new_labels = labels.copy()
    new_labels[rows] = targets[labels[rows]]
    args = (fraction, seed, label_column, targets.tolist())
    return _relabel(dataset, label_column, rows, new_labels, "asymmetric_label", args, add_noise_columns)


def apply_corruption(
    image: PILImage.Image,
    corruption: str,
    severity: int,
    rng: np.random.Generator | None = None,
    parameters: str = "cifar",
) -> PILImage.Image:
    """One corruption of Hendrycks & Dietterich at ``severity`` in 1..5 (5 strongest); returns a new PIL image."""
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be in 1..5, got {severity}.")
    c = CORRUPTION_PARAMETERS[parameters][corruption][severity - 1]
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    if corruption == "gaussian_noise":
        x = np.asarray(image, dtype=np.float64) / 255.0
        rng = rng if rng is not None else np.random.default_rng()
        return PILImage.fromarray(np.uint8(np.clip(x + rng.normal(scale=c, size=x.shape), 0, 1) * 255))
    if corruption == "gaussian_blur":  # PIL's blur radius is the Gaussian's standard deviation
        return image.filter(ImageFilter.GaussianBlur(radius=c))
    if corruption == "contrast":
        x = np.asarray(image, dtype=np.float64) / 255.0
        means = x.mean(axis=(0, 1), keepdims=True)
        return PILImage.fromarray(np.uint8(np.clip((x - means) * c + means, 0, 1) * 255))
    if corruption == "jpeg_compression":
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=c)
        # Copy the pixels out, so nothing downstream re-encodes the image as JPEG a second time.
        return PILImage.fromarray(np.asarray(PILImage.open(buffer)))
    if corruption == "pixelate":
        width, height = image.size
        small = image.resize((max(1, int(width * c)), max(1, int(height * c))), PILImage.BOX)
        return small.resize((width, height), PILImage.BOX)
    raise ValueError(f"unknown corruption {corruption!r}; choose one of {', '.join(CORRUPTIONS)}.")


def _corrupt_batch(batch, indices, image_column, chosen, corruption, severity, seed, parameters, add_noise_columns):
    images = list(batch[image_column])
    for position, index in enumerate(indices):
        if not chosen[index]:
            continue  # untouched rows keep their exact bytes
        encoded = images[position]
        source = io.BytesIO(encoded["bytes"]) if encoded["bytes"] is not None else encoded["path"]
        # One generator per row, so the result does not depend on batch size or num_proc.
        rng = np.random.default_rng([seed, _STREAMS["corruption"], index])
        corrupted = apply_corruption(PILImage.open(source), corruption, severity, rng, parameters)
        buffer = io.BytesIO()
        corrupted.save(buffer, "PNG")  # lossless, so the corruption is stored exactly as made
        images[position] = {"bytes": buffer.getvalue(), "path": None}
    out = {image_column: images}
    if add_noise_columns:
        out["is_noisy"] = (np.asarray(batch.get("is_noisy", False), dtype=bool) | chosen[indices]).tolist()
        earlier = batch.get("corruption", [""] * len(indices))  # a second corruption of a row names itself
        out["corruption"] = [corruption if chosen[i] else before for i, before in zip(indices, earlier)]
    return out


def corrupt_images(
    dataset: Dataset,
    fraction: float,
    corruption: str = "gaussian_noise",
    severity: int = 3,
    *,
    seed: int = 0,
    image_column: str | None = None,
    label_column: str = "label",
    parameters: str = "cifar",
    add_noise_columns: bool = False,
) -> tuple[Dataset, Dataset]:
    """Corrupt the images of round(fraction * N) rows; labels stay as they are.

    ``corruption`` is one of gaussian_noise, gaussian_blur, contrast, jpeg_compression, pixelate; ``severity``
    1..5; ``parameters`` picks the CIFAR-10-C ("cifar", for ~32 px images) or ImageNet-C ("imagenet") constants.
    Corrupted images are stored as PNG. ``add_noise_columns`` adds `is_noisy` and `corruption` (the corruption's
    name, "" for an untouched row). Returns (noisy dataset, record).
    """
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; choose one of {', '.join(CORRUPTIONS)}.")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be in 1..5, got {severity}.")
    if image_column is None:
        image_column = next((k for k, v in dataset.features.items() if isinstance(v, Image)), None)
        if image_column is None:
            raise ValueError("the dataset has no Image column; pass image_column.")
    rows, _ = _choose("corruption", seed, np.arange(len(dataset)), fraction)
    chosen = np.zeros(len(dataset), dtype=bool)
    chosen[rows] = True
    image_feature = dataset.features[image_column]
    raw = dataset.cast_column(image_column, Image(decode=False))
    features = _flag_features(raw, None, corruption=True) if add_noise_columns else raw.features.copy()
    corrupted = raw.map(
        _corrupt_batch,
        batched=True,
        batch_size=256,
        with_indices=True,
        fn_kwargs=dict(
            image_column=image_column,
            chosen=chosen,
            corruption=corruption,
            severity=severity,
            seed=seed,
            parameters=parameters,
            add_noise_columns=add_noise_columns,
        ),
        features=features,
        new_fingerprint=Hasher.hash(
            [raw._fingerprint, "corruption", fraction, corruption, severity, seed, parameters, add_noise_columns]
        ),
        desc=f"Corrupting images ({corruption}, severity {severity})",
    ).cast_column(image_column, image_feature)
    labels = _column(dataset, label_column)[rows] if label_column in dataset.column_names else [None] * len(rows)
    record = _record(dataset, label_column, rows, labels, labels, "corruption", corruption, severity)
    return corrupted, record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a noisy copy of a dataset split plus the record of changes.")
    parser.add_argument("--dataset", required=True, help="load_dataset path: Hub id, local dir, or `parquet`.")
    parser.add_argument("--dataset_config", default=None)
    parser.add_argument("--data_dir", default=None, help="data_dir for load_dataset (e.g. with `parquet`).")
    parser.add_argument("--split", default="train")
    parser.add_argument("--output_dir", required=True)
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--symmetric", type=float, default=None, help="Fraction of rows given a random other label.")
    labels.add_argument("--asymmetric", type=float, default=None, help="Fraction of flippable rows flipped.")
    parser.add_argument("--corruption", choices=CORRUPTIONS, default=None)
    parser.add_argument("--corruption_fraction", type=float, default=0.0)
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--parameters", choices=tuple(CORRUPTION_PARAMETERS), default="cifar")
    parser.add_argument("--label_column", default="label")
    parser.add_argument(
        "--add_noise_columns", action="store_true", help="Add clean_label / is_noisy (/ corruption) columns."
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    dataset = load_dataset(args.dataset, args.dataset_config, data_dir=args.data_dir, split=args.split)
    records = []
    common = dict(seed=args.seed, label_column=args.label_column, add_noise_columns=args.add_noise_columns)
    if args.symmetric is not None:
        dataset, record = symmetric_label_noise(dataset, args.symmetric, **common)
        records.append(record)
    if args.asymmetric is not None:
        dataset, record = asymmetric_label_noise(dataset, args.asymmetric, **common)
        records.append(record)
    if args.corruption is not None:
        dataset, record = corrupt_images(
            dataset, args.corruption_fraction, args.corruption, args.severity, parameters=args.parameters, **common
        )
        records.append(record)
    if not records:
        parser.error("nothing to inject: give --symmetric, --asymmetric or --corruption.")

    output_dir = Path(args.output_dir)
    (output_dir / "data").mkdir(parents=True, exist_ok=True)
    (output_dir / "noise_record").mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(output_dir / "data" / f"{args.split}-00000-of-00001.parquet"))
    record = concatenate_datasets(records)
    record.to_parquet(str(output_dir / "noise_record" / "record-00000-of-00001.parquet"))
    # A dataset card with `configs:` so `load_dataset(output_dir)` gives the noisy split and
    # `load_dataset(output_dir, "noise_record")` the record.
    (output_dir / "README.md").write_text(
        "---\nconfigs:\n"
        f"- config_name: default\n  data_files:\n  - split: {args.split}\n    path: data/{args.split}-*.parquet\n"
        "- config_name: noise_record\n  data_files:\n  - split: train\n    path: noise_record/*.parquet\n---\n"
        f"Noisy copy of `{args.dataset}` ({args.split}) by `python -m hf_clipsel.benchmarking.noise`; see "
        "noise_summary.json.\n"
    )
    summary = {
        "num_rows": len(dataset),
        "num_changed": {r[0]["noise"]: len(r) for r in records if len(r)},
        "args": vars(args),
    }
    (output_dir / "noise_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary["num_changed"]))


if __name__ == "__main__":
    main()
