"""status(), stop_all() and self_check(): what runs from a state folder, and whether it works.

Everything here is found from the state folder alone, so a fresh kernel (after a restart) sees
and stops what an earlier one started.
"""

from __future__ import annotations

import html
import os
import pwd
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _proc, _ssh
from .errors import ColabRemoteError
from .server import Sshd, announce, load_sshd, state_path

__all__ = ["CheckResult", "Status", "self_check", "status", "stop_all"]


@dataclass
class Status:
    """The sshd, tunnels and mirrors recorded in one state folder."""

    state_dir: Path
    sshd: Sshd | None
    tunnels: list[Any] = field(default_factory=list)
    mirrors: list[Any] = field(default_factory=list)

    def handles(self) -> list[Any]:
        return [h for h in [self.sshd, *self.tunnels, *self.mirrors] if h is not None]

    def __repr__(self) -> str:
        lines = [f"colab-remote status ({self.state_dir})"]
        shown = self.handles()
        lines += [f"  {h!r}" for h in shown] or ["  nothing recorded"]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        cards = "".join(h._repr_html_() for h in self.handles())
        return (f"<div class='colab-remote-status'><b>colab-remote</b> "
                f"<code>{html.escape(str(self.state_dir))}</code>"
                f"{cards or '<p>nothing recorded</p>'}</div>")


def status(state_dir: str | os.PathLike[str] | None = None, *, display: bool = False) -> Status:
    """Find every sshd, tunnel and mirror recorded in ``state_dir`` (running or not).

    Example:
        >>> colab_remote.status()  # doctest: +SKIP
        colab-remote status (/root/.colab_remote)
          <Sshd root@:22 up, pid 812>
          <Tunnel bob@example.org -R 20022:localhost:22 up, 0 restarts>
    """
    from .mirror import find_mirrors
    from .reverse import find_tunnels

    state = state_path(state_dir)
    found = Status(state, load_sshd(state), find_tunnels(state), find_mirrors(state))
    if display:
        announce(found)
    return found


def stop_all(state_dir: str | os.PathLike[str] | None = None) -> int:
    """Stop every mirror, tunnel and sshd started from ``state_dir``; return how many ran.

    Mirrors go first and push what is pending; the sshd goes last.

    Example:
        >>> colab_remote.stop_all()  # doctest: +SKIP
        3
    """
    from .mirror import stop_mirrors
    from .reverse import stop_tunnels

    state = state_path(state_dir)
    count = stop_mirrors(state) + stop_tunnels(state)
    sshd = load_sshd(state)
    if sshd is not None and sshd.alive:
        sshd.stop()
        count += 1
    elif sshd is None:
        # Started, but start_sshd() was interrupted before it recorded info.json: the pid file
        # (written by the launcher) and the config path still say which process is ours.
        run_dir = state / "sshd"
        count += _proc.stop(_proc.read_pid(run_dir / "sshd.pid"), marker=str(run_dir / "sshd_config"))
    return count


@dataclass
class CheckResult:
    """What :func:`self_check` ran through the tunnel, and what came back."""

    ok: bool
    command: str
    output: str
    connection_string: str

    def __repr__(self) -> str:
        head = "OK" if self.ok else "FAILED"
        return f"self-check {head}: {self.connection_string} {self.command!r}\n{self.output}"

    def _repr_html_(self) -> str:
        color = "green" if self.ok else "red"
        return (f"<div><b style='color:{color}'>self-check {'OK' if self.ok else 'FAILED'}</b> "
                f"<code>{html.escape(self.connection_string)} {html.escape(self.command)}</code>"
                f"<pre>{html.escape(self.output)}</pre></div>")


