"""The server copy back into the runtime (``restore=True``): how a fresh runtime resumes.

Never deletes a file here, and a file here that is as new as the server's (or newer) is kept, as
rsync's ``--update`` does (a file here where the server has a folder too: the first push then sends
the file, the server's folder going to its trash); nothing is written through a link in the
runtime's folder. Files are written under a temporary name and renamed into place, with the
server's mode and time.
"""

from __future__ import annotations

import contextlib
import os
import stat

from .. import _sync
from .plan import Entry, under_link
from .report import Progress


class Selection:
    """What the restore must do, from the server's listing against the folder here."""

    def __init__(self, root: str, flt: _sync.MirrorFilter, server: dict[str, Entry]) -> None:
        self.folders: list[tuple[str, Entry]] = []
        self.links: list[tuple[str, Entry]] = []
        self.files: list[str] = []
        self.nbytes = 0
        self.kept = 0  # the server's entries under a folder that is a file here
        for rel in sorted(server):
            entry = server[rel]
            if flt.excluded(rel) or under_link(root, rel):
                continue
            try:
                st: os.stat_result | None = os.lstat(os.path.join(root, rel))
            except NotADirectoryError:
                self.kept += 1  # a file here where the server has a folder: the one here wins
                continue
            except OSError:
                st = None
            if stat.S_ISDIR(entry.mode):
                if st is None:
                    self.folders.append((rel, entry))
            elif stat.S_ISLNK(entry.mode):
                if st is None:
                    self.links.append((rel, entry))
            elif st is None or stat.S_ISREG(st.st_mode) and st.st_mtime_ns < entry.mtime_ns and not (
                    st.st_size == entry.size and st.st_mtime_ns // 10**9 == entry.mtime_ns // 10**9):
                self.files.append(rel)
                self.nbytes += entry.size

    def make_folders_and_links(self, root: str) -> None:
        for rel, _ in self.folders:
            with contextlib.suppress(FileExistsError):
                os.mkdir(os.path.join(root, rel), 0o700)  # its own mode once its files are in
        for rel, entry in self.links:
            with contextlib.suppress(OSError):
                os.symlink(os.fsdecode(entry.target), os.path.join(root, rel))

    def set_folder_modes(self, root: str) -> None:
        for rel, entry in reversed(self.folders):
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(root, rel), stat.S_IMODE(entry.mode))


class Writer:
    """Writes the files the agent sends back: a temporary name, then a rename; mode and time."""

    def __init__(self, root: str, progress: Progress) -> None:
        self.root, self.progress = root, progress
        self.fd = -1
        self.rel, self.tmp, self.mode, self.mtime = "", "", 0, 0
        self.failed: list[tuple[str, str]] = []

    def data(self, rel: str, mode: int, mtime: int, offset: int, data: bytes) -> None:
        try:
            if offset == 0:
                self._close()
                path = os.path.join(self.root, rel)
                self.tmp = os.path.join(os.path.dirname(path),
                                        f".{os.path.basename(path)[:180]}.colab-remote-restore")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.tmp)
                self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                self.rel, self.mode, self.mtime = rel, mode, mtime
            if rel != self.rel or self.fd < 0:
                return  # this file already failed
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            self.progress.add(0, len(data))
        except OSError as e:
            self.fail(rel, str(e))

    def end(self, rel: str) -> None:
        if rel != self.rel or self.fd < 0:
            return
        try:
            os.fchmod(self.fd, stat.S_IMODE(self.mode))
            os.utime(self.fd, ns=(self.mtime, self.mtime))
            os.close(self.fd)
            self.fd = -1
            os.replace(self.tmp, os.path.join(self.root, rel))
            self.progress.add(1, 0)
        except OSError as e:
            self.fail(rel, str(e))

    def fail(self, rel: str, why: str) -> None:
        self._close()
        if self.tmp:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
        if not self.failed or self.failed[-1][0] != rel:
            self.failed.append((rel, why))

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = -1
