"""start_sshd(): an OpenSSH server inside the notebook runtime.

The recipe this grew from appended to /etc/ssh/sshd_config on every run, drew the password from
``random`` and had no readiness check. Here the library owns its own config file in ``state_dir``,
checks it with ``sshd -t``, draws the password from ``secrets``, sets it through ``chpasswd``'s
stdin and returns only when the port answers with an SSH banner.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import re
import secrets
import string
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import _html, _proc, _ssh
from ._daemon import State
from .errors import ColabRemoteError, SshdError

__all__ = ["Sshd", "kernel_environment", "start_sshd"]

log = logging.getLogger(__name__)

PASSWORD_ALPHABET = string.ascii_letters + string.digits
PASSWORD_LENGTH = 20  # 20 * log2(62) ~ 119 bits
NVIDIA_LIBS = "/usr/lib64-nvidia"
HOST_KEY_TYPES = ("ed25519", "rsa")
PROFILE_BEGIN = "# >>> colab-remote: the notebook kernel's environment in SSH login shells >>>"
PROFILE_END = "# <<< colab-remote <<<"

# Variables of the kernel that must not follow the user into an SSH session: they describe the
# kernel process itself (its home, terminal, Jupyter plumbing), not the machine.
_ENV_DENY = {
    "HOME", "PWD", "OLDPWD", "SHELL", "TERM", "USER", "LOGNAME", "SHLVL", "MAIL", "_",
    "MPLBACKEND", "PS1", "PS2", "COLUMNS", "LINES", "PAGER", "GIT_PAGER", "CLICOLOR",
    "TMUX", "TMUX_PANE", "DISPLAY", "PYDEVD_USE_FRAME_EVAL",
}
_ENV_DENY_PREFIXES = ("JPY_", "SSH_", "COLAB_REMOTE_", "JUPYTER_", "IPYKERNEL_", "PYTEST_")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def kernel_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables an SSH session should see: the kernel's whole environment, less a deny-list.

    ``LD_LIBRARY_PATH`` gains ``/usr/lib64-nvidia`` when that folder exists (Colab's GPU runtime
    keeps ``libnvidia-ml.so`` there, and ``nvidia-smi`` fails without it).

    Example:
        >>> "HOME" in kernel_environment({"HOME": "/root", "CUDA_VERSION": "12.2"})
        False
    """
    source = os.environ if environ is None else environ
    env = {}
    for name, value in source.items():
        if name in _ENV_DENY or name.startswith(_ENV_DENY_PREFIXES):
            continue
        if not _ENV_NAME.fullmatch(name) or "\n" in value or "\0" in value:
            continue  # ~/.ssh/environment holds one NAME=value a line
        env[name] = value
    if os.path.isdir(NVIDIA_LIBS):
        parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
        if NVIDIA_LIBS not in parts:
            env["LD_LIBRARY_PATH"] = ":".join([*parts, NVIDIA_LIBS])
    return env


