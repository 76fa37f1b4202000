"""File-system pieces both sides of a two-way sync use: looking, reading, big files, the trash.

Every path is opened from the folder's own descriptor one name at a time with ``O_NOFOLLOW``
(fresh each time: other programs rename folders under us, so no descriptor is kept), and writes go
through :class:`.tree.Tree` (temporary names, staging, the trash, the mode mask).
Big files arrive in parts kept across connections (:class:`Partials`), so a cut transfer resumes.

Part of the agent's package (the peer runs on it in the runtime, or on the laptop for a sync started
in the runtime; the laptop's coordinator imports it too): standard library only, Python >= 3.6.
"""

import fcntl
import hashlib
import os
import stat
import time
from typing import Dict, Iterator, List, Optional, Tuple

from . import fs as agent_fs
from . import protocol
from .rules import Rules
from .tree import Tree

# What both sides say about one path: (mode with its type bits, 0 when it is absent; size of a
# file; mtime in ns; a link's target)
Stat = Tuple[int, int, int, bytes]
ABSENT: Stat = (0, 0, 0, b"")

RESUME = b"resume"                # in the trash's staging folder: big files arriving, by key
RESUME_KEEP = 2 * 86400.0          # a part nobody resumed for this long is removed
READ_CHUNK = 1 << 20
O_DIR = protocol.O_DIR
O_READ = protocol.O_READ


def stat_of(st: os.stat_result, target: bytes = b"") -> Stat:
    return (st.st_mode, st.st_size if stat.S_ISREG(st.st_mode) else 0, st.st_mtime_ns, target)


def open_parent(root_fd: int, rel: bytes) -> Optional[int]:
    """A new descriptor of ``rel``'s folder, every component opened without following a link;
    None when a folder on the way is missing or is not a folder."""
    fd = os.dup(root_fd)
    for part in rel.split(b"/")[:-1]:
        try:
            nxt = os.open(part, O_DIR, dir_fd=fd)
        except OSError:
            os.close(fd)
            return None
        os.close(fd)
        fd = nxt
    return fd


def stat_at(root_fd: int, rel: bytes) -> Stat:
    """What is at ``rel`` now (:data:`ABSENT` when nothing, or a folder above it is a link)."""
    fd = open_parent(root_fd, rel)
    if fd is None:
        return ABSENT
    try:
        name = rel.rpartition(b"/")[2]
        st = agent_fs.lstat_at(fd, name)
        if st is None:
            return ABSENT
        target = b""
        if stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(name, dir_fd=fd)
            except OSError:
                return ABSENT
        return stat_of(st, target)
    finally:
        os.close(fd)


def open_file(root_fd: int, rel: bytes) -> int:
    """``rel`` opened for reading (never through a link); OSError when it is not a plain file."""
    fd = open_parent(root_fd, rel)
    if fd is None:
        raise FileNotFoundError(rel.decode("utf-8", "replace"))
    try:
        f = os.open(rel.rpartition(b"/")[2], O_READ, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(f).st_mode):
        os.close(f)
        raise ValueError("not a regular file")
    return f


