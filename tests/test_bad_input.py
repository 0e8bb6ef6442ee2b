"""Bad input gets a clear error that says how to fix it, or a flagged row; never a crash deep in torch."""

import io

import numpy as np
import pytest
import yaml
from datasets import ClassLabel, Dataset, Features, Image, Value, load_dataset
from PIL import Image as PILImage

from hf_clipsel.configs import budget
from hf_clipsel.pipeline import run
from tests.conftest import cli, run_config

CLASSES = ["cat", "dog", "ship"]


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    PILImage.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(tmp_path, images, labels, label_feature=None, name="data.parquet"):
    features = Features({"image": Image(), "label": label_feature or ClassLabel(names=CLASSES)})
    cells = [{"bytes": b, "path": None} for b in images]
    data = Dataset.from_dict({"image": cells, "label": labels}, features=features)
    path = tmp_path / name
    data.to_parquet(str(path))
    return path


def test_missing_label_column_says_which_flag_to_pass(tmp_path, tiny_clip_path):
    data = Dataset.from_dict({"image": [{"bytes": _png(0), "path": None}]}, features=Features({"image": Image()}))
    data.to_parquet(str(tmp_path / "nolabel.parquet"))
    with pytest.raises(ValueError, match="--label_column"):
        run(run_config(tmp_path / "nolabel.parquet", tiny_clip_path, tmp_path / "out"))


def test_empty_dataset_is_a_clear_error(tmp_path, tiny_clip_path):
    path = _write(tmp_path, [], [])
    with pytest.raises(ValueError, match="has no rows"):
        run(run_config(path, tiny_clip_path, tmp_path / "out"))


def test_integer_labels_without_class_names_ask_for_them(tmp_path, tiny_clip_path):
    path = _write(tmp_path, [_png(i) for i in range(4)], [0, 1, 2, 0], label_feature=Value("int64"))
    with pytest.raises(ValueError, match="--class_names"):
        run(run_config(path, tiny_clip_path, tmp_path / "out"))


def test_corrupt_images_and_bad_labels_are_flagged_and_never_selected(tmp_path, tiny_clip_path):
    images = [_png(i) for i in range(40)]
    images[3] = b"this is not an image"
    images[7] = _png(7)[:60]  # truncated PNG
    labels = [i % 3 for i in range(40)]
    labels[11] = 7  # outside the 3 classes
    labels[12] = -1  # missing
    path = _write(tmp_path, images, labels, label_feature=Value("int64"))
    before = path.read_bytes()
    config = run_config(
        path, tiny_clip_path, tmp_path / "out", class_names=CLASSES, selection_ratios=[0.5, 1.0], knn_k=3
    )
    summary = run(config)
    assert path.read_bytes() == before

    scores = load_dataset(str(tmp_path / "out"), "scores", split="train")
    reasons = dict(enumerate(scores["flag_reason"][:]))
    assert reasons[3].startswith("image failed to decode") and reasons[7].startswith("image failed to decode")
    assert reasons[11] == "label 7 outside the 3 classes" and reasons[12] == "label missing"
    assert {row for row, reason in reasons.items() if reason} == {3, 7, 11, 12}
    given = scores["given_label"][:]  # the label as the source gives it survives, in range or not
    assert given[11] == "7" and given[12] == "-1" and given[0] == "0" and scores["label"][11] == -1
    assert scores["decode_ok"][:].count(False) == 2
    flagged = [3, 7, 11, 12]
    for ratio in (0.5, 1.0):
        selected = np.asarray(scores[f"is_selected_ratio_{ratio:g}"][:])
        assert not selected[flagged].any()
    # ratio 0.5: 20 of 36 usable rows, exactly the budget; ratio 1.0: all 36 usable rows, 4 short, reported
    assert summary.ratios["0.5"].kept == budget(0.5, 40) == 20
    assert summary.ratios["1"].kept == 36 and summary.ratios["1"].shortfall == 4
    assert summary.num_flagged == 4
    subset = load_dataset(str(tmp_path / "out"), "ratio_1", split="train")
    assert sorted(subset["row_id"][:]) == [i for i in range(40) if i not in flagged]


def test_cli_reports_input_errors_in_one_line(tmp_path):
    result = cli("run", "--output_dir", str(tmp_path))
    assert result.returncode == 1
    assert "hf-clipsel run: error: dataset_name is not set" in result.stderr
    assert "Traceback" not in result.stderr
    bad_ratio = cli("run", "--selection_ratios", "1.5")
    assert bad_ratio.returncode == 1 and "outside (0, 1]" in bad_ratio.stderr


def test_a_save_to_disk_source_is_never_written_into(tmp_path, tiny_clip_path):
    source = tmp_path / "source"
    Dataset.from_parquet(str(_write(tmp_path, [_png(i) for i in range(24)], [i % 3 for i in range(24)]))).save_to_disk(
        str(source)
    )
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    summary = run(
        run_config(
            source,
            tiny_clip_path,
            tmp_path / "out",
            selection_ratios=[0.5],
            knn_k=2,
            batch_size=8,
            embedding_chunk_size=8,
        )
    )
    assert summary.ratios["0.5"].kept == 12
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before  # no cache-*.arrow appeared in it


def test_a_csv_of_image_paths_works_when_image_column_names_it(tmp_path, tiny_clip_path):
    paths = []
    for i in range(24):
        path = tmp_path / "images" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(_png(i))
        paths.append(str(path))
    csv = tmp_path / "images.csv"
    csv.write_text("file,label\n" + "".join(f"{p},{i % 3}\n" for i, p in enumerate(paths)))
    config = run_config(
        csv,
        tiny_clip_path,
        tmp_path / "out",
        image_column="file",
        class_names=CLASSES,
        selection_ratios=[0.5],
        knn_k=2,
        batch_size=8,
        embedding_chunk_size=8,
    )
    summary = run(config)
    assert summary.num_flagged == 0 and summary.ratios["0.5"].kept == 12
    subset = load_dataset(str(tmp_path / "out"), "ratio_0.5", split="train")
    assert isinstance(subset.features["file"], Image)  # the subset carries the images themselves, not paths
    run_config_file = yaml.safe_load((tmp_path / "out" / "run_config.yaml").read_text())
    assert run_config_file["source"]["image_column"] == "file" and run_config_file["source"]["num_rows"] == 24
