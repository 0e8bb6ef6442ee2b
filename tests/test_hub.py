"""Pushing a run's outputs and reading them back, offline, against the local Hub stand-in.

Pushing and loading run in one fresh interpreter pointed at the stand-in (``hub_stand_in.ChildWorker``):
``huggingface_hub`` and ``datasets`` read ``HF_ENDPOINT`` and the offline flags once, at import, and conftest sets
``HF_HUB_OFFLINE=1`` for this process. The stand-in runs in this process, so the tests inspect its commits, uploads
and request log directly.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import time
from pathlib import Path

import httpx2
import huggingface_hub
import numpy as np
import pytest
import yaml
from datasets import ClassLabel, Dataset, Features, Image, Value
from hub_stand_in import ChildWorker, HubStandIn, child_env  # tests/ is on sys.path under pytest
from huggingface_hub import DatasetCard
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from PIL import Image as PILImage

from hf_clipsel.cards import render_adapter_card, render_dataset_card
from hf_clipsel.core.names import RECORD
from hf_clipsel.hub import _matches, is_transient, push_outputs
from hf_clipsel.outputs import ratio_name
from hf_clipsel.runs.record import RunRecord, artefact_sizes, file_digest
from hf_clipsel.scores_table import reward_column, selected_column

FAKE_TOKEN = "hf_FakeTokenForTestsOnly0123456789abcdef"
CLASS_NAMES = ["cat", "dog", "frog"]
RATIOS = (0.3, 0.5)
NUM_ROWS = 36
SHARDS = 3  # parquet files per subset, so a small max_files_per_commit forces several commits


def _png(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_clip_path) -> Path:
    """A tiny PEFT LoRA over the tiny CLIPModel, saved with save_pretrained."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPModel

    model = get_peft_model(
        CLIPModel.from_pretrained(tiny_clip_path),
        LoraConfig(r=4, lora_alpha=4, target_modules=["visual_projection", "text_projection"]),
    )
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # LoRA starts at B = 0; make the saved adapter a non-trivial one
            torch.nn.init.normal_(parameter)
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return path


