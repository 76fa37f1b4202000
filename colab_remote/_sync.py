"""Pure pieces of the mirror: the filter, rsync/ssh argv, and the server-side agent's source.

Nothing here starts a process or touches the network (tested with plain asserts). One
:class:`MirrorFilter` decides what is mirrored for watchfiles, for the listing of new folders and
for rsync (``rsync_filter_args``), so the three can never disagree.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shlex
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from watchfiles import BaseFilter, Change

TRASH = ".colab-remote-trash"
DEFAULT_EXCLUDES = ("__pycache__", ".ipynb_checkpoints", "*.pyc")
TRASH_KEEP_DAYS = 7
# Our own temporary names on the server (the agent writes there first, then renames).
TMP_INFIX = ".colab-remote-tmp."
# Files at least this big go through rsync (delta transfer, streamed) instead of the agent.
BIG_FILE = 8 * 1024 * 1024

# One record of the agent protocol: op, path length, mode, mtime (ns), payload size; then the path
# and the payload. "E" ends a batch (the agent answers one line), "C" asks for a file count.
RECORD = struct.Struct(">cIIqQ")
OP_PUT, OP_MKDIR, OP_LINK, OP_DELETE, OP_END, OP_COUNT, OP_PRUNE = (
    b"P", b"D", b"L", b"X", b"E", b"C", b"T")


def check_excludes(exclude: object) -> tuple[str, ...]:
    """``exclude=`` as a tuple of glob patterns (``"*.log"``, ``"data/"``, ``"/build"``)."""
    if exclude is None:
        return ()
    if isinstance(exclude, str):
        exclude = [exclude]
    if not isinstance(exclude, (list, tuple, set, frozenset)):
        raise TypeError(f"exclude must be a glob pattern or a list of them, got {exclude!r}")
    patterns = []
    for p in exclude:
        if not isinstance(p, str) or not p.strip("/") or "\n" in p or "\0" in p:
            raise ValueError(f"exclude pattern {p!r} must be a non-empty glob such as '*.log' or 'data/'")
        patterns.append(p)
    return tuple(patterns)


class MirrorFilter(BaseFilter):
    """What is NOT mirrored: the defaults, the trash, our temporary names, and ``exclude`` patterns.

    A pattern without ``/`` matches a file or folder name anywhere (rsync's rule); one with a
    leading ``/`` or an inner ``/`` matches the path from the top of the mirrored folder. ``.git`` is
    mirrored on purpose.

    >>> f = MirrorFilter("/p", ["*.log"])
    >>> f.excluded("a/x.log"), f.excluded(".git/HEAD"), f.excluded("src/__pycache__/m.pyc")
    (True, False, True)
    """

    __slots__ = ("root", "patterns", "_names", "_anchored", "_folders")

    def __init__(self, root: str | os.PathLike[str], exclude: Iterable[str] = ()) -> None:
        super().__init__()
        self.root = os.path.abspath(root)
        self.patterns = (*DEFAULT_EXCLUDES, *exclude)
        names, anchored = [], []
        for p in (*self.patterns, TRASH, f"*{TMP_INFIX}*"):
            bare = p.rstrip("/")
            if "/" in bare:
                anchored.append(fnmatch.translate(bare.lstrip("/")))
            else:
                names.append(fnmatch.translate(bare))
        # one alternation per kind: a path costs one match per part, not one per part and pattern
        self._names = re.compile("|".join(f"(?:{r})" for r in names)).match
        self._anchored = re.compile("|".join(f"(?:{r})" for r in anchored)).match if anchored else None
        self._folders: dict[str, bool] = {}  # folder -> excluded (a burst asks for each file)

    def excluded(self, rel: str) -> bool:
        """True when ``rel`` (a path relative to the root, '/'-separated) is not mirrored."""
        folder, _, name = rel.rpartition("/")
        if self._names(name) or self._anchored is not None and self._anchored(rel):
            return True
        if not folder:
            return False
        hit = self._folders.get(folder)
        if hit is None:
            hit = self.excluded(folder)
            if len(self._folders) >= 4096:
                self._folders.clear()
            self._folders[folder] = hit
        return hit

    def relative(self, path: str) -> str | None:
        """``path`` relative to the root, or None when it is the root or outside it."""
        if not path.startswith(self.root + os.sep):
            return None
        return path[len(self.root) + 1:]

    def __call__(self, change: Change, path: str) -> bool:
        rel = self.relative(path)
        return rel is not None and not self.excluded(rel)

    def rsync_args(self) -> list[str]:
        """The same rules as rsync ``--exclude`` options (the trash is always left out)."""
        args = [f"--exclude=/{TRASH}/", f"--exclude=*{TMP_INFIX}*"]
        for p in self.patterns:
            if "/" in p.rstrip("/") and not p.startswith("/"):
                p = "/" + p  # rsync anchors a pattern with an inner '/' too; say so explicitly
            args.append(f"--exclude={p}")
        return args

    def __repr__(self) -> str:
        return f"MirrorFilter({self.root!r}, {list(self.patterns)!r})"


def mirror_id(local_dir: str, destination: str, port: int) -> str:
    """A short stable name for one (folder, destination, port) mirror in the state folder."""
    return hashlib.sha256(f"{local_dir}\0{destination}\0{port}".encode()).hexdigest()[:12]


def remote_path(path: str) -> str:
    """The remote path as both rsync and the agent take it: ``~/x`` becomes ``x`` (home-relative)."""
    if path == "~":
        raise ValueError("the remote path must not be the home folder itself; use e.g. ~/backup/project")
    return path[2:] if path.startswith("~/") else path


def check_remote_path(path: str) -> str:
    """Refuse remote paths a mirror must never write over (``/``, ``~``, ``.``, empty)."""
    stripped = remote_path(path).rstrip("/")
    if stripped in ("", ".", "..", "/") or not path.strip("/"):
        raise ValueError(f"the remote path {path!r} must name a folder, not '/', '~' or '.'")
    if TRASH in stripped.split("/"):
        raise ValueError(f"the remote path {path!r} must not be inside {TRASH}")
    return stripped


# --- rsync -------------------------------------------------------------------------------------

# -rlpt: recursion, symlinks as symlinks, permissions, times; not owner/group (the server account
# cannot set them, and restored files must belong to the runtime's user).
RSYNC_BASE = ["-rlpt"]


# One progress line for the whole transfer on stdout (a bar's worth). A push keeps rsync's
# incremental recursion (without it rsync 3.x spent twice the CPU on a first push of 20,000
# files): its totals grow as it lists, so the caller counts the tree itself (see
# RsyncProgress.done). A pull lists everything first (no slower there): to-chk=N/TOTAL is exact.
PROGRESS_ARGS = ["--info=progress2"]
PULL_PROGRESS_ARGS = ["--info=progress2", "--no-inc-recursive"]


def rsync_push_argv(rsync: str, ssh_command: str, local_dir: str, rsync_dest: str, *,
                    filters: Sequence[str], backup_dir: str | None,
                    progress: bool = False) -> list[str]:
    """A whole-tree pass: new and changed files up, overwritten ones into the trash; NO --delete.

    Files that exist only on the server are never touched by a whole-tree pass. ``progress``
    adds rsync's whole-transfer progress lines on stdout (see :func:`rsync_progress`).
    """
    backup = ["--backup", f"--backup-dir={backup_dir}"] if backup_dir else []
    shown = PROGRESS_ARGS if progress else []
    return [rsync, *RSYNC_BASE, *backup, *shown, *filters, "-e", ssh_command,
            f"{local_dir.rstrip('/')}/", f"{rsync_dest}/"]


def rsync_files_argv(rsync: str, ssh_command: str, local_dir: str, rsync_dest: str, *,
                     backup_dir: str | None) -> list[str]:
    """Push the NUL-separated list of files on stdin, content compared (``-I``), not size+time.

    ``-I`` is what sends a file rewritten with the same size within the same second.
    """
    backup = ["--backup", f"--backup-dir={backup_dir}"] if backup_dir else []
    return [rsync, "-lptI", "--from0", "--files-from=-", *backup, "-e", ssh_command,
            f"{local_dir.rstrip('/')}/", f"{rsync_dest}/"]


def rsync_pull_argv(rsync: str, ssh_command: str, rsync_dest: str, local_dir: str, *,
                    filters: Sequence[str], progress: bool = False) -> list[str]:
    """restore: the server copy into the runtime; never deletes, keeps newer runtime files."""
    shown = PULL_PROGRESS_ARGS if progress else []
    return [rsync, *RSYNC_BASE, "--update", *shown, *filters, "-e", ssh_command, f"{rsync_dest}/",
            f"{local_dir.rstrip('/')}/"]


# rsync --info=progress2: "\r     30,002,000  83%  539.26MB/s    0:00:00 (xfr#2, to-chk=2999/3003)".
# The thousands separator and the decimal mark follow the locale; "ir-chk" (incremental
# recursion) means the total is still growing; with -h the size reads "105.45M".
_PROGRESS = re.compile(r"^\s*(\d[\d,.' ]*?)([kKMGTP]?)\s+(\d{1,3})%\s+(\S+)\s+(-?\d+:\d\d:\d\d)"
                       r"(?:\s+\(xfr#(\d+), (ir|to)-chk=(\d+)/(\d+)\))?\s*$")


@dataclass(frozen=True)
class RsyncProgress:
    """One progress record of rsync ``--info=progress2``.

    ``percent`` is rsync's own (bytes sent so far of the size of EVERY listed file, so it stays
    low when most files are already there); ``checked``/``total`` count the listed files done.
    """

    bytes: int
    percent: int
    rate: str
    files: int | None = None     # files transferred so far (xfr#)
    checked: int | None = None   # listed files done (sent or found up to date)
    total: int | None = None     # listed files; None while rsync still lists (ir-chk)

    @property
    def fraction(self) -> float:
        """How much of the work is done, 0..1, from rsync's own numbers (see :meth:`done`)."""
        return self.done()

    def done(self, entries: int | None = None, size: int | None = None) -> float:
        """How much of the work is done, 0..1: the further of bytes and listed files checked.

        While rsync still lists (``ir-chk``) its totals only cover what it listed so far (its
        percent reads 90 % from the start), so they are not used: ``entries`` (files, folders and
        links, the top folder included, as rsync lists them) and ``size`` (bytes), counted by
        the caller, are; without them the answer is 0 until the list is complete.
        """
        if self.total is not None:  # the whole list is known
            if self.checked is not None and self.checked >= self.total:
                return 1.0
            done = self.percent / 100
            if self.total and self.checked is not None:
                done = max(done, self.checked / self.total)
            return min(done, 1.0)
        done = 0.0
        if size:
            done = self.bytes / size
        if entries and self.checked is not None:
            done = max(done, self.checked / entries)
        return min(done, 0.99)  # not complete before rsync says so


