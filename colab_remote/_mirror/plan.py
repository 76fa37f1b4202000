"""What a batch of changes means: the ops to send, read from the folder as they are listed.

The watcher says *which* paths changed; a :class:`Plan` looks at each of them now (the folder is
the truth, not the event) and yields the agent's ops in order: a folder before its files, a new
folder's whole content (files may have landed before its watch existed), deletes for what is gone.
Files too big for one record, and every file when the server has no agent, are listed apart
(:attr:`Plan.big`) for the channel to stream (the big-file lane, :mod:`.lane`, with the
:func:`identity` of each in :attr:`Plan.big_keys`). Each small file's (size, mtime, mode, digest) is
noted in :attr:`Plan.sending`; a file the agent already acknowledged with the same four (a big one:
placed with the same identity) is not sent again.

A git repository's files travel in stages (:meth:`Plan.stages`, :mod:`.git`): blobs and packs,
what indexes packs, trees and commits (each after what it names), then refs, ``HEAD`` and the
index, then the deletes of loose objects a ``gc`` packed; so a server copy cut off anywhere is a
repository git can read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from .. import _agent, _sync
from . import git

# One op for the agent: (op, path relative to the root, mode, mtime in ns, data or link target)
Op = tuple[bytes, str, int, int, bytes | None]
Digest = tuple[int, int, int, bytes]  # size, mtime in ns, mode, blake2b-128 of the content (a big
                                      # file: b"inode:ctime in ns" instead)

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)


class Entry(NamedTuple):
    """One entry of the server copy, as the agent lists it."""

    mode: int      # with the type bits
    size: int
    mtime_ns: int
    target: bytes  # a link's target


def identity(st: os.stat_result) -> Digest:
    """What stands for a big file's content (it is not read to plan it): size, mtime, mode, and
    inode:ctime (the same change reported twice, by notify and by the doorbell, is sent once)."""
    return (st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode),
            b"%d:%d" % (st.st_ino, st.st_ctime_ns))


def join(rel: str | None, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=_agent.DIGEST_SIZE).digest()


def read_file(path: str, size: int, dir_fd: int | None = None, limit: int | None = None) -> bytes:
    """A file's bytes, one read when it still has ``size`` of them; OSError when it is gone or now
    a link (NONBLOCK: a FIFO put there meanwhile never blocks us). One that grew meanwhile is read
    to its end, or until ``limit`` bytes when it grows past that (the caller looks again)."""
    fd = os.open(path, _READ_FLAGS, dir_fd=dir_fd)
    try:
        data = os.read(fd, size + 1)
        if len(data) <= size:  # a short read of a regular file: its end
            return data
        chunks, got = [data], len(data)
        while limit is None or got < limit:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class _Folders:
    """The open descriptor of the folder being looked at (one at a time: the paths come sorted)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.rel: str | None = None
        self.fd = -1

    def open(self, rel: str) -> int:
        if rel != self.rel:
            self.close()
            # a folder swapped for a link meanwhile is not followed (its parents: under_link)
            self.fd = os.open(os.path.join(self.root, rel), _DIR_FLAGS | os.O_NOFOLLOW) if rel \
                else os.open(self.root, _DIR_FLAGS)
            self.rel = rel
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.rel = -1, None


class Stage:
    """One stage of a batch: its ops (a stream for the first stage, read as it is sent) and the
    big files it holds (complete once its ops have been iterated)."""

    def __init__(self, ops: Iterable[Op] = ()) -> None:
        self.ops: Iterable[Op] = ops
        self.big: list[str] = []
        self.keys: dict[str, Digest] = {}  # each big file's identity


