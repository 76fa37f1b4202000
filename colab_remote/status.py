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

from . import _access, _install, _proc, _ssh
from ._daemon import state_path
from ._html import announce
from .errors import ColabRemoteError
from .server import Sshd, load_sshd

__all__ = ["CheckResult", "Status", "revoke", "self_check", "status", "stop_all"]


@dataclass
class Status:
    """The sshd, tunnels, mirrors and syncs recorded in one state folder: running ones first,
    then the records of those that stopped or failed (:func:`stop_all` removes a tunnel's,
    mirror's or sync's)."""

    state_dir: Path
    sshd: Sshd | None
    tunnels: list[Any] = field(default_factory=list)
    mirrors: list[Any] = field(default_factory=list)
    syncs: list[Any] = field(default_factory=list)

    def handles(self) -> list[Any]:
        return [h for h in [self.sshd, *self.tunnels, *self.mirrors, *self.syncs] if h is not None]

    def running(self) -> list[Any]:
        """The handles whose process runs."""
        return [h for h in self.handles() if h.alive]

    def not_running(self) -> list[Any]:
        """The handles of what stopped or failed (a record in the state folder, no process)."""
        return [h for h in self.handles() if not h.alive]

    def __repr__(self) -> str:
        running, dead = self.running(), self.not_running()
        lines = [f"colab-remote status ({self.state_dir})"]
        lines += [f"  {h!r}" for h in running] or ["  nothing running"]
        if dead:
            lines.append("  not running (stop_all() or `colab-remote stop` removes these records; "
                         "an sshd's host keys stay):")
            lines += [f"    {h!r}{_why(h)}" for h in dead]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        running, dead = self.running(), self.not_running()
        cards = "".join(h._repr_html_() for h in running) or "<p>nothing running</p>"
        if dead:
            cards += ("<p>not running (<code>stop_all()</code> removes these records):</p>"
                      + "".join(h._repr_html_() for h in dead))
        return (f"<div class='colab-remote-status'><b>colab-remote</b> "
                f"<code>{html.escape(str(self.state_dir))}</code>{cards}</div>")


def _why(handle: Any) -> str:
    """``: <first line of its error>`` for a failed tunnel or mirror, else ''."""
    if isinstance(handle, Sshd):
        return ""
    error = handle.last_error if handle.state == "failed" else ""
    first = error.strip().splitlines()[0] if error.strip() else ""
    return f": {first[:160]}" if first else ""


def _name(handle: Any) -> str:
    """What the user knows a handle by: ``tunnel bob@host -R 20022:localhost:22``."""
    if isinstance(handle, Sshd):
        host = handle.listen_address or "*"
        return f"sshd {handle.user}@{f'[{host}]' if ':' in host else host}:{handle.port}"
    if hasattr(handle, "ssh_config"):
        return f"tunnel {handle.config.destination} {handle._spec()}"
    if hasattr(handle, "remote"):
        return f"sync {handle.local_dir} <-> {handle.remote}"
    return f"mirror {handle.local_dir} -> {handle.destination}"


def status(state_dir: str | os.PathLike[str] | None = None, *, display: bool = False) -> Status:
    """Find every sshd, tunnel and mirror recorded in ``state_dir`` (running or not).

    Example:
        >>> colab_remote.status()  # doctest: +SKIP
        colab-remote status (/root/.colab_remote)
          <Sshd root@*:22 up, pid 812>
          <Tunnel bob@example.org -R 20022:localhost:22 up, 0 restarts>
    """
    from .mirror import find_mirrors
    from .reverse import find_tunnels
    from .sync import find_syncs

    state = state_path(state_dir)
    found = Status(state, load_sshd(state), find_tunnels(state), find_mirrors(state), find_syncs(state))
    if display:
        announce(found)
    return found


def stop_all(state_dir: str | os.PathLike[str] | None = None) -> int:
    """Stop every sync, mirror, tunnel and sshd started from ``state_dir``; return how many ran.

    Mirrors go first and push what is pending; the sshd goes last. Then the records of the
    tunnels and mirrors (stopped now, earlier, or failed) are removed from ``state_dir``; the
    sshd's folder stays (the next :func:`start_sshd` reuses its host keys), and so do the syncs'
    (their last common state: the next :func:`sync` of the same folders goes on from it).

    Example:
        >>> colab_remote.stop_all()  # doctest: +SKIP
        3
    """
    return len(_stop_all(state_path(state_dir))[0])


