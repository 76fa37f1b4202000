"""The server half of colab-remote: the mirror's agent, the tunnel's helper, and their set-up.

This file is installed once on the user's server as ``~/.colab-remote/agent-<sha12>.py`` by the
set-up login (:mod:`colab_remote._access`, the one login that may use the password) and is then
run there by sshd as the forced command of a restricted key (``~/.ssh/authorized_keys``)::

    restrict,command="python3 -I -B ~/.colab-remote/agent-<sha12>.py --forced mirror ID" ssh-ed25519 ...
    restrict,port-forwarding,permitlisten="localhost:PORT",permitopen="localhost:PORT",
        command="python3 -I -B ~/.colab-remote/agent-<sha12>.py --forced tunnel ID PORT" ssh-ed25519 ...

So whatever the runtime holds (that key, a ControlMaster socket) can only do what this file
answers: write into one destination folder (everything it replaces or deletes goes to the trash,
kept ``keep_days`` and within a budget as the *server's* config says), read that folder back, list
and reclaim the tunnel's own port. No shell, no other file, no pruning on request.

One agent writes a destination at a time: it holds a lock there for its life (see :class:`Writer`).

It is also the one home of the mirror's wire protocol: the client imports the constants below.

Constraints: standard library only, Python >= 3.6 (old servers), no import from the package (the
client sends this file's bytes; the server runs exactly them, pinned by their sha256).
"""

import calendar
import errno
import fcntl
import hashlib
import json
import os
import pwd
import shlex
import signal
import socket
import stat
import struct
import sys
import time
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple

VERSION = "4"  # the protocol: the client refuses an agent that speaks another one

# --- the wire protocol ------------------------------------------------------------------------
#
# Every message, both ways, is one record: a fixed header, the path, then ``data``.
#   op (1 byte), path length (4), mode (4), mtime in ns (8), offset (8), data length (8)
HEADER = struct.Struct(">cIIqQQ")

# client -> agent
OP_PUT = b"P"       # a whole (small) file: mode, mtime, data
OP_MKDIR = b"D"     # a folder: mode
OP_LINK = b"L"      # a symlink: data is its target
OP_DELETE = b"X"    # move path to the trash
OP_CHUNK = b"K"     # a part of a big file: mode, mtime, offset, data (offset 0 starts it anew)
OP_COMMIT = b"F"    # a big file is whole: mode, mtime, offset = its size, data = its digest
OP_END = b"E"       # end of a batch: the agent applies what is pending and answers R_ACK
OP_MANIFEST = b"M"  # list the copy: R_FOLDER records, a folder at a time, then R_DONE
OP_GET = b"G"       # read one file back (restore): R_DATA chunks, then R_DONE, or R_FAIL

# agent -> client
R_HELLO = b"H"      # first record: data is JSON (protocol, version, sha, trash, ...); or R_FAIL
                    # (data: why) when another mirror writes this destination
R_ACK = b"A"        # a batch is applied: offset = ops, data = JSON {"errors": [[path, error]...],
                    # "trash": what it holds and what was pruned (see Tree.trash_report)}
R_FOLDER = b"f"     # the manifest's entries in one folder: path = the folder (b"" the top), offset
                    # = 1 when more records of the same folder follow, data = LIST_ENTRY + name
                    # (+ a link's target) for each entry (see entries())
R_DATA = b"g"       # a chunk of a file being read: mode, mtime, offset, data
R_DONE = b"z"       # the end of a manifest (offset = entries) or of a file (offset = size)
R_FAIL = b"!"       # a file could not be read: data is why

TRASH = b".colab-remote-trash"   # in the destination: what was replaced or deleted, by time
STAGING = b".staging"            # in the trash: new folders and big files being built
TMP_INFIX = b".colab-remote-tmp."  # our temporary names: ``.NAME.colab-remote-tmp.PID``
STAMP_FORMAT = "%Y-%m-%dT%H-%M-%S"  # trash folders: STAMP_FORMAT + ".ffffffZ" (UTC)
CHUNK = 1 << 20                  # bytes per record when a file is read back
MODE_MASK = 0o755                # nothing we create is group/world-writable, setuid or setgid
DIGEST_SIZE = 16                 # blake2b digest of a big file, checked before it is put in place
PRUNE_EVERY = 6 * 3600.0
WRITER = b".writer"              # in the trash: the lock of the agent writing this copy, and who
SIZES = b".sizes"                # in the trash: bytes and versions of each trash folder (a cache)
TRASH_SHARE = 0.25               # the trash holds at most this share of the room it could use
TRASH_MAX_GB = 10.0              # ... and at most this many GB (1e9 bytes)
ROOM_SLACK = 1 << 20             # a full disk: prune until a write has this much room beyond it
STALE_AFTER = 300.0              # a writer silent this long may be replaced by another mirror
TOUCH_EVERY = 30.0               # how often the writer notes that it is still active
FULL = (errno.ENOSPC, errno.EDQUOT)

HOME_DIR = ".colab-remote"       # in the server account's home: agents, configs, the lock

O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | O_CLOEXEC
O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | O_CLOEXEC
O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | O_CLOEXEC


# One entry of an R_FOLDER record: name length, mode (with the type bits), mtime in ns, size (a
# file's; 0 otherwise), the link target's length; then the name and the target.
LIST_ENTRY = struct.Struct(">HIqQH")
LIST_BYTES = 1 << 20  # an R_FOLDER record holds about this much (a big folder takes several)


def pack(op: bytes, path: bytes = b"", *, mode: int = 0, mtime_ns: int = 0, offset: int = 0,
         data: bytes = b"") -> bytes:
    """One record."""
    return HEADER.pack(op, len(path), mode, mtime_ns, offset, len(data)) + path + data


def read_record(read: Callable[[int], bytes]) -> Optional[Tuple[bytes, bytes, int, int, int, bytes]]:
    """``(op, path, mode, mtime_ns, offset, data)`` of the next record; None at the end of the
    stream or when it breaks mid-record (a cut record is never applied)."""
    head = read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    op, plen, mode, mtime, offset, dlen = HEADER.unpack(head)
    path = read(plen) if plen else b""
    data = read(dlen) if dlen else b""
    if len(path) < plen or len(data) < dlen:
        return None
    return op, path, mode, mtime, offset, data


def entries(data: bytes) -> Dict[bytes, Tuple[int, int, int, bytes]]:
    """The entries of one R_FOLDER record: ``{name: (mode, mtime_ns, size, link target)}``."""
    found = {}
    unpack, size, off, end = LIST_ENTRY.unpack_from, LIST_ENTRY.size, 0, len(data)
    while off < end:
        nlen, mode, mtime, fsize, tlen = unpack(data, off)
        off += size
        found[data[off:off + nlen]] = (mode, mtime, fsize, data[off + nlen:off + nlen + tlen])
        off += nlen + tlen
    return found


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


def trash_stamp(now: Optional[float] = None) -> bytes:
    """The name of one trash folder: UTC time to the microsecond."""
    t = time.time() if now is None else now
    return (time.strftime(STAMP_FORMAT, time.gmtime(t)) + ".%06dZ" % int(t % 1 * 1e6)).encode()


def check_path(p: bytes) -> None:
    """Refuse anything that is not a plain relative path inside the copy (and not the trash)."""
    parts = p.split(b"/")
    if (not p or p.startswith(b"/") or b".." in parts or b"." in parts or b"" in parts
            or parts[0] == TRASH or b"\0" in p):
        raise ValueError("refused path %r" % p)


def _split(p: bytes) -> Tuple[bytes, bytes]:
    d, _, name = p.rpartition(b"/")
    return d, name


def _join(d: bytes, name: bytes) -> bytes:
    return d + b"/" + name if d else name


def _lstat(fd: int, name: bytes) -> Optional[os.stat_result]:
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _names(fd: int) -> List[bytes]:
    """The names in folder ``fd`` as bytes (listdir of a descriptor gives str)."""
    return [os.fsencode(n) for n in os.listdir(fd)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def _left_by_dead(name: bytes) -> bool:
    """True for a temporary name or a staging folder of an agent that is gone (killed mid-write)."""
    pid = name.rpartition(TMP_INFIX)[2] if TMP_INFIX in name else name
    return pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid))