class Plan:
    """The ops for one batch (iterate it once), and what iterating it found.

    ``big``: files for the channel to stream (big ones; every file without ``inline``), with
    ``big_keys`` their :func:`identity`; ``deletes``: paths deleted; ``sending``: the digest of each
    file op, for :attr:`Planner.sent` once the agent has acknowledged the batch. A channel sends
    :meth:`stages` one after the other (a repository's stage after the big files of the one before
    are in place); iterating the plan gives every op.
    """

    def __init__(self, planner: Planner, paths: set[str], added: set[str] | None = None,
                 deleted: set[str] | None = None,
                 catch_up: Callable[[], Plan | None] | None = None, *, remember: bool = True) -> None:
        self.planner, self.paths, self.remember = planner, paths, remember
        self.catch_up = catch_up  # once a repository's names are read: the objects written before
        self.added, self.deleted = added or set(), deleted or set()
        self.deletes: list[str] = []
        self.sending: dict[str, Digest] = {}
        self.big_keys: dict[str, Digest] = {}
        self._stages: dict[int, Stage] = {git.BLOBS: Stage()}
        # the paths of ``paths`` already taken (a walk of a new folder takes those under it). Not
        # every path a walk reads: a first push's 300,000 held the mirror process's RSS at 49 MB
        # after it (29 MB without)
        self._seen: set[str] = set()
        self._linked: dict[str, bool] = {}  # folder -> is a link
        self._inside: dict[str, bool] = {}  # folder -> it or a folder above it is a link

    @property
    def big(self) -> list[str]:
        return [rel for n in sorted(self._stages) for rel in self._stages[n].big]

    def stages(self) -> Iterator[Stage]:
        """The first stage streams as the folder is read; the later ones (a repository's pack
        indexes, trees and commits, names, packed-away objects) are known once it has been
        iterated. Before the trees and commits, and again before the names, the objects git wrote
        meanwhile join the batch (:attr:`catch_up`): a commit read here may name a tree written
        after its folder was listed. (Before the deletes of packed objects the channel asks
        again, once the lane's files are placed: :meth:`catch_up_before`.)"""
        first = self._stages[git.BLOBS]
        first.ops = self._scan()
        yield first
        done = git.BLOBS
        while True:
            n = min((k for k in self._stages if k > done), default=None)
            if n is None:
                return
            if n in (git.OBJECTS, git.NAMES) and self.catch_up is not None:
                extra = self.catch_up()
                if extra is not None:
                    yield from self._join(extra, n)
            if n == git.OBJECTS:
                self._stages[n].ops = git.ordered(list(self._stages[n].ops))
            if n == git.PACKED:
                self._stages[n].ops = self._still_gone(self._stages[n].ops)
            yield self._stages[n]
            done = n

    def catch_up_before(self, stage: Stage) -> Plan | None:
        """What git wrote meanwhile (:attr:`catch_up`), asked for once the stages before
        ``stage`` are in place, when ``stage`` deletes packed objects: the pack that holds them
        now may have been written after this batch read the folder, or a second gc may have
        deleted the pack this batch sent before the lane's copy was placed. It goes first, or the
        server holds neither the pack nor the objects for a while (seen in CI: 15 of 38 cuts)."""
        if self.catch_up is None or stage is not self._stages.get(git.PACKED):
            return None
        return self.catch_up()

    def _still_gone(self, ops: Iterable[Op]) -> Iterator[Op]:
        """The deletes that travel last, each only when its path is still gone here: git may have
        made it again since the plan looked (an object folder a gc emptied, then a new object in
        it) and this batch's earlier stages sent what is in it now."""
        for op in ops:
            if op[0] != _agent.OP_DELETE or not os.path.lexists(os.path.join(self.planner.root, op[1])):
                yield op

    def _join(self, extra: Plan, n: int) -> Iterator[Stage]:
        """A catch-up's plan: its stages before stage ``n`` go now, the others join this plan's
        (its trees and commits are ordered with the batch's)."""
        first = extra._stages[git.BLOBS]
        first.ops = extra._scan()
        yield first
        for k in sorted(extra._stages):
            stage = extra._stages[k]
            if k == git.BLOBS:
                continue
            if k < n:
                if k == git.OBJECTS:
                    stage.ops = git.ordered(list(stage.ops))
                yield stage
                continue
            mine = self._stages.setdefault(k, Stage([]))
            mine.ops = [*mine.ops, *stage.ops]
            mine.big += stage.big
            mine.keys.update(stage.keys)
        self.sending.update(extra.sending)
        self.big_keys.update(extra.big_keys)
        self.deletes += extra.deletes

    def __iter__(self) -> Iterator[Op]:
        for stage in self.stages():
            yield from stage.ops

    def _stage(self, rel: str, *, delete: bool = False, data: bytes | None = None) -> Stage:
        n = git.stage(rel, delete=delete, data=data)
        if n not in self._stages:
            self._stages[n] = Stage([])
        return self._stages[n]

    def _scan(self) -> Iterator[Op]:
        """The first stage's ops; the later stages' go to their lists."""
        for op in self._ops():
            # a folder replaced (deleted, there again) is deleted in the stage of its new content
            gone = op[0] == _agent.OP_DELETE and op[1] not in self._seen
            stage = self._stage(op[1], delete=gone, data=op[4] if op[0] == _agent.OP_PUT else None)
            if stage is self._stages[git.BLOBS]:
                yield op
            else:
                assert isinstance(stage.ops, list)
                stage.ops.append(op)

    def _ops(self) -> Iterator[Op]:
        p = self.planner
        folders = _Folders(p.root)
        try:
            for rel in sorted(self.paths):
                if rel in self._seen or self._under_link(rel):
                    continue
                folder, _, name = rel.rpartition("/")
                try:
                    fd = folders.open(folder)
                    st = os.lstat(name, dir_fd=fd)
                except OSError:
                    if rel in self.deleted and p.delete:
                        self.deletes.append(rel)
                        yield (_agent.OP_DELETE, rel, 0, 0, None)
                    continue
                self._seen.add(rel)
                is_dir = stat.S_ISDIR(st.st_mode)
                if is_dir and rel in self.deleted and p.delete and not git.keeps(rel):
                    self.deletes.append(rel)  # replaced: send it whole again
                    yield (_agent.OP_DELETE, rel, 0, 0, None)
                op = self._entry(rel, fd, name, st)
                if op is not None:
                    yield op
                if is_dir and (rel in self.added or rel in self.deleted):
                    yield from self._walk(rel, folders)
        finally:
            folders.close()

    def _under_link(self, rel: str) -> bool:
        folder = rel.rpartition("/")[0]
        if not folder:
            return False
        found = self._inside.get(folder)  # one look-up per file; the walk up once per folder
        if found is None:
            found, cur = False, ""
            for part in folder.split("/"):
                cur = join(cur, part)
                if cur not in self._linked:
                    self._linked[cur] = os.path.islink(os.path.join(self.planner.root, cur))
                if self._linked[cur]:
                    found = True
                    break
            self._inside[folder] = found
        return found

    def _big(self, rel: str, st: os.stat_result) -> None:
        """``rel`` goes to the lane (or to rsync, not ``inline``) as ``st`` says it is now."""
        key = identity(st)  # not read here: the lane reads it
        if self.planner.inline and self.planner.sent.get(rel) == key:
            return  # placed on the server as it is now
        stage = self._stage(rel)
        stage.big.append(rel)
        stage.keys[rel] = self.big_keys[rel] = key

    def _entry(self, rel: str, fd: int, name: str, st: os.stat_result) -> Op | None:
        p = self.planner
        if stat.S_ISREG(st.st_mode):
            if st.st_size >= _sync.BIG_FILE or not p.inline:
                self._big(rel, st)
                return None
            try:  # mode and mtime from the lstat: a change since then has its own event
                data = read_file(name, st.st_size, fd, limit=_sync.BIG_FILE)
            except OSError:
                return None  # gone again (or no longer a file): its event follows
            if len(data) >= _sync.BIG_FILE:
                # it grew past the lane's size while it was read (a file being written): the lane
                # takes it; one record of all of it would hold up every batch, and never resume
                try:
                    now = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    return None
                if stat.S_ISREG(now.st_mode):
                    self._big(rel, now)
                return None
            mode = stat.S_IMODE(st.st_mode)
            key = (len(data), st.st_mtime_ns, mode, digest(data))
            if p.sent.get(rel) == key:
                return None  # the server has exactly this already (its content, not a guess)
            if self.remember:
                self.sending[rel] = key
            else:
                p.sent.pop(rel, None)  # this batch replaces what an earlier one sent
            return (_agent.OP_PUT, rel, mode, st.st_mtime_ns, data)
        if stat.S_ISDIR(st.st_mode):
            return (_agent.OP_MKDIR, rel, stat.S_IMODE(st.st_mode), 0, None)
        if stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(name, dir_fd=fd)
            except OSError:
                return None
            return (_agent.OP_LINK, rel, 0, 0, os.fsencode(target))
        return None  # sockets, FIFOs, devices: not mirrored (as rsync -rlpt)

    def _walk(self, top: str, folders: _Folders) -> Iterator[Op]:
        """Everything in a new folder: files may have landed before its watch existed."""
        p = self.planner
        stack = [top]
        while stack:
            frel = stack.pop()
            p.watch(os.path.join(p.root, frel), frel)  # watched before it is listed: nothing falls in between
            try:
                fd = folders.open(frel)
                names = os.listdir(fd)
            except OSError:
                continue
            for name in names:
                rel = f"{frel}/{name}"
                if rel in self._seen or p.flt.excluded(rel):
                    continue
                try:
                    st = os.lstat(name, dir_fd=fd)
                except OSError:
                    continue
                if rel in self.paths:
                    self._seen.add(rel)
                op = self._entry(rel, fd, name, st)
                if op is not None:
                    yield op
                if stat.S_ISDIR(st.st_mode):
                    stack.append(rel)


