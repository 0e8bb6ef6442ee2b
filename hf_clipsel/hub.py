"""Push a run's outputs to the Hub, and read its scores back.

``push_outputs`` turns ``output_dir`` (laid out as a dataset repo, see :mod:`hf_clipsel.outputs`) into two repos.
It holds the run's lock (:class:`~hf_clipsel.runs.folder.RunFolder`) throughout and checks, before any request, that
the folder holds exactly the finished run its record lists, byte for byte (:func:`hf_clipsel.runs.record.verify`);
what it uploads is the run without this machine's paths (:mod:`hf_clipsel.publish`). The dataset repo is pushed
before the model repo, so a push that fails never leaves adapters published without their subsets:

- the dataset repo: the card (``README.md``, its ``configs:`` naming every subset and ``scores``, rendered again
  with the repo ids so its snippets name the repo) and the files the record lists: ``subsets/``, ``scores/``,
  ``run_config.yaml``, ``run_summary.json``, ``report/``, and ``run_record.json`` itself. Nothing else: not
  ``embeddings/`` (a cache), not ``adapter/``, not any other file a user left in ``output_dir``;
- the model repo (optional): the adapters of ``adapter/`` at its root, so ``PeftModel.from_pretrained(clip,
  repo_id)`` loads them, and their card.

**The invariant.** A config listed in the Hub README's ``configs:`` has all its files, with their final content, at
every commit of the repo. ``load_dataset(repo, "ratio_0.3")`` therefore returns the whole subset or fails (unknown
config), never part of one. It holds because:

1. a push small enough (at most ``max_files_per_commit`` changed files) is a single commit: data and README
   together, which the Hub applies atomically;
2. a larger push is split: first, if the README on the Hub lists a config whose files must change, a commit
   withdraws those configs from it; then the data files land in batches of ``max_files_per_commit`` under their
   final paths (listed by no config yet); the README that lists them is the last commit;
3. each commit names its parent (``parent_commit``), so a concurrent change to the repo fails the commit
   instead of being silently mixed into it.

**Retries and resuming.** huggingface_hub (1.x/2.x) retries 429/5xx and network errors with backoff for the
preupload, LFS batch, LFS upload and tree listing requests, but not for the commit request itself, repo creation
or the README validation. So every step here runs under a loop that, on a transient failure (429, 5xx, 408, 409,
412, a dropped connection, a timeout), waits with exponential backoff (honouring ``Retry-After``), then *plans
again from the Hub's current tree*: files whose sha256 (LFS) or git oid (regular files) already match are left
out, and LFS objects uploaded for a commit that then failed are not sent again (the LFS batch endpoint reports
them present). A rerun after a push that gave up resumes the same way. ``max_retries`` counts consecutive failures
without progress; when they run out, :class:`HubPushError` says what failed and that rerunning finishes the push.

**Tokens.** ``token`` (default: ``HF_TOKEN`` or the saved login, resolved by huggingface_hub) is only handed to
huggingface_hub; messages raised or logged here are scrubbed of it, and the cards never contain one.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, DatasetCard, HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.hf_api import RepoFile

from .cards import read_run, redact, render_adapter_card, render_dataset_card
from .core.names import RECORD
from .outputs import ADAPTER_DIR, RUN_CONFIG, RUN_SUMMARY, SCORES_DIR, SUBSETS_DIR
from .publish import published_copy
from .runs.folder import RunFolder
from .runs.load import read_scores
from .runs.record import RunRecord, verify

logger = logging.getLogger(__name__)

README = "README.md"
# What goes to the dataset repo (besides the card): the record's files but the adapters, and the record itself.
PUSHED_FILES = (RUN_CONFIG, RUN_SUMMARY, RECORD)
# Folders this package owns in the dataset repo: pushed whole, and remote files there that the run no longer has
# are deleted, or a config's glob would pick up stale shards.
OWNED_FOLDERS = (SUBSETS_DIR, SCORES_DIR, "report")
TRANSIENT_STATUS = {408, 409, 412, 423, 425, 429, 500, 502, 503, 504}
TRANSIENT_ERROR_NAMES = {
    "TransportError",
    "TimeoutException",
    "NetworkError",
    "RemoteProtocolError",
    "ProtocolError",
    "ChunkedEncodingError",
    "Timeout",
}


class HubPushError(OSError):
    """A push gave up after repeated transient failures; rerunning it finishes the job."""


@dataclass
class RepoPush:
    repo_id: str
    repo_type: str
    commits: list[str] = field(default_factory=list)  # oids of the commits this push made
    url: str = ""


@dataclass
class PushResult:
    dataset: RepoPush
    model: RepoPush | None = None


@dataclass
class _LocalFile:
    path_in_repo: str
    source: Path | bytes
    size: int
    sha256: str
    git_oid: str


def _local_file(path_in_repo: str, source: Path | bytes) -> _LocalFile:
    sha256, size = hashlib.sha256(), 0
    sha1 = hashlib.sha1()
    data = source if isinstance(source, bytes) else None
    length = len(data) if data is not None else source.stat().st_size
    sha1.update(b"blob %d\0" % length)
    chunks = [data] if data is not None else _chunks(source)
    for chunk in chunks:
        sha256.update(chunk)
        sha1.update(chunk)
        size += len(chunk)
    return _LocalFile(path_in_repo, source, size, sha256.hexdigest(), sha1.hexdigest())


def _chunks(path: Path, size: int = 8 * 2**20):
    with open(path, "rb") as handle:
        while chunk := handle.read(size):
            yield chunk


def _matches(path: str, pattern: str) -> bool:
    """Glob match segment by segment, as ``data_files`` patterns are read (``*`` never crosses ``/``)."""
    parts, pattern_parts = path.split("/"), pattern.split("/")
    return len(parts) == len(pattern_parts) and all(fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pattern_parts))


def _config_patterns(card_configs) -> dict[str, list[str]]:
    patterns = {}
    for config in card_configs or []:
        files = config.get("data_files") or []
        files = [files] if isinstance(files, (str, dict)) else files
        paths = []
        for item in files:
            path = item.get("path") if isinstance(item, dict) else item
            paths.extend([path] if isinstance(path, str) else list(path or []))
        patterns[config.get("config_name", "default")] = paths
    return patterns


def _readme_configs(text: str | None) -> list[dict]:
    if not text:
        return []
    try:
        return list(DatasetCard(text).data.to_dict().get("configs") or [])
    except Exception:  # an unreadable README lists nothing we can rely on
        return []


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or anything in its cause chain) is worth retrying: 429, 5xx, a dropped connection..."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OfflineModeIsEnabled):  # a ConnectionError that no retry can fix: HF_HUB_OFFLINE is set
            return False
        response = getattr(error, "response", None)
        if isinstance(error, HfHubHTTPError) and response is not None:
            return response.status_code in TRANSIENT_STATUS
        if isinstance(error, (ConnectionError, TimeoutError)):
            return True
        if any(klass.__name__ in TRANSIENT_ERROR_NAMES for klass in type(error).__mro__):
            return True
        error = error.__cause__ or error.__context__
    return False


def _retry_after(error: BaseException) -> float | None:
    response = getattr(error, "response", None)
    value = response.headers.get("Retry-After") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _describe(error: BaseException, token: str | None) -> str:
    text = str(error).strip().splitlines()
    return redact(f"{type(error).__name__}: {text[0] if text else ''}", token)


class _Syncer:
    """Makes one repo's main branch hold ``files`` (plus a README), resuming from whatever is already there."""

    def __init__(
        self,
        api: HfApi,
        repo_id: str,
        repo_type: str,
        token: str | None,
        max_files_per_commit: int,
        max_retries: int,
        retry_wait: float,
        max_wait: float,
    ):
        self.api, self.repo_id, self.repo_type, self.token = api, repo_id, repo_type, token
        self.max_files, self.max_retries = max_files_per_commit, max_retries
        self.retry_wait, self.max_wait = retry_wait, max_wait
        self.result = RepoPush(repo_id, repo_type)

    def retrying(self, what: str, step: Callable[[], bool]) -> None:
        """Run ``step`` until it returns True (done); ``step`` returns False after progress, to be called again."""
        failures = 0
        while True:
            try:
                if step():
                    return
                failures = 0
            except Exception as error:
                if not is_transient(error):
                    raise
                failures += 1
                if failures > self.max_retries:
                    raise HubPushError(
                        f"{what} on {self.repo_type} repo {self.repo_id} failed {failures} times in a row "
                        f"({_describe(error, self.token)}). What was committed before stays on the Hub, and every "
                        "config its README lists is complete; rerun the push to finish: files already there are "
                        "skipped and uploaded data is not sent again."
                    ) from None
                wait = _retry_after(error)
                if wait is None:
                    wait = min(self.max_wait, self.retry_wait * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)
                wait = min(wait, self.max_wait)
                logger.warning(
                    "%s on %s failed (%s); retry %d/%d in %.1fs.",
                    what,
                    self.repo_id,
                    _describe(error, self.token),
                    failures,
                    self.max_retries,
                    wait,
                )
                time.sleep(wait)

    def create_repo(self, private: bool) -> None:
        def step() -> bool:
            url = self.api.create_repo(
                self.repo_id, repo_type=self.repo_type, private=private, exist_ok=True, token=self.token
            )
            self.result.url = str(url)
            return True

        self.retrying("Creating the repo", step)

    def sync(self, files: dict[str, _LocalFile], readme: bytes, owned_folders: tuple[str, ...] = ()) -> None:
        """Commit until the repo holds ``files`` and ``readme``; each call of the step plans from the remote."""
        readme_file = _local_file(README, readme)
        patterns = _config_patterns(_readme_configs(readme.decode("utf-8")))

        def step() -> bool:
            head, remote = self._remote_tree()
            changed = [f for f in files.values() if not self._same(remote.get(f.path_in_repo), f)]
            deleted = sorted(p for p in remote if p not in files and p != README and p.split("/")[0] in owned_folders)
            readme_changed = not self._same(remote.get(README), readme_file)
            if not changed and not deleted and not readme_changed:
                return True
            if len(changed) + len(deleted) + readme_changed <= self.max_files:
                operations = [self._add(f) for f in changed] + [CommitOperationDelete(p) for p in deleted]
                if readme_changed:
                    operations.append(self._add(readme_file))
                self._commit(operations, head, "Upload hf-clipsel outputs")
                return True
            # Too many files for one commit: configs must never be listed while partly written.
            touched = [f.path_in_repo for f in changed] + deleted
            remote_readme = self._download(README, head) if README in remote else None
            remote_patterns = _config_patterns(_readme_configs(remote_readme))
            affected = sorted(
                name
                for name, globs in remote_patterns.items()
                if any(_matches(path, glob) for path in touched for glob in globs)
            )
            if affected:
                withdrawn = self._without_configs(readme.decode("utf-8"), patterns, touched)
                self._commit(
                    [CommitOperationAdd(README, withdrawn)],
                    head,
                    f"Withdraw configs {', '.join(affected)} while their files change",
                )
                return False
            batch = [CommitOperationDelete(p) for p in deleted] + [self._add(f) for f in changed]
            batch = batch[: self.max_files]
            if batch:
                self._commit(
                    batch, head, f"Upload hf-clipsel outputs ({len(batch)} of {len(touched)} remaining files)"
                )
                return False
            self._commit([self._add(readme_file)], head, "Update the card: list the configs")
            return True

        self.retrying("Pushing", step)

    # -- helpers ------------------------------------------------------------------------------------------------
    def _remote_tree(self):
        info = self.api.repo_info(self.repo_id, repo_type=self.repo_type, token=self.token)
        entries = self.api.list_repo_tree(
            self.repo_id, recursive=True, repo_type=self.repo_type, revision=info.sha, token=self.token
        )
        return info.sha, {e.path: e for e in entries if isinstance(e, RepoFile)}

    @staticmethod
    def _same(remote, local: _LocalFile) -> bool:
        if remote is None:
            return False
        if remote.lfs is not None:
            return remote.lfs.sha256 == local.sha256
        return remote.blob_id == local.git_oid

    @staticmethod
    def _add(local: _LocalFile) -> CommitOperationAdd:
        source = local.source if isinstance(local.source, bytes) else str(local.source)
        return CommitOperationAdd(local.path_in_repo, source)

    def _download(self, path: str, revision: str) -> str:
        with tempfile.TemporaryDirectory() as cache:
            local = self.api.hf_hub_download(
                self.repo_id, path, repo_type=self.repo_type, revision=revision, cache_dir=cache, token=self.token
            )
            return Path(local).read_text(encoding="utf-8")

    @staticmethod
    def _without_configs(readme: str, patterns: dict[str, list[str]], touched: list[str]) -> bytes:
        """``readme`` listing only the configs none of whose files are about to change."""
        card = DatasetCard(readme)
        configs = card.data.to_dict().get("configs") or []
        keep = [
            c
            for c in configs
            if not any(_matches(p, g) for p in touched for g in patterns.get(c.get("config_name"), []))
        ]
        card.data.configs = keep
        return str(card).encode("utf-8")

    def _commit(self, operations: list, parent: str, message: str) -> None:
        info = self.api.create_commit(
            self.repo_id,
            operations,
            commit_message=message,
            repo_type=self.repo_type,
            parent_commit=parent,
            token=self.token,
        )
        if info.oid == parent:  # nothing changed: planning again would plan the same commit forever
            raise RuntimeError(f"commit '{message}' to {self.repo_id} changed nothing; the push cannot progress.")
        self.result.commits.append(info.oid)
        logger.info("Committed %d file(s) to %s: %s", len(operations), self.repo_id, message)


