"""The pipeline and the Hub together, against the local stand-in: `run --push_to_hub`, then `select --scores_from`
the pushed repo reproduces the selection without a model."""

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
            ]
        },
    )
    assert code == 0, output[-3000:]
    original = pd.read_parquet(tmp_path / "run" / "scores")
    again = pd.read_parquet(tmp_path / "again" / "scores")
    assert again["is_selected_ratio_0.3"].tolist() == original["is_selected_ratio_0.3"].tolist()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "again" / "subsets" / "ratio_0.3"), local)


def test_push_without_a_repo_id_is_a_clear_error(tmp_path):
    from hf_clipsel.cli import main

    assert main(["push", "--output_dir", str(tmp_path)]) == 1
    with pytest.raises(ValueError, match="--hub_dataset_id"):
        from hf_clipsel.configs import RunConfig

        RunConfig(push_to_hub=True)
