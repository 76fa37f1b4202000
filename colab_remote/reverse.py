"""reverse_forward(): a self-healing reverse tunnel from the runtime to the user's server.

A notebook runtime has no inbound path, so it dials out to a server the user owns and forwards a
port there back to its sshd; the user then logs in with ``ssh -J user@server -p 20022
root@localhost``. The recipe this grew from ran one ``ssh -fNR`` with
``StrictHostKeyChecking=no`` and nothing to bring it back. Here a small supervisor
(:mod:`colab_remote._supervisor`) runs detached in its own session, keeps a standby connection
logged in so a dead one is replaced in milliseconds, and records its state in ``state_dir`` so a
new kernel can find and stop it.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from . import _access, _html, _install, _proc, _ssh
from ._daemon import Handle, State, socket_dir, state_path
from ._html import Announcement, announce
from ._supervisor import TunnelConfig
from .errors import AuthenticationError, ColabRemoteError, TunnelError
from .server import load_sshd

__all__ = ["Tunnel", "find_tunnels", "load_tunnel", "reverse_forward", "stop_tunnels"]

log = logging.getLogger(__name__)

VIAS = ("ssh", "gcloud")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9.-]")


class Tunnel(Handle):
    """A reverse tunnel kept up by a detached supervisor (see :func:`reverse_forward`).

    Everything is read from the supervisor's status file, so a handle made by
    :func:`load_tunnel` in a new kernel sees the same tunnel.
    """

    kind = "tunnels"
    log_name = "supervisor"
    config_type = TunnelConfig
    config: TunnelConfig

    def status(self) -> dict[str, Any]:
        """The supervisor's status: state, pid, ssh_pid, remote_port, restarts, last_error, since."""
        return super().status()

    def _gone(self, status: dict[str, Any]) -> None:
        status["ssh_pid"] = None

    @property
    def ssh_pid(self) -> int | None:
        """The pid of the ssh process that carries the forward right now (None while down)."""
        pid = self.status().get("ssh_pid")
        return int(pid) if pid is not None else None

    @property
    def remote_port(self) -> int:
        """The port on the server (the one it picked when ``remote_port=0`` was asked)."""
        return int(self.status().get("remote_port") or self.config.remote_port)

    @property
    def restarts(self) -> int:
        """How many times the forward was re-established."""
        return int(self.status().get("restarts", 0))

    # --- what the user types ------------------------------------------------------------------

    @property
    def jump(self) -> str:
        """The ``-J`` argument: the server as the user's laptop reaches it."""
        dest = _ssh.Destination(self.config.user, self.config.public_host or self.config.host)
        return _ssh.jump_spec(dest, self.config.port)

    @property
    def login_user(self) -> str:
        return self.config.login_user

    @property
    def connection_string(self) -> str:
        """``ssh -J user@server -p 20022 root@localhost``."""
        return _ssh.connection_string(self.jump, remote_port=self.remote_port,
                                      login_user=self.login_user)

    def ssh_config(self, alias: str = "colab") -> str:
        """A ``~/.ssh/config`` block for this tunnel (for ``ssh colab`` and VS Code Remote-SSH).

        Example:
            >>> print(tunnel.ssh_config())  # doctest: +SKIP
            Host colab
                HostName localhost
                Port 20022
                User root
                ProxyJump bob@example.org
                HostKeyAlias colab
                ServerAliveInterval 15
        """
        return _ssh.ssh_config_block(alias, jump=self.jump, remote_port=self.remote_port,
                                     login_user=self.login_user)

    def access(self) -> str:
        """What this tunnel logs in to the server with (and so what the runtime holds)."""
        if self.config.restricted:
            expires = self.config.key_expires
            when = time.strftime(" until %Y-%m-%d %H:%M UTC", time.gmtime(float(expires))) if expires else ""
            return f"a key for this tunnel only{when} (no shell, no other port)"
        if self.config.has_secret:
            return "your password, in the supervisor's memory (unrestricted)"
        return "your own key or agent (unrestricted)"

    def known_hosts(self, alias: str = "colab") -> str:
        """``~/.ssh/known_hosts`` lines for the laptop: the runtime's host keys under ``alias`` (the
        ``HostKeyAlias`` of :meth:`ssh_config`), so the laptop checks the runtime's key from the
        first login instead of accepting whatever answers. Empty when this state folder has no
        sshd of :func:`start_sshd`.

        Example:
            >>> print(tunnel.known_hosts())  # doctest: +SKIP
            colab ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI...
        """
        _ssh.ssh_config_block(alias, jump="x", remote_port=1, login_user="x")  # checks the alias
        keys = sorted((self.run_dir.parent.parent / "sshd" / "host_keys").glob("*.pub"))
        lines = []
        for key in keys:
            words = key.read_text().split()
            if len(words) >= 2:
                lines.append(f"{alias} {words[0]} {words[1]}")
        return "\n".join(lines) + ("\n" if lines else "")

    def stop(self) -> None:
        """Stop the supervisor and its ssh connections. Safe to call twice."""
        self._stop_process(also=self.status().get("ssh_pids", []))

    # --- display -------------------------------------------------------------------------------

    def _spec(self) -> str:
        return f"-R {self.remote_port}:localhost:{self.config.local_port}"

    def __repr__(self) -> str:
        status = self.status()
        restarts = int(status.get("restarts", 0))
        return (f"<Tunnel {self.config.destination} {self._spec()} {State.of(status.get('state'))}, "
                f"{restarts} restart{'' if restarts == 1 else 's'}>")

    def summary(self) -> str:
        """The tunnel and how to use it, as text."""
        status = self.status()
        lines = [
            f"tunnel {State.of(status.get('state'))}: {self.config.destination} {self._spec()}"
            f" (supervisor pid {status.get('pid')}, {status.get('restarts', 0)} restarts)",
            f"server access: {self.access()}",
            "connect from your laptop with",
            f"  {self.connection_string}",
            "or put this in ~/.ssh/config (VS Code Remote-SSH: host 'colab'):",
            *("  " + line for line in self.ssh_config().splitlines()),
        ]
        known = self.known_hosts()
        if known:
            lines += ["and this in ~/.ssh/known_hosts (the runtime's host keys: nothing else is accepted):",
                      *("  " + line for line in known.splitlines())]
        if status.get("last_error") and State.of(status.get("state")) is not State.UP:
            lines.append(f"last error: {status['last_error']}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        status = self.status()
        rows = [("server", self.config.destination),
                ("forward", self._spec()),
                ("server access", self.access()),
                ("restarts", str(status.get("restarts", 0))),
                ("supervisor pid", str(status.get("pid")))]
        if status.get("since"):
            since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(status["since"])))
            rows.append(("since", since))
        if status.get("last_error"):
            rows.append(("last error", str(status["last_error"])))
        blocks = [("connect", self.connection_string),
                  ("~/.ssh/config (VS Code Remote-SSH)", self.ssh_config())]
        known = self.known_hosts()
        if known:
            blocks.append(("~/.ssh/known_hosts (the runtime's host keys)", known))
        return _html.card("reverse tunnel", State.of(status.get("state")), rows, blocks)


