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
import signal
import string
import time
from collections.abc import Mapping
from pathlib import Path

from . import _home, _host_keys, _html, _install, _net, _proc, _ssh
from ._daemon import State, state_path
from ._home import PROFILE_BEGIN, PROFILE_END  # noqa: F401  (re-exported)
from ._html import Announcement, announce
from ._sshd_config import (
    PATH_VARIABLE,
    banner_host,
    checked_config,
    listen_addresses,
    sshd_config,
    with_environment,
)
from .errors import ColabRemoteError, SshdError

__all__ = ["Sshd", "kernel_environment", "refresh_environment", "start_sshd"]

log = logging.getLogger(__name__)

PASSWORD_ALPHABET = string.ascii_letters + string.digits
PASSWORD_LENGTH = 20  # 20 * log2(62) ~ 119 bits
MIN_PASSWORD_LENGTH = 12  # a password the caller chooses
NVIDIA_LIBS = "/usr/lib64-nvidia"

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
    keeps ``libnvidia-ml.so`` there, and ``nvidia-smi`` fails without it). Values with a newline
    or NUL are left out (sshd's config holds one line).

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
            continue
        env[name] = value
    if os.path.isdir(NVIDIA_LIBS):
        parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
        if NVIDIA_LIBS not in parts:
            env["LD_LIBRARY_PATH"] = ":".join([*parts, NVIDIA_LIBS])
    return env


class Sshd:
    """A running sshd started by :func:`start_sshd`.

    Attributes: ``user``, ``port``, ``password`` (None in key-only mode), ``pid``,
    ``fingerprints`` (``{"ED25519": "SHA256:..."}``), ``state_dir``, ``listen_addresses``.
    """

    def __init__(self, *, user: str, port: int, password: str | None, pid: int,
                 fingerprints: dict[str, str], state_dir: Path, listen_address: str | None,
                 listen_addresses: list[str] | None = None, password_origin: str | None = None,
                 host_keys: str | None = None) -> None:
        self.user = user
        self.port = port
        self.password = password
        self.pid = pid
        self.fingerprints = fingerprints
        self.state_dir = state_dir
        self.listen_address = listen_address
        self.listen_addresses = listen_addresses or []
        # "generated" (printed once), "kept" (from an earlier call, same state_dir) or "given".
        self.password_origin = password_origin
        self.host_keys = host_keys

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

    def refresh_environment(self, environment: Mapping[str, str] | None = None, *,
                            quiet: bool = False) -> Sshd:
        """New sessions get the notebook's environment as it is now; see :func:`refresh_environment`."""
        return refresh_environment(self, environment=environment, quiet=quiet)

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

    def _password_text(self, show_password: bool) -> str:
        if self.password is None:
            return "none (key login only)"
        if self.password_origin == "given":
            return "the one you gave"
        if not show_password:
            return "(hidden: .password)"
        if self.password_origin == "kept":
            return f"{self.password} (the same as before: kept in {self.run_dir}, root only)"
        return self.password

    _ENVIRONMENT_NOTE = ("the notebook's, as of start_sshd(): variables set later reach new "
                         "sessions after refresh_environment()")

    def summary(self, *, show_password: bool = False) -> str:
        """What a user needs to log in, as text."""
        where = ", ".join(self.listen_addresses) or "?"
        lines = [f"sshd {self._state()} on port {self.port} of {where} (pid {self.pid})",
                 f"  user:        {self.user}",
                 f"  password:    {self._password_text(show_password)}"]
        if self.password is not None:
            lines.append("               (a re-run with this state_dir keeps it; password= replaces it)")
        for kind, fp in self.fingerprints.items():
            lines.append(f"  host key:    {fp} ({kind})")
        lines += [
            f"  environment: {self._ENVIRONMENT_NOTE}",
            "next: make it reachable from outside with",
            '  reverse_forward("you@your-server")',
            "then connect from your laptop with",
            f"  ssh -J you@your-server -p 20022 {self.user}@localhost",
        ]
        return "\n".join(lines)

    def _repr_html_(self, show_password: bool = False) -> str:
        rows = [("user", self.user), ("port", str(self.port)), ("pid", str(self.pid))]
        if self.listen_addresses:
            rows.append(("listening on", ", ".join(self.listen_addresses)))
        if self.password is not None:
            rows.append(("password", self._password_text(show_password)))
            rows.append(("", "kept across re-runs with this state_dir; password= replaces it"))
        rows += [(f"host key {kind}", fp) for kind, fp in self.fingerprints.items()]
        rows.append(("environment", self._ENVIRONMENT_NOTE))
        hint = f"ssh -J you@your-server -p 20022 {self.user}@localhost"
        return _html.card("sshd", State.of(self._state()), rows,
                          [("next: reverse_forward(\"you@your-server\"), then", hint)])


def generate_password() -> str:
    """20 characters of [A-Za-z0-9] from ``secrets`` (about 119 bits)."""
    return "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(PASSWORD_LENGTH))


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
    environment: Mapping[str, str] | None = None,
    quiet: bool = False,
) -> Sshd:
    """Start (or restart) an OpenSSH server in this runtime and print how to log in.

    Args:
        port: the port sshd listens on.
        user: the login user; created (with a home and bash) when missing.
        password: the login password, at least 12 characters; never printed. None keeps the
            password of an earlier call with the same ``state_dir`` (saved connections keep
            working), else generates one and prints it once (unless ``authorized_keys`` is
            given, which turns password login off).
        authorized_keys: public key text, or a path to a file of public keys, added to the
            user's ``~/.ssh/authorized_keys``.
        state_dir: where config, host keys, logs and pid files live (default ``~/.colab_remote``).
        install: install openssh-server with apt-get when sshd is missing.
        host_keys: where the host keys come from, so every runtime presents the same fingerprint:
            ``"colab-secret:NAME"`` reads private key text from the Colab secret NAME
            (``google.colab.userdata``); a folder (e.g. on Google Drive) loads them from and saves
            new ones to that folder, in plain text.
        gateway_ports: sshd's ``GatewayPorts`` (the recipe's ``GatewayPorts yes``).
        listen_address: one more address to listen on (``"0.0.0.0"``, ``"::"`` or an address);
            sshd always listens on 127.0.0.1 and ::1, where the tunnel arrives.
        environment: the variables every session gets (default: this kernel's, see
            :func:`kernel_environment`); taken now, see :func:`refresh_environment`.
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
        if len(password) < MIN_PASSWORD_LENGTH:
            raise ValueError(f"password must have at least {MIN_PASSWORD_LENGTH} characters "
                             f"(got {len(password)}); pass None to generate a strong one")
    keys = _ssh.parse_public_keys(authorized_keys) if authorized_keys is not None else []
    if listen_address is not None:
        _ssh.check_host(listen_address)
    env = _session_environment(environment)
    state = state_path(state_dir)
    secret_name, key_store = _host_keys.host_key_source(host_keys)
    if os.geteuid() != 0:
        raise SshdError("start_sshd needs root (it creates users, sets passwords and runs sshd)",
                        fix="run the notebook or command as root (Colab runtimes are)")

    t0 = time.monotonic()
    sshd_bin = _install.require_program("sshd", package="openssh-server", install=install, error=SshdError)
    keygen = _install.require_program("ssh-keygen", package="openssh-client", install=install,
                                   error=SshdError)
    run_dir = state / "sshd"
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    state.chmod(0o700)
    config_path = run_dir / "sshd_config"

    # Host keys first: a missing Colab secret must not cost the running sshd.
    if secret_name is not None:
        key_paths = _host_keys.from_secret(run_dir / "host_keys", secret_name, keygen)
    else:
        key_paths = _host_keys.from_folder(run_dir / "host_keys", key_store, keygen)
        if key_store is not None:
            notice = (f"note: host_keys={str(key_store)!r} keeps this runtime's private host keys "
                      "in plain text there (on Google Drive file modes mean nothing: whoever can "
                      "read that folder can pose as this runtime); safer: "
                      "host_keys='colab-secret:NAME' (see the README)")
            log.warning("%s", notice)
            if not quiet:
                print(notice, flush=True)
    fingerprints = {}
    for path in key_paths:
        pub = Path(str(path) + ".pub").read_text()
        fingerprints[path.name.removeprefix("ssh_host_").removesuffix("_key").upper()] = \
            _ssh.fingerprint(pub)

    # A second call replaces the first: one daemon, one config. Open sessions stay up.
    previous = _proc.read_pid(run_dir / "sshd.pid")
    _proc.stop(previous, marker=str(config_path))
    addresses = listen_addresses(listen_address)
    for address in addresses:
        if _net.port_in_use(address, port):
            raise SshdError(f"port {port} is already in use by another program{_who_listens(port)}",
                            fix=f"stop that program, or pick another port: start_sshd(port={port + 1})")

    origin = "given" if password is not None else None
    if password is None and not keys:
        password, origin = _kept_password(run_dir), "kept"
        if password is None:
            password, origin = generate_password(), "generated"
    account = _ensure_user(user, locked_ok=bool(keys) and password is None)
    if password is None and _locked(user):
        raise SshdError(f"account {user} is locked (its password field starts with '!'): sshd "
                        "refuses even key logins to a locked account",
                        fix=f"unlock it without a password: usermod -p '*' {user}; or pass password=")
    if password is not None:
        _proc.run([_sbin("chpasswd")], input=f"{user}:{password}\n", error=SshdError,
                  what=f"setting the password of {user} failed")
        if origin != "kept":
            # Root only (0600 in a 0700 folder): a re-run of the cell keeps the password.
            _proc.write_private(run_dir / "password", password + "\n")
    if keys:
        _home.add_authorized_keys(account, keys)
    _home.write_login_profile(account)

    text = sshd_config(port=port, user=user, password_login=password is not None,
                       host_keys=key_paths, pid_file=run_dir / "sshd.pid",
                       gateway_ports=gateway_ports, listen_address=None,
                       listen_addresses=addresses)
    text = with_environment(text, env)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # no systemd on Colab creates it
    text = checked_config(sshd_bin, config_path, text)

    pid = _proc.spawn_detached([sshd_bin, "-D", "-e", "-f", str(config_path)], run_dir=run_dir,
                               name="sshd")
    answer_at = banner_host(addresses)
    up = _proc.wait_until(lambda: not _proc.pid_alive(pid) or
                          _net.ssh_banner(answer_at, port, 0.5) is not None, timeout=10)
    if not up or not _proc.pid_alive(pid):
        _proc.stop(pid, marker=str(config_path))
        raise SshdError(f"sshd did not answer on port {port}",
                        log_tail=_proc.tail(run_dir / "sshd.log"),
                        fix=f"check the log above; the config is {config_path}")
    log.info("sshd up on port %d in %.3f s", port, time.monotonic() - t0)

    source = (f"{_host_keys.SECRET_PREFIX}{secret_name}" if secret_name
              else str(key_store) if key_store else None)
    handle = Sshd(user=user, port=port, password=password, pid=pid, fingerprints=fingerprints,
                  state_dir=state, listen_address=listen_address, listen_addresses=addresses,
                  password_origin=origin, host_keys=source)
    info = {"user": user, "port": port, "pid": pid, "fingerprints": fingerprints,
            "listen_address": listen_address, "listen_addresses": addresses,
            "config": str(config_path)}
    _proc.write_private(run_dir / "info.json", json.dumps(info, indent=1))
    if not quiet:
        announce(Announcement(handle.summary(show_password=True),
                              handle._repr_html_(show_password=True)))
    return handle


def refresh_environment(sshd: Sshd | None = None, *, state_dir: str | os.PathLike[str] | None = None,
                        environment: Mapping[str, str] | None = None, quiet: bool = False) -> Sshd:
    """Give new SSH sessions the notebook's environment as it is now.

    :func:`start_sshd` takes a snapshot of the kernel's environment when it runs; a variable set
    later in the notebook (``os.environ[...] = ...``, ``%env``) reaches SSH sessions only after
    this call (or another ``start_sshd()``). It rewrites the variables in sshd's own config and
    makes sshd read it again (SIGHUP): the pid, the password and open sessions stay as they are;
    sessions opened afterwards see the new values.

    Args:
        sshd: the :class:`Sshd` (default: the one recorded in ``state_dir``).
        state_dir: where :func:`start_sshd` keeps its state (default ``~/.colab_remote``).
        environment: the variables sessions get (default: this kernel's, as
            :func:`kernel_environment` selects them).
        quiet: do not print the one-line confirmation.

    Returns:
        the :class:`Sshd` handle.

    Raises:
        SshdError: no sshd runs for ``state_dir``, or it did not come back after reading its config.

    Example:
        >>> os.environ["WANDB_API_KEY"] = userdata.get("WANDB_API_KEY")  # doctest: +SKIP
        >>> colab_remote.refresh_environment()                         # doctest: +SKIP
        sshd: new SSH sessions get the notebook's environment as of now (41 variables)
    """
    if sshd is not None and not isinstance(sshd, Sshd):
        raise TypeError(f"sshd must be an Sshd handle (from start_sshd), got {sshd!r}")
    env = _session_environment(environment)
    handle = sshd if sshd is not None else load_sshd(state_dir)
    if handle is None or not handle.alive:
        where = handle.state_dir if handle is not None else state_path(state_dir)
        raise SshdError(f"no running sshd recorded in {where}",
                        fix="start it first: start_sshd() (which takes the environment too)")
    if os.geteuid() != 0:
        raise SshdError("refresh_environment needs root (sshd's config is root's)",
                        fix="run it as root, like start_sshd()")
    argv = _proc.cmdline(handle.pid)
    sshd_bin = argv[0] if argv and os.path.isabs(argv[0]) else _install.find_program("sshd") or "sshd"
    text = with_environment(handle.config_path.read_text(), env)
    checked_config(sshd_bin, handle.config_path, text)
    log_size = handle.log_path.stat().st_size if handle.log_path.exists() else 0
    _proc.send_signal(handle.pid, signal.SIGHUP)  # sshd re-executes itself with the new config

    def listening_again() -> bool:
        with contextlib.suppress(OSError), handle.log_path.open("rb") as f:
            f.seek(log_size)
            if b"Server listening on" in f.read():
                return _net.ssh_banner(banner_host(handle.listen_addresses), handle.port,
                                        0.5) is not None
        return not _proc.pid_alive(handle.pid)

    _proc.wait_until(listening_again, timeout=10)
    if not handle.alive or _net.ssh_banner(banner_host(handle.listen_addresses), handle.port,
                                            1) is None:
        raise SshdError("sshd did not come back after reading its new config",
                        log_tail=_proc.tail(handle.log_path),
                        fix="start it again: start_sshd() with the same state_dir")
    if not quiet:
        print(f"sshd: new SSH sessions get the notebook's environment as of now "
              f"({len(env)} variables)", flush=True)
    return handle


def load_sshd(state_dir: str | os.PathLike[str] | None = None) -> Sshd | None:
    """The sshd recorded in ``state_dir`` (running or not), or None. The password is not loaded."""
    state = state_path(state_dir)
    try:
        info = json.loads((state / "sshd" / "info.json").read_text())
    except (OSError, ValueError):
        return None
    old_address = info.get("listen_address")
    return Sshd(user=info["user"], port=info["port"], password=None, pid=info["pid"],
                fingerprints=info.get("fingerprints", {}), state_dir=state,
                listen_address=old_address,
                listen_addresses=info.get("listen_addresses") or ([old_address] if old_address else []))


def _session_environment(environment: Mapping[str, str] | None) -> dict[str, str]:
    """What SetEnv carries: ``environment`` (default the kernel's) plus the PATH copy for profiles.

    Names must be shell names; a value with a newline or NUL cannot go on sshd's one config
    line and is left out, as is one that is not text.
    """
    if environment is None:
        env = kernel_environment()
    elif not isinstance(environment, Mapping):
        raise TypeError(f"environment must be a mapping of names to values, got {environment!r}")
    else:
        env = {}
        for name, value in environment.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError(f"environment must map str to str, got {name!r}: {value!r}")
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"environment: {name!r} is not a variable name")
            env[name] = value
    carried = {}
    for name, value in env.items():
        try:
            value.encode()
        except UnicodeEncodeError:
            log.warning("environment: %s is not valid text; SSH sessions do not get it", name)
            continue
        if "\n" in value or "\0" in value or "\r" in value:
            log.warning("environment: %s holds a line break; SSH sessions do not get it", name)
            continue
        carried[name] = value
    if "PATH" in carried:
        carried[PATH_VARIABLE] = carried["PATH"]
    return carried


def _kept_password(run_dir: Path) -> str | None:
    """The password an earlier call with this state folder set (root-only file), if usable."""
    path = run_dir / "password"
    try:
        st = path.lstat()
        if not path.is_file() or path.is_symlink() or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            return None
        password = path.read_text().rstrip("\n")
        _ssh.check_password(password)
    except (OSError, ValueError, TypeError):
        return None
    return password if len(password) >= MIN_PASSWORD_LENGTH else None


def _who_listens(port: int) -> str:
    """`` (name, pid N)`` of the program listening on ``port``, as ``ss`` tells it, or ''."""
    ss = _install.find_program("ss")
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
    return _install.find_program(name) or name


