"""What a new user meets in the first hour: a dataset already in memory as the source, files as answers (each row's
path in the scores, and `hf-clipsel export` of a ratio's dropped or kept files), and a fast, one-line failure when
the Hub cannot be reached."""

import pytest
import yaml
from conftest import CIFAR10, run_config
from datasets import load_dataset

import hf_clipsel
from hf_clipsel.runs.load import load_run
from hf_clipsel.runs.record import read_record


def _cifar_in_memory():
    return load_dataset("parquet", data_files=str(CIFAR10 / "train-00000-of-00001.parquet"), split="train")


def test_run_takes_a_dataset_in_memory_and_names_it_by_its_fingerprint(tmp_path, tiny_clip_path, caplog):
    dataset = _cifar_in_memory()
    before = (dataset._fingerprint, dataset.column_names, len(dataset))
    config = run_config(None, tiny_clip_path, tmp_path / "run", dataset_name=None)
    summary = hf_clipsel.run(config, dataset=dataset)

    assert summary.num_rows == len(dataset)
    assert not [r.message for r in caplog.records if "did not load" in r.message]  # the report knows why
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

    again = run_config(None, tiny_clip_path, tmp_path / "run", dataset_name=None, selection_ratios=[0.4])
    hf_clipsel.select_from_scores(again, dataset=dataset)  # a ratio added from the scores, the source in memory
    assert load_run(tmp_path / "run").ratios == [0.3, 0.4, 0.5]


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


def _image_folder(root, per_class=6, corrupt=1):
    """An image folder of fixture images (PNG, one folder per class) and ``corrupt`` files that are not images;
    returns {file path: class name}."""
    dataset = _cifar_in_memory()
    names = dataset.features["label"].names
    written = {}
    counts = {}
    for row in dataset:
        name = names[row["label"]]
        if counts.get(name, 0) == per_class:
            continue
        counts[name] = counts.get(name, 0) + 1
        path = root / name / f"{name}_{counts[name]}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        row["img"].save(path)
        written[str(path)] = name
    for index in range(corrupt):
        path = root / names[0] / f"broken_{index}.png"
        path.write_bytes(b"not an image")
        written[str(path)] = names[0]
    return written


def test_an_image_folder_gives_each_row_its_file_and_export_writes_the_dropped_ones(tmp_path, tiny_clip_path):
    import csv

    from conftest import cli

    files = _image_folder(tmp_path / "folder")
    config = run_config(tmp_path / "folder", tiny_clip_path, tmp_path / "run")
    hf_clipsel.run(config)
    scores = load_run(tmp_path / "run").scores
    assert scores.features["path"].dtype == "string"
    paths = scores["path"][:]
    assert sorted(paths) == sorted(files)  # every row names its real file, each once
    names = scores.features["label"].names
    assert [files[path] for path in paths] == [names[label] for label in scores["label"][:]]

    answer = cli("export", "--output_dir", str(tmp_path / "run"), "--ratio", "0.5", "--dropped", "--to",
                 str(tmp_path / "dropped.csv"))  # fmt: skip
    assert answer.returncode == 0, answer.stderr
    with open(tmp_path / "dropped.csv", newline="") as handle:
        exported = list(csv.DictReader(handle))
    dropped = [row for row in range(len(scores)) if not scores["is_selected_ratio_0.5"][row]]
    assert [int(row["row_id"]) for row in exported] == dropped
    assert [row["path"] for row in exported] == [paths[row] for row in dropped]
    assert [row["drop_reason"] for row in exported] == [scores["drop_reason_ratio_0.5"][row] for row in dropped]
    assert all(row["drop_reason"] for row in exported)
    broken = [row for row in exported if "broken_0.png" in row["path"]]
    assert len(broken) == 1 and broken[0]["drop_reason"] == "undecodable"
    assert {"given_label", "semantic_alignment", "sample_diversity", "noise_level"} <= set(exported[0])

    kept = cli("export", "--output_dir", str(tmp_path / "run"), "--ratio", "0.5", "--kept", "--to",
               str(tmp_path / "kept.csv"))  # fmt: skip
    assert kept.returncode == 0, kept.stderr
    with open(tmp_path / "kept.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) + len(exported) == len(scores)

    missing = cli("export", "--output_dir", str(tmp_path / "run"), "--ratio", "0.4")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "0.3, 0.5" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def test_a_column_of_paths_names_its_files_and_bytes_only_cells_none(tmp_path):
    from datasets import Dataset

    from hf_clipsel.configs import DataConfig
    from hf_clipsel.data import prepare_source
    from hf_clipsel.scores_table import image_paths

    files = _image_folder(tmp_path / "folder", per_class=1, corrupt=0)
    listed = Dataset.from_dict({"file": list(files), "label": list(files.values())})
    source = prepare_source(listed, DataConfig(dataset_name="files.csv", image_column="file"))
    assert image_paths(source).to_pylist() == list(files)
    assert listed.features["file"].dtype == "string"  # the source itself is not cast
    embedded = prepare_source(_cifar_in_memory(), DataConfig(dataset_name="cifar"))
    assert image_paths(embedded).to_pylist() == [""] * embedded.num_rows  # bytes only: no file to name


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:  # bound, then closed: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("what", ["model", "dataset"])
def test_an_unreachable_hub_fails_fast_in_one_line(tmp_path, tiny_clip_path, cifar_slice, what):
    import os
    import time

    from conftest import cli

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    model, dataset = str(tiny_clip_path), str(cifar_slice)
    hub_id = "openai/clip-vit-base-patch32" if what == "model" else "uoft-cs/cifar10"
    if what == "model":
        model = hub_id
    else:
        dataset = hub_id
    start = time.monotonic()
    answer = cli("run", "--dataset_name", dataset, "--model_name_or_path", model, "--output_dir",
                 str(tmp_path / "run"), env=env)  # fmt: skip
    elapsed = time.monotonic() - start
    assert answer.returncode == 1, answer.stderr[-2000:]
    assert elapsed < 20, f"{elapsed:.1f}s"  # retries would take about a minute
    output = (answer.stdout + answer.stderr).strip().splitlines()
    assert "Traceback" not in answer.stderr and not [line for line in output if "Retrying" in line]
    error = [line for line in output if line.startswith("hf-clipsel run: error:")]
    assert len(error) == 1 and "cannot be reached" in error[0] and hub_id in error[0]
    assert "HF_HUB_OFFLINE=1" in error[0] and "local path" in error[0]


def test_a_push_to_an_unreachable_hub_fails_fast_in_one_line(tmp_path, tiny_clip_path, cifar_slice):
    import os
    import time

    from conftest import cli

    hf_clipsel.run(run_config(cifar_slice, tiny_clip_path, tmp_path / "run", max_samples=60))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    env["HF_TOKEN"] = "hf_not_a_real_token"
    start = time.monotonic()
    answer = cli("push", "--output_dir", str(tmp_path / "run"), "--hub_dataset_id", "someone/selected", env=env)
    elapsed = time.monotonic() - start
    assert answer.returncode == 1 and elapsed < 20, (elapsed, answer.stderr[-2000:])
    assert "Traceback" not in answer.stderr and "Retrying" not in answer.stderr
    assert "cannot be reached" in answer.stderr and "someone/selected" in answer.stderr


def _wordnet_source(class_names, **data):
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature
    from PIL import Image

    from hf_clipsel.configs import DataConfig
    from hf_clipsel.data import prepare_source

    images = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(len(class_names))]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=class_names)})
    dataset = Dataset.from_dict({"image": images, "label": list(range(len(class_names)))}, features=features)
    return dataset, prepare_source(dataset, DataConfig(dataset_name="folder", **data))