def self_check(sshd: Sshd | None = None, tunnel: Any = None, *, server_password: str | None = None,
               password: str | None = None, command: str | None = None,
               state_dir: str | os.PathLike[str] | None = None, timeout: float = 60,
               quiet: bool = False) -> CheckResult:
    """Log in the way a laptop would (through the server and the tunnel) and run a command.

    Runs ``nvidia-smi`` when the runtime has one, else ``hostname``. The runtime's host key is
    checked strictly against the keys this sshd serves, so a success also proves that nobody sits
    in between.

    Args:
        sshd: the :class:`Sshd` (default: the one recorded in ``state_dir``).
        tunnel: the :class:`Tunnel` (default: the first recorded in ``state_dir``).
        server_password: the server's password (None: keys or the agent).
        password: the runtime user's password (default ``sshd.password``; key-only sshd: a
            one-off key is added for the check and removed afterwards).
        command: what to run instead of nvidia-smi / hostname.

    Example:
        >>> colab_remote.self_check(sshd, tunnel, server_password=pw)  # doctest: +SKIP
        self-check OK: ssh -J bob@example.org -p 20022 root@localhost 'hostname'
    """
    from .reverse import find_tunnels

    state = Path(sshd.state_dir) if sshd is not None else state_path(state_dir)
    sshd = sshd or load_sshd(state)
    if tunnel is None:
        tunnels = find_tunnels(state)
        tunnel = tunnels[0] if tunnels else None
    if sshd is None or tunnel is None:
        raise ValueError("self_check needs a running sshd and tunnel: start_sshd() and "
                         "reverse_forward() first (or pass them)")
    if server_password is not None:
        _ssh.check_password(server_password)
    if command is None:
        command = "nvidia-smi" if shutil.which("nvidia-smi") else "hostname"
    password = password or sshd.password
    ssh = _proc.require_program("ssh", package="openssh-client", install=False, error=ColabRemoteError)
    with tempfile.TemporaryDirectory(prefix="colab-remote-check-") as tmp:
        # Strict host-key checking against the keys this sshd serves: a success proves the
        # connection reached this runtime and nothing in between.
        known = Path(tmp) / "known_hosts"
        keys = sorted((sshd.run_dir / "host_keys").glob("*.pub"))
        known.write_text("".join(f"colab-runtime {' '.join(k.read_text().split()[:2])}\n" for k in keys))
        options = {k: v for k, v in tunnel.config.get("options", {}).items()
                   if k not in ("ExitOnForwardFailure", "PermitLocalCommand", "BatchMode")}
        jump = _jump_command(ssh, tunnel, options)
        argv = [ssh, "-p", str(tunnel.remote_port), "-o", f"ProxyCommand={jump}",
                "-o", "HostKeyAlias=colab-runtime", "-o", f"UserKnownHostsFile={known}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
                "-o", "NumberOfPasswordPrompts=1", "-o", "ConnectTimeout=15"]
        one_off = None
        if password is None:
            one_off = _one_off_key(sshd, Path(tmp))
            argv += ["-i", str(one_off), "-o", "IdentitiesOnly=yes"]
        else:
            argv += ["-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password"]
        argv += [f"{sshd.user}@localhost", command]
        # Prompts come in order: the server's (when it wants a password), then the runtime's.
        answers = [p for p in (server_password, password) if p is not None]
        try:
            code, output = _proc.converse(argv, answers, timeout=timeout)
        finally:
            if one_off is not None:
                _forget_one_off_key(sshd, one_off)
        ok = code == 0
    result = CheckResult(ok, command, output, tunnel.connection_string)
    if not quiet:
        announce(result)
    return result


def _jump_command(ssh: str, tunnel: Any, options: dict[str, Any]) -> str:
    """ProxyCommand text for the jump to the server (what ``ssh -J`` runs, with our options)."""
    config = tunnel.config
    if config.get("via") == "gcloud":
        from . import _gcloud

        dest = _ssh.Destination(config["user"], config["host"])
        argv = _gcloud.gcloud_ssh_argv(config["gcloud"], dest, zone=config.get("zone"),
                                       project=config.get("project"),
                                       ssh_flags=_ssh.ssh_option_argv(options),
                                       command=["-W", "localhost:%p"])
    else:
        argv = [ssh, "-W", "localhost:%p", "-p", str(config["port"]), *_ssh.ssh_option_argv(options),
                _ssh.Destination(config["user"], config["host"]).target]
    # ssh hands ProxyCommand to a shell: quote every word (no user text gets interpreted).
    return " ".join(a if "%p" in a else shlex.quote(a) for a in argv)


def _one_off_key(sshd: Sshd, folder: Path) -> Path:
    key = folder / "check_key"
    _proc.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "colab-remote-self-check",
               "-f", str(key)], what="making a one-off key for the self-check failed")
    from ._home import add_authorized_keys
    from .server import _ensure_user

    line = 'from="127.0.0.1,::1" ' + Path(str(key) + ".pub").read_text().strip()
    add_authorized_keys(_ensure_user(sshd.user, locked_ok=True), [line])
    return key


def _forget_one_off_key(sshd: Sshd, key: Path) -> None:
    from ._home import remove_authorized_key

    blob = Path(str(key) + ".pub").read_text().split()[1]
    remove_authorized_key(pwd.getpwnam(sshd.user), blob)