def _dataset_files(output_dir: Path, record: RunRecord) -> dict[str, _LocalFile]:
    """The files of the dataset repo: what the run's record lists, but the adapters (they go to the model repo)."""
    names = [name for name in record.artefacts if name.split("/")[0] in (*OWNED_FOLDERS, *PUSHED_FILES)]
    return {name: _local_file(name, output_dir / name) for name in sorted([*names, RECORD])}


def _adapter_files(adapter_dir: Path) -> dict[str, _LocalFile]:
    files = {}
    for path in sorted(adapter_dir.rglob("*")):
        relative = path.relative_to(adapter_dir)
        if path.is_file() and relative.as_posix() != README and not any(p.startswith(".") for p in relative.parts):
            files[relative.as_posix()] = _local_file(relative.as_posix(), path)
    return files


def push_outputs(
    output_dir: str | Path,
    dataset_repo_id: str,
    model_repo_id: str | None = None,
    private: bool = False,
    token: str | None = None,
    max_files_per_commit: int = 100,
    max_retries: int = 5,
    retry_wait: float = 2.0,
    max_wait: float = 60.0,
) -> PushResult:
    """Push ``output_dir`` to the dataset repo ``dataset_repo_id`` and its adapters to ``model_repo_id``.

    Creates the repos if needed (``private`` applies to new repos). Safe to rerun: a rerun commits only what is
    not on the Hub yet, so it also finishes a push that failed half-way. Main process only; refused
    (:class:`~hf_clipsel.runs.folder.RunLockedError`) while another command holds the run.

    Args:
        max_files_per_commit: changed files per commit; a push with more is split so that no config is ever listed
            while partly written (see the module docstring).
        max_retries: consecutive transient failures (429, 5xx, dropped connections) tolerated per step.
        retry_wait, max_wait: first and longest wait, in seconds, of the exponential backoff.

    Returns:
        The commits made per repo (empty when everything was already there).
    """
    output_dir = Path(output_dir)
    if max_files_per_commit < 1:
        raise ValueError(f"max_files_per_commit must be at least 1, got {max_files_per_commit}.")
    if not (output_dir / SCORES_DIR).is_dir() and not (output_dir / SUBSETS_DIR).is_dir():
        raise FileNotFoundError(f"{output_dir} holds no scores/ or subsets/: is it the output_dir of a run?")
    options = dict(
        token=token,
        max_files_per_commit=max_files_per_commit,
        max_retries=max_retries,
        retry_wait=retry_wait,
        max_wait=max_wait,
    )
    # Held for the whole push: no command may change the run while its files are read and uploaded.
    with RunFolder(output_dir, need_run=True) as folder:
        # Before anything is uploaded: the folder holds exactly the finished run its record describes, byte for byte.
        record = verify(output_dir, deep=True)
        published = folder.stage()  # hard links of the run's files, made publishable there
        record = published_copy(published, record)
        config, summary = read_run(published)
        adapter_dir = published / ADAPTER_DIR
        if model_repo_id and not (adapter_dir / "adapter_config.json").exists():
            raise FileNotFoundError(f"no adapters in {output_dir / ADAPTER_DIR} to push to {model_repo_id}.")
        if config or summary:
            card = render_dataset_card(published, dataset_repo_id=dataset_repo_id, model_repo_id=model_repo_id)
        elif (published / README).exists():
            card = (published / README).read_text(encoding="utf-8")
        else:
            raise FileNotFoundError(f"{output_dir} has no {RUN_CONFIG}, {RUN_SUMMARY} or {README} to make a card of.")
        api = HfApi(token=token)
        dataset = _Syncer(api, dataset_repo_id, "dataset", **options)
        model = _Syncer(api, model_repo_id, "model", **options) if model_repo_id else None
        for syncer in (dataset, model) if model else (dataset,):  # a repo we may not create fails before any data
            syncer.create_repo(private)
        # The dataset first: a push that fails never leaves adapters published without their subsets.
        dataset.sync(_dataset_files(published, record), redact(str(card), token).encode("utf-8"), OWNED_FOLDERS)
        logger.info("Outputs of %s are in dataset repo %s.", output_dir, dataset_repo_id)
        result = PushResult(dataset=dataset.result)
        if model:
            card = render_adapter_card(published, model_repo_id=model_repo_id, dataset_repo_id=dataset_repo_id)
            model.sync(_adapter_files(adapter_dir), redact(str(card), token).encode("utf-8"))
            result.model = model.result
            logger.info("Adapters of %s are in model repo %s.", output_dir, model_repo_id)
    return result


def load_scores(repo_or_dir: str | Path, revision: str | None = None, token: str | None = None):
    """The ``scores`` config of a run, from its ``output_dir`` or its dataset repo, as a ``datasets.Dataset``
    (:func:`hf_clipsel.runs.load.read_scores`). One row per source row, keyed by ``row_id``."""

    return read_scores(repo_or_dir, revision=revision, token=token)
