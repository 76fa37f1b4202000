"""The laptop's way into the runtime: one ssh ControlMaster to the user's alias, the peer on it.

The master logs in with the user's own ssh set-up (``~/.ssh/config``: the alias that
``tunnel.ssh_config()`` printed, ProxyJump through the server) and opens nothing else: no agent
forwarding, no X11, no port forwards (``ClearAllForwardings``), no local or remote command of the
config; its control socket is in a private 0700 folder. Through it, ``python3 -I -B -c <loader>``
starts in the runtime; the loader reads the package :mod:`colab_remote._agent` (the peer is its
:mod:`~colab_remote._agent.peer`) from stdin, imports it from memory (nothing is installed or
written there) and runs the peer. A reader thread splits the
peer's records into events (its changes) and replies, each reply handed to the request that waits
for it (the peer answers in order).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shlex
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import _agent, _proc, _ssh
from .._agent import peer
from .._master import LoginFailed, Master
from ..errors import AuthenticationError, ColabRemoteError, SyncError
from .config import SyncConfig

log = logging.getLogger("colab_remote.sync")

Record = tuple[bytes, bytes, int, int, int, bytes]  # op, path, mode, mtime, offset, data
Handler = Callable[[Record], bool]                   # a request's replies; True when complete
EVENTS = (peer.R_CHANGE, peer.R_FILE, peer.R_RESCAN, peer.R_NOTE)

# Run by the runtime's python3 (any version from 3.6): reads the modules' sources from stdin (a
# JSON line, then their zlib-compressed sources), serves them to ``import`` from memory (nothing is
# written in the runtime) and runs the peer.
LOADER = r"""import importlib, importlib.abc, importlib.util, json, os, sys, zlib
def r(n):
    b = b""
    while len(b) < n:
        c = os.read(0, n - len(b))
        if not c:
            sys.exit(3)
        b += c
    return b
h = b""
while not h.endswith(b"\n"):
    h += r(1)
spec = json.loads(h.decode())
blob = zlib.decompress(r(spec["size"]))
src, at = {}, 0
for name, size, pkg in spec["modules"]:
    src[name] = (blob[at:at + size], pkg)
    at += size
class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name not in src:
            return None
        return importlib.util.spec_from_loader(name, self, is_package=src[name][1])
    def create_module(self, s):
        return None
    def exec_module(self, m):
        m.__file__ = "<colab-remote %s>" % m.__name__
        exec(compile(src[m.__name__][0], m.__file__, "exec"), m.__dict__)