def read_whole(root_fd: int, rel: bytes, limit: int) -> Tuple[Stat, bytes]:
    """A small file's (stat, bytes), both taken from the same open file; ValueError when it is
    bigger than ``limit`` or changed while it was read."""
    f = open_file(root_fd, rel)
    try:
        before = os.fstat(f)
        if before.st_size > limit:
            raise ValueError("bigger than %d bytes" % limit)
        chunks = []
        while True:
            chunk = os.read(f, READ_CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
        after = os.fstat(f)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise ValueError("changed while it was read")
        data = b"".join(chunks)
        if len(data) != after.st_size:
            raise ValueError("changed while it was read")
        return stat_of(after), data
    finally:
        os.close(f)


def digest_of(root_fd: int, rel: bytes) -> Tuple[Stat, bytes]:
    """A file's (stat, blake2b digest), read once without following a link."""
    f = open_file(root_fd, rel)
    try:
        digest = agent_fs.read_digest(f)[1]
        return stat_of(os.fstat(f)), digest
    finally:
        os.close(f)


def walk(root_fd: int, rules: Rules, prefix: bytes = b"") -> Iterator[Tuple[bytes, Stat]]:
    """Every synced entry below ``root_fd`` (the folder ``prefix``, b"" for the top) as (rel,
    stat), a folder before what is in it; skipped folders are not entered, links are entries
    (never followed)."""
    stack = [(prefix, os.dup(root_fd))]
    while stack:
        rel, fd = stack.pop()
        try:
            names = agent_fs.names_in(fd)
        except OSError:
            os.close(fd)
            continue
        try:
            for name in names:
                r = rel + b"/" + name if rel else name
                st = agent_fs.lstat_at(fd, name)
                if st is None:
                    continue
                is_dir = stat.S_ISDIR(st.st_mode)
                if rules.excluded(os.fsdecode(r), is_dir):
                    continue
                target = b""
                if stat.S_ISLNK(st.st_mode):
                    try:
                        target = os.readlink(name, dir_fd=fd)
                    except OSError:
                        continue
                elif is_dir:
                    sub = agent_fs.open_folder(fd, name, False)
                    if sub is None:
                        continue
                    stack.append((r, sub))
                elif not stat.S_ISREG(st.st_mode):
                    continue  # sockets, FIFOs, devices: never synced
                yield r, stat_of(st, target)
        finally:
            os.close(fd)


def has_entries(root_fd: int, rel: bytes, rules: Rules) -> bool:
    """True when folder ``rel`` holds anything synced (what a folder's delete must not lose)."""
    fd = open_parent(root_fd, rel + b"/x")
    if fd is None:
        return False
    try:
        for name in agent_fs.names_in(fd):
            st = agent_fs.lstat_at(fd, name)
            r = os.fsdecode(rel + b"/" + name)
            if st is not None and not rules.excluded(r, stat.S_ISDIR(st.st_mode)):
                return True
        return False
    finally:
        os.close(fd)


def matches(now: Stat, want: Stat) -> bool:
    """``now`` is what ``want`` describes: the same type, and for a file the same size and time,
    for a link the same target; absent when ``want`` is."""
    if not want[0] or not now[0]:
        return not want[0] and not now[0]
    if stat.S_IFMT(now[0]) != stat.S_IFMT(want[0]):
        return False
    if stat.S_ISREG(now[0]):
        return now[1] == want[1] and now[2] == want[2]
    if stat.S_ISLNK(now[0]):
        return now[3] == want[3]
    return True


class Partials:
    """Big files arriving in parts, kept across connections in the trash's staging folder under a
    name made of (path, size, time): a transfer cut mid-way resumes where it stopped. A part is
    locked while one receiver writes it (a peer of a dead connection may still be finishing its
    last records when the next one asks)."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self.names: Dict[bytes, bytes] = {}
        self.fds: Dict[bytes, int] = {}

    def _folder(self) -> int:
        trash = self.tree.trash.folders()
        fd = trash.get(protocol.STAGING + b"/" + RESUME, create=True)
        assert fd is not None
        return fd

    @staticmethod
    def key(rel: bytes, size: int, mtime: int) -> bytes:
        """``<path's hash>-<version's hash>``: one version of a path is kept at a time."""
        path = hashlib.blake2b(rel, digest_size=8).hexdigest()
        version = hashlib.blake2b(b"%d\0%d" % (size, mtime), digest_size=6).hexdigest()
        return ("%s-%s" % (path, version)).encode()

    def begin(self, rel: bytes, size: int, mtime: int, wait: float = 0.0) -> int:
        """Start (or resume) ``rel``: how many of its bytes are here already. An earlier version's
        part (the file changed since) goes. ValueError when another receiver still writes it
        after ``wait`` seconds (the sender tries again later)."""
        self._close(rel)
        fd = self._folder()
        name = self.names[rel] = self.key(rel, size, mtime)
        prefix = name.split(b"-")[0] + b"-"
        for other in agent_fs.names_in(fd):
            if other.startswith(prefix) and other != name:
                agent_fs.remove_quietly(fd, other)
        out = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | protocol.O_CLOEXEC, 0o600, dir_fd=fd)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(out, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    os.close(out)
                    raise ValueError("another transfer of this file is still writing it") from None
                time.sleep(0.05)
        st = os.fstat(out)
        if not stat.S_ISREG(st.st_mode) or st.st_size > size:
            os.ftruncate(out, 0)
        else:
            os.utime(out)  # resumed: not stale
        self.fds[rel] = out
        return os.fstat(out).st_size

    def open(self, rel: bytes) -> int:
        """The part of ``rel`` begun, for whoever receives it (a descriptor of its own)."""
        if rel not in self.fds:
            raise ValueError("a part of a file not begun")
        fd = os.dup(self.fds[rel])
        os.lseek(fd, 0, os.SEEK_END)
        return fd

    def write(self, rel: bytes, offset: int, data: bytes) -> None:
        out = self.fds.get(rel)
        if out is None:
            raise ValueError("a part of a file not begun")
        have = os.fstat(out).st_size
        if have != offset:
            raise ValueError("a part at %d does not follow the %d bytes here" % (offset, have))
        os.lseek(out, offset, os.SEEK_SET)
        agent_fs.write_all(out, data)

    def join(self, rel: bytes, mode: int, mtime: int, size: int, digest: bytes) -> None:
        """The file is whole: the tree checks its digest and puts it in place (what it replaces
        to the trash)."""
        name = self.names.pop(rel, None)
        if name is None:
            raise ValueError("no part of this file arrived")
        tree = self.tree
        into = tree._partials()
        new = tree._name(b"big-" + tree.stage_name + b"-")
        try:
            os.rename(name, new, src_dir_fd=self._folder(), dst_dir_fd=into)
        finally:
            self._close(rel)
        tree.big[rel] = new
        tree.commit(rel, mode, mtime, size, digest)

    def drop(self, rel: bytes) -> None:
        name = self.names.pop(rel, None)
        self._close(rel)
        if name is not None:
            agent_fs.remove_quietly(self._folder(), name)

    def _close(self, rel: bytes) -> None:
        fd = self.fds.pop(rel, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Let go of every part (what arrived stays for the next transfer)."""
        for rel in list(self.fds):
            self._close(rel)
        self.names.clear()

    def clean(self, now: Optional[float] = None) -> None:
        """Remove parts nobody resumed for :data:`RESUME_KEEP`."""
        cut = (time.time() if now is None else now) - RESUME_KEEP
        fd = self._folder()
        for name in agent_fs.names_in(fd):
            st = agent_fs.lstat_at(fd, name)
            if st is not None and st.st_mtime < cut:
                agent_fs.remove_quietly(fd, name)


def upkeep(tree: Tree, keep_days: float, budget: int) -> List[bytes]:
    """The trash of ``tree``: older than ``keep_days`` goes, then the oldest until it holds at most
    ``budget`` bytes (the agent's own book of the trash's sizes, ``.sizes``); a ``.gitignore`` in it
    keeps it out of ``git status``. The names removed."""
    trash = tree.trash
    trash.prune(keep_days)
    folders = trash.folders()
    try:
        fd = os.open(b".gitignore", protocol.O_NEW, 0o644, dir_fd=folders.root)
        agent_fs.write_all(fd, b"# colab-remote: replaced and deleted files, by time\n*\n")
        os.close(fd)
    except FileExistsError:
        pass
    book = trash.budget.load(folders)
    removed = []
    while book and trash.budget.bytes > budget:
        name = min(book)
        if trash.budget.drop(folders, name, "cap"):
            removed.append(name)
    trash.budget.save(folders, force=bool(removed))
    return removed
