"""Noise injection: exact counts, records that match the data, seeded determinism, sources left untouched."""

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image, load_dataset

from hf_clipsel.benchmarking import noise
from hf_clipsel.kept_noise import kept_noise

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def cifar(cifar_slice) -> Dataset:
    return load_dataset("parquet", data_files=str(cifar_slice), split="train").select(range(120))


def labels_only(num_rows: int, names=CIFAR_NAMES, seed: int = 0) -> Dataset:
    labels = np.random.default_rng(seed).integers(0, len(names), num_rows)
    return Dataset.from_dict({"label": labels}, features=Features(label=ClassLabel(names=names)))


def labels_of(dataset: Dataset, column: str = "label") -> np.ndarray:
    return np.asarray(dataset[column])


def check_record(source: Dataset, noisy: Dataset, record: Dataset, expected_rows: int) -> np.ndarray:
    """The record lists exactly the rows whose label changed, with the right old and new labels."""
    before, after = labels_of(source), labels_of(noisy)
    changed = np.flatnonzero(before != after)
    assert len(changed) == len(record) == expected_rows
    np.testing.assert_array_equal(record["row_id"], changed)
    np.testing.assert_array_equal(record["original_label"], before[changed])
    np.testing.assert_array_equal(record["new_label"], after[changed])
    assert record.features["new_label"] == source.features["label"]
    return changed


@pytest.mark.parametrize(
    ("fraction", "num_rows", "expected"),
    [(0.15, 10, 2), (0.25, 10, 3), (0.35, 10, 4), (0.57, 50000, 28500), (0.2, 0, 0), (0.0, 7, 0), (1.0, 7, 7)],
)
def test_num_noisy_rounds_half_up_on_the_decimal_fraction(fraction, num_rows, expected):
    assert noise.num_noisy(fraction, num_rows) == expected


def test_num_noisy_rejects_fractions_outside_unit_interval():
    with pytest.raises(ValueError, match="fraction"):
        noise.num_noisy(1.5, 10)


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.37, 1.0])
def test_symmetric_changes_exactly_the_requested_fraction(fraction):
    source = labels_only(503)
    fingerprint, before = source._fingerprint, labels_of(source)
    noisy, record = noise.symmetric_label_noise(source, fraction, seed=3)
    check_record(source, noisy, record, noise.num_noisy(fraction, 503))
    assert set(record["noise"]) <= {"symmetric_label"}
    assert source._fingerprint == fingerprint
    np.testing.assert_array_equal(labels_of(source), before)


def test_symmetric_new_labels_are_uniform_over_the_other_classes():
    source = Dataset.from_dict({"label": [0] * 9000}, features=Features(label=ClassLabel(num_classes=4)))
    _, record = noise.symmetric_label_noise(source, 1.0, seed=0)
    counts = np.bincount(record["new_label"], minlength=4)
    assert counts[0] == 0
    assert np.all(np.abs(counts[1:] - 3000) < 200)  # about 6 standard deviations


def test_seeded_determinism(cifar):
    a, record_a = noise.symmetric_label_noise(cifar, 0.3, seed=7)
    b, record_b = noise.symmetric_label_noise(cifar, 0.3, seed=7)
    _, record_c = noise.symmetric_label_noise(cifar, 0.3, seed=8)
    assert record_a.to_dict() == record_b.to_dict()
    np.testing.assert_array_equal(labels_of(a), labels_of(b))
    assert list(record_a["row_id"]) != list(record_c["row_id"])
    images_a, _ = noise.corrupt_images(cifar, 0.2, "gaussian_noise", 5, seed=7)
    images_b, _ = noise.corrupt_images(cifar, 0.2, "gaussian_noise", 5, seed=7)
    raw = Image(decode=False)
    assert list(images_a.cast_column("img", raw)["img"]) == list(images_b.cast_column("img", raw)["img"])


def test_noise_columns_only_when_asked(cifar):
    plain, _ = noise.symmetric_label_noise(cifar, 0.25, seed=0)
    assert plain.column_names == cifar.column_names
    flagged, record = noise.symmetric_label_noise(cifar, 0.25, seed=0, add_noise_columns=True)
    assert flagged.column_names == [*cifar.column_names, "clean_label", "is_noisy"]
    np.testing.assert_array_equal(flagged["clean_label"], labels_of(cifar))
    np.testing.assert_array_equal(np.flatnonzero(flagged["is_noisy"]), record["row_id"])
    # A second injector keeps the first clean label and accumulates the flag.
    both, record_2 = noise.corrupt_images(flagged, 0.25, "contrast", 2, seed=0, add_noise_columns=True)
    np.testing.assert_array_equal(both["clean_label"], labels_of(cifar))
    assert set(np.flatnonzero(both["is_noisy"])) == set(record["row_id"]) | set(record_2["row_id"])
    corrupted = np.asarray(both["corruption"]) == "contrast"
    np.testing.assert_array_equal(np.flatnonzero(corrupted), np.sort(record_2["row_id"]))
    assert set(both["corruption"]) == {"", "contrast"}


def test_kept_noise_reads_the_record_columns(cifar):
    flagged, _ = noise.symmetric_label_noise(cifar, 0.25, seed=0, add_noise_columns=True)
    both, _ = noise.corrupt_images(flagged, 0.1, "contrast", 2, seed=1, add_noise_columns=True)
    columns = {name: np.asarray(both[name]) for name in ("label", "clean_label", "is_noisy", "corruption")}
    label_noise = columns["label"] != columns["clean_label"]
    damaged = columns["corruption"] != ""
    assert kept_noise(columns) == {
        "noisy": pytest.approx((label_noise | damaged).mean()),
        "label_noise": pytest.approx(label_noise.mean()),
        "damaged": pytest.approx(damaged.mean()),
    }
    first_half = np.arange(len(both)) < len(both) // 2
    assert kept_noise(columns, first_half)["label_noise"] == pytest.approx(label_noise[first_half].mean())
    assert kept_noise(columns, np.zeros(len(both), dtype=bool)) == {"noisy": 0, "label_noise": 0, "damaged": 0}
    assert kept_noise({"label": columns["label"]}) == {}  # a source without the record columns


