"""Big files a lane receives (:mod:`.lane`), kept in partial files across agents until the writer
puts them in place (``OP_PLACE``, :meth:`.tree.Tree.place`)."""

import errno
import fcntl
import hashlib
import hmac
import os
import stat
import time
from typing import Callable, Dict, Optional, Tuple

from .fs import Folders, lstat_at, names_in, open_folder, remove_quietly, split, write_all, write_at
from .protocol import CHUNK, DIGEST_SIZE, O_CLOEXEC, O_NEW, O_READ, PARTIALS, STAGING, TRASH


class Partials:
    """Big files a lane receives, one partial file per path in ``TRASH/.staging/partial``, kept
    across agents: a cut link or a killed mirror resumes where it was, and a file that grew is
    sent from where the server's copy ends (the client checks the digest of what is there first:
    :meth:`have`).

    A partial is named by the digest of its path (no name the runtime picks) while it grows, and
    ``<that>-<digest of its content>`` once whole and checked (:meth:`finish`): what OP_PLACE puts
    in place. The lane writing one holds an flock on it; a lane of an agent that is not gone yet
    (its link was just cut) never writes into its successor's partial (a partial begun anew is a
    new file).
    """

    LOCK_WAIT = 3.0

    def __init__(self, root_fd: int, roomy: Callable[[Callable[[], None], int], None]) -> None:
        self.root_fd, self.roomy = root_fd, roomy  # a full disk: the trash is pruned, then again
        self.fd = -1
        self.files: Dict[bytes, list] = {}  # path -> [partial fd or -1, size, hasher, live fd or -1]

    def folder(self, create: bool = True) -> int:
        """The partials' folder (-1 when it is not there and not ``create``)."""
        if self.fd >= 0 and os.fstat(self.fd).st_nlink == 0:  # removed empty by a lane that
            os.close(self.fd)                                 # ended: look it up again
            self.fd = -1
        if self.fd < 0:
            fd = open_folder(self.root_fd, TRASH, create)
            for name in (STAGING, PARTIALS):
                if fd is None:
                    return -1
                try:
                    sub = open_folder(fd, name, create)
                finally:
                    os.close(fd)
                fd = sub
            if fd is None:
                return -1
            self.fd = fd
        return self.fd

    @staticmethod
    def name(p: bytes) -> bytes:
        return hashlib.blake2b(p, digest_size=DIGEST_SIZE).hexdigest().encode()

    def have(self, p: bytes, size: int, live: Folders) -> Tuple[int, bytes]:
        """(bytes, their digest) the server holds of ``p`` to build on, at most ``size``: its
        partial, else the file in place (it may have grown here); (0, b"") for nothing."""
        self.forget(p)
        fd, name = self.folder(), self.name(p)
        for other in names_in(fd):
            if other.startswith(name + b"-"):  # whole but never placed: the file changed since
                if lstat_at(fd, name) is None:
                    os.rename(other, name, src_dir_fd=fd, dst_dir_fd=fd)
                else:
                    remove_quietly(fd, other)
        f, base = self._take(fd, name), -1
        if f is None:
            base = self._live(p, live, size)
            live.forget()  # a folder moved meanwhile is looked up again next time
            if base < 0:
                return 0, b""
        h = hashlib.blake2b(digest_size=DIGEST_SIZE)
        got = 0
        src = f if f is not None else base
        while got < size:
            chunk = os.pread(src, min(CHUNK, size - got), got)
            if not chunk:
                break
            h.update(chunk)
            got += len(chunk)
        self.files[p] = [f if f is not None else -1, got, h, base]
        return got, (h.digest() if got else b"")

    def _take(self, fd: int, name: bytes) -> Optional[int]:
        """The partial ``name``, open for writing with its lock held; None when there is none (or
        another lane holds it for longer than LOCK_WAIT)."""
        try:
            f = os.open(name, os.O_RDWR | os.O_NOFOLLOW | O_CLOEXEC, dir_fd=fd)
        except OSError:
            return None
        deadline = time.monotonic() + self.LOCK_WAIT
        while True:
            try:
                if not stat.S_ISREG(os.fstat(f).st_mode):
                    break
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return f
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) \
                        or time.monotonic() > deadline:
                    break
            time.sleep(0.05)
        os.close(f)
        return None

    @staticmethod
    def _live(p: bytes, live: Folders, size: int) -> int:
        """The file at ``p`` open for reading when it is one of at most ``size`` bytes; else -1."""
        d, name = split(p)
        dfd = live.get(d, create=False)
        if dfd is None:
            return -1
        try:
            f = os.open(name, O_READ, dir_fd=dfd)
        except OSError:
            return -1
        st = os.fstat(f)
        if not stat.S_ISREG(st.st_mode) or not 0 < st.st_size <= size:
            os.close(f)
            return -1
        return f

    def _new(self, p: bytes) -> int:
        """A new partial for ``p`` (an older one unlinked: a lane still writing it writes alone)."""
        fd, name = self.folder(), self.name(p)
        remove_quietly(fd, name)
        f = os.open(name, O_NEW, 0o600, dir_fd=fd)
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return f

    def chunk(self, p: bytes, offset: int, data: bytes) -> int:
        """Write a part of ``p`` at ``offset`` (0: anew; else where the partial or the file in
        place that :meth:`have` reported ends); the partial's size now."""
        f = self.files.get(p)
        if offset == 0:
            self.forget(p)
            f = self.files[p] = [self._new(p), 0, hashlib.blake2b(digest_size=DIGEST_SIZE), -1]
        elif f is None or f[1] != offset:
            raise ValueError("a chunk at %d does not follow the %d bytes held" % (
                offset, f[1] if f is not None else 0))
        try:
            if f[0] < 0:  # building on the file in place: a partial of its first bytes first
                f[0] = self._new(p)
                self._copy(f, offset)
            out = f[0]
            self.roomy(lambda: write_at(out, offset, data), len(data))
        except BaseException:
            self.forget(p)  # what it holds now is asked for again
            raise
        f[1] = offset + len(data)
        f[2].update(data)
        return f[1]

    def _copy(self, f: list, n: int) -> None:
        """The first ``n`` bytes of the file in place (``f[3]``) into the new partial ``f[0]``."""
        src, dst = f[3], f[0]

        def copy() -> None:  # (again after a full disk: from the start)
            os.ftruncate(dst, 0)
            os.lseek(dst, 0, os.SEEK_SET)
            _copy_head(src, dst, n)

        self.roomy(copy, n)
        os.close(src)
        f[3] = -1

    def finish(self, p: bytes, size: int, want: bytes) -> None:
        """The partial of ``p`` is whole: checked against ``size`` and digest ``want``, it is kept
        under that digest for OP_PLACE; a damaged one goes (sent anew next time)."""
        f = self.files.get(p)
        fd, name = self.folder(), self.name(p)
        if f is not None and f[0] < 0 <= f[3] and f[1] == size:  # the file in place, whole: its
            f[0] = self._new(p)                                 # mode or time changed, say
            self._copy(f, size)
        ok = f is not None and f[0] >= 0 and f[1] == size and hmac.compare_digest(f[2].digest(), want)
        if ok:
            os.rename(name, name + b"-" + _hex(want), src_dir_fd=fd, dst_dir_fd=fd)
        self.forget(p)
        if not ok:
            remove_quietly(fd, name)
            raise ValueError("the file arrived damaged (%d of %d bytes)" % (
                f[1] if f is not None else 0, size))

    def whole(self, p: bytes, size: int, want: bytes) -> Tuple[int, bytes]:
        """(folder, name) of the whole partial of ``p`` with this size and digest (OP_PLACE)."""
        fd = self.folder()
        name = self.name(p) + b"-" + _hex(want)
        st = lstat_at(fd, name)
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != size:
            raise ValueError("no whole copy of this file arrived (its lane did not finish it)")
        return fd, name

    def drop(self, p: bytes) -> None:
        """Forget the partial of ``p`` (the file was deleted, or is no longer big)."""
        self.forget(p)
        fd, name = self.folder(create=False), self.name(p)
        if fd < 0:
            return
        for other in names_in(fd):
            if other == name or other.startswith(name + b"-"):
                remove_quietly(fd, other)

    def clean(self, max_age: float) -> None:
        """Remove partials nobody has written for ``max_age`` seconds (files deleted meanwhile)."""
        fd = self.folder(create=False)
        if fd < 0:
            return
        cut = time.time() - max_age
        for name in names_in(fd):
            st = lstat_at(fd, name)
            if st is None or st.st_mtime >= cut:
                continue
            f = self._take(fd, name) if b"-" not in name else None
            remove_quietly(fd, name)
            if f is not None:
                os.close(f)

    def forget(self, p: bytes) -> None:
        f = self.files.pop(p, None)
        for fd in (f[0], f[3]) if f is not None else ():
            if fd >= 0:
                os.close(fd)

    def close(self) -> None:
        for p in list(self.files):
            self.forget(p)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _hex(data: bytes) -> bytes:
    return data.hex().encode()


def _copy_head(src: int, dst: int, n: int) -> None:
    """The first ``n`` bytes of file ``src`` written at ``dst``'s position (in the kernel where it
    can)."""
    done = 0
    while done < n:
        try:
            sent = os.sendfile(dst, src, done, n - done)
        except OSError:
            sent = 0
        if sent <= 0:
            chunk = os.pread(src, min(CHUNK, n - done), done)
            if not chunk:
                raise ValueError("the file in place shrank while it was copied")
            write_all(dst, chunk)
            sent = len(chunk)
        done += sent
