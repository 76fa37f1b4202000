"""Network probes: is a port free, does a server answer, what does its SSH banner say.

Plain sockets, no processes (those are :mod:`_proc`'s): the tunnel probes a server that is down, the
set-up reads a server's OpenSSH version, start_sshd checks its port, tests pick free ports.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """True when another program already listens on host:port (we cannot bind it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.errno in (errno.EADDRINUSE, errno.EACCES)
    return False


def ssh_banner(host: str, port: int, timeout: float = 1.0) -> str | None:
    """The SSH identification line a server at host:port sends, or None."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            data = b""
            while b"\n" not in data and len(data) < 512:
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    line = data.split(b"\n", 1)[0].decode(errors="replace").strip()
    return line if line.startswith("SSH-") else None


def tcp_answers(addresses: Sequence[tuple[int, int, int, str, Any]], timeout: float = 0.25) -> bool:
    """True when a TCP connect to any of ``addresses`` (from getaddrinfo) succeeds within timeout."""
    for family, kind, proto, _, sockaddr in addresses:
        with socket.socket(family, kind, proto) as s:
            s.settimeout(timeout)
            try:
                s.connect(sockaddr)
                return True
            except OSError:
                continue
    return False


def can_bind(host: str) -> bool:
    """True when this machine has ``host`` to listen on (False for ::1 without IPv6)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
    except OSError:
        return False
    return True
