"""What changed in the mirrored folder, and when: an inotify "doorbell", watchfiles' notify as
the fallback.

The doorbell is a plain inotify descriptor with a watch on every mirrored folder, each added just
before the folder is listed (by the first pass's comparison, by the plan for a new folder), so
nothing written into a folder falls between its listing and its watch, and setting the watches up
is no walk of its own. An idle mirror sleeps in ``select`` on it. Its mask holds the changes only:
notify's includes ``IN_OPEN``, which wakes its thread for every file anyone reads (the first push
reading the whole tree, a training run reading its data set), and notify walks the whole tree
once more, holding the GIL, before it watches anything. watchfiles' notify runs only when the
doorbell cannot watch every folder (no inotify, or the kernel's watch limit reached).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import struct
import threading
import time
from typing import Any

from .. import _sync
from .plan import join

log = logging.getLogger("colab_remote.mirror")

BURST_EVENTS = 300          # this many changes within BURST_WINDOW: read inotify directly until
BURST_WINDOW = 0.1          # it is quiet (watchfiles' notify thread wakes for every event)
BURST_STEP = 0.005          # ... every this many seconds
BURST_QUIET_WATCH = 0.3     # ... and back to watchfiles after this long without events
BUSY_WINDOW = 0.5           # after an event, poll watchfiles directly this long before sleeping again
IDLE_CHECK = 2.0            # while idle, look at watchfiles this often anyway (a folder the doorbell missed)

_IN_MODIFY, _IN_ATTRIB, _IN_CLOSE_WRITE, _IN_MOVED_FROM, _IN_MOVED_TO = 0x02, 0x04, 0x08, 0x40, 0x80
_IN_CREATE, _IN_DELETE, _IN_DELETE_SELF, _IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
_IN_Q_OVERFLOW, _IN_IGNORED = 0x4000, 0x8000
_IN_FLAGS = (_IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE
             | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF)
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name
_IN_ONLYDIR = 0x01000000
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000


class Doorbell:
    """A plain inotify descriptor on every mirrored folder.

    It lets the watcher sleep in ``select`` instead of polling, and its events are delivered with
    watchfiles' (the same change twice costs a set insertion): a new folder gets its doorbell watch
    before it is listed, while notify's comes once notify has seen the folder made, and what lands
    in between only the doorbell reports. In a burst its events are the only ones read (see
    :class:`Watcher`): watchfiles' notify thread wakes for every single event, which in a burst of
    10,000 new files costs as much CPU as all the rest of the mirror.
    """

    def __init__(self) -> None:
        self._libc: Any = None
        self.fd = -1
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
            if fd >= 0:
                self._libc, self.fd = libc, fd
        self.full = False
        self.folders: dict[int, str] = {}  # watch descriptor -> folder, relative to the root

    @property
    def complete(self) -> bool:
        """Every folder is watched: its events alone can be trusted."""
        return self.fd >= 0 and not self.full

    def add_tree(self, top: str, flt: _sync.MirrorFilter) -> None:
        """Watch every folder under ``top`` (where nothing else walks them first)."""
        for folder, dirs, _ in os.walk(top):
            rel = flt.relative(folder)
            if rel is not None and flt.excluded(rel):
                dirs[:] = []
                continue
            dirs[:] = [d for d in dirs if not flt.excluded(join(rel, d))]
            if not self.add(folder, rel or ""):
                return

    def add(self, folder: str, rel: str) -> bool:
        """Watch one folder (``rel``: relative to the root); False when no more can be watched."""
        if self.fd < 0 or self.full:
            return False
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(folder), _IN_FLAGS | _IN_ONLYDIR)
        if wd < 0:
            if ctypes.get_errno() == 28:  # ENOSPC: out of watches; the idle check still finds changes
                self.full = True
                log.warning("inotify watch limit reached; changes may take up to %g s", IDLE_CHECK)
                return False
            return True  # gone meanwhile: its parent's event says so
        self.folders[wd] = rel  # a folder moved and listed again: its new name
        return True

    def read(self, flt: _sync.MirrorFilter) -> tuple[list[tuple[int, str]], bool]:
        """The changes queued since the last read, as watchfiles reports them ``(change, rel)``,
        and whether the kernel's queue overflowed (events lost: a whole-tree pass is due)."""
        changes: list[tuple[int, str]] = []
        overflow = False
        folders, excluded, unpack = self.folders, flt.excluded, _EVENT.unpack_from
        while True:
            try:
                buf = os.read(self.fd, 1 << 20)
            except (BlockingIOError, OSError):
                return changes, overflow
            if not buf:
                return changes, overflow
            off, n = 0, len(buf)
            while off < n:
                wd, mask, _, size = unpack(buf, off)
                name = buf[off + 16:off + 16 + size].rstrip(b"\0")
                off += 16 + size
                if mask & _IN_Q_OVERFLOW:
                    overflow = True
                    continue
                if mask & _IN_IGNORED:
                    folders.pop(wd, None)
                    continue
                folder = folders.get(wd)
                if folder is None or not name:
                    continue  # events of a watched folder itself: its parent reports them
                rel = f"{folder}/{os.fsdecode(name)}" if folder else os.fsdecode(name)
                if excluded(rel):
                    continue
                change = (1 if mask & (_IN_CREATE | _IN_MOVED_TO) else
                          3 if mask & (_IN_DELETE | _IN_MOVED_FROM) else 2)
                changes.append((change, rel))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Watcher(threading.Thread):
    """The doorbell's events, read when it rings (1 ms later: a write's events come as one batch);
    in a burst (BURST_EVENTS changes within BURST_WINDOW) every BURST_STEP, until BURST_QUIET_WATCH
    passes without any. Its watches are added by whoever lists a folder (:meth:`watch`).

    Without a complete doorbell (no inotify, or the watch limit reached) watchfiles' notify watches
    instead, asked for changes when the doorbell rings or every IDLE_CHECK, and the bursts switch
    to the doorbell's own events as above; when a burst is over notify watches again and a
    whole-tree pass follows.
    """

    def __init__(self, root: str, flt: _sync.MirrorFilter, deliver: Any, lost: Any) -> None:
        super().__init__(name="watch", daemon=True)
        self.root, self.flt, self.deliver, self.lost = root, flt, deliver, lost
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.stopping = False
        self._wake_r, self._wake_w = os.pipe()
        self.bell = Doorbell()
        # Without the doorbell (no inotify: macOS) nothing says when to look: look this often.
        self.idle_check = IDLE_CHECK
        self._sync_lock = threading.Lock()
        self._sync_asked = 0
        self.synced = 0
        self._synced_cond = threading.Condition()

    def _notify(self) -> Any:
        from watchfiles._rust_notify import RustNotify
        try:
            return RustNotify([self.root], False, False, 300, True, True)
        except TypeError:  # watchfiles before 0.21 has no ignore_permission_denied
            return RustNotify([self.root], False, False, 300, True)  # type: ignore[call-arg]

    def watch(self, path: str, rel: str) -> None:
        """Watch one folder before it is listed (see the module docstring)."""
        if not self.bell.add(path, rel) and self.bell.fd >= 0:
            self.ring()  # out of watches: the watcher turns to notify

    def watch_all(self) -> None:
        """Watch every folder now (for a first pass that does not list them here: rsync's)."""
        self.bell.add_tree(self.root, self.flt)

    def run(self) -> None:
        # tests: watchfiles' notify as when the doorbell is out of watches
        if self.bell.complete and os.environ.get("COLAB_REMOTE_MIRROR_WATCHFILES") != "1":
            self.ready.set()
            try:
                self._ring()
            except Exception as e:
                log.exception("the watcher failed")
                self.error = e
                self.lost()  # the worker watches again now, not at its next wake-up
                self.bell.close()
                return
            if self.stopping:
                self.bell.close()
                return
            log.warning("inotify watch limit reached: watchfiles' notify watches from now on, and "
                        "changes may take up to %g s; raise fs.inotify.max_user_watches", IDLE_CHECK)
            self.lost()  # what changed in a folder that got no watch
        self._run_notify()

    def _ring(self) -> None:
        """The doorbell alone, until stopped or out of watches."""
        burst_until = window_start = 0.0
        window_count = 0
        fds = [self._wake_r, self.bell.fd]
        while not self.stopping and not self.bell.full:
            now = time.monotonic()
            if now < burst_until:
                select.select([self._wake_r], [], [], BURST_STEP)
            elif select.select(fds, [], [], IDLE_CHECK)[0] == [self.bell.fd]:
                select.select([self._wake_r], [], [], 0.001)  # the rest of the write's events
            with contextlib.suppress(BlockingIOError, OSError):
                os.set_blocking(self._wake_r, False)
                os.read(self._wake_r, 4096)
            asked = self._sync_asked
            n = self._read_bell()
            if n:
                now = time.monotonic()
                if now < burst_until:
                    burst_until = now + BURST_QUIET_WATCH
                else:
                    if now - window_start > BURST_WINDOW:
                        window_start, window_count = now, 0
                    window_count += n
                    if window_count >= BURST_EVENTS:
                        burst_until = now + BURST_QUIET_WATCH
                        log.info("a burst: reading inotify every %g s", BURST_STEP)
            if asked != self.synced:
                self._synced(asked)

    def _run_notify(self) -> None:
        try:
            from watchfiles._rust_notify import WatchfilesRustInternalError
        except ImportError as e:  # pragma: no cover - watchfiles is a dependency
            self.error = e
            self.ready.set()
            return
        try:
            notify = self._notify()
            self.bell.add_tree(self.root, self.flt)
        except Exception as e:
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        busy_until, warned = 0.0, -1e9
        delivered = False
        window_start, window_count = 0.0, 0  # changes delivered since window_start
        try:
            while not self.stopping:
                if notify is None:
                    notify = self._burst()
                    if notify is None:
                        break
                    busy_until, delivered = time.monotonic() + BUSY_WINDOW, False
                    continue
                if time.monotonic() > busy_until:
                    fds = [self._wake_r] + ([self.bell.fd] if self.bell.fd >= 0 else [])
                    select.select(fds, [], [], self.idle_check)
                    with contextlib.suppress(BlockingIOError, OSError):
                        os.set_blocking(self._wake_r, False)
                        os.read(self._wake_r, 4096)
                if self.stopping:
                    break
                # The doorbell's own events too: notify watches a new folder only once it has seen
                # it made, and misses what lands in it before (git makes objects/ab, then writes
                # into it at once); the doorbell's watch is there before the folder is listed.
                self._read_bell()
                asked = self._sync_asked
                # from idle: 1 ms steps (a single edit arrives in a few ms); in a burst: 5 ms
                # steps, bigger batches and fewer GIL hand-overs with the pushing thread
                step = 5 if delivered else 1
                try:
                    raw = notify.watch(step, step, 30, None)
                except WatchfilesRustInternalError as e:
                    # notify met a path it cannot name (not UTF-8, say): that RustNotify stays
                    # broken and its batch is gone. A new one, and a whole-tree pass for the batch.
                    if time.monotonic() - warned > 60:  # a file written on and on: one line a minute
                        warned = time.monotonic()
                        log.warning("watchfiles: %s; watching again, then a whole-tree pass", e)
                    with contextlib.suppress(Exception):
                        notify.close()
                    notify = self._notify()
                    self.lost()
                    continue
                delivered = isinstance(raw, set)
                if isinstance(raw, set):
                    busy_until = time.monotonic() + BUSY_WINDOW
                    self._deliver(raw)
                    now = time.monotonic()
                    if now - window_start > BURST_WINDOW:
                        window_start, window_count = now, 0
                    window_count += len(raw)
                    if window_count >= BURST_EVENTS and self.bell.complete:
                        # The doorbell holds every event since it last rang (it is not read while
                        # busy), so whatever notify had not handed over yet is in there too.
                        with contextlib.suppress(Exception):
                            notify.close()
                        notify = None
                        log.info("a burst: reading inotify directly")
                elif asked != self.synced:
                    self._synced(asked)
        except Exception as e:
            log.exception("the watcher failed")
            self.error = e
            self.lost()  # the worker watches again now, not at its next wake-up
        finally:
            if notify is not None:
                with contextlib.suppress(Exception):
                    notify.close()
            self.bell.close()

    def _burst(self) -> Any:
        """Deliver the doorbell's events until a quiet spell; then a new RustNotify (None when
        stopping)."""
        last = time.monotonic()
        while not self.stopping:
            select.select([self._wake_r], [], [], BURST_STEP)
            with contextlib.suppress(BlockingIOError, OSError):
                os.set_blocking(self._wake_r, False)
                os.read(self._wake_r, 4096)
            asked = self._sync_asked
            if self._read_bell():
                last = time.monotonic()
            if asked != self.synced:
                self._synced(asked)
            if time.monotonic() - last > BURST_QUIET_WATCH:
                notify = self._notify()
                self._read_bell()  # what changed while notify set its watches up
                log.info("the burst is over: watchfiles again")
                self.lost()  # and a whole-tree pass, as after any burst
                return notify
        return None

    def _read_bell(self) -> int:
        changes, overflow = self.bell.read(self.flt)
        if overflow:
            log.warning("the inotify queue overflowed; a whole-tree pass follows")
            self.lost()
        if changes:
            self.deliver(changes)
        return len(changes)

    def _synced(self, asked: int) -> None:
        with self._synced_cond:
            self.synced = asked
            self._synced_cond.notify_all()

    def _deliver(self, raw: set[tuple[int, str]]) -> None:
        changes = []
        for change, path in raw:
            rel = self.flt.relative(path)
            if rel is None or self.flt.excluded(rel):
                continue
            changes.append((change, rel))
        # New folders get their doorbell watch from Worker.plan(), which looks at every path
        # anyway: no stat here per created file.
        if changes:
            self.deliver(changes)

    def ring(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def sync(self, timeout: float) -> bool:
        """Wait until every change made before this call has been delivered."""
        with self._sync_lock:
            self._sync_asked += 1
            token = self._sync_asked
        self.ring()
        with self._synced_cond:
            return self._synced_cond.wait_for(lambda: self.synced >= token or not self.is_alive(),
                                              timeout)

    def stop(self) -> None:
        self.stopping = True
        self.ring()
        self.join(5)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
