"""One mirror writes a destination at a time (see :class:`Writer`)."""

import errno
import fcntl
import json
import os
import signal
import stat
import time
from typing import Dict, List, Optional

from .fs import lstat_at
from .home import runtime_of
from .procs import proc_stat
from .protocol import O_CLOEXEC, STALE_AFTER, TOUCH_EVERY, WRITER


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
                    now = lstat_at(self.trash_fd, WRITER)
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
        me = proc_stat(os.getpid())
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
    info = proc_stat(pid) if pid > 0 and pid != os.getpid() else None
    if info is None or info[2] != holder.get("start"):
        return  # gone (its lock goes with it), or the pid is another process now
    first = signalled.setdefault(pid, time.monotonic())
    try:
        os.kill(pid, signal.SIGKILL if time.monotonic() - first > 3 else signal.SIGTERM)
    except OSError:
        pass
