"""A run owns exactly what its record lists, a refused command writes nothing, a commit survives a stop at any
rename, and every reader checks the digests of the files it reads (issue 24, items 1-4)."""

import os
import shutil
import types
from pathlib import Path

import pytest

import hf_clipsel.runs.folder as folder_module
from hf_clipsel.cli import main
from hf_clipsel.core.names import RECORD
from hf_clipsel.pipeline import report, run
from hf_clipsel.runs.load import load_run
from hf_clipsel.runs.record import IncompleteRunError, read_record, verify
from tests.conftest import run_config


def _tree(folder: Path) -> dict[str, bytes] | None:
    """Every file and folder under ``folder`` with its bytes (None when it does not exist)."""
    if not folder.exists():
        return None
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else b"/" for p in folder.rglob("*")}


def _run_argv(cifar_slice, tiny_clip_path, output_dir, *extra) -> list[str]:
    return [
        "run", "--dataset_name", str(cifar_slice), "--model_name_or_path", str(tiny_clip_path),
        "--output_dir", str(output_dir), "--selection_ratios", "0.3", "0.5", "--knn_k", "5", "--adapter_epochs", "2",
        "--batch_size", "32", "--embedding_chunk_size", "64", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished(cifar_slice, tiny_clip_path, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    run(run_config(cifar_slice, tiny_clip_path, output_dir))
    return output_dir


@pytest.fixture(scope="module")
def other(cifar_slice, tiny_clip_path, tmp_path_factory) -> Path:
    """Another run of the same data (random subsets of the same sizes, other score columns)."""
    output_dir = tmp_path_factory.mktemp("other") / "run"
    run(run_config(cifar_slice, tiny_clip_path, output_dir, selection_method="random"))
    return output_dir


def _copy(run_dir: Path, tmp_path: Path, name: str = "run") -> Path:
    shutil.copytree(run_dir, tmp_path / name)
    return tmp_path / name


# -- item 1: a run owns exactly what its record lists -----------------------------------------------------------------
def test_a_folder_of_a_users_files_is_refused_and_with_overwrite_only_the_runs_entries_change(
    cifar_slice, tiny_clip_path, tmp_path, capsys
):
    project = tmp_path / "proj"
    (project / "report").mkdir(parents=True)
    (project / "report" / "notes.txt").write_text("my notes")
    (project / "scores").mkdir()
    (project / "scores" / "grades.csv").write_text("a,b\n1,2\n")
    (project / "README.md").write_text("# my project\n")
    (project / "mine.txt").write_text("keep me")
    before = _tree(project)
    assert main(_run_argv(cifar_slice, tiny_clip_path, project)) == 1
    error = capsys.readouterr().err.strip()
    assert "holds no hf-clipsel run" in error and "--overwrite_output_dir" in error and len(error.splitlines()) == 1
    assert _tree(project) == before
    # with --overwrite_output_dir the run's own entries are replaced, the rest stays
    assert main(_run_argv(cifar_slice, tiny_clip_path, project, "--overwrite_output_dir")) == 0
    verify(project, deep=True)
    assert (project / "mine.txt").read_text() == "keep me"
    assert not (project / "report" / "notes.txt").exists()  # report/ is the run's: replaced, as the README says


def test_an_output_dir_that_is_holds_or_lies_inside_the_source_is_refused(
    cifar_slice, tiny_clip_path, tmp_path, capsys
):
    source = tmp_path / "parent" / "srcdir"
    (source / "data").mkdir(parents=True)
    shutil.copyfile(cifar_slice, source / "data" / "train-00000-of-00001.parquet")
    before = _tree(tmp_path / "parent")
    for output_dir in (source, source / "run", tmp_path / "parent"):
        argv = _run_argv(cifar_slice, tiny_clip_path, output_dir)
        argv[argv.index("--dataset_name") + 1] = str(source)
        assert main([*argv, "--overwrite_output_dir"]) == 1, output_dir
        error = capsys.readouterr().err.strip()
        assert "the source dataset" in error and len(error.splitlines()) == 1, error
        assert _tree(tmp_path / "parent") == before
    # a source file's own folder may hold runs beside it; a folder holding the file may not be one
    argv = _run_argv(cifar_slice, tiny_clip_path, cifar_slice.parent)
    assert main([*argv, "--overwrite_output_dir"]) == 1 and "the source dataset" in capsys.readouterr().err


# -- item 3: a refused command writes nothing anywhere ---------------------------------------------------------------
def test_report_and_clean_on_a_folder_that_is_no_run_write_nothing(tmp_path, capsys):
    images = tmp_path / "imagefolder"
    (images / "cat").mkdir(parents=True)
    (images / "cat" / "a.png").write_bytes(b"\x89PNG not really")
    before = _tree(images)
    for command in ("report", "clean"):
        assert main([command, "--output_dir", str(images)]) == 1
        error = capsys.readouterr().err.strip()
        assert "is not an hf-clipsel run" in error and "stopped before" not in error and len(error.splitlines()) == 1
        assert _tree(images) == before
        assert main([command, "--output_dir", str(tmp_path / "missing")]) == 1
        assert "does not exist" in capsys.readouterr().err and not (tmp_path / "missing").exists()


def test_a_refused_stage_command_leaves_the_run_byte_identical(finished, tmp_path, capsys):
    output_dir = _copy(finished, tmp_path)
    before = _tree(output_dir)
    dataset = read_record(output_dir).stages["embed"]["settings"]["dataset_name"]
    assert main(["select", "--dataset_name", dataset, "--output_dir", str(output_dir), "--alpha", "0.9"]) == 1
    assert "other settings" in capsys.readouterr().err
    assert _tree(output_dir) == before


# -- item 4: a commit survives a stop at any rename ------------------------------------------------------------------
class Stopped(BaseException):
    """What a kill does to the commit: nothing after this point runs (not an error a command would handle)."""


def _stopping_os(after: int, calls: list):
    def replace(source, destination):
        calls.append((source, destination))
        if len(calls) > after:
            raise Stopped
        os.replace(source, destination)

    return types.SimpleNamespace(**{**vars(os), "replace": replace})


def test_a_commit_stopped_at_any_rename_is_finished_by_the_next_command(finished, tmp_path, monkeypatch, capsys):
    counted: list = []
    monkeypatch.setattr(folder_module, "os", _stopping_os(10**6, counted))
    report(_copy(finished, tmp_path, "count"))
    assert len(counted) >= 8  # the intent, the record, every entry out and in, the card
    kept = {k: v for k, v in verify(finished).artefacts.items() if not k.startswith("report/")}
    for after in range(len(counted)):
        output_dir = _copy(finished, tmp_path, f"stopped_{after}")
        monkeypatch.setattr(folder_module, "os", _stopping_os(after, []))
        with pytest.raises(Stopped):
            report(output_dir)
        monkeypatch.setattr(folder_module, "os", os)
        if after % 2:  # the next command, even one that is refused, finishes the swap
            dataset = verify(finished).stages["embed"]["settings"]["dataset_name"]
            argv = ["select", "--dataset_name", dataset, "--output_dir", str(output_dir), "--alpha", "0.9"]
            assert main(argv) == 1
            capsys.readouterr()
        else:
            report(output_dir)
        record = verify(output_dir, deep=True)
        assert {k: v for k, v in record.artefacts.items() if not k.startswith("report/")} == kept, after
        left = [p.name for p in output_dir.iterdir() if p.name.startswith((".staging-", ".trash-", ".hf_clipsel-"))]
        assert not left, after
        assert len(load_run(output_dir).subsets[0.3]) == 72


# -- item 2: every reader checks the digests of the files it reads ---------------------------------------------------
def _swap_in_shard(output_dir: Path, other: Path, entry: str) -> None:
    """Another run's shard bytes under this run's shard name."""
    (mine,) = (output_dir / entry).glob("*.parquet")
    (theirs,) = (other / entry).glob("*.parquet")
    assert mine.read_bytes() != theirs.read_bytes()
    mine.write_bytes(theirs.read_bytes())


@pytest.mark.parametrize("entry", ["subsets/ratio_0.3", "scores"])
def test_another_runs_shard_under_this_runs_name_is_refused_by_every_reader(entry, finished, other, tmp_path, capsys):
    output_dir = _copy(finished, tmp_path)
    _swap_in_shard(output_dir, other, entry)
    record = (output_dir / RECORD).read_bytes()
    with pytest.raises(IncompleteRunError, match="changed since written"):
        load_run(output_dir)
    dataset = read_record(output_dir).stages["embed"]["settings"]["dataset_name"]
    commands = [
        ["report", "--output_dir", str(output_dir)],
        ["push", "--output_dir", str(output_dir), "--hub_dataset_id", "acme/never"],
    ]
    if entry == "scores":  # select reads this run's scores
        commands.append(["select", "--dataset_name", dataset, "--output_dir", str(output_dir), "--selection_ratios",
                         "0.3", "0.4", "0.5"])  # fmt: skip
    for argv in commands:
        assert main(argv) == 1, argv
        error = capsys.readouterr().err.strip()
        assert "changed since written" in error and len(error.splitlines()) == 1, (argv, error)
        assert (output_dir / RECORD).read_bytes() == record, argv  # no digest recorded that the command did not write


def test_load_run_and_select_from_the_hub_check_the_files_against_the_pushed_record(
    finished, other, tmp_path, monkeypatch, capsys
):
    import huggingface_hub

    hub = _copy(finished, tmp_path, "hub")  # what the dataset repo holds (push uploads the record's files as-is)

    def download(repo_id, filename, repo_type=None, revision=None, token=None):  # the network edge
        assert repo_id == "acme/run" and repo_type == "dataset"
        return str(hub / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.chdir(tmp_path)
    assert len(load_run("acme/run").subsets[0.3]) == len(load_run(finished).subsets[0.3])
    _swap_in_shard(hub, other, "subsets/ratio_0.3")
    with pytest.raises(IncompleteRunError, match="its sha256 differs"):
        load_run("acme/run")
    # select --scores_from a Hub repo checks the scores it downloads against the pushed record too
    _swap_in_shard(hub, other, "scores")
    dataset = read_record(finished).stages["embed"]["settings"]["dataset_name"]
    argv = ["select", "--dataset_name", dataset, "--output_dir", str(tmp_path / "new"), "--scores_from", "acme/run"]
    capsys.readouterr()
    assert main(argv) == 1
    error = capsys.readouterr().err.strip()  # the progress bars of loading the first runs' files, then the error
    assert "scores/" in error.splitlines()[-1] and "its sha256 differs" in error and "Traceback" not in error, error


# -- item 9: push holds the lock, publishes the dataset before the adapters, and no local path ------------------------
class _RecordingHub:
    """The network edge of a push (huggingface_hub.HfApi): an empty Hub that records each commit and can refuse the
    commits of one repo type with a 403."""

    def __init__(self, refuse: str | None = None):
        self.commits: list[tuple[str, str, dict[str, bytes]]] = []
        self.refuse = refuse

    def __call__(self, token=None):
        return self

    def create_repo(self, repo_id, repo_type=None, **_):
        return f"https://hub.test/{repo_type}s/{repo_id}"

    def repo_info(self, repo_id, repo_type=None, **_):
        return types.SimpleNamespace(sha=f"{len(self.commits):040d}")

    def list_repo_tree(self, *_, **__):
        return []

    def create_commit(self, repo_id, operations, repo_type=None, **_):
        import httpx2
        from huggingface_hub.errors import HfHubHTTPError

        if repo_type == self.refuse:
            request = httpx2.Request("POST", f"https://hub.test/api/{repo_type}s/{repo_id}/commit/main")
            raise HfHubHTTPError("403 Forbidden", response=httpx2.Response(403, request=request))
        files = {}
        for operation in operations:
            source = operation.path_or_fileobj
            files[operation.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
        self.commits.append((repo_type, repo_id, files))
        return types.SimpleNamespace(oid=f"{len(self.commits):040d}")


def _push_argv(output_dir: Path) -> list[str]:
    return ["push", "--output_dir", str(output_dir), "--hub_dataset_id", "acme/data", "--hub_model_id", "acme/lora"]


def test_push_is_refused_while_the_run_is_held_and_pushes_the_dataset_before_the_adapters(
    finished, tmp_path, monkeypatch, capsys
):
    import hf_clipsel.hub as hub_module
    from hf_clipsel.runs.folder import LOCK, FolderLock

    output_dir = _copy(finished, tmp_path)
    hub = _RecordingHub()
    monkeypatch.setattr(hub_module, "HfApi", hub)
    lock = FolderLock(output_dir / LOCK)
    lock.acquire()  # another command holds the run
    try:
        assert main(_push_argv(output_dir)) == 1
    finally:
        lock.release()
    error = capsys.readouterr().err.strip()
    assert "is in use by" in error and len(error.splitlines()) == 1 and hub.commits == []
    # a 403 on the dataset: nothing is published, not the adapters either
    from huggingface_hub.errors import HfHubHTTPError

    refusing = _RecordingHub(refuse="dataset")
    monkeypatch.setattr(hub_module, "HfApi", refusing)
    with pytest.raises(HfHubHTTPError, match="403"):
        hub_module.push_outputs(output_dir, "acme/data", "acme/lora", max_files_per_commit=10**6)
    assert refusing.commits == []
    verify(output_dir, deep=True)  # the refused push left the run as it was
    monkeypatch.setattr(hub_module, "HfApi", hub)
    hub_module.push_outputs(output_dir, "acme/data", "acme/lora", max_files_per_commit=10**6)  # one commit each
    assert [repo_type for repo_type, _, _ in hub.commits] == ["dataset", "model"]


def test_a_push_publishes_no_path_of_this_machine(
    finished, tmp_path, tmp_path_factory, monkeypatch, cifar_slice, tiny_clip_path
):
    import json

    import hf_clipsel.hub as hub_module
    from hf_clipsel.publish import published_path
    from hf_clipsel.runs.record import RunRecord, file_digest

    output_dir = _copy(finished, tmp_path)
    before = {k: v for k, v in _tree(output_dir).items() if not k.startswith(".hf_clipsel")}
    hub = _RecordingHub()
    monkeypatch.setattr(hub_module, "HfApi", hub)
    hub_module.push_outputs(output_dir, "acme/data", "acme/lora", max_files_per_commit=10**6)  # one commit each
    assert {k: v for k, v in _tree(output_dir).items() if not k.startswith(".hf_clipsel")} == before  # run untouched
    local = [str(tmp_path_factory.getbasetemp()), str(Path.home())]
    for repo_type, _, files in hub.commits:
        for name, content in files.items():
            assert not any(path.encode() in content for path in local), (repo_type, name)
    (published,) = [files for repo_type, _, files in hub.commits if repo_type == "dataset"]
    card = published["README.md"].decode()
    assert f"`{cifar_slice.name}`" in card and f"`{tiny_clip_path.name}`" in card
    record = RunRecord.from_json(published[RECORD].decode())
    assert record.stages["embed"]["settings"]["dataset_name"] == cifar_slice.name
    written = tmp_path / "published"
    for name, content in published.items():
        (written / name).parent.mkdir(parents=True, exist_ok=True)
        (written / name).write_bytes(content)
    for name in [n for n in record.artefacts if not n.startswith("adapter/")]:  # the record vouches for the upload
        assert record.artefacts[name] == file_digest(written / name), name
    assert json.loads(published["run_summary.json"])["dataset"] == cifar_slice.name
    # the scores' path column: relative to the source's folder, a file name where the image lies outside it
    source = tmp_path / "images"
    assert published_path(str(source / "cat" / "1.png"), source) == "cat/1.png"
    assert published_path("/elsewhere/cache/2.png", source) == "2.png"
    assert published_path("cat/3.png", source) == "cat/3.png" and published_path(None, source) is None


# -- item 6: empty, undecodable and odd inputs end with one line ------------------------------------------------------
def test_empty_undecodable_url_and_duplicate_key_inputs_end_with_one_line(tmp_path, tiny_clip_path, capsys):
    from datasets import ClassLabel, Dataset, Features, Image

    labels = Features({"img": Image(), "label": ClassLabel(names=["a", "b"])})
    garbage = Dataset.from_dict(
        {"img": [{"bytes": b"not an image %d" % i, "path": None} for i in range(8)], "label": [0, 1] * 4},
        features=labels,
    )
    garbage.select([]).save_to_disk(str(tmp_path / "empty_disk"))
    garbage.to_parquet(str(tmp_path / "garbage.parquet"))
    urls = Dataset.from_dict({"url": [f"https://example.com/{i}.png" for i in range(8)], "label": ["a", "b"] * 4})
    urls.to_parquet(str(tmp_path / "urls.parquet"))
    (tmp_path / "twice.yaml").write_text(f"dataset_name: {tmp_path / 'garbage.parquet'}\nalpha: 0.5\nalpha: 0.9\n")
    cases = {
        "has no rows": ["--dataset_name", str(tmp_path / "empty_disk")],
        "none of the 8 images could be decoded": ["--dataset_name", str(tmp_path / "garbage.parquet")],
        "holds URLs": ["--dataset_name", str(tmp_path / "urls.parquet"), "--image_column", "url"],
        "'alpha' is given twice": ["--config", str(tmp_path / "twice.yaml")],
    }
    capsys.readouterr()
    for expected, args in cases.items():
        argv = ["run", *args, "--model_name_or_path", str(tiny_clip_path), "--output_dir", str(tmp_path / "out")]
        assert main([*argv, "--batch_size", "8", "--embedding_chunk_size", "8"]) == 1, expected
        error = capsys.readouterr().err.strip()  # progress bars, then the error
        assert expected in error.splitlines()[-1] and "Traceback" not in error, error


def test_an_empty_string_label_names_no_class():
    from datasets import Dataset

    from hf_clipsel.data import resolve_labels

    names, labels, problems, _ = resolve_labels(Dataset.from_dict({"label": ["cat", "", "dog", "  "]}), "label", None)
    assert names == ["cat", "dog"] and labels.tolist() == [0, -1, 1, -1] and problems[1] == "label missing"


def test_the_given_labels_are_one_string_per_distinct_label():
    """Each row's label as text is held for the whole run: equal labels share one string object, so the list costs
    a pointer a row and not a string a row (0.7 GiB at ImageNet-21k's 13M rows)."""
    from datasets import ClassLabel, Dataset, Features

    from hf_clipsel.data import resolve_labels

    rows = Dataset.from_dict({"label": [1000, 1001, 1000, 1001]}, features=Features({"label": ClassLabel(2000)}))
    *_, given = resolve_labels(rows, "label", None)
    assert given == ["1000", "1001", "1000", "1001"] and given[0] is given[2] and given[1] is given[3]


def test_a_write_error_names_the_folder_being_written(tmp_path):
    import errno

    from hf_clipsel.runs.folder import RunFolder

    with pytest.raises(OSError, match="File too large while writing the run into") as raised:
        with RunFolder(tmp_path / "run") as folder:
            folder.stage()
            raise OSError(errno.EFBIG, "File too large")  # what a write past the file size limit raises: no file
    assert raised.value.filename.startswith(str(tmp_path / "run" / ".staging-"))
    assert not list((tmp_path / "run").glob(".staging-*"))


def test_an_image_folder_without_labels_says_how_to_lay_it_out(tmp_path):
    from PIL import Image as PILImage

    from hf_clipsel.configs import DataConfig
    from hf_clipsel.data import load_source, prepare_source

    for folder in ("cat", "more/dog"):  # images at two depths: datasets infers no labels
        (tmp_path / folder).mkdir(parents=True)
        PILImage.new("RGB", (4, 4)).save(tmp_path / folder / "0.png")
    config = DataConfig(dataset_name=str(tmp_path))
    with pytest.raises(ValueError, match="same depth in a folder named after its class"):
        prepare_source(load_source(config), config)


def test_a_push_rewrites_the_report_pages_paths_and_leaves_the_runs_own_page(tmp_path):
    """The explorer's path column is base64 inside its chunk files, where a text rewrite cannot see a local path."""
    import base64
    import json
    import os

    import numpy as np

    from hf_clipsel.core.names import PATH
    from hf_clipsel.publish import published_path
    from hf_clipsel.report_page_data import map_text_column, write_chunks

    source = tmp_path / "images"
    paths = np.asarray([str(source / "cat" / "1.png"), "/home/me/.cache/x/2.png", ""], dtype=object)
    run_data, staging = tmp_path / "run", tmp_path / "staging"
    run_data.mkdir()
    staging.mkdir()
    write_chunks(PATH, paths, run_data)
    for chunk in run_data.iterdir():  # the push stages hard links of the run's files
        os.link(chunk, staging / chunk.name)
    map_text_column(staging, PATH, lambda path: published_path(path, source))

    def rows(folder):
        (chunk,) = folder.glob("*.js")
        return json.loads(base64.b64decode(chunk.read_text().split('"')[-2]))

    assert rows(staging) == ["cat/1.png", "2.png", ""]
    assert rows(run_data) == paths.tolist()  # the run's own page keeps the paths it can act on