def rsync_progress(output: str) -> tuple[RsyncProgress | None, str]:
    """The latest complete progress record in rsync ``--info=progress2`` output, and the rest.

    Records end with ``\\r`` (the next one) or ``\\n`` (the last); the unfinished text after the last
    end is returned so a reader can prepend it to the next chunk.

    >>> p, rest = rsync_progress("\\r  1,000  50%  1.00MB/s  0:00:01 (xfr#1, to-chk=1/2)\\r  2,0")
    >>> p.bytes, p.percent, p.checked, p.total, rest
    (1000, 50, 1, 2, '  2,0')
    """
    parts = re.split(r"[\r\n]", output)
    rest = parts.pop()
    for part in reversed(parts):
        m = _PROGRESS.match(part)
        if m is None:
            continue
        nbytes, unit, pct, rate, _, xfr, kind, to_chk, total = m.groups()
        if unit:  # -h: "105.45M"; the last '.' or ',' is the decimal mark (it follows the locale)
            num = re.sub(r"[^\d.,]", "", nbytes)
            i = max(num.rfind("."), num.rfind(","))
            value = float(f"{re.sub(r'[^0-9]', '', num[:i])}.{num[i + 1:]}") if i >= 0 else float(num)
            size = int(value * 1000 ** ("kMGTP".index(unit.replace("K", "k")) + 1))
        else:
            size = int(re.sub(r"\D", "", nbytes))
        progress = RsyncProgress(size, int(pct), rate)
        if xfr is not None:
            n, left = int(total), int(to_chk)
            progress = replace(progress, files=int(xfr), checked=n - left,
                               total=n if kind == "to" else None)
        return progress, rest
    return None, rest


