"""Pure pieces of the mirror: the filter, rsync argv and progress, the no-agent delete script.

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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from watchfiles import BaseFilter, Change

from . import _agent

TRASH = _agent.TRASH.decode()
DEFAULT_EXCLUDES = ("__pycache__", ".ipynb_checkpoints", "*.pyc")
TRASH_KEEP_DAYS = 7
# Our own temporary names on the server (the agent writes there first, then renames).
TMP_INFIX = _agent.TMP_INFIX.decode()
# Files at least this big go to the agent in chunks (or through rsync when there is no agent).
BIG_FILE = 8 * 1024 * 1024


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
    if patterns:
        _check_leaves_something(tuple(patterns))
    return tuple(patterns)


# Names a project is made of: an exclude set that leaves out every one of them leaves out everything.
_PROBES = ("a", "main.py", "README.md", "Z9", ".git", "data", "x-y_z", "日本")


def _check_leaves_something(patterns: tuple[str, ...]) -> None:
    flt = MirrorFilter("/", patterns)
    if any(not flt.excluded(name) for name in _PROBES):
        return
    alone = [p for p in patterns if all(MirrorFilter("/", [p]).excluded(n) for n in _PROBES)]
    culprit = f"{alone[0]!r} matches every name" if alone else "together they match every name"
    raise ValueError(f"exclude={list(patterns)!r} leaves nothing to mirror ({culprit}); exclude "
                     "what you do not want, e.g. '*.ckpt' or 'data/'")


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


def normal_remote_path(path: str) -> str:
    """One spelling for one folder: ``proj``, ``~/proj``, ``proj/``, ``./proj`` and ``proj//``
    are all ``proj`` (relative to the home folder); an absolute path keeps its leading ``/``."""
    rel = remote_path(path)
    words = [w for w in rel.split("/") if w not in ("", ".")]
    return ("/" if rel.startswith("/") else "") + "/".join(words)


def check_remote_path(path: str) -> str:
    """Refuse remote paths a mirror must never write over (``/``, ``~``, ``.``, empty); the path
    in its one spelling (:func:`normal_remote_path`)."""
    normal = normal_remote_path(path)
    if normal in ("", "/") or ".." in normal.split("/"):
        raise ValueError(f"the remote path {path!r} must name a folder, not '/', '~' or '.'")
    if TRASH in normal.split("/"):
        raise ValueError(f"the remote path {path!r} must not be inside {TRASH}")
    if normal.startswith("-"):
        raise ValueError(f"the remote path {path!r} must not start with '-' (tools read it as an "
                         "option); write it as an absolute path")
    return normal


# --- rsync -------------------------------------------------------------------------------------

# -rlpt: recursion, symlinks as symlinks, permissions, times; not owner/group (the server account
# cannot set them, and restored files must belong to the runtime's user). -s (--protect-args,
# --secluded-args since 3.2.4): paths go through rsync's protocol, never through the remote shell,
# which an rsync older than 3.2.4 hands them to unquoted (a '*' or ';' in them expanded there).
RSYNC_BASE = ["-rlpt", "-s"]


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
    # --ignore-missing-args: a listed file deleted here before rsync got to it is not an error
    # (it was "link_stat ... No such file or directory", exit 23; its own event deletes it there)
    return [rsync, "-lptI", "-s", "--from0", "--files-from=-", "--ignore-missing-args", *backup,
            "-e", ssh_command, f"{local_dir.rstrip('/')}/", f"{rsync_dest}/"]


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


# What rsync says about a source file that is gone (deleted here while rsync ran), per file.
_VANISHED = re.compile(r'^(?:file has vanished: "(.*)"'
                       r'|rsync: (?:\[sender\] )?(?:link_stat|readlink_stat|send_files failed to open) '
                       r'"(.*)"(?: failed)?: No such file or directory \(2\))$')
_RSYNC_ERROR_23 = re.compile(r"^rsync error: some files/attrs were not transferred .*\(code 2[34]\)")
_RSYNC_WARNING_24 = re.compile(r"^rsync warning: some files vanished before they could be transferred")


def rsync_exit_ok(code: int, output: str = "") -> bool:
    """0; 24 (a file vanished while it was sent: a warning, its own event says what became of it);
    or 23 when every error rsync printed is about a source file that no longer exists here."""
    if code in (0, 24):
        return True
    return code == 23 and bool(output) and only_vanished(output)


def only_vanished(output: str, exists: Callable[[str], bool] = os.path.lexists) -> bool:
    """True when rsync's messages in ``output`` are all about source files that are gone (and
    ``exists`` agrees: none of them is there now), so its exit 23 names no real failure."""
    gone = 0
    for raw in output.replace("\r", "\n").splitlines():
        line = raw.strip()
        if not line.startswith(("rsync", "file has vanished")):
            continue  # progress records, statistics
        found = _VANISHED.match(line)
        if found is not None:
            path = found.group(1) if found.group(1) is not None else found.group(2)
            if exists(path):
                return False
            gone += 1
        elif not (_RSYNC_ERROR_23.match(line) or _RSYNC_WARNING_24.match(line)):
            return False
    return gone > 0


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