sys.meta_path.insert(0, Finder())
sys.exit(importlib.import_module(spec["main"]).main())
"""


class ConnectionLost(Exception):
    """The connection to the runtime broke (the runtime went away, or the link did)."""


def sources() -> list[tuple[str, bytes, bool]]:
    """(module, source, is a package) of everything the peer runs on: ``colab_remote`` as an empty
    package (its real ``__init__`` imports the laptop's side) and ``colab_remote._agent`` whole
    (standard library only; the peer is :mod:`colab_remote._agent.peer`)."""
    agent_dir = Path(_agent.__file__).parent
    found: list[tuple[str, bytes, bool]] = [
        ("colab_remote", b"", True),
        ("colab_remote._agent", (agent_dir / "__init__.py").read_bytes(), True)]
    for path in sorted(agent_dir.glob("*.py")):
        if path.name != "__init__.py":
            found.append((f"colab_remote._agent.{path.stem}", path.read_bytes(), False))
    return found


def payload() -> bytes:
    """What the loader reads: a JSON line naming the modules, their sizes and the compressed
    size, then their sources, compressed."""
    import zlib

    found = sources()
    blob = zlib.compress(b"".join(s for _, s, _ in found), 9)
    head = {"modules": [[n, len(s), p] for n, s, p in found], "size": len(blob),
            "main": "colab_remote._agent.peer"}
    return json.dumps(head).encode() + b"\n" + blob


def peer_command() -> str:
    """The runtime's shell runs this (text for its shell, as any ssh command is)."""
    return ("command -v python3 >/dev/null 2>&1 || { echo 'colab-remote: no python3 in the runtime' >&2; "
            f"exit 97; }}; exec python3 -I -B -c {shlex.quote(LOADER)} colab-remote-peer")


INSTALLED_PEER = "colab-remote peer"  # what a sync's restricted key answers with the peer


def master_options(cfg: SyncConfig, control_path: Path, password: bool) -> list[str]:
    """The master's flags: the user's ssh config decides how to get there, we decide what the
    connection may carry (nothing but our commands)."""
    opts: dict[str, str | int] = {
        "ControlMaster": "yes", "ControlPath": str(control_path), "ControlPersist": "no",
        "ClearAllForwardings": "yes", "ForwardAgent": "no", "ForwardX11": "no",
        "PermitLocalCommand": "no", "RemoteCommand": "none", "RequestTTY": "no",
        "ServerAliveInterval": 5, "ServerAliveCountMax": 3, "ConnectTimeout": 20,
        "BatchMode": "no" if password else "yes", "NumberOfPasswordPrompts": 1, "LogLevel": "ERROR",
    }
    if cfg.identity_file:
        opts.update(IdentityFile=cfg.identity_file, IdentitiesOnly="yes")
    if cfg.known_hosts:  # the laptop, from the runtime: its restricted key alone, no prompt
        opts.update(_ssh.host_key_options(Path(cfg.known_hosts), pinned=False), BatchMode="yes",
                    PasswordAuthentication="no", KbdInteractiveAuthentication="no",
                    IdentityAgent="none")
    argv = ["-N", "-T", "-a", "-x", *_ssh.ssh_option_argv(opts)]
    if cfg.ssh_config:
        argv += ["-F", cfg.ssh_config]
    if cfg.port:
        argv += ["-p", str(cfg.port)]
    return argv


MUX_OPTIONS = ["-a", "-x", "-o", "ControlMaster=no", "-o", "ForwardAgent=no", "-o", "ForwardX11=no",
               "-o", "ClearAllForwardings=yes", "-o", "RequestTTY=no", "-o", "PermitLocalCommand=no"]


class Link:
    """The master, the peer's process and the reader thread of one connection."""

    def __init__(self, cfg: SyncConfig, password: str | None, on_event: Callable[[Record], None],
                 on_lost: Callable[[str], None]) -> None:
        self.cfg, self.password = cfg, password
        self.on_event, self.on_lost = on_event, on_lost
        self.control_path = Path(cfg.sock_dir) / "cm"
        self.log_path = Path(cfg.run_dir) / "sync.log"
        self.master: Master | None = None
        self.proc: Any = None
        self.lock = threading.Lock()
        self.handlers: collections.deque[Handler] = collections.deque()
        self.closed = False
        self.reader: threading.Thread | None = None
        self._buf = bytearray()
        self.generation = 0  # a connection's reader speaks only for its own connection
        self.lane: Link | None = None  # big files' own channel (see :attr:`big`)

    @property
    def master_pid(self) -> int | None:
        return self.master.pid if self.master is not None and self.master.child is not None else None

    def open(self, rules: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
        """Log in, start the peer (with ``rules``: what it skips) and say hello, then the big
        files' lane (:attr:`big`); the peer's hello (a dict). Raises our errors."""
        self.close()
        argv = [self.cfg.ssh, *master_options(self.cfg, self.control_path, bool(self.password)),
                self.cfg.host]
        self.master = Master(argv, self.control_path, self.password,
                             on_line=lambda line: log.info("ssh: %s", line))
        try:
            self.master.start().wait(timeout)
        except LoginFailed as e:
            self.close()
            raise self._login_error(e, timeout) from None
        hello = self._start_peer(self.master, rules, timeout)
        lane = Link(self.cfg, None, lambda rec: None, self.on_lost)
        try:
            lane._start_peer(self.master, rules, timeout, lane=True)
            self.lane = lane
        except ColabRemoteError as e:  # an older runtime's quirk: big files share the channel then
            log.warning("the big files' own channel did not start (%s): they share the other one", e)
        return hello

    @property
    def big(self) -> Link:
        """Where big files go: their own channel (a second peer on the same master), so small
        work is never queued behind their bytes; this one when that did not start."""
        return self.lane if self.lane is not None and not self.lane.closed else self

    def _start_peer(self, master: Master, rules: dict[str, Any], timeout: float,
                    lane: bool = False) -> dict[str, Any]:
        self.closed = False
        self.generation += 1
        self.handlers = collections.deque()  # this connection's own (an old reader keeps its own)
        self._buf = bytearray()
        installed = self.cfg.remote_side == "laptop"  # the laptop's key runs the peer it has
        self.proc = _proc.open_pipes(master.mux(INSTALLED_PEER if installed else peer_command(),
                                                options=MUX_OPTIONS), stderr_path=self.log_path)
        request = {"root": self.cfg.remote_path, "rules": rules, "inline_max": self.cfg.inline_max,
                   "keep_days": self.cfg.keep_days, "trash_budget": self.cfg.trash_budget, "lane": lane}
        try:
            self._write((b"" if installed else payload())
                        + _agent.pack(peer.OP_START, data=json.dumps(request).encode()))
            hello = self._hello(time.monotonic() + timeout)
        except ConnectionLost as e:
            tail = _proc.tail(self.log_path, 8)
            self.close()
            raise SyncError(f"the sync's peer did not start in the runtime ({e})", log_tail=tail,
                            fix="the runtime needs python3 (3.6 or newer); see the log above") from None
        if hello.get("protocol") != peer.PROTOCOL:
            self.close()
            raise SyncError(f"the runtime's peer speaks {hello.get('protocol')!r}, not {peer.PROTOCOL!r}",
                            fix="report this: the peer is sent with this colab-remote")
        self.reader = threading.Thread(target=self._read_loop, name="sync-lane" if lane else "sync-reader",
                                       daemon=True, args=(self.generation, os.dup(self.proc.stdout.fileno()),
                                                          self._buf, self.handlers))  # its own descriptor
        self.reader.start()
        return hello

    def _login_error(self, e: LoginFailed, timeout: float) -> ColabRemoteError:
        where = f"{self.cfg.host}" + (f" port {self.cfg.port}" if self.cfg.port else "")
        text = e.output[-2000:]
        if e.kind == "auth":
            return AuthenticationError(f"the runtime ({where}) refused the login: {e.message}", log_tail=text,
                                       fix="check `ssh " + self.cfg.host + " true` works without a prompt "
                                           "(your key in start_sshd(authorized_keys=...)), or pass password=")
        if e.kind == "hostkey":
            return SyncError(f"the runtime's host key ({where}) is not the one on record", log_tail=text,
                             fix="add the lines of tunnel.known_hosts() to ~/.ssh/known_hosts; never "
                                 "connect to a runtime whose key you cannot confirm")
        if e.kind == "timeout":
            return SyncError(f"no SSH login to the runtime ({where}) within {timeout:g} s", log_tail=text,
                             fix="is the runtime up, with the tunnel? try `ssh " + self.cfg.host + "`")
        return SyncError(f"ssh to the runtime ({where}) failed: {e.message}", log_tail=text,
                         fix="check the alias in ~/.ssh/config (tunnel.ssh_config() prints it) and "
                             "`ssh " + self.cfg.host + " true`")

    # --- records ----------------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        try:
            fd = self.proc.stdin.fileno()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except (OSError, ValueError, AttributeError) as e:
            raise ConnectionLost(f"the connection to the runtime broke: {e}") from e

    def send(self, data: bytes, handler: Handler | None = None) -> None:
        """Send records; ``handler`` gets the replies to them (the peer answers in order)."""
        with self.lock:
            if self.closed:
                raise ConnectionLost("not connected")
            if handler is not None:
                self.handlers.append(handler)
            self._write(data)

    def _read_exact(self, fd: int, n: int, buf: bytearray, deadline: float | None) -> bytes:
        import select

        while len(buf) < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConnectionLost("the runtime's peer did not answer in time")
                ready, _, _ = select.select([fd], [], [], min(left, 1.0))
                if not ready:
                    continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise ConnectionLost("the connection to the runtime closed")
            buf += chunk
        out = bytes(buf[:n])
        del buf[:n]
        return out

    def _record(self, fd: int, buf: bytearray, deadline: float | None) -> Record:
        head = self._read_exact(fd, _agent.HEADER.size, buf, deadline)
        op, plen, mode, mtime, offset, dlen = _agent.HEADER.unpack(head)
        path = self._read_exact(fd, plen, buf, deadline) if plen else b""
        data = self._read_exact(fd, dlen, buf, deadline) if dlen else b""
        return op, path, mode, mtime, offset, data

    def _hello(self, deadline: float) -> dict[str, Any]:
        fd = self.proc.stdout.fileno()
        self._buf = bytearray()
        seen = b""
        while peer.MAGIC not in seen:  # a chatty shell start-up file printed something first
            seen = (seen + self._read_exact(fd, 1, self._buf, deadline))[-64 * 1024:]
            if len(seen) >= 64 * 1024:
                raise ConnectionLost("no answer from the peer (the runtime's shell prints a lot?)")
        op, _, _, _, _, data = self._record(fd, self._buf, deadline)
        if op != peer.R_HELLO:
            raise ConnectionLost(f"the peer answered {op!r}")
        return dict(json.loads(data))

    def _read_loop(self, generation: int, fd: int, buf: bytearray,
                   handlers: collections.deque[Handler]) -> None:
        why = "the connection to the runtime closed"
        try:
            while True:
                rec = self._record(fd, buf, None)
                if rec[0] in EVENTS:
                    if generation == self.generation and not self.closed:
                        self.on_event(rec)
                    continue
                with self.lock:
                    handler = handlers[0] if handlers else None
                if handler is None:
                    log.warning("an answer nobody asked for: %r", rec[0])
                    continue
                if handler(rec):
                    with self.lock:
                        if handlers and handlers[0] is handler:
                            handlers.popleft()
        except ConnectionLost as e:
            why = str(e)
        except Exception as e:  # a broken record: this connection is done
            log.exception("reading from the runtime failed")
            why = f"{type(e).__name__}: {e}"
        finally:
            os.close(fd)
        with self.lock:
            waiting, current = list(handlers), generation == self.generation and not self.closed
        for handler in waiting:  # whoever waits for an answer hears now that none comes
            abort = getattr(handler, "abort", None)
            if abort is not None:
                abort()
        if current:
            self.on_lost(why)

    def close(self) -> None:
        if self.lane is not None:
            self.lane.close()
            self.lane = None
        with self.lock:
            self.closed = True
            waiting = list(self.handlers)
            self.handlers.clear()
        for handler in waiting:
            abort = getattr(handler, "abort", None)
            if abort is not None:
                abort()
        if self.proc is not None:
            _proc.end_pipes(self.proc, timeout=1)
            self.proc = None
        if self.master is not None:
            self.master.end()
            self.master = None


class Waiter:
    """A request's replies collected for a caller that waits (the listing, digests)."""

    def __init__(self, done_ops: tuple[bytes, ...], count: int = 1) -> None:
        self.records: list[Record] = []
        self.done_ops, self.left = done_ops, count
        self.event = threading.Event()
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        self.event.set()

    def __call__(self, rec: Record) -> bool:
        self.records.append(rec)
        if rec[0] in self.done_ops:
            self.left -= 1
            if self.left <= 0:
                self.event.set()
                return True
        return False

    def wait(self, timeout: float) -> list[Record]:
        if not self.event.wait(timeout):
            raise ConnectionLost("the runtime's peer did not answer in time")
        if self.aborted:
            raise ConnectionLost("the connection to the runtime broke")
        return self.records