class RsyncProgressReader:
    """Feed rsync's stdout as it comes; :meth:`feed` returns the newest record, if a new one ended."""

    __slots__ = ("_rest", "last")

    def __init__(self) -> None:
        self._rest = ""
        self.last: RsyncProgress | None = None

    def feed(self, chunk: bytes) -> RsyncProgress | None:
        # latin-1 maps every byte to one character: a chunk cut anywhere decodes the same
        found, rest = rsync_progress(self._rest + chunk.decode("latin-1"))
        self._rest = rest[-4096:]
        if found is not None:
            self.last = found
        return found


def describe_progress(p: RsyncProgress, entries: int | None = None) -> str:
    """Short text for a progress bar's tail: ``30.0 MB, 1,200/3,003 files, 12.34MB/s``.

    ``entries``: the caller's count, shown while rsync's own total is still growing.
    """
    size = float(p.bytes)
    unit = "B"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            break
        size /= 1000
    parts = [f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"]
    total = p.total if p.total is not None else entries
    if p.checked is not None and total is not None:
        parts.append(f"{min(p.checked, total):,}/{total:,} files")
    elif p.files is not None:
        parts.append(f"{p.files:,} files")
    parts.append(p.rate)
    return ", ".join(parts)


_BLOCKED = re.compile(r"could not make way for new (?:regular file|symlink|special file): (.+)$",
                      re.MULTILINE)


def blocked_paths(output: str) -> list[str]:
    """Paths rsync could not write because a server folder was in the way (exit 23).

    >>> blocked_paths("could not make way for new regular file: a/b\\nrsync error: ...")
    ['a/b']
    """
    return _BLOCKED.findall(output)


def rsync_exit_ok(code: int) -> bool:
    """0, or 24 (a file vanished while it was sent: a warning, the next event sends it again)."""
    return code in (0, 24)


# --- ssh -----------------------------------------------------------------------------------------


def remote_delete_script(paths: Sequence[str], stamp: str, *, backup: bool) -> str:
    """POSIX sh that moves each path into the trash (or removes it), for servers without python3."""
    lines = ["set -u"]
    for rel in paths:
        q = shlex.quote(rel)
        if backup:
            target = shlex.quote(f"{TRASH}/{stamp}/{rel}")
            parent = shlex.quote(os.path.dirname(f"{TRASH}/{stamp}/{rel}"))
            lines.append(f"if [ -e {q} ] || [ -L {q} ]; then mkdir -p -- {parent} && "
                         f"mv -f -- {q} {target}; fi")
        else:
            lines.append(f"rm -rf -- {q}")
    return "\n".join(lines) + "\n"


def agent_command(dest: str, *, backup: bool, keep_days: float) -> tuple[str, bytes]:
    """The remote command that starts the agent, and the source to send on its stdin first.

    The command is short and fixed (the account's shell runs it once per connection); the agent's
    code then arrives on stdin, so nothing about it depends on the remote shell's quoting.
    """
    config = {"dest": remote_path(dest), "backup": backup, "keep_days": keep_days,
              "trash": TRASH, "tmp": TMP_INFIX}
    source = (f"CFG = {config!r}\n" + AGENT_SOURCE).encode()
    boot = f"import sys;exec(sys.stdin.buffer.read({len(source)}))"
    command = ("if command -v python3 >/dev/null 2>&1; then exec python3 -u -c "
               f"{shlex.quote(boot)}; fi; echo CRA-NOPYTHON; exit 97")
    return command, source


def pack(op: bytes, path: bytes = b"", *, mode: int = 0, mtime_ns: int = 0, data: bytes = b"") -> bytes:
    """One agent record."""
    return RECORD.pack(op, len(path), mode, mtime_ns, len(data)) + path + data


# The server side. Python 3.6+ only, standard library only; bytes paths throughout (any name).
AGENT_SOURCE = r'''
import calendar, json, os, shutil, stat, struct, sys, time
REC = struct.Struct(">cIIqQ")
inp, out = sys.stdin.buffer, sys.stdout.buffer
TRASH = CFG["trash"].encode()
TMP = CFG["tmp"].encode()
known = set()
stamp = [None]
UTIME_FD = os.utime in os.supports_fd
WRITE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
# A folder that is new on the server is built whole under STAGE and renamed into place at the end
# of its batch: its files need no temporary name, rename or look-up each, and are never visible
# half-written. STAGE is inside the trash (excluded everywhere, pruned by age if ever left over).
STAGE = os.path.join(TRASH, b".staging", b"%d" % os.getpid())
fresh = {}    # folder (real path) new in this batch -> where it is built
staged = []   # (where it is built, real path) for the top folders, in order
later = []    # (real path, mode) for new folders whose mode lacks owner rwx, set once in place
use_stage = [None]

def trash_dir():
    if stamp[0] is None:
        t = time.time()
        stamp[0] = (time.strftime("%Y-%m-%dT%H-%M-%S", time.gmtime(t)) + ".%06dZ" % int(t % 1 * 1e6)).encode()
    return os.path.join(TRASH, stamp[0])

def lst(p):
    try:
        return os.lstat(p)
    except (FileNotFoundError, NotADirectoryError):
        return None

def trash_target(p):
    d = os.path.join(trash_dir(), p)
    os.makedirs(os.path.dirname(d), exist_ok=True)
    n, t = 1, d
    while lst(t) is not None:
        t = d + b".%d" % n
        n += 1
    return t

def remove(p, st):
    known.clear()
    if CFG["backup"]:
        os.rename(p, trash_target(p))
    elif stat.S_ISDIR(st.st_mode):
        shutil.rmtree(p)
    else:
        os.unlink(p)

def keep_old(p, st):
    if not CFG["backup"]:
        return
    t = trash_target(p)
    try:
        os.link(p, t, follow_symlinks=False)
    except OSError:
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(p), t)
        else:
            shutil.copy2(p, t)

def check(p):
    parts = p.split(b"/")
    if not p or p.startswith(b"/") or b".." in parts or b"" in parts or parts[0] == TRASH:
        raise ValueError("refused path %r" % p)

def parent(p):
    d = p.rpartition(b"/")[0]
    if not d or d in known:
        return
    cur = b""
    for part in d.split(b"/"):
        cur = os.path.join(cur, part) if cur else part
        if cur in known:
            continue
        st = lst(cur)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            remove(cur, st)
            st = None
        if st is None:
            try:
                os.mkdir(cur)
            except FileExistsError:  # made meanwhile
                if not os.path.isdir(cur) or os.path.islink(cur):
                    raise
        known.add(cur)

TMP_END = TMP + b"%d" % os.getpid()

def tmpname(p):
    d, s, b = p.rpartition(b"/")
    return d + s + b"." + b[:180] + TMP_END

def gone(t):
    st = lst(t)
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(t)
        else:
            os.unlink(t)

def write(t, mode, mtime, data, dir_fd=None):
    # umask is 0 here: the file gets its mode at creation, one system call less per file
    try:
        fd = os.open(t, WRITE, mode, dir_fd=dir_fd)
    except OSError:
        if dir_fd is not None:
            t = os.path.join(built_at[0], t)
        gone(t)  # a link or folder left there: only ever one of our own temporary names
        fd = os.open(t, WRITE, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.utime(fd if UTIME_FD else t, ns=(mtime, mtime))  # on fd: no second path look-up
    finally:
        os.close(fd)

built_at = [None, -1]  # the last new folder written into, and its descriptor

def folder_fd(t):
    """A descriptor of folder t (each file's open then resolves one name, not a path)."""
    if built_at[0] != t:
        close_built()
        built_at[1] = os.open(t, os.O_RDONLY | os.O_DIRECTORY)
        built_at[0] = t
    return built_at[1]

def close_built():
    if built_at[1] >= 0:
        os.close(built_at[1])
    built_at[:] = [None, -1]

def built(d):
    """Where folder d is being built when it (or a folder above it) is new in this batch."""
    t = fresh.get(d)
    if t is not None or not d:
        return t
    up, _, name = d.rpartition(b"/")
    t = built(up)
    if t is None:
        return None
    t = t + b"/" + name
    gone(t)
    os.mkdir(t, 0o755)  # a folder the batch did not list: the next whole-tree pass sets its mode
    fresh[d] = t
    return t

def put(p, mode, mtime, data):
    d, _, name = p.rpartition(b"/")
    b = built(d) if fresh else None
    if b is not None:
        write(name, mode, mtime, data, folder_fd(b))
        return
    parent(p)
    st = lst(p)
    if st is not None and stat.S_ISDIR(st.st_mode):
        remove(p, st)
        st = None
    if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == len(data):
        with open(p, "rb") as f:
            same = f.read() == data
        if same:
            if stat.S_IMODE(st.st_mode) != mode:
                os.chmod(p, mode)
            if st.st_mtime_ns != mtime:
                os.utime(p, ns=(mtime, mtime))
            return
    t = tmpname(p)
    write(t, mode, mtime, data)
    if st is not None:
        keep_old(p, st)
    os.rename(t, p)

def staging():
    if use_stage[0] is None:
        try:
            gone(STAGE)  # a folder of an earlier agent with the same pid
            os.makedirs(STAGE)
            use_stage[0] = os.stat(STAGE).st_dev == os.stat(b".").st_dev  # rename: one file system
        except OSError:
            use_stage[0] = False  # new folders are then made in place, as any other
    return use_stage[0]

def mkdir(p, mode):
    if p in fresh:
        return
    d, _, name = p.rpartition(b"/")
    b = built(d) if fresh else None
    if b is not None:
        t = b + b"/" + name
        gone(t)
    else:
        parent(p)
        st = lst(p)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            remove(p, st)
            st = None
        if st is not None or not staging():
            if st is None:
                os.mkdir(p)
            if st is None or stat.S_IMODE(st.st_mode) != mode:
                os.chmod(p, mode)
            known.add(p)
            return
        t = os.path.join(STAGE, b"%d" % len(staged))
        staged.append((t, p))
    first = (mode & 0o777) | 0o700  # we write into it first
    os.mkdir(t, first)
    if first != mode:
        later.append((p, mode))
    fresh[p] = t

def settle(t, p):
    """Put folder t (built in the stage) at p; merge when p appeared meanwhile."""
    st = lst(p)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        remove(p, st)
        st = None
    if st is None:
        parent(p)
        os.rename(t, p)
        return
    for n in os.listdir(t):
        a, b = os.path.join(t, n), os.path.join(p, n)
        if stat.S_ISDIR(os.lstat(a).st_mode):
            settle(a, b)
            continue
        sb = lst(b)
        if sb is not None:
            if stat.S_ISDIR(sb.st_mode):
                remove(b, sb)
            else:
                keep_old(b, sb)
        os.rename(a, b)
    os.rmdir(t)

def finish(errors):
    """The batch's new folders into place (the mirror hears of the batch only after this)."""
    close_built()
    for t, p in staged:
        try:
            settle(t, p)
        except Exception as e:
            known.clear()
            errors.append([p.decode("utf-8", "replace"), "%s: %s" % (type(e).__name__, e)])
    ok = not errors
    for p, mode in reversed(later):
        try:
            os.chmod(p, mode)
        except OSError:
            pass
    if ok:
        known.update(fresh)
    fresh.clear()
    del staged[:], later[:]

def link(p, target):
    d, _, name = p.rpartition(b"/")
    b = built(d) if fresh else None
    if b is not None:
        t = b + b"/" + name
        gone(t)
        os.symlink(target, t)
        return
    parent(p)
    st = lst(p)
    if st is not None and stat.S_ISLNK(st.st_mode) and os.readlink(p) == target:
        return
    if st is not None and stat.S_ISDIR(st.st_mode):
        remove(p, st)
        st = None
    t = tmpname(p)
    if lst(t) is not None:
        os.unlink(t)
    os.symlink(target, t)
    if st is not None:
        keep_old(p, st)
    os.rename(t, p)

def delete(p):
    d, _, name = p.rpartition(b"/")
    b = built(d) if fresh else None
    if b is not None or p in fresh:  # new in this batch: never on the server, nothing to keep
        gone(fresh.get(p) or b + b"/" + name)
        for k in [k for k in fresh if k == p or k.startswith(p + b"/")]:
            del fresh[k]
        staged[:] = [x for x in staged if x[1] != p]
        return
    st = lst(p)
    if st is not None:
        remove(p, st)

def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True

def left_by_dead(name):
    """True for a temporary name or staging folder of an agent that is gone (killed mid-write)."""
    pid = name.rpartition(TMP)[2] if TMP in name else name
    return pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid))

def count():
    """Files in the copy (the trash and temporary names not counted); what dead agents left
    half-written on the way is removed."""
    n = 0
    for d, dirs, files in os.walk(b"."):
        if d == b".":
            dirs[:] = [x for x in dirs if x != TRASH]
        for f in files:
            if TMP in f:
                if left_by_dead(f):
                    try:
                        os.unlink(os.path.join(d, f))
                    except OSError:
                        pass
                continue
            n += 1
        n += sum(1 for x in dirs if os.path.islink(os.path.join(d, x)))
    top = os.path.dirname(STAGE)
    try:
        for m in os.listdir(top):
            if left_by_dead(m):
                shutil.rmtree(os.path.join(top, m), ignore_errors=True)
    except OSError:
        pass
    return n

def prune(days):
    cut = time.time() - days * 86400
    try:
        names = os.listdir(TRASH)
    except FileNotFoundError:
        return
    for n in names:
        p = os.path.join(TRASH, n)
        if n == b".staging":  # folders left by agents that died mid-batch (never this one's)
            try:
                for m in os.listdir(p):
                    q = os.path.join(p, m)
                    if q != STAGE and os.lstat(q).st_mtime < cut:
                        shutil.rmtree(q, ignore_errors=True)
            except OSError:
                pass
            continue
        try:
            old = calendar.timegm(time.strptime(n[:19].decode(), "%Y-%m-%dT%H-%M-%S")) < cut
        except ValueError:
            old = os.lstat(p).st_mtime < cut
        if old:
            shutil.rmtree(p, ignore_errors=True)

def main():
    try:  # 1 MiB pipe from sshd: fewer wake-ups per batch (Linux; fine without)
        import fcntl
        fcntl.fcntl(0, 1031, 1 << 20)  # F_SETPIPE_SZ
    except Exception:
        pass
    root = os.path.expanduser(CFG["dest"])
    os.makedirs(root, exist_ok=True)
    os.chdir(root)
    os.umask(0)
    out.write(("CRA1 %s\n" % (shutil.which("rsync") or "-")).encode())
    out.flush()
    errors, n = [], 0
    while True:
        h = inp.read(REC.size)
        if len(h) < REC.size:
            break
        op, plen, mode, mtime, size = REC.unpack(h)
        p = inp.read(plen)
        data = inp.read(size) if size else b""
        if len(p) < plen or len(data) < size:
            break  # the channel broke mid-record: that record is not applied
        if op == b"E":
            finish(errors)
            out.write(("A %d %s\n" % (n, json.dumps(errors[:20]))).encode())
            out.flush()
            errors, n, stamp[0] = [], 0, None
            continue
        if op == b"C":
            finish(errors)
            out.write(("C %d\n" % count()).encode())
            out.flush()
            continue
        n += 1
        try:
            if op == b"T":
                prune(mtime / 86400e9)
                continue
            check(p)
            if op == b"P":
                put(p, mode & 0o7777, mtime, data)
            elif op == b"D":
                mkdir(p, mode)
            elif op == b"L":
                link(p, data)
            elif op == b"X":
                delete(p)
        except Exception as e:
            known.clear()
            errors.append([p.decode("utf-8", "replace"), "%s: %s" % (type(e).__name__, e)])
    finish(errors)  # the new folders of a cut batch hold whole files only: keep them
    for d in (STAGE, os.path.dirname(STAGE), TRASH):  # each only when empty
        try:
            os.rmdir(d)
        except OSError:
            break

main()
'''
