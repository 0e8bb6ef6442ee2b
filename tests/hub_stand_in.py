"""A small local stand-in for the Hugging Face Hub, for offline tests of pushing and loading.

It serves the endpoints that ``huggingface_hub`` (``create_repo``, ``create_commit``, ``upload_folder``,
``list_repo_tree``, ``get_paths_info``, ``hf_hub_download``, ``HfFileSystem``) and ``datasets``
(``push_to_hub``, ``load_dataset``) call, over plain HTTP on 127.0.0.1 with an ephemeral port, from a
background thread. Clients reach it when ``HF_ENDPOINT`` and ``HF_HUB_DISABLE_XET=1`` are set before
``huggingface_hub`` is imported: :func:`child_env` builds such an environment and :func:`run_child` runs code
in a fresh interpreter with it (:class:`ChildWorker` keeps one such interpreter for many calls), which is robust
whatever the test process imported or set (e.g. ``HF_HUB_OFFLINE=1``).

Semantics kept from the real Hub because tests depend on them:

- a repo is a chain of commits on ``main``; a commit is atomic: it is validated completely (every LFS object
  uploaded, every deleted path present, ``parentCommit`` equal to the head) before the branch moves, so its
  files become visible all at once or not at all;
- LFS objects live outside commits: an object uploaded to a repo for a commit that then failed is still there,
  and the repo's LFS batch endpoint tells the client not to upload it again (the dedup a resumed push relies on).
  As on the Hub, that answer is per repo: the same bytes pushed to another repo are uploaded again;
- new repos start with a commit holding ``.gitattributes``, as on the Hub.

Fault injection: :meth:`HubStandIn.fail` makes the next N requests matching a pattern answer 429 or 5xx, or
drop the connection halfway through reading the request body. Every request is logged
(:attr:`HubStandIn.log`), every successful LFS upload too (:meth:`HubStandIn.uploaded`), and every commit is kept,
so a test can count uploads and check any property at every commit (:meth:`HubStandIn.history`).

Run ``python tests/hub_stand_in.py`` to serve one by hand.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

GITATTRIBUTES = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
LFS_SUFFIXES = (".parquet", ".arrow", ".safetensors", ".bin", ".pt", ".png", ".jpg", ".jpeg", ".npy", ".zip")
REGULAR_MAX_SIZE = 10 * 1024 * 1024
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int
    lfs: bool
    oid: str  # the git oid: of the content for a regular file, of the pointer for an LFS file (as git does)

    @classmethod
    def of(cls, content: bytes, sha256: str, lfs: bool) -> FileEntry:
        return cls(sha256, len(content), lfs, git_blob_oid(lfs_pointer(sha256, len(content)) if lfs else content))

    def to_json(self, path: str) -> dict:
        entry = {"type": "file", "path": path, "size": self.size, "oid": self.oid}
        if self.lfs:
            entry["lfs"] = {
                "oid": self.sha256,
                "size": self.size,
                "pointerSize": len(lfs_pointer(self.sha256, self.size)),
            }
        return entry


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, FileEntry]
    created_at: float = field(default_factory=time.time)


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # commit oids, oldest first
    branches: dict[str, str] = field(default_factory=dict)
    lfs_objects: set[str] = field(default_factory=set)  # sha256 of the LFS objects uploaded to this repo

    def resolve(self, revision: str) -> Commit | None:
        revision = unquote(revision)
        oid = self.branches.get(revision, revision)
        matches = [c for o, c in self.commits.items() if o == oid or (len(oid) >= 7 and o.startswith(oid))]
        return matches[0] if len(matches) == 1 else None


@dataclass
class Fault:
    pattern: re.Pattern
    status: int | str  # an HTTP status, "drop" or "lost"
    times: int
    after: int
    seen: int = 0


@dataclass
class LoggedRequest:
    method: str
    path: str
    status: int | str
    authorization: str | None


class HubError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class HubStandIn:
    """The server and its state. Use as a context manager, or call :meth:`start` / :meth:`stop`."""

    def __init__(self, root: str | Path | None = None):
        self._tmp = None if root else tempfile.TemporaryDirectory(prefix="hub-stand-in-")
        self.root = Path(root or self._tmp.name)
        self.objects = self.root / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.log: list[LoggedRequest] = []
        self.uploads: list[tuple[str, str]] = []  # (repo_id, sha256) of every successful LFS upload, in order
        self.faults: list[Fault] = []
        self.lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> HubStandIn:
        stand_in = self

        class Handler(_Handler):
            hub = stand_in

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        server, quick_shutdown = self._server, {"poll_interval": 0.05}
        threading.Thread(target=server.serve_forever, kwargs=quick_shutdown, daemon=True, name="hub-stand-in").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- knobs and inspection for tests ----------------------------------------------------------------------
    def fail(self, pattern: str, status: int | str = 500, times: int = 1, after: int = 0) -> None:
        """Answer ``status`` to the ``times`` requests matching ``pattern`` that come after the first ``after``
        matching ones. ``status`` is an HTTP code, ``"drop"`` (close the connection halfway through the request
        body: the request never completes) or ``"lost"`` (carry the request out, then close the connection
        without answering: the client cannot tell it succeeded).

        ``pattern`` is a regular expression searched in ``"METHOD /path"``, e.g. ``"PUT /__lfs/"`` or
        ``"POST /api/datasets/.*/commit/"``.
        """
        with self.lock:
            self.faults.append(Fault(re.compile(pattern), status, times, after))

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def requests(self, pattern: str = "") -> list[LoggedRequest]:
        regex = re.compile(pattern)
        with self.lock:
            return [r for r in self.log if regex.search(f"{r.method} {r.path}")]

    def uploaded(self, repo_id: str) -> list[str]:
        """sha256 of every LFS object stored in ``repo_id`` by a successful upload, in order (repeats included)."""
        with self.lock:
            return [oid for repo, oid in self.uploads if repo == repo_id]

    def repo(self, repo_id: str, repo_type: str = "dataset") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def history(self, repo_id: str, repo_type: str = "dataset") -> list[Commit]:
        """Every commit of ``main``, oldest first."""
        with self.lock:
            repo = self.repo(repo_id, repo_type)
            return [repo.commits[oid] for oid in repo.order]

    def read(self, repo_id: str, path: str, repo_type: str = "dataset", revision: str = "main") -> bytes:
        commit = self.repo(repo_id, repo_type).resolve(revision)
        return self.blob(commit.files[path].sha256)

    def blob(self, sha256: str) -> bytes:
        return (self.objects / sha256).read_bytes()

    def create_repo(self, repo_id: str, repo_type: str = "dataset", private: bool = False) -> Repo:
        with self.lock:
            key = (repo_type, repo_id)
            if key in self.repos:
                raise HubError(409, "You already created this repo")
            repo = Repo(repo_id, repo_type, private)
            self.repos[key] = repo
            entry = FileEntry.of(GITATTRIBUTES, self._store(GITATTRIBUTES), lfs=False)
            self._add_commit(repo, {".gitattributes": entry}, "initial commit")
            return repo

    # -- storage ---------------------------------------------------------------------------------------------
    def _store(self, content: bytes) -> str:
        sha256 = hashlib.sha256(content).hexdigest()
        target = self.objects / sha256
        if not target.exists():
            tmp = target.with_suffix(f".tmp{threading.get_ident()}")
            tmp.write_bytes(content)
            tmp.replace(target)
        return sha256

    def _add_commit(self, repo: Repo, files: dict[str, FileEntry], message: str) -> Commit:
        parent = repo.branches.get("main")
        seed = json.dumps([repo.repo_type, repo.repo_id, parent, message, len(repo.order), sorted(files)])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, message, files)
        repo.commits[commit.oid] = commit
        repo.order.append(commit.oid)
        repo.branches["main"] = commit.oid
        return commit


def _is_lfs(path: str, sample: bytes) -> bool:
    return path.lower().endswith(LFS_SUFFIXES) or b"\0" in sample[:512]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubStandIn

    def log_message(self, *args) -> None:  # the request log is kept in HubStandIn.log instead
        pass

    # -- dispatch ----------------------------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def _dispatch(self) -> None:
        self._consumed = False  # whether this request's body has been read
        split = urlsplit(self.path)
        path, self.query = unquote(split.path), parse_qs(split.query)
        fault = self._take_fault(f"{self.command} {path}")
        if fault == "drop":  # logged first: once the connection is cut, the client may already be asking again
            self._record(path, "drop")
            return self._drop()
        if fault is not None and fault != "lost":
            self._discard_body()
            return self._send_json({"error": f"injected {fault}"}, status=fault, path=path)
        try:
            status, body, headers = self._route(path)
        except HubError as err:
            self._discard_body()
            status, body, headers = err.status, {"error": err.message}, err.headers
        if fault == "lost":  # the request took effect, but its answer never arrives
            self._record(path, "lost")
            return self._drop()
        if isinstance(body, (dict, list)):
            self._send_json(body, status=status, headers=headers, path=path)
        else:
            self._send_bytes(body, status=status, headers=headers, path=path)

    def _take_fault(self, line: str) -> int | str | None:
        with self.hub.lock:
            for fault in self.hub.faults:
                if fault.times > 0 and fault.pattern.search(line):
                    fault.seen += 1
                    if fault.seen > fault.after:
                        fault.times -= 1
                        return fault.status
        return None

    def _route(self, path: str):
        method = self.command
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo()
        if method == "POST" and path == "/api/validate-yaml":
            self._body()
            return 200, {"errors": [], "warnings": []}, {}
        if m := re.fullmatch(r"/__lfs/(upload|verify)/(model|dataset|space)/([^/]+/[^/]+)/([0-9a-f]{64})", path):
            repo = self._repo(m[2], m[3])
            if method == "PUT" and m[1] == "upload":
                return self._lfs_put(repo, m[4])
            if method == "POST" and m[1] == "verify" and m[4] in repo.lfs_objects:
                return 200, {"oid": m[4]}, {}
            raise HubError(404, "object not found")
        if m := re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(.*))?", path):
            return self._api(REPO_TYPES[m[1]], m[2], m[3] or "")
        if m := re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+?)\.git/info/lfs/objects/batch", path):
            return self._lfs_batch(self._repo(REPO_TYPES.get(f"{m[1]}", "model"), m[2]))
        if m := re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            repo = self._repo(REPO_TYPES.get(f"{m[1]}", "model"), m[2])
            return self._resolve(repo, m[3], m[4])
        raise HubError(404, f"stand-in: no route for {method} {path}")

    def _api(self, repo_type: str, repo_id: str, rest: str):
        repo = self._repo(repo_type, repo_id)
        method = self.command
        if method == "GET" and (rest == "" or rest.startswith("revision/")):
            return 200, self._repo_info(repo, rest.partition("/")[2] or "main"), {}
        action, _, tail = rest.partition("/")
        if method == "POST" and action == "preupload":
            return self._preupload(repo, tail)
        if method == "POST" and action == "commit":
            return self._commit(repo, tail)
        if method == "GET" and action == "tree":
            revision, _, sub = tail.partition("/")
            return self._tree(repo, revision, sub.strip("/"))
        if method == "POST" and action == "paths-info":
            return self._paths_info(repo, tail)
        if method == "GET" and action == "refs":
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": o} for n, o in repo.branches.items()]
            return 200, {"branches": branches, "tags": [], "converts": []}, {}
        if method == "GET" and action == "commits":
            return self._commits(repo, tail)
        raise HubError(404, f"stand-in: no route for {method} /api/{repo_type}s/{repo_id}/{rest}")

    # -- endpoints ---------------------------------------------------------------------------------------------
    def _create_repo(self):
        payload = json.loads(self._body())
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if "/" not in repo_id:
            repo_id = f"user/{repo_id}"
        repo_type = payload.get("type") or "model"
        private = payload.get("private", False) or payload.get("visibility") == "private"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.hub.url}/{prefix}{repo_id}"
        if (repo_type, repo_id) in self.hub.repos:  # the Hub's 409 carries the url, which create_repo reads
            return 409, {"error": f"You already created this {repo_type} repo", "url": url}, {}
        self.hub.create_repo(repo_id, repo_type, private)
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def _repo_info(self, repo: Repo, revision: str) -> dict:
        commit = self._commit_at(repo, revision)
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling = {"rfilename": path, "size": entry.size, "blobId": entry.oid}
            if entry.lfs:
                sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": 0}
            siblings.append(sibling)
        when = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit.created_at))
        return {
            "id": repo.repo_id,
            "_id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "lastModified": when,
            "createdAt": when,
            "siblings": siblings,
            "tags": [],
            "downloads": 0,
            "likes": 0,
        }

    def _preupload(self, repo: Repo, revision: str):
        commit = self._commit_at(repo, revision)
        files = []
        for item in json.loads(self._body())["files"]:
            sample = base64.b64decode(item["sample"])
            lfs = _is_lfs(item["path"], sample) or item["size"] >= REGULAR_MAX_SIZE
            existing = commit.files.get(item["path"])
            oid = None
            if existing is not None:
                oid = existing.sha256 if lfs else existing.oid
            files.append(
                {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        return 200, {"files": files, "commitOid": commit.oid}, {}

    def _lfs_batch(self, repo: Repo):
        payload = json.loads(self._body())
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in repo.lfs_objects:
                where = f"{repo.repo_type}/{repo.repo_id}/{obj['oid']}"
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/__lfs/upload/{where}"},
                    "verify": {"href": f"{self.hub.url}/__lfs/verify/{where}"},
                }
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {}

    def _lfs_put(self, repo: Repo, sha256: str):
        content = self._body()
        if hashlib.sha256(content).hexdigest() != sha256:
            raise HubError(400, f"content does not match oid {sha256}")
        with self.hub.lock:
            self.hub._store(content)
            repo.lfs_objects.add(sha256)
            self.hub.uploads.append((repo.repo_id, sha256))
        return 200, b"", {}

    def _commit(self, repo: Repo, revision: str):
        lines = [json.loads(line) for line in self._body().decode().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        with self.hub.lock:  # validate everything, then move the branch: all or nothing
            head = self._commit_at(repo, revision)
            if unquote(revision) != "main":
                raise HubError(400, "the stand-in commits to main only")
            parent = header.get("parentCommit")
            if parent and not head.oid.startswith(parent):
                raise HubError(412, f"A commit has happened since. Please refresh and try again ({parent}).")
            files = dict(head.files)
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "file":
                    content = base64.b64decode(value["content"])
                    files[value["path"]] = FileEntry.of(content, self.hub._store(content), lfs=False)
                elif key == "lfsFile":
                    if value["oid"] not in repo.lfs_objects:
                        raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                    files[value["path"]] = FileEntry.of(self.hub.blob(value["oid"]), value["oid"], lfs=True)
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {value['path']}")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    for path in [p for p in files if p.startswith(prefix)]:
                        del files[path]
                elif key != "header":
                    raise HubError(400, f"unknown commit operation {key}")
            commit = self.hub._add_commit(repo, files, header.get("summary", ""))
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        url = f"{self.hub.url}/{prefix}{repo.repo_id}/commit/{commit.oid}"
        return 200, {"commitUrl": url, "commitOid": commit.oid, "pullRequestUrl": None, "success": True}, {}

    def _entries(self, commit: Commit, paths) -> list[dict]:
        """Entries for ``paths`` (files or folders) that exist in ``commit``."""
        entries = []
        folders = _folders(commit.files)
        for path in paths:
            if path in commit.files:
                entries.append(commit.files[path].to_json(path))
            elif path in folders:
                children = sorted((p, e.sha256) for p, e in commit.files.items() if p.startswith(path + "/"))
                oid = hashlib.sha1(json.dumps(children).encode()).hexdigest()
                entries.append({"type": "directory", "path": path, "size": 0, "oid": oid})
        return entries

    def _tree(self, repo: Repo, revision: str, sub: str):
        commit = self._commit_at(repo, revision)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        names = sorted(set(commit.files) | _folders(commit.files))
        if sub and sub not in names:
            raise HubError(404, f"Entry not found: {sub}", {"X-Error-Code": "EntryNotFound"})
        prefix = sub + "/" if sub else ""
        chosen = [n for n in names if n.startswith(prefix) and (recursive or "/" not in n[len(prefix) :])]
        return 200, self._entries(commit, chosen), {}

    def _paths_info(self, repo: Repo, revision: str):
        commit = self._commit_at(repo, revision)
        body = self._body()
        if "json" in (self.headers.get("Content-Type") or ""):
            paths = json.loads(body).get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        return 200, self._entries(commit, [p.strip("/") for p in paths]), {}

    def _commits(self, repo: Repo, revision: str):
        commit, items = self._commit_at(repo, revision), []
        while commit is not None:
            when = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit.created_at))
            items.append({"id": commit.oid, "title": commit.message, "message": "", "authors": [], "date": when})
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return 200, items, {}

    def _resolve(self, repo: Repo, revision: str, path: str):
        commit = self._commit_at(repo, revision)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(
                404, f"Entry not found: {path}", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit.oid}
            )
        etag = entry.sha256 if entry.lfs else entry.oid
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(entry.size)})
        content = self.hub.blob(entry.sha256)
        if m := re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range") or ""):
            start = int(m[1]) if m[1] else max(0, entry.size - int(m[2]))
            end = int(m[2]) if m[1] and m[2] else entry.size - 1
            if start >= entry.size and entry.size > 0:
                raise HubError(416, "Range Not Satisfiable", {"Content-Range": f"bytes */{entry.size}"})
            end = min(end, entry.size - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
            return 206, content[start : end + 1], headers
        return 200, content, headers

    # -- helpers -----------------------------------------------------------------------------------------------
    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", {"X-Error-Code": "RepoNotFound"})
        return repo

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision or "main")
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", {"X-Error-Code": "RevisionNotFound"})
        return commit

    def _body(self) -> bytes:
        if self._consumed:
            return b""
        self._consumed = True
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _discard_body(self) -> None:
        self._body()

    def _drop(self) -> None:
        """Read (up to) half the body, then cut the connection without an answer: a network failure mid-upload."""
        length = int(self.headers.get("Content-Length") or 0)
        if length and not self._consumed:
            self.rfile.read(length // 2)
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _record(self, path: str, status) -> None:
        with self.hub.lock:
            self.hub.log.append(LoggedRequest(self.command, path, status, self.headers.get("Authorization")))

    def _send_json(self, body, status: int = 200, headers: dict | None = None, path: str = "") -> None:
        headers = {"Content-Type": "application/json", **(headers or {})}
        self._send_bytes(json.dumps(body).encode(), status, headers, path)

    def _send_bytes(self, body: bytes, status: int = 200, headers: dict | None = None, path: str = "") -> None:
        self._body()  # a request body the route did not read must not be parsed as the next request
        self._record(path, status)
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _folders(files) -> set[str]:
    folders = set()
    for path in files:
        parts = path.split("/")[:-1]
        folders.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return folders


# -- running clients against the stand-in --------------------------------------------------------------------
def child_env(hub: HubStandIn, home: str | Path, token: str | None = None) -> dict[str, str]:
    """Environment for a fresh interpreter that talks to ``hub`` and keeps every cache under ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    home = Path(home)
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(home / "hf_home"),
        HF_DATASETS_CACHE=str(home / "datasets_cache"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
        HF_HUB_ETAG_TIMEOUT="5",
        HF_HUB_DOWNLOAD_TIMEOUT="30",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        PYTHONUNBUFFERED="1",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def run_child(code: str, env: dict[str, str], *args: str, timeout: float = 120, cwd: str | Path | None = None):
    """Run ``code`` in a fresh interpreter with ``env`` and ``args`` (its ``sys.argv[1:]``); return the
    CompletedProcess (text output captured, return code not checked).

    A fresh interpreter is the robust way to point ``huggingface_hub`` and ``datasets`` at the stand-in: both read
    ``HF_ENDPOINT`` (and the offline flags) once, at import time.
    """
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


_WORKER = r"""
import contextlib, io, json, logging, sys, traceback, warnings
protocol = sys.stdout
logging.captureWarnings(True)
root = logging.getLogger()
root.setLevel(logging.DEBUG)
for line in sys.stdin:
    request = json.loads(line)
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root.addHandler(handler)
    namespace = {"params": request["params"], "result": None}
    error = None
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured), warnings.catch_warnings():
            warnings.simplefilter("always")
            exec(compile(request["code"], "<worker call>", "exec"), namespace)
    except BaseException:
        error = traceback.format_exc()
    finally:
        root.removeHandler(handler)
    try:
        answer = json.dumps({"result": namespace["result"], "output": captured.getvalue(), "error": error})
    except TypeError:
        answer = json.dumps({"result": None, "output": captured.getvalue(), "error": traceback.format_exc()})
    protocol.write(answer + "\n")
    protocol.flush()
"""


class ChildWorker:
    """A fresh interpreter, started once with :func:`child_env`, that runs code snippets on request.

    Cheaper than :func:`run_child` per call (``datasets`` and ``huggingface_hub`` are imported once). Each
    :meth:`call` runs ``code`` with ``params`` in its namespace; the snippet sets ``result`` (JSON-serialisable).
    It returns ``(result, output)``, ``output`` being everything the call printed or logged (all loggers at DEBUG,
    warnings included), and raises :class:`ChildError` with the traceback if the snippet raised.
    """

    def __init__(self, env: dict[str, str], cwd: str | Path | None = None):
        self._stderr = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would block the worker
        self._process = subprocess.Popen(
            [sys.executable, "-c", _WORKER],
            env=env,
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )

    def call(self, code: str, params: dict | None = None) -> tuple[object, str]:
        self._process.stdin.write(json.dumps({"code": code, "params": params or {}}) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            self._stderr.seek(0)
            raise ChildError(f"the worker died: {self._stderr.read()[-4000:]}")
        answer = json.loads(line)
        if answer["error"]:
            raise ChildError(f"{answer['error']}\n--- output ---\n{answer['output'][-4000:]}")
        return answer["result"], answer["output"]

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()
            try:  # a worker has nothing to flush: do not wait long for torch & co. to finalise
                self._process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process.stdout.close()
        self._stderr.close()

    def __enter__(self) -> ChildWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ChildError(RuntimeError):
    pass


if __name__ == "__main__":
    with HubStandIn() as stand_in:
        print(f"Hub stand-in at {stand_in.url}; export HF_ENDPOINT={stand_in.url} HF_HUB_DISABLE_XET=1")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
