"""The mirror process: watch a folder and push every change over one authenticated SSH connection.

Run as ``python -m colab_remote._mirror_worker CONFIG`` (detached by :func:`colab_remote.mirror`,
or in the foreground by ``colab-remote mirror``). The password arrives once through
:func:`_proc.receive_secret` and stays in this process's memory, so it can log in again after the
server comes back.

Pieces:
- :class:`Connection`: an ssh ControlMaster (password typed once through pexpect) and, over it, a
  small agent on the server (python3 reading records from stdin). A push of a few small files is
  one round trip on an open channel: no handshake, no shell start-up files. rsync over the same
  master does the whole-tree passes (the first push, after bursts, after a reconnect) and big files.
- :class:`Watcher`: watchfiles (notify) records what changed; a plain inotify "doorbell" on the same
  folders says *when* to look, so an idle mirror sleeps in ``select`` instead of polling. In a
  burst the doorbell's events are read directly and watchfiles' notify thread is closed until it is
  quiet again (that thread wakes for every event: in a burst, the costliest part of the mirror).
- :class:`Worker`: merges changes while a push is in flight, keeps them through outages and
  retries with backoff, answers ``stats``/``flush``/``stop`` on a unix socket, and writes its
  status (0600) into the state folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import select
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from . import _agent, _proc, _ssh, _sync
from .errors import AuthenticationError, ColabRemoteError, MirrorError

log = logging.getLogger("colab_remote.mirror")

BATCH_BYTES = 4 * 1024 * 1024
BATCH_OPS = 500
BURST_PATHS = 200           # pushes this big together are a burst: a whole-tree pass follows once quiet
BURST_QUIET = 0.3           # seconds without events before that pass
FULL_PASS_EVERY = 600.0     # and one pass at most this often while anything at all changes
BURST_EVENTS = 300          # this many changes within BURST_WINDOW: read inotify directly until
BURST_WINDOW = 0.1          # it is quiet (watchfiles' notify thread wakes for every event)
BURST_STEP = 0.005          # ... every this many seconds
BURST_QUIET_WATCH = 0.3     # ... and back to watchfiles after this long without events
BUSY_WINDOW = 0.5           # after an event, poll watchfiles directly this long before sleeping again
IDLE_CHECK = 2.0            # while idle, look at watchfiles this often anyway (a folder the doorbell missed)
BACKOFF_MAX = 5.0
STATUS_EVERY = 1.0
PROGRESS_EVERY = 0.1        # the first sync's progress goes into the status file this often
PRUNE_EVERY = 6 * 3600.0
RETRY_AFTER_ERROR = 30.0
SENT_MAX = 100_000          # files remembered as acknowledged (about 10 MB); then forgotten at once
BIG_CHUNK = 1 << 20         # a big file goes to the agent in records of this size

# One op for the agent: (op, path relative to the root, mode, mtime in ns, data or link target)
Op = tuple[bytes, str, int, int, bytes | None]


class Entry(NamedTuple):
    """One entry of the server copy, as the agent lists it."""

    mode: int      # with the type bits
    size: int
    mtime_ns: int
    target: bytes  # a link's target


class ConnectionLost(Exception):
    """The channel to the server broke; pending changes are kept and sent after a reconnect."""


# --- the connection ----------------------------------------------------------------------------


class Connection:
    """One ssh ControlMaster to the server, the agent channel over it, and rsync through it."""

    def __init__(self, cfg: dict[str, Any], password: str | None, log_path: Path) -> None:
        self.cfg = cfg
        self.password = password
        self.log_path = log_path
        self.dest = _ssh.Destination(cfg["user"], cfg["host"], cfg["path"])
        self.ssh = cfg["ssh"]
        self.rsync = cfg["rsync"]
        self.control_path = Path(cfg["sock_dir"]) / "cm"
        self.master: Any = None
        self.agent: Any = None
        self.agent_ok = False
        self.remote_rsync = True
        self._buf = b""
        self.outstanding = 0
        self.sent_bytes = 0
        self.trash: dict[str, Any] | None = None  # what the server's trash holds (the agent says)

    # ssh options of the master; every later command goes through its control socket.
    def options(self) -> dict[str, str | int]:
        opts: dict[str, str | int] = {
            "ServerAliveInterval": 5, "ServerAliveCountMax": 3, "TCPKeepAlive": "yes",
            "ConnectTimeout": 10, "NumberOfPasswordPrompts": 1,
            "BatchMode": "no" if self.password else "yes", "PermitLocalCommand": "no",
            "Compression": "no", "LogLevel": "ERROR",
        }
        opts.update(_ssh.host_key_options(Path(self.cfg["known_hosts"]), pinned=self.cfg["pinned"]))
        if self.cfg.get("identity_file"):
            opts["IdentityFile"] = self.cfg["identity_file"]
            opts["IdentitiesOnly"] = "yes"
            if self.cfg.get("restricted"):
                opts["IdentityAgent"] = "none"
                opts["PasswordAuthentication"] = "no"
        elif self.password:
            opts["PubkeyAuthentication"] = "no"
            opts["PreferredAuthentications"] = "password,keyboard-interactive"
        return opts

    def mux(self, *args: str) -> list[str]:
        """A command through the master (the known_hosts path names our state folder in ps)."""
        return [self.ssh, "-S", str(self.control_path), "-T", "-o", "BatchMode=yes",
                "-o", "ProxyCommand=false", "-o", "ControlMaster=no",
                "-o", f"UserKnownHostsFile={self.cfg['known_hosts']}", self.dest.target, *args]

    def rsync_e(self) -> str:
        return _ssh.rsync_ssh_command(self.mux()[:-1])

    @property
    def rsync_dest(self) -> str:
        return f"{self.dest.rsync_host}:{_sync.remote_path(self.dest.path)}"

    @property
    def up(self) -> bool:
        return self.master is not None and self.master.isalive()

    def open(self, timeout: float = 30) -> None:
        """Log in (typing the password once), then start the agent; raise on failure."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.control_path.unlink()
        argv = _ssh.master_argv(self.ssh, self.dest, port=self.cfg["port"],
                                control_path=self.control_path, options=self.options())
        child = _proc.spawn_pty(argv, env=dict(os.environ, LC_ALL="C"))
        self.master = child
        import pexpect

        deadline = time.monotonic() + timeout
        responder = _ssh.Responder(self.password)
        seen = line = ""
        while True:
            if self.control_path.exists() and child.isalive():
                break
            if time.monotonic() > deadline:
                self.close()
                raise MirrorError(f"no SSH connection to {self.dest.target} port {self.cfg['port']} "
                                  f"within {timeout:g} s", log_tail=seen,
                                  fix="check the host, the port and that the server is up")
            try:
                chunk = child.read_nonblocking(4096, timeout=0.05)
            except pexpect.TIMEOUT:
                continue
            except (pexpect.EOF, OSError):
                self.close()
                raise self._login_error(seen) from None
            seen += chunk.replace("\r", "")
            line = (line + chunk.replace("\r", "")).rsplit("\n", 1)[-1]
            kind = _ssh.prompt_kind(line)
            if kind is None:
                continue
            reply, failure = responder.answer(kind)
            line = ""
            if failure is not None:
                self.close()
                restricted = " (the mirror's restricted key: expired or revoked? run mirror() " \
                    "again with the password)" if self.cfg.get("restricted") else ""
                raise AuthenticationError(f"{self.dest.target}: {failure[1]}{restricted}",
                                          log_tail=seen[-2000:],
                                          fix="pass the right password= (or identity_file=) to mirror()")
            if reply is not None:
                child.sendline(reply)
        log.info("connected to %s port %s", self.dest.target, self.cfg["port"])
        self._start_agent()

    def _login_error(self, text: str) -> ColabRemoteError:
        if _ssh.classify(text) == "auth":
            if self.cfg.get("restricted"):
                return AuthenticationError(
                    f"{self.dest.target} refused the mirror's restricted key (expired or revoked?)",
                    log_tail=text, fix="run mirror() again with the password: it installs a new key")
            return AuthenticationError(f"{self.dest.target} refused the login", log_tail=text,
                                       fix="check the user, password= or identity_file=")
        if "IDENTIFICATION HAS CHANGED" in text or "Host key verification failed" in text:
            return MirrorError(f"the host key of {self.dest.host} does not match the one on record",
                               log_tail=text,
                               fix=f"if the server was reinstalled, remove its line from "
                                   f"{self.cfg['known_hosts']}; otherwise do not connect")
        return MirrorError(f"ssh to {self.dest.target} port {self.cfg['port']} failed",
                           log_tail=text, fix="check the host, the port and that sshd runs there")

    def _start_agent(self) -> None:
        """Start the agent installed on the server (a restricted key runs nothing else)."""
        self.agent_ok = False
        if not self.cfg.get("agent", True):
            self._without_agent()
            return
        self.agent = _proc.open_pipes(self.mux(self.cfg["agent_command"]), stderr_path=self.log_path)
        assert self.agent.stdin is not None
        os.set_blocking(self.agent.stdin.fileno(), False)
        self._buf = b""
        self.outstanding = self.sent_bytes = 0
        try:
            op, _, _, _, _, data = self._record(time.monotonic() + 30)
            if op == _agent.R_FAIL:  # another mirror writes there (the agent says which)
                _proc.end_pipes(self.agent)
                self.agent = None
                raise MirrorError(data.decode(errors="replace"),
                                  fix="stop that mirror first (.stop() in its runtime), or "
                                      "mirror to another folder")
            hello = json.loads(data) if op == _agent.R_HELLO else {}
        except (ConnectionLost, ValueError) as e:
            _proc.end_pipes(self.agent)
            self.agent = None
            raise MirrorError("the mirror's agent did not start on the server",
                              log_tail=_proc.tail(self.log_path),
                              fix="run mirror() again with the password: it installs the agent") from e
        if hello.get("protocol") != _agent.VERSION:
            _proc.end_pipes(self.agent)
            self.agent = None
            raise MirrorError(f"the agent on the server speaks protocol {hello.get('protocol')!r}, "
                              f"this colab-remote {_agent.VERSION!r}",
                              fix="run mirror() again with the password: it installs this version")
        self.agent_ok = True
        self.trash = hello.get("trash")
        log.info("agent on the server: pid %s, keeps the trash %s days", hello.get("pid"),
                 hello.get("keep_days"))

    def _without_agent(self) -> None:
        """No python3 on the server: create the folder and check for rsync with one command."""
        path = _quote(_sync.remote_path(self.dest.path))
        done = _proc.run(self.mux(f"mkdir -p -- {path} && command -v rsync"), timeout=30,
                         check=False, error=MirrorError)
        if done.returncode == 255:
            raise MirrorError("the connection broke right after the login",
                              log_tail=done.stderr, fix="try again")
        self.remote_rsync = done.returncode == 0
        if not self.remote_rsync and "rsync" not in done.stdout:
            log.warning("creating %s on the server: %s", path, done.stderr.strip())

    def close(self) -> None:
        _proc.end_pipes(self.agent, timeout=1)
        self.agent = None
        self.agent_ok = False
        if self.master is not None:
            _proc.end_pty(self.master)
            self.master = None
        with contextlib.suppress(FileNotFoundError):
            self.control_path.unlink()

    # agent I/O: non-blocking with deadlines, so a dead link never hangs the mirror
    def _write(self, data: bytes, deadline: float) -> None:
        assert self.agent is not None and self.agent.stdin is not None
        assert self.agent.stdout is not None
        fd, rfd = self.agent.stdin.fileno(), self.agent.stdout.fileno()
        view = memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectionLost("timed out sending to the server")
            # Answers are read while sending, so an agent blocked on a full stdout (batches are
            # pipelined) can never block us in turn.
            readable, ready, _ = select.select([rfd], [fd], [], min(left, 1.0))
            if readable:
                chunk = os.read(rfd, 65536)
                if not chunk:
                    raise ConnectionLost("the channel to the server closed")
                self._buf += chunk
            if not ready:
                if self.agent.poll() is not None:
                    raise ConnectionLost("the channel to the server closed")
                continue
            try:
                n = os.write(fd, view[:1 << 20])
            except BlockingIOError:
                continue
            except OSError as e:
                raise ConnectionLost(f"the channel to the server closed: {e}") from e
            view = view[n:]

    def _read(self, n: int, deadline: float) -> bytes:
        assert self.agent is not None and self.agent.stdout is not None
        fd = self.agent.stdout.fileno()
        while len(self._buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectionLost("the server did not answer in time")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise ConnectionLost("the channel to the server closed")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _record(self, deadline: float) -> tuple[bytes, bytes, int, int, int, bytes]:
        """The agent's next record (see :mod:`_agent` for the protocol)."""
        head = self._read(_agent.HEADER.size, deadline)
        op, plen, mode, mtime, offset, dlen = _agent.HEADER.unpack(head)
        path = self._read(plen, deadline) if plen else b""
        data = self._read(dlen, deadline) if dlen else b""
        return op, path, mode, mtime, offset, data

    def send(self, records: list[bytes], *, end: bool = True) -> None:
        """Send records (and an end mark) without waiting; :meth:`collect` reads the answers."""
        data = b"".join(records) + (_agent.pack(_agent.OP_END) if end else b"")
        self._write(data, time.monotonic() + 30 + len(data) / 2e6)
        self.outstanding += int(end)
        self.sent_bytes += len(data)

    def collect(self) -> list[list[str]]:
        """Wait for the answer to every batch sent; the errors the agent reported."""
        errors: list[list[str]] = []
        deadline = time.monotonic() + 30 + self.sent_bytes / 2e6
        while self.outstanding:
            op, _, _, _, _, data = self._record(deadline)
            if op != _agent.R_ACK:
                raise ConnectionLost(f"unexpected answer from the server: {op!r}")
            answer = json.loads(data)
            errors += answer["errors"]
            self.trash = answer.get("trash") or self.trash
            self.outstanding -= 1
        self.sent_bytes = 0
        return errors

    def batch(self, records: list[bytes]) -> list[list[str]]:
        """Send records and wait for the agent's answer; the errors it reported."""
        self.send(records)
        return self.collect()

    def manifest(self) -> dict[str, Entry]:
        """What the server copy holds (the trash left out): rel path -> :class:`Entry`."""
        errors = self.collect()  # nothing may be in flight: the listing comes in the same stream
        if errors:
            log.warning("server errors: %s", errors[:5])
        self._write(_agent.pack(_agent.OP_MANIFEST), time.monotonic() + 30)
        found: dict[str, Entry] = {}
        deadline = time.monotonic() + 300
        while True:
            op, path, mode, mtime, size, data = self._record(deadline)
            if op == _agent.R_DONE:
                return found
            if op != _agent.R_ENTRY:
                raise ConnectionLost(f"unexpected answer from the server: {op!r}")
            found[os.fsdecode(path)] = Entry(mode, size, mtime, data)

    def count(self) -> int:
        """Files (and links) in the server copy, the trash not counted; 0 when it does not exist."""
        if self.agent_ok:
            return sum(1 for e in self.manifest().values() if not stat.S_ISDIR(e.mode))
        path = _sync.remote_path(self.dest.path)
        script = (f"cd -- {_quote(path)} 2>/dev/null || {{ echo 0; exit 0; }}; "
                  f"find . -path ./{_sync.TRASH} -prune -o ! -type d -print | wc -l")
        done = _proc.run(self.mux(script), timeout=120, check=False, error=MirrorError)
        try:
            return int(done.stdout.split()[-1])
        except (ValueError, IndexError) as e:
            raise ConnectionLost("could not count the server's files") from e

    def fetch(self, rels: list[str], on_data: Callable[[str, int, int, int, bytes], None],
              on_end: Callable[[str], None], on_fail: Callable[[str, str], None],
              window: int = 64) -> None:
        """Read files back from the server (restore), ``window`` requests in flight:
        ``on_data(rel, mode, mtime, offset, data)`` for each piece in order, then ``on_end(rel)``
        (or ``on_fail(rel, why)``)."""
        sent = done = 0
        deadline = time.monotonic() + 300
        while done < len(rels):
            while sent < len(rels) and sent - done < window:
                self._write(_agent.pack(_agent.OP_GET, os.fsencode(rels[sent])), deadline)
                sent += 1
            op, path, mode, mtime, offset, data = self._record(deadline)
            rel = os.fsdecode(path)
            deadline = time.monotonic() + 300
            if op == _agent.R_DATA:
                on_data(rel, mode, mtime, offset, data)
                continue
            if op == _agent.R_DONE:
                on_end(rel)
            elif op == _agent.R_FAIL:
                on_fail(rel, data.decode(errors="replace"))
            else:
                raise ConnectionLost(f"unexpected answer from the server: {op!r}")
            done += 1

    def run_rsync(self, argv: list[str], *, data: bytes | None = None, timeout: float = 3600,
                  on_output: Callable[[bytes], None] | None = None) -> str:
        """Run rsync through the master; ConnectionLost when ssh failed, MirrorError otherwise.

        ``on_output`` gets rsync's stdout as it comes (its ``--info=progress2`` lines).
        """
        if data is None:
            data = b""
        if on_output is None:
            rc, output = _proc.run_bytes(argv, data, timeout=timeout)
        else:
            rc, output = _proc.run_bytes_watched(argv, data, timeout=timeout, on_output=on_output)
        if _sync.rsync_exit_ok(rc, output):  # 23 for files deleted meanwhile: no error
            return ""
        if rc in (255, 12, 10, 30, 35, -9) or not self.up:
            raise ConnectionLost(f"rsync exit {rc}: {output[-500:]}")
        return f"rsync exit {rc}: {output[-1000:]}"


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


# --- the watcher -------------------------------------------------------------------------------


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

    While things are calm it carries no information (watchfiles has that): it only lets the
    watcher sleep in ``select`` instead of polling. In a burst its events are read directly (see
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
        for folder, dirs, _ in os.walk(top):
            rel = flt.relative(folder)
            if rel is not None and flt.excluded(rel):
                dirs[:] = []
                continue
            dirs[:] = [d for d in dirs if not flt.excluded(_join(rel, d))]
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

    def drain(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(BlockingIOError, OSError):
                while os.read(self.fd, 65536):
                    pass

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


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)


class _Folders:
    """The open descriptor of the folder being looked at (one at a time: the paths come sorted)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.rel: str | None = None
        self.fd = -1

    def open(self, rel: str) -> int:
        if rel != self.rel:
            self.close()
            # a folder swapped for a link meanwhile is not followed (its parents: under_link)
            self.fd = os.open(os.path.join(self.root, rel), _DIR_FLAGS | os.O_NOFOLLOW) if rel \
                else os.open(self.root, _DIR_FLAGS)
            self.rel = rel
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.rel = -1, None


def _join(rel: str | None, name: str) -> str:
    return f"{rel}/{name}" if rel else name


class Watcher(threading.Thread):
    """watchfiles' notify backend, asked for changes when the doorbell rings (or every IDLE_CHECK).

    A burst (BURST_EVENTS changes within BURST_WINDOW) switches to the doorbell's own events, read
    every BURST_STEP, until BURST_QUIET_WATCH passes without any; then watchfiles watches again and
    a whole-tree pass follows. Folders new in the burst are listed by the worker (as always) after
    their doorbell watch is added, so a file created in between is never missed.
    """

    def __init__(self, root: str, flt: _sync.MirrorFilter, deliver: Any, lost: Any) -> None:
        super().__init__(name="watch", daemon=True)
        self.root, self.flt, self.deliver, self.lost = root, flt, deliver, lost
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.stopping = False
        self._wake_r, self._wake_w = os.pipe()
        self.bell = Doorbell()
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

    def run(self) -> None:
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
                    select.select(fds, [], [], IDLE_CHECK)
                    self.bell.drain()
                    with contextlib.suppress(BlockingIOError, OSError):
                        os.set_blocking(self._wake_r, False)
                        os.read(self._wake_r, 4096)
                if self.stopping:
                    break
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

    def _read_bell(self) -> bool:
        changes, overflow = self.bell.read(self.flt)
        if overflow:
            log.warning("the inotify queue overflowed; a whole-tree pass follows")
            self.lost()
        if changes:
            self.deliver(changes)
        return bool(changes)

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


# --- the worker --------------------------------------------------------------------------------


def _stamp() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H-%M-%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


class Worker:
    """The mirror loop (see the module docstring)."""

    def __init__(self, cfg: dict[str, Any], password: str | None) -> None:
        self.cfg = cfg
        self.root = cfg["local_dir"]
        self.run_dir = Path(cfg["run_dir"])
        self.status_path = self.run_dir / "status.json"
        self.flt = _sync.MirrorFilter(self.root, cfg["exclude"])
        self.conn = Connection(cfg, password, self.run_dir / "mirror.log")
        self.cond = threading.Condition()
        self.pending: set[str] = set()
        self.added: set[str] = set()
        self.deleted: set[str] = set()
        self.events = 0
        self.in_flight = False
        self.pushed_events = 0
        self.state = "starting"
        self.stop_asked = False
        self.stop_flush_until = 0.0
        self.full_due: float | None = None
        self.last_full = 0.0
        self.last_prune = time.monotonic()
        self.changed_since_full = False
        self.run_paths = 0          # paths pushed since the last quiet spell (see push())
        self.last_push_end = 0.0
        # rel -> (size, mtime, mode, digest) of what the agent acknowledged: a file sent by the
        # listing of a new folder whose own event comes later is read again but not resent
        self.sent: dict[str, tuple[int, int, int, bytes]] = {}
        self.stats: dict[str, Any] = {"files": 0, "bytes": 0, "pushes": 0, "full_passes": 0,
                                      "deleted": 0, "last_push": None, "last_error": None,
                                      "reconnects": 0}
        self._status_written = 0.0
        self._dirty = True
        self.watcher: Watcher | None = None
        self.server: socket.socket | None = None
        self.connected = False
        self.error_detail: dict[str, str] | None = None
        self.error_count = 0
        # the first sync's progress (restore, first push) for mirror()'s bar; None otherwise
        self.progress: dict[str, Any] | None = None
        # in the foreground (``colab-remote mirror``) the bar is drawn here: (phase, fraction, text)
        self.on_progress: Callable[[str, float | None, str], None] | None = None

    # -- status --------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        with self.cond:
            pending = len(self.pending) + (1 if self.full_due is not None else 0)
        return {**self.stats, "pending": pending, "state": self.state,
                "connected": self.connected, "in_flight": self.in_flight, "trash": self.conn.trash}

    def write_status(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and (not self._dirty or now - self._status_written < STATUS_EVERY):
            return
        info = {"pid": os.getpid(), "id": self.cfg["id"], "local_dir": self.root,
                "destination": self.cfg["destination"], "port": self.cfg["port"],
                "config": self.cfg["config_path"], "sock_dir": self.cfg["sock_dir"],
                "master_pid": self.conn.master.pid if self.conn.master is not None else None,
                "updated": time.time(), "stats": self.snapshot(), "state": self.state,
                "error": self.stats["last_error"] if self.state == "error" else None,
                "error_detail": self.error_detail if self.state == "error" else None,
                "progress": self.progress}
        _proc.write_private(self.status_path, json.dumps(info, indent=1))
        self._status_written = now
        self._dirty = False

    def set_state(self, state: str, error: str | None = None) -> None:
        self.state = state
        if error is not None:
            self.stats["last_error"] = error
        self._dirty = True
        self.write_status(force=True)

    def progress_sink(self, phase: str, entries: int | None = None,
                      size: int | None = None) -> Callable[[bytes], None]:
        """An ``on_output`` for rsync ``--info=progress2`` that puts its progress into the status
        file (mirror(), in the user's process, draws the bar from it). ``entries`` and ``size``:
        the tree as counted here (see :meth:`_sync.RsyncProgress.done`)."""
        reader = _sync.RsyncProgressReader()
        written = [0.0]

        def on_output(chunk: bytes) -> None:
            found = reader.feed(chunk)
            text = _sync.describe_progress(found, entries) if found is not None else ""
            fraction = found.done(entries, size) if found is not None else None
            if self.on_progress is not None:
                self.on_progress(phase, fraction, text)
            if found is None or fraction is None:
                return
            self.progress = {"phase": phase, "fraction": fraction, "text": text}
            now = time.monotonic()
            if now - written[0] >= PROGRESS_EVERY or fraction >= 1:
                written[0] = now
                self._dirty = True
                self.write_status(force=True)

        return on_output

    # -- events --------------------------------------------------------------------------------
    def deliver(self, changes: list[tuple[int, str]]) -> None:
        with self.cond:
            for change, rel in changes:
                self.pending.add(rel)
                if change == 1:
                    self.added.add(rel)
                elif change == 3:
                    self.deleted.add(rel)
            self.events += 1
            self.changed_since_full = True
            self.cond.notify_all()

    def events_lost(self) -> None:
        """Changes may have gone unreported: a whole-tree pass soon (at most one a second)."""
        with self.cond:
            due = max(time.monotonic(), self.last_full + 1.0)
            self.full_due = due if self.full_due is None else min(self.full_due, due)
            self.changed_since_full = True
            self.cond.notify_all()

    # -- control socket ------------------------------------------------------------------------
    def serve(self) -> None:
        path = Path(self.cfg["sock_dir"]) / "ctl"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(path))
        os.chmod(path, 0o600)
        srv.listen(8)
        self.server = srv
        threading.Thread(target=self._accept, name="control", daemon=True).start()

    def _accept(self) -> None:
        assert self.server is not None
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                line = conn.makefile("rb").readline().decode().split()
            except OSError:
                return
            if not line:
                return
            reply: dict[str, Any]
            if line[0] == "stats":
                reply = self.snapshot()
            elif line[0] == "flush":
                timeout = float(line[1]) if len(line) > 1 else 60.0
                reason = self.flush(timeout)
                reply = {"ok": not reason, "reason": reason, "stats": self.snapshot()}
            elif line[0] == "stop":
                self.request_stop(float(line[1]) if len(line) > 1 else 0.0)
                reply = {"ok": True}
            else:
                reply = {"error": f"unknown command {line[0]!r}"}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def flush(self, timeout: float) -> str:
        """Wait until everything changed before the call is on the server: '' when it is,
        "timeout", or "errors" (the server refused some of it)."""
        deadline = time.monotonic() + timeout
        errors_before = self.error_count
        if self.watcher is not None and not self.watcher.sync(min(timeout, 10)):
            return "timeout"
        with self.cond:
            target = self.events
            if self.full_due is not None:
                self.full_due = time.monotonic()
            self.cond.notify_all()
            done = self.cond.wait_for(
                lambda: self.pushed_events >= target and not self.pending and not self.in_flight
                and self.full_due is None and self.connected,
                max(0.0, deadline - time.monotonic()))
        if not done:
            return "timeout"
        return "" if self.error_count == errors_before else "errors"

    def request_stop(self, flush_timeout: float) -> None:
        with self.cond:
            self.stop_asked = True
            self.stop_flush_until = time.monotonic() + flush_timeout
            self.cond.notify_all()

    # -- pushing -------------------------------------------------------------------------------
    def full_pass(self, progress: str | None = None, estimate: tuple[int, int] | None = None,
                  server: dict[str, Entry] | None = None) -> None:
        """Send whatever differs from the server copy (never deleting there): new and changed
        files, old versions to the trash. With the agent: its listing against a scan here; without
        it, rsync (no --delete).

        ``progress``: a phase name; the progress goes into the status file under it (rsync's
        measured against ``estimate``: entries, bytes, see :func:`scan_local`).
        """
        t0 = time.monotonic()
        if self.conn.agent_ok:
            listing = self.conn.manifest() if server is None else server
            paths, nbytes = changed_paths(self.root, self.flt, listing)
            if paths:
                self.push(paths, set(), set(), whole=True,
                          progress=(progress, len(paths), nbytes) if progress else None)
            self.stats["full_passes"] += 1
            self.last_full = time.monotonic()
            log.info("whole-tree pass in %.3f s: %d of %d server entries differed", self.last_full - t0,
                     len(paths), len(listing))
            return
        argv = _sync.rsync_push_argv(self.conn.rsync, self.conn.rsync_e(), self.root,
                                     self.conn.rsync_dest, filters=self.flt.rsync_args(),
                                     backup_dir=self._backup_dir(), progress=progress is not None)
        warning = self.conn.run_rsync(
            argv, on_output=self.progress_sink(progress, *(estimate or (None, None)))
            if progress is not None else None)
        if warning:
            self.error_count += 1
            self.stats["last_error"] = warning
            log.warning("whole-tree pass: %s", warning)
        self.stats["full_passes"] += 1
        self.last_full = time.monotonic()
        log.info("whole-tree pass in %.3f s", self.last_full - t0)

    def restore(self, server: dict[str, Entry]) -> None:
        """Copy the server copy into the runtime: never deleting here, and a file here that is as
        new as the server's (or newer) is kept (rsync's --update)."""
        root = self.root
        folders, links, files = [], [], []
        total = 0
        for rel in sorted(server):
            entry = server[rel]
            if self.flt.excluded(rel) or _under_link(root, rel):
                continue
            try:
                st: os.stat_result | None = os.lstat(os.path.join(root, rel))
            except OSError:
                st = None
            if stat.S_ISDIR(entry.mode):
                if st is None:
                    folders.append((rel, entry))
            elif stat.S_ISLNK(entry.mode):
                if st is None:
                    links.append((rel, entry))
            elif st is None or stat.S_ISREG(st.st_mode) and st.st_mtime_ns < entry.mtime_ns and not (
                    st.st_size == entry.size and st.st_mtime_ns // 10**9 == entry.mtime_ns // 10**9):
                files.append(rel)
                total += entry.size
        for rel, _ in folders:
            with contextlib.suppress(FileExistsError):
                os.mkdir(os.path.join(root, rel), 0o700)
        for rel, entry in links:
            with contextlib.suppress(OSError):
                os.symlink(os.fsdecode(entry.target), os.path.join(root, rel))
        progress = _Progress(self, "restoring", len(files), total)
        writer = _RestoreWriter(root, progress)
        self.conn.fetch(files, writer.data, writer.end, writer.fail)
        for rel, entry in reversed(folders):  # their own modes, once their files are in
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(root, rel), stat.S_IMODE(entry.mode))
        if writer.failed:
            raise MirrorError(f"restoring {len(writer.failed)} files failed", log_tail="\n".join(
                f"{rel}: {why}" for rel, why in writer.failed[:15]),
                fix="see the errors above; nothing was deleted on either side")
        log.info("restored %d files (%d bytes), %d folders, %d links", len(files), total,
                 len(folders), len(links))

    def prune(self) -> None:
        """Remove trash folders older than ``keep_days`` on the server (the agent does it itself,
        on its own schedule and with the server's own ``keep_days``)."""
        self.last_prune = time.monotonic()
        if self.conn.agent_ok:
            return
        minutes = max(1, int(self.cfg["keep_days"] * 1440))
        path = _quote(f"{_sync.remote_path(self.conn.dest.path)}/{_sync.TRASH}")
        _proc.run(self.conn.mux(f"[ -d {path} ] && find {path} -mindepth 1 -maxdepth 1 "
                                f"-mmin +{minutes} -exec rm -rf {{}} + ; true"),
                  timeout=300, check=False, error=MirrorError)

    def _backup_dir(self) -> str | None:
        return f"{_sync.TRASH}/{_stamp()}" if self.cfg["backup"] else None

    def plan(self, paths: set[str], added: set[str], deleted: set[str], big: list[str],
             dels: list[str], sending: dict[str, tuple[int, int, int, bytes]]) -> Iterator[Op]:
        """The agent's ops for what changed, in order, each file read as it is listed: ``(op, rel,
        mode, mtime, data)``. Files for rsync (big ones; every file when the server has no agent)
        go into ``big``, deletes into ``dels`` as well; what each file op sends, into ``sending``
        (for :attr:`sent` once the agent has acknowledged it).

        A folder's files are looked at through one open descriptor of the folder, so each lstat
        and open resolves one name, not the whole path: half the system-call time of a burst.
        """
        seen: set[str] = set()
        linked: dict[str, bool] = {}   # folder -> is a link
        inside: dict[str, bool] = {}   # folder -> it or a folder above it is a link
        folders = _Folders(self.root)
        agent = self.conn.agent_ok
        bell = self.watcher.bell if self.watcher is not None else None
        excluded = self.flt.excluded
        sent = self.sent

        def under_link(rel: str) -> bool:
            folder = rel.rpartition("/")[0]
            if not folder:
                return False
            found = inside.get(folder)  # one look-up per file; the walk up once per folder
            if found is None:
                found = False
                cur = ""
                for part in folder.split("/"):
                    cur = _join(cur, part)
                    if cur not in linked:
                        linked[cur] = os.path.islink(os.path.join(self.root, cur))
                    if linked[cur]:
                        found = True
                        break
                inside[folder] = found
            return found

        def entry(rel: str, fd: int, name: str, st: os.stat_result) -> Op | None:
            if stat.S_ISREG(st.st_mode):
                if st.st_size >= _sync.BIG_FILE or not agent:
                    big.append(rel)
                    return None
                try:  # mode and mtime from the lstat: a change since then has its own event
                    data = _read_file(name, st.st_size, fd)
                except OSError:
                    return None  # gone again (or no longer a file): its event follows
                mode = stat.S_IMODE(st.st_mode)
                key = (len(data), st.st_mtime_ns, mode, _digest(data))
                if sent.get(rel) == key:
                    return None  # the server has exactly this already (its content, not a guess)
                sending[rel] = key
                return (_agent.OP_PUT, rel, mode, st.st_mtime_ns, data)
            if stat.S_ISDIR(st.st_mode):
                return (_agent.OP_MKDIR, rel, stat.S_IMODE(st.st_mode), 0, None)
            if stat.S_ISLNK(st.st_mode):
                try:
                    target = os.readlink(name, dir_fd=fd)
                except OSError:
                    return None
                return (_agent.OP_LINK, rel, 0, 0, os.fsencode(target))
            return None  # sockets, FIFOs, devices: not mirrored (as rsync -rlpt)

        def walk(top: str) -> Iterator[Op]:
            """Everything in a new folder: files may have landed before its watch existed."""
            stack = [top]
            while stack:
                frel = stack.pop()
                if bell is not None:  # watched before it is listed: nothing falls in between
                    bell.add(os.path.join(self.root, frel), frel)
                try:
                    fd = folders.open(frel)
                    names = os.listdir(fd)
                except OSError:
                    continue
                for name in names:
                    rel = f"{frel}/{name}"
                    if rel in seen or excluded(rel):
                        continue
                    try:
                        st = os.lstat(name, dir_fd=fd)
                    except OSError:
                        continue
                    seen.add(rel)
                    op = entry(rel, fd, name, st)
                    if op is not None:
                        yield op
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(rel)

        delete = self.cfg["delete"]
        try:
            for rel in sorted(paths):
                if rel in seen or under_link(rel):
                    continue
                folder, _, name = rel.rpartition("/")
                try:
                    fd = folders.open(folder)
                    st = os.lstat(name, dir_fd=fd)
                except OSError:
                    if rel in deleted and delete:
                        dels.append(rel)
                        yield (_agent.OP_DELETE, rel, 0, 0, None)
                    continue
                seen.add(rel)
                is_dir = stat.S_ISDIR(st.st_mode)
                if is_dir and rel in deleted and delete:
                    dels.append(rel)  # replaced: send it whole again
                    yield (_agent.OP_DELETE, rel, 0, 0, None)
                op = entry(rel, fd, name, st)
                if op is not None:
                    yield op
                if is_dir and (rel in added or rel in deleted):
                    yield from walk(rel)
        finally:
            folders.close()

    def push(self, paths: set[str], added: set[str], deleted: set[str], *, whole: bool = False,
             progress: tuple[str, int, int] | None = None) -> None:
        """Send what changed at ``paths`` (``added``/``deleted``: what the events said).

        ``whole``: a whole-tree pass (it does not count towards a burst); ``progress``: (phase,
        paths, bytes) to report against.
        """
        t0 = time.monotonic()
        shown = _Progress(self, *progress) if progress is not None else None
        big: list[str] = []
        dels: list[str] = []
        sending: dict[str, tuple[int, int, int, bytes]] = {}
        ops = self.plan(paths, added, deleted, big, dels, sending)
        files = nbytes = n_ops = 0
        errors: list[list[str]] = []
        if self.conn.agent_ok:
            records: list[bytes] = []
            size = 0
            pack = _agent.pack
            for op, rel, mode, mtime, data in ops:
                n_ops += 1
                if op != _agent.OP_PUT and self.sent:
                    if op == _agent.OP_DELETE and self.sent.pop(rel, None) is None:
                        self.sent.clear()  # a folder: whatever was under it is gone too
                    else:
                        self.sent.pop(rel, None)
                if data is not None and op == _agent.OP_PUT:
                    files += 1
                    nbytes += len(data)
                records.append(pack(op, os.fsencode(rel), mode=mode, mtime_ns=mtime, data=data or b""))
                size += len(records[-1])
                if size >= BATCH_BYTES or len(records) >= BATCH_OPS:
                    self.conn.send(records)  # pipelined: the next files are read meanwhile
                    if shown is not None:
                        shown.add(len(records), size)
                    records, size = [], 0
                    if self.conn.sent_bytes > 64 * BATCH_BYTES:
                        errors += self.conn.collect()
            if records:
                self.conn.send(records)
                if shown is not None:
                    shown.add(len(records), size)
            for rel in big:
                sent = self._send_big(rel)
                if sent is not None:
                    files += 1
                    nbytes += sent
                    if shown is not None:
                        shown.add(1, sent)
            big = []
            errors += self.conn.collect()
            if errors:
                self.sent.clear()  # what the server refused must be sent again
            else:
                if len(self.sent) + len(sending) > SENT_MAX:
                    self.sent.clear()
                self.sent.update(sending)
        else:
            listed = [rel for op, rel, *_ in ops if op in (_agent.OP_MKDIR, _agent.OP_LINK)]
            n_ops = len(listed) + len(dels)
            if dels:
                script = _sync.remote_delete_script(dels, _stamp(), backup=self.cfg["backup"])
                done = _proc.run(self.conn.mux(f"cd -- {_quote(_sync.remote_path(self.conn.dest.path))}"
                                               " && exec sh -s"), input=script, timeout=120,
                                 check=False, error=MirrorError)
                if done.returncode == 255:
                    raise ConnectionLost(done.stderr)
            big = listed + big
        if big:
            argv = _sync.rsync_files_argv(self.conn.rsync, self.conn.rsync_e(), self.root,
                                          self.conn.rsync_dest, backup_dir=self._backup_dir())
            listed_bytes = b"".join(os.fsencode(r) + b"\0" for r in big)
            warning = self.conn.run_rsync(argv, data=listed_bytes)
            if warning:
                errors.append(["", warning])
            for rel in big:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(self.root, rel))
                    if stat.S_ISREG(st.st_mode):
                        files += 1
                        nbytes += st.st_size
        took = time.monotonic() - t0
        if took > 0.2:
            log.info("pushed %d files (%d ops, %d big) in %.3f s", files, n_ops, len(big), took)
        s = self.stats
        s["files"] += files
        s["bytes"] += nbytes
        s["deleted"] += len(dels)
        s["pushes"] += 1
        s["last_push"] = time.time()
        if errors:
            self.error_count += 1
            s["last_error"] = "; ".join(f"{p}: {e}" for p, e in errors[:5])
            log.warning("server errors: %s", s["last_error"])
            # what failed (a full disk, say) is sent again by a whole-tree pass a little later
            retry = time.monotonic() + RETRY_AFTER_ERROR
            self.full_due = retry if self.full_due is None else min(self.full_due, retry)
        if shown is not None:
            shown.done()
        if whole:
            self._dirty = True
            return
        # a burst: pushes with no quiet spell between them that carried BURST_PATHS paths together
        self.run_paths = len(paths) + (self.run_paths if t0 - self.last_push_end < BURST_QUIET else 0)
        self.last_push_end = time.monotonic()
        if self.run_paths >= BURST_PATHS:
            self.full_due = self.last_push_end + BURST_QUIET
        self._dirty = True

    def _send_big(self, rel: str) -> int | None:
        """Stream one big file through the agent in chunks (it checks the digest before putting
        the file in place); its size, or None when it is gone or no longer a file."""
        try:
            fd = os.open(os.path.join(self.root, rel), _READ_FLAGS)
        except OSError:
            return None  # gone (or a link now): its event follows
        path = os.fsencode(rel)
        h = hashlib.blake2b(digest_size=_agent.DIGEST_SIZE)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            offset = 0
            while True:
                chunk = os.read(fd, BIG_CHUNK)
                if not chunk and offset:
                    break
                h.update(chunk)
                self.conn.send([_agent.pack(_agent.OP_CHUNK, path, offset=offset, data=chunk)],
                               end=False)
                offset += len(chunk)
                if not chunk:
                    break
        finally:
            os.close(fd)
        self.conn.send([_agent.pack(_agent.OP_COMMIT, path, mode=stat.S_IMODE(st.st_mode),
                                    mtime_ns=st.st_mtime_ns, offset=offset, data=h.digest())])
        self.sent.pop(rel, None)
        return offset

    def reconnect(self) -> None:
        """Wait for the server (cheap port probes, backoff) and log in again."""
        self.connected = False
        self.conn.close()
        self.sent.clear()  # the server may have changed meanwhile
        self.set_state("retrying")
        delay, cap = 0.2, BACKOFF_MAX
        while not self.stop_asked or time.monotonic() < self.stop_flush_until:
            if _proc.ssh_banner(self.conn.dest.host, self.cfg["port"], timeout=2) is not None:
                try:
                    self.conn.open()  # the new agent clears what a killed one left half-built
                    self.connected = True
                    self.stats["reconnects"] += 1
                    self.full_due = time.monotonic()
                    self.set_state("running")
                    log.info("reconnected")
                    return
                except ColabRemoteError as e:
                    self.stats["last_error"] = e.what
                    log.warning("reconnect failed: %s", e.what)
                    if isinstance(e, AuthenticationError):
                        # a changed password: keep trying, but slowly (no lockouts, no log spam)
                        delay, cap = max(delay, 30.0), 60.0
            with self.cond:
                self.cond.wait(delay)
            delay = min(delay * 2, cap)
        raise ConnectionLost("stopped while the server was away")

    def loop(self) -> None:
        while True:
            with self.cond:
                while True:
                    now = time.monotonic()
                    if self.stop_asked and (not self.pending and self.full_due is None
                                            or now >= self.stop_flush_until):
                        return
                    if self.pending:
                        break
                    if self.full_due is not None and now >= self.full_due:
                        break
                    if (self.changed_since_full and now - self.last_full > FULL_PASS_EVERY):
                        self.full_due = now
                        break
                    if now - self.last_prune > PRUNE_EVERY:
                        break
                    if self.watcher is not None and (self.watcher.error is not None
                                                     or not self.watcher.is_alive()):
                        # notify failed (the folder vanished, say): watch again, then a whole
                        # pass covers whatever happened meanwhile
                        self.stats["last_error"] = f"watching {self.root} failed: {self.watcher.error}"
                        log.warning("%s; watching again", self.stats["last_error"])
                        self.watcher = None
                        if os.path.isdir(self.root):
                            self.watcher = Watcher(self.root, self.flt, self.deliver, self.events_lost)
                            self.watcher.start()
                            self.full_due = now + 1
                        continue
                    wait = 30.0 if self.full_due is None else self.full_due - now
                    if self._dirty:
                        wait = min(wait, STATUS_EVERY)
                    self.in_flight = False
                    self.cond.notify_all()
                    self.write_status()
                    self.cond.wait(max(0.001, wait))
                paths, added, deleted = self.pending, self.added, self.deleted
                self.pending, self.added, self.deleted = set(), set(), set()
                target = self.events
                self.in_flight = True
                do_full = not paths and self.full_due is not None and now >= self.full_due
                do_prune = not paths and not do_full
                if do_full:
                    self.full_due = None
                    self.changed_since_full = False
            try:
                if do_full:
                    self.full_pass()
                elif do_prune:
                    self.prune()
                else:
                    self.push(paths, added, deleted)
            except (ConnectionLost, OSError) as e:
                log.warning("push failed (%s); keeping %d changes", e, len(paths))
                with self.cond:
                    self.pending |= paths
                    self.added |= added
                    self.deleted |= deleted
                    if do_full:
                        self.full_due = time.monotonic()
                self.stats["last_error"] = f"server unreachable: {e}"
                try:
                    self.reconnect()
                except ConnectionLost:
                    return
                continue
            with self.cond:
                self.pushed_events = max(self.pushed_events, target)
                if not self.pending:
                    self.in_flight = False
                self.cond.notify_all()
            if time.monotonic() - self._status_written > STATUS_EVERY:
                self.write_status()

    # -- start ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect, check or restore, start watching, first push. Raises on failure."""
        self.set_state("connecting")
        self.conn.open()
        self.connected = True
        self.write_status(force=True)
        root = Path(self.root)
        server = self.conn.manifest() if self.conn.agent_ok else None
        server_files = self.conn.count() if server is None else \
            sum(1 for e in server.values() if not stat.S_ISDIR(e.mode))
        local_files, entries, size = scan_local(self.root, self.flt) if root.is_dir() else (0, 1, 0)
        log.info("server copy: %d files; local: %d files", server_files, local_files)
        if self.cfg["restore"]:
            root.mkdir(parents=True, exist_ok=True)
            if server_files:
                self.set_state("restoring")
                try:
                    if server is not None:
                        self.restore(server)
                    else:
                        self._restore_with_rsync()
                except ConnectionLost as e:
                    raise MirrorError("restoring from the server failed", log_tail=str(e),
                                      fix="check the connection and try again") from e
                _, entries, size = scan_local(self.root, self.flt)  # for the first push's bar
        elif server_files and local_files * 2 < server_files:
            why = ("is missing" if not root.exists() else "is empty" if local_files == 0
                   else f"holds {local_files} files, fewer than half of the server copy's")
            raise MirrorError(
                f"refusing to mirror: {self.root} {why}, while the server copy "
                f"{self.cfg['destination']} holds {server_files} files",
                fix=f"to resume from the server copy, use mirror({self.root!r}, "
                    f"{self.cfg['destination']!r}, restore=True); or mirror into another folder")
        root.mkdir(parents=True, exist_ok=True)
        self.watcher = Watcher(self.root, self.flt, self.deliver, self.events_lost)
        self.watcher.start()
        if not self.watcher.ready.wait(600) or self.watcher.error is not None:
            raise MirrorError(f"cannot watch {self.root}: {self.watcher.error}",
                              fix="check the folder exists and is readable; raise "
                                  "fs.inotify.max_user_watches for very large trees")
        self.set_state("first push")
        self.prune()
        try:
            self.full_pass(progress="first push", estimate=(entries, size), server=server)
        except ConnectionLost as e:
            raise MirrorError("the first push failed", log_tail=str(e),
                              fix="check the connection and the server's disk") from e
        self.changed_since_full = False
        self.set_state("running")  # with the first push's last progress, for the bar

    def _restore_with_rsync(self) -> None:
        argv = _sync.rsync_pull_argv(self.conn.rsync, self.conn.rsync_e(), self.conn.rsync_dest,
                                     self.root, filters=self.flt.rsync_args(), progress=True)
        warning = self.conn.run_rsync(argv, on_output=self.progress_sink("restoring"))
        if warning:
            raise MirrorError("restoring from the server failed", log_tail=warning,
                              fix="see the log; nothing was deleted on either side")

    def shutdown(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.server is not None:
            with contextlib.suppress(OSError):
                self.server.close()
            with contextlib.suppress(FileNotFoundError):
                (Path(self.cfg["sock_dir"]) / "ctl").unlink()
        self.conn.close()
        self.connected = False
        if Path(self.cfg["sock_dir"]) != self.run_dir:  # a short folder in /tmp of our own
            with contextlib.suppress(OSError):
                Path(self.cfg["sock_dir"]).rmdir()


_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def _read_file(path: str, size: int, dir_fd: int | None = None) -> bytes:
    """A file's bytes, one read when it still has ``size`` of them; OSError when it is gone or now
    a link (NONBLOCK: a FIFO put there meanwhile never blocks us)."""
    fd = os.open(path, _READ_FLAGS, dir_fd=dir_fd)
    try:
        data = os.read(fd, size + 1)
        if len(data) <= size:  # a short read of a regular file: its end
            return data
        chunks = [data]
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def _under_link(root: str, rel: str) -> bool:
    """True when a folder above ``rel`` is a link here (restore never writes through one)."""
    folder = rel.rpartition("/")[0]
    cur = root
    for part in folder.split("/") if folder else []:
        cur = os.path.join(cur, part)
        if os.path.islink(cur):
            return True
    return False


def _same_time(here: int, there: int) -> bool:
    """Equal mtimes; a server whose file system keeps whole seconds only counts as equal too."""
    return here == there or (there % 10**9 == 0 and here // 10**9 == there // 10**9)


def changed_paths(root: str, flt: _sync.MirrorFilter, server: dict[str, Entry]) -> tuple[set[str], int]:
    """Paths here that the server copy lacks or holds differently (type, size, time, mode, link
    target), and the bytes of those files. What exists only on the server is not listed."""
    paths: set[str] = set()
    nbytes = 0
    todo = [("", root)]
    while todo:
        rel, folder = todo.pop()
        try:
            listing = os.scandir(folder)
        except OSError:
            continue
        with listing:
            for entry in listing:
                r = _join(rel, entry.name)
                if flt.excluded(r):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                there = server.get(r)
                mode = stat.S_IMODE(st.st_mode) & _agent.MODE_MASK
                if stat.S_ISDIR(st.st_mode):
                    todo.append((r, entry.path))
                    if there is None or not stat.S_ISDIR(there.mode) or stat.S_IMODE(there.mode) != mode:
                        paths.add(r)
                elif stat.S_ISLNK(st.st_mode):
                    if there is None or not stat.S_ISLNK(there.mode) or \
                            there.target != os.fsencode(os.readlink(entry.path)):
                        paths.add(r)
                elif stat.S_ISREG(st.st_mode):
                    if there is None or not stat.S_ISREG(there.mode) or there.size != st.st_size \
                            or not _same_time(st.st_mtime_ns, there.mtime_ns) \
                            or stat.S_IMODE(there.mode) != mode:
                        paths.add(r)
                        nbytes += st.st_size
    return paths, nbytes


class _Progress:
    """A sync's progress (restore, first push) into the status file, for mirror()'s bar."""

    def __init__(self, worker: Worker, phase: str, items: int, nbytes: int) -> None:
        self.worker, self.phase, self.items, self.nbytes = worker, phase, max(items, 1), nbytes
        self.done_items = self.done_bytes = 0
        self.written = 0.0

    def add(self, items: int, nbytes: int) -> None:
        self.done_items += items
        self.done_bytes += nbytes
        self._show(False)

    def done(self) -> None:
        self.done_items, self.done_bytes = self.items, self.nbytes
        self._show(True)

    def _show(self, final: bool) -> None:
        fraction = min(1.0, max(self.done_items / self.items,
                                self.done_bytes / self.nbytes if self.nbytes else 0.0))
        text = f"{self.done_bytes / 1e6:.1f} MB, {min(self.done_items, self.items):,}/{self.items:,} files"
        w = self.worker
        if w.on_progress is not None:
            w.on_progress(self.phase, fraction, text)
        w.progress = {"phase": self.phase, "fraction": fraction, "text": text}
        now = time.monotonic()
        if final or now - self.written >= PROGRESS_EVERY:
            self.written = now
            w._dirty = True
            w.write_status(force=True)


class _RestoreWriter:
    """Writes the files the agent sends back: a temporary name, then a rename; mode and time."""

    def __init__(self, root: str, progress: _Progress) -> None:
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


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def scan_local(root: str, flt: _sync.MirrorFilter) -> tuple[int, int, int]:
    """``(files, entries, bytes)`` of the mirrored tree: files and links (what the server's count
    compares with), everything rsync lists (folders and the top one too), and the files' size."""
    files = size = 0
    entries = 1
    todo = [("", root)]
    while todo:
        rel, folder = todo.pop()
        try:
            listing = os.scandir(folder)
        except OSError:
            continue
        with listing:
            for entry in listing:
                r = _join(rel, entry.name)
                if flt.excluded(r):
                    continue
                entries += 1
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):
                        todo.append((r, entry.path))
                        continue
                    files += 1
                    if entry.is_file(follow_symlinks=False):
                        size += entry.stat(follow_symlinks=False).st_size
    return files, entries, size


def run(cfg: dict[str, Any], password: str | None, *, foreground: bool = False) -> int:
    """Run one mirror until stopped (SIGTERM, SIGINT, or ``stop`` on the control socket)."""
    worker = Worker(cfg, password)

    def on_signal(signum: int, frame: object) -> None:
        # Never block in a handler: a helper thread takes the lock and wakes the loop.
        threading.Thread(target=worker.request_stop,
                         args=(cfg.get("stop_flush", 10.0) if foreground else 2.0,), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    bar = None
    logs: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if foreground:
        from tqdm.contrib.logging import logging_redirect_tqdm

        from .mirror import _Bar

        bar = _Bar()
        worker.on_progress = bar.show
        logs = logging_redirect_tqdm()  # log lines above the bar, not through it
    try:
        worker.serve()
        try:
            with logs:
                worker.start()
            if bar is not None:
                bar.close(done=True)
        except ColabRemoteError as e:
            worker.error_detail = {"type": type(e).__name__, "what": e.what, "log_tail": e.log_tail,
                                   "fix": e.fix}
            worker.set_state("error", str(e))
            if foreground:
                raise  # the command line prints it as every other error
            log.error("%s", e)
            return 1
        except Exception as e:
            log.exception("the mirror failed to start")
            worker.set_state("error", f"{type(e).__name__}: {e}")
            return 1
        if foreground:
            print(f"mirroring {cfg['local_dir']} -> {cfg['destination']} (Ctrl-C stops)", flush=True)
        try:
            worker.loop()
        except Exception as e:
            log.exception("the mirror failed")
            worker.set_state("error", f"{type(e).__name__}: {e}")
            return 1
        worker.set_state("stopped")
        return 0
    finally:
        if bar is not None:
            bar.close(done=False)
        worker.shutdown()
        if worker.state != "error":
            worker.state = "stopped"
        worker.write_status(force=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    cfg = json.loads(Path(args[0]).read_text())
    password = _proc.receive_secret() if cfg.get("has_password") else None
    return run(cfg, password)


if __name__ == "__main__":
    sys.exit(main())
