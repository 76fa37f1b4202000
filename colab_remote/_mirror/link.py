"""The mirror's way to the server: one ssh ControlMaster, and the commands that go through it.

The master logs in once (with the mirror's restricted key, or the password typed at its prompt);
the agent, rsync and every shell command then ride on its control socket without a handshake.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import _access, _proc, _ssh, _sync
from .._master import LoginFailed, Master
from ..errors import AuthenticationError, ColabRemoteError, MirrorError
from .config import MirrorConfig

log = logging.getLogger("colab_remote.mirror")

# rsync's exit codes that mean the connection (not the files) failed: the link is lost
RSYNC_LINK_FAILED = (255, 12, 10, 30, 35, -9)


class ConnectionLost(Exception):
    """The channel to the server broke; pending changes are kept and sent after a reconnect."""


class Link:
    """The ControlMaster of one mirror (``sock_dir/cm``) and argv for commands through it."""

    def __init__(self, cfg: MirrorConfig, password: str | None, *, early: object = None) -> None:
        self.cfg = cfg
        self.password = password
        self.dest = _ssh.Destination(cfg.user, cfg.host, cfg.path)
        self.control_path = Path(cfg.sock_dir) / "cm"
        self.master: Master | None = None
        self.early = early  # the first login's ssh, started before the imports (see .boot)

    def options(self) -> dict[str, str | int]:
        """ssh options of the master; every later command goes through its control socket."""
        opts: dict[str, str | int] = {
            # a silent link ends the master after 12 s (as the tunnel's): (3 + 1) keepalives
            "ServerAliveInterval": _ssh.TUNNEL_ALIVE_INTERVAL,
            "ServerAliveCountMax": _ssh.TUNNEL_ALIVE_COUNT, "TCPKeepAlive": "yes",
            "ConnectTimeout": 10, "NumberOfPasswordPrompts": 1,
            "BatchMode": "no" if self.password else "yes", "PermitLocalCommand": "no",
            "Compression": "no", "LogLevel": "ERROR",
        }
        opts.update(_ssh.host_key_options(Path(self.cfg.known_hosts), pinned=self.cfg.pinned))
        if self.cfg.identity_file:
            opts["IdentityFile"] = self.cfg.identity_file
            opts["IdentitiesOnly"] = "yes"
            if self.cfg.restricted:
                opts["IdentityAgent"] = "none"
                opts["PasswordAuthentication"] = "no"
        elif self.password:
            opts["PubkeyAuthentication"] = "no"
            opts["PreferredAuthentications"] = "password,keyboard-interactive"
        return opts

    def master_argv(self) -> list[str]:
        """The master's ssh (what :mod:`.boot` starts for the first login, written in the config)."""
        return _ssh.master_argv(self.cfg.ssh, self.dest, port=self.cfg.port,
                                control_path=self.control_path, options=self.options())

    @property
    def up(self) -> bool:
        return self.master is not None and self.master.alive

    @property
    def exit_text(self) -> str:
        return self.master.exit_text if self.master is not None else "not started"

    @property
    def pid(self) -> int | None:
        return self.master.pid if self.master is not None and self.master.child is not None else None

    def open(self, timeout: float = 30) -> None:
        """Log in (the password typed once at most); raise our own error on failure."""
        self.close()
        self.master = Master(self.master_argv(), self.control_path, self.password)
        early, self.early = self.early, None
        try:
            self.master.start(early).wait(timeout)
        except LoginFailed as e:
            self.close()
            raise self._login_error(e, timeout) from None
        log.info("connected to %s port %s", self.dest.target, self.cfg.port)

    def _login_error(self, e: LoginFailed, timeout: float) -> ColabRemoteError:
        text = e.output[-2000:]
        if e.kind == "auth":
            if self.cfg.restricted:
                return AuthenticationError(
                    f"{self.dest.target} refused the mirror's restricted key (expired or revoked?)",
                    log_tail=text, fix="run mirror() again with the password: it installs a new key")
            return AuthenticationError(f"{self.dest.target} refused the login: {e.message}",
                                       log_tail=text, fix="pass the right password= (or identity_file=)")
        if e.kind == "hostkey":
            return MirrorError(f"the host key of {self.dest.host} does not match the one on record",
                               log_tail=text,
                               fix=f"if the server was reinstalled, remove its line from "
                                   f"{self.cfg.known_hosts}; otherwise do not connect")
        if e.kind == "timeout":
            return MirrorError(f"no SSH connection to {self.dest.target} port {self.cfg.port} "
                               f"within {timeout:g} s", log_tail=text,
                               fix="check the host, the port and that the server is up")
        return MirrorError(f"ssh to {self.dest.target} port {self.cfg.port} failed", log_tail=text,
                           fix="check the host, the port and that sshd runs there")

    @property
    def login(self) -> _access.Login:
        cfg = self.cfg
        return _access.Login(ssh=cfg.ssh, dest=self.dest, port=cfg.port,
                             known_hosts=Path(cfg.known_hosts), pinned=cfg.pinned,
                             identity_file=cfg.identity_file)

    def installed(self, purpose: dict[str, Any]) -> tuple[str, bool]:
        """``restricted=False``: how to start this version's agent where a set-up installed it (no
        set-up then: one command on the server less at start-up), and whether it is on record (a
        set-up through this login, see :func:`colab_remote._access.installed_agent`)."""
        command, recorded = _access.installed_agent(Path(self.cfg.state_dir), self.login, purpose)
        return shlex.join(command), recorded

    def set_up(self, purpose: dict[str, Any]) -> tuple[str, bytes]:
        """``restricted=False``: the command (and its stdin) that installs the agent through this
        login (no second login for the set-up) and then runs it (see :meth:`set_up_said`)."""
        _access.forget_agent(Path(self.cfg.state_dir), self.login)  # until the set-up says again
        return _access.setup_then_mirror(Path(self.cfg.state_dir), purpose)

    def set_up_said(self, purpose: dict[str, Any], said: str) -> str | None:
        """How to start the agent from now on, by what the set-up said; None: the server has no
        python3 (the mirror copies with rsync alone)."""
        command = _access.mirror_set_up(Path(self.cfg.state_dir), self.login, purpose, said,
                                        MirrorError)
        return shlex.join(command) if command is not None else None

    def close(self) -> None:
        if self.master is not None:
            self.master.end()
            self.master = None

    # --- commands through the master -------------------------------------------------------------
    def mux(self, *args: str) -> list[str]:
        """A command through the master (the known_hosts path names our state folder in ps)."""
        assert self.master is not None
        return self.master.mux(*args, options=["-o", "ControlMaster=no",
                                               "-o", f"UserKnownHostsFile={self.cfg.known_hosts}"])

    def rsync_e(self) -> str:
        """rsync's ``-e``: ssh through the master (rsync appends the host)."""
        return _ssh.rsync_ssh_command(self.mux()[:-1])

    @property
    def rsync_dest(self) -> str:
        return f"{self.dest.rsync_host}:{_sync.remote_path(self.dest.path)}"

    def run_rsync(self, argv: list[str], *, data: bytes | None = None, timeout: float = 3600,
                  on_output: Callable[[bytes], None] | None = None) -> str:
        """Run rsync through the master: "" when it worked, a warning when files failed;
        :class:`ConnectionLost` when the connection did. ``on_output`` gets rsync's stdout as it
        comes (its ``--info=progress2`` lines)."""
        done = _proc.run(argv, input=data, timeout=timeout, check=False, on_output=on_output)
        rc, output = done.returncode, done.tail if on_output is None else _proc.last_lines(done.stderr)
        if _sync.rsync_exit_ok(rc, done.stdout + done.stderr):  # 23 for files deleted meanwhile
            return ""
        if rc in RSYNC_LINK_FAILED or not self.up:
            raise ConnectionLost(f"rsync exit {rc}: {output[-500:]}")
        return f"rsync exit {rc}: {output[-1000:]}"
