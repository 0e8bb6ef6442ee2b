"""One process and two (`accelerate launch --multi_gpu --num_processes 2` gives two CPU processes) agree exactly."""

import os
import socket
import subprocess
import sys

import pandas as pd
import pytest
import yaml


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_identical_scores_and_selections(cifar_slice, tiny_clip_path, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            dict(
                dataset_name=str(cifar_slice),
                model_name_or_path=str(tiny_clip_path),
                selection_ratios=[0.3, 0.5],
                knn_k=5,
                adapter_epochs=2,
                adapter_batch_size=64,
                batch_size=32,
                embedding_chunk_size=64,
            )
        )
    )
    # Results are bit-identical for the same number of threads per process; accelerate launch gives each
    # process one thread, so the single-process run gets one too.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "hf_clipsel.cli",
            "run",
            "--config",
            str(config),
            "--output_dir",
            str(tmp_path / "one"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            "accelerate",
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--main_process_port",
            str(_free_port()),
            "-m",
            "hf_clipsel.cli",
            "run",
            "--config",
            str(config),
            "--output_dir",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    # both processes embedded a share of the chunks
    assert "process 0 of 2: chunks 0-1 of 4" in two.stderr and "process 1 of 2: chunks 2-3 of 4" in two.stderr

    scores_one = pd.read_parquet(tmp_path / "one" / "scores")
    scores_two = pd.read_parquet(tmp_path / "two" / "scores")
    pd.testing.assert_frame_equal(scores_one, scores_two, check_exact=True)
    for ratio in ("ratio_0.3", "ratio_0.5"):
        subset_one = pd.read_parquet(tmp_path / "one" / "subsets" / ratio)
        subset_two = pd.read_parquet(tmp_path / "two" / "subsets" / ratio)
        pd.testing.assert_frame_equal(subset_one, subset_two, check_exact=True)