def test_asymmetric_cifar_default_flips(cifar):
    fraction = 0.4
    flippable = np.isin(labels_of(cifar), [CIFAR_NAMES.index(n) for n in noise.CIFAR10_ASYMMETRIC])
    noisy, record = noise.asymmetric_label_noise(cifar, fraction, seed=1)
    changed = check_record(cifar, noisy, record, noise.num_noisy(fraction, int(flippable.sum())))
    assert flippable[changed].all()
    expected = {CIFAR_NAMES.index(s): CIFAR_NAMES.index(t) for s, t in noise.CIFAR10_ASYMMETRIC.items()}
    assert all(expected[o] == n for o, n in zip(record["original_label"], record["new_label"]))


def test_asymmetric_next_class_default_and_explicit_mappings():
    source = labels_only(300, names=["a", "b", "c"])
    noisy, record = noise.asymmetric_label_noise(source, 0.5, seed=0)
    check_record(source, noisy, record, 150)  # every class flips to the next one: all rows are flippable
    assert all(n == (o + 1) % 3 for o, n in zip(record["original_label"], record["new_label"]))

    by_name, record_name = noise.asymmetric_label_noise(source, 1.0, {"a": "c"}, seed=0)
    by_id, record_id = noise.asymmetric_label_noise(source, 1.0, {0: 2}, seed=0)
    assert record_name.to_dict() == record_id.to_dict()
    check_record(source, by_name, record_name, int((labels_of(source) == 0).sum()))
    with pytest.raises(ValueError, match="unknown class name"):
        noise.asymmetric_label_noise(source, 0.5, {"a": "zebra"})


def test_record_uses_the_row_id_column(cifar):
    shuffled = cifar.add_column("row_id", list(range(1000, 1000 + len(cifar)))).shuffle(seed=0)
    noisy, record = noise.symmetric_label_noise(shuffled, 0.25, seed=0)
    positions = np.flatnonzero(labels_of(shuffled) != labels_of(noisy))
    np.testing.assert_array_equal(record["row_id"], np.asarray(shuffled["row_id"])[positions])


@pytest.mark.parametrize("corruption", noise.CORRUPTIONS)
def test_corruption_changes_exactly_the_requested_rows(cifar, corruption):
    fraction, severity = 0.3, 3
    raw_source = list(cifar.cast_column("img", Image(decode=False))["img"])
    noisy, record = noise.corrupt_images(cifar, fraction, corruption, severity, seed=2)
    raw_noisy = list(noisy.cast_column("img", Image(decode=False))["img"])
    assert raw_source == list(cifar.cast_column("img", Image(decode=False))["img"])  # source untouched
    assert noisy.features == cifar.features
    np.testing.assert_array_equal(labels_of(noisy), labels_of(cifar))

    touched = [i for i, (a, b) in enumerate(zip(raw_source, raw_noisy)) if a["bytes"] != b["bytes"]]
    assert len(touched) == len(record) == noise.num_noisy(fraction, len(cifar))
    assert list(record["row_id"]) == touched
    assert set(record["corruption"]) == {corruption} and set(record["severity"]) == {severity}
    assert list(record["original_label"]) == list(record["new_label"]) == [int(labels_of(cifar)[i]) for i in touched]
    for i in touched[:5]:
        before, after = np.asarray(cifar[i]["img"], dtype=int), np.asarray(noisy[i]["img"], dtype=int)
        assert before.shape == after.shape and np.abs(before - after).sum() > 0


def test_corruption_strength_grows_with_severity(cifar):
    image = cifar[0]["img"]
    pixels = np.asarray(image, dtype=int)
    distances = [
        np.abs(np.asarray(noise.apply_corruption(image, "contrast", s), dtype=int) - pixels).mean()
        for s in range(1, 6)
    ]
    assert distances == sorted(distances)
    with pytest.raises(ValueError, match="severity"):
        noise.corrupt_images(cifar, 0.1, "contrast", 6)
    with pytest.raises(ValueError, match="unknown corruption"):
        noise.corrupt_images(cifar, 0.1, "fog", 1)


def test_cli_writes_a_loadable_noisy_dataset_and_record(cifar, tmp_path):
    source_dir = tmp_path / "source"
    source_dir.mkdir()
    cifar.to_parquet(str(source_dir / "train-00000-of-00001.parquet"))
    output_dir = tmp_path / "noisy"
    noise.main(
        [
            "--dataset",
            str(source_dir),
            "--output_dir",
            str(output_dir),
            "--symmetric",
            "0.2",
            "--corruption",
            "jpeg_compression",
            "--corruption_fraction",
            "0.1",
            "--seed",
            "0",
        ]
    )
    noisy = load_dataset(str(output_dir), split="train")
    record = load_dataset(str(output_dir), "noise_record", split="train")
    assert len(noisy) == len(cifar) and noisy.features == cifar.features
    label_rows = record.filter(lambda r: r["noise"] == "symmetric_label")
    assert len(label_rows) == noise.num_noisy(0.2, len(cifar))
    assert len(record) - len(label_rows) == noise.num_noisy(0.1, len(cifar))
    np.testing.assert_array_equal(np.flatnonzero(labels_of(noisy) != labels_of(cifar)), label_rows["row_id"])
    assert noisy[int(record[-1]["row_id"])]["img"].size == (32, 32)
