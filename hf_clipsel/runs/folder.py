"""A run's folder held by one writer: the lock, the staging folder beside the run, and the swap that commits it.

One writer at a time: :class:`RunFolder` holds an exclusive lock on ``output_dir/.hf_clipsel.lock`` (``flock``,
released by the kernel when its process dies, so a lock left by a killed run is simply taken over), and names the
holder to a second run. A stage builds its artefacts beside the run, in ``output_dir/.staging-*`` (hidden:
``datasets`` and pushes never see it), starting from hard links of the run's current files, and
:meth:`RunFolder.commit` swaps them in with renames: the old run stays whole and loadable until the new one is
complete, and a kill during the swap leaves a folder that every command and ``load_dataset`` refuse (never one
that mixes two runs).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
import socket
import sys
import uuid
from pathlib import Path

from ..configs import ClipselConfig
from ..core.names import CARD, RECORD
from ..outputs import write_atomic_text
from .record import ARTEFACTS, INCOMPLETE_CARD, RunRecord, artefact_sizes, extend_record, file_digest, read_record

logger = logging.getLogger(__name__)

LOCK = ".hf_clipsel.lock"
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"


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


@contextlib.contextmanager
def held_by_main_process(config: ClipselConfig, accelerator, stage: str):
    """``(folder, record)``: the :class:`RunFolder` of ``config.run.output_dir`` (and of an outside ``cache_dir``)
    held by the main process, and the record ``stage`` extends (:func:`extend_record`); ``(None, None)`` on the
    other processes. A refusal (the folder is locked, or holds another run) is raised on every process."""
    from accelerate.utils import broadcast_object_list

    folder = record = error = None
    if accelerator.is_main_process:
        output_dir = Path(config.run.output_dir)
        cache_dir = Path(config.run.cache_dir) if config.run.cache_dir else None
        outside = (cache_dir,) if cache_dir and output_dir.resolve() not in cache_dir.resolve().parents else ()
        try:
            folder = RunFolder(output_dir, extra_locks=outside).__enter__()
            for note in folder.notes:
                logger.warning("%s: %s.", output_dir, note)
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
            folder.__exit__(None, None, None)


class RunFolder:
    """``output_dir`` held by this process: locked, with a staging folder where a stage builds the run's next state.

    Use as a context manager. :attr:`staging` starts as hard links of the run's current artefacts (so renderers and
    readers see a whole run there); a stage writes or replaces its own entries in it, then :meth:`commit` swaps the
    staging folder's artefacts in and writes the record last.
    """

    def __init__(self, output_dir: str | Path, extra_locks: tuple[Path, ...] = ()):
        self.output_dir = Path(output_dir)
        self.locks = [FolderLock(self.output_dir / LOCK)] + [FolderLock(Path(p) / LOCK) for p in extra_locks]
        self.staging: Path | None = None
        self.notes: list[str] = []

    def __enter__(self) -> RunFolder:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        try:
            for lock in self.locks:
                note = lock.acquire()
                if note:
                    self.notes.append(note)
        except BaseException:
            self.release()
            raise
        for stale in [*self.output_dir.glob(STAGING_PREFIX + "*"), *self.output_dir.glob(TRASH_PREFIX + "*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed run; nobody else writes here now
        card = self.output_dir / CARD
        if not card.exists():
            write_atomic_text(card, INCOMPLETE_CARD)
        return self

    def __exit__(self, *exc) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        self.release()

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
        return self.staging

    def commit(self, record: RunRecord, card_text: str | None) -> RunRecord:
        """Make the staging folder's artefacts the run's: the record lists and digests them; ``card_text`` (None
        while the run has not selected) becomes README.md. Only renames happen once the old run stops being whole."""
        staging = self.staging
        record.artefacts = {name: file_digest(staging / name) for name in artefact_sizes(staging)}
        record.written = _now()
        write_atomic_text(staging / RECORD, record.to_json())
        if card_text is not None:
            write_atomic_text(staging / CARD, card_text)
        trash = self.output_dir / f"{TRASH_PREFIX}{uuid.uuid4().hex[:8]}"
        trash.mkdir()
        # From here until the new card is in, the folder is not loadable and not a run: never a mix of two.
        write_atomic_text(self.output_dir / CARD, INCOMPLETE_CARD)
        (self.output_dir / RECORD).unlink(missing_ok=True)
        for entry in ARTEFACTS:
            if (self.output_dir / entry).exists():
                os.replace(self.output_dir / entry, trash / entry)
            if (staging / entry).exists():
                os.replace(staging / entry, self.output_dir / entry)
        os.replace(staging / RECORD, self.output_dir / RECORD)
        if card_text is not None:
            os.replace(staging / CARD, self.output_dir / CARD)
        shutil.rmtree(trash, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        self.staging = None
        return record


def _link_or_copy(source, destination) -> None:
    try:
        os.link(source, destination)
    except OSError:  # a file system without hard links
        shutil.copy2(source, destination)