def find_tunnels(state_dir: str | os.PathLike[str] | None = None) -> list[Tunnel]:
    """Every tunnel recorded in ``state_dir`` (running or not)."""
    return Tunnel.find(state_path(state_dir))


def load_tunnel(state_dir: str | os.PathLike[str] | None = None, remote_port: int | None = None
                ) -> Tunnel | None:
    """The running tunnel of ``state_dir`` on ``remote_port`` (any port when None), or None.

    Example:
        >>> load_tunnel("~/.colab_remote", 20022).stop()  # doctest: +SKIP
    """
    if remote_port is not None:
        _ssh.check_port(remote_port, "remote_port")
    for tunnel in find_tunnels(state_dir):
        if not tunnel.alive:
            continue
        if remote_port is None or remote_port in (tunnel.remote_port, tunnel.config.remote_port):
            return tunnel
    return None


def stop_tunnels(state_dir: str | os.PathLike[str] | None = None) -> int:
    """Stop every tunnel of ``state_dir``; return how many were running."""
    stopped = 0
    for tunnel in find_tunnels(state_dir):
        if tunnel.alive:
            stopped += 1
        tunnel.stop()
    return stopped


def reverse_forward(
    destination: str,
    *,
    remote_port: int = 20022,
    local_port: int | None = None,
    port: int = 22,
    password: str | None = None,
    identity_file: str | os.PathLike[str] | None = None,
    via: str = "ssh",
    zone: str | None = None,
    project: str | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    host_key: str | None = None,
    reconnect: bool = True,
    timeout: float = 30,
    restricted: bool = True,
    key_days: float = _access.KEY_DAYS,
    quiet: bool = False,
) -> Tunnel:
    """Forward ``remote_port`` on the server back to this runtime's sshd, and keep it up.

    The first login (the password, or your own key) installs a key for this tunnel alone on the
    server: it may listen on ``remote_port`` on the server's loopback and nothing else (no shell,
    no other port), and expires after ``key_days``. The detached supervisor logs in with that key
    only; the password is not kept anywhere in the runtime.

    Args:
        destination: the server as ``user@host`` (``user@[v6addr]``); with ``via="gcloud"``,
            ``user@INSTANCE`` (or just ``INSTANCE``).
        remote_port: the port on the server; 0 lets the server pick one (see the handle's
            ``remote_port``), and reconnections ask for that same port again.
        local_port: the runtime's sshd port (default: that of :func:`start_sshd` in the same
            ``state_dir``, else 22).
        port: the server's SSH port.
        password: the server password (also used as the passphrase of ``identity_file``); typed
            at ssh's prompt, never put in argv, the environment or a file.
        identity_file: a private key to log in with (default: the agent and the default keys).
        via: ``"ssh"`` or ``"gcloud"`` (``gcloud compute ssh`` to a Compute Engine VM).
        zone, project: the VM's zone and project (``via="gcloud"``).
        state_dir: where status and logs live (default ``~/.colab_remote``).
        host_key: the server's host key, pinned: a ``SHA256:`` fingerprint or a key line.
            Without it the first connection records the key (``accept-new``).
        reconnect: bring the forward back whenever it drops (the point of this function).
        timeout: seconds to wait for the forward to come up.
        restricted: install and use a restricted key (the default). ``False`` keeps the
            password (in the supervisor's memory) or ``identity_file`` for every login: whatever
            runs in the runtime can then log in to your server as you. ``identity_file`` is used
            as given (no key is installed).
        key_days: the restricted key's lifetime (``expiry-time`` on the server).
        quiet: do not print or display the connection details.

    Returns:
        a :class:`Tunnel` handle.

    Raises:
        AuthenticationError: the server refused the password or key.
        TunnelError: the port is taken on the server, the host key does not match, or the
            server does not answer.

    Example:
        >>> t = reverse_forward("bob@example.org", password="...")  # doctest: +SKIP
        >>> t.connection_string                                     # doctest: +SKIP
        'ssh -J bob@example.org -p 20022 root@localhost'
    """
    if via not in VIAS:
        raise ValueError(f"via must be one of {', '.join(map(repr, VIAS))}, got {via!r}")
    if via == "gcloud":
        from . import _gcloud

        if isinstance(destination, str) and "@" not in destination:
            if not destination:
                raise ValueError("via='gcloud' needs an instance name: 'user@INSTANCE' or 'INSTANCE'")
            destination = f"{getpass.getuser()}@{destination}"
        if isinstance(destination, str) and destination.endswith("@"):
            raise ValueError(f"via='gcloud' needs an instance name after '@': {destination!r}")
        dest = _ssh.parse_destination(destination)
        _gcloud.check_instance(dest.host)
        if zone is not None:
            _gcloud.check_zone(zone)
        if project is not None:
            _gcloud.check_project(project)
    else:
        dest = _ssh.parse_destination(destination)
        for name, value in (("zone", zone), ("project", project)):
            if value is not None:
                raise ValueError(f"{name}= is for via='gcloud'; got {name}={value!r} with via='ssh'")
    _ssh.check_port(remote_port, "remote_port", allow_zero=True)
    _ssh.check_port(port, "port")
    if local_port is not None:
        _ssh.check_port(local_port, "local_port")
    if password is not None:
        _ssh.check_password(password)
    key_path: str | None = None
    if identity_file is not None:
        if not isinstance(identity_file, (str, os.PathLike)):
            raise TypeError(f"identity_file must be a path, got {identity_file!r}")
        key = Path(identity_file).expanduser()
        if not key.is_file():
            raise ValueError(f"identity_file {key} is not a file")
        key_path = str(key.resolve())
    if host_key is not None:
        host_key = _ssh.check_host_key(host_key)
        if via == "gcloud":
            raise ValueError("host_key= is for via='ssh'; gcloud pins the VM's host key itself")
    for name, flag in (("reconnect", reconnect), ("restricted", restricted)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    _access.check_days(key_days)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    state = state_path(state_dir)

    ssh = _install.require_program("ssh", package="openssh-client", install=True, error=TunnelError)
    sshd = load_sshd(state)
    login_user = sshd.user if sshd is not None else "root"
    if local_port is None:
        local_port = sshd.port if sshd is not None else 22

    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    name = f"{remote_port}-" + ("gcloud-" if via == "gcloud" else "") + \
        _SAFE_NAME.sub("_", dest.host) + f"-{port}"
    run_dir = Tunnel.folder(state) / name
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    config: dict[str, Any] = {
        "destination": str(dest), "user": dest.user, "host": dest.host, "port": port,
        "remote_port": remote_port, "local_port": local_port, "login_user": login_user,
        "via": via, "ssh": ssh, "reconnect": reconnect, "start_timeout": timeout,
        "has_secret": False, "restricted": False,
        "control_dir": str(socket_dir(run_dir)),
    }
    purpose = {"purpose": "tunnel", "port": remote_port,
               "name": "tunnel-" + _access.short_hash(f"{dest}:{port}:{remote_port}:{via}")}
    secret = password
    if via == "gcloud":
        from . import _gcloud

        gcloud = _gcloud.find_gcloud()
        public = _gcloud.external_ip(gcloud, dest.host, zone, project)
        config.update(gcloud=gcloud, zone=zone, project=project, public_host=public, probe_host=public)
        if restricted and key_path is None:
            # gcloud (and its own key) for the set-up only; then plain ssh to the VM's address
            # with a restricted key, checked against the host key gcloud recorded for the VM
            runner = _gcloud.SetupRunner(gcloud, dest, zone, project, port)
            runner.prepare()
            ident = _gcloud.instance_id(gcloud, dest.host, zone, project)
            recorded = _gcloud.recorded_host_keys(os.path.expanduser("~"), ident)
            if not recorded:
                raise TunnelError(f"gcloud recorded no host key for {dest.host} (compute.{ident})",
                                  fix="connect once with gcloud compute ssh, or pass restricted=False")
            known_hosts = run_dir / "known_hosts.pinned"
            _proc.write_private(known_hosts, "".join(
                _ssh.known_hosts_line(public, port, line) + "\n" for line in recorded))
            login = _access.Login(ssh=ssh, dest=_ssh.Destination(dest.user, public), port=port,
                                  known_hosts=known_hosts, pinned=True)
            granted = _access.grant(state, login, purpose, password=None, days=key_days,
                                    error=TunnelError, quiet=True, runner=runner)
            assert granted.key is not None and granted.port is not None
            config.update(restricted=True, connect_host=public, remote_port=granted.port,
                          key_id=granted.key_id, key_expires=granted.expires,
                          options=_ssh.tunnel_options(known_hosts=known_hosts, pinned=True,
                                                      identity_file=str(granted.key), password=False))
            secret = None
        else:
            if not quiet:
                print(_access.unrestricted_warning(dest, "tunnel", key_path or "gcloud's own"),
                      flush=True)
            config.update(has_secret=password is not None,
                          options=_ssh.tunnel_options(known_hosts=None, pinned=False,
                                                      identity_file=key_path, password=False))
    else:
        known_hosts, _ = _access.known_hosts_file(state, run_dir, dest, port, host_key, TunnelError)
        if restricted and key_path is None:
            login = _access.Login(ssh=ssh, dest=dest, port=port, known_hosts=known_hosts,
                                  pinned=host_key is not None)
            granted = _access.grant(state, login, purpose, password=password, days=key_days,
                                    error=TunnelError, quiet=quiet)
            assert granted.key is not None and granted.port is not None
            key_path, secret = str(granted.key), None  # the password goes no further
            config.update(restricted=True, remote_port=granted.port, key_id=granted.key_id,
                          key_expires=granted.expires)
        elif not quiet:
            print(_access.unrestricted_warning(dest, "tunnel", key_path), flush=True)
        config["has_secret"] = secret is not None
        config["options"] = _ssh.tunnel_options(known_hosts=known_hosts, pinned=host_key is not None,
                                                identity_file=key_path,
                                                password=secret is not None)
    config["reclaim"] = _previous_sessions(run_dir)  # the tunnel this call replaces: stopped
    for stale in ("status.json", "supervisor.log"):
        with contextlib.suppress(FileNotFoundError):
            (run_dir / stale).unlink()
    TunnelConfig(run_dir=str(run_dir), **config).save()

    t0 = time.monotonic()
    pid = _proc.spawn_detached([sys.executable, "-m", "colab_remote._supervisor", "--run-dir",
                                str(run_dir)], run_dir=run_dir, name="supervisor", secret=secret)
    tunnel = Tunnel(run_dir)

    def settled() -> bool:
        return not _proc.pid_alive(pid) or tunnel.status().get("state") in ("up", "failed")

    _proc.wait_until(settled, timeout + 10, interval=0.01)
    status = tunnel.status()
    if status.get("state") != "up":
        tunnel.stop()
        raise _failure(status, tunnel, dest, remote_port, port)
    log.info("tunnel up in %.3f s: %r", time.monotonic() - t0, tunnel)
    if not quiet:
        announce(Announcement(tunnel.summary(), tunnel._repr_html_()))
    return tunnel


def _failure(status: dict[str, Any], tunnel: Tunnel, dest: _ssh.Destination, remote_port: int,
             port: int) -> ColabRemoteError:
    kind = status.get("error_kind", "")
    error = status.get("last_error") or "the supervisor stopped"
    logs = tunnel.logs(15)
    if kind == "auth":
        return AuthenticationError(
            f"{dest.user}@{dest.host} refused the login: {error}", log_tail=logs,
            fix="check the user and password (or identity_file); the server must allow "
                "password or key login for that user")
    if kind == "busy":
        return TunnelError(
            f"remote port {remote_port} is already in use on {dest.host}", log_tail=logs,
            fix="pick another port, or remote_port=0 to let the server choose a free one")
    if kind == "hostkey":
        return TunnelError(
            f"the host key of {dest.host} does not match: {error}", log_tail=logs,
            fix="check the server's fingerprint (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub "
                f"on the server); if the key really changed, remove its line from "
                f"{tunnel.config.options.get('UserKnownHostsFile', 'the known_hosts file')}")
    if kind in ("down", "resolve", "timeout"):
        return TunnelError(
            f"could not reach {dest.host} port {port}: {error}", log_tail=logs,
            fix="check the host name, the port (port=) and that the server's sshd runs")
    return TunnelError(f"the tunnel to {dest.host} did not come up: {error}", log_tail=logs,
                       fix="read the log above; tunnel.logs() has more")


def _previous_sessions(run_dir: Path) -> list[int]:
    """Stop the tunnel this call replaces; return its server session pids for reclaiming."""
    if not (run_dir / "config.json").is_file():
        return []
    try:
        old = Tunnel(run_dir)
    except (OSError, ValueError, KeyError):
        return []
    sessions = [int(p) for p in old.status().get("sessions", []) if isinstance(p, int)]
    old.stop()
    return sessions


