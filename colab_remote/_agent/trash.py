"""The trash: what the mirror replaces or deletes, kept by time within a budget the server sets."""

import calendar
import os
import stat
import time
from typing import Callable, Dict, List, Optional, Tuple

from .fs import (
    Folders,
    join,
    lstat_at,
    measure,
    move,
    names_in,
    open_folder,
    remove_at,
    remove_quietly,
    split,
    write_all,
    write_file_at,
)
from .protocol import CHUNK, FULL, O_NEW, O_READ, ROOM_SLACK, SIZES, STAGING, STAMP_FORMAT, TRASH, trash_stamp


class Budget:
    """What the trash holds, folder by folder, and the room it may take (the server's config): at
    most ``share`` of the room it could use (the free space plus itself) and at most
    ``max_bytes``. Oldest folders go first. The sizes are kept in ``TRASH/.sizes`` for the next
    agent (a folder whose time changed since is measured again)."""

    SAVE_EVERY = 60.0

    def __init__(self, share: float, max_bytes: int) -> None:
        self.share, self.max_bytes = share, max_bytes
        self.book: Optional[Dict[bytes, List[int]]] = None  # folder -> [bytes, versions, mtime_ns]
        self.bytes = self.versions = 0
        self.limit = max_bytes
        self.pruned = {"versions": 0, "bytes": 0, "folders": 0}  # type: Dict[str, int]
        self.reasons: Dict[str, int] = {}  # why -> versions pruned for that reason
        self.last: Optional[str] = None
        self.dirty = False
        self.saved = 0.0

    def load(self, trash: Folders) -> Dict[bytes, List[int]]:
        if self.book is not None:
            return self.book
        cached = self._read(trash.root)
        book: Dict[bytes, List[int]] = {}
        for name in names_in(trash.root):
            if name.startswith(b"."):
                continue  # the staging folder, the lock, this cache
            st = lstat_at(trash.root, name)
            if st is None:
                continue
            known = cached.get(name)
            if known is not None and known[2] == st.st_mtime_ns:
                book[name] = known
            else:
                book[name] = measure(trash.root, name)
                self.dirty = True
        self.book = book
        self.bytes = sum(v[0] for v in book.values())
        self.versions = sum(v[1] for v in book.values())
        if set(cached) != set(book):
            self.dirty = True
        return book

    def measured(self, trash: Folders, name: bytes) -> None:
        """Note what folder ``name`` holds now (a batch's trash folder once the batch is done)."""
        book = self.load(trash)
        old = book.pop(name, [0, 0, 0])
        new = measure(trash.root, name) if lstat_at(trash.root, name) is not None else None
        if new is not None:
            book[name] = new
        self.bytes += (new[0] if new else 0) - old[0]
        self.versions += (new[1] if new else 0) - old[1]
        self.dirty = True

    def over(self, avail: int) -> Optional[str]:
        """Why the trash must shrink now ("cap", "space"), or None."""
        self.limit = min(self.max_bytes, int(self.share * (avail + self.bytes)))
        if self.bytes > self.max_bytes:
            return "cap"
        if self.bytes > self.limit:
            return "space"
        return None

    def drop(self, trash: Folders, name: bytes, reason: str) -> bool:
        """Remove trash folder ``name`` (for ``reason``); False when it could not be removed."""
        book = self.load(trash)
        size, versions, _ = book.pop(name, [0, 0, 0])
        self.bytes -= size
        self.versions -= versions
        self.dirty = True
        trash.forget(name)
        try:
            remove_at(trash.root, name)
        except OSError:
            return False  # left out of the book: the next agent measures it again
        self.pruned["versions"] += versions
        self.pruned["bytes"] += size
        self.pruned["folders"] += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + versions
        self.last = reason
        return True

    def report(self) -> dict:
        return {"bytes": self.bytes, "versions": self.versions, "folders": len(self.book or ()),
                "limit": self.limit, "pruned": dict(self.pruned, reasons=dict(self.reasons),
                                                    last=self.last)}

    def _read(self, fd: int) -> Dict[bytes, List[int]]:
        for name in names_in(fd):
            if name.startswith(b"." + SIZES + b"."):
                remove_quietly(fd, name)  # a cache being written when its agent was killed
        try:
            f = os.open(SIZES, O_READ, dir_fd=fd)
        except OSError:
            return {}
        try:
            data = os.read(f, 1 << 24) if stat.S_ISREG(os.fstat(f).st_mode) else b""
        except OSError:
            data = b""
        finally:
            os.close(f)
        found = {}
        for line in data.splitlines():
            words = line.split()
            try:
                if len(words) == 4:
                    found[bytes.fromhex(words[0].decode())] = [int(w) for w in words[1:]]
            except ValueError:
                continue
        return found

    def save(self, trash: Folders, force: bool = False) -> None:
        if self.book is None or not self.dirty or not force and \
                time.monotonic() - self.saved < self.SAVE_EVERY:
            return
        self.saved = time.monotonic()
        text = "".join("%s %d %d %d\n" % (name.hex(), v[0], v[1], v[2])
                       for name, v in sorted(self.book.items()))
        try:
            write_file_at(trash.root, SIZES.decode(), text.encode(), sync=False)
            self.dirty = False
        except OSError:
            pass  # a cache: measured again next time

    def close(self, trash: Folders) -> None:
        if self.book is not None and not self.book:
            remove_quietly(trash.root, SIZES)  # an empty trash: nothing to remember
        else:
            self.save(trash, force=True)