SENT_MAX = 100_000  # files remembered as acknowledged (about 30 MB); then forgotten at once


class Planner:
    """Makes :class:`Plan` values for one mirrored folder, and remembers what the agent has.

    ``inline``: small files go as whole records (the agent); without, every file is big (rsync).
    ``watch(path, rel)``: called for each new folder before it is listed (the inotify doorbell).
    """

    def __init__(self, root: str, flt: _sync.MirrorFilter, *, delete: bool, inline: bool = True,
                 watch: Callable[[str, str], object] | None = None) -> None:
        self.root, self.flt, self.delete, self.inline = root, flt, delete, inline
        self.watch: Callable[[str, str], object] = watch or (lambda path, rel: None)
        # rel -> digest of what the agent acknowledged: a file sent by the listing of a new folder
        # whose own event comes later is read again but not resent
        self.sent: dict[str, Digest] = {}

    def plan(self, paths: set[str], added: set[str] | None = None, deleted: set[str] | None = None,
             catch_up: Callable[[], Plan | None] | None = None, *, remember: bool = True) -> Plan:
        """``remember``: what the batch sends joins :attr:`sent` once acknowledged. Not for a
        whole-tree pass: a first push's files, held while it runs and remembered after, took memory
        in proportion to the tree (the mirror process's RSS 124 MB at 300,000 files), to spare
        only the files written while the pass read them one more read."""
        return Plan(self, paths, added, deleted, catch_up, remember=remember)

    def forget(self, rel: str, *, folder: bool = False) -> None:
        """``rel`` changed on the server side of our knowledge (deleted, replaced)."""
        if folder and self.sent.pop(rel, None) is None:
            self.sent.clear()  # a folder: whatever was under it is gone too
        else:
            self.sent.pop(rel, None)

    def placed(self, rel: str, key: Digest) -> None:
        """A big file is in place on the server as ``key`` says."""
        if len(self.sent) >= SENT_MAX:
            self.sent.clear()
        self.sent[rel] = key

    def acknowledged(self, plan: Plan, ok: bool) -> None:
        """The agent answered ``plan``'s batch: what it sent is now on the server (unless errors)."""
        if not ok:
            self.sent.clear()  # what the server refused must be sent again
            return
        if not plan.remember:
            return
        if len(self.sent) + len(plan.sending) > SENT_MAX:
            self.sent.clear()
        self.sent.update(plan.sending)