def build_output_dir(path: Path, adapter: Path, seed: int = 0) -> Path:
    """An output_dir in the layout the pipeline writes, made by hand: scores, subsets in shards, adapter, card."""
    rng = np.random.default_rng(seed)
    features = Features(
        {"image": Image(), "label": ClassLabel(names=CLASS_NAMES), "note": Value("string"), "row_id": Value("int64")}
    )
    source = Dataset.from_dict(
        {
            "image": [{"bytes": _png(rng), "path": None} for _ in range(NUM_ROWS)],
            "label": [i % len(CLASS_NAMES) for i in range(NUM_ROWS)],
            "note": [f"row {i}" for i in range(NUM_ROWS)],
            "row_id": list(range(NUM_ROWS)),
        },
        features=features,
    )
    flag_reason = [""] * NUM_ROWS
    flag_reason[5] = "image did not decode"
    alignment = rng.uniform(-0.2, 0.4, NUM_ROWS).astype(np.float32)
    diversity = rng.uniform(0.5, 2.0, NUM_ROWS).astype(np.float32)
    scores = {
        "row_id": np.arange(NUM_ROWS, dtype=np.int64),
        "label": source["label"][:],
        "decode_ok": [reason == "" for reason in flag_reason],
        "flag_reason": flag_reason,
        "semantic_alignment": alignment,
        "sample_diversity": diversity,
        "semantic_alignment_normalized": (alignment - alignment.min()) / np.ptp(alignment),
        "sample_diversity_normalized": (diversity - diversity.min()) / np.ptp(diversity),
    }
    score_features = {
        "row_id": Value("int64"),
        "label": ClassLabel(names=CLASS_NAMES),
        "decode_ok": Value("bool"),
        "flag_reason": Value("string"),
        **{
            name: Value("float32")
            for name in (
                "semantic_alignment",
                "sample_diversity",
                "semantic_alignment_normalized",
                "sample_diversity_normalized",
            )
        },
    }
    ratios_summary = {}
    for ratio in RATIOS:
        reward = scores["semantic_alignment_normalized"] + 0.1 * scores["sample_diversity_normalized"]
        reward[5] = -np.inf
        k = int(ratio * NUM_ROWS)
        selected = np.zeros(NUM_ROWS, dtype=bool)
        selected[np.argsort(-reward, kind="stable")[:k]] = True
        scores[reward_column(ratio)] = np.where(np.isfinite(reward), reward, np.nan).astype(np.float32)
        scores[selected_column(ratio)] = selected
        score_features[reward_column(ratio)] = Value("float32")
        score_features[selected_column(ratio)] = Value("bool")
        subset_dir = path / "subsets" / ratio_name(ratio)
        subset_dir.mkdir(parents=True)
        subset = source.select(np.flatnonzero(selected).tolist())
        for index in range(SHARDS):
            shard = subset.shard(SHARDS, index, contiguous=True)
            shard.to_parquet(str(subset_dir / f"train-{index:05d}-of-{SHARDS:05d}.parquet"))
        labels = np.asarray(source["label"][:])
        ratios_summary[f"{ratio:g}"] = {
            "budget": k,
            "kept": int(selected.sum()),
            "shortfall": int(k - selected.sum()),
            "kept_per_class": {name: int((selected & (labels == c)).sum()) for c, name in enumerate(CLASS_NAMES)},
        }
    (path / "scores").mkdir(parents=True)
    Dataset.from_dict(scores, features=Features(score_features)).to_parquet(str(path / "scores" / "scores.parquet"))
    run_config = {
        "dataset_name": "acme/pets",
        "dataset_split": "train",
        "dataset_revision": None,
        "model_name_or_path": "acme/tiny-clip",
        "model_revision": None,
        "adapter_preset": "projection",
        "lora_rank": 4,
        "objective": "class_ce",
        "adapter_epochs": 2,
        "prompt_templates": ["a photo of a {}."],
        "knn_k": 5,
        "selection_ratios": list(RATIOS),
        "selection_method": "exact",
        "alpha": 0.1,
        "beta": 2.0,
        "seed": 0,
        "output_dir": str(path),
        "push_to_hub": True,
        "hub_dataset_id": "acme/pets-clipsel",
        "versions": {"python": "3.11", "datasets": "5"},
        "command": "hf-clipsel run --dataset_name acme/pets --selection_ratios 0.3 0.5",
    }
    (path / "run_config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
    summary = {
        "num_rows": NUM_ROWS,
        "num_valid": NUM_ROWS - 1,
        "num_flagged": 1,
        "class_names": CLASS_NAMES,
        "dataset": "acme/pets",
        "dataset_revision": "0123abc",
        "model": "acme/tiny-clip",
        "model_revision": None,
        "selection_method": "exact",
        "ratios": ratios_summary,
    }
    (path / "run_summary.json").write_text(json.dumps(summary, indent=2))
    shutil.copytree(adapter, path / "adapter")
    (path / "stray").mkdir()  # e.g. the demo's source data: not part of the contract, so never pushed
    (path / "stray" / "data.parquet").write_bytes(b"not an output of the run")
    (path / "embeddings").mkdir()
    (path / "embeddings" / "chunk-00000.parquet").write_bytes(b"cache that must never be pushed")
    (path / "report").mkdir()
    (path / "report" / "score_distributions.png").write_bytes(_png(rng))
    (path / "README.md").write_text(str(render_dataset_card(path)))
    return record_by_hand(path)


def record_by_hand(path: Path) -> Path:
    """The run record of a folder made by hand (what a run writes last): its artefacts and their digests."""
    record = RunRecord(stages={"select": {"settings": {"selection_ratios": list(RATIOS)}}})
    record.artefacts = {name: file_digest(path / name) for name in artefact_sizes(path)}
    (path / RECORD).write_text(record.to_json())
    return path


# -- helpers -------------------------------------------------------------------------------------------------------
PUSH = """
from hf_clipsel.hub import HubPushError, push_outputs
try:
    pushed = push_outputs(**params)
except HubPushError as error:
    result = {"ok": False, "error": str(error)}
else:
    result = {"ok": True, "dataset_commits": pushed.dataset.commits,
              "model_commits": pushed.model.commits if pushed.model else []}
"""

LOAD = """
import json
from datasets import Image, load_dataset
from huggingface_hub import DatasetCard, ModelCard
from hf_clipsel.hub import load_scores

def dump(dataset):
    if "image" in dataset.features:
        dataset = dataset.cast_column("image", Image(decode=False))
    # json keeps NaN == NaN and bytes as hex: equal strings mean equal rows, images byte for byte
    return json.dumps(dataset.to_list(), sort_keys=True, default=lambda value: value.hex())

result = {}
for config in params["configs"]:
    remote = load_dataset(params["repo"], config, split="train")
    local = load_dataset(params["output_dir"], config, split="train")
    result[config] = {"rows_equal": dump(remote) == dump(local), "features_equal": remote.features == local.features,
                      "row_ids": remote["row_id"][:], "label_names": remote.features["label"].names}
result["load_scores_equal"] = dump(load_scores(params["repo"])) == dump(load_scores(params["output_dir"]))
if params.get("model_repo"):
    card, model_card = DatasetCard.load(params["repo"]), ModelCard.load(params["model_repo"])
    result["card"] = {"data": card.data.to_dict(), "text": card.text}
    result["model_card"] = {"data": model_card.data.to_dict(), "text": model_card.text}
"""

PEFT = """
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import CLIPModel

model = PeftModel.from_pretrained(CLIPModel.from_pretrained(params["clip"]), params["model_repo"])
loaded, saved = get_peft_model_state_dict(model), load_file(params["adapter_file"])
same = sorted(loaded) == sorted(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
result = {"same": same, "keys": len(saved), "nonzero": all(v.abs().sum() > 0 for v in saved.values())}
"""


def _push(worker: ChildWorker, output_dir: Path, repo: str, model_repo: str | None = None, **options):
    params = {
        "output_dir": str(output_dir),
        "dataset_repo_id": repo,
        "model_repo_id": model_repo,
        "retry_wait": 0.01,
        "max_wait": 0.05,
        **options,
    }
    return worker.call(PUSH, params)


def _configs_of(readme: str) -> dict[str, list[str]]:
    patterns = {}
    for config in DatasetCard(readme).data.to_dict().get("configs") or []:
        patterns[config["config_name"]] = [item["path"] for item in config["data_files"]]
    return patterns


def _config_contents(files: dict[str, str], patterns: dict[str, list[str]]) -> dict[str, dict[str, str]]:
    """{config: {path: sha256}} of the files each config's globs match."""
    return {
        name: {p: sha for p, sha in files.items() if any(_matches(p, g) for g in globs)}
        for name, globs in patterns.items()
    }


def _local_contents(output_dir: Path) -> dict[str, dict[str, str]]:
    import hashlib

    files = {
        p.relative_to(output_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in output_dir.rglob("*.parquet")
    }
    return _config_contents(files, _configs_of((output_dir / "README.md").read_text()))


def assert_configs_never_partial(hub: HubStandIn, repo: str, *runs: Path) -> int:
    """At every commit, each config the README lists holds exactly the files of that config in one of ``runs``
    (same paths, same bytes): never a part of a run, never a mix of two. Returns the number of commits checked."""
    expected = [_local_contents(run) for run in runs]
    history = hub.history(repo)
    for commit in history:
        assert not any(p.startswith(("embeddings/", "adapter/")) for p in commit.files), commit.message
        if "README.md" not in commit.files:
            continue
        listed = _configs_of(hub.blob(commit.files["README.md"].sha256).decode())
        at_commit = _config_contents({p: e.sha256 for p, e in commit.files.items()}, listed)
        for name, files in at_commit.items():
            assert files, f"{commit.message}: config {name} is listed but has no files"
            assert any(files == run.get(name) for run in expected), f"{commit.message}: config {name} is partial"
    return len(history)


def _lfs_objects(hub: HubStandIn, repo: str, repo_type: str = "dataset") -> set[str]:
    return {e.sha256 for e in hub.history(repo, repo_type)[-1].files.values() if e.lfs}


def _assert_no_token(text: str) -> None:
    assert FAKE_TOKEN not in text
    assert FAKE_TOKEN[3:] not in text  # not even without its prefix


@pytest.fixture(scope="module")
def hub():
    with HubStandIn() as stand_in:
        yield stand_in


@pytest.fixture(scope="module")
def worker(hub, tmp_path_factory):
    """One interpreter pointed at the stand-in, with a fake token in HF_TOKEN, for every push and load here."""
    home = tmp_path_factory.mktemp("worker")
    with ChildWorker(child_env(hub, home, token=FAKE_TOKEN), cwd=home) as child:
        yield child


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory, adapter_dir) -> Path:
    return build_output_dir(tmp_path_factory.mktemp("run") / "output", adapter_dir)


@pytest.fixture(scope="module")
def pushed(worker, output_dir):
    """output_dir pushed to acme/pets-clipsel (in batches of 4 files) and its adapters to acme/pets-adapter."""
    result, output = _push(
        worker, output_dir, "acme/pets-clipsel", "acme/pets-adapter", private=True, max_files_per_commit=4
    )
    assert result["ok"], result
    return result, output


# -- cards ---------------------------------------------------------------------------------------------------------
def test_dataset_card_carries_the_run(output_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    card = render_dataset_card(output_dir, dataset_repo_id="acme/pets-clipsel", model_repo_id="acme/pets-adapter")
    data = card.data.to_dict()
    assert [c["config_name"] for c in data["configs"]] == ["default", "ratio_0.3", "ratio_0.5", "scores"]
    # the default config holds every ratio as a split (timm's hfds/ reader names no config)
    assert data["configs"][0]["default"] and data["configs"][0]["data_files"] == [
        {"split": "ratio_0.3", "path": "subsets/ratio_0.3/*.parquet"},
        {"split": "ratio_0.5", "path": "subsets/ratio_0.5/*.parquet"},
    ]
    assert data["configs"][1]["data_files"] == [{"split": "train", "path": "subsets/ratio_0.3/*.parquet"}]
    assert data["configs"][-1]["data_files"] == [{"split": "train", "path": "scores/*.parquet"}]
    assert data["source_datasets"] == ["acme/pets"] and "hf-clipsel" in data["tags"]
    text = card.text
    for expected in (
        'load_dataset("acme/pets-clipsel", "ratio_0.3", split="train")',
        'load_dataset("acme/pets-clipsel", "scores", split="train")',
        "acme/tiny-clip",
        "0123abc",
        "acme/pets-adapter",
        "hf-clipsel run --config run_config.yaml",
        "hf-clipsel run --dataset_name acme/pets --selection_ratios 0.3 0.5",
        "arXiv",
        "2410.11215",
        "Yang, Suorong",
        "ICLR",
        "| `semantic_alignment` |",
        "| `reward_ratio_0.5` |",
        "median",
        "report/score_distributions.png",
        "| `knn_k` | `5` |",
        "| datasets | 5 |",
        "1 flagged",
    ):
        assert expected in text, expected
    # counts come from the scores: 10 and 18 rows kept, per class too
    assert "| `ratio_0.3` | 0.3 | 10 | 10 | 0 |" in text
    scores = Dataset.from_parquet(str(output_dir / "scores" / "scores.parquet"))
    kept = np.asarray(scores[selected_column(0.5)][:]) & (np.asarray(scores["label"][:]) == 1)
    assert re.search(rf"\| dog \| 12 \| \d+ \| {kept.sum()} \|", text)
    # the card written in output_dir keeps working with load_dataset, locally
    assert DatasetCard.load(output_dir / "README.md").data.to_dict()["configs"] == data["configs"]


def test_cards_never_render_a_token(output_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    run = tmp_path / "run"
    shutil.copytree(output_dir, run)
    config = yaml.safe_load((run / "run_config.yaml").read_text())
    config["command"] += f" --note {FAKE_TOKEN} hf_AnotherLookalikeToken1234567890"
    (run / "run_config.yaml").write_text(yaml.safe_dump(config))
    for card in (render_dataset_card(run), render_adapter_card(run)):
        _assert_no_token(str(card))
        assert "hf_AnotherLookalikeToken1234567890" not in str(card)


def test_adapter_card(output_dir):
    card = render_adapter_card(output_dir, model_repo_id="acme/pets-adapter", dataset_repo_id="acme/pets-clipsel")
    data = card.data.to_dict()
    assert data["base_model"] == "acme/tiny-clip" and data["library_name"] == "peft"
    assert {"hf-clipsel", "clip", "lora"} <= set(data["tags"]) and data["datasets"] == ["acme/pets"]
    assert 'PeftModel.from_pretrained(base, "acme/pets-adapter")' in card.text
    assert 'CLIPModel.from_pretrained("acme/tiny-clip")' in card.text and "`r` | `4`" in card.text


def test_adapter_card_never_guesses_an_unknown_checkpoint(tmp_path):
    (tmp_path / "adapter").mkdir()
    card = render_adapter_card(tmp_path)
    assert card.data.to_dict().get("base_model") is None
    assert "openai/clip" not in card.text and "unrecorded CLIP checkpoint" in card.text


def test_helpers():
    assert _matches("subsets/ratio_0.3/train-00000-of-00003.parquet", "subsets/ratio_0.3/*.parquet")
    assert not _matches("subsets/ratio_0.3/x/train.parquet", "subsets/ratio_0.3/*.parquet")
    assert not _matches("subsets/ratio_0.35/train.parquet", "subsets/ratio_0.3/*.parquet")
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert not is_transient(ValueError("bad yaml"))
    wrapped = RuntimeError("Error while uploading")
    wrapped.__cause__ = ConnectionResetError()
    assert is_transient(wrapped)
    # permanent: offline mode (a ConnectionError), and 401/403/404 answers; 429 and 5xx are worth a retry
    assert not is_transient(OfflineModeIsEnabled("offline"))
    for status, transient in ((401, False), (403, False), (404, False), (429, True), (503, True)):
        response = httpx2.Response(status, request=httpx2.Request("POST", "http://hub/api/commit"))
        assert is_transient(HfHubHTTPError("answer", response=response)) is transient, status


def test_push_in_offline_mode_fails_at_once_with_the_fix(output_dir, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(OfflineModeIsEnabled, match="HF_HUB_OFFLINE"):
        push_outputs(output_dir, "acme/offline", retry_wait=5.0)
    assert time.monotonic() - started < 5  # no retry


# -- pushing -------------------------------------------------------------------------------------------------------
def test_push_then_load_gives_the_same_rows_and_cards(hub, worker, output_dir, pushed):
    repo, model_repo = "acme/pets-clipsel", "acme/pets-adapter"
    result, logs = pushed
    assert len(result["dataset_commits"]) >= 3  # 10 files in batches of 4, then the README
    assert assert_configs_never_partial(hub, repo, output_dir) == len(result["dataset_commits"]) + 1
    final = hub.history(repo)[-1].files
    subsets = {p.relative_to(output_dir).as_posix() for p in (output_dir / "subsets").rglob("*.parquet")}
    assert set(final) == {
        ".gitattributes",
        "README.md",
        "run_config.yaml",
        "run_record.json",
        "run_summary.json",
        "report/score_distributions.png",
        "scores/scores.parquet",
        *subsets,
    }
    assert hub.repo(repo).private
    model_files = set(hub.history(model_repo, "model")[-1].files)
    assert model_files == {".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"}

    loaded, load_logs = worker.call(
        LOAD,
        {
            "repo": repo,
            "model_repo": model_repo,
            "output_dir": str(output_dir),
            "configs": ["ratio_0.3", "ratio_0.5", "scores"],
        },
    )
    scores = Dataset.from_parquet(str(output_dir / "scores" / "scores.parquet"))
    for ratio in RATIOS:
        config = loaded[ratio_name(ratio)]
        assert config["rows_equal"] and config["features_equal"] and config["label_names"] == CLASS_NAMES
        assert config["row_ids"] == np.flatnonzero(scores[selected_column(ratio)][:]).tolist()
    assert loaded["scores"]["rows_equal"] and loaded["scores"]["row_ids"] == list(range(NUM_ROWS))
    assert loaded["load_scores_equal"]
    assert [c["config_name"] for c in loaded["card"]["data"]["configs"]] == [
        "default",
        "ratio_0.3",
        "ratio_0.5",
        "scores",
    ]
    assert 'load_dataset("acme/pets-clipsel", "ratio_0.5", split="train")' in loaded["card"]["text"]
    assert "[acme/pets-adapter](" in loaded["card"]["text"]
    assert loaded["model_card"]["data"]["base_model"] == "acme/tiny-clip"
    assert loaded["model_card"]["data"]["library_name"] == "peft"

    # the token authenticated the API calls, and appears nowhere else: logs, pushed files, local files
    api_calls = hub.requests("^(GET|POST) /api/(datasets|models)/acme/pets-")
    assert api_calls and all(r.authorization == f"Bearer {FAKE_TOKEN}" for r in api_calls)
    assert "DEBUG" in logs  # every logger was listening
    for text in (logs, load_logs, *(hub.blob(e.sha256).decode("latin-1") for e in final.values())):
        _assert_no_token(text)
    for path in output_dir.rglob("*"):
        if path.is_file():
            _assert_no_token(path.read_bytes().decode("latin-1"))

    # pushing again finds everything in place: no upload, no commit
    uploads_before = len(hub.uploaded(repo))
    again, _ = _push(worker, output_dir, repo, model_repo, max_files_per_commit=4)
    assert again == {"ok": True, "dataset_commits": [], "model_commits": []}
    assert len(hub.uploaded(repo)) == uploads_before


def test_peft_loads_the_adapter_from_the_model_repo(worker, output_dir, tiny_clip_path, pushed):
    adapter_file = output_dir / "adapter" / "adapter_model.safetensors"
    result, _ = worker.call(
        PEFT, {"clip": str(tiny_clip_path), "model_repo": "acme/pets-adapter", "adapter_file": str(adapter_file)}
    )
    assert result == {"same": True, "keys": 4, "nonzero": True}


def test_push_survives_rate_limits_server_errors_and_dropped_connections(hub, worker, output_dir):
    repo = "acme/flaky"
    hub.fail("POST /api/repos/create", 502)
    hub.fail("POST /api/datasets/acme/flaky/preupload/", 429)
    hub.fail("PUT /__lfs/upload/dataset/acme/flaky/", "drop")  # mid-upload: huggingface_hub's backoff resends it
    hub.fail("GET /api/datasets/acme/flaky/tree/", 503, after=1)
    hub.fail("POST /api/datasets/acme/flaky/commit/", 500, after=1)  # huggingface_hub does not retry commits: we do
    hub.fail("POST /api/datasets/acme/flaky/commit/", "lost", after=2)  # it landed, but the answer never came
    result, logs = _push(worker, output_dir, repo, max_files_per_commit=4)
    assert result["ok"], result
    assert all(fault.times == 0 for fault in hub.faults), "every fault fired"
    hub.clear_faults()
    assert assert_configs_never_partial(hub, repo, output_dir) >= 4
    assert len(hub.requests("^PUT /__lfs/upload/dataset/acme/flaky/")) > len(_lfs_objects(hub, repo))  # resent
    assert sorted(hub.uploaded(repo)) == sorted(_lfs_objects(hub, repo)), "each object stored exactly once"
    commits = hub.history(repo)
    assert all(a.files != b.files for a, b in zip(commits, commits[1:])), "no empty commit after the lost answer"
    assert "retry 1/5" in logs
    _assert_no_token(logs)


def test_a_failed_push_says_so_and_a_rerun_finishes_without_reuploading(hub, worker, output_dir):
    repo = "acme/resume"
    hub.fail("POST /api/datasets/acme/resume/commit/", 500, times=1000, after=1)  # the Hub breaks after commit 1
    failed, logs = _push(worker, output_dir, repo, max_files_per_commit=4, max_retries=2)
    hub.clear_faults()
    assert not failed["ok"]
    assert "failed 3 times in a row" in failed["error"] and "500" in failed["error"]
    assert "acme/resume" in failed["error"] and "rerun the push to finish" in failed["error"]
    _assert_no_token(failed["error"] + logs)
    assert assert_configs_never_partial(hub, repo, output_dir) == 2  # the initial commit and the first batch
    first_uploads, landed = hub.uploaded(repo), set(hub.history(repo)[-1].files)
    assert first_uploads  # the failed attempts uploaded the second batch's objects before their commits failed

    result, _ = _push(worker, output_dir, repo, max_files_per_commit=4)
    assert result["ok"]
    history = hub.history(repo)
    assert assert_configs_never_partial(hub, repo, output_dir) == len(history) > 2
    # across both pushes each object was uploaded once, and the rerun committed no file that had landed
    assert sorted(hub.uploaded(repo)) == sorted(_lfs_objects(hub, repo))
    for before, after in zip(history[1:], history[2:]):
        changed = {p for p, e in after.files.items() if before.files.get(p) != e}
        assert not changed & landed, f"{after.message} re-sent files that had landed"


def test_repushing_a_different_run_never_mixes_two_runs(hub, worker, output_dir, adapter_dir, tmp_path):
    """A second run with other rows and one shard fewer goes to the same repo: configs whose files change are
    withdrawn from the README first, the stale shard is deleted, and the README lists them again at the end."""
    repo = "acme/two-runs"
    assert _push(worker, output_dir, repo, max_files_per_commit=4)[0]["ok"]
    second = build_output_dir(tmp_path / "second", adapter_dir, seed=1)
    (second / "subsets" / "ratio_0.5" / "train-00002-of-00003.parquet").unlink()  # the glob must not read it
    record_by_hand(second)
    before = len(hub.history(repo))
    result, _ = _push(worker, second, repo, max_files_per_commit=4)
    assert result["ok"]
    history = hub.history(repo)
    assert history[before].message.startswith("Withdraw configs")
    assert assert_configs_never_partial(hub, repo, output_dir, second) == len(history)
    assert "subsets/ratio_0.5/train-00002-of-00003.parquet" not in history[-1].files
    final = {p: e.sha256 for p, e in history[-1].files.items()}
    assert _config_contents(final, _configs_of(hub.read(repo, "README.md").decode())) == _local_contents(second)
    loaded, _ = worker.call(LOAD, {"repo": repo, "output_dir": str(second), "configs": ["ratio_0.5", "scores"]})
    assert loaded["ratio_0.5"]["rows_equal"] and loaded["scores"]["rows_equal"]
