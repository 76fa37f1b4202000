"""The text of start_sshd's own sshd config, the session environment in it, and its check.

The system's /etc/ssh/sshd_config is never touched: sshd runs with ``-f`` on this file, root-owned
and 0600 in the state folder. The kernel's environment travels in its one ``SetEnv`` line (sshd
reads only the first), so only root decides what sessions get.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

from . import _install, _net, _proc
from .errors import SshdError

log = logging.getLogger(__name__)

# sshd sets this (SetEnv, in its root-owned config) to the kernel's PATH; the profile block puts
# it back after /etc/profile has reset PATH in a login shell.
PATH_VARIABLE = "COLAB_REMOTE_PATH"
ENV_MARKER = "# The notebook kernel's environment for every session (start_sshd, refresh_environment):"


def listen_addresses(listen_address: str | None) -> list[str]:
    """Where sshd listens: 127.0.0.1 and ::1 (the tunnel's way in), plus ``listen_address``.

    ::1 is left out on a machine where it cannot be bound (no IPv6). ``"0.0.0.0"`` takes the place
    of 127.0.0.1 and ``"::"`` that of ::1 (sshd binds IPv6 sockets v6-only).
    """
    loopback = ["127.0.0.1", *(["::1"] if _net.can_bind("::1") else [])]
    if listen_address == "0.0.0.0":
        return ["0.0.0.0", *loopback[1:]]
    if listen_address == "::":
        return ["127.0.0.1", "::"]
    return list(dict.fromkeys([*loopback, *([listen_address] if listen_address else [])]))


def banner_host(addresses: list[str]) -> str:
    if not addresses or "127.0.0.1" in addresses or "0.0.0.0" in addresses:
        return "127.0.0.1"
    return "::1" if "::" in addresses else addresses[0]


def sshd_config(*, port: int, user: str, password_login: bool, host_keys: list[Path],
                pid_file: Path, gateway_ports: bool, listen_address: str | None,
                listen_addresses: list[str] | None = None) -> str:
    """The text of our own sshd config (the system's /etc/ssh/sshd_config is never touched).

    The session environment is added by :func:`with_environment`.
    """
    sftp = _install.find_program("sftp-server") or next(
        (p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server")
         if os.path.exists(p)), "internal-sftp")
    addresses = listen_addresses if listen_addresses is not None else [
        *([listen_address] if listen_address else [])]
    lines = [
        "# Written by colab_remote.start_sshd(); rewritten on every call. Do not edit.",
        f"Port {port}",
        *[f"ListenAddress {address}" for address in addresses],
        *[f"HostKey {config_word(p)}" for p in host_keys],
        f"PidFile {config_word(pid_file)}",
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
        # The kernel's environment comes from SetEnv below (this root-owned file), never from
        # files or key options the user can write (~/.ssh/environment, environment="...").
        "PermitUserEnvironment no",
        "ClientAliveInterval 30",
        "ClientAliveCountMax 3",
        "TCPKeepAlive yes",
        "AllowTcpForwarding yes",
        "AllowAgentForwarding no",
        f"GatewayPorts {'yes' if gateway_ports else 'no'}",
        "X11Forwarding no",
        "PrintMotd no",
        "UseDNS no",
        # Every login through the tunnel comes from the loopback: never penalise it (OpenSSH
        # 9.8+; dropped for older sshd, which has no penalties).
        "PerSourcePenaltyExemptList 127.0.0.1/32,::1/128",
        "MaxStartups 100:30:200",
        "LoginGraceTime 60",
        f"Subsystem sftp {sftp}",
    ]
    return "\n".join(lines) + "\n"


def setenv_word(name: str, value: str) -> str:
    """``NAME=value`` as one word of sshd's config (OpenSSH >= 8.7 ``argv_split``).

    Inside double quotes only a backslash before a quote or a backslash escapes it; space, tab,
    ``'``, ``#`` and ``$`` are plain characters, and sshd expands nothing in SetEnv.
    """
    return '"' + f"{name}={value}".replace("\\", "\\\\").replace('"', '\\"') + '"'


def with_environment(text: str, env: Mapping[str, str]) -> str:
    """``text`` (our sshd config) with its SetEnv line replaced by one carrying ``env``.

    sshd uses only the first SetEnv line of a config, so every variable goes on one line.
    """
    head = text.split(ENV_MARKER, 1)[0].rstrip("\n") + "\n"
    if not env:
        return head
    words = " ".join(setenv_word(k, v) for k, v in sorted(env.items()))
    return f"{head}{ENV_MARKER}\nSetEnv {words}\n"


def config_word(value: object) -> str:
    """A path as one sshd_config word (double-quoted when it holds spaces)."""
    text = str(value)
    if '"' in text or "\n" in text or "\\" in text:
        raise ValueError(f"state_dir paths must not contain '\"', '\\' or newlines: {text!r}")
    return f'"{text}"' if any(c.isspace() for c in text) else text


UNSUPPORTED: set[str] = set()
# What an older sshd may not know, and what we do without it.
DROPPABLE = {
    "PerSourcePenaltyExemptList": "",  # before 9.8 there are no penalties to exempt from
    "SetEnv": "this sshd is older than OpenSSH 7.8: SSH sessions do not get the notebook's "
              "environment",
}


def checked_config(sshd_bin: str, path: Path, text: str) -> str:
    """Check the config with ``sshd -t`` and put it in place; drop options this sshd is too old for.

    The SetEnv values are read back with ``sshd -T``: a variable sshd would read differently
    from the kernel's value (an older sshd's quoting) is left out rather than carried wrong.
    """
    for keyword in UNSUPPORTED:
        text = re.sub(rf"(?m)^{keyword} .*\n", "", text)
    candidate = path.with_name(f".{path.name}.new")
    try:
        for _ in range(6):
            _proc.write_private(candidate, text)
            done = _proc.run([sshd_bin, "-t", "-f", str(candidate)], error=SshdError, check=False)
            if done.returncode == 0:
                wrong = misread_variables(sshd_bin, candidate, text)
                if not wrong:
                    os.replace(candidate, path)
                    return text
                log.warning("sshd would not read these variables as they are; SSH sessions do "
                            "not get them: %s", ", ".join(sorted(wrong)))
                text = with_environment(text, {k: v for k, v in intended(text).items()
                                               if k not in wrong})
                continue
            output = done.stdout + done.stderr
            bad = re.search(r"Bad configuration option: (\w+)|Unsupported option (\w+)", output)
            keyword = (bad.group(1) or bad.group(2)) if bad else ""
            if keyword not in DROPPABLE:
                raise SshdError("sshd rejected the configuration (sshd -t)", log_tail=output,
                                fix=f"check {candidate}; report this as a colab-remote bug")
            if DROPPABLE[keyword]:
                log.warning("%s", DROPPABLE[keyword])
            UNSUPPORTED.add(keyword)
            text = re.sub(rf"(?m)^{keyword} .*\n", "", text)
    finally:
        with contextlib.suppress(FileNotFoundError):
            candidate.unlink()
    raise SshdError("sshd rejected the configuration (sshd -t)", fix=f"check {path}")



def intended(text: str) -> dict[str, str]:
    """The variables our SetEnv line in ``text`` was written from (see :func:`with_environment`)."""
    line = next((ln for ln in text.splitlines() if ln.startswith("SetEnv ")), "")
    env: dict[str, str] = {}
    for word in re.findall(r'"((?:[^"\\]|\\.)*)"', line[len("SetEnv "):]):
        item = re.sub(r"\\(.)", r"\1", word)
        name, _, value = item.partition("=")
        env[name] = value
    return env


def misread_variables(sshd_bin: str, config: Path, text: str) -> set[str]:
    """Names whose value ``sshd -T`` reports differently from what we meant to carry."""
    wanted = intended(text)
    if not wanted:
        return set()
    done = _proc.run([sshd_bin, "-T", "-f", str(config)], error=SshdError, check=False)
    if done.returncode != 0:
        return set()  # -T needs more than -t on some systems; -t passed, keep the values
    seen: dict[str, str] = {}
    for line in done.stdout.split("\n"):
        if line.lower().startswith("setenv "):
            name, _, value = line[len("setenv "):].partition("=")
            seen.setdefault(name, value)
    return {name for name, value in wanted.items() if seen.get(name) != value}