def test_wordnet_id_classes_are_said_by_their_imagenet_names_in_the_prompts(caplog):
    from types import SimpleNamespace

    from timm.data import ImageNetInfo

    from hf_clipsel.configs import ClipselConfig
    from hf_clipsel.context import prompts_of

    # Imagenette's ten folders, and the two ImageNet-1k classes whose first name is "crane"
    ids = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916", "n03417042", "n03425413",
           "n03445777", "n03888605", "n02012849", "n03126707"]  # fmt: skip
    dataset, source = _wordnet_source(ids)
    assert source.class_names == ids and dataset.features["label"].names == ids  # the labels keep the ids
    names = source.prompt_names
    assert names[:3] == ["tench", "English springer", "cassette player"]
    info = ImageNetInfo()
    assert names == [info.label_name_to_description(i).split(", ")[0] for i in ids[:10]] + names[10:]
    assert len(set(names)) == len(ids) and all(name.startswith("crane") for name in names[10:])  # no shared prompt
    run = SimpleNamespace(source=source, config=ClipselConfig.from_flat({}))  # what prompts_of reads of a run
    assert prompts_of(run)[0][:2] == ["a photo of a tench.", "a photo of a English springer."]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_unknown_wordnet_ids_warn_once_and_point_to_the_class_names_options(tmp_path, caplog):
    import logging

    ids = ["n01440764", "n99999999", "n02102040"]
    with caplog.at_level(logging.WARNING):
        _, source = _wordnet_source(ids)
    assert source.prompt_names == ids
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "n99999999" in warnings[0]
    assert "--class_names" in warnings[0] and "--class_names_file" in warnings[0]

    listed = tmp_path / "names.txt"
    listed.write_text("tench\n springer spaniel \nmystery fish\n\n")
    _, named = _wordnet_source(ids, class_names_file=str(listed))
    assert named.class_names == named.prompt_names == ["tench", "springer spaniel", "mystery fish"]


@pytest.mark.parametrize(
    ("text", "problem"), [(None, "cannot be read"), ("a\n\nb\n", "line 2 is empty"), ("\n", "holds no class name")]
)
def test_a_bad_class_names_file_is_one_clear_line(tmp_path, text, problem):
    path = tmp_path / "names.txt"
    if text is not None:
        path.write_text(text)
    with pytest.raises((OSError, ValueError)) as raised:  # the two the CLI prints as one line
        _wordnet_source(["n01440764", "n02102040"], class_names_file=str(path))
    assert problem in str(raised.value) and "one class name per line" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_class_names_and_a_class_names_file_together_are_refused():
    from hf_clipsel.configs import DataConfig

    with pytest.raises(ValueError, match="give one of them"):
        DataConfig(class_names=["a"], class_names_file="names.txt")


def test_each_library_warning_is_printed_once():
    import subprocess
    import sys

    # The CLI's logging set up by a real command (one that fails fast), then a warning from each library that
    # prints its own (huggingface_hub's retries, datasets' loading) and one of hf_clipsel's.
    code = (
        "import logging\n"
        "from hf_clipsel.cli import main\n"
        "main(['export', '--output_dir', 'no/such/run', '--ratio', '0.5'])\n"
        "for name in ('huggingface_hub.utils._http', 'datasets.load', 'hf_clipsel.data'):\n"
        "    logging.getLogger(name).warning('probe from %s', name)\n"
    )
    answer = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert answer.returncode == 0, answer.stderr
    for name in ("huggingface_hub.utils._http", "datasets.load", "hf_clipsel.data"):
        assert answer.stderr.count(f"probe from {name}") == 1, answer.stderr
