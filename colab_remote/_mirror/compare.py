"""The whole-tree pass's comparison: the server's listing, a folder at a time, against the folder.

The agent lists its copy one folder per record, a folder before the folders in it
(:func:`colab_remote._agent.listing.listing`). Each record is compared as it arrives with the same
folder here (one ``lstat`` per entry) while the agent lists the next one, so the two walks overlap
and neither side holds the whole tree in memory. A folder the server lacks is not walked here: the
plan walks it while it sends it (:meth:`Plan._walk <colab_remote._mirror.plan.Plan>`), so a first
push looks at each file once and starts sending at once.

The comparison can also set up the doorbell: ``watch(path, rel)`` is called for each folder before
it is listed (the plan does the same for the folders it walks), so a change made after a folder
was compared rings, and the watch set-up is no walk of its own.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable

from .. import _agent, _sync
from .plan import same_time

_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()  # os.fsencode's
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)

Watch = Callable[[str, str], object]  # (path, rel) of a folder about to be listed


class Compare:
    """What differs here from the server copy, fed with the agent's R_FOLDER records.

    After the listing: ``paths`` (files, links and folders here that the server lacks or holds
    differently: type, size, time, mode, link target; a file changed after ``changed_since``),
    ``added`` (folders here the server lacks:
    sent whole, walked by the plan), ``nbytes`` (of the files in ``paths``), ``server_files``
    (files and links in the server copy, the trash left out). What exists only on the server is
    not listed: a whole-tree pass never deletes there.
    """

    def __init__(self, root: str, flt: _sync.MirrorFilter, watch: Watch | None = None,
                 changed_since: int | None = None) -> None:
        self.root, self.flt, self.watch = root, flt, watch
        # a file whose ctime is later differs whatever its size and time say (see SyncMark)
        self.changed_since = changed_since
        self.paths: set[str] = set()
        self.added: set[str] = set()
        self.nbytes = 0
        self.server_files = 0
        self.server_entries = 0
        self.local_files = 0          # in the folders compared (see count_local)
        self._expected = {""}          # folders here that the server holds too: their records follow
        self._partial: list[bytes] = []

    def record(self, folder: bytes, data: bytes, more: bool) -> None:
        """One R_FOLDER record (a big folder comes in several: ``more``)."""
        if more:
            self._partial.append(data)
            return
        if self._partial:
            data, self._partial = b"".join([*self._partial, data]), []
        self.folder(os.fsdecode(folder), data)

    def folder(self, rel: str, data: bytes) -> None:
        """The server's entries in folder ``rel`` (packed, see :func:`_agent.entries`)."""
        there = _agent.entries(data)
        is_dir = stat.S_ISDIR
        self.server_files += sum(1 for v in there.values() if not is_dir(v[0]))
        self.server_entries += len(there)
        if rel not in self._expected:
            return  # a link, a file, excluded or gone here: its parent's comparison said so
        self._expected.discard(rel)
        self._compare(rel, there)

    def _compare(self, rel: str, there: dict[bytes, tuple[int, int, int, bytes]]) -> None:
        path = os.path.join(self.root, rel) if rel else self.root
        if self.watch is not None:
            self.watch(path, rel)  # before it is listed: a change after the listing rings
        try:  # a folder swapped for a link meanwhile is not followed
            fd = os.open(path, _DIR_FLAGS | (os.O_NOFOLLOW if rel else 0))
        except OSError:
            return
        paths, added, expected, excluded = self.paths, self.added, self._expected, self.flt.excluded
        is_dir, is_reg, is_lnk, imode = stat.S_ISDIR, stat.S_ISREG, stat.S_ISLNK, stat.S_IMODE
        encoding, errors, mask = _FS_ENCODING, _FS_ERRORS, _agent.MODE_MASK
        files = nbytes = 0
        since = self.changed_since
        prefix = f"{rel}/" if rel else ""
        try:
            with os.scandir(fd) as listing:
                for entry in listing:
                    name = entry.name
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    mode = st.st_mode
                    s = there.get(name.encode(encoding, errors))
                    # the filter is asked only about what would be sent or entered: an excluded
                    # file the server holds the same way costs nothing
                    if is_dir(mode):
                        r = prefix + name
                        if excluded(r):
                            continue
                        if s is None or not is_dir(s[0]):
                            added.add(r)  # sent whole: the plan walks it
                        else:
                            expected.add(r)
                            if imode(s[0]) != imode(mode) & mask:
                                paths.add(r)
                        continue
                    files += 1
                    if is_reg(mode):
                        mtime = st.st_mtime_ns
                        if s is None or not is_reg(s[0]) or s[2] != st.st_size or imode(s[0]) != \
                                imode(mode) & mask or s[1] != mtime and not same_time(mtime, s[1]) \
                                or since is not None and st.st_ctime_ns > since:
                            r = prefix + name
                            if excluded(r):
                                files -= 1
                            else:
                                paths.add(r)
                                nbytes += st.st_size
                    elif is_lnk(mode):
                        try:
                            target = os.readlink(name, dir_fd=fd)
                        except OSError:
                            continue
                        if s is None or not is_lnk(s[0]) or s[3] != target.encode(encoding, errors):
                            r = prefix + name
                            if excluded(r):
                                files -= 1
                            else:
                                paths.add(r)
        finally:
            os.close(fd)
        self.local_files += files
        self.nbytes += nbytes

    def count_local(self, enough: int) -> int:
        """Files and links here, counted until ``enough`` (the folders the server lacks are walked
        only while the compared ones hold fewer)."""
        n, todo = self.local_files, sorted(self.added)
        while todo and n < enough:
            rel = todo.pop()
            try:
                listing = os.scandir(os.path.join(self.root, rel))
            except OSError:
                continue
            with listing:
                for entry in listing:
                    r = f"{rel}/{entry.name}"
                    if self.flt.excluded(r):
                        continue
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            todo.append(r)
                            continue
                    except OSError:
                        continue
                    n += 1
        return n