class Sshd:
    """A running sshd started by :func:`start_sshd`.

    Attributes: ``user``, ``port``, ``password`` (None in key-only mode), ``pid``,
    ``fingerprints`` (``{"ED25519": "SHA256:..."}``), ``state_dir``.
    """

    def __init__(self, *, user: str, port: int, password: str | None, pid: int,
                 fingerprints: dict[str, str], state_dir: Path, listen_address: str | None) -> None:
        self.user = user
        self.port = port
        self.password = password
        self.pid = pid
        self.fingerprints = fingerprints
        self.state_dir = state_dir
        self.listen_address = listen_address

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "sshd"

    @property
    def config_path(self) -> Path:
        return self.run_dir / "sshd_config"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "sshd.log"

    @property
    def alive(self) -> bool:
        """True while this sshd runs."""
        return _proc.is_ours(self.pid, str(self.config_path))

    def stop(self) -> None:
        """Stop sshd and the sessions it serves. Safe to call twice."""
        if self.alive:
            _proc.stop(self.pid, marker=str(self.config_path), also=_proc.children(self.pid))
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / "sshd.pid").unlink()

    def logs(self, lines: int = 20) -> str:
        """The last ``lines`` lines of sshd's log."""
        return _proc.tail(self.log_path, lines)

    def __enter__(self) -> Sshd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _state(self) -> str:
        return "up" if self.alive else "stopped"

    def __repr__(self) -> str:
        host = self.listen_address or "*"  # no ListenAddress: every address
        host = f"[{host}]" if ":" in host else host
        return f"<Sshd {self.user}@{host}:{self.port} {self._state()}, pid {self.pid}>"

    def summary(self, *, show_password: bool = False) -> str:
        """What a user needs to log in, as text."""
        lines = [f"sshd {self._state()} on port {self.port} (pid {self.pid})", f"  user:      {self.user}"]
        if self.password is not None:
            lines.append(f"  password:  {self.password if show_password else '(hidden)'}")
        else:
            lines.append("  password:  none (key login only)")
        for kind, fp in self.fingerprints.items():
            lines.append(f"  host key:  {fp} ({kind})")
        lines += [
            "next: make it reachable from outside with",
            '  reverse_forward("you@your-server")',
            "then connect from your laptop with",
            f"  ssh -J you@your-server -p 20022 {self.user}@localhost",
        ]
        return "\n".join(lines)

    def _repr_html_(self, show_password: bool = False) -> str:
        rows = [("user", self.user), ("port", str(self.port)), ("pid", str(self.pid))]
        if self.password is not None:
            rows.append(("password", self.password if show_password else "(hidden: .password)"))
        rows += [(f"host key {kind}", fp) for kind, fp in self.fingerprints.items()]
        hint = f"ssh -J you@your-server -p 20022 {self.user}@localhost"
        return _html.card("sshd", State.of(self._state()), rows,
                          [("next: reverse_forward(\"you@your-server\"), then", hint)])


class _Announcement:
    """What start_sshd shows once: the handle's card, with the password."""

    def __init__(self, sshd: Sshd) -> None:
        self.sshd = sshd

    def __repr__(self) -> str:
        return self.sshd.summary(show_password=True)

    def _repr_html_(self) -> str:
        return self.sshd._repr_html_(show_password=True)


def announce(obj: Any) -> None:
    """Print ``obj`` in a terminal; display it (HTML and text) in a notebook."""
    shell = _proc.in_ipython()
    # A notebook kernel's shell (ipykernel's, or Colab's subclass of it) has a kernel attached.
    if shell is not None and getattr(shell, "kernel", None) is not None:
        from IPython.display import display

        display(obj)
    else:
        print(repr(obj), flush=True)


def generate_password() -> str:
    """20 characters of [A-Za-z0-9] from ``secrets`` (about 119 bits)."""
    return "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(PASSWORD_LENGTH))


def default_state_dir() -> Path:
    return Path("~/.colab_remote").expanduser()


def state_path(state_dir: object) -> Path:
    """``state_dir`` as an absolute path (default ``~/.colab_remote``); ValueError/TypeError if unusable."""
    if state_dir is None:
        return default_state_dir()
    if not isinstance(state_dir, (str, os.PathLike)):
        raise TypeError(f"state_dir must be a path, got {state_dir!r}")
    state = Path(state_dir).expanduser().absolute()
    if state.exists() and not state.is_dir():
        raise ValueError(f"state_dir {state} exists and is not a folder")
    return state


