"""Pure functions: validate input, parse ``user@host``, build ssh/rsync argv and config text.

Nothing here starts a process or touches the network, so all of it is tested with plain asserts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import os
import re
import shlex
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# POSIX portable login names, as useradd accepts them by default (Debian's NAME_REGEX is stricter).
_USER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ssh-dss",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)


def check_port(value: object, name: str = "port", *, allow_zero: bool = False) -> int:
    """Return ``value`` if it is a TCP port number, else raise ``ValueError``/``TypeError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int in 1..65535, got {value!r}")
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        allowed = "0 (let the server pick) or 1..65535" if allow_zero else "1..65535"
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return value


def check_user(user: object, name: str = "user") -> str:
    """Return ``user`` if it is a valid POSIX login name (no spaces, no leading '-', no ':')."""
    if not isinstance(user, str):
        raise TypeError(f"{name} must be a str, got {user!r}")
    if not _USER_RE.fullmatch(user):
        raise ValueError(
            f"{name} {user!r} is not a valid login name: use 1-32 characters of letters, digits, "
            "'_', '.', '-', not starting with '-' or a digit"
        )
    return user


def check_password(password: object) -> str:
    """Return ``password`` if chpasswd and ssh can take it (no newline, ':' or NUL)."""
    if not isinstance(password, str):
        raise TypeError("password must be a str")
    if not password:
        raise ValueError("password must not be empty (pass None to generate one)")
    for bad, label in (("\n", "a newline"), ("\r", "a carriage return"), (":", "':'"), ("\0", "NUL")):
        if bad in password:
            raise ValueError(f"password must not contain {label}")
    return password


def check_host(host: object) -> str:
    """Return ``host`` (a DNS name, an IPv4 address or a bare IPv6 address) or raise ``ValueError``."""
    if not isinstance(host, str) or not host:
        raise ValueError("host must not be empty")
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(
            f"host {host!r} is not a host name or IP address (letters, digits, '.', '-'; "
            "IPv6 in brackets: user@[::1])"
        )
    return host


