"""Killed runs: embedding resumes at the first unfinished chunk; outputs appear whole or not at all."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from datasets import load_dataset

from hf_clipsel.configs import ModelConfig
from hf_clipsel.data import with_row_ids
from hf_clipsel.embedding import embed_images, pooled_matrix
from hf_clipsel.modeling import load_clip, model_fingerprint
from hf_clipsel.pipeline import run
from tests.conftest import embedding_chunks, run_config

# A child that embeds slowly (a sleep after each forward), so that the test can kill it between chunks.
SLOW_EMBEDDING = """
import sys, time
from accelerate import Accelerator
from datasets import load_dataset
from hf_clipsel.configs import ModelConfig
from hf_clipsel.data import with_row_ids
from hf_clipsel.embedding import embed_images
from hf_clipsel.modeling import load_clip, model_fingerprint
data, model_path, cache = sys.argv[1:]
dataset = with_row_ids(load_dataset("parquet", data_files=data, split="train"))
config = ModelConfig(model_name_or_path=model_path)
model, processor = load_clip(config)
model.vision_model.register_forward_hook(lambda *args: time.sleep(0.25))
embed_images(dataset, "img", model, processor.image_processor, model_fingerprint(config, model), cache,
             Accelerator(), batch_size=16, chunk_size=32)
"""

# A child whose subset writing stops half way (one ratio's shards written, the next never) until it is killed.
STALLED_WRITE = """
import sys, time
from pathlib import Path
import hf_clipsel.outputs as outputs
from tests.conftest import run_config
from hf_clipsel.pipeline import run
original = outputs.write_parquet_shards
def stall_after_first_shard(dataset, directory, split="train"):
    paths = original(dataset, directory, split)
    Path(sys.argv[3], "stalled").write_text(str(directory))
    time.sleep(600)
outputs.write_parquet_shards = stall_after_first_shard
run(run_config(sys.argv[1], sys.argv[2], sys.argv[3], overwrite_output_dir=True))
"""


def _wait_for(condition, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the child never reached the point to kill it at"
        time.sleep(0.05)


def _embed(cifar_slice, tiny_clip_path, cache):
    dataset = with_row_ids(load_dataset("parquet", data_files=str(cifar_slice), split="train"))
    config = ModelConfig(model_name_or_path=str(tiny_clip_path))
    model, processor = load_clip(config)
    forwards = []
    model.vision_model.register_forward_hook(lambda *args: forwards.append(1))
    embeddings = embed_images(
        dataset,
        "img",
        model,
        processor.image_processor,
        model_fingerprint(config, model),
        cache,
        Accelerator(),
        batch_size=16,
        chunk_size=32,
    )
    return embeddings, len(forwards)


@pytest.mark.slow
def test_killed_embedding_resumes_without_recomputing_finished_chunks(cifar_slice, tiny_clip_path, tmp_path):
    cache = tmp_path / "cache"
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_EMBEDDING, str(cifar_slice), str(tiny_clip_path), str(cache)],
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(lambda: len(embedding_chunks(cache)) >= 3, child)
    child.send_signal(signal.SIGKILL)
    child.wait()
    finished = len(embedding_chunks(cache))
    assert 3 <= finished < 8, "the kill must land between the first and the last of the 8 chunks"

    resumed, forwards = _embed(cifar_slice, tiny_clip_path, cache)
    # 240 rows: 8 chunks of 32 rows (the last has 16); only the unfinished chunks run, 2 batches each (1 for the last)
    assert forwards == 2 * (8 - finished) - 1
    assert not list(cache.glob("*/tmp*")), "the killed chunk's temporary file is cleaned up"

    uninterrupted, _ = _embed(cifar_slice, tiny_clip_path, tmp_path / "fresh")
    torch.testing.assert_close(pooled_matrix(resumed), pooled_matrix(uninterrupted), rtol=0, atol=0)
    assert resumed["row_id"][:] == uninterrupted["row_id"][:]


@pytest.mark.slow
def test_a_kill_while_writing_leaves_no_readable_partial_output(cifar_slice, tiny_clip_path, tmp_path):
    output_dir = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen(
        [sys.executable, "-c", STALLED_WRITE, str(cifar_slice), str(tiny_clip_path), str(output_dir)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    _wait_for(lambda: (output_dir / "stalled").exists(), child)
    child.send_signal(signal.SIGKILL)
    child.wait()
    # the half-written subset sits in the hidden staging folder; nothing is published, no record vouches for it
    assert list(output_dir.glob(".staging-*/subsets/.ratio_0.3.tmp-*/*.parquet"))
    assert not (output_dir / "subsets").exists() and not (output_dir / "scores").exists()
    assert not (output_dir / "run_record.json").exists()
    with pytest.raises((FileNotFoundError, ValueError)):  # the placeholder card's configs match no file
        load_dataset(str(output_dir), "ratio_0.3", split="train")

    summary = run(run_config(cifar_slice, tiny_clip_path, output_dir, overwrite_output_dir=True))
    assert not list(output_dir.glob(".staging-*")), "the next run clears what the killed one left"
    assert len(load_dataset(str(output_dir), "ratio_0.3", split="train")) == summary.ratios["0.3"].kept == 72
