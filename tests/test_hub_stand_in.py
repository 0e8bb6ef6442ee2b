"""The Hub stand-in itself: the real datasets push_to_hub / load_dataset work against it, commits are atomic, and
the fault knobs do what they say."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import urllib.error
import urllib.request

import pytest
from hub_stand_in import ChildWorker, HubStandIn, child_env

ROUND_TRIP = """
import io, json
import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value, load_dataset
from PIL import Image as PILImage

rng = np.random.default_rng(0)
def png():
    buffer = io.BytesIO()
    PILImage.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()

features = Features({"image": Image(), "label": ClassLabel(names=["a", "b", "c"]), "row_id": Value("int64")})
def split(n):
    return Dataset.from_dict({"image": [{"bytes": png(), "path": None} for _ in range(n)],
                              "label": [i % 3 for i in range(n)], "row_id": list(range(n))}, features=features)
original = DatasetDict({"train": split(12), "test": split(5)})
original.push_to_hub("acme/plain", private=True)
back = load_dataset("acme/plain")

def dump(dataset):
    dataset = dataset.cast_column("image", Image(decode=False))
    return json.dumps(dataset.to_list(), sort_keys=True, default=lambda value: value.hex())

result = {name: {"equal": dump(back[name]) == dump(original[name]), "features": back[name].features == features}
          for name in original}
"""


@pytest.fixture
def hub():
    with HubStandIn() as stand_in:
        yield stand_in


def _request(hub, method, path, body: bytes | None = None, headers: dict | None = None):
    request = urllib.request.Request(hub.url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers


def _commit(hub, repo_id, lines, parent=None):
    header = {
        "key": "header",
        "value": {"summary": "test", "description": "", **({"parentCommit": parent} if parent else {})},
    }
    body = b"".join(json.dumps(line).encode() + b"\n" for line in [header, *lines])
    return _request(
        hub, "POST", f"/api/datasets/{repo_id}/commit/main", body, {"Content-Type": "application/x-ndjson"}
    )


def _file(path, content: bytes):
    encoded = base64.b64encode(content).decode()
    return {"key": "file", "value": {"path": path, "content": encoded, "encoding": "base64"}}


def test_datasets_push_to_hub_and_load_dataset_round_trip(hub, tmp_path):
    with ChildWorker(child_env(hub, tmp_path, token="hf_StandInRoundTripToken000000000"), cwd=tmp_path) as worker:
        result, _ = worker.call(ROUND_TRIP)
    assert result == {"train": {"equal": True, "features": True}, "test": {"equal": True, "features": True}}
    assert hub.repo("acme/plain").private
    files = hub.history("acme/plain")[-1].files
    assert "README.md" in files and any(p.startswith("data/train-") and e.lfs for p, e in files.items())
    assert hub.requests("^GET /datasets/acme/plain/resolve/")  # load_dataset downloaded through the stand-in


def test_a_commit_is_all_or_nothing(hub):
    repo = hub.create_repo("acme/atomic")
    head = repo.branches["main"]
    missing = {"key": "lfsFile", "value": {"path": "big.parquet", "algo": "sha256", "oid": "0" * 64, "size": 3}}
    status, _, _ = _commit(hub, "acme/atomic", [_file("notes.txt", b"hello"), missing])
    assert status == 422 and repo.branches["main"] == head  # the regular file did not land either
    status, _, _ = _commit(hub, "acme/atomic", [_file("notes.txt", b"hello")], parent="f" * 40)
    assert status == 412 and repo.branches["main"] == head  # the branch moved since the parent named
    status, body, _ = _commit(hub, "acme/atomic", [_file("notes.txt", b"hello")], parent=head)
    assert status == 200 and repo.branches["main"] == json.loads(body)["commitOid"]
    assert hub.read("acme/atomic", "notes.txt") == b"hello"
    assert [c.message for c in hub.history("acme/atomic")] == ["initial commit", "test"]


def test_lfs_objects_are_per_repo_and_uploaded_once(hub):
    hub.create_repo("acme/one")
    hub.create_repo("acme/two")
    content = b"\0parquet bytes"
    oid = hashlib.sha256(content).hexdigest()
    batch = json.dumps({"operation": "upload", "objects": [{"oid": oid, "size": len(content)}]}).encode()

    def actions(repo):
        status, body, _ = _request(hub, "POST", f"/datasets/{repo}.git/info/lfs/objects/batch", batch)
        return json.loads(body)["objects"][0].get("actions")

    upload = actions("acme/one")["upload"]["href"].removeprefix(hub.url)
    assert _request(hub, "PUT", upload, content)[0] == 200
    assert actions("acme/one") is None and actions("acme/two") is not None
    assert hub.uploaded("acme/one") == [oid] and hub.uploaded("acme/two") == []
    lfs = {"key": "lfsFile", "value": {"path": "data.parquet", "algo": "sha256", "oid": oid, "size": len(content)}}
    assert _commit(hub, "acme/one", [lfs])[0] == 200
    assert _commit(hub, "acme/two", [lfs])[0] == 422
    status, body, headers = _request(
        hub, "GET", "/datasets/acme/one/resolve/main/data.parquet", headers={"Range": "bytes=1-4"}
    )
    assert (status, body, headers["Content-Range"]) == (206, b"parq", f"bytes 1-4/{len(content)}")
    assert headers["X-Linked-Etag"] == f'"{oid}"'


def test_fault_knobs(hub):
    hub.create_repo("acme/faults")
    hub.fail("GET /api/datasets/acme/faults$", 429, times=2, after=1)
    statuses = [_request(hub, "GET", "/api/datasets/acme/faults")[0] for _ in range(4)]
    assert statuses == [200, 429, 429, 200]
    hub.fail("POST /api/datasets/acme/faults/commit/", "drop")
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError, urllib.error.URLError)):
        _commit(hub, "acme/faults", [_file("a.txt", b"a" * 10_000)])
    assert len(hub.history("acme/faults")) == 1  # dropped before it was read: nothing landed
    hub.fail("POST /api/datasets/acme/faults/commit/", "lost")
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError, urllib.error.URLError)):
        _commit(hub, "acme/faults", [_file("a.txt", b"a")])
    assert len(hub.history("acme/faults")) == 2  # carried out, though the client never heard back
    assert [r.status for r in hub.requests("commit/")] == ["drop", "lost"]
    assert all(fault.times == 0 for fault in hub.faults)
