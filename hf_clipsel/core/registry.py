"""The one registry behind every extension point: selectors, scores and model families.

A :class:`Registry` maps a name to what was registered under it. Like PEFT's registries it refuses a second
registration under a name already taken, so a typo or an import-order accident cannot silently replace a method.
Third-party packages register through an entry-point group (``hf_clipsel.selectors``, ``hf_clipsel.scores``,
``hf_clipsel.families``): each entry point names a module (or an object in it) whose import registers its entries
(a registry built with ``adopt`` also registers the object an entry point names, under the entry point's name, when
its import did not). They are loaded on first use of the registry (a name looked up, the names listed), so the CLI,
the configuration parser and the Python API all see them; a name not found looks again for entry points not loaded
yet (a distribution installed while the process runs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, MutableMapping
from importlib.metadata import entry_points

logger = logging.getLogger(__name__)


class Registry(MutableMapping):
    """Names to registered entries, of one ``kind`` (``"selector"``...), with the plugins of ``entry_point_group``.

    Args:
        kind: what an entry is, for messages ("selector", "score", "model family").
        entry_point_group: the entry-point group third-party packages register under.
    """

    def __init__(self, kind: str, entry_point_group: str, adopt: Callable[[object], object] | None = None):
        self.kind, self.entry_point_group, self.adopt = kind, entry_point_group, adopt
        self._entries: dict = {}
        self._loaded: set[str] = set()  # the entry points loaded (or tried), by value
        self._scanned = False

    def register(self, name: str, entry) -> None:
        """Add ``entry`` under ``name``; ``ValueError`` when ``name`` is not a non-empty string or is taken."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a {self.kind} must be registered under a non-empty string name, not {name!r}.")
        if name in self._entries:
            where = getattr(self._entries[name], "__module__", None) or type(self._entries[name]).__module__
            raise ValueError(f"a {self.kind} named {name!r} is already registered ({where}).")
        self._entries[name] = entry

    def load_plugins(self, again: bool = False) -> None:
        """Import every entry point of the group not loaded yet (the group is read once, or ``again``); one that
        fails to load is reported and skipped."""
        if self._scanned and not again:
            return
        self._scanned = True
        for entry_point in entry_points(group=self.entry_point_group):
            if entry_point.value in self._loaded:
                continue
            self._loaded.add(entry_point.value)
            try:
                loaded = entry_point.load()
                if self.adopt is not None and entry_point.name not in self._entries:
                    self.adopt(loaded)
            except Exception as error:  # a broken plugin must not take the built-in entries down with it
                logger.warning(
                    "the %s plugin %r (%s) could not be loaded: %s: %s",
                    self.kind,
                    entry_point.name,
                    entry_point.value,
                    type(error).__name__,
                    error,
                )

    def get(self, name: str, default=None):
        if name not in self._entries:
            self.load_plugins(again=True)
        return self._entries.get(name, default)

    def lookup(self, name: str):
        """The entry registered under ``name``; ``ValueError`` naming the registered ones otherwise."""
        entry = self.get(name)
        if entry is None:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}.")
        return entry

    def names(self) -> list[str]:
        """Every registered name (plugins included), sorted."""
        self.load_plugins()
        return sorted(self._entries)

    def __getitem__(self, name: str):
        if name not in self._entries:
            self.load_plugins(again=True)
        return self._entries[name]

    def __setitem__(self, name: str, entry) -> None:
        self.register(name, entry)

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        self.load_plugins()
        return iter(self._entries)

    def __len__(self) -> int:
        self.load_plugins()
        return len(self._entries)

    def __contains__(self, name) -> bool:
        if name not in self._entries:
            self.load_plugins(again=True)
        return name in self._entries
