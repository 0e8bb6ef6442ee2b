"""What a new user meets in the first hour: a dataset already in memory as the source, files as answers (each row's
path in the scores, and `hf-clipsel export` of a ratio's dropped or kept files), and a fast, one-line failure when
the Hub cannot be reached."""

import yaml
from conftest import CIFAR10, run_config
from datasets import load_dataset

import hf_clipsel
from hf_clipsel.runs.load import load_run
from hf_clipsel.runs.record import read_record


def _cifar_in_memory():
    return load_dataset("parquet", data_files=str(CIFAR10 / "train-00000-of-00001.parquet"), split="train")


def test_run_takes_a_dataset_in_memory_and_names_it_by_its_fingerprint(tmp_path, tiny_clip_path):
    dataset = _cifar_in_memory()
    before = (dataset._fingerprint, dataset.column_names, len(dataset))
    config = run_config(None, tiny_clip_path, tmp_path / "run", dataset_name=None)
    summary = hf_clipsel.run(config, dataset=dataset)

    assert summary.num_rows == len(dataset)
    assert (dataset._fingerprint, dataset.column_names, len(dataset)) == before  # the source is untouched
    finished = load_run(tmp_path / "run")
    assert finished.ratios == [0.3, 0.5]
    assert len(finished.subsets[0.5]) == len(dataset) // 2
    assert set(dataset.column_names) < set(finished.subsets[0.5].column_names)
    described = f"in-memory Dataset (fingerprint {dataset._fingerprint})"
    assert read_record(tmp_path / "run").source["description"] == described
    written = yaml.safe_load((tmp_path / "run" / "run_config.yaml").read_text())
    assert written["dataset_name"] is None
    assert written["source"]["description"] == described
    card = (tmp_path / "run" / "README.md").read_text()
    assert described in card and "Dataset({" not in card


def test_a_dataset_and_a_dataset_name_together_are_refused(tmp_path, tiny_clip_path, cifar_slice):
    config = run_config(cifar_slice, tiny_clip_path, tmp_path / "run")
    try:
        hf_clipsel.run(config, dataset=_cifar_in_memory())
    except ValueError as error:
        message = str(error)
    else:
        raise AssertionError("a dataset and a dataset_name together ran")
    assert "\n" not in message and "dataset_name" in message and "one of them" in message


def test_an_iterable_dataset_is_refused_in_one_line(tmp_path, tiny_clip_path):
    config = run_config(None, tiny_clip_path, tmp_path / "run", dataset_name=None)
    try:
        hf_clipsel.run(config, dataset=_cifar_in_memory().to_iterable_dataset())
    except ValueError as error:
        message = str(error)
    else:
        raise AssertionError("an IterableDataset ran without an identity")
    assert "\n" not in message and "fingerprint" in message
