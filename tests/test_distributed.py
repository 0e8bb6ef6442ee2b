"""One process and two (`accelerate launch --multi_gpu --num_processes 2` gives two CPU processes) agree exactly: the
two split the embedding by chunks and the scoring by classes."""

import os
import re
import socket

import pandas as pd
import pytest

from hf_clipsel.runs.record import read_record
from tests.conftest import cli, write_config


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_identical_scores_and_selections(cifar_slice, tiny_clip_path, tmp_path):
    config = str(write_config(tmp_path / "run.yaml", cifar_slice, tiny_clip_path))
    # Results are bit-identical for the same number of threads per process; accelerate launch gives each
    # process one thread, so the single-process run gets one too.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = cli("run", "--config", config, "--output_dir", str(tmp_path / "one"), env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = (
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
    )
    two = cli("run", "--config", config, "--output_dir", str(tmp_path / "two"), launcher=launcher, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    # both processes embedded a share of the chunks
    assert "process 0 of 2: chunks 0-1 of 4" in two.stderr and "process 1 of 2: chunks 2-3 of 4" in two.stderr
    # and scored a share of the classes each (diversity, spread by size), gathered by the main process
    shares = [re.search(rf"process {i} of 2: (\d+) of 10 classes", two.stderr) for i in (0, 1)]
    assert all(shares) and sum(int(share.group(1)) for share in shares) == 10, two.stderr[-3000:]

    # the record says how many processes trained the adapters (encoder_lora's depend on it)
    assert [read_record(tmp_path / run).stages["adapt"]["processes"] for run in ("one", "two")] == [1, 2]

    for output in ("scores", "subsets/ratio_0.3", "subsets/ratio_0.5"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "one" / output), pd.read_parquet(tmp_path / "two" / output), check_exact=True
        )
