"""Two machines (two `accelerate launch` invocations with --num_machines 2, on this host, gloo on CPU) give the scores
and subsets of one process, each machine reading its own shards of a streamed source (README: "More than one
machine")."""

import os
import re
import subprocess

import pandas as pd
import pyarrow.parquet as pq
import pytest

from tests.conftest import cli, write_config
from tests.test_distributed import _free_port


@pytest.mark.slow
def test_two_machines_give_the_scores_and_subsets_of_one_process(cifar_slice, tiny_clip_path, tmp_path):
    table, shards = pq.read_table(cifar_slice), tmp_path / "shards"  # 240 rows in 4 data files: 64, 64, 64, 48
    shards.mkdir()
    for index, start in enumerate(range(0, table.num_rows, 64)):
        pq.write_table(table.slice(start, 64), shards / f"train-{index:05d}-of-00004.parquet")
    config = str(write_config(tmp_path / "run.yaml", shards, tiny_clip_path, streaming=True))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # bit-identical numbers need the same threads per process
    one = cli("run", "--config", config, "--output_dir", str(tmp_path / "one"), env=env)
    assert one.returncode == 0, one.stderr[-3000:]

    port = str(_free_port())
    machines = [
        subprocess.Popen(
            [
                *("accelerate", "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2"),
                *("--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port),
                *("-m", "hf_clipsel.cli", "run", "--config", config, "--output_dir", str(tmp_path / "two")),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]
    logs = []
    for machine in machines:
        _, stderr = machine.communicate(timeout=300)
        assert machine.returncode == 0, stderr[-3000:]
        logs.append(stderr)
    # each machine embedded the chunks of its own two shards, and read those rows only: 240 in all, once
    assert "process 0 of 2: chunks 0-1 of 4 (0 cached), reading from shard 0 of 4 (row 0)" in logs[0]
    assert "process 1 of 2: chunks 2-3 of 4 (0 cached), reading from shard 2 of 4 (row 128)" in logs[1]
    read = [int(re.search(r"process \d of 2: read (\d+) rows of the stream", log).group(1)) for log in logs]
    assert read == [128, 112], read

    for output in ("scores", "subsets/ratio_0.3", "subsets/ratio_0.5"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "one" / output), pd.read_parquet(tmp_path / "two" / output), check_exact=True
        )
