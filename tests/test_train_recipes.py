"""Downstream training recipes: the accuracy metric module against numpy, the accelerate configs, and tiny
end-to-end runs of recipes/train_timm.py and recipes/train_trainer.py on a selection output directory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from hf_clipsel.metrics import ACCURACY_MODULE, load_accuracy_metric
from tests.conftest import CIFAR10

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "accelerate_configs"


def topk_reference(scores: np.ndarray, references: np.ndarray, k: int) -> float:
    # Stable descending order: ties go to the lower class id, as numpy.argmax does.
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((order == references[:, None]).any(axis=1).mean())


@pytest.fixture(scope="module")
def metric():
    return load_accuracy_metric(keep_in_memory=True)


def test_metric_loads_from_the_package_by_path(metric):
    assert ACCURACY_MODULE.is_file()
    assert type(metric).__name__ == "Accuracy"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metric_topk_matches_numpy(metric, seed):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(257, 10)).astype(np.float32)
    references = rng.integers(0, 10, 257)
    results = metric.compute(predictions=scores, references=references, top_k=(1, 3, 5, 10))
    for k in (1, 3, 5, 10):
        assert results[f"top{k}"] == pytest.approx(topk_reference(scores, references, k))
    assert results["accuracy"] == results["top1"]
    assert results["top10"] == 1.0


def test_metric_class_ids_weights_and_counts(metric):
    rng = np.random.default_rng(0)
    predictions, references = rng.integers(0, 4, 100), rng.integers(0, 4, 100)
    weights = rng.uniform(size=100)
    assert metric.compute(predictions=predictions, references=references)["accuracy"] == pytest.approx(
        np.mean(predictions == references)
    )
    assert metric.compute(predictions=predictions, references=references, normalize=False)["top1"] == float(
        np.sum(predictions == references)
    )
    weighted = metric.compute(predictions=predictions, references=references, sample_weight=weights)["top1"]
    assert weighted == pytest.approx(np.average(predictions == references, weights=weights))
    with pytest.raises(ValueError, match="per-class scores"):
        metric.compute(predictions=predictions, references=references, top_k=(1, 5))


def test_metric_ties_get_no_free_credit(metric):
    # Constant scores (a collapsed model): only class 0 counts as predicted, like argmax.
    results = metric.compute(predictions=np.zeros((4, 5)), references=[0, 1, 2, 3], top_k=(1, 2))
    assert results["top1"] == 0.25 and results["top2"] == 0.5


def test_metric_accumulates_batches(metric):
    rng = np.random.default_rng(3)
    scores, references = rng.normal(size=(60, 7)), rng.integers(0, 7, 60)
    for start in range(0, 60, 25):
        metric.add_batch(predictions=scores[start : start + 25], references=references[start : start + 25])
    assert metric.compute(top_k=[2])["top2"] == pytest.approx(topk_reference(scores, references, 2))


@pytest.mark.parametrize("name", ["cpu", "cpu_2proc", "single_gpu", "multi_gpu", "multi_node"])
def test_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = CONFIGS / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    config = load_config_from_file(str(path))
    assert config.num_processes == raw["num_processes"] and config.num_machines == raw["num_machines"]
    assert raw["num_processes"] == {"cpu": 1, "cpu_2proc": 2, "single_gpu": 1, "multi_gpu": 2, "multi_node": 16}[name]


@pytest.fixture(scope="module")
def selection_dir(cifar_slice, tiny_clip_path, tmp_path_factory) -> Path:
    """A real selection: the pipeline on 128 CIFAR-10 rows with a tiny CLIP; ratio 0.5 keeps 64."""
    from hf_clipsel.pipeline import run as run_pipeline
    from tests.conftest import run_config

    root = tmp_path_factory.mktemp("selection")
    summary = run_pipeline(run_config(cifar_slice, tiny_clip_path, root, selection_ratios=[0.5], max_samples=128))
    assert summary.ratios["0.5"].kept == 64
    return root


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory) -> Path:
    """The fixture's 50 CIFAR-10 test rows in the Hub's parquet layout (`parquet` + data_dir, split `test`)."""
    import shutil

    root = tmp_path_factory.mktemp("cifar10_test")
    shutil.copyfile(CIFAR10 / "test-00000-of-00001.parquet", root / "test-00000-of-00001.parquet")
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("subprocess_cache")


def common_args(selection_dir: Path, eval_dir: Path, output_dir: Path) -> list[str]:
    return [
        "--dataset",
        str(selection_dir),
        "--dataset_config",
        "ratio_0.5",
        "--eval_dataset",
        "parquet",
        "--eval_data_dir",
        str(eval_dir),
        "--eval_split",
        "test",
        "--batch_size",
        "16",
        "--num_workers",
        "0",
        "--output_dir",
        str(output_dir),
    ]


def run(command: list[str], cache_dir: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(cache_dir / "datasets"),
        "HF_HOME": str(cache_dir / "hf_home"),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_metrics(output_dir: Path) -> dict:
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 1
    assert metrics["num_train_rows"] == 64 and metrics["num_eval_rows"] == 50
    return metrics


@pytest.mark.slow
def test_train_timm_then_resume_under_two_cpu_processes(selection_dir, eval_dir, cache_dir, tmp_path):
    output_dir = tmp_path / "timm"
    args = [*common_args(selection_dir, eval_dir, output_dir), "--model", "test_resnet", "--schedule", "cifar"]
    run([sys.executable, "recipes/train_timm.py", *args, "--epochs", "1"], cache_dir)
    first = read_metrics(output_dir)
    assert first["completed_steps"] == 4 and first["num_processes"] == 1 and first["args"]["lr"] == 0.1
    assert first["args"]["augment"] == "pad_crop_flip"  # the cifar schedule's small-image augmentation
    assert (output_dir / "checkpoints" / "epoch_0" / "progress.json").is_file()

    # accelerate launch, two CPU processes in one group, resuming at epoch 2 from the checkpoint of epoch 1.
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / "cpu_2proc.yaml"),
        "--main_process_port",
        "29547",
    ]
    run([*launch, "recipes/train_timm.py", *args, "--epochs", "2", "--resume_from_checkpoint", "latest"], cache_dir)
    second = read_metrics(output_dir)
    assert second["num_processes"] == 2
    assert second["completed_steps"] == 8  # 4 resumed + 4 more: the global batch of 16 is split over 2 processes
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["epoch_0", "epoch_1"]


@pytest.mark.slow
def test_train_trainer_one_epoch(selection_dir, eval_dir, cache_dir, tmp_path):
    output_dir = tmp_path / "trainer"
    tiny = "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64"
    run(
        [
            sys.executable,
            "recipes/train_trainer.py",
            *common_args(selection_dir, eval_dir, output_dir),
            "--config_overrides",
            tiny,
            "--epochs",
            "1",
        ],
        cache_dir,
    )
    metrics = read_metrics(output_dir)
    assert metrics["completed_steps"] == 4 and metrics["epochs"] == 1
    assert (output_dir / "model" / "config.json").is_file()
    assert json.loads((output_dir / "model" / "config.json").read_text())["id2label"]["9"] == "truck"
