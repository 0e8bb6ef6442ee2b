"""The pipeline and the Hub together, against the local stand-in: `run --push_to_hub`, then `select --scores_from`
the pushed repo reproduces the selection without a model, and timm's own `hfds/` reader trains on what was pushed."""

import hashlib
import io

import numpy as np
import pandas as pd
import pytest
from hub_stand_in import ChildWorker, HubStandIn, child_env  # tests/ is on sys.path under pytest

CLI = """
from hf_clipsel.cli import main
result = main(params["argv"])
"""

LOAD_SUBSET = """
from datasets import load_dataset
subset = load_dataset(params["repo"], params["config"], split="train")
result = {"row_ids": subset["row_id"][:], "label_names": subset.features["label"].names}
"""


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    with HubStandIn() as hub:
        home = tmp_path_factory.mktemp("worker")
        with ChildWorker(child_env(hub, home, token="hf_FakeTokenForTests0000000000000000"), cwd=home) as child:
            yield child


@pytest.mark.slow
def test_run_pushes_and_select_from_the_pushed_scores_reproduces_it(worker, cifar_slice, tiny_clip_path, tmp_path):
    common = ["--dataset_name", str(cifar_slice), "--knn_k", "5", "--batch_size", "32", "--embedding_chunk_size", "64"]
    code, output = worker.call(
        CLI,
        {
            "argv": [
                "run",
                *common,
                "--model_name_or_path",
                str(tiny_clip_path),
                "--adapter_epochs",
                "2",
                "--selection_ratios",
                "0.3",
                "0.5",
                "--output_dir",
                str(tmp_path / "run"),
                "--push_to_hub",
                "true",
                "--hub_dataset_id",
                "acme/cifar-clipsel",
                "--hub_model_id",
                "acme/cifar-adapter",
            ]
        },
    )
    assert code == 0, output[-3000:]
    remote, _ = worker.call(LOAD_SUBSET, {"repo": "acme/cifar-clipsel", "config": "ratio_0.3"})
    local = pd.read_parquet(tmp_path / "run" / "subsets" / "ratio_0.3")
    assert remote["row_ids"] == local["row_id"].tolist() and len(remote["row_ids"]) == 72

    code, output = worker.call(
        CLI,
        {
            "argv": [
                "select",
                *common,
                "--scores_from",
                "acme/cifar-clipsel",
                "--selection_ratios",
                "0.3",
                "--output_dir",
                str(tmp_path / "again"),
                "--push_to_hub",  # select pushes too when asked
                "true",
                "--hub_dataset_id",
                "acme/cifar-again",
            ]
        },
    )
    assert code == 0, output[-3000:]
    again_remote, _ = worker.call(LOAD_SUBSET, {"repo": "acme/cifar-again", "config": "ratio_0.3"})
    assert again_remote["row_ids"] == remote["row_ids"]
    original = pd.read_parquet(tmp_path / "run" / "scores")
    again = pd.read_parquet(tmp_path / "again" / "scores")
    assert again["is_selected_ratio_0.3"].tolist() == original["is_selected_ratio_0.3"].tolist()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "again" / "subsets" / "ratio_0.3"), local)

    # timm's hfds/ reader calls load_dataset(repo, split=...) with no config name: each ratio is a split of the
    # default config. Every row timm yields is a selected row, in order, with its label and its exact pixels.
    timm_rows, output = worker.call(TIMM_READ, {"repo": "acme/cifar-clipsel", "split": "ratio_0.3"})
    assert timm_rows is not None, output[-3000:]
    source = pd.read_parquet(cifar_slice)
    selected = original["row_id"][original["is_selected_ratio_0.3"]].tolist()
    assert len(timm_rows["targets"]) == 72
    assert timm_rows["targets"] == source["label"].iloc[selected].tolist()
    assert timm_rows["pixels"] == [_pixel_digest(source["img"].iloc[i]["bytes"]) for i in selected]


TIMM_READ = """
import hashlib, io
import numpy as np
from PIL import Image
from timm.data import create_dataset

dataset = create_dataset(f"hfds/{params['repo']}", root=None, split=params["split"], input_key="img")
rows = [dataset[i] for i in range(len(dataset))]
result = {
    "targets": [int(target) for _, target in rows],
    "pixels": [hashlib.sha256(np.asarray(image).tobytes()).hexdigest() for image, _ in rows],
}
"""


def _pixel_digest(encoded: bytes) -> str:
    from PIL import Image

    return hashlib.sha256(np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB")).tobytes()).hexdigest()


def test_push_without_a_repo_id_is_a_clear_error(tmp_path):
    from hf_clipsel.cli import main

    assert main(["push", "--output_dir", str(tmp_path)]) == 1
    with pytest.raises(ValueError, match="--hub_dataset_id"):
        from hf_clipsel.configs import RunConfig

        RunConfig(push_to_hub=True)
