"""A run's folder held by one writer: the lock, the staging folder beside the run, and the swap that commits it.

One writer at a time: :class:`RunFolder` holds an exclusive lock on ``output_dir/.hf_clipsel.lock`` (``flock``,
released by the kernel when its process dies, so a lock left by a killed run is simply taken over), and names the
holder to a second run. A stage builds its artefacts beside the run, in ``output_dir/.staging-*`` (hidden:
``datasets`` and pushes never see it), starting from hard links of the run's current files, and
:meth:`RunFolder.commit` swaps them in with renames: the old run stays whole and loadable until the new one is
complete, and a kill during the swap leaves a folder that every command and ``load_dataset`` refuse (never one
that mixes two runs) and an intent file (:data:`INTENT`) from which the next command finishes the swap.

A run owns exactly its entries (hf_clipsel.runs.record.ARTEFACTS, the record and the card): a folder is checked
before anything is written in it (:func:`check_output_dir`), so a refused command leaves it as it was.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import socket
import sys
import uuid
from pathlib import Path

from ..configs import ClipselConfig
from ..core.names import CARD, EMBEDDINGS_DIR, RECORD, SCORES_DIR
from ..outputs import write_atomic_text
from .record import (
    ARTEFACTS,
    INCOMPLETE_CARD,
    IncompleteRunError,
    RunRecord,
    artefact_sizes,
    extend_record,
    file_digest,
    incomplete_message,
    read_record,
)

logger = logging.getLogger(__name__)

LOCK = ".hf_clipsel.lock"
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
# Written before a commit's first rename, removed after its last: names the staging folder (complete by then) and
# the trash folder, so that the next command finishes an interrupted swap instead of deleting the only copies.
INTENT = ".hf_clipsel-commit.json"
# What hf_clipsel itself leaves in a folder besides the run's entries (never a user's).
OWN_HIDDEN = (LOCK, INTENT)


class RunLockedError(OSError):
    """Another process holds the folder."""


class FolderLock:
    """An exclusive, non-blocking lock on ``path`` (``flock``): the kernel releases it when the holder dies. The file
    names the holder while it is held and is emptied on release."""

    def __init__(self, path: Path):
        self.path, self.handle = Path(path), None

    def acquire(self) -> str | None:
        """Take the lock, or raise :class:`RunLockedError` naming the holder. Returns a note when the lock was left
        by a process that no longer runs (taken over)."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunLockedError(
                f"{self.path.parent} is in use by {holder}; wait for it to finish, or choose another --output_dir."
            ) from None
        handle.seek(0)
        left = handle.read().strip()
        handle.seek(0)
        handle.truncate()
        command = " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:200]
        handle.write(f"process {os.getpid()} on {socket.gethostname()} ({command}), since {_now()}")
        handle.flush()
        self.handle = handle
        if left:
            return f"took over the lock of {left}, which no longer holds it"
        return None

    def release(self) -> None:
        if self.handle is None:
            return
        import fcntl

        self.handle.seek(0)
        self.handle.truncate()
        self.handle.flush()
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
        self.handle = None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def holds_a_run(output_dir: Path) -> bool:
    """Whether ``output_dir`` holds an hf_clipsel run: finished (a record), incomplete (the placeholder card), in the
    middle of a commit (the intent file), or written before run records (a card of hf_clipsel with scores)."""
    if (output_dir / RECORD).is_file() or (output_dir / INTENT).is_file():
        return True
    card = output_dir / CARD
    if not card.is_file():
        return False
    text = card.read_text(encoding="utf-8", errors="replace")
    front_matter = text.split("\n---", 1)[0] if text.startswith("---") else ""
    return text == INCOMPLETE_CARD or ("- hf-clipsel\n" in front_matter and (output_dir / SCORES_DIR).is_dir())