def under_link(root: str, rel: str) -> bool:
    """True when a folder above ``rel`` is a link here (restore never writes through one)."""
    folder = rel.rpartition("/")[0]
    cur = root
    for part in folder.split("/") if folder else []:
        cur = os.path.join(cur, part)
        if os.path.islink(cur):
            return True
    return False


def same_time(here: int, there: int) -> bool:
    """Equal mtimes; a server whose file system keeps whole seconds only counts as equal too."""
    return here == there or (there % 10**9 == 0 and here // 10**9 == there // 10**9)


def walk(root: str, flt: _sync.MirrorFilter) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """Every mirrored entry under ``root`` as ``(rel, entry)``, folders before what is in them
    (links to folders are entries, never followed)."""
    todo = [("", root)]
    while todo:
        rel, folder = todo.pop()
        try:
            listing = os.scandir(folder)
        except OSError:
            continue
        with listing:
            for entry in listing:
                r = join(rel, entry.name)
                if flt.excluded(r):
                    continue
                yield r, entry
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):
                        todo.append((r, entry.path))


def scan_local(root: str, flt: _sync.MirrorFilter) -> tuple[int, int, int]:
    """``(files, entries, bytes)`` of the mirrored tree: files and links (what the server's count
    compares with), everything rsync lists (folders and the top one too), and the files' size."""
    files = size = 0
    entries = 1
    for _, entry in walk(root, flt):
        entries += 1
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                continue
            files += 1
            if entry.is_file(follow_symlinks=False):
                size += entry.stat(follow_symlinks=False).st_size
    return files, entries, size
