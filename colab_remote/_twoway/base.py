"""The last common state of a two-way sync, and what a change means against it.

:class:`Base` is, per path, what both sides held the last time they agreed (type, size, mtime,
mode, a link's target and, when known, the content's digest), kept in sqlite in the laptop's state
folder and in memory. :func:`decide` is the three-way rule (unison's and mutagen's two-way-safe):

- the same on both sides: nothing to do (the base follows);
- changed on one side only since the base: that side's version goes to the other;
- changed on both sides: a change beats a delete (nothing is lost), two folders agree, anything
  else is a conflict (both versions are kept).

Pure: no process, no network (tested with plain asserts).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from pathlib import Path
from typing import NamedTuple

from .. import _agent
from .._agent import syncfs as fs

SAME, PUSH, PULL, CONFLICT = "same", "push", "pull", "conflict"


class Entry(NamedTuple):
    """One path on one side (None stands for "absent")."""

    mode: int             # with its type bits
    size: int = 0         # a file's
    mtime_ns: int = 0
    target: bytes = b""   # a link's
    digest: bytes = b""   # a file's content, when known

    @classmethod
    def of(cls, st: fs.Stat, digest: bytes = b"") -> Entry | None:
        return None if not st[0] else cls(st[0], st[1], st[2], st[3], digest)

    @property
    def stat(self) -> fs.Stat:
        return (self.mode, self.size, self.mtime_ns, self.target)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.mode)


def stat_of(entry: Entry | None) -> fs.Stat:
    return fs.ABSENT if entry is None else entry.stat


def same(a: Entry | None, b: Entry | None) -> bool:
    """Both absent, or the same thing: two folders; links to the same target; files of the same
    size and permissions with the same mtime or (when both are known) the same digest."""
    if a is None or b is None:
        return a is None and b is None
    if stat.S_IFMT(a.mode) != stat.S_IFMT(b.mode):
        return False
    if a.is_dir:
        return True
    if a.is_link:
        return a.target == b.target
    if a.size != b.size or a.mode & _agent.MODE_MASK != b.mode & _agent.MODE_MASK:
        return False
    return a.mtime_ns == b.mtime_ns or bool(a.digest) and a.digest == b.digest


def needs_digest(a: Entry | None, b: Entry | None) -> bool:
    """Two files that only their contents can tell apart (same size and mode, other mtime)."""
    return (a is not None and b is not None and a.is_file and b.is_file and a.size == b.size
            and a.mtime_ns != b.mtime_ns and a.mode & _agent.MODE_MASK == b.mode & _agent.MODE_MASK
            and not (a.digest and b.digest))


def decide(base: Entry | None, local: Entry | None, remote: Entry | None) -> str:
    """SAME, PUSH (the laptop's version to the runtime), PULL (the runtime's to the laptop) or
    CONFLICT, for one path (see the module docstring).

    >>> f = Entry(0o100644, 3, 1)
    >>> decide(f, f._replace(mtime_ns=2), f), decide(f, None, f), decide(None, f, f._replace(size=4))
    ('push', 'pull', 'conflict')
    """
    if same(local, remote):
        return SAME
    if same(local, base):
        return PULL
    if same(remote, base):
        return PUSH
    if local is None:
        return PULL  # deleted here, changed there: the change wins
    if remote is None:
        return PUSH
    if local.is_dir and remote.is_dir:
        return SAME
    return CONFLICT


class Base:
    """The last common state: a dict in memory, written behind to sqlite (``commit``) with the
    runtime it belongs to (``meta``: the runtime folder's marker)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(str(path), check_same_thread=False)
        with contextlib.suppress(OSError):
            os.chmod(path, 0o600)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS entries (path BLOB PRIMARY KEY, mode INTEGER, "
                        "size INTEGER, mtime INTEGER, target BLOB, digest BLOB)")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        self.entries: dict[str, Entry] = {
            os.fsdecode(p): Entry(m, s, t, bytes(tg), bytes(d))
            for p, m, s, t, tg, d in self.db.execute("SELECT * FROM entries")}
        self.meta: dict[str, str] = dict(self.db.execute("SELECT key, value FROM meta"))
        self.dirty: dict[str, Entry | None] = {}
        self.cleared = False

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, rel: object) -> bool:
        return rel in self.entries

    def get(self, rel: str) -> Entry | None:
        return self.entries.get(rel)

    def set(self, rel: str, entry: Entry | None) -> None:
        if entry is None:
            if self.entries.pop(rel, None) is None:
                return
        else:
            self.entries[rel] = entry
        self.dirty[rel] = entry

    def under(self, folder: str) -> list[str]:
        """Every path recorded below ``folder``."""
        prefix = folder + "/"
        return [p for p in self.entries if p.startswith(prefix)]

    def clear(self) -> None:
        self.entries.clear()
        self.dirty.clear()
        self.cleared = True

    def set_meta(self, key: str, value: str) -> None:
        self.meta[key] = value
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
        self.db.commit()

    def commit(self) -> None:
        """Write what changed since the last commit (one transaction)."""
        if not self.dirty and not self.cleared:
            return
        with self.db:
            if self.cleared:
                self.db.execute("DELETE FROM entries")
                self.cleared = False
            gone = [(os.fsencode(p),) for p, e in self.dirty.items() if e is None]
            rows = [(os.fsencode(p), e.mode, e.size, e.mtime_ns, e.target, e.digest)
                    for p, e in self.dirty.items() if e is not None]
            if gone:
                self.db.executemany("DELETE FROM entries WHERE path = ?", gone)
            if rows:
                self.db.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?)", rows)
        self.dirty.clear()

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.commit()
            self.db.close()