def check_output_dir(output_dir: Path, overwrite: bool = False, need_run: bool = False) -> None:
    """Refuse, before anything is written, a folder this command may not write: a file; with ``need_run`` (a command
    on a finished run) a folder that holds no run; otherwise a non-empty folder that holds no run, unless
    ``overwrite`` (then only the run's own entries are replaced)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output_dir {output_dir} is a file, not a folder: choose another --output_dir.")
    if need_run and not output_dir.is_dir():
        raise FileNotFoundError(f"{output_dir} does not exist: give the output_dir of a finished hf-clipsel run.")
    if not output_dir.is_dir() or holds_a_run(output_dir):
        return
    others = sorted(
        p.name for p in output_dir.iterdir() if p.name not in OWN_HIDDEN and not p.name.startswith(STAGING_PREFIX)
    )
    listed = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
    if need_run:
        raise IncompleteRunError(
            f"{output_dir} is not an hf-clipsel run (no {RECORD}; it holds {listed or 'nothing'}): give the "
            "output_dir of a finished run."
        )
    if others and not overwrite:
        raise FileExistsError(
            f"{output_dir} is not empty and holds no hf-clipsel run ({listed}): choose another --output_dir, or "
            f"pass --overwrite_output_dir to write the run there (its entries {', '.join(ARTEFACTS)} and {CARD} are "
            f"then replaced and its caches go to {EMBEDDINGS_DIR}/; other files stay)."
        )


def check_not_source(output_dir: Path, dataset_name: str | None) -> None:
    """Refuse an ``output_dir`` that is, contains, or lies inside the local source dataset ``dataset_name``."""
    if not dataset_name or not Path(dataset_name).exists():
        return
    source, target = Path(dataset_name).resolve(), Path(output_dir).resolve()
    if target == source or target in source.parents or (source.is_dir() and source in target.parents):
        raise ValueError(
            f"--output_dir {output_dir} is, holds or lies inside the source dataset {dataset_name}, which a run "
            "never writes: choose an --output_dir outside it."
        )


@contextlib.contextmanager
def held_by_main_process(config: ClipselConfig, accelerator, stage: str):
    """``(folder, record)``: the :class:`RunFolder` of ``config.run.output_dir`` (and of an outside ``cache_dir``)
    held by the main process, and the record ``stage`` extends (:func:`extend_record`); ``(None, None)`` on the
    other processes. A refusal (the folder is locked, holds another run, holds no run but other files, or is the
    source's) is raised on every process, and nothing is written before it."""
    from accelerate.utils import broadcast_object_list

    folder = record = error = None
    if accelerator.is_main_process:
        output_dir = Path(config.run.output_dir)
        cache_dir = Path(config.run.cache_dir) if config.run.cache_dir else None
        outside = (cache_dir,) if cache_dir and output_dir.resolve() not in cache_dir.resolve().parents else ()
        try:
            check_not_source(output_dir, config.data.dataset_name)
            folder = RunFolder(output_dir, extra_locks=outside, overwrite=config.run.overwrite_output_dir)
            folder.__enter__()
            record = extend_record(folder.record, config, stage)
        except (OSError, ValueError) as raised:
            error = raised
            if folder is not None:
                folder.__exit__(None, None, None)
    if accelerator.num_processes > 1:
        message = [str(error) if error else None]
        broadcast_object_list(message)
        if message[0] and error is None:
            raise RunLockedError(message[0])
    if error is not None:
        raise error
    try:
        yield folder, record
    finally:
        if folder is not None:
            folder.__exit__(*sys.exc_info())  # an error names the folder it was writing


class RunFolder:
    """``output_dir`` held by this process: locked, with a staging folder where a stage builds the run's next state.

    Use as a context manager. Entering checks the folder first (:func:`check_output_dir`: ``overwrite`` lets a run
    into a non-empty folder that holds none; ``need_run`` asks for a run there) and writes nothing when it refuses;
    then it takes the lock and finishes a commit that a stopped command left half done. :attr:`staging` starts as
    hard links of the run's current artefacts (so renderers and readers see a whole run there); a stage writes or
    replaces its own entries in it, then :meth:`commit` swaps the staging folder's artefacts in and writes the
    record last.
    """

    def __init__(
        self, output_dir: str | Path, extra_locks: tuple[Path, ...] = (), overwrite: bool = False, need_run=False
    ):
        self.output_dir = Path(output_dir)
        self.overwrite, self.need_run = overwrite, need_run
        self.locks = [FolderLock(self.output_dir / LOCK)] + [FolderLock(Path(p) / LOCK) for p in extra_locks]
        self.staging: Path | None = None
        self.carried: dict[str, tuple[int, str | None]] = {}
        self.notes: list[str] = []

    def __enter__(self) -> RunFolder:
        check_output_dir(self.output_dir, self.overwrite, self.need_run)  # before anything is written
        self.output_dir.mkdir(parents=True, exist_ok=True)
        try:
            for lock in self.locks:
                note = lock.acquire()
                if note:
                    self.notes.append(note)
            intent = self.output_dir / INTENT
            if intent.is_file():  # a command stopped during its swap: its staging folder is whole, finish it
                _swap(self.output_dir, json.loads(intent.read_text()))
                self.notes.append("finished the commit of a command that was stopped during it")
        except BaseException:
            self.release()
            raise
        for stale in [*self.output_dir.glob(STAGING_PREFIX + "*"), *self.output_dir.glob(TRASH_PREFIX + "*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a run killed before its swap; nobody writes here now
        card = self.output_dir / CARD
        if not card.exists():
            write_atomic_text(card, INCOMPLETE_CARD)
        for note in self.notes:
            logger.warning("%s: %s.", self.output_dir, note)
        return self

    def __exit__(self, kind, error, traceback) -> None:
        where = self.staging or self.output_dir
        # a swap stopped by an error leaves its intent and staging folder for the next command to finish
        if self.staging is not None and not (self.output_dir / INTENT).exists():
            shutil.rmtree(self.staging, ignore_errors=True)
        self.staging = None
        self.release()
        if isinstance(error, OSError) and error.errno and not error.filename:  # e.g. "File too large": say where
            raise OSError(error.errno, f"{error.strerror} while writing the run into", str(where)) from error

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()

    @property
    def record(self) -> RunRecord | None:
        return read_record(self.output_dir)

    def stage(self, keep: tuple[str, ...] = ARTEFACTS) -> Path:
        """A fresh staging folder holding hard links of the run's current entries named in ``keep``."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        self.staging = self.output_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}"
        self.staging.mkdir()
        for entry in keep:
            source = self.output_dir / entry
            if source.is_dir():
                shutil.copytree(source, self.staging / entry, copy_function=_link_or_copy)
            elif source.is_file():
                _link_or_copy(source, self.staging / entry)
        # what the stage carries over unwritten: the commit records their digests only where the record vouches
        recorded = (self.record.artefacts if self.record else {}) if keep else {}
        self.carried = {
            name: ((self.staging / name).stat().st_ino, recorded.get(name)) for name in artefact_sizes(self.staging)
        }
        return self.staging

    def commit(self, record: RunRecord, card_text: str | None) -> RunRecord:
        """Make the staging folder's artefacts the run's: the record lists and digests them; ``card_text`` (None
        while the run has not selected) becomes README.md. A file carried over from the run unwritten must still
        match the run's record (no command records a digest it did not write). The swap is renames only, announced
        by an intent file first, so that a kill anywhere in it is finished by the next command."""
        staging = self.staging
        record.artefacts = {}
        for name in artefact_sizes(staging):
            record.artefacts[name] = file_digest(staging / name)
            inode, recorded = self.carried.get(name, (None, None))
            if inode == (staging / name).stat().st_ino and recorded != record.artefacts[name]:
                raise IncompleteRunError(incomplete_message(self.output_dir, f"changed since written: {name}"))
        record.written = _now()
        write_atomic_text(staging / RECORD, record.to_json())
        if card_text is not None:
            write_atomic_text(staging / CARD, card_text)
        trash = self.output_dir / f"{TRASH_PREFIX}{uuid.uuid4().hex[:8]}"
        trash.mkdir()
        entries = [entry for entry in ARTEFACTS if (staging / entry).exists()]
        intent = {"staging": staging.name, "trash": trash.name, "entries": entries, "card": card_text is not None}
        temporary = self.output_dir / f"{INTENT}.tmp"
        temporary.write_text(json.dumps(intent))
        os.replace(temporary, self.output_dir / INTENT)
        _swap(self.output_dir, intent)
        self.staging = None
        return record


def _swap(output_dir: Path, intent: dict) -> None:
    """Move the run's entries into the trash and the staging folder's in, the record and the card last; then drop
    the intent, the trash and the staging folder. Each step checks what is done, so a swap stopped anywhere is
    finished by calling this again with the same ``intent``."""
    staging, trash = output_dir / intent["staging"], output_dir / intent["trash"]
    trash.mkdir(exist_ok=True)
    if (staging / RECORD).exists():  # the record goes in after every entry: until then the entries are swapping
        # until the new card is in, the folder is not loadable and not a run: never a mix of two
        write_atomic_text(output_dir / CARD, INCOMPLETE_CARD)
        if (output_dir / RECORD).exists():
            os.replace(output_dir / RECORD, trash / RECORD)
        for entry in ARTEFACTS:
            new = entry in intent["entries"]
            if (output_dir / entry).exists() and (not new or (staging / entry).exists()):
                os.replace(output_dir / entry, trash / entry)
            if new and (staging / entry).exists():
                os.replace(staging / entry, output_dir / entry)
        os.replace(staging / RECORD, output_dir / RECORD)
    if intent["card"] and (staging / CARD).exists():
        os.replace(staging / CARD, output_dir / CARD)
    (output_dir / INTENT).unlink(missing_ok=True)
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def _link_or_copy(source, destination) -> None:
    try:
        os.link(source, destination)
    except OSError:  # a file system without hard links
        shutil.copy2(source, destination)