def _stop_all(state: Path) -> tuple[list[str], list[str]]:
    """Stop what runs, remove the tunnels' and mirrors' records; return the names of what was
    stopped (``tunnel bob@host -R 20022:localhost:22 (pid 812)``) and of the records removed of
    what had stopped or failed before."""
    from .mirror import find_mirrors
    from .reverse import find_tunnels
    from .sync import find_syncs

    stopped: list[str] = []
    removed: list[str] = []
    handles: list[Any] = [*find_syncs(state), *find_mirrors(state), *find_tunnels(state)]
    for handle in handles:
        if handle.alive:
            stopped.append(f"{_name(handle)} (pid {handle.pid})")
        else:
            removed.append(f"{'failed' if handle.state == 'error' else handle.state} {_name(handle)}")
        handle.stop()
        if not handle.alive and handle.kind != "sync":  # a sync's folder keeps its last common state
            shutil.rmtree(handle.run_dir, ignore_errors=True)
    sshd = load_sshd(state)
    if sshd is not None and sshd.alive:
        stopped.append(f"{_name(sshd)} (pid {sshd.pid})")
        sshd.stop()
    elif sshd is None:
        # Started, but start_sshd() was interrupted before it recorded info.json: the pid file
        # (written by the launcher) and the config path still say which process is ours.
        run_dir = state / "sshd"
        pid = _proc.read_pid(run_dir / "sshd.pid")
        if _proc.stop(pid, marker=str(run_dir / "sshd_config")):
            stopped.append(f"sshd (pid {pid})")
    return stopped, removed


def revoke(state_dir: str | os.PathLike[str] | None = None, *, all: bool = False,
           quiet: bool = False) -> list[tuple[str, str]]:
    """Remove this runtime's key lines from the servers it set up (or, with ``all``, run on the
    server: every colab-remote line of this account).

    Each restricted key can ask the server's helper to remove the lines of its own runtime, and
    nothing else. Stop the tunnels and mirrors first (they cannot log in again afterwards).

    Returns:
        ``(key id, outcome)`` pairs: "revoked", or "failed: ..." (an expired key, an unreachable
        server; the line expires anyway).

    Example:
        >>> colab_remote.stop_all(); colab_remote.revoke()  # doctest: +SKIP
        [('3f2a9c1b7e44.tunnel-9d1e0c5b2a', 'revoked'), ('3f2a9c1b7e44.mirror-1c9a...', 'revoked')]
    """
    if not isinstance(all, bool):
        raise TypeError(f"all must be True or False, got {all!r}")
    if all:
        outcomes = [(kid, "revoked") for kid in _access.revoke_all_here()]
    else:
        outcomes = _access.revoke_recorded(state_path(state_dir))
    if not quiet:
        for kid, outcome in outcomes:
            print(f"{kid}: {outcome}", flush=True)
        if not outcomes:
            print("no colab-remote keys " + ("on this account" if all else "recorded in the state folder"),
                  flush=True)
    return outcomes


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
    ssh = _install.require_program("ssh", package="openssh-client", install=False, error=ColabRemoteError)
    with tempfile.TemporaryDirectory(prefix="colab-remote-check-") as tmp:
        # Strict host-key checking against the keys this sshd serves: a success proves the
        # connection reached this runtime and nothing in between.
        known = Path(tmp) / "known_hosts"
        keys = sorted((sshd.run_dir / "host_keys").glob("*.pub"))
        known.write_text("".join(f"colab-runtime {' '.join(k.read_text().split()[:2])}\n" for k in keys))
        options = {k: v for k, v in tunnel.config.options.items()
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
        # Prompts come in order: the server's (when it wants a password), then the runtime's. A
        # restricted tunnel's own key opens the jump (it may reach the forwarded port and no other).
        if tunnel.config.restricted:
            server_password = None
        answers = [p for p in (server_password, password) if p is not None]
        try:
            done = _proc.converse(argv, answers, timeout=timeout)
        finally:
            if one_off is not None:
                _forget_one_off_key(sshd, one_off)
        ok = done.returncode == 0
    result = CheckResult(ok, command, done.stdout, tunnel.connection_string)
    if not quiet:
        announce(result)
    return result


def _jump_command(ssh: str, tunnel: Any, options: dict[str, Any]) -> str:
    """ProxyCommand text for the jump to the server (what ``ssh -J`` runs, with our options)."""
    config = tunnel.config
    if config.via == "gcloud" and not config.restricted:
        from . import _gcloud

        dest = _ssh.Destination(config.user, config.host)
        argv = _gcloud.gcloud_ssh_argv(config.gcloud, dest, zone=config.zone,
                                       project=config.project,
                                       ssh_flags=_ssh.ssh_option_argv(options),
                                       command=["-W", "localhost:%p"])
    else:
        host = config.connect_host or config.host
        argv = [ssh, "-W", "localhost:%p", "-p", str(config.port), *_ssh.ssh_option_argv(options),
                _ssh.Destination(config.user, host).target]
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
