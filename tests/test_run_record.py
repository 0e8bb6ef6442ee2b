"""One owner for a run: a folder is a whole run its record vouches for, or a folder every command and
`load_dataset` refuse. Runs killed at several points, replacements killed half way, a second run on a locked
folder, stage commands into another run's folder, scores of another dataset, ratios whose names collide."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, load_dataset
from hub_stand_in import ChildWorker, HubStandIn, child_env  # tests/ is on sys.path under pytest

from hf_clipsel.cli import main
from hf_clipsel.core.names import RECORD
from hf_clipsel.pipeline import run, select_from_scores
from hf_clipsel.runs.folder import RunLockedError
from hf_clipsel.runs.record import IncompleteRunError, verify
from tests.conftest import REPO, run_config

# A run in a child process that stops at `point` (writes `reached` beside the folder, then sleeps until killed):
# while embedding, while writing its subsets into the staging folder, or in the middle of the swap (the new scores
# are in place, the old subsets moved out, the new ones not yet in).
STALLING_RUN = """
import json, os, sys, time
from pathlib import Path
import hf_clipsel.embedding as embedding
import hf_clipsel.outputs as outputs
from hf_clipsel.pipeline import run
from tests.conftest import run_config

data, model, output_dir, point, overrides = sys.argv[1:6]
marker = Path(output_dir).parent / "reached"

def stall():
    marker.write_text(point)
    time.sleep(600)

if point == "embedding":
    embed_prepared = embedding.embed_prepared
    def slow_embed_prepared(*args, **kwargs):
        stall()
    embedding.embed_prepared = slow_embed_prepared
elif point == "writing":
    write_parquet_shards = outputs.write_parquet_shards
    def stall_after_a_shard(dataset, directory, split="train"):
        write_parquet_shards(dataset, directory, split)
        stall()
    outputs.write_parquet_shards = stall_after_a_shard
elif point == "swap":
    replace = os.replace
    def stalling_replace(source, destination):
        if Path(destination) == Path(output_dir) / "subsets":
            stall()
        return replace(source, destination)
    os.replace = stalling_replace
elif point == "slow":  # embeds slowly, to hold the folder for a while
    embed_prepared = embedding.embed_prepared
    def slow_embed_prepared(*args, **kwargs):
        marker.write_text(point)
        time.sleep(0.3)
        return embed_prepared(*args, **kwargs)
    embedding.embed_prepared = slow_embed_prepared
