"""The detached process that keeps one reverse tunnel up; started by :func:`reverse_forward`.

    python -m colab_remote._supervisor --run-dir DIR

It keeps two authenticated ssh connections to the server, both ControlMasters: the *active* one
carries the forward, the *standby* one carries nothing. When the active ssh exits (for any
reason: a signal, exit status 0 after SIGTERM, ServerAlive giving up on a silent link) the forward
is added to the standby through its control socket (``ssh -O forward``, a few milliseconds, no new
handshake) and a new standby is dialled. When both are gone because the server is down, its SSH
port is probed with a TCP connect every 0.05 s and dialled the moment it answers; only failures of
a server that answers (password, protocol, a busy port) back off, up to 10 s.

The server may hold on to the forwarded port for a while after a link died silently (sshd only
notices when its own keepalives time out, and never while something keeps connecting to the
port). Those are our own sessions: the pid of the server process behind each connection is
recorded at connect time, and a busy port is reclaimed by ending those that are gone on our side.

The password arrives once through :func:`_proc.receive_secret` and lives only in this process's
memory; it is typed at ssh's prompt through a pseudo-terminal with echo off.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import select
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from . import _net, _proc, _ssh
from ._daemon import Backoff, Config, State, StatusFile
from ._master import Master

log = logging.getLogger("colab_remote.tunnel")

TICK = 0.01            # s between checks of the children while something is in flux
IDLE_TICK = 0.1        # s when all is up (a dying ssh wakes the loop at once through its pty)
PROBE_INTERVAL = 0.05  # s between TCP probes of a server that is down
BACKOFF_CAP = 10.0     # s, the longest wait after failures of an answering server
FORWARD_RETRY = 1.5    # s a busy port is retried (the server frees a dead session's port late)
QUERY_TIMEOUT = 10.0   # s for the session-pid query and the reclaim command

_SESSION = re.compile(r"colab-remote-session (\d+)")
_ALLOCATED = re.compile(r"^\s*(\d+)\s*$", re.M)


@dataclasses.dataclass(frozen=True)
class TunnelConfig(Config):
    """What the supervisor needs (written by :func:`reverse_forward`; no secret in it)."""

    destination: str = ""
    user: str = ""
    host: str = ""
    port: int = 22
    remote_port: int = 20022
    local_port: int = 22
    login_user: str = "root"
    via: str = "ssh"
    ssh: str = "ssh"
    reconnect: bool = True
    start_timeout: float = 30.0
    has_secret: bool = False
    restricted: bool = False
    control_dir: str = ""
    options: dict[str, str | int] = dataclasses.field(default_factory=dict)
    reclaim: list[int] = dataclasses.field(default_factory=list)
    connect_host: str | None = None   # a restricted tunnel to a Compute Engine VM: its address
    public_host: str | None = None    # the server as the laptop reaches it (a VM's external IP)
    probe_host: str | None = None     # where to probe while the server is down
    gcloud: str | None = None
    zone: str | None = None
    project: str | None = None
    key_id: str | None = None
    key_expires: float | None = None


class Fatal(Exception):
    """A failure that retrying will not fix before the user acts (only before the first forward)."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind


class Conn:
    """One of the supervisor's connections: a :class:`Master`, and what the supervisor knows of it."""

    def __init__(self, number: int, master: Master) -> None:
        self.number = number
        self.master = master
        self.ready_at: float | None = None
        self.session_pid: int | None = None
        self.pid_query: Any = None
        self.active = False
        self.lines_at_ready = 0

    @property
    def pid(self) -> int:
        return self.master.pid

    @property
    def ready(self) -> bool:
        return self.ready_at is not None