def start_sshd(
    port: int = 22,
    *,
    user: str = "root",
    password: str | None = None,
    authorized_keys: str | os.PathLike[str] | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    install: bool = True,
    host_keys: str | os.PathLike[str] | None = None,
    gateway_ports: bool = False,
    listen_address: str | None = None,
    quiet: bool = False,
) -> Sshd:
    """Start (or restart) an OpenSSH server in this runtime and print how to log in.

    Args:
        port: the port sshd listens on.
        user: the login user; created (with a home and bash) when missing.
        password: the login password; None generates one (unless ``authorized_keys`` is given,
            which turns password login off).
        authorized_keys: public key text, or a path to a file of public keys, added to the
            user's ``~/.ssh/authorized_keys``.
        state_dir: where config, host keys, logs and pid files live (default ``~/.colab_remote``).
        install: install openssh-server with apt-get when sshd is missing.
        host_keys: a folder (e.g. on Google Drive) to load host keys from and save new ones to,
            so every runtime presents the same fingerprint.
        gateway_ports: sshd's ``GatewayPorts`` (the recipe's ``GatewayPorts yes``).
        listen_address: sshd's ``ListenAddress`` (default: every address).
        quiet: do not print or display the summary.

    Returns:
        an :class:`Sshd` handle.

    Example:
        >>> sshd = start_sshd()                       # doctest: +SKIP
        >>> sshd.user, sshd.port, len(sshd.password)  # doctest: +SKIP
        ('root', 22, 20)
    """
    _ssh.check_port(port)
    _ssh.check_user(user)
    if password is not None:
        _ssh.check_password(password)
    keys = _ssh.parse_public_keys(authorized_keys) if authorized_keys is not None else []
    if listen_address is not None:
        _ssh.check_host(listen_address)
    state = state_path(state_dir)
    key_store = Path(host_keys).expanduser() if host_keys is not None else None
    if key_store is not None and key_store.exists() and not key_store.is_dir():
        raise ValueError(f"host_keys {key_store} exists and is not a folder")
    if os.geteuid() != 0:
        raise SshdError("start_sshd needs root (it creates users, sets passwords and runs sshd)",
                        fix="run the notebook or command as root (Colab runtimes are)")

    t0 = time.monotonic()
    sshd_bin = _proc.require_program("sshd", package="openssh-server", install=install, error=SshdError)
    keygen = _proc.require_program("ssh-keygen", package="openssh-client", install=install,
                                   error=SshdError)
    run_dir = state / "sshd"
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    state.chmod(0o700)
    config_path = run_dir / "sshd_config"

    # A second call replaces the first: one daemon, one config. Open sessions stay up.
    previous = _proc.read_pid(run_dir / "sshd.pid")
    _proc.stop(previous, marker=str(config_path))
    probe_host = listen_address or "0.0.0.0"
    if _proc.port_in_use(probe_host, port):
        raise SshdError(f"port {port} is already in use by another program{_who_listens(port)}",
                        fix=f"stop that program, or pick another port: start_sshd(port={port + 1})")

    if password is None and not keys:
        password = generate_password()
    account = _ensure_user(user, locked_ok=bool(keys) and password is None)
    if password is None and _locked(user):
        raise SshdError(f"account {user} is locked (its password field starts with '!'): sshd "
                        "refuses even key logins to a locked account",
                        fix=f"unlock it without a password: usermod -p '*' {user}; or pass password=")
    if password is not None:
        _proc.run([_sbin("chpasswd")], input=f"{user}:{password}\n", error=SshdError,
                  what=f"setting the password of {user} failed")
    if keys:
        _add_authorized_keys(account, keys)
    _write_user_environment(account, kernel_environment())

    key_paths = _host_keys(run_dir / "host_keys", key_store, keygen)
    fingerprints = {}
    for path in key_paths:
        pub = Path(str(path) + ".pub").read_text()
        fingerprints[path.name.removeprefix("ssh_host_").removesuffix("_key").upper()] = \
            _ssh.fingerprint(pub)

    text = sshd_config(port=port, user=user, password_login=password is not None,
                       host_keys=key_paths, pid_file=run_dir / "sshd.pid",
                       gateway_ports=gateway_ports, listen_address=listen_address)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # no systemd on Colab creates it
    text = _checked_config(sshd_bin, config_path, text)

    pid = _proc.spawn_detached([sshd_bin, "-D", "-e", "-f", str(config_path)], run_dir=run_dir,
                               name="sshd")
    banner_host = "127.0.0.1" if probe_host in ("0.0.0.0", "::") else probe_host
    if probe_host == "::":
        banner_host = "::1"
    up = _proc.wait_until(lambda: not _proc.pid_alive(pid) or
                          _proc.ssh_banner(banner_host, port, 0.5) is not None, timeout=10)
    if not up or not _proc.pid_alive(pid):
        _proc.stop(pid, marker=str(config_path))
        raise SshdError(f"sshd did not answer on port {port}",
                        log_tail=_proc.tail(run_dir / "sshd.log"),
                        fix=f"check the log above; the config is {config_path}")
    log.info("sshd up on port %d in %.3f s", port, time.monotonic() - t0)

    handle = Sshd(user=user, port=port, password=password, pid=pid, fingerprints=fingerprints,
                  state_dir=state, listen_address=listen_address)
    info = {"user": user, "port": port, "pid": pid, "fingerprints": fingerprints,
            "listen_address": listen_address, "config": str(config_path)}
    _proc.write_private(run_dir / "info.json", json.dumps(info, indent=1))
    if not quiet:
        announce(_Announcement(handle))
    return handle