def _remove_at(fd: int, name: bytes) -> None:
    """Remove ``name`` in folder ``fd`` (a whole folder too), never following a link."""
    st = _lstat(fd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=fd)
        return
    sub = os.open(name, O_DIR, dir_fd=fd)
    try:
        for entry in _names(sub):
            _remove_at(sub, entry)
    finally:
        os.close(sub)
    os.rmdir(name, dir_fd=fd)


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
        st = _lstat(parent, name)
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
            cur = _join(cur, part)
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


class Tree:
    """The destination folder, changed only through descriptors opened from it (never a path).

    Puts go under a temporary name and are renamed into place; what they replace is linked into
    the trash first. A folder that is new on the server is built whole in the staging folder and
    renamed into place when its batch ends (no temporary name per file, never visible half-built).
    """

    def __init__(self, root: bytes, *, backup: bool = True, share: float = TRASH_SHARE,
                 max_bytes: int = int(TRASH_MAX_GB * 1e9)) -> None:
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | O_CLOEXEC)
        self.live = Folders(self.root_fd)
        self.backup = backup
        self.budget = Budget(share, max_bytes)
        self.writer: Optional[Writer] = None
        self.stamp: Optional[bytes] = None
        self.trash: Optional[Folders] = None
        self.stage: Optional[Folders] = None
        self.stage_name = b"%d" % os.getpid()
        self.staging_tried = False
        self.fresh: Dict[bytes, bytes] = {}  # new folder -> where it is built (in the stage)
        self.tops: List[Tuple[bytes, bytes]] = []  # (built at, real path), in order
        self.later: List[Tuple[bytes, int]] = []  # folder modes set once their files are in
        self.big: Dict[bytes, bytes] = {}  # big file -> its partial file (in the stage)
        self.counter = 0
        self.tmp_end = TMP_INFIX + b"%d" % os.getpid()

    def _name(self, prefix: bytes) -> bytes:
        self.counter += 1
        return prefix + b"%d" % self.counter

    # -- the trash ---------------------------------------------------------------------------
    def _trash(self) -> Folders:
        if self.trash is None:
            fd = open_folder(self.root_fd, TRASH, True, lambda: os.rename(
                TRASH, TRASH + b".not-ours.%d" % os.getpid(),
                src_dir_fd=self.root_fd, dst_dir_fd=self.root_fd))
            assert fd is not None
            self.trash = Folders(fd)
        return self.trash

    def _trash_target(self, rel: bytes) -> Tuple[int, bytes]:
        """A free name for ``rel`` in this batch's trash folder: (folder fd, name)."""
        if self.stamp is None:
            self.stamp = trash_stamp()
        d, name = _split(rel)
        fd = self._trash().get(_join(self.stamp, d) if d else self.stamp, create=True,
                               make=lambda parent, n, r: os.rename(
                                   n, n + b".file", src_dir_fd=parent, dst_dir_fd=parent))
        assert fd is not None
        target, n = name, 1
        while _lstat(fd, target) is not None:
            target = name + b".%d" % n
            n += 1
        return fd, target

    def discard(self, fd: int, name: bytes, rel: bytes) -> None:
        """Move ``rel`` (``name`` in folder ``fd``) to the trash, or remove it without a backup."""
        self.live.forget(rel)
        if not self.backup:
            _remove_at(fd, name)
            return
        tfd, target = self._trash_target(rel)
        _move(fd, name, tfd, target)

    def _make_way(self, parent: int, name: bytes, rel: bytes) -> None:
        self.discard(parent, name, rel)  # a file or link where a folder belongs

    def keep_old(self, fd: int, name: bytes, rel: bytes, st: os.stat_result) -> None:
        """Keep the version of ``rel`` about to be replaced (a hard link into the trash)."""
        if not self.backup:
            return
        tfd, target = self._trash_target(rel)
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
                    _write_all(dst, chunk)
            except BaseException:
                os.close(dst)
                _remove_quietly(tfd, target)
                raise
            os.close(dst)
        finally:
            os.close(src)

    # -- new folders, built in the stage -----------------------------------------------------
    def _stage(self) -> Optional[Folders]:
        """This agent's staging folder (None when it cannot be made on the copy's file system)."""
        if not self.staging_tried:
            self.staging_tried = True
            try:
                tfd = self._trash().get(STAGING, create=True)
                assert tfd is not None
                _remove_at(tfd, self.stage_name)  # an earlier agent with the same pid
                os.mkdir(self.stage_name, 0o700, dir_fd=tfd)
                fd = os.open(self.stage_name, O_DIR, dir_fd=tfd)
                if os.fstat(fd).st_dev == os.fstat(self.root_fd).st_dev:  # rename: one file system
                    self.stage = Folders(fd)
                else:
                    os.close(fd)
            except OSError:
                pass  # new folders are then made in place, as any other
        return self.stage

    def _built(self, rel: bytes, create: bool) -> Optional[bytes]:
        """Where ``rel`` is built in the stage when it or a folder above it is new in this batch,
        else None. With ``create``, ``rel`` is a folder: it and the folders between are made in
        the stage; without, nothing is made (a delete never builds what it deletes)."""
        if not self.fresh or self.stage is None:
            return None
        cur, rest = rel, []  # type: bytes, List[bytes]
        while cur and cur not in self.fresh:
            cur, name = _split(cur)
            rest.append(name)
        if not cur:
            return None
        at = self.fresh[cur]
        for name in reversed(rest):
            at, cur = _join(at, name), _join(cur, name)
            if create:
                fd = self.stage.get(_split(at)[0], create=False)
                if fd is None:
                    return None
                st = _lstat(fd, name)
                if st is not None and not stat.S_ISDIR(st.st_mode):
                    _remove_at(fd, name)
                    st = None
                if st is None:
                    os.mkdir(name, 0o700, dir_fd=fd)  # a folder the batch did not list
                self.fresh[cur] = at
        return at

    def _in_stage(self, p: bytes) -> Optional[Tuple[int, bytes, bytes]]:
        """(folder fd in the stage, name, where p goes) when p's folder is being built."""
        d, name = _split(p)
        at = self._built(d, create=True) if d else None
        if at is None:
            return None
        assert self.stage is not None
        fd = self.stage.get(at, create=False)
        return None if fd is None else (fd, name, _join(at, name))

    def _live_parent(self, p: bytes) -> Tuple[int, bytes, Optional[os.stat_result]]:
        """(folder fd, name, lstat) of ``p`` in the copy, its folders made (links moved away)."""
        d, name = _split(p)
        fd = self.live.get(d, create=True, make=self._make_way)
        assert fd is not None
        return fd, name, _lstat(fd, name)

    # -- operations ----------------------------------------------------------------------------
    def put(self, p: bytes, mode: int, mtime: int, data: bytes) -> None:
        mode &= MODE_MASK
        staged = self._in_stage(p)
        if staged is not None:
            fd, name, _ = staged
            _remove_at(fd, name)
            _write_new(fd, name, mode, mtime, data)
            return
        fd, name, st = self._live_parent(p)
        if st is not None and stat.S_ISDIR(st.st_mode):
            self.discard(fd, name, p)
            st = None
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == len(data) \
                and _same_content(fd, name, data):
            if stat.S_IMODE(st.st_mode) != mode or st.st_mtime_ns != mtime:
                _set_mode_time(fd, name, mode, mtime)
            return
        tmp = self._tmpname(name)
        _remove_at(fd, tmp)  # left by an earlier agent of the same pid
        _write_new(fd, tmp, mode, mtime, data)
        self._into_place(fd, tmp, fd, name, p, st)

    def _into_place(self, src_fd: int, tmp: bytes, fd: int, name: bytes, p: bytes,
                    st: Optional[os.stat_result]) -> None:
        """Rename ``tmp`` over ``name`` (what it replaces into the trash first); on failure the
        temporary file goes, so a full disk leaves no debris."""
        try:
            if st is not None:
                old = st
                self.roomy(lambda: self.keep_old(fd, name, p, old))
            self.roomy(lambda: os.rename(tmp, name, src_dir_fd=src_fd, dst_dir_fd=fd))
        except BaseException:
            _remove_quietly(src_fd, tmp)
            raise

    def _tmpname(self, name: bytes) -> bytes:
        return b"." + name[:180] + self.tmp_end

    def mkdir(self, p: bytes, mode: int) -> None:
        mode &= MODE_MASK
        if p in self.fresh:
            return
        staged = self._in_stage(p)
        if staged is not None:
            fd, name, at = staged
            _remove_at(fd, name)
        else:
            fd, name, st = self._live_parent(p)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                self.discard(fd, name, p)
                st = None
            stage = self._stage() if st is None and not _in_place(p) else None
            if stage is None:
                if st is None:
                    os.mkdir(name, 0o700, dir_fd=fd)
                if st is None or stat.S_IMODE(st.st_mode) != mode:
                    _chmod_folder(fd, name, mode)
                return
            at = self._name(b"new-")
            _remove_at(stage.root, at)
            self.tops.append((at, p))
            fd, name = stage.root, at
        os.mkdir(name, 0o700, dir_fd=fd)
        if mode != 0o700:
            self.later.append((p, mode))  # set once its files are in
        self.fresh[p] = at

    def link(self, p: bytes, target: bytes) -> None:
        if b"\0" in target or not target:
            raise ValueError("refused link target")
        staged = self._in_stage(p)
        if staged is not None:
            fd, name, _ = staged
            _remove_at(fd, name)
            os.symlink(target, name, dir_fd=fd)
            return
        fd, name, st = self._live_parent(p)
        if st is not None and stat.S_ISLNK(st.st_mode) and os.readlink(name, dir_fd=fd) == target:
            return
        if st is not None and stat.S_ISDIR(st.st_mode):
            self.discard(fd, name, p)
            st = None
        tmp = self._tmpname(name)
        _remove_at(fd, tmp)
        os.symlink(target, tmp, dir_fd=fd)
        self._into_place(fd, tmp, fd, name, p, st)

    def delete(self, p: bytes) -> None:
        at = self._built(p, create=False)
        if at is not None:  # new in this batch: never on the server, nothing to keep
            assert self.stage is not None
            d, name = _split(at)
            fd = self.stage.get(d, create=False)
            if fd is not None:
                self.stage.forget(at)
                _remove_at(fd, name)
            for k in [k for k in self.fresh if k == p or k.startswith(p + b"/")]:
                del self.fresh[k]
            self.tops = [t for t in self.tops if t[1] != p]
            return
        d, name = _split(p)
        fd = self.live.get(d, create=False)  # its folder is not there (or is a link): nothing to do
        if fd is not None and _lstat(fd, name) is not None:
            self.discard(fd, name, p)

    def _partials(self) -> int:
        stage = self._stage()
        if stage is not None:
            return stage.root
        fd = self._trash().get(STAGING, create=True)
        assert fd is not None
        return fd

    def chunk(self, p: bytes, offset: int, data: bytes) -> None:
        """Part of a big file, written into a partial file in the stage."""
        fd = self._partials()
        name = self.big.get(p)
        if offset == 0 or name is None:
            if offset != 0:
                raise ValueError("a chunk at %d of a file not begun" % offset)
            if name is not None:
                _remove_quietly(fd, name)
            name = self.big[p] = self._name(b"big-" + self.stage_name + b"-")
            out = os.open(name, O_NEW, 0o600, dir_fd=fd)
        else:
            out = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | O_CLOEXEC, dir_fd=fd)
        try:
            have = os.fstat(out).st_size
            if have != offset:
                raise ValueError("a chunk at %d does not follow the %d bytes received" % (offset, have))
            self.roomy(lambda: _write_at(out, offset, data), len(data))
        except BaseException:
            os.close(out)
            _remove_quietly(fd, name)
            self.big.pop(p, None)
            raise
        os.close(out)

    def commit(self, p: bytes, mode: int, mtime: int, size: int, want: bytes) -> None:
        """A big file is whole: check it and put it in place (what it replaces to the trash)."""
        name = self.big.pop(p, None)
        if name is None:
            raise ValueError("no part of this file arrived")
        sfd = self._partials()
        fd = os.open(name, O_READ, dir_fd=sfd)
        try:
            h = hashlib.blake2b(digest_size=DIGEST_SIZE)
            got = 0
            while True:
                chunk = os.read(fd, CHUNK)
                if not chunk:
                    break
                h.update(chunk)
                got += len(chunk)
            if got != size or (want and h.digest() != want):
                raise ValueError("the file arrived damaged (%d of %d bytes)" % (got, size))
            os.fchmod(fd, mode & MODE_MASK)
            os.utime(fd, ns=(mtime, mtime))
        except BaseException:
            os.close(fd)
            _remove_quietly(sfd, name)
            raise
        os.close(fd)
        staged = self._in_stage(p)
        if staged is not None:
            dfd, dname, _ = staged
            _remove_at(dfd, dname)
            os.rename(name, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
            return
        dfd, dname, st = self._live_parent(p)
        if st is not None and stat.S_ISDIR(st.st_mode):
            self.discard(dfd, dname, p)
            st = None
        self._into_place(sfd, name, dfd, dname, p, st)

    def finish(self, errors: List[List[str]]) -> None:
        """End of a batch: the new folders into place (the client hears of it only after this)."""
        for at, p in self.tops:
            try:
                self._settle(at, p)
            except Exception as e:  # noqa: BLE001 - reported to the client
                self.live.forget()
                errors.append([p.decode("utf-8", "replace"), "%s: %s" % (type(e).__name__, e)])
        for p, mode in reversed(self.later):
            d, name = _split(p)
            fd = self.live.get(d, create=False)
            if fd is not None:
                try:
                    _chmod_folder(fd, name, mode)
                except OSError:
                    pass
        if self.stage is not None:
            self.stage.forget()
        self.fresh.clear()
        self.tops, self.later = [], []
        if self.stamp is not None and self.trash is not None:
            self.budget.measured(self.trash, self.stamp)
        self.stamp = None

    def _settle(self, at: bytes, p: bytes) -> None:
        """Put folder ``at`` (built in the stage) at ``p``; merge when ``p`` appeared meanwhile."""
        assert self.stage is not None
        fd, name, st = self._live_parent(p)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            self.discard(fd, name, p)
            st = None
        if st is None:
            os.rename(at, name, src_dir_fd=self.stage.root, dst_dir_fd=fd)
        else:
            self._merge(self.stage.root, at, fd, name, p)

    def _merge(self, sparent: int, sname: bytes, dparent: int, dname: bytes, rel: bytes) -> None:
        src = os.open(sname, O_DIR, dir_fd=sparent)
        try:
            dst = os.open(dname, O_DIR, dir_fd=dparent)
            try:
                for n in _names(src):
                    r = _join(rel, n)
                    new_is_dir = stat.S_ISDIR(os.stat(n, dir_fd=src, follow_symlinks=False).st_mode)
                    old = _lstat(dst, n)
                    if old is not None:
                        if new_is_dir and stat.S_ISDIR(old.st_mode):
                            self._merge(src, n, dst, n, r)
                            continue
                        if new_is_dir or stat.S_ISDIR(old.st_mode):
                            self.discard(dst, n, r)
                        else:
                            self.keep_old(dst, n, r, old)
                    os.rename(n, n, src_dir_fd=src, dst_dir_fd=dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        os.rmdir(sname, dir_fd=sparent)

    # -- reading -------------------------------------------------------------------------------
    def listing(self, limit: int = LIST_BYTES) -> Iterator[Tuple[bytes, bytes, bool]]:
        """The copy a folder at a time (the trash and temporary names left out): ``(folder,
        packed entries, more of this folder follows)``, a folder before the folders in it. One
        stat per entry and one record per folder: the whole-tree pass's listing costs about what
        ``rsync -a``'s own file list does. Folders are opened one level at a time (open
        descriptors: the depth, not the width of the tree); temporary names left by dead agents
        are removed on the way."""
        subs = []  # type: List[bytes]
        top = os.dup(self.root_fd)
        stack = [(b"", top, subs)]
        try:
            for block in self._list_folder(b"", top, subs, limit):
                yield block
            while stack:
                rel, fd, subs = stack[-1]
                if not subs:
                    os.close(fd)
                    stack.pop()
                    continue
                name = subs.pop()
                sub = open_folder(fd, name, False)
                if sub is None:
                    continue
                r = _join(rel, name)
                stack.append((r, sub, []))
                for block in self._list_folder(r, sub, stack[-1][2], limit):
                    yield block
        finally:
            for _, fd, _ in stack:
                os.close(fd)

    def _list_folder(self, rel: bytes, fd: int, subs: List[bytes], limit: int
                     ) -> Iterator[Tuple[bytes, bytes, bool]]:
        """One folder's R_FOLDER blocks; its subfolders' names go to ``subs``."""
        pack_entry, parts, size = LIST_ENTRY.pack, [], 0
        is_reg, is_dir, is_lnk = stat.S_ISREG, stat.S_ISDIR, stat.S_ISLNK
        encoding, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
        for text in os.listdir(fd):
            name = text.encode(encoding, errors)  # os.fsencode, without its cost per name
            if TMP_INFIX in name:
                if _left_by_dead(name):
                    _remove_quietly(fd, name)
                continue
            if not rel and name == TRASH:
                continue
            try:
                st = os.stat(text, dir_fd=fd, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                continue
            mode = st.st_mode
            if is_reg(mode):
                part = pack_entry(len(name), mode, st.st_mtime_ns, st.st_size, 0) + name
            elif is_dir(mode):
                subs.append(name)
                part = pack_entry(len(name), mode, st.st_mtime_ns, 0, 0) + name
            elif is_lnk(mode):
                try:
                    target = os.readlink(name, dir_fd=fd)
                except OSError:
                    continue
                part = pack_entry(len(name), mode, st.st_mtime_ns, 0, len(target)) + name + target
            else:
                continue
            parts.append(part)
            size += len(part)
            if size >= limit:
                yield rel, b"".join(parts), True
                parts, size = [], 0
        yield rel, b"".join(parts), False

    def read(self, p: bytes) -> Iterator[Tuple[int, int, int, bytes]]:
        """A file's chunks: (mode, mtime, offset, data); the last one is short (maybe empty)."""
        d, name = _split(p)
        fd = self.live.get(d, create=False)
        if fd is None:
            raise FileNotFoundError(p.decode("utf-8", "replace"))
        f = os.open(name, O_READ, dir_fd=fd)
        try:
            st = os.fstat(f)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError("not a regular file")
            offset = 0
            while True:
                chunk = os.read(f, CHUNK)
                yield st.st_mode, st.st_mtime_ns, offset, chunk
                offset += len(chunk)
                if len(chunk) < CHUNK:
                    return
        finally:
            os.close(f)

    # -- upkeep --------------------------------------------------------------------------------
    def clean_staging(self) -> None:
        """Remove what agents that are gone left in the staging folder."""
        tfd = self._trash().get(STAGING, create=False)
        if tfd is None:
            return
        for name in _names(tfd):
            owner = name.split(b"-")[1] if name.startswith(b"big-") else name
            if _left_by_dead(owner):
                try:
                    _remove_at(tfd, name)
                except OSError:
                    pass

    def prune(self, keep_days: float, now: Optional[float] = None) -> int:
        """Remove trash folders older than ``keep_days``; how many."""
        cut = (time.time() if now is None else now) - keep_days * 86400
        trash = self._trash()
        removed = 0
        for name in sorted(self.budget.load(trash)):
            try:
                old = calendar.timegm(time.strptime(name[:19].decode(), STAMP_FORMAT)) < cut
            except ValueError:
                st = _lstat(trash.root, name)
                old = st is not None and st.st_mtime < cut
            if old and self.budget.drop(trash, name, "age"):
                removed += 1
        return removed

    # -- the trash's budget (the server's config: a share of the room and a cap) ---------------
    def _avail(self) -> int:
        st = os.fstatvfs(self.root_fd)
        return st.f_bavail * st.f_frsize

    def keep_within_budget(self) -> None:
        """Prune the trash, oldest first, while it holds more than its budget allows."""
        trash = self._trash()
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
        trash = self._trash()
        budget = self.budget
        book = budget.load(trash)
        freed = False
        while book and (not freed or self._avail() < need + ROOM_SLACK):
            freed = budget.drop(trash, min(book), "full") or freed
        if not freed and self.stamp is not None and _measure(trash.root, self.stamp)[1]:
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

    def trash_report(self) -> dict:
        return self.budget.report()

    # -- one writer ------------------------------------------------------------------------------
    def lock(self, key_id: str, root: str) -> Optional[str]:
        """Become this destination's one writer (see :class:`Writer`); None, or why not."""
        self.writer = Writer(self._trash().root, key_id, root)
        return self.writer.acquire()

    def close(self) -> None:
        """Close every descriptor; the empty staging folder (and an empty trash) go."""
        self.live.forget()
        if self.stage is not None:
            self.stage.forget()
            os.close(self.stage.root)
            self.stage = None
        if self.trash is not None:
            self.trash.forget()
            try:
                self.budget.close(self.trash)
            except OSError:
                pass
            if self.writer is not None:
                self.writer.release()
                self.writer = None
            for parent, name in ((STAGING, self.stage_name), (b"", STAGING)):
                pfd = self.trash.get(parent, create=False)
                if pfd is not None:
                    try:
                        os.rmdir(name, dir_fd=pfd)  # only when empty
                    except OSError:
                        pass
                self.trash.forget()
            os.close(self.trash.root)
            self.trash = None
            try:
                os.rmdir(TRASH, dir_fd=self.root_fd)
            except OSError:
                pass
        os.close(self.root_fd)


def _in_place(p: bytes) -> bool:
    """A git repository's object folder (``.git/objects/ab``) is made in place, not in the stage:
    the client sends each object after those it names, and each must be there once written."""
    parts = p.split(b"/")
    return len(parts) >= 3 and parts[-2] == b"objects" and b".git" in parts[:-2]


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
        for name in _names(trash.root):
            if name.startswith(b"."):
                continue  # the staging folder, the lock, this cache
            st = _lstat(trash.root, name)
            if st is None:
                continue
            known = cached.get(name)
            if known is not None and known[2] == st.st_mtime_ns:
                book[name] = known
            else:
                book[name] = _measure(trash.root, name)
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
        new = _measure(trash.root, name) if _lstat(trash.root, name) is not None else None
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
            _remove_tree(trash.root, name)
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
        for name in _names(fd):
            if name.startswith(b"." + SIZES + b"."):
                _remove_quietly(fd, name)  # a cache being written when its agent was killed
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
            _write_file_at(trash.root, SIZES.decode(), text.encode(), sync=False)
            self.dirty = False
        except OSError:
            pass  # a cache: measured again next time

    def close(self, trash: Folders) -> None:
        if self.book is not None and not self.book:
            _remove_quietly(trash.root, SIZES)  # an empty trash: nothing to remember
        else:
            self.save(trash, force=True)


def _measure(fd: int, name: bytes) -> List[int]:
    """[bytes on disk, versions (files and links), mtime_ns] of trash folder ``name`` in ``fd``."""
    st = _lstat(fd, name)
    if st is None:
        return [0, 0, 0]
    if not stat.S_ISDIR(st.st_mode):
        return [st.st_blocks * 512, 1, st.st_mtime_ns]
    total, versions = st.st_blocks * 512, 0
    for _, dirs, files, dfd in os.fwalk(os.fsdecode(name), dir_fd=fd):
        for n in dirs + files:
            sub = _lstat(dfd, os.fsencode(n))
            if sub is None:
                continue
            total += sub.st_blocks * 512
            if not stat.S_ISDIR(sub.st_mode):
                versions += 1
    return [total, versions, st.st_mtime_ns]


def _remove_tree(fd: int, name: bytes) -> None:
    """Remove ``name`` in folder ``fd`` whole, never following a link, also what sits in folders
    the trash keeps read-only (their own mode, as they were in the runtime)."""
    st = _lstat(fd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=fd)
        return
    try:
        sub = os.open(name, O_DIR, dir_fd=fd)
    except PermissionError:
        _chmod_nofollow(fd, name, 0o700)
        sub = os.open(name, O_DIR, dir_fd=fd)
    try:
        if stat.S_IMODE(os.fstat(sub).st_mode) & 0o700 != 0o700:
            os.fchmod(sub, 0o700)
        for entry in _names(sub):
            _remove_tree(sub, entry)
    finally:
        os.close(sub)
    os.rmdir(name, dir_fd=fd)


def _chmod_nofollow(fd: int, name: bytes, mode: int) -> None:
    """chmod a folder that cannot be opened for reading (mode 0), never through a link."""
    path_fd = os.open(name, getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW
                      | O_CLOEXEC, dir_fd=fd)
    try:
        os.chmod("/proc/self/fd/%d" % path_fd, mode)
    finally:
        os.close(path_fd)


class Writer:
    """One mirror writes a destination at a time: an flock on ``TRASH/.writer`` held for the
    agent's life, the file saying who holds it (key id, pid, since when, last active).

    An agent of the same key (the same mirror re-run, or logging in again while the server still
    serves its old connection) replaces the holder. Another mirror is refused while the holder is
    active, and replaces one silent for STALE_AFTER: a runtime that is gone leaves an agent waiting
    on a dead connection, which sshd drops only hours later. A mirror replaced that way is refused
    while its successor holds the lock, so two runtimes never take turns.
    """

    def __init__(self, trash_fd: int, key_id: str, root: str) -> None:
        self.trash_fd, self.key_id, self.root = trash_fd, key_id, root
        self.fd = -1
        self.record: dict = {}
        self.touched = 0.0

    def acquire(self, wait: float = 15.0) -> Optional[str]:
        """None once this agent holds the lock; else why not (for the client)."""
        deadline = time.monotonic() + wait
        took_from: Optional[dict] = None
        signalled: Dict[int, float] = {}
        while True:
            holder: dict = {}
            fd = os.open(WRITER, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | O_CLOEXEC, 0o600,
                         dir_fd=self.trash_fd)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                    raise PermissionError("%s is not a file of this user" % WRITER.decode())
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                    holder = _read_record_file(fd)
                else:
                    now = _lstat(self.trash_fd, WRITER)
                    if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                        continue  # replaced meanwhile (by hand?): the file at that name counts
                    self._hold(fd, took_from)
                    fd = -1
                    return None
            finally:
                if fd >= 0:
                    os.close(fd)
            if holder:  # (empty: the holder has the lock but has not said who it is yet)
                why = self._verdict(holder)
                if why is not None:
                    return why
                took_from = holder
                _end_agent(holder, signalled)
            if time.monotonic() > deadline:
                return "the agent that wrote %s before (pid %s) did not end" % (
                    self.root, holder.get("pid", "?"))
            time.sleep(0.05)

    def _verdict(self, holder: dict) -> Optional[str]:
        """None when this agent may replace ``holder``; else why not."""
        key = str(holder.get("key", ""))
        if key == self.key_id:
            return None  # this same mirror, again
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(holder.get("since", 0))))
        who = "runtime %s (key %s), since %s" % (holder.get("runtime") or "?", key or "?", since)
        if self.key_id and self.key_id in holder.get("superseded", ()):
            return ("%s was taken over by another mirror: %s; this mirror no longer writes there "
                    "while that one runs" % (self.root, who))
        idle = time.time() - float(holder.get("active", 0))
        if idle >= STALE_AFTER:
            return None  # silent that long: most likely a runtime that is gone
        return ("another mirror writes to %s: %s, last active %d s ago (one mirror writes a "
                "folder at a time; one whose runtime is gone is replaced once it has been silent "
                "%d minutes)" % (self.root, who, max(0, idle), STALE_AFTER // 60))

    def _hold(self, fd: int, took_from: Optional[dict]) -> None:
        self.fd = fd
        now = time.time()
        me = _proc_stat(os.getpid())
        superseded: List[str] = []
        if took_from:
            superseded = [str(k) for k in took_from.get("superseded", ())]
            if took_from.get("key") != self.key_id:
                superseded = [str(took_from.get("key"))] + superseded
        self.record = {"key": self.key_id, "runtime": runtime_of(self.key_id) if self.key_id else "",
                       "pid": os.getpid(), "start": me[2] if me else "", "since": now,
                       "active": now, "superseded": superseded[:8]}
        self._write()

    def _write(self) -> None:
        data = json.dumps(self.record).encode()
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, data, 0)
        except OSError:
            pass  # a full disk: the lock holds all the same
        self.touched = time.monotonic()

    def touch(self) -> None:
        """Note that the client is still there (at most every TOUCH_EVERY)."""
        if self.fd >= 0 and time.monotonic() - self.touched > TOUCH_EVERY:
            self.record["active"] = time.time()
            self._write()

    def release(self) -> None:
        """The lock goes with the descriptor (the file stays: it belongs to the trash folder)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _read_record_file(fd: int) -> dict:
    try:
        data = os.pread(fd, 1 << 16, 0)
        found = json.loads(data.decode()) if data else {}
        return found if isinstance(found, dict) else {}
    except (OSError, ValueError):
        return {}


def _end_agent(holder: dict, signalled: Dict[int, float]) -> None:
    """Ask the agent ``holder`` names to end (SIGTERM, then SIGKILL after 3 s): only while that pid
    is still the same process (its start time), and only ever one of this account's (kill(2))."""
    try:
        pid = int(holder.get("pid", 0))
    except (TypeError, ValueError):
        return
    info = _proc_stat(pid) if pid > 0 and pid != os.getpid() else None
    if info is None or info[2] != holder.get("start"):
        return  # gone (its lock goes with it), or the pid is another process now
    first = signalled.setdefault(pid, time.monotonic())
    try:
        os.kill(pid, signal.SIGKILL if time.monotonic() - first > 3 else signal.SIGTERM)
    except OSError:
        pass


def _move(fd: int, name: bytes, tfd: int, target: bytes) -> None:
    """Rename ``name`` in ``fd`` to ``target`` in ``tfd``. A folder of ours without write permission
    for its owner (read-only on the server) cannot move to another folder (its ``..`` changes):
    it gets the permission for the move and its own mode back in its new place."""
    try:
        os.rename(name, target, src_dir_fd=fd, dst_dir_fd=tfd)
        return
    except PermissionError:
        st = _lstat(fd, name)
        if st is None or not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o200 \
                or st.st_uid != os.getuid():
            raise
    mode = stat.S_IMODE(st.st_mode)
    _chmod_nofollow(fd, name, mode | 0o700)
    try:
        os.rename(name, target, src_dir_fd=fd, dst_dir_fd=tfd)
    except BaseException:
        _chmod_nofollow(fd, name, mode)
        raise
    _chmod_nofollow(tfd, target, mode)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_at(fd: int, offset: int, data: bytes) -> None:
    """``data`` at ``offset`` of an open file, what was after it cut (a write tried again)."""
    os.ftruncate(fd, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    _write_all(fd, data)


def _write_new(fd: int, name: bytes, mode: int, mtime: int, data: bytes) -> None:
    """Create ``name`` (never through a link), write it, set its mode and time; gone on failure."""
    out = os.open(name, O_NEW, 0o600, dir_fd=fd)
    try:
        _write_all(out, data)
        if mode != 0o600:
            os.fchmod(out, mode)
        os.utime(out, ns=(mtime, mtime))
    except BaseException:
        os.close(out)
        _remove_quietly(fd, name)
        raise
    os.close(out)


def _remove_quietly(fd: int, name: bytes) -> None:
    try:
        os.unlink(name, dir_fd=fd)
    except OSError:
        pass


def _same_content(fd: int, name: bytes, data: bytes) -> bool:
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


def _set_mode_time(fd: int, name: bytes, mode: int, mtime: int) -> None:
    f = os.open(name, O_READ, dir_fd=fd)
    try:
        os.fchmod(f, mode)
        os.utime(f, ns=(mtime, mtime))
    finally:
        os.close(f)


def _chmod_folder(fd: int, name: bytes, mode: int) -> None:
    f = os.open(name, O_DIR, dir_fd=fd)
    try:
        os.fchmod(f, mode & MODE_MASK)
    finally:
        os.close(f)


# --- the mirror's agent -----------------------------------------------------------------------


def serve(tree: Tree, inp: BinaryIO, out: BinaryIO, *, keep_days: float, hello: dict) -> None:
    """Answer the client's records until the channel closes."""
    out.write(pack(R_HELLO, data=json.dumps(hello).encode()))
    out.flush()
    errors: List[List[str]] = []
    n = 0
    last_prune = 0.0
    while True:
        rec = read_record(inp.read)
        if rec is None:
            break  # the channel broke (a cut record is not applied) or the client is done
        op, p, mode, mtime, offset, data = rec
        if tree.writer is not None:
            tree.writer.touch()
        if op == OP_END:
            tree.finish(errors)
            try:
                tree.keep_within_budget()
            except OSError:
                pass
            out.write(pack(R_ACK, offset=n, data=json.dumps(
                {"errors": errors[:50], "trash": tree.trash_report()}).encode()))
            out.flush()
            errors, n = [], 0
            if time.monotonic() - last_prune > PRUNE_EVERY:
                last_prune = time.monotonic()
                _prune_quietly(tree, keep_days)
            continue
        if op == OP_MANIFEST:
            tree.finish(errors)
            count = 0
            for folder, data, more in tree.listing():
                out.write(pack(R_FOLDER, folder, offset=int(more), data=data))
                count += 1
            out.write(pack(R_DONE, offset=count))
            out.flush()
            continue
        if op == OP_GET:
            try:
                check_path(p)
                size = 0
                for fmode, fmtime, off, chunk in tree.read(p):
                    out.write(pack(R_DATA, p, mode=fmode, mtime_ns=fmtime, offset=off, data=chunk))
                    size = off + len(chunk)
                out.write(pack(R_DONE, p, offset=size))
            except (OSError, ValueError) as e:
                out.write(pack(R_FAIL, p, data=("%s: %s" % (type(e).__name__, e)).encode()))
            out.flush()
            continue
        n += 1
        try:
            if op not in (OP_PUT, OP_MKDIR, OP_LINK, OP_DELETE, OP_CHUNK, OP_COMMIT):
                raise ValueError("unknown operation %r" % op)
            check_path(p)
            if op == OP_CHUNK:  # (these two make room themselves: a failure drops the partial)
                tree.chunk(p, offset, data)
            elif op == OP_COMMIT:
                tree.commit(p, mode, mtime, offset, data)
            else:  # a full disk: the trash is pruned and the op done again (the live copy wins)
                tree.roomy(_op(tree, op, p, mode, mtime, data), len(data))
        except Exception as e:  # noqa: BLE001 - reported to the client, the agent goes on
            tree.live.forget()
            errors.append([p.decode("utf-8", "replace"), "%s: %s" % (type(e).__name__, e)])
    tree.finish(errors)  # the new folders of a cut batch hold whole files only: keep them


def _op(tree: Tree, op: bytes, p: bytes, mode: int, mtime: int, data: bytes) -> Callable[[], None]:
    if op == OP_PUT:
        return lambda: tree.put(p, mode, mtime, data)
    if op == OP_MKDIR:
        return lambda: tree.mkdir(p, mode)
    if op == OP_LINK:
        return lambda: tree.link(p, data)
    return lambda: tree.delete(p)


def _prune_quietly(tree: Tree, keep_days: float) -> None:
    try:
        tree.prune(keep_days)
        tree.clean_staging()
        tree.keep_within_budget()
    except OSError:
        pass


def run_mirror(root: bytes, *, keep_days: float, backup: bool = True, share: float = TRASH_SHARE,
               max_gb: float = TRASH_MAX_GB, key_id: str = "", inp: Optional[BinaryIO] = None,
               out: Optional[BinaryIO] = None) -> int:
    """Serve one client: write into ``root`` as its one writer, the trash within its budget (at
    most ``share`` of the room it could use and ``max_gb``); 1 when another mirror writes there."""
    os.umask(0o077)
    try:  # 1 MiB pipe from sshd: fewer wake-ups per batch (Linux; fine without)
        fcntl.fcntl(0, 1031, 1 << 20)  # F_SETPIPE_SZ
    except (OSError, ValueError):
        pass
    share, max_gb = check_budget(share, max_gb)
    output = out or sys.stdout.buffer
    where = root.decode("utf-8", "replace")
    tree = Tree(root, backup=backup, share=share, max_bytes=int(max_gb * 1e9))
    try:
        refused = tree.lock(key_id, where)
        if refused is not None:
            output.write(pack(R_FAIL, data=refused.encode()))
            output.flush()
            sys.stderr.write("colab-remote: refused: %s\n" % refused)
            return 1
        if backup:
            _prune_quietly(tree, keep_days)
        hello = {"protocol": VERSION, "sha": own_sha(), "root": where, "keep_days": keep_days,
                 "pid": os.getpid(), "trash": tree.trash_report()}
        serve(tree, inp or sys.stdin.buffer, output, keep_days=keep_days, hello=hello)
    finally:
        tree.close()
    return 0


def check_budget(share: object, max_gb: object) -> Tuple[float, float]:
    """The trash's budget as numbers, or a ValueError: a share in (0, 1] and a cap > 0 GB."""
    try:
        share_f, max_f = float(share), float(max_gb)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError("trash_share and trash_max_gb must be numbers") from None
    if not 0 < share_f <= 1 or not max_f > 0 or max_f != max_f:
        raise ValueError("trash_share must be in (0, 1] and trash_max_gb > 0, got %r and %r"
                         % (share, max_gb))
    return share_f, max_f


# --- the tunnel's helper ----------------------------------------------------------------------


def _proc_stat(pid: int) -> Optional[Tuple[str, int, str]]:
    """(command name, parent pid, start time) of ``pid`` from /proc (Linux), or None.

    /proc/PID/stat is readable for every process, also sshd's (which are not dumpable, so their
    /proc/PID/fd is not).
    """
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    name = raw[raw.index(b"(") + 1:raw.rindex(b")")].decode("utf-8", "replace")
    rest = raw[raw.rindex(b")") + 2:].split()
    return name, int(rest[1]), rest[19].decode()


def session_pid() -> Optional[int]:
    """The sshd process that serves this connection: the nearest ancestor named sshd*."""
    pid = os.getppid()
    for _ in range(16):
        info = _proc_stat(pid)
        if info is None:
            return None
        if info[0].startswith("sshd"):
            return pid
        pid = info[1]
    return None


def _sessions_file(key_id: str) -> Tuple[int, str]:
    state = _state_dir()
    folder = open_folder(state, b"sessions", True)
    os.close(state)
    assert folder is not None
    return folder, key_id


def record_session(key_id: str) -> Optional[int]:
    """Note this connection's sshd process (pid and start time) as one of ``key_id``'s own."""
    pid = session_pid()
    info = _proc_stat(pid) if pid is not None else None
    if pid is None or info is None:
        return None
    folder, name = _sessions_file(key_id)
    try:
        try:
            with open(os.open(name, O_READ, dir_fd=folder), "rb") as f:
                lines = f.read().decode().splitlines()[-31:]
        except OSError:
            lines = []
        lines.append("%d %s" % (pid, info[2]))
        _write_file_at(folder, name, ("\n".join(lines) + "\n").encode())
    finally:
        os.close(folder)
    return pid


def reclaim(key_id: str, pids: List[int]) -> List[int]:
    """End sessions of this same key that still hold the tunnel's port after their link died:
    only pids that :func:`record_session` noted for ``key_id``, still the same process (start
    time), named sshd*, and not this very session. Returns the pids signalled."""
    folder, name = _sessions_file(key_id)
    try:
        with open(os.open(name, O_READ, dir_fd=folder), "rb") as f:
            known = set(f.read().decode().split("\n"))
    except OSError:
        known = set()
    finally:
        os.close(folder)
    me, done = session_pid(), []
    for pid in pids:
        info = _proc_stat(pid)
        if info is None or pid == me or not info[0].startswith("sshd"):
            continue
        if "%d %s" % (pid, info[2]) not in known:
            continue
        try:
            os.kill(pid, signal.SIGTERM)
            done.append(pid)
        except OSError:
            pass
    return done


def run_tunnel(key_id: str, port: int, request: List[str]) -> int:
    word = request[0] if request else ""
    if request == ["hello"]:
        print("colab-remote-agent %s %s tunnel %d" % (VERSION, own_sha(), port))
        return 0
    if request == ["session"]:
        pid = record_session(key_id)
        print("colab-remote-session %s" % (pid if pid is not None else "?"))
        return 0
    if word == "reclaim" and len(request) > 1 and all(w.isdigit() for w in request[1:]):
        done = reclaim(key_id, [int(w) for w in request[1:]])
        print("colab-remote-reclaimed %s" % " ".join(str(p) for p in done))
        return 0
    if request == ["revoke"]:
        return _print_revoked(revoke(runtime=runtime_of(key_id)))
    return _refuse("this key only keeps the colab-remote tunnel on port %d up" % port)


def _refuse(why: str) -> int:
    sys.stderr.write("colab-remote: refused: %s\n" % why)
    return 1


# --- set-up, the server's config, revocation --------------------------------------------------


def own_sha() -> str:
    """sha256 of this file as installed (what the client pinned)."""
    try:
        with open(os.path.abspath(__file__), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except (NameError, OSError):  # run from stdin at set-up: no file yet
        return ""


def home() -> str:
    return pwd.getpwuid(os.getuid()).pw_dir


def _own_folder(path: str, mode: int = 0o700) -> int:
    """A folder of this user's, opened (created 0700 when missing); never a link."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, O_DIR)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise PermissionError("%s is a link or not a folder: refused (nothing is written "
                                  "through a link)" % path) from None
        raise
    st = os.fstat(fd)
    if st.st_uid != os.getuid():
        os.close(fd)
        raise PermissionError("%s belongs to another user" % path)
    return fd


def _state_dir() -> int:
    return _own_folder(os.path.join(home(), HOME_DIR))


def _write_file_at(fd: int, name: str, data: bytes, mode: int = 0o600, sync: bool = True) -> None:
    """Replace ``name`` in folder ``fd`` whole (a fresh temporary name, then a rename)."""
    tmp = ".%s.%d.%s" % (name, os.getpid(), os.urandom(4).hex())
    out = os.open(tmp, O_NEW, mode, dir_fd=fd)
    try:
        try:
            _write_all(out, data)
            if sync:
                os.fsync(out)
        finally:
            os.close(out)
        os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
    except BaseException:
        _remove_quietly(fd, tmp.encode())
        raise


def runtime_of(key_id: str) -> str:
    """The runtime part of a key id (``RUNTIME.PURPOSE``)."""
    return key_id.split(".", 1)[0]


def _ok_id(text: str) -> str:
    if not text or len(text) > 80 or any(not (c.isalnum() or c in "-_.") for c in text):
        raise ValueError("a key id is 1-80 letters, digits, '-', '_', '.': %r" % text)
    return text


def _marker(key_id: str) -> str:
    return "colab-remote:" + key_id


class AuthorizedKeys:
    """``~/.ssh/authorized_keys`` of this user, edited under a lock, never through a link."""

    def __init__(self) -> None:
        self.state = _state_dir()
        self.lock = os.open(".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | O_CLOEXEC, 0o600,
                            dir_fd=self.state)
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        self.ssh = _own_folder(os.path.join(home(), ".ssh"))

    def lines(self) -> List[str]:
        try:
            fd = os.open("authorized_keys", O_READ, dir_fd=self.ssh)
        except FileNotFoundError:
            return []
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise PermissionError("~/.ssh/authorized_keys is a link: refused (nothing is "
                                      "written through a link)") from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise PermissionError("~/.ssh/authorized_keys is not a file of this user")
            chunks = []
            while True:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(fd)
        return b"".join(chunks).decode("utf-8", "surrogateescape").splitlines()

    def write(self, lines: List[str]) -> None:
        text = "".join(line + "\n" for line in lines)
        _write_file_at(self.ssh, "authorized_keys", text.encode("utf-8", "surrogateescape"))

    def close(self) -> None:
        os.close(self.ssh)
        fcntl.flock(self.lock, fcntl.LOCK_UN)
        os.close(self.lock)
        os.close(self.state)


def _ours(line: str) -> Optional[str]:
    """The key id a line of ours carries, else None."""
    for word in reversed(line.split()):
        if word.startswith("colab-remote:"):
            return word[len("colab-remote:"):]
    return None


def _expired(line: str, now: float) -> bool:
    at = line.find('expiry-time="')
    if at < 0:
        return False
    spec = line[at + 13:at + 27]
    try:
        return time.mktime(time.strptime(spec, "%Y%m%d%H%M%S")) < now
    except ValueError:
        return False


def revoke(runtime: Optional[str] = None, key_id: Optional[str] = None) -> List[str]:
    """Remove the lines of ``runtime``, or the one of ``key_id``, or every colab-remote line (both
    None), and the mirror configs only they used (and, for every line, our agents too); the key
    ids removed."""
    keys = AuthorizedKeys()
    try:
        kept, gone = [], []
        for line in keys.lines():
            kid = _ours(line)
            if kid is not None and (kid == key_id if key_id is not None else
                                    runtime is None or runtime_of(kid) == runtime):
                gone.append(kid)
            else:
                kept.append(line)
        if gone:
            keys.write(kept)
        _tidy(keys.state, kept, agents=runtime is None and key_id is None)
    finally:
        keys.close()
    return gone


def _print_revoked(gone: List[str]) -> int:
    print("colab-remote-revoked %s" % " ".join(gone))
    return 0


def _tidy(state: int, lines: List[str], *, agents: bool = False) -> None:
    """Remove the mirror configs no key line names (and with ``agents``, every installed agent:
    a mirror without a restricted key runs one directly, so they stay otherwise)."""
    names = {_ours(line) for line in lines}
    if agents:
        for name in os.listdir(state):
            if name.startswith("agent-") and name.endswith(".py"):
                _remove_quietly(state, name.encode())
    cfg = open_folder(state, b"mirrors", False)
    if cfg is None:
        return
    try:
        for name in os.listdir(cfg):
            if name[:-5] not in names:
                _remove_quietly(cfg, name.encode())
    finally:
        os.close(cfg)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resolve_dest(dest: str) -> str:
    """The destination as an absolute real path (made when missing); refused when the mirror could
    write over the account itself (the home folder, ``~/.ssh``, our own folder) from there."""
    if not dest or "\0" in dest or "\n" in dest:
        raise ValueError("the destination must be a folder path")
    if ".." in dest.split("/"):
        raise ValueError("the destination must not contain '..': %r" % dest)
    if dest.startswith("~") and not dest.startswith("~/"):
        raise ValueError("the destination must be a folder of this account: %r" % dest)
    own = os.path.realpath(home())
    path = os.path.join(own, dest[2:] if dest.startswith("~/") else dest)
    os.makedirs(path, 0o700, exist_ok=True)
    real = os.path.realpath(path)
    if real == own or own.startswith(real.rstrip("/") + "/"):
        raise ValueError("the destination %s holds the home folder: pick a folder of its own, "
                         "e.g. ~/backup/project" % real)
    for guarded in (os.path.join(own, ".ssh"), os.path.join(own, HOME_DIR)):
        if real == guarded or real.startswith(guarded + "/"):
            raise ValueError("the destination %s is inside %s" % (real, guarded))
    return real


def _command(words: List[str]) -> str:
    """``words`` as the text of a ``command="..."`` option (the account's shell runs it)."""
    text = " ".join(shlex.quote(w) for w in words)
    if '"' in text or "\\" in text or "\n" in text:
        raise ValueError("a path holds '\"', '\\' or a newline: %r" % text)
    return text


def _key_line(options: List[str], pubkey: str, key_id: str, label: str = "") -> str:
    """One authorized_keys line; its comment names the key (our marker) and, for people reading
    the file, the runtime and the day it was set up."""
    pub = pubkey.split()
    if len(pub) < 2 or not pub[0].startswith(("ssh-", "ecdsa-", "sk-")):
        raise ValueError("not a public key: %r" % pubkey[:40])
    words = [w for w in label.split() if all(c.isalnum() or c in "-_.:=" for c in w)][:4]
    return " ".join([",".join(options), pub[0], pub[1], _marker(key_id), *words])


def setup(request: dict) -> dict:
    """Install this agent and, with ``restricted``, the runtime's restricted keys (run once,
    through the login that may use the password).

    ``request``: ``source`` and ``sha`` (this file), ``restricted``, and ``keys``: a list of
    ``{"id", "purpose": "tunnel", "port", "pubkey", "days"}`` or ``{"id", "purpose": "mirror",
    "dest", "keep_days", "backup", "trash_share", "trash_max_gb", "pubkey", "days"}``. The reply
    says, for each, the port (a free one for port 0), the destination's real path, when the key
    expires, and the command to run the agent directly (without ``restricted``).
    """
    source = request["source"].encode()
    sha = hashlib.sha256(source).hexdigest()
    if sha != request["sha"]:
        raise ValueError("the agent arrived damaged")
    restricted = bool(request.get("restricted", True))
    state = _state_dir()
    name = "agent-%s.py" % sha[:12]
    agent = os.path.join(home(), HOME_DIR, name)
    try:
        try:
            with open(os.open(name, O_READ, dir_fd=state), "rb") as f:
                same = hashlib.sha256(f.read()).hexdigest() == sha
        except OSError:
            same = False
        if not same:
            _write_file_at(state, name, source)
        run = [sys.executable or "python3", "-I", "-B", agent]
        replies, lines, now = [], [], time.time()
        for key in request["keys"]:
            kid = _ok_id(key["id"])
            reply: dict = {"id": kid}
            if key["purpose"] == "tunnel":
                port = int(key["port"]) or _free_port()
                reply["port"] = port
                forced = run + ["--forced", "tunnel", kid, str(port)]
                options = ["restrict", "port-forwarding", 'permitlisten="localhost:%d"' % port,
                           'permitopen="localhost:%d"' % port]
            elif key["purpose"] == "mirror":
                share, max_gb = check_budget(key.get("trash_share", TRASH_SHARE),
                                             key.get("trash_max_gb", TRASH_MAX_GB))
                config = {"root": resolve_dest(key["dest"]),
                          "keep_days": float(key.get("keep_days", 7)),
                          "backup": bool(key.get("backup", True)),
                          "trash_share": share, "trash_max_gb": max_gb}
                reply["dest"] = config["root"]
                reply["command"] = run + ["mirror", "--root", config["root"], "--keep-days",
                                          repr(config["keep_days"]), "--trash-share", repr(share),
                                          "--trash-max-gb", repr(max_gb), "--id", kid] + \
                    ([] if config["backup"] else ["--no-backup"])
                forced = run + ["--forced", "mirror", kid]
                options = ["restrict"]
                if restricted:  # what the key may do is fixed here, on the server
                    cfg = _own_folder(os.path.join(home(), HOME_DIR, "mirrors"))
                    try:
                        _write_file_at(cfg, kid + ".json", json.dumps(config).encode())
                    finally:
                        os.close(cfg)
            else:
                raise ValueError("unknown purpose %r" % key["purpose"])
            if restricted:
                until = now + float(key["days"]) * 86400
                reply["expires"] = until
                options += ['command="%s"' % _command(forced),
                            'expiry-time="%s"' % time.strftime("%Y%m%d%H%M%S", time.localtime(until))]
                lines.append(_key_line(options, key["pubkey"], kid, str(key.get("label", ""))))
            replies.append(reply)
    finally:
        os.close(state)
    if lines:
        keys = AuthorizedKeys()
        try:
            ids = {_ours(line) for line in lines}
            kept = [line for line in keys.lines()  # a re-run replaces; expired lines of ours go
                    if _ours(line) not in ids and not (_ours(line) and _expired(line, now))]
            keys.write(kept + lines)
            _tidy(keys.state, kept + lines)
        finally:
            keys.close()
    return {"ok": True, "python": sys.executable, "home": home(), "agent": agent, "sha": sha,
            "keys": replies, "protocol": VERSION}


# --- entry point --------------------------------------------------------------------------------


def _mirror_config(key_id: str) -> dict:
    with open(os.path.join(home(), HOME_DIR, "mirrors", _ok_id(key_id) + ".json")) as f:
        return dict(json.load(f))


def _direct_mirror(args: List[str]) -> int:
    """``--root PATH --keep-days N [--trash-share S] [--trash-max-gb G] [--id KEY] [--no-backup]``"""
    values = {"--root": "", "--keep-days": "", "--trash-share": repr(TRASH_SHARE),
              "--trash-max-gb": repr(TRASH_MAX_GB), "--id": ""}
    backup, i = True, 0
    while i < len(args):
        if args[i] == "--no-backup":
            backup, i = False, i + 1
        elif args[i] in values and i + 1 < len(args):
            values[args[i]], i = args[i + 1], i + 2
        else:
            return _refuse("unknown mirror option %r" % args[i])
    if not values["--root"] or not values["--keep-days"]:
        return _refuse("mirror needs --root PATH --keep-days N")
    try:
        keep_days = float(values["--keep-days"])
        share, max_gb = check_budget(values["--trash-share"], values["--trash-max-gb"])
        key_id = _ok_id(values["--id"]) if values["--id"] else ""
    except ValueError as e:
        return _refuse(str(e))
    return run_mirror(values["--root"].encode(), keep_days=keep_days, backup=backup, share=share,
                      max_gb=max_gb, key_id=key_id)


def main(argv: List[str]) -> int:
    """``--forced mirror ID`` / ``--forced tunnel ID PORT`` (what restricted keys run: the request
    is in SSH_ORIGINAL_COMMAND); ``mirror --root PATH --keep-days N [...]`` (see
    :func:`_direct_mirror`), ``setup`` (request on stdin) and ``revoke [--all | RUNTIME]`` (run
    directly by the account)."""
    if argv[:1] == ["--forced"]:
        words = (os.environ.get("SSH_ORIGINAL_COMMAND") or "").split()
        args = argv[1:]
        if args[:1] == ["tunnel"] and len(args) == 3 and args[2].isdigit():
            return run_tunnel(_ok_id(args[1]), int(args[2]), words)
        if args[:1] == ["mirror"] and len(args) == 2:
            kid = _ok_id(args[1])
            if words == ["hello"]:
                print("colab-remote-agent %s %s mirror" % (VERSION, own_sha()))
                return 0
            if words == ["revoke"]:
                return _print_revoked(revoke(runtime=runtime_of(kid)))
            if words != ["colab-remote", "agent"]:
                return _refuse("this key only runs the colab-remote mirror agent")
            cfg = _mirror_config(kid)
            return run_mirror(cfg["root"].encode(), keep_days=float(cfg["keep_days"]),
                              backup=bool(cfg.get("backup", True)),
                              share=cfg.get("trash_share", TRASH_SHARE),
                              max_gb=cfg.get("trash_max_gb", TRASH_MAX_GB), key_id=kid)
        return _refuse("unknown request")
    if argv[:1] == ["setup"]:
        try:
            reply = setup(json.loads(sys.stdin.buffer.read().decode()))
        except Exception as e:  # noqa: BLE001 - the client shows it
            reply = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
        sys.stdout.write("CRA-SETUP %s\n" % json.dumps(reply))
        return 0
    if argv[:1] == ["mirror"]:
        return _direct_mirror(argv[1:])
    if argv in (["revoke"], ["revoke", "--all"]):
        return _print_revoked(revoke())
    if argv[:2] == ["revoke", "--runtime"] and len(argv) == 3:
        return _print_revoked(revoke(runtime=_ok_id(argv[2])))
    if argv[:2] == ["revoke", "--id"] and len(argv) == 3:
        return _print_revoked(revoke(key_id=_ok_id(argv[2])))
    return _refuse("unknown request")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