class Supervisor:
    def __init__(self, config: TunnelConfig, secret: str | None) -> None:
        self.run_dir = Path(config.run_dir)
        self.config = config
        self.secret = secret
        # a restricted tunnel to a Compute Engine VM logs in with plain ssh to its address
        self.dest = _ssh.Destination(config.user, config.connect_host or config.host)
        self.control_dir = Path(config.control_dir)
        self.requested_port = config.remote_port
        self.remote_port = self.requested_port
        self.conns: list[Conn] = []
        self.active: Conn | None = None
        self.counter = 0
        self.restarts = 0
        self.state = State.STARTING
        self.since = time.time()
        self.last_error = ""
        self.error_kind = ""
        self.orphans: list[int] = [int(p) for p in config.reclaim]
        self.backoff = Backoff(0.5, BACKOFF_CAP)
        self.next_try = 0.0
        self.server_down = False
        self.next_probe = 0.0
        self.lost_at: float | None = None
        self.up_once = False
        self.stopping = False
        self.started = time.monotonic()
        self.status_file = StatusFile(self.run_dir / "status.json")
        self.addresses: list[Any] | None = None
        self.env = dict(os.environ, LC_ALL="C")
        self.env.pop("SSH_ASKPASS", None)
        self.env.pop("DISPLAY", None)

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.control_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        log.info("supervising %s -R %s (pid %d)", self.dest,
                 _ssh.reverse_spec(self.requested_port, self.config.local_port), os.getpid())
        code = 0
        try:
            while not self.stopping:
                settled = self.active is not None and all(c.ready and c.pid_query is None
                                                          for c in self.conns)
                self._io(IDLE_TICK if settled and not self.server_down else TICK)
                self._reap()
                self._check_ready()
                if self.active is None:
                    self._restore()
                self._keep_standby()
                if not self.up_once and time.monotonic() - self.started > self.config.start_timeout:
                    raise Fatal("timeout", f"no forward within {self.config.start_timeout:g} s: "
                                + (self.last_error or "the server did not answer"))
                self._write_status()
        except Fatal as e:
            log.error("%s", e)
            self.state, self.error_kind, self.last_error = State.FAILED, e.kind, str(e)
            self.since = time.time()
            code = 1
        except Exception as e:  # a bug of ours: leave nothing running and say why
            log.exception("supervisor failed")
            self.state, self.error_kind, self.last_error = State.FAILED, "other", f"supervisor failed: {e!r}"
            self.since = time.time()
            code = 2
        self._shutdown()
        if code == 0:
            self.state, self.since = State.STOPPED, time.time()
        self._write_status()
        return code

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _io(self, timeout: float) -> None:
        """Wait for output of any connection (a dying ssh wakes this at once), then read it all."""
        fds = {c.master.fd: c for c in self.conns if c.master.alive}
        if not fds:
            time.sleep(timeout)
            return
        with contextlib.suppress(InterruptedError, OSError, ValueError):
            select.select(list(fds), [], [], timeout)
        for conn in self.conns:
            conn.master.pump()

    # --- connections ---------------------------------------------------------------------------

    def _dial(self) -> None:
        self.counter += 1
        control_path = self.control_dir / f"c{self.counter}"
        options = self.config.options
        port = self.config.port
        if self.config.via == "gcloud" and not self.config.restricted:
            from . import _gcloud

            # gcloud's own key-propagation probe (ssh ... -- :) gets --ssh-flag but not what
            # follows "--": the ControlMaster and -N belong to the real connection only.
            assert self.config.gcloud is not None
            argv = _gcloud.gcloud_ssh_argv(self.config.gcloud, self.dest, zone=self.config.zone,
                                           project=self.config.project,
                                           ssh_flags=[*(["-p", str(port)] if port != 22 else []),
                                                      *_ssh.ssh_option_argv(options)],
                                           command=_ssh.master_flags(control_path, {}))
        else:
            argv = _ssh.master_argv(self.config.ssh, self.dest, port=port, control_path=control_path,
                                    options=options)
        number = self.counter
        master = Master(argv, control_path, self.secret, ssh=self.config.ssh, env=self.env,
                        on_line=lambda line: log.info("[ssh %d] %s", number, line))
        conn = Conn(number, master.start())
        self.conns.append(conn)
        log.info("[ssh %d] dialling %s (pid %d)", conn.number, self.dest, conn.pid)

    def _may_dial(self) -> bool:
        now = time.monotonic()
        if now < self.next_try or self.stopping:
            return False
        if not self.server_down:
            return True
        if now < self.next_probe:
            return False
        self.next_probe = now + PROBE_INTERVAL
        if self.addresses is None:
            with contextlib.suppress(OSError):
                self.addresses = socket.getaddrinfo(self.config.probe_host or self.dest.host,
                                                    self.config.port, type=socket.SOCK_STREAM)
        if self.addresses and _net.tcp_answers(self.addresses, timeout=0.25):
            log.info("the server answers on port %s again", self.config.port)
            self.server_down = False
            return True
        return False

    def _reap(self) -> None:
        for conn in list(self.conns):
            master = conn.master
            if master.alive:
                continue
            if conn.active:
                self.lost_at = time.monotonic()
            master.pump()
            if master.partial.strip():
                master.lines.append(master.partial.strip())
                log.info("[ssh %d] %s", conn.number, master.partial.strip())
                master.partial = ""
            master.end(timeout=0)
            how = master.exit_text
            self.conns.remove(conn)
            if conn.session_pid is not None:
                self.orphans.append(conn.session_pid)
                self.orphans = self.orphans[-16:]
            if conn.pid_query is not None:
                _proc.finish(conn.pid_query, timeout=0.5)
            if conn.active:
                self.active = None
                self.state, self.since = State.RECONNECTING, time.time()
                said = master.lines[conn.lines_at_ready:]
                self.last_error = f"ssh (pid {conn.pid}) ended ({how})" + (f": {said[-1]}" if said else "")
                self.error_kind = "lost"
                log.warning("forward lost: %s", self.last_error)
                if not self.config.reconnect:
                    self.stopping = True
            elif conn.ready:
                log.info("[ssh %d] standby ended (%s)", conn.number, how)
            else:
                self._dial_failed(conn, how)

    def _dial_failed(self, conn: Conn, how: str) -> None:
        failed = conn.master.why()
        kind, message, output = failed.kind, failed.message, failed.output
        if not output:
            message = how
        if kind == "auth" and self.config.restricted:
            message += (" (the tunnel's restricted key: expired or revoked? run reverse_forward() "
                        "again with the password to install a new one)")
        log.warning("[ssh %d] could not connect (%s): %s", conn.number, kind, message)
        self.last_error, self.error_kind = message, kind
        if not self.up_once and kind == "down" and "timed out" not in output:
            raise Fatal(kind, message)  # refused, no route: a wrong host or port, not an outage
        if kind == "down" and (self.config.via != "gcloud" or self.config.probe_host):
            self.server_down = True
            self.next_probe = time.monotonic() + PROBE_INTERVAL
            return
        if not self.up_once and kind in ("auth", "hostkey", "resolve"):
            raise Fatal(kind, message)
        self._retry_later()

    def _retry_later(self) -> None:
        delay = self.backoff.next()
        self.next_try = time.monotonic() + delay
        log.info("next try in %.1f s (%d failures in a row)", delay, self.backoff.failures)

    def _check_ready(self) -> None:
        for conn in self.conns:
            if not conn.ready and conn.master.ready:
                # ssh creates the control socket only once it is logged in
                conn.ready_at = time.monotonic()
                conn.lines_at_ready = len(conn.master.lines)
                log.info("[ssh %d] logged in after %.3f s", conn.number,
                         conn.ready_at - conn.master.started)
                conn.pid_query = _proc.start(
                    conn.master.mux(_ssh.session_pid_command(self.config.restricted)), env=self.env)
            if conn.pid_query is not None:
                done = _proc.finish(conn.pid_query)
                if done is None and time.monotonic() - (conn.ready_at or 0) > QUERY_TIMEOUT:
                    done = _proc.finish(conn.pid_query, timeout=0.1)
                if done is not None:
                    conn.pid_query = None
                    found = _SESSION.search(done.stdout)
                    if found:
                        conn.session_pid = int(found.group(1))
                        log.info("[ssh %d] server session pid %d", conn.number, conn.session_pid)
                    else:
                        log.info("[ssh %d] no session pid (%s)", conn.number,
                                 (done.stderr or done.stdout).strip()[-200:])

    def _keep_standby(self) -> None:
        if not self.config.reconnect and self.up_once:
            return
        spare = [c for c in self.conns if not c.active]
        if self.active is not None and not self.config.reconnect:
            return
        if not spare and self._may_dial():
            self._dial()

    def _restore(self) -> None:
        if time.monotonic() < self.next_try:
            return
        ready = [c for c in self.conns if c.ready and not c.active and c.master.alive]
        if ready:
            self._promote(ready[0])

    # --- the forward ---------------------------------------------------------------------------

    def _mux(self, conn: Conn, *args: str, timeout: float = 5) -> _proc.Result:
        done = _proc.finish(_proc.start(conn.master.mux(*args), env=self.env), timeout=timeout)
        assert done is not None
        return done

    def _promote(self, conn: Conn) -> None:
        spec = _ssh.reverse_spec(self.remote_port, self.config.local_port)
        deadline = time.monotonic() + FORWARD_RETRY
        reclaimed = False
        while True:
            done = self._mux(conn, "-O", "forward", "-R", spec)
            if done.returncode == 0:
                break
            text = (done.stderr or done.stdout).strip()
            if "forward" not in text or not conn.master.alive:
                log.warning("[ssh %d] could not add the forward: %s", conn.number, text)
                return  # the master is gone: _reap deals with it
            if self.orphans and not reclaimed:
                self._reclaim(conn)
                reclaimed = True
            if time.monotonic() > deadline:
                message = (f"remote port {self.remote_port} is already in use on the server "
                           f"({text.splitlines()[-1] if text else 'forward refused'})")
                self.last_error, self.error_kind = message, "busy"
                if not self.up_once:
                    raise Fatal("busy", message)
                log.warning("%s", message)
                self._retry_later()
                return
            time.sleep(0.005)
        if self.remote_port == 0:
            found = _ALLOCATED.search(done.stdout)
            if found:
                self.remote_port = int(found.group(1))
                log.info("the server allocated port %d", self.remote_port)
        conn.active = True
        self.active = conn
        self.backoff.reset()
        self.orphans = []
        self.up_once = True
        self.state, self.since = State.UP, time.time()
        if self.lost_at is not None:
            self.restarts += 1
            log.info("forward back on port %d %.3f s after it was lost (restart %d)",
                     self.remote_port, time.monotonic() - self.lost_at, self.restarts)
            self.lost_at = None
        else:
            log.info("forward up: server port %d -> localhost:%d", self.remote_port,
                     self.config.local_port)
        self._write_status()

    def _reclaim(self, conn: Conn) -> None:
        """End our own dead sessions that the server still keeps (they hold the port)."""
        log.info("[ssh %d] reclaiming the port from our dead sessions %s", conn.number, self.orphans)
        done = self._mux(conn, _ssh.reclaim_command(self.orphans, self.config.restricted),
                         timeout=QUERY_TIMEOUT)
        if done.returncode != 0:
            log.warning("[ssh %d] reclaim failed (exit %d): %s", conn.number, done.returncode,
                        (done.stderr or done.stdout).strip())

    # --- status --------------------------------------------------------------------------------

    def _write_status(self) -> None:
        standby = next((c for c in self.conns if not c.active), None)
        self.status_file.write({
            "state": self.state.value,
            "pid": os.getpid(),
            "ssh_pid": self.active.pid if self.active else None,
            "standby_pid": standby.pid if standby else None,
            "standby_ready": bool(standby and standby.ready),
            "remote_port": self.remote_port,
            "requested_port": self.requested_port,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "error_kind": self.error_kind,
            "since": self.since,
            "sessions": [c.session_pid for c in self.conns if c.session_pid] + self.orphans,
            "ssh_pids": [c.pid for c in self.conns],
        })

    def _shutdown(self) -> None:
        for conn in self.conns:
            conn.master.terminate()
        for conn in self.conns:
            conn.master.end(timeout=2)
            if conn.pid_query is not None:
                _proc.finish(conn.pid_query, timeout=0.5)
        self.conns = []
        self.active = None
        with contextlib.suppress(OSError):
            self.control_dir.rmdir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m colab_remote._supervisor")
    parser.add_argument("--run-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s.%(msecs)03d %(levelname)s %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S")
    config = TunnelConfig.load(args.run_dir)
    secret = _proc.receive_secret() if config.has_secret else None
    return Supervisor(config, secret).run()


if __name__ == "__main__":
    sys.exit(main())
