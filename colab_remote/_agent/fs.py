"""Files and folders changed only through descriptors, never through a path another user (or the
runtime) could swap for a link: every component opened with ``O_NOFOLLOW`` from the destination."""

import errno
import hashlib
import os
import stat
from typing import Callable, Dict, List, Optional, Tuple

from .protocol import CHUNK, DIGEST_SIZE, MODE_MASK, O_CLOEXEC, O_DIR, O_NEW, O_READ


def split(p: bytes) -> Tuple[bytes, bytes]:
    d, _, name = p.rpartition(b"/")
    return d, name


def join(d: bytes, name: bytes) -> bytes:
    return d + b"/" + name if d else name


def lstat_at(fd: int, name: bytes) -> Optional[os.stat_result]:
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None


def names_in(fd: int) -> List[bytes]:
    """The names in folder ``fd`` as bytes (listdir of a descriptor gives str)."""
    return [os.fsencode(n) for n in os.listdir(fd)]


def open_folder(parent: int, name: bytes, create: bool,
                make_way: Optional[Callable[[], None]] = None) -> Optional[int]:
    """Open folder ``name`` in ``parent`` without following a link; None when it is missing (or a
    file or link) and not ``create``. With ``create`` a missing one is made (0700 until its own
    mode arrives), and a file or link in its place is first handed to ``make_way`` (the trash)."""
    try:
        return os.open(name, O_DIR, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            return None
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        if not create:
            return None  # a link or a file: never followed
        st = lstat_at(parent, name)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            if make_way is None:
                raise
            make_way()
    try:
        os.mkdir(name, 0o700, dir_fd=parent)
    except FileExistsError:
        pass
    return os.open(name, O_DIR, dir_fd=parent)


class Folders:
    """Open folders below one root, by relative path, every component opened with O_NOFOLLOW.

    Kept open for the next operation in the same folder (a burst writes many files into few
    folders); :meth:`forget` drops a path and everything below it the moment it changes.
    """

    LIMIT = 64

    def __init__(self, root_fd: int) -> None:
        self.root = root_fd
        self.fds: Dict[bytes, int] = {}

    def get(self, rel: bytes, create: bool, make: Optional[Callable[[int, bytes, bytes], None]] = None
            ) -> Optional[int]:
        """The folder ``rel``; None when it is missing (or not a folder) and not ``create``.

        With ``create``, missing folders are made (0700 until their own mode arrives) and a file or
        link where a folder belongs is handed to ``make(parent_fd, name, rel)`` first (the trash).
        """
        if not rel:
            return self.root
        fd = self.fds.get(rel)
        if fd is not None:
            return fd
        cur, fd = b"", self.root
        for part in rel.split(b"/"):
            cur = join(cur, part)
            known = self.fds.get(cur)
            if known is not None:
                fd = known
                continue
            nxt = self._open(fd, part, cur, create, make)
            if nxt is None:
                return None
            self._keep(cur, nxt)
            fd = nxt
        return fd

    def _open(self, parent: int, name: bytes, rel: bytes, create: bool,
              make: Optional[Callable[[int, bytes, bytes], None]]) -> Optional[int]:
        return open_folder(parent, name, create, lambda: make(parent, name, rel) if make else None)

    def _keep(self, rel: bytes, fd: int) -> None:
        if len(self.fds) >= self.LIMIT:
            old = next(iter(self.fds))
            os.close(self.fds.pop(old))
        self.fds[rel] = fd

    def forget(self, rel: bytes = b"") -> None:
        """Close ``rel`` and everything below it (everything when ``rel`` is empty)."""
        below = rel + b"/"
        for k in [k for k in self.fds if not rel or k == rel or k.startswith(below)]:
            os.close(self.fds.pop(k))


def measure(fd: int, name: bytes) -> List[int]:
    """[bytes on disk, versions (files and links), mtime_ns] of trash folder ``name`` in ``fd``."""
    st = lstat_at(fd, name)
    if st is None:
        return [0, 0, 0]
    if not stat.S_ISDIR(st.st_mode):
        return [st.st_blocks * 512, 1, st.st_mtime_ns]
    total, versions = st.st_blocks * 512, 0
    for _, dirs, files, dfd in os.fwalk(os.fsdecode(name), dir_fd=fd):
        for n in dirs + files:
            sub = lstat_at(dfd, os.fsencode(n))
            if sub is None:
                continue
            total += sub.st_blocks * 512
            if not stat.S_ISDIR(sub.st_mode):
                versions += 1
    return [total, versions, st.st_mtime_ns]


def remove_at(fd: int, name: bytes) -> None:
    """Remove ``name`` in folder ``fd`` (a whole folder too), never following a link, also what
    sits in folders kept read-only (the trash keeps their own mode, as they were in the runtime)."""
    st = lstat_at(fd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=fd)
        return
    try:
        sub = os.open(name, O_DIR, dir_fd=fd)
    except PermissionError:
        chmod_nofollow(fd, name, 0o700)
        sub = os.open(name, O_DIR, dir_fd=fd)
    try:
        if stat.S_IMODE(os.fstat(sub).st_mode) & 0o700 != 0o700:
            os.fchmod(sub, 0o700)
        for entry in names_in(sub):
            remove_at(sub, entry)
    finally:
        os.close(sub)
    os.rmdir(name, dir_fd=fd)


def chmod_nofollow(fd: int, name: bytes, mode: int) -> None:
    """chmod a folder that cannot be opened for reading (mode 0), never through a link."""
    path_fd = os.open(name, getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW
                      | O_CLOEXEC, dir_fd=fd)
    try:
        os.chmod("/proc/self/fd/%d" % path_fd, mode)
    finally:
        os.close(path_fd)


def move(fd: int, name: bytes, tfd: int, target: bytes) -> None:
    """Rename ``name`` in ``fd`` to ``target`` in ``tfd``. A folder of ours without write permission
    for its owner (read-only on the server) cannot move to another folder (its ``..`` changes):
    it gets the permission for the move and its own mode back in its new place."""
    try:
        os.rename(name, target, src_dir_fd=fd, dst_dir_fd=tfd)
        return
    except PermissionError:
        st = lstat_at(fd, name)
        if st is None or not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o200 \
                or st.st_uid != os.getuid():
            raise
    mode = stat.S_IMODE(st.st_mode)
    chmod_nofollow(fd, name, mode | 0o700)
    try:
        os.rename(name, target, src_dir_fd=fd, dst_dir_fd=tfd)
    except BaseException:
        chmod_nofollow(fd, name, mode)
        raise
    chmod_nofollow(tfd, target, mode)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_at(fd: int, offset: int, data: bytes) -> None:
    """``data`` at ``offset`` of an open file, what was after it cut (a write tried again)."""
    os.ftruncate(fd, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    write_all(fd, data)


def write_new(fd: int, name: bytes, mode: int, mtime: int, data: bytes) -> None:
    """Create ``name`` (never through a link), write it, set its mode and time; gone on failure."""
    out = os.open(name, O_NEW, 0o600, dir_fd=fd)
    try:
        write_all(out, data)
        if mode != 0o600:
            os.fchmod(out, mode)
        os.utime(out, ns=(mtime, mtime))
    except BaseException:
        os.close(out)
        remove_quietly(fd, name)
        raise
    os.close(out)


def remove_quietly(fd: int, name: bytes) -> None:
    try:
        os.unlink(name, dir_fd=fd)
    except OSError:
        pass


def same_content(fd: int, name: bytes, data: bytes) -> bool:
    try:
        f = os.open(name, O_READ, dir_fd=fd)
    except OSError:
        return False
    try:
        have = b""
        while len(have) <= len(data):
            chunk = os.read(f, len(data) + 1 - len(have))
            if not chunk:
                break
            have += chunk
        return have == data
    finally:
        os.close(f)


def set_mode_time(fd: int, name: bytes, mode: int, mtime: int) -> None:
    f = os.open(name, O_READ, dir_fd=fd)
    try:
        os.fchmod(f, mode)
        os.utime(f, ns=(mtime, mtime))
    finally:
        os.close(f)


def chmod_folder(fd: int, name: bytes, mode: int) -> None:
    f = os.open(name, O_DIR, dir_fd=fd)
    try:
        os.fchmod(f, mode & MODE_MASK)
    finally:
        os.close(f)


def write_file_at(fd: int, name: str, data: bytes, mode: int = 0o600, sync: bool = True) -> None:
    """Replace ``name`` in folder ``fd`` whole (a fresh temporary name, then a rename)."""
    tmp = ".%s.%d.%s" % (name, os.getpid(), os.urandom(4).hex())
    out = os.open(tmp, O_NEW, mode, dir_fd=fd)
    try:
        try:
            write_all(out, data)
            if sync:
                os.fsync(out)
        finally:
            os.close(out)
        os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
    except BaseException:
        remove_quietly(fd, tmp.encode())
        raise


def read_digest(f: int, send: Optional[Callable[[int, bytes], None]] = None,
                offset: int = 0) -> Tuple[int, bytes]:
    """Read the open file ``f`` to its end: (the bytes read, the blake2b digest of all of them);
    with ``send``, what lies from ``offset`` on goes to ``send(at, data)`` as it is read (a
    transfer resumed there)."""
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    at = 0
    while True:
        chunk = os.read(f, CHUNK)
        if not chunk:
            break
        h.update(chunk)
        if send is not None and at + len(chunk) > offset:
            skip = max(0, offset - at)
            send(at + skip, chunk[skip:])
        at += len(chunk)
    return at, h.digest()
