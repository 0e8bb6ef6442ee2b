"""Classes of any size: a class with one row, a class with none, duplicate rows (documented behaviour)."""

import io

import numpy as np
from datasets import ClassLabel, Dataset, Features, Image, load_dataset
from PIL import Image as PILImage

from hf_clipsel.pipeline import run
from tests.conftest import run_config

CLASSES = ["cat", "dog", "ship", "empty"]


def _png(seed):
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    PILImage.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_singleton_empty_and_duplicated_classes(tmp_path, tiny_clip_path):
    images = [_png(i) for i in range(30)]
    labels = [0] * 15 + [1] * 14 + [2]  # "ship" has one row, "empty" none
    images[1] = images[0]  # an exact duplicate pair in "cat"
    features = Features({"image": Image(), "label": ClassLabel(names=CLASSES)})
    Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in images], "label": labels}, features=features
    ).to_parquet(str(tmp_path / "data.parquet"))
    summary = run(
        run_config(
            tmp_path / "data.parquet",
            tiny_clip_path,
            tmp_path / "out",
            knn_k=1,
            selection_ratios=[0.5],
            class_balanced=True,
        )
    )
    scores = load_dataset(str(tmp_path / "out"), "scores", split="train")
    diversity = np.asarray(scores["sample_diversity"][:])
    assert diversity[29] == 0.0, "a class of one row has no neighbours: its diversity is 0"
    assert diversity[0] == diversity[1] == 0.0, "duplicates are each other's nearest neighbour at distance 0"
    assert (diversity[2:29] > 0).all()
    kept = summary.ratios["0.5"].kept_per_class
    assert kept["empty"] == 0 and sum(kept.values()) == 15
    assert summary.rows_per_class == {"cat": 15, "dog": 14, "ship": 1, "empty": 0}


def test_a_single_class_dataset_is_warned_about(tmp_path, tiny_clip_path, caplog):
    features = Features({"image": Image(), "label": ClassLabel(names=["cat"])})
    Dataset.from_dict(
        {"image": [{"bytes": _png(i), "path": None} for i in range(12)], "label": [0] * 12}, features=features
    ).to_parquet(str(tmp_path / "one_class.parquet"))
    with caplog.at_level("WARNING"):
        run(
            run_config(
                tmp_path / "one_class.parquet", tiny_clip_path, tmp_path / "out", knn_k=2, selection_ratios=[0.5]
            )
        )
    assert "the dataset has one class ('cat'): CLIP's class posterior is 1 for every row" in caplog.text
