"""A seeded fault soak of mirror(): random work in the runtime, faults, and quiet checkpoints.

Run as root (a throwaway user, an sshd of our own on 127.0.0.1, a small tmpfs as the server's
disk; all removed at the end):

    .venv/bin/python bench/soak_mirror.py                      # 3 minutes, seed 1
    .venv/bin/python bench/soak_mirror.py --minutes 20 --seed 7 --fault-seconds 20
    .venv/bin/python bench/soak_mirror.py --faults disk-full,sshd-down --minutes 2

The runtime folder (on /dev/shm) gets random operations: creates, overwrites, same-size
rewrites, renames of files and folders, file <-> folder swaps, symlinks, chmods, commits in a git
repository, bursts of 200-600 files, a folder made and deleted within one batch, names with
newlines, tabs, spaces, a leading dash and non-ASCII letters. Between stretches of work come
faults (round robin in a seeded order, the work going on during each):

  worker-kill   the mirror process gets SIGKILL; the user re-runs mirror()
  caller-kill   a process calling mirror() (or flush()) is killed mid-call; the user re-runs it
  ssh-kill      the mirror's ssh connection (its ControlMaster) gets SIGKILL
  ssh-stop      ... gets SIGSTOP for N s, then SIGCONT
  sshd-restart  the server's sshd (listener and sessions) killed and started again at once
  sshd-down     ... and started again N s later
  disk-full     the server's disk (a tmpfs holding the destination) filled for N s
  read-only     server folders and files of the copy made read-only for N s

After every fault and every stretch of work, a quiet checkpoint: no more work, ``flush()``,
then the checks: the server copy equals the runtime folder (content, symlinks, modes: which
paths are missing, stale or ghosts), every version the runtime held at an earlier checkpoint is
in the copy or its trash (a log of digests), nothing outside the destination changed, no
temporary files are left in the copy, and, every few checkpoints, a restore into a fresh folder
(``mirror(restore=True)``) matches the server and its git repository passes ``git fsck``. When
the copy is not equal right away, the checkpoint waits (up to ``--converge`` s) and records how
long it took: the time to converge after each kind of fault. ``flush()`` returning while the
copy differs is recorded as a lie.

The report at the end: operations by kind, faults by kind, time to converge per kind, every
checkpoint failure with the paths, and which of issue 13's findings this run reproduced.

Only the public API is used (``mirror``, ``find_mirrors``, the handle's ``flush``, ``stop``,
``stats``, ``pid``, ``logs``, ``state``); the ssh processes are found by pid and command line.
For a test: :func:`soak` runs a short version and returns a :class:`SoakReport` (``.ok``).
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as C  # noqa: E402
from colab_remote import Mirror, MirrorError, find_mirrors, mirror  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRASH = ".colab-remote-trash"
TMP_INFIX = ".colab-remote-tmp."
FAULTS = ("worker-kill", "caller-kill", "ssh-kill", "ssh-stop", "sshd-restart", "sshd-down",
          "disk-full", "read-only")
# The server copy never holds group/world-writable, setuid or setgid modes (the agent's MODE_MASK):
# a file chmod'ed 664 here is 644 there.
SERVER_MODES = 0o755
LIVE_S = 5.0          # a version that stood this long, outside faults, must reach the server
STUCK_S = 15.0        # a checkpoint stops waiting when nothing changed (nothing pending) this long
MAX_FILES = 4000      # beyond this many files, the work deletes more than it creates
GIT_ENV = {"GIT_AUTHOR_NAME": "soak", "GIT_AUTHOR_EMAIL": "soak@example.invalid",
           "GIT_COMMITTER_NAME": "soak", "GIT_COMMITTER_EMAIL": "soak@example.invalid"}


def log_line(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)


# --- trees and their comparison ------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    kind: str           # "f" file, "d" folder, "l" symlink, "o" other
    mode: int           # permission bits
    digest: str = ""    # files: sha256
    target: str = ""    # symlinks


class Digests:
    """sha256 of files, cached by (device, inode, size, mtime, ctime): a checkpoint rereads only
    what changed since the last one."""

    def __init__(self) -> None:
        self.cache: dict[tuple[int, int, int, int, int], str] = {}

    def of(self, path: str, st: os.stat_result) -> str:
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        found = self.cache.get(key)
        if found is None:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            found = self.cache[key] = h.hexdigest()
        return found


def snapshot(root: Path, digests: Digests, *, skip_top: tuple[str, ...] = (TRASH,)
             ) -> dict[str, Entry]:
    """Every entry under ``root`` by relative path (files, folders, links), without following
    links; ``skip_top``: names at the top not to descend into."""
    out: dict[str, Entry] = {}

    def walk(folder: str, rel: str) -> None:
        try:
            names = os.listdir(folder)
        except OSError:
            return
        for name in names:
            if not rel and name in skip_top:
                continue
            path = os.path.join(folder, name)
            r = f"{rel}/{name}" if rel else name
            try:
                st = os.lstat(path)
            except OSError:
                continue
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                with contextlib.suppress(OSError):
                    out[r] = Entry("l", 0, target=os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[r] = Entry("d", mode)
                walk(path, r)
            elif stat.S_ISREG(st.st_mode):
                try:
                    out[r] = Entry("f", mode, digest=digests.of(path, st))
                except OSError:
                    continue
            else:
                out[r] = Entry("o", mode)

    walk(str(root), "")
    return out


@dataclass
class Diff:
    missing: list[str] = field(default_factory=list)    # here, not on the server
    stale: list[str] = field(default_factory=list)      # both, different content/type/target
    ghost: list[str] = field(default_factory=list)      # on the server only
    mode: list[str] = field(default_factory=list)       # both, same content, other permissions
    temp: list[str] = field(default_factory=list)       # our temporary names in the live copy

    @property
    def clean(self) -> bool:
        return not (self.missing or self.stale or self.ghost or self.mode or self.temp)

    def count(self) -> int:
        return len(self.missing) + len(self.stale) + len(self.ghost) + len(self.mode) + len(self.temp)

    def describe(self, limit: int = 8) -> str:
        parts = []
        for name in ("missing", "stale", "ghost", "mode", "temp"):
            paths: list[str] = getattr(self, name)
            if paths:
                shown = ", ".join(repr(p) for p in sorted(paths)[:limit])
                more = f" (+{len(paths) - limit} more)" if len(paths) > limit else ""
                parts.append(f"{len(paths)} {name}: {shown}{more}")
        return "; ".join(parts) or "equal"


def compare(local: dict[str, Entry], server: dict[str, Entry]) -> Diff:
    d = Diff()
    for rel, e in local.items():
        s = server.get(rel)
        if s is None:
            d.missing.append(rel)
        elif (s.kind, s.digest, s.target) != (e.kind, e.digest, e.target):
            d.stale.append(rel)
        elif s.kind != "l" and s.mode != e.mode & SERVER_MODES:
            d.mode.append(rel)
    for rel in server:
        if rel not in local:
            (d.temp if TMP_INFIX in rel.rsplit("/", 1)[-1] else d.ghost).append(rel)
    return d


def all_digests(root: Path, digests: Digests) -> set[str]:
    """The digest of every regular file under ``root`` (the trash included)."""
    found = set()
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode):
                    found.add(digests.of(path, st))
    return found


def rel_paths(root: Path) -> set[str]:
    """Every path under ``root``, relative (links not followed)."""
    out = set()
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        for name in dirs + files:
            out.add(name if rel == "." else f"{rel}/{name}")
    return out


def du(root: Path) -> tuple[int, int]:
    """(bytes, entries) under ``root``."""
    size = n = 0
    for folder, dirs, files in os.walk(root):
        for name in files + dirs:
            with contextlib.suppress(OSError):
                size += os.lstat(os.path.join(folder, name)).st_size
                n += 1
    return size, n


def meta_snapshot(root: Path, skip: set[Path]) -> dict[str, tuple[str, int, int, int]]:
    """(type, mode, size, mtime) of everything under ``root`` but ``skip``: what must not change."""
    out = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if Path(folder, d) not in skip]
        for name in dirs + files:
            path = Path(folder, name)
            if path in skip:
                continue
            with contextlib.suppress(OSError):
                st = path.lstat()
                kind = "d" if stat.S_ISDIR(st.st_mode) else "l" if stat.S_ISLNK(st.st_mode) else "f"
                out[str(path.relative_to(root))] = (kind, stat.S_IMODE(st.st_mode),
                                                    0 if kind == "d" else st.st_size,
                                                    0 if kind == "d" else st.st_mtime_ns)
    return out


# --- the work ------------------------------------------------------------------------------------


class Work:
    """Random operations on the runtime folder, with a log of every version written."""

    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.ops: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.serial = 0
        self.versions = 0
        self.current: dict[str, tuple[str, float]] = {}    # path -> (digest, written at)
        self.lived_at: dict[str, tuple[str, float, float]] = {}   # digest -> (path, from, to)
        self.repo = root / "repo"
        self.commits = 0
        self._listed: tuple[list[Path], list[Path], list[Path]] | None = None
        self._age = 0
        # paths deleted or renamed away while no mirror watched (set by the soak around a kill):
        # by design only deletions seen while watching reach the server
        self.unwatched: set[str] | None = None

    def forget(self) -> None:
        """Something else changed the folder (a restore): list it again before the next step."""
        self._listed = None

    # names ------------------------------------------------------------------------------------
    def name(self, prefix: str = "f") -> str:
        self.serial += 1
        r = self.rng.random()
        base = f"{prefix}{self.serial}"
        if r < 0.04:
            return base + "\nnl"
        if r < 0.08:
            return base + "\ttab"
        if r < 0.14:
            return base + " space d"
        if r < 0.20:
            return base + self.rng.choice(["-é", "-日本語", "-ß", "-Ω", "-🙂"])
        if r < 0.23:
            return "-" + base              # looks like an option
        if r < 0.25:
            return base + "*?[x]"          # looks like a glob
        return base + self.rng.choice([".txt", ".py", ".bin", ".csv", ""])

    def entries(self) -> tuple[list[Path], list[Path], list[Path]]:
        """(files, folders, links) outside the git repository: listed again every few steps (a
        walk per step would cost the mirror the CPU it needs), so an operation may meet a path
        that an earlier one moved away (counted apart, not as an operation)."""
        self._age += 1
        if self._listed is None or self._age > 6:
            self._listed = self._walk()
            self._age = 0
        return self._listed

    def _walk(self) -> tuple[list[Path], list[Path], list[Path]]:
        files: list[Path] = []
        folders: list[Path] = []
        links: list[Path] = []
        for folder, dirs, names in os.walk(self.root):
            if Path(folder) == self.root:
                dirs[:] = [d for d in dirs if d != "repo"]
            for d in list(dirs):
                p = Path(folder, d)
                if p.is_symlink():
                    links.append(p)
                    dirs.remove(d)
                else:
                    folders.append(p)
            for n in names:
                p = Path(folder, n)
                (links if p.is_symlink() else files).append(p)
        return files, folders, links

    def pick_folder(self, folders: list[Path]) -> Path:
        if not folders or self.rng.random() < 0.2:
            return self.root
        return self.rng.choice(folders)

    def content(self, size: int) -> bytes:
        head = f"v{self.versions} {self.rng.random()}\n".encode()
        self.versions += 1
        if size <= len(head):
            return head
        return head + self.rng.randbytes(size - len(head))

    # bookkeeping ------------------------------------------------------------------------------
    def _unwatched(self, path: Path) -> None:
        if self.unwatched is not None:
            with contextlib.suppress(ValueError):
                self.unwatched.add(str(path.relative_to(self.root)))

    def _gone(self, path: Path) -> None:
        """The version(s) at ``path`` (or under it) stop standing now."""
        now = time.monotonic()
        key = str(path)
        for p in [p for p in self.current if p == key or p.startswith(key + "/")]:
            digest, since = self.current.pop(p)
            self.lived_at[digest] = (p, since, now)

    def _moved(self, src: Path, dst: Path) -> None:
        a, b = str(src), str(dst)
        for p in [p for p in self.current if p == a or p.startswith(a + "/")]:
            self.current[b + p[len(a):]] = self.current.pop(p)

    def write(self, path: Path, data: bytes, mode: int | None = None) -> None:
        if path.is_symlink() or path.is_dir():
            self.remove(path)
        self._gone(path)
        with open(path, "wb") as f:
            f.write(data)
        if mode is not None:
            os.chmod(path, mode)
        self.current[str(path)] = (hashlib.sha256(data).hexdigest(), time.monotonic())

    def remove(self, path: Path) -> None:
        self._gone(path)
        self._unwatched(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()

    # operations -------------------------------------------------------------------------------
    def step(self) -> str:
        files, folders, links = self.entries()
        many = len(files) > MAX_FILES
        table: list[tuple[float, Callable[[list[Path], list[Path], list[Path]], None], str]] = [
            (10 if not many else 2, self.op_create, "create"),
            (8, self.op_overwrite, "overwrite"),
            (5, self.op_same_size, "same-size rewrite"),
            (5 if not many else 20, self.op_delete, "delete"),
            (4, self.op_rename_file, "rename file"),
            (2, self.op_rename_folder, "rename folder"),
            (2, self.op_mkdir, "mkdir"),
            (1.5 if not many else 8, self.op_rmtree, "delete folder"),
            (1.5, self.op_swap, "file<->folder swap"),
            (2, self.op_symlink, "symlink"),
            (2, self.op_chmod, "chmod"),
            (3, self.op_git, "git commit"),
            (0.4 if not many else 0, self.op_burst, "burst"),
            (0.8, self.op_nested_delete, "folder made and deleted"),
            (0.2, self.op_big, "big file"),
        ]
        weights = [w for w, _, _ in table]
        _, fn, kind = self.rng.choices(table, weights)[0]
        if kind in ("rename folder", "delete folder", "file<->folder swap", "burst"):
            self._listed = None
        try:
            fn(files, folders, links)
            self.ops[kind] += 1
        except OSError as e:
            # a race with our own earlier operation (a folder renamed away): not the mirror's
            self.errors[f"{kind}: {errno.errorcode.get(e.errno or 0, e)}"] += 1
        except subprocess.SubprocessError as e:
            self.errors[f"{kind}: {type(e).__name__}"] += 1
        return kind

    def op_create(self, files: list[Path], folders: list[Path], links: list[Path]) -> None:
        size = self.rng.choice([0, 10, 100, 1000, 4096, 20_000, 70_000])
        self.write(self.pick_folder(folders) / self.name(), self.content(size))

    def op_big(self, files: list[Path], folders: list[Path], links: list[Path]) -> None:
        big = [f for f in files if f.name.startswith("big")]
        if len(big) >= 2:
            self.remove(self.rng.choice(big))
            return
        self.write(self.pick_folder(folders) / self.name("big"), self.content(9 * 2**20))

    def op_overwrite(self, files: list[Path], folders: list[Path], links: list[Path]) -> None:
        if not files:
            return self.op_create(files, folders, links)
        path = self.rng.choice(files)
        size = self.rng.choice([0, 50, 700, 3000, 30_000])
        if path.name.startswith("big"):
            size = 9 * 2**20 + self.rng.randint(1, 1000)
        self.write(path, self.content(size))

    def op_same_size(self, files: list[Path], folders: list[Path], links: list[Path]) -> None:
        if not files:
            return self.op_create(files, folders, links)
        path = self.rng.choice(files)
        st = path.lstat()
        size = st.st_size
        self.write(path, self.content(size)[:size] if size else b"")
        if self.rng.random() < 0.5:   # and the same mtime: only the content tells
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    def op_delete(self, files: list[Path], folders: list[Path], links: list[Path]) -> None:
        pool = files + links
        if pool:
            self.remove(self.rng.choice(pool))

    def op_rename_file(self, files: list[Path], folders: list[Path], links: list[Path]) -> None:
        if not files:
            return
        src = self.rng.choice(files)
        dst = self.pick_folder(folders) / self.name("r")
        os.rename(src, dst)
        self._moved(src, dst)
        self._unwatched(src)

    def op_rename_folder(self, files: list[Path], folders: list[Path], links: list[Path]) -> None:
        if not folders:
            return
        src = self.rng.choice(folders)
        parent = self.pick_folder([f for f in folders if f != src and src not in f.parents])
        dst = parent / self.name("D")
        os.rename(src, dst)
        self._moved(src, dst)
        self._unwatched(src)

    def op_mkdir(self, files: list[Path], folders: list[Path], links: list[Path]) -> None:
        d = self.pick_folder(folders) / self.name("D")
        d.mkdir()
        for _ in range(self.rng.randint(0, 5)):
            self.write(d / self.name(), self.content(self.rng.choice([5, 500, 5000])))

    def op_rmtree(self, files: list[Path], folders: list[Path], links: list[Path]) -> None:
        if folders:
            self.remove(self.rng.choice(folders))

    def op_swap(self, files: list[Path], folders: list[Path], links: list[Path]) -> None:
        if files and (not folders or self.rng.random() < 0.5):
            path = self.rng.choice(files)        # a file becomes a folder of the same name
            self.remove(path)
            path.mkdir()
            self.write(path / self.name(), self.content(300))
        elif folders:
            path = self.rng.choice(folders)      # a folder becomes a file
            self.remove(path)
            self.write(path, self.content(200))

    def op_symlink(self, files: list[Path], folders: list[Path], links: list[Path]) -> None:
        folder = self.pick_folder(folders)
        if links and self.rng.random() < 0.3:
            link = self.rng.choice(links)
            self.remove(link)
            return
        choices = [os.path.relpath(f, folder) for f in self.rng.sample(files, min(3, len(files)))]
        choices += ["does-not-exist", "../../outside-the-tree", "/etc/hostname"]
        if folders:
            choices.append(os.path.relpath(self.rng.choice(folders), folder))
        (folder / self.name("L")).symlink_to(self.rng.choice(choices))

    def op_chmod(self, files: list[Path], folders: list[Path], links: list[Path]) -> None:
        if files and (not folders or self.rng.random() < 0.7):
            os.chmod(self.rng.choice(files), self.rng.choice([0o644, 0o600, 0o755, 0o664, 0o444]))
        elif folders:
            os.chmod(self.rng.choice(folders), self.rng.choice([0o755, 0o700, 0o750, 0o775]))

    def op_burst(self, files: list[Path], folders: list[Path], links: list[Path]) -> None:
        top = self.pick_folder(folders) / self.name("B")
        top.mkdir()
        n = self.rng.randint(200, 600)
        subs = [top] + [top / f"s{i}" for i in range(self.rng.randint(0, 8))]
        for s in subs[1:]:
            s.mkdir()
        for i in range(n):
            self.write(self.rng.choice(subs) / f"b{i}{self.rng.choice(['', '.txt', ' x'])}",
                       self.content(self.rng.choice([1, 100, 1500, 4000])))

    def op_nested_delete(self, files: list[Path], folders: list[Path], links: list[Path]) -> None:
        """Issue 13's first finding: ``mkdir -p C/s1/s2 && echo x > C/s1/s2/f && echo y > C/keep
        && rm -r C/s1``, all before the mirror looks."""
        c = self.pick_folder(folders) / self.name("C")
        (c / "s1" / "s2").mkdir(parents=True)
        self.write(c / "s1" / "s2" / "f", self.content(2))
        self.write(c / "keep", self.content(2))
        self.remove(c / "s1")

    def op_git(self, files: list[Path], folders: list[Path], links: list[Path]) -> None:
        src = self.repo / "src"
        src.mkdir(parents=True, exist_ok=True)
        for _ in range(self.rng.randint(1, 4)):
            existing = sorted(src.iterdir())
            if existing and self.rng.random() < 0.6:
                target = self.rng.choice(existing)
            else:
                target = src / f"m{self.serial}.py"
                self.serial += 1
            self.write(target, self.content(self.rng.choice([200, 2000, 20_000])))
        if self.rng.random() < 0.15 and len(list(src.iterdir())) > 3:
            self.remove(self.rng.choice(sorted(src.iterdir())))
        git(self.repo, "add", "-A")
        git(self.repo, "commit", "-q", "--allow-empty", "-m", f"change {self.commits}")
        self.commits += 1
        if self.commits % 25 == 0:
            git(self.repo, "gc", "-q")   # packs and loose objects both

    def init_repo(self) -> None:
        self.repo.mkdir(parents=True)
        git(self.repo, "init", "-q")
        (self.repo / "README").write_text("soak\n")
        git(self.repo, "add", "-A")
        git(self.repo, "commit", "-q", "-m", "start")

    def lived_versions(self, faults: list[tuple[float, float]], since: float) -> dict[str, str]:
        """Versions written after ``since`` that stood >= LIVE_S with no fault overlapping:
        digest -> path. (Checkpoints add every version standing at that moment themselves.)"""
        out = {}
        for digest, (path, t0, t1) in self.lived_at.items():
            if t0 < since or t1 - t0 < LIVE_S:
                continue
            if any(a < t1 + 2 and b > t0 - 2 for a, b in faults):
                continue
            out[digest] = path
        return out


def git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-c", "safe.directory=*", "-c", "gc.auto=0", *args], cwd=repo,
                          env={**os.environ, **GIT_ENV}, capture_output=True, text=True,
                          timeout=120, check=check)


# --- the soak ------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    n: int
    after: str                     # what came before: "work" or a fault kind
    at: float                      # seconds since the start
    flush: str                     # "ok", or the error
    flush_s: float
    first: Diff                    # right after flush()
    converged_s: float | None      # None: not within the limit
    last: Diff
    lost_versions: list[str]       # versions standing at an earlier checkpoint, now nowhere
    lived_missing: list[str]       # versions that stood >= LIVE_S, nowhere
    outside: list[str]             # entries outside the destination that changed
    pruned_versions: int = 0       # versions gone with trash folders its budget pruned
    restore: str = ""              # "" (not checked), "equal", or what differed
    fsck: str = ""                 # "" (not checked), "ok", or git's complaint
    trash_bytes: int = 0
    trash_entries: int = 0
    disk_free: int = 0
    temp_files: int = 0
    state: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    workers: int = 0
    orphan_ssh: list[int] = field(default_factory=list)
    old_ghosts: int = 0            # ghosts, temporary files an earlier checkpoint reported, still there
    unseen_ghosts: int = 0         # server entries deleted here while no mirror watched

    @property
    def lied(self) -> bool:
        return self.flush == "ok" and not self.first.clean

    @property
    def lied_content(self) -> bool:
        """flush() said ok while content (or modes) had not arrived."""
        return self.flush == "ok" and bool(self.first.missing or self.first.stale or self.first.mode)

    @property
    def failed(self) -> bool:
        return bool(self.converged_s is None or self.lost_versions or self.outside
                    or self.restore not in ("", "equal") or self.fsck not in ("", "ok")
                    or self.lied)


@dataclass
class SoakReport:
    seed: int
    seconds: float = 0.0
    ops: Counter[str] = field(default_factory=Counter)
    op_errors: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    converge: dict[str, list[float | None]] = field(default_factory=dict)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    versions_written: int = 0
    versions_checked: int = 0
    commits: int = 0
    log_counts: Counter[str] = field(default_factory=Counter)
    error: str = ""
    disk_bytes: int = 0

    @property
    def failures(self) -> list[Checkpoint]:
        return [c for c in self.checkpoints if c.failed]

    @property
    def ok(self) -> bool:
        return not self.error and not self.failures and bool(self.checkpoints)

    def findings(self) -> list[str]:
        """Issue 13's findings this run reproduced, by number."""
        out = []
        ghosts = sum(len(c.last.ghost) for c in self.checkpoints)
        if ghosts:
            nested = sum(1 for c in self.checkpoints for g in c.last.ghost if "/s1" in g or
                         g.rsplit("/", 1)[-1].startswith("s1"))
            out.append(f"1 (deleted folders come back): {ghosts} ghost entries at checkpoints "
                       f"after waiting ({nested} of them a made-and-deleted s1 folder)")
        if self.checkpoints:
            last = self.checkpoints[-1]
            disk = self.disk_bytes or 1
            if last.trash_bytes > disk / 2 or any(
                    "No space" in str(c.stats.get("last_error")) for c in self.checkpoints
                    if c.after != "disk-full"):
                out.append(f"2 (the trash fills the disk): the trash grew to {last.trash_bytes / 2**20:.0f} "
                           f"MiB of a {disk / 2**20:.0f} MiB disk ({last.disk_free / 2**20:.0f} MiB "
                           f"left) in {self.seconds:.0f} s" + (
                               "; ENOSPC still the last error after the disk-full fault ended"
                               if any("No space" in str(c.stats.get("last_error"))
                                      for c in self.checkpoints if c.after != "disk-full") else ""))
        lies = [c for c in self.checkpoints if c.lied_content]
        if lies:
            out.append(f"3 (flush() says fine while the server lacks changes): {len(lies)} of "
                       f"{len(self.checkpoints)} checkpoints (" + ", ".join(
                           f"#{c.n} after {c.after}: {len(c.first.missing) + len(c.first.stale)} "
                           f"missing or stale, {len(c.first.mode)} modes" for c in lies[:6])
                       + ")")
        lies = [c for c in self.checkpoints if c.lied and not c.lied_content]
        if lies:
            out.append(f"3' flush() returned ok with only ghosts or temporary files left over at "
                       f"{len(lies)} checkpoints")
        bad_fsck = [c for c in self.checkpoints if c.fsck not in ("", "ok")
                    and not c.fsck.startswith("SOAK ERROR")]
        if bad_fsck:
            out.append(f"4 (a restored git repository is broken): {len(bad_fsck)} checkpoints")
        temps = max((c.temp_files for c in self.checkpoints), default=0)
        if temps:
            out.append(f"5 (temporary files pile up): up to {temps} in the live copy")
        orphans = max((len(c.orphan_ssh) for c in self.checkpoints), default=0)
        if orphans or any("ControlMaster" in e for e in self.events):  # mirror() re-run stops it
            out.append("6 (a SIGKILLed worker leaves its ssh ControlMaster running): "
                       + "; ".join(e for e in self.events if "ControlMaster" in e)[:300])
        if self.log_counts.get("link_stat"):
            out.append(f"9 (errors naming the wrong cause): {self.log_counts['link_stat']} "
                       "'link_stat ... No such file' lines in the mirror's log")
        return out

    def summary(self) -> str:
        lines = [f"soak, seed {self.seed}: {self.seconds:.0f} s, {sum(self.ops.values())} operations, "
                 f"{sum(self.faults.values())} faults, {len(self.checkpoints)} checkpoints, "
                 f"{len(self.failures)} failed" + (f"; ERROR: {self.error}" if self.error else "")]
        lines.append("operations: " + ", ".join(f"{k} {v}" for k, v in self.ops.most_common()))
        if self.op_errors:
            lines.append("operations that raced our own earlier ones (not counted): " + ", ".join(
                f"{k} {v}" for k, v in self.op_errors.most_common(8)))
        lines.append(f"versions written: {self.versions_written}; checked at checkpoints or as "
                     f"standing >= {LIVE_S:g} s: {self.versions_checked}; git commits: {self.commits}")
        lines.append("faults: " + (", ".join(f"{k} {v}" for k, v in self.faults.most_common())
                                   or "none"))
        lines.append("time to converge (flush() + equal copy), seconds after the checkpoint began:")
        for kind, values in self.converge.items():
            done = [v for v in values if v is not None]
            never = len(values) - len(done)
            med = f"median {statistics.median(done):.2f}, max {max(done):.2f}" if done else "-"
            lines.append(f"  {kind:<14} {med}  (n={len(values)}{f', {never} never' if never else ''})"
                         f"  [{', '.join('never' if v is None else f'{v:.2f}' for v in values)}]")
        lines.append("checkpoints:")
        for c in self.checkpoints:
            conv = f"converged in {c.converged_s:.2f} s" if c.converged_s is not None else "NOT converged"
            lines.append(
                f"  #{c.n:<3} {c.at:6.0f} s after {c.after:<12} flush {c.flush[:60]} "
                f"({c.flush_s:.2f} s); right after: {c.first.count()} differ; "
                f"{conv}"
                f"; trash {c.trash_bytes / 2**20:.1f} MiB / {c.trash_entries} entries"
                + (f", {c.pruned_versions} versions pruned" if c.pruned_versions else "")
                + "; disk free "
                f"{c.disk_free / 2**20:.0f} MiB; temp files {c.temp_files}; state {c.state}; "
                f"pending {c.stats.get('pending')}; workers {c.workers}"
                + (f"; earlier ghosts/temp files still there {c.old_ghosts}" if c.old_ghosts else "")
                + (f"; deleted while unwatched (kept by design) {c.unseen_ghosts}"
                   if c.unseen_ghosts else "")
                + (f"; restore: {c.restore}" if c.restore else "")
                + (f"; git fsck: {c.fsck}" if c.fsck else "")
                + (" FAILED" if c.failed else ""))
        failures = self.failures
        if failures:
            lines.append("failures in detail:")
            for c in failures:
                lines.append(f"  #{c.n} after {c.after}:")
                if c.lied:
                    lines.append(f"    flush() returned ok, then: {c.first.describe()}")
                if c.converged_s is None:
                    lines.append(f"    not converged: {c.last.describe()}")
                    lines.append(f"    mirror state {c.state}, stats {json.dumps(c.stats)[:400]}")
                if c.lost_versions:
                    lines.append(f"    {len(c.lost_versions)} versions lost: "
                                 f"{', '.join(repr(p) for p in c.lost_versions[:8])}")
                if c.outside:
                    lines.append(f"    changed outside the destination: {c.outside[:8]}")
                if c.restore not in ("", "equal"):
                    lines.append(f"    restore: {c.restore}")
                if c.fsck not in ("", "ok"):
                    lines.append(f"    git fsck: {c.fsck[:300]}")
        soft = [c for c in self.checkpoints if c.lived_missing]
        if soft:
            lines.append(f"versions that stood >= {LIVE_S:g} s outside faults and are nowhere on the "
                         "server (written, then replaced before a checkpoint): " + "; ".join(
                             f"#{c.n}: {len(c.lived_missing)} ({c.lived_missing[0]!r})" for c in soft))
        if self.log_counts:
            lines.append("the mirror's log: " + ", ".join(f"{k} {v}" for k, v in
                                                           self.log_counts.most_common()))
        if self.events:
            lines.append("events: " + " | ".join(self.events[-30:]))
        found = self.findings()
        lines.append("issue 13's findings reproduced: " + ("; ".join(found) if found else "none"))
        return "\n".join(lines)