def load_sshd(state_dir: str | os.PathLike[str] | None = None) -> Sshd | None:
    """The sshd recorded in ``state_dir`` (running or not), or None. The password is not kept."""
    state = state_path(state_dir)
    try:
        info = json.loads((state / "sshd" / "info.json").read_text())
    except (OSError, ValueError):
        return None
    return Sshd(user=info["user"], port=info["port"], password=None, pid=info["pid"],
                fingerprints=info.get("fingerprints", {}), state_dir=state,
                listen_address=info.get("listen_address"))


def sshd_config(*, port: int, user: str, password_login: bool, host_keys: list[Path],
                pid_file: Path, gateway_ports: bool, listen_address: str | None) -> str:
    """The text of our own sshd config (the system's /etc/ssh/sshd_config is never touched)."""
    sftp = _proc.find_program("sftp-server") or next(
        (p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server")
         if os.path.exists(p)), "internal-sftp")
    lines = [
        "# Written by colab_remote.start_sshd(); rewritten on every call. Do not edit.",
        f"Port {port}",
        *([f"ListenAddress {listen_address}"] if listen_address else []),
        *[f"HostKey {_config_word(p)}" for p in host_keys],
        f"PidFile {_config_word(pid_file)}",
        f"AllowUsers {user}",
        f"PermitRootLogin {'yes' if password_login else 'prohibit-password'}",
        f"PasswordAuthentication {'yes' if password_login else 'no'}",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "AuthorizedKeysFile .ssh/authorized_keys",
        "PermitEmptyPasswords no",
        # Containers (Colab's among them) have no working pam_loginuid; sshd checks the
        # shadow password itself.
        "UsePAM no",
        # ~/.ssh/environment carries the kernel's environment into every session (see
        # _write_user_environment): exec, shell, sftp alike.
        "PermitUserEnvironment yes",
        "ClientAliveInterval 30",
        "ClientAliveCountMax 3",
        "TCPKeepAlive yes",
        "AllowTcpForwarding yes",
        f"GatewayPorts {'yes' if gateway_ports else 'no'}",
        "X11Forwarding no",
        "PrintMotd no",
        "UseDNS no",
        # Every login through the tunnel comes from 127.0.0.1: never penalise that address.
        "PerSourcePenalties no",
        "MaxStartups 100:30:200",
        "LoginGraceTime 60",
        f"Subsystem sftp {sftp}",
    ]
    return "\n".join(lines) + "\n"