run(run_config(data, model, output_dir, **json.loads(overrides)))
"""
POINTS = ["embedding", "writing", "swap"]


def _start(cifar_slice, tiny_clip_path, output_dir: Path, point: str, **overrides) -> subprocess.Popen:
    (output_dir.parent / "reached").unlink(missing_ok=True)
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            STALLING_RUN,
            str(cifar_slice),
            str(tiny_clip_path),
            str(output_dir),
            point,
            json.dumps(overrides),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _wait_until_reached(child: subprocess.Popen, output_dir: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not (output_dir.parent / "reached").exists():
        assert child.poll() is None, child.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the child never reached the point to kill it at"
        time.sleep(0.05)


def _kill_at(cifar_slice, tiny_clip_path, output_dir: Path, point: str, **overrides) -> None:
    child = _start(cifar_slice, tiny_clip_path, output_dir, point, **overrides)
    _wait_until_reached(child, output_dir)
    child.send_signal(signal.SIGKILL)
    child.wait()


def _loaded_rows(output_dir: Path, *config) -> object:
    """What load_dataset gives for the folder: {split: row ids}, or the exception type when it refuses."""
    try:
        loaded = load_dataset(str(output_dir), *config)
    except Exception as error:  # a refusal is an answer here
        return type(error).__name__
    return {split: loaded[split]["row_id"][:] for split in loaded}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(cifar_slice, tiny_clip_path, tmp_path_factory) -> Path:
    """A finished run (ratios 0.3 and 0.5), copied by each test that changes it."""
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    run(run_config(cifar_slice, tiny_clip_path, output_dir))
    return output_dir


@pytest.fixture(scope="module")
def hub_worker(tmp_path_factory):
    with HubStandIn() as hub:
        home = tmp_path_factory.mktemp("push_worker")
        with ChildWorker(child_env(hub, home, token="hf_FakeTokenForTests0000000000000000"), cwd=home) as child:
            yield hub, child


PUSH = """
from hf_clipsel.cli import main
result = main(["push", "--output_dir", params["output_dir"], "--hub_dataset_id", params["repo"]])
"""


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_a_run_killed_while_writing_is_refused_by_push_and_by_load_dataset(
    point, hub_worker, cifar_slice, tiny_clip_path, tmp_path
):
    hub, worker = hub_worker
    output_dir = tmp_path / "run"
    _kill_at(cifar_slice, tiny_clip_path, output_dir, point)
    assert not (output_dir / RECORD).exists()
    for config in ((), ("ratio_0.3",), ("scores",)):  # with or without a config name: nothing loads
        assert isinstance(_loaded_rows(output_dir, *config), str), config
    requests_before = len(hub.requests())
    code, output = worker.call(PUSH, {"output_dir": str(output_dir), "repo": f"acme/killed-{point}"})
    assert code == 1 and "incomplete run" in output, output[-2000:]
    assert len(hub.requests()) == requests_before, "the push talked to the Hub before refusing"
    # the lock the killed run left is taken over, and a rerun finishes the run
    summary = run(run_config(cifar_slice, tiny_clip_path, output_dir))
    verify(output_dir, deep=True)
    assert len(load_dataset(str(output_dir), "ratio_0.3", split="train")) == summary.ratios["0.3"].kept


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_a_killed_replacement_leaves_the_old_run_or_nothing(point, finished, cifar_slice, tiny_clip_path, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(finished, output_dir)
    old = {config: _loaded_rows(output_dir, *config) for config in ((), ("ratio_0.3",), ("scores",))}
    assert all(isinstance(rows, dict) for rows in old.values())
    # other settings (batch_size gives another embedding cache, so the embedding point is reached)
    _kill_at(cifar_slice, tiny_clip_path, output_dir, point, overwrite_output_dir=True, knn_k=3, batch_size=16)
    for config, rows in old.items():
        now = _loaded_rows(output_dir, *config)
        if point == "swap":
            assert isinstance(now, str), f"{config}: a half-swapped folder loaded"
        else:  # built beside: until the swap, the old run is whole and loadable
            assert now == rows, config
    if point != "swap":
        verify(output_dir, deep=True)


def test_a_stage_command_into_another_runs_folder_is_refused_and_changes_nothing(finished, tmp_path, capsys):
    output_dir = tmp_path / "run"
    shutil.copytree(finished, output_dir)
    embed = verify(output_dir).stages["embed"]
    assert len(embed["checkpoint"]) == 16 and embed["caches"]  # the checkpoint's identity and its cache
    before = _files(output_dir)
    common = ["--dataset_name", str(verify(output_dir).stages["embed"]["settings"]["dataset_name"])]
    common += ["--output_dir", str(output_dir)]
    # (a new ratio alone is added to the run: tests/test_pipeline.py; another setting with it is refused)
    assert main(["select", *common, "--selection_ratios", "0.4", "--alpha", "0.9"]) == 1
    assert "other settings (alpha, selection_ratios)" in capsys.readouterr().err
    assert main(["score", *common, "--knn_k", "9"]) == 1  # refused before a model is needed
    assert "other settings" in capsys.readouterr().err
    assert _files(output_dir) == before


@pytest.mark.slow
def test_a_second_run_on_a_held_folder_is_refused_at_once(cifar_slice, tiny_clip_path, tmp_path):
    output_dir = tmp_path / "run"
    first = _start(cifar_slice, tiny_clip_path, output_dir, "slow")
    _wait_until_reached(first, output_dir)
    started = time.monotonic()
    with pytest.raises(RunLockedError, match=r"in use by process \d+") as refused:
        run(run_config(cifar_slice, tiny_clip_path, output_dir))
    assert time.monotonic() - started < 5
    assert str(first.pid) in str(refused.value)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    record = verify(output_dir, deep=True)  # the first run's outputs are whole
    assert len(load_dataset(str(output_dir), "ratio_0.5", split="train")) == 120 and record.selected


def test_scores_from_another_dataset_are_refused(finished, cifar_slice, tmp_path):
    from datasets import Dataset

    source = Dataset.from_parquet(str(cifar_slice))
    shuffled = tmp_path / "same_size_other_labels.parquet"
    source.map(lambda row: {"label": (row["label"] + 1) % 10}).to_parquet(str(shuffled))
    many_classes = tmp_path / "other_classes.parquet"
    source.cast_column("label", ClassLabel(names=[f"class {i}" for i in range(1000)])).to_parquet(str(many_classes))
    for dataset, message in ((shuffled, "another label"), (many_classes, "have classes")):
        config = run_config(dataset, "unused", tmp_path / f"select_{dataset.stem}", scores_from=str(finished))
        with pytest.raises(ValueError, match=message):
            select_from_scores(config)
        assert not (tmp_path / f"select_{dataset.stem}" / "subsets").exists()


def test_colliding_ratios_are_refused_before_any_model_is_loaded(tmp_path, capsys):
    argv = ["run", "--dataset_name", str(tmp_path / "none.parquet"), "--model_name_or_path", str(tmp_path / "none")]
    assert main([*argv, "--selection_ratios", "0.5", "0.5000004", "--output_dir", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert "name the same subset twice (ratio_0.5)" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_clean_removes_only_the_caches_no_record_names(finished, cifar_slice, tiny_clip_path, tmp_path, capsys):
    output_dir = tmp_path / "run"
    shutil.copytree(finished, output_dir)
    used = verify(output_dir).cache_keys()
    stale = output_dir / "embeddings" / "0123456789abcdef"
    stale.mkdir()
    (stale / "chunk-00000-of-00001.arrow").write_bytes(b"x" * 1000)
    assert json.loads((output_dir / "run_summary.json").read_text())["embedding_cache_bytes"] > 0
    assert main(["clean", "--output_dir", str(output_dir)]) == 0
    assert f"removed {stale}" in capsys.readouterr().out
    assert sorted(p.name for p in (output_dir / "embeddings").iterdir()) == sorted(used)
    verify(output_dir, deep=True)
    labels = np.asarray(load_dataset(str(output_dir), "scores", split="train")["label"])
    assert len(labels) == 240


def test_a_run_written_before_run_records_is_told_how_to_become_one(finished, tmp_path):
    output_dir = tmp_path / "old"
    shutil.copytree(finished, output_dir)
    (output_dir / RECORD).unlink()  # what an hf_clipsel from before this change left
    with pytest.raises(IncompleteRunError, match="from before run records") as refused:
        verify(output_dir)
    assert "run_config.yaml" in str(refused.value)


def test_a_missing_folder_is_named_not_read_as_a_repo_id(tmp_path):
    import hf_clipsel

    for missing in (tmp_path / "nonexistent", "./not-here"):
        with pytest.raises(FileNotFoundError, match="is not a folder: give the output_dir of a finished run"):
            hf_clipsel.load_run(missing)


def test_a_record_without_a_setting_that_changes_results_disagrees_with_its_new_default():
    """A run recorded before damage_false_discovery (or duplicate_check) existed ran without it: the settings' new
    defaults select otherwise, so the record must not pass for a run at the defaults; a setting that declares no
    meaning for its absence (feature_store_dtype: float32 is what ran) still agrees."""
    from hf_clipsel.configs import ClipselConfig
    from hf_clipsel.runs.record import RunRecord, stage_settings

    config = ClipselConfig.from_flat({"dataset_name": "d"})
    settings = {stage: stage_settings(config, stage) for stage in ("score", "select")}
    for old_key in ("damage_false_discovery", "duplicate_check", "feature_store_dtype"):
        settings["select"].pop(old_key, None)
        settings["score"].pop(old_key, None)
    record = RunRecord(stages={stage: {"settings": values} for stage, values in settings.items()})
    assert record.disagreements(config) == ["damage_false_discovery", "duplicate_check"]
    as_before = ClipselConfig.from_flat(
        {"dataset_name": "d", "duplicate_check": False, "damage_false_discovery": None}
    )
    assert record.disagreements(as_before) == []
    # a record that holds the settings is compared as always
    full = RunRecord(stages={stage: {"settings": stage_settings(config, stage)} for stage in ("score", "select")})
    assert full.disagreements(config) == [] and full.disagreements(as_before) == [
        "damage_false_discovery",
        "duplicate_check",
    ]