@dataclass(frozen=True)
class Destination:
    """``user@host`` split into its parts; ``path`` is set for ``user@host:path``."""

    user: str
    host: str
    path: str = ""

    @property
    def target(self) -> str:
        """The ``user@host`` argument for ssh (IPv6 without brackets, as ssh wants it)."""
        return f"{self.user}@{self.host}"

    @property
    def rsync_host(self) -> str:
        """``user@host`` as rsync wants it before ``:path`` (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" + (f":{self.path}" if self.path else "")


def parse_destination(text: object, *, with_path: bool = False) -> Destination:
    """Parse ``user@host`` (``user@[v6]``), or ``user@host:path`` when ``with_path``.

    >>> parse_destination("bob@example.org").target
    'bob@example.org'
    """
    what = "user@host:path" if with_path else "user@host"
    if not isinstance(text, str):
        raise TypeError(f"destination must be a str like {what!r}, got {text!r}")
    if any(c.isspace() for c in text):
        raise ValueError(f"destination {text!r} must not contain spaces; expected {what}")
    user, at, rest = text.partition("@")
    if not at or not user or not rest:
        raise ValueError(f"destination {text!r} is not of the form {what}")
    check_user(user, "the user in destination")
    path = ""
    if rest.startswith("["):
        host, bracket, after = rest[1:].partition("]")
        if not bracket:
            raise ValueError(f"destination {text!r}: missing ']' after the IPv6 address")
        try:
            ipaddress.IPv6Address(host)
        except ValueError as e:
            raise ValueError(f"destination {text!r}: {host!r} is not an IPv6 address") from e
        if with_path:
            if not after.startswith(":"):
                raise ValueError(f"destination {text!r} has no ':path'; expected {what}")
            path = after[1:]
        elif after:
            raise ValueError(f"destination {text!r}: unexpected {after!r} after the address")
    else:
        if with_path:
            host, colon, path = rest.partition(":")
            if not colon:
                raise ValueError(f"destination {text!r} has no ':path'; expected {what}")
        else:
            host = rest
            if ":" in host:
                try:
                    ipaddress.IPv6Address(host)
                except ValueError as e:
                    raise ValueError(
                        f"destination {text!r}: a port goes in port=, and an IPv6 address in "
                        "brackets (user@[::1])"
                    ) from e
        check_host(host)
    if with_path:
        if not path or path.strip("/") == "" and path.startswith("/"):
            raise ValueError(f"destination {text!r}: the remote path must not be empty or '/'")
        if "\0" in path or "\n" in path:
            raise ValueError(f"destination {text!r}: the remote path must not contain NUL or newline")
        check_path_words(path, f"destination {text!r}")
    return Destination(user, host, path)


# A remote path is taken literally: nothing on either side may expand it (a shell, rsync).
_GLOB = "*?["


def check_path_words(path: str, what: str) -> None:
    """Refuse remote paths that cannot be meant literally: ``..`` components (``backup/../inside``
    names another folder than it seems), ``~user`` (another account's home), glob characters
    (a shell or an old rsync would expand them against the server's files)."""
    if ".." in path.split("/"):
        raise ValueError(f"{what}: the remote path must not contain '..' components (it would name "
                         "another folder than it reads); write the folder's own path")
    if path.startswith("~") and path != "~" and not path.startswith("~/"):
        raise ValueError(f"{what}: '~user' paths are not taken (only this account's own home, as "
                         "~/path or a path relative to it)")
    found = [c for c in _GLOB if c in path]
    if found:
        raise ValueError(f"{what}: the remote path holds the glob character {found[0]!r}; it names "
                         "one folder, literally (no pattern)")


# --- ssh's prompts and failures: one table for every caller (tunnel, mirror, set-up) -----------

PROMPTS = {
    "password": re.compile(r"(?i)(password|passcode)[^\n]*:\s*$"),
    "passphrase": re.compile(r"(?i)enter passphrase for [^\n]*:\s*$"),
    # gcloud creating its own key: it asks for a new passphrase (an empty one)
    "new_passphrase": re.compile(r"(?i)(enter passphrase \(empty|enter same passphrase)[^\n]*:\s*$"),
    "continue": re.compile(r"(?i)do you want to continue \(Y/n\)\?\s*$"),
    "host_key": re.compile(r"(?i)are you sure you want to continue connecting[^\n]*\?\s*$"),
}
_FAILURES = (
    ("hostkey", ("Host key verification failed", "REMOTE HOST IDENTIFICATION HAS CHANGED",
                 "host key for", "No ED25519 host key is known", "No RSA host key is known")),
    ("auth", ("Permission denied", "Too many authentication failures",
              "no more authentication methods", "Authentication failed")),
    ("resolve", ("Could not resolve hostname", "Name or service not known")),
    ("down", ("Connection refused", "Connection timed out", "No route to host",
              "Network is unreachable", "Operation timed out")),
)


def prompt_kind(text: str) -> str | None:
    """Which of ssh's prompts ``text`` (what ssh printed so far on its line) ends with, or None."""
    for kind, pattern in PROMPTS.items():
        if pattern.search(text):
            return kind
    return None


def classify(output: str) -> str:
    """Why ssh failed, from its output: hostkey, auth, resolve, down, or other."""
    for kind, needles in _FAILURES:
        if any(n in output for n in needles):
            return kind
    return "other"


class Responder:
    """Answers ssh's prompts for one connection: the secret once, never twice.

    ``answer(kind)`` returns ``(text to type or None, (failure kind, message) or None)``.
    """

    def __init__(self, secret: str | None) -> None:
        self.secret = secret
        self.typed = {"password": 0, "passphrase": 0}

    def answer(self, kind: str) -> tuple[str | None, tuple[str, str] | None]:
        if kind in self.typed:
            what = "a password; pass password=" if kind == "password" else \
                "the key's passphrase; pass it as password="
            if self.secret is None:
                return None, ("auth", f"ssh asks for {what}")
            if self.typed[kind]:
                return None, ("auth", f"the server refused the {kind}")
            self.typed[kind] += 1
            return self.secret, None
        if kind == "new_passphrase":
            return "", None
        if kind == "continue":
            return "Y", None
        if kind == "host_key":
            return "no", ("hostkey", "ssh asked to trust an unknown host key")
        return None, None


def ssh_option_argv(options: dict[str, str | int]) -> list[str]:
    """``{"Port": 22}`` -> ``["-o", "Port=22"]``, in insertion order."""
    argv: list[str] = []
    for key, value in options.items():
        argv += ["-o", f"{key}={value}"]
    return argv


def host_key_options(known_hosts: Path, *, pinned: bool) -> dict[str, str | int]:
    """Host-key checking: ``accept-new`` into our own known_hosts, or ``yes`` against a pinned key.

    Never ``StrictHostKeyChecking=no``: the first connection records the key, later ones check it.
    """
    return {
        "UserKnownHostsFile": str(known_hosts),
        "GlobalKnownHostsFile": "/dev/null",
        "StrictHostKeyChecking": "yes" if pinned else "accept-new",
        "UpdateHostKeys": "no",
    }


def rsync_ssh_command(ssh_argv: list[str]) -> str:
    """The string for ``rsync -e``: rsync splits it itself, so quote every word."""
    return shlex.join(ssh_argv)


# --- public keys -------------------------------------------------------------------------------


def _key_blob(line: str) -> tuple[str, bytes] | None:
    """``(type, blob)`` of an authorized_keys / .pub line, skipping leading options."""
    words = line.split()
    for i, word in enumerate(words[:-1]):
        if word in _KEY_TYPES:
            try:
                blob = base64.b64decode(words[i + 1], validate=True)
            except (binascii.Error, ValueError):
                return None
            if len(blob) < 4:
                return None
            (n,) = struct.unpack(">I", blob[:4])
            if blob[4 : 4 + n].decode("ascii", "replace") != word:
                return None
            return word, blob
    return None


def parse_public_keys(text_or_path: str | os.PathLike[str]) -> list[str]:
    """Public key lines from key text (one or more lines) or from a file holding them.

    Raises ``ValueError`` for anything that is not a public key (a private key, a typo).
    """
    if isinstance(text_or_path, os.PathLike) or (
        isinstance(text_or_path, str)
        and "\n" not in text_or_path
        and not any(text_or_path.lstrip().startswith(t) for t in _KEY_TYPES)
        and Path(text_or_path).expanduser().is_file()
    ):
        path = Path(text_or_path).expanduser()
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"authorized_keys: cannot read {path}: {e}") from e
    elif isinstance(text_or_path, str):
        text = text_or_path
    else:
        raise TypeError("authorized_keys must be public key text or a path to a file of them")
    keys = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "PRIVATE KEY" in line:
            raise ValueError("authorized_keys holds a PRIVATE key; pass the public key (the .pub file)")
        if _key_blob(line) is None:
            shown = line if len(line) <= 40 else line[:37] + "..."
            raise ValueError(
                f"authorized_keys: {shown!r} is not a public key line "
                f"(expected e.g. 'ssh-ed25519 AAAA... comment'; types: {', '.join(_KEY_TYPES[:4])}, ...)"
            )
        keys.append(line)
    if not keys:
        raise ValueError("authorized_keys holds no public key")
    return keys


def fingerprint(pub_line: str) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key line (as ``ssh-keygen -l`` prints)."""
    parsed = _key_blob(pub_line)
    if parsed is None:
        raise ValueError(f"not a public key line: {pub_line[:40]!r}")
    digest = hashlib.sha256(parsed[1]).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def jump_spec(dest: Destination, port: int) -> str:
    """The ``-J`` argument: ``user@host`` or ``user@host:port`` (IPv6 in brackets)."""
    host = f"[{dest.host}]" if ":" in dest.host else dest.host
    return f"{dest.user}@{host}" + (f":{port}" if port != 22 else "")


# --- reverse tunnel ----------------------------------------------------------------------------

# ssh gives up on a silent link after ServerAliveInterval * ServerAliveCountMax seconds (9 s here):
# long enough for a slow mobile uplink, short enough to be back well within 20 s.
TUNNEL_ALIVE_INTERVAL = 3
TUNNEL_ALIVE_COUNT = 3


def reverse_spec(remote_port: int, local_port: int) -> str:
    """The ``-R`` argument: ``remote_port:localhost:local_port`` (0 lets the server pick)."""
    return f"{remote_port}:localhost:{local_port}"


def tunnel_options(*, known_hosts: Path | None, pinned: bool, identity_file: str | None,
                   password: bool) -> dict[str, str | int]:
    """ssh options of every tunnel connection (the same for our supervisor and for autossh).

    ``known_hosts`` None leaves host keys to the caller (gcloud keeps its own known_hosts).
    Without a password there is nobody to answer a prompt, so ``BatchMode`` makes ssh fail fast.
    """
    options: dict[str, str | int] = {
        "ExitOnForwardFailure": "yes",
        "ServerAliveInterval": TUNNEL_ALIVE_INTERVAL,
        "ServerAliveCountMax": TUNNEL_ALIVE_COUNT,
        "TCPKeepAlive": "yes",
        "ConnectTimeout": 10,
        "NumberOfPasswordPrompts": 1,
        "BatchMode": "no" if password else "yes",
        "PermitLocalCommand": "no",
    }
    if known_hosts is not None:
        options.update(host_key_options(known_hosts, pinned=pinned))
    if identity_file is not None:
        options["IdentityFile"] = identity_file
        options["IdentitiesOnly"] = "yes"
    return options


def tunnel_ssh_argv(ssh: str, dest: Destination, *, port: int, remote_port: int, local_port: int,
                    options: dict[str, str | int]) -> list[str]:
    """The plain one-connection tunnel: ``ssh -N -R remote_port:localhost:local_port ... user@host``.

    >>> tunnel_ssh_argv("ssh", Destination("bob", "h"), port=22, remote_port=20022, local_port=22,
    ...                 options={})[:4]
    ['ssh', '-N', '-R', '20022:localhost:22']
    """
    return [ssh, "-N", "-R", reverse_spec(remote_port, local_port), "-T",
            *ssh_option_argv(options), "-p", str(port), dest.target]


def master_flags(control_path: Path, options: dict[str, str | int]) -> list[str]:
    """Flags of one supervised connection: an idle ControlMaster the forward is added to later.

    A forward added through the control socket (``-O forward``) takes milliseconds on a connection
    that is already authenticated, which is how a standby connection replaces a dead one at once.
    """
    return ["-N", "-T", "-o", "ControlMaster=yes", "-o", f"ControlPath={control_path}",
            "-o", "ControlPersist=no", *ssh_option_argv(options)]


def master_argv(ssh: str, dest: Destination, *, port: int, control_path: Path,
                options: dict[str, str | int]) -> list[str]:
    """``ssh -N -o ControlMaster=yes -o ControlPath=... options -p port user@host``."""
    return [ssh, *master_flags(control_path, options), "-p", str(port), dest.target]


def mux_argv(ssh: str, control_path: Path, *args: str, options: Sequence[str] = ()) -> list[str]:
    """A client of a running master: ``ssh -S ctl -O forward -R ...`` or ``ssh -S ctl -T x cmd``.

    The host argument is required by ssh's syntax but unused: the master is already connected.
    ``options`` (``["-o", "K=V", ...]``) go before it.
    """
    if args and args[0] == "-O":
        return [ssh, "-S", str(control_path), *args, "colab-remote-mux"]
    # ProxyCommand=false: should the master be gone, fail instead of dialling "colab-remote-mux".
    return [ssh, "-S", str(control_path), "-T", "-o", "BatchMode=yes", "-o", "ProxyCommand=false",
            *options, "colab-remote-mux", *args]


# The remote sshd process that serves one connection is the parent of any command run on it.
SESSION_PID_COMMAND = "echo colab-remote-session $PPID"


def session_pid_command(restricted: bool) -> str:
    """Asks the server for the pid of the sshd process serving this connection.

    With a restricted key the server's helper answers (``session``); otherwise a shell does.
    """
    return "session" if restricted else SESSION_PID_COMMAND


def reclaim_command(pids: list[int], restricted: bool = False) -> str:
    """Ends our own dead sessions still holding the forwarded port.

    With a restricted key the server's helper checks each pid is an sshd process of this user
    that listens on the tunnel's port. Otherwise remote shell text: only processes named sshd*
    are signalled (a pid may have been reused) and the server lets a user signal only their own.
    """
    listed = " ".join(str(int(p)) for p in pids)
    if restricted:
        return f"reclaim {listed}"
    return (f'for p in {listed}; do case "$(ps -o comm= -p "$p" 2>/dev/null)" in sshd*) '
            'kill "$p";; esac; done; true')


def connection_string(jump: str, *, remote_port: int, login_user: str) -> str:
    """What the user types on their laptop: ``ssh -J bob@server -p 20022 root@localhost``."""
    return f"ssh -J {jump} -p {remote_port} {login_user}@localhost"


def ssh_config_block(alias: str, *, jump: str, remote_port: int, login_user: str) -> str:
    """A ``~/.ssh/config`` block for the runtime behind the tunnel (VS Code Remote-SSH reads it).

    ``HostKeyAlias`` keeps the runtime's key apart from whatever else answers on
    localhost:remote_port; the runtime's key changes with each new runtime unless its host keys
    are kept (start_sshd(host_keys=...)).
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", alias):
        raise ValueError(f"alias {alias!r} must be letters, digits, '_', '.', '-'")
    return "\n".join([
        f"Host {alias}",
        "    HostName localhost",
        f"    Port {remote_port}",
        f"    User {login_user}",
        f"    ProxyJump {jump}",
        f"    HostKeyAlias {alias}",
        "    ServerAliveInterval 15",
        "",
    ])


def known_hosts_line(host: str, port: int, key_line: str) -> str:
    """A known_hosts line pinning ``key_line`` (``type base64 [comment]``) for host:port."""
    parsed = _key_blob(key_line)
    if parsed is None:
        raise ValueError(f"host_key {key_line[:40]!r} is not a public key line")
    pattern = host if port == 22 else f"[{host}]:{port}"
    return f"{pattern} {parsed[0]} {base64.b64encode(parsed[1]).decode()}"


def check_host_key(host_key: object) -> str:
    """Return ``host_key`` if it is a ``SHA256:`` fingerprint or a known_hosts/public key line."""
    if not isinstance(host_key, str):
        raise TypeError(f"host_key must be a str ('SHA256:...' or a key line), got {host_key!r}")
    text = host_key.strip()
    if re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}=?", text):
        return text.rstrip("=")
    if "\n" not in text and _key_blob(text) is not None:
        return text
    raise ValueError(
        f"host_key {host_key[:50]!r} is neither a 'SHA256:...' fingerprint (as ssh-keygen -l prints) "
        "nor a known_hosts or public key line ('ssh-ed25519 AAAA...')")