def _config_word(value: object) -> str:
    """A path as one sshd_config word (double-quoted when it holds spaces)."""
    text = str(value)
    if '"' in text or "\n" in text:
        raise ValueError(f"state_dir paths must not contain '\"' or newlines: {text!r}")
    return f'"{text}"' if any(c.isspace() for c in text) else text


_UNSUPPORTED: set[str] = set()


def _checked_config(sshd_bin: str, path: Path, text: str) -> str:
    """Write the config and check it with ``sshd -t``; drop options this sshd is too old for."""
    for keyword in _UNSUPPORTED:
        text = re.sub(rf"(?m)^{keyword} .*\n", "", text)
    for _ in range(3):
        _proc.write_private(path, text)
        done = _proc.run([sshd_bin, "-t", "-f", str(path)], error=SshdError, check=False)
        if done.returncode == 0:
            return text
        output = done.stdout + done.stderr
        bad = re.search(r"Bad configuration option: (\w+)|Unsupported option (\w+)", output)
        keyword = (bad.group(1) or bad.group(2)) if bad else ""
        if keyword not in ("PerSourcePenalties",):
            raise SshdError("sshd rejected the configuration (sshd -t)", log_tail=output,
                            fix=f"check {path}; report this as a colab-remote bug")
        _UNSUPPORTED.add(keyword)
        text = re.sub(rf"(?m)^{keyword} .*\n", "", text)
    raise SshdError("sshd rejected the configuration (sshd -t)", fix=f"check {path}")


def _who_listens(port: int) -> str:
    """`` (name, pid N)`` of the program listening on ``port``, as ``ss`` tells it, or ''."""
    ss = _proc.find_program("ss")
    if not ss:
        return ""
    with contextlib.suppress(ColabRemoteError):
        out = _proc.run([ss, "-Hltnp", f"sport = :{port}"], timeout=5, check=False).stdout
        found = re.search(r'users:\(\("([^"]+)",pid=(\d+)', out)
        if found:
            return f" ({found.group(1)}, pid {found.group(2)})"
    return ""


def _ensure_user(user: str, *, locked_ok: bool) -> pwd.struct_passwd:
    """The account of ``user``; created with a home and a login shell when missing."""
    try:
        return pwd.getpwnam(user)
    except KeyError:
        pass
    shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
    _proc.run([_sbin("useradd"), "--create-home", "--shell", shell, user], error=SshdError,
              what=f"creating user {user} failed")
    if locked_ok:
        # A new account's password field is '!' (locked); sshd without PAM then refuses even key
        # logins. '*' means "no password" without "locked".
        _proc.run([_sbin("usermod"), "-p", "*", user], error=SshdError, what=f"unlocking {user} failed")
    return pwd.getpwnam(user)


def _locked(user: str) -> bool:
    """True when /etc/shadow marks ``user`` locked ('!' prefix), which sshd without PAM refuses."""
    with contextlib.suppress(OSError):
        for line in Path("/etc/shadow").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name == user:
                return rest.startswith("!")
    return False


def _sbin(name: str) -> str:
    return _proc.find_program(name) or name


def _owned_private_dir(account: pwd.struct_passwd) -> Path:
    ssh_dir = Path(account.pw_dir) / ".ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chown(ssh_dir, account.pw_uid, account.pw_gid)
    ssh_dir.chmod(0o700)
    return ssh_dir


def _add_authorized_keys(account: pwd.struct_passwd, keys: list[str]) -> None:
    """Add keys to ~/.ssh/authorized_keys: existing lines kept, no duplicates, 0600."""
    path = _owned_private_dir(account) / "authorized_keys"
    existing = path.read_text().splitlines() if path.exists() else []
    lines = list(existing)
    have = {_key_identity(line) for line in existing}
    for key in keys:
        if _key_identity(key) not in have:
            have.add(_key_identity(key))
            lines.append(key)
    _proc.write_private(path, "\n".join(lines).strip("\n") + "\n")
    os.chown(path, account.pw_uid, account.pw_gid)