class Trash:
    """Where what the mirror replaces or deletes goes: ``<dest>/.colab-remote-trash/<UTC time>/``,
    one folder per batch, kept ``keep_days`` and within its :class:`Budget`; a write that finds
    the disk full prunes it (oldest first) and is done again."""

    def __init__(self, root_fd: int, *, backup: bool, share: float, max_bytes: int) -> None:
        self.root_fd = root_fd  # the destination's (the Tree's)
        self.backup = backup
        self.budget = Budget(share, max_bytes)
        self.open: Optional[Folders] = None
        self.stamp: Optional[bytes] = None  # this batch's trash folder, once it has one

    def folders(self) -> Folders:
        """The trash folder (made when missing; something else of that name is moved aside)."""
        if self.open is None:
            fd = open_folder(self.root_fd, TRASH, True, lambda: os.rename(
                TRASH, TRASH + b".not-ours.%d" % os.getpid(),
                src_dir_fd=self.root_fd, dst_dir_fd=self.root_fd))
            assert fd is not None
            self.open = Folders(fd)
        return self.open

    def target(self, rel: bytes) -> Tuple[int, bytes]:
        """A free name for ``rel`` in this batch's trash folder: (folder fd, name)."""
        if self.stamp is None:
            self.stamp = trash_stamp()
        d, name = split(rel)
        fd = self.folders().get(join(self.stamp, d) if d else self.stamp, create=True,
                               make=lambda parent, n, r: os.rename(
                                   n, n + b".file", src_dir_fd=parent, dst_dir_fd=parent))
        assert fd is not None
        target, n = name, 1
        while lstat_at(fd, target) is not None:
            target = name + b".%d" % n
            n += 1
        return fd, target

    def discard(self, fd: int, name: bytes, rel: bytes) -> None:
        """Move ``rel`` (``name`` in folder ``fd``) to the trash, or remove it without a backup."""
        if not self.backup:
            remove_at(fd, name)
            return
        tfd, target = self.target(rel)
        move(fd, name, tfd, target)

    def keep_old(self, fd: int, name: bytes, rel: bytes, st: os.stat_result) -> None:
        """Keep the version of ``rel`` about to be replaced (a hard link into the trash)."""
        if not self.backup:
            return
        tfd, target = self.target(rel)
        try:
            os.link(name, target, src_dir_fd=fd, dst_dir_fd=tfd, follow_symlinks=False)
            return
        except OSError as e:
            if e.errno in FULL:
                raise  # a copy would need even more room
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=fd), target, dir_fd=tfd)
            return
        src = os.open(name, O_READ, dir_fd=fd)
        try:
            dst = os.open(target, O_NEW, 0o600, dir_fd=tfd)
            try:
                while True:
                    chunk = os.read(src, CHUNK)
                    if not chunk:
                        break
                    write_all(dst, chunk)
            except BaseException:
                os.close(dst)
                remove_quietly(tfd, target)
                raise
            os.close(dst)
        finally:
            os.close(src)

    def prune(self, keep_days: float, now: Optional[float] = None) -> int:
        """Remove trash folders older than ``keep_days``; how many."""
        cut = (time.time() if now is None else now) - keep_days * 86400
        trash = self.folders()
        removed = 0
        for name in sorted(self.budget.load(trash)):
            try:
                old = calendar.timegm(time.strptime(name[:19].decode(), STAMP_FORMAT)) < cut
            except ValueError:
                st = lstat_at(trash.root, name)
                old = st is not None and st.st_mtime < cut
            if old and self.budget.drop(trash, name, "age"):
                removed += 1
        return removed

    def _avail(self) -> int:
        st = os.fstatvfs(self.root_fd)
        return st.f_bavail * st.f_frsize

    def keep_within_budget(self) -> None:
        """Prune the trash, oldest first, while it holds more than its budget allows."""
        trash = self.folders()
        budget = self.budget
        budget.load(trash)
        while True:
            reason = budget.over(self._avail())
            if reason is None or not budget.book:
                break
            budget.drop(trash, min(budget.book), reason)  # (one that cannot go leaves the book)
        budget.save(trash)

    def make_room(self, need: int) -> bool:
        """A write found the disk full: prune the trash, oldest first, until ``need`` bytes fit
        (the live copy wins over old versions, this batch's own last). False: nothing to prune."""
        trash = self.folders()
        budget = self.budget
        book = budget.load(trash)
        freed = False
        while book and (not freed or self._avail() < need + ROOM_SLACK):
            freed = budget.drop(trash, min(book), "full") or freed
        if not freed and self.stamp is not None and measure(trash.root, self.stamp)[1]:
            budget.measured(trash, self.stamp)  # this batch's own versions, the newest
            freed = budget.drop(trash, self.stamp, "full")
        budget.save(trash)
        return freed

    def roomy(self, write: Callable[[], None], need: int = 0) -> None:
        """``write()``; when the disk is full, prune the trash and write again while that helps."""
        while True:
            try:
                write()
                return
            except OSError as e:
                if e.errno not in FULL or not self.make_room(need):
                    raise

    def report(self) -> dict:
        return self.budget.report()

    def batch_done(self) -> None:
        """The batch ended: its trash folder is measured for the budget; the next gets its own."""
        if self.stamp is not None and self.open is not None:
            self.budget.measured(self.open, self.stamp)
        self.stamp = None

    def close(self, stage_name: bytes) -> None:
        """Save the budget's book; the empty staging folders (this agent's, then the one of all)
        and an empty trash go."""
        if self.open is None:
            return
        trash, self.open = self.open, None
        trash.forget()
        try:
            self.budget.close(trash)
        except OSError:
            pass
        for parent, name in ((STAGING, stage_name), (b"", STAGING)):
            pfd = trash.get(parent, create=False)
            if pfd is not None:
                try:
                    os.rmdir(name, dir_fd=pfd)  # only when empty
                except OSError:
                    pass
            trash.forget()
        os.close(trash.root)
        try:
            os.rmdir(TRASH, dir_fd=self.root_fd)
        except OSError:
            pass
