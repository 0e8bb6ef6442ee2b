"""The streaming input path gives the same scores and subsets as loading the dataset whole."""

import pandas as pd
import pytest

from hf_clipsel.pipeline import run
from tests.conftest import embedding_chunks, run_config


@pytest.mark.slow
def test_streaming_gives_the_same_outputs_as_loading_whole(cifar_slice, tiny_clip_path, tmp_path):
    whole = run(run_config(cifar_slice, tiny_clip_path, tmp_path / "whole"))
    streamed = run(run_config(cifar_slice, tiny_clip_path, tmp_path / "streamed", streaming=True))
    assert streamed.ratios == whole.ratios
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "whole" / "scores"),
        pd.read_parquet(tmp_path / "streamed" / "scores"),
        check_exact=True,
    )
    for ratio in ("ratio_0.3", "ratio_0.5"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "whole" / "subsets" / ratio),
            pd.read_parquet(tmp_path / "streamed" / "subsets" / ratio),
            check_exact=True,
        )


def test_streaming_resumes_from_its_chunk_cache(cifar_slice, tiny_clip_path, tmp_path):
    config = run_config(cifar_slice, tiny_clip_path, tmp_path / "out", streaming=True, max_samples=100)
    run(config)
    chunks = embedding_chunks(tmp_path / "out" / "embeddings")
    assert len(chunks) == 2  # 100 rows in chunks of 64
    chunks[1].unlink()  # as if the run had been killed before the last chunk
    config.run.overwrite_output_dir = True
    run(config)
    assert chunks[0].stat().st_mtime_ns == embedding_chunks(tmp_path / "out" / "embeddings")[0].stat().st_mtime_ns, (
        "the finished chunk is reused, not recomputed"
    )
    assert chunks[1].exists()


def test_encoder_adapters_need_the_whole_dataset(cifar_slice, tiny_clip_path, tmp_path):
    with pytest.raises(ValueError, match="stream cannot replay"):
        run(run_config(cifar_slice, tiny_clip_path, tmp_path, streaming=True, adapter_preset="encoder_lora"))