def _key_identity(line: str) -> str:
    words = line.split()
    for i, w in enumerate(words[:-1]):
        if w.startswith(("ssh-", "ecdsa-", "sk-")):
            return words[i + 1]
    return line


def _write_user_environment(account: pwd.struct_passwd, env: Mapping[str, str]) -> None:
    """The kernel's environment for every SSH session of ``account``.

    sshd reads ``~/.ssh/environment`` (with ``PermitUserEnvironment yes``) before it runs anything,
    so commands, sftp and the VS Code server see it. Login shells then reset PATH in /etc/profile;
    a marked block in the user's profile reads the same file again after that.
    """
    ssh_dir = _owned_private_dir(account)
    body = "".join(f"{k}={v}\n" for k, v in sorted(env.items()))
    path = ssh_dir / "environment"
    _proc.write_private(path, "# Written by colab_remote.start_sshd(): the notebook kernel's "
                              "environment.\n" + body)
    os.chown(path, account.pw_uid, account.pw_gid)
    home = Path(account.pw_dir)
    block = "\n".join([
        PROFILE_BEGIN,
        'if [ -n "$SSH_CONNECTION" ] && [ -r "$HOME/.ssh/environment" ]; then',
        '  while IFS= read -r colab_remote_line || [ -n "$colab_remote_line" ]; do',
        '    case "$colab_remote_line" in "#"*|"") ;; *=*) export "$colab_remote_line" ;; esac',
        '  done < "$HOME/.ssh/environment"',
        "  unset colab_remote_line",
        "fi",
        PROFILE_END,
    ]) + "\n"
    profiles = [home / ".profile"] + [home / n for n in (".bash_profile", ".bash_login")
                                      if (home / n).exists()]
    for profile in profiles:
        old = profile.read_text() if profile.exists() else ""
        start, end = old.find(PROFILE_BEGIN), old.find(PROFILE_END)
        if start != -1 and end != -1:
            new = old[:start] + block + old[end + len(PROFILE_END):].lstrip("\n")
        else:
            new = old + ("\n" if old and not old.endswith("\n") else "") + block
        if new != old:
            profile.write_text(new)
            os.chown(profile, account.pw_uid, account.pw_gid)


def _host_keys(live: Path, store: Path | None, keygen: str) -> list[Path]:
    """Host keys in ``live`` (0600): taken from ``store`` when it has them, generated once otherwise,
    and saved back to ``store`` so the next runtime presents the same fingerprints."""
    live.mkdir(mode=0o700, parents=True, exist_ok=True)
    if store is not None:
        store.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind in HOST_KEY_TYPES:
        name = f"ssh_host_{kind}_key"
        key = live / name
        if store is not None and (store / name).is_file() and (store / f"{name}.pub").is_file():
            for suffix in ("", ".pub"):
                src, dst = store / (name + suffix), live / (name + suffix)
                if not dst.exists() or dst.read_bytes() != src.read_bytes():
                    _proc.write_private(dst, src.read_text(), 0o600 if not suffix else 0o644)
        if not key.exists() or not Path(str(key) + ".pub").exists():
            with contextlib.suppress(FileNotFoundError):
                key.unlink()
            bits = ["-b", "3072"] if kind == "rsa" else []
            _proc.run([keygen, "-q", "-t", kind, *bits, "-N", "", "-C", f"colab-remote-{kind}",
                       "-f", str(key)], error=SshdError, what=f"generating the {kind} host key failed")
        key.chmod(0o600)
        if store is not None:
            for suffix in ("", ".pub"):
                src, dst = live / (name + suffix), store / (name + suffix)
                if not dst.exists() or dst.read_bytes() != src.read_bytes():
                    _proc.write_private(dst, src.read_text(), 0o600 if not suffix else 0o644)
        paths.append(key)
    return paths