LOG_PATTERNS = {
    "push failed": "push failed",
    "server errors": "server errors",
    "rsync exit 23": "rsync exit 23",
    "link_stat": "link_stat",
    "No space left": "No space left",
    "Permission denied": "Permission denied",
    "reconnected": "reconnected",
    "whole-tree pass": "whole-tree pass in",
}


class Soak:
    def __init__(self, *, seed: int, seconds: float, fault_seconds: float, faults: tuple[str, ...],
                 converge_limit: float, disk_mb: int, base: Path, say: Callable[[str], None]) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.seconds = seconds
        self.fault_seconds = fault_seconds
        self.fault_kinds = faults
        self.converge_limit = converge_limit
        self.disk_mb = disk_mb
        self.base = base
        self.say = say
        self.report = SoakReport(seed)
        self.digests = Digests()
        self.m: Mirror | None = None
        self.fault_windows: list[tuple[float, float]] = []
        self.must_have: dict[str, str] = {}     # digest -> path it stood at
        self.checked_lived_since = 0.0
        self.seen_trash: dict[str, float] = {}
        self.trash_pruned = False
        self.known_ghosts: set[str] = set()   # ghosts and temporary files already reported
        self.lost: set[str] = set()           # versions already reported lost
        self.old_ghosts: list[str] = []
        self.unseen_ghosts: list[str] = []
        self.unseen_deleted: set[str] = set()
        self.gap_paths: set[str] | None = None
        self.t_start = time.monotonic()

    # set-up -----------------------------------------------------------------------------------
    def setup(self, stack: contextlib.ExitStack) -> None:
        self.server = C.Server(self.base, prefix="crs")
        stack.callback(self.server.close)
        self.state = self.base / "state"
        # the server's disk: a tmpfs of our own; the destination is a folder on it
        self.disk = self.base / "srvdisk"
        stack.enter_context(C.mounted_tmpfs(self.disk, self.disk_mb << 20))
        stack.callback(self.server.close)  # (again) its sessions gone before the unmount
        os.chown(self.disk, self.server.uid, self.server.gid)
        self.dest = self.disk / "proj"
        self.dest.mkdir()
        os.chown(self.dest, self.server.uid, self.server.gid)
        self.filler = self.disk / ".soak-filler"
        # the runtime: a folder on /dev/shm (the work is not slowed by this machine's disk)
        shm = Path("/dev/shm") if os.path.isdir("/dev/shm") else self.base
        self.rt_base = Path(tempfile.mkdtemp(prefix="soak-rt-", dir=shm))
        stack.callback(shutil.rmtree, self.rt_base, True)
        self.local = self.rt_base / "proj"
        self.local.mkdir()
        self.work = Work(self.local, self.rng)
        self.work.init_repo()
        for _ in range(40):
            self.work.step()
        self.report.disk_bytes = shutil.disk_usage(self.disk).total
        self.outside_skip = {self.dest, self.filler}
        self.outside_before: dict[str, tuple[str, int, int, int]] = {}

    def outside(self) -> dict[str, tuple[str, int, int, int]]:
        snap = {f"home/{k}": v for k, v in meta_snapshot(self.server.home, set()).items()}
        snap.update({f"disk/{k}": v for k, v in meta_snapshot(self.disk, self.outside_skip).items()})
        return snap

    def start_mirror(self, why: str) -> Mirror:
        """mirror() as a user calls it (again); retried while it fails (the server away, say).
        Refused because the runtime holds fewer than half the server's files (deletions made
        while no mirror watched), the user resumes with ``restore=True``, as the error says."""
        last = ""
        restore = False
        for attempt in range(20):
            try:
                self.m = mirror(self.local, f"{self.server.name}@127.0.0.1:{self.dest}",
                                port=self.server.port, identity_file=self.server.key,
                                state_dir=self.state, quiet=True, timeout=300, restore=restore)
                self.end_gap()
                if restore:
                    self.work.forget()   # the restore brought files back: list them again
                return self.m
            except (MirrorError, OSError) as e:
                last = " ".join(str(e).split())[:300]
                self.event(f"mirror() ({why}{', restore=True' if restore else ''}) failed, "
                           f"attempt {attempt + 1}: {last}")
                if "refusing to mirror" in last and not restore:
                    restore = True
                    continue
                time.sleep(2)
        raise RuntimeError(f"mirror() keeps failing: {last}")

    def begin_gap(self) -> None:
        """No mirror watches from now on (killed, or being replaced): what is deleted meanwhile
        (by the work, or by git's own housekeeping) never reaches the server, by design."""
        self.work.unwatched = set()
        self.gap_paths = rel_paths(self.local)

    def end_gap(self) -> None:
        if self.work.unwatched is not None:
            self.unseen_deleted |= self.work.unwatched
            self.work.unwatched = None
        if self.gap_paths is not None:
            self.unseen_deleted |= self.gap_paths - rel_paths(self.local)
            self.gap_paths = None

    def event(self, text: str) -> None:
        self.report.events.append(f"{time.monotonic() - self.t_start:.0f}s {text}")
        self.say(text)

    # processes --------------------------------------------------------------------------------
    def workers(self) -> list[int]:
        """Live mirror processes of our state folder (python, its config on the command line)."""
        return [p for p in C.pids_mentioning(str(self.state))
                if "python" in os.path.basename((C.cmdline(p) or [""])[0])]

    def master(self) -> int | None:
        """The mirror's ssh connection: its ControlMaster (an ssh child of the worker)."""
        if self.m is None or not self.m.pid:
            return None
        for pid in C.descendants(self.m.pid):
            argv = C.cmdline(pid)
            if argv and os.path.basename(argv[0]) == "ssh" and (
                    "ControlMaster=yes" in argv or "-M" in argv or "-N" in argv):
                return pid
        return None

    def orphan_ssh(self) -> list[int]:
        """ssh processes of our state folder that no live worker owns."""
        live = set(self.workers())
        out = []
        for pid in C.pids_mentioning(str(self.state)):
            argv = C.cmdline(pid)
            if not argv or os.path.basename(argv[0]) != "ssh":
                continue
            p, owned = pid, False
            while p > 1:
                p = C.parent_of(p)
                if p in live:
                    owned = True
                    break
            if not owned:
                out.append(pid)
        return out

    # the loop ---------------------------------------------------------------------------------
    def work_for(self, seconds: float, rate: float = 12.0) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.work.step()
            time.sleep(self.rng.random() * 2 / rate)

    def run(self) -> SoakReport:
        t0 = time.monotonic()
        self.start_mirror("start")
        # the first mirror() installs the server half (~/.colab-remote/agent-*.py): from then on,
        # nothing outside the destination may change
        self.outside_before = self.outside()
        self.m_flush(120)
        self.checkpoint("start")
        order = list(self.fault_kinds)
        self.rng.shuffle(order)
        k = 0
        while time.monotonic() - t0 < self.seconds:
            self.work_for(self.rng.uniform(4, 10))
            if order and time.monotonic() - t0 < self.seconds and self.rng.random() < 0.75:
                kind = order[k % len(order)]
                k += 1
                self.fault(kind)
                self.checkpoint(kind)
            else:
                self.checkpoint("work")
        self.work_for(3)
        self.checkpoint("end", restore=True)
        self.report.seconds = time.monotonic() - t0
        return self.report

    def m_flush(self, timeout: float) -> str:
        assert self.m is not None
        try:
            self.m.flush(timeout)
            return "ok"
        except MirrorError as e:
            return "raised: " + " ".join(str(e).split())[:300]

    # faults -----------------------------------------------------------------------------------
    def fault(self, kind: str) -> None:
        n = self.fault_seconds
        self.report.faults[kind] += 1
        t0 = time.monotonic()
        self.say(f"fault: {kind}")
        if kind == "worker-kill":
            assert self.m is not None and self.m.pid
            master = self.master()
            os.kill(self.m.pid, signal.SIGKILL)
            self.begin_gap()
            self.work_for(self.rng.uniform(1, n))
            self.start_mirror("after worker-kill")
            if master and C.pid_alive(master):
                self.event(f"worker-kill: the killed worker's ssh ControlMaster (pid {master}) "
                           "still runs after mirror() was re-run; killing it")
                C.kill_pids([master])
        elif kind == "caller-kill":
            self.caller_kill()
        elif kind in ("ssh-kill", "ssh-stop"):
            master = self.master()
            if master is None:
                self.event(f"{kind}: no ssh ControlMaster found under the mirror process")
            elif kind == "ssh-kill":
                os.kill(master, signal.SIGKILL)
                self.work_for(self.rng.uniform(1, 4))
            else:
                os.kill(master, signal.SIGSTOP)
                try:
                    self.work_for(n)
                finally:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(master, signal.SIGCONT)
        elif kind in ("sshd-restart", "sshd-down"):
            self.server.stop()
            try:
                self.work_for(0.2 if kind == "sshd-restart" else n)
            finally:
                self.server.start()
        elif kind == "disk-full":
            self.fill_disk()
            try:
                self.work_for(n)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    self.filler.unlink()
        elif kind == "read-only":
            self.read_only(n)
        self.fault_windows.append((t0, time.monotonic()))

    def caller_kill(self) -> None:
        """A process calling mirror() (or flush()) killed mid-call; the user then re-runs mirror()."""
        which = self.rng.choice(["mirror", "flush"])
        code = ("import sys; from colab_remote import mirror, find_mirrors\n"
                "local, dest, port, key, state = sys.argv[1:6]\n"
                "if sys.argv[6] == 'mirror':\n"
                "    mirror(local, dest, port=int(port), identity_file=key, state_dir=state, quiet=True)\n"
                "else:\n"
                "    [m.flush(60) for m in find_mirrors(state) if m.alive]\n")
        self.work.step()
        if which == "mirror":
            self.begin_gap()   # a mirror() call replaces the running one
        proc = subprocess.Popen([sys.executable, "-c", code, str(self.local),
                                 f"{self.server.name}@127.0.0.1:{self.dest}", str(self.server.port),
                                 str(self.server.key), str(self.state), which], cwd=REPO,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        delay = self.rng.uniform(0.05, 2.0)
        self.work_for(delay)
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        self.work_for(self.rng.uniform(0.5, 2))
        workers = self.workers()
        if len(workers) > 1:
            self.event(f"caller-kill ({which} killed after {delay:.2f} s): {len(workers)} mirror "
                       f"processes for one folder: {workers}")
        self.start_mirror(f"after caller-kill of {which}()")
        workers = self.workers()
        if len(workers) > 1:
            self.event(f"caller-kill: still {len(workers)} mirror processes after mirror() was "
                       f"re-run: {workers}; stopping the extra ones")
            C.kill_pids([p for p in workers if self.m is None or p != self.m.pid])

    def fill_disk(self) -> None:
        """Fill the server's tmpfs to the last block (root has no reserve there)."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for block in (b"\0" * (1 << 20), b"\0" * 4096):
                try:
                    while os.write(fd, block):
                        pass
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
        finally:
            os.close(fd)

    def read_only(self, n: float) -> None:
        """Server folders and files of the copy made read-only for n s (then as they were)."""
        entries = [(p, st) for p, st in self.server_entries() if p.name != TRASH]
        folders = [(p, st) for p, st in entries if stat.S_ISDIR(st.st_mode)]
        files = [(p, st) for p, st in entries if stat.S_ISREG(st.st_mode)]
        chosen = self.rng.sample(folders, min(3, len(folders))) + self.rng.sample(files, min(5, len(files)))
        changed = []
        for path, st in chosen:
            with contextlib.suppress(OSError):
                os.chmod(path, 0o555 if stat.S_ISDIR(st.st_mode) else 0o444)
                changed.append((path, st))
        try:
            self.work_for(n)
            # the same entries, changed here too, while they are read-only on the server (not
            # inside the git repository's own folder: git writes there, nobody else)
            for path, _ in changed:
                rel = path.relative_to(self.dest)
                if rel.parts[:2] == ("repo", ".git"):
                    continue
                local = self.local / rel
                with contextlib.suppress(OSError):
                    if local.is_dir() and not local.is_symlink():
                        self.work.write(local / self.work.name("ro"), self.work.content(100))
                    elif local.is_file() and not local.is_symlink():
                        self.work.write(local, self.work.content(150))
            self.work_for(2)
        finally:
            for path, st in changed:
                with contextlib.suppress(OSError):
                    now = path.lstat()
                    if now.st_ino == st.st_ino:
                        os.chmod(path, stat.S_IMODE(st.st_mode))

    def server_entries(self) -> Iterator[tuple[Path, os.stat_result]]:
        for folder, dirs, files in os.walk(self.dest):
            if Path(folder) == self.dest:
                dirs[:] = [d for d in dirs if d != TRASH]
            for name in dirs + files:
                p = Path(folder, name)
                with contextlib.suppress(OSError):
                    yield p, p.lstat()

    # checkpoints ------------------------------------------------------------------------------
    def checkpoint(self, after: str, restore: bool | None = None) -> Checkpoint:
        n = len(self.report.checkpoints)
        t0 = time.monotonic()
        if self.m is None or not self.m.alive:
            self.event(f"checkpoint {n}: the mirror is not running (state "
                       f"{self.m.state if self.m else '-'}); re-running mirror()")
            self.start_mirror("checkpoint")
        flush = self.m_flush(60)
        flush_s = time.monotonic() - t0
        local = snapshot(self.local, self.digests)
        first = self.diff(local)
        last, converged = first, (time.monotonic() - t0 if first.clean else None)
        same_since, seen = time.monotonic(), first.describe(10**6)
        while converged is None and time.monotonic() - t0 < self.converge_limit:
            time.sleep(0.5)
            if self.m is None or not self.m.alive:
                self.event(f"checkpoint {n}: the mirror stopped (state "
                           f"{self.m.state if self.m else '-'}); re-running mirror()")
                self.start_mirror("checkpoint")
            self.m_flush(30)
            last = self.diff(local)
            if last.clean:
                converged = time.monotonic() - t0
            elif last.describe(10**6) != seen:
                same_since, seen = time.monotonic(), last.describe(10**6)
            elif time.monotonic() - same_since > STUCK_S and not self.pending():
                break   # nothing pending, nothing changing: it will not converge by waiting
        self.known_ghosts.update(last.ghost)
        self.known_ghosts.update(last.temp)
        self.known_ghosts.update(self.unseen_ghosts)
        # versions: every one standing at an earlier checkpoint, and those that stood long enough;
        # the trash keeps a budget (oldest folders pruned first), so a version replaced before the
        # oldest trash folder left may be gone once the trash was pruned at all
        on_server = all_digests(self.dest, self.digests)
        pruned_before = self.pruned_before()
        lost, pruned = [], 0
        for d, p in self.must_have.items():
            if d in on_server:
                continue
            if self.replaced_before(d, pruned_before):
                pruned += 1
            elif d not in self.lost:  # (each reported once)
                lost.append(p)
                self.lost.add(d)
        lived = self.work.lived_versions(self.fault_windows, self.checked_lived_since)
        lived_missing = [p for d, p in lived.items() if d not in on_server
                         and not self.replaced_before(d, pruned_before)]
        self.checked_lived_since = time.monotonic()
        for rel, e in local.items():
            if e.kind == "f" and not rel.startswith("repo/.git/"):
                self.must_have.setdefault(e.digest, rel)
        self.report.versions_checked = len(self.must_have) + len(lived)
        now_outside = self.outside()
        outside = sorted(k for k in set(now_outside) | set(self.outside_before)
                         if now_outside.get(k) != self.outside_before.get(k))
        trash_bytes, trash_entries = du(self.dest / TRASH)
        cp = Checkpoint(n, after, t0 - self.t_start, flush, flush_s, first, converged, last, lost,
                        lived_missing, outside, pruned_versions=pruned, trash_bytes=trash_bytes,
                        trash_entries=trash_entries,
                        disk_free=shutil.disk_usage(self.disk).free,
                        temp_files=len(last.temp) + sum(1 for g in self.old_ghosts
                                                         if TMP_INFIX in g.rsplit("/", 1)[-1]),
                        workers=len(self.workers()),
                        orphan_ssh=self.orphan_ssh(), old_ghosts=len(self.old_ghosts),
                        unseen_ghosts=len(self.unseen_ghosts))
        if self.m is not None:
            cp.state = self.m.state
            with contextlib.suppress(Exception):
                cp.stats = {k: v for k, v in self.m.stats.items() if k in (
                    "pending", "pushes", "full_passes", "reconnects", "last_error", "files", "trash")}
        if restore or (restore is None and n % 3 == 2):
            cp.restore, cp.fsck = self.restore_check(n)
        self.report.checkpoints.append(cp)
        self.report.converge.setdefault(after, []).append(converged)
        self.say(f"checkpoint {n} after {after}: flush {flush[:80]} in {flush_s:.2f} s; "
                 f"right after: {first.describe(3)}; "
                 + (f"converged in {converged:.2f} s" if converged is not None
                    else f"NOT converged: {last.describe(3)}")
                 + (f"; {len(lost)} versions lost" if lost else "")
                 + (f"; {pruned} versions pruned by the trash's budget" if pruned else "")
                 + (f"; outside changed: {outside[:3]}" if outside else "")
                 + (f"; restore {cp.restore}" if cp.restore else "")
                 + (f"; fsck {cp.fsck[:80]}" if cp.fsck else "")
                 + f"; trash {trash_bytes / 2**20:.1f} MiB; state {cp.state}")
        return cp

    def trash_folders(self) -> dict[str, float]:
        """The server's trash folders: name -> its time (UTC seconds, from the name)."""
        out = {}
        with contextlib.suppress(OSError):
            for name in os.listdir(self.dest / TRASH):
                with contextlib.suppress(ValueError):
                    out[name] = calendar.timegm(time.strptime(name[:19], "%Y-%m-%dT%H-%M-%S")) \
                        + float(name[19:26] or 0)
        return out

    def pruned_before(self) -> float | None:
        """Versions replaced here before this time (UTC seconds) may be gone from the trash:
        the time of the oldest trash folder left, once the trash was pruned at all (a folder seen
        at an earlier checkpoint is gone, or the agent says it pruned); None otherwise."""
        folders = self.trash_folders()
        if set(self.seen_trash) - set(folders):
            self.trash_pruned = True
        self.seen_trash = folders
        with contextlib.suppress(Exception):
            if self.m is not None and ((self.m.stats.get("trash") or {}).get("pruned") or {}).get(
                    "folders"):
                self.trash_pruned = True
        if not self.trash_pruned:
            return None
        return min(folders.values(), default=float("inf"))

    def replaced_before(self, digest: str, when: float | None) -> bool:
        """Whether the version ``digest`` was replaced here before ``when`` (UTC seconds)."""
        lived = self.work.lived_at.get(digest)
        if when is None or lived is None:
            return False
        replaced = time.time() - (time.monotonic() - lived[2])
        return replaced < when

    def diff(self, local: dict[str, Entry]) -> Diff:
        """The copy against the runtime, ghosts and temporary files reported at an earlier
        checkpoint left out (they failed that one; counted in :attr:`old_ghosts`)."""
        d = compare(local, snapshot(self.dest, self.digests))
        self.old_ghosts = [g for g in d.ghost + d.temp if g in self.known_ghosts]
        d.temp = [g for g in d.temp if g not in self.known_ghosts]
        self.unseen_ghosts = [g for g in d.ghost if g not in self.known_ghosts and self.unseen(g)]
        d.ghost = [g for g in d.ghost if g not in self.known_ghosts and not self.unseen(g)]
        return d

    def unseen(self, rel: str) -> bool:
        """Deleted (or renamed away) here while no mirror was watching: by design such a
        deletion never reaches the server (the copy is only added to), so it is no ghost."""
        parts = rel.split("/")
        return any("/".join(parts[:i]) in self.unseen_deleted for i in range(1, len(parts) + 1))

    def pending(self) -> int:
        with contextlib.suppress(Exception):
            if self.m is not None:
                return int(self.m.stats.get("pending") or 0)
        return 0

    def restore_check(self, n: int) -> tuple[str, str]:
        """A fresh runtime restores from the server: equal to the server copy? git fsck?

        One mirror writes a destination at a time: the soak's own mirror stops for the restore
        (as a user would stop the old runtime's) and is started again afterwards."""
        fresh = self.rt_base / f"restore-{n}"
        if self.m is not None:
            self.m.stop()
        try:
            m = mirror(fresh, f"{self.server.name}@127.0.0.1:{self.dest}", port=self.server.port,
                       identity_file=self.server.key, state_dir=self.state, restore=True,
                       quiet=True, timeout=300)
            m.stop(flush=False)
        except MirrorError as e:
            shutil.rmtree(fresh, ignore_errors=True)
            return "mirror(restore=True) failed: " + " ".join(str(e).split())[:200], ""
        finally:
            self.start_mirror("after the restore check")
        try:
            server = snapshot(self.dest, self.digests)
            restored = snapshot(fresh, self.digests)
            diff = compare(server, restored)
            # a restore never deletes and skips our temporary names: only their absence is fine
            diff.missing = [p for p in diff.missing if TMP_INFIX not in p]
            what = "equal" if diff.clean else diff.describe(5)
            fsck = ""
            here = git(self.local / "repo", "fsck", "--no-progress", "--strict", check=False)
            if here.returncode != 0:
                # the runtime's own repository is broken: the soak's doing, not the mirror's
                return what, "SOAK ERROR: the runtime's repository fails git fsck: " + " ".join(
                    here.stderr.split())[:200]
            if (fresh / "repo" / ".git").is_dir():
                done = git(fresh / "repo", "fsck", "--no-progress", "--strict", check=False)
                head = git(fresh / "repo", "rev-parse", "--verify", "HEAD", check=False)
                fsck = "ok" if done.returncode == 0 and head.returncode == 0 else (
                    f"exit {done.returncode}: " + " ".join((done.stderr + done.stdout + head.stderr)
                                                           .split())[:300])
            return what, fsck
        finally:
            shutil.rmtree(fresh, ignore_errors=True)

    def read_log(self) -> None:
        for m in find_mirrors(self.state):
            text = m.logs(100_000)
            for label, pattern in LOG_PATTERNS.items():
                self.report.log_counts[label] += text.count(pattern)

    def close(self) -> None:
        """Stop every mirror of our state folder, and anything of ours still running."""
        with contextlib.suppress(Exception):
            self.read_log()
        for m in find_mirrors(self.state):
            with contextlib.suppress(Exception):
                m.stop(flush=False)
        left = C.pids_mentioning(str(self.state)) + C.pids_mentioning(str(self.rt_base))
        if left:
            names = ", ".join(os.path.basename((C.cmdline(p) or ["?"])[0]) for p in left)
            self.report.events.append(f"left running after stop(): {len(left)} processes ({names})")
            C.kill_pids(left)
        self.report.ops = self.work.ops
        self.report.op_errors = self.work.errors
        self.report.versions_written = self.work.versions
        self.report.commits = self.work.commits


def soak(seconds: float = 60, *, seed: int = 1, fault_seconds: float = 3.0,
         faults: tuple[str, ...] = FAULTS, converge_limit: float = 60, disk_mb: int = 256,
         say: Callable[[str], None] | None = None, keep: Path | None = None) -> SoakReport:
    """Run the soak for ``seconds`` (a 60-second version for a test); the report (``.ok``).

    Needs root (a throwaway user, an sshd of its own, a tmpfs mount). Everything it starts is
    stopped and removed before it returns.

    Example:
        >>> report = soak(60, seed=3)  # doctest: +SKIP
        >>> assert report.ok, report.summary()  # doctest: +SKIP
    """
    if os.geteuid() != 0:
        raise PermissionError("the soak needs root: it creates a user, an sshd and a tmpfs")
    unknown = set(faults) - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")
    base = Path(tempfile.mkdtemp(prefix="soak-"))
    os.chmod(base, 0o755)
    s = Soak(seed=seed, seconds=seconds, fault_seconds=fault_seconds, faults=faults,
             converge_limit=converge_limit, disk_mb=disk_mb, base=base,
             say=say or (lambda text: None))
    try:
        with contextlib.ExitStack() as stack:
            s.setup(stack)
            try:
                s.run()
            except Exception as e:  # the report says what broke the run itself
                s.report.error = f"{type(e).__name__}: {e}"
                s.say(f"the soak itself failed: {s.report.error}")
            finally:
                s.report.seconds = time.monotonic() - s.t_start
                s.close()
                if keep is not None:   # the mirrors' logs and status files, for a post-mortem
                    shutil.copytree(s.state, keep / "state", dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("ctl", "cm"))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return s.report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--fault-seconds", type=float, default=10.0,
                        help="how long ssh is stopped, sshd down, the disk full (default 10)")
    parser.add_argument("--faults", default=",".join(FAULTS),
                        help=f"comma-separated subset of: {', '.join(FAULTS)}")
    parser.add_argument("--converge", type=float, default=90.0,
                        help="how long a checkpoint waits for the copy to become equal")
    parser.add_argument("--disk-mb", type=int, default=256, help="the server's disk (a tmpfs)")
    parser.add_argument("--keep", type=Path, help="copy the mirrors' logs and status here at the end")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root: the soak creates a throwaway user, an sshd and a tmpfs", file=sys.stderr)
        return 2
    faults = tuple(f.strip() for f in args.faults.split(",") if f.strip())
    C.exit_on_sigterm()
    report = soak(args.minutes * 60, seed=args.seed, fault_seconds=args.fault_seconds,
                  faults=faults, converge_limit=args.converge, disk_mb=args.disk_mb, say=log_line,
                  keep=args.keep)
    print()
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
