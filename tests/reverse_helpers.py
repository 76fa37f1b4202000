"""Helpers for the reverse tunnel's tests and benchmark: a relay that can go silent, a connector.

The relay is a TCP proxy on 127.0.0.1 in front of the server's sshd. ``freeze()`` makes every
connection open at that moment stop passing data in both directions (nothing is closed, nothing
is refused: a silent link break as a dead NAT entry or a suspended laptop makes it), while new
connections keep working.
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import subprocess
import threading
import time

from colab_remote import _net


class Relay:
    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.upstream = (host, upstream_port)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.listener.listen(64)
        self.port = int(self.listener.getsockname()[1])
        self.pairs: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            frozen = threading.Event()
            with self.lock:
                self.pairs.append((client, server, frozen))
            threading.Thread(target=self._pump, args=(client, server, frozen), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, frozen: threading.Event) -> None:
        peers = {a: b, b: a}
        try:
            while not self.closed.is_set():
                if frozen.is_set():
                    time.sleep(0.05)  # hold both sockets open, read nothing, send nothing
                    continue
                readable, _, _ = select.select([a, b], [], [], 0.05)
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    peers[s].sendall(data)
        except OSError:
            pass
        finally:
            if not frozen.is_set() or self.closed.is_set():
                for s in (a, b):
                    with contextlib.suppress(OSError):
                        s.close()

    def freeze(self) -> int:
        """Stop passing data on every open connection; return how many there are."""
        with self.lock:
            for _, _, frozen in self.pairs:
                frozen.set()
            return len(self.pairs)

    def close(self) -> None:
        self.closed.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        with self.lock:
            for a, b, _ in self.pairs:
                for s in (a, b):
                    with contextlib.suppress(OSError):
                        s.close()
        self.thread.join(2)


class Connector:
    """Connects to 127.0.0.1:port every ``interval`` seconds (a client that keeps trying)."""

    def __init__(self, port: int, interval: float = 0.5) -> None:
        self.port = port
        self.interval = interval
        self.stopped = threading.Event()
        self.attempts = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.attempts += 1
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.3) as s:
                s.settimeout(0.3)
                with contextlib.suppress(OSError):
                    s.recv(64)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(2)


def forward_answers(port: int, timeout: float = 0.5) -> bool:
    """True when 127.0.0.1:port (the forwarded port) answers with an SSH banner."""
    return _net.ssh_banner("127.0.0.1", port, timeout) is not None


def wait_forward(port: int, timeout: float, interval: float = 0.001,
                 banner_timeout: float = 1.0) -> float | None:
    """``time.monotonic()`` when the forwarded port accepted a connection that sent a banner.

    The moment taken is that of the accepted connect; the banner (sshd forking its
    per-connection process) is read afterwards only to tell a live forward from a listener the
    server is still tearing down. None when nothing answered within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=0.5)
        except OSError:
            time.sleep(interval)
            continue
        accepted = time.monotonic()
        with s:
            s.settimeout(banner_timeout)
            try:
                data = s.recv(64)
            except OSError:
                data = b""
        if data.startswith(b"SSH-"):
            return accepted
        time.sleep(interval)
    return None


def listener_pids(port: int) -> set[int]:
    """Pids of the processes listening on TCP ``port`` here (``ss``), without connecting to it.

    Connecting to a forwarded port is activity that keeps a dead session alive on the server:
    a measurement that must not disturb it watches which process listens instead.
    """
    done = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True,
                          timeout=10)
    return {int(p) for p in re.findall(r"pid=(\d+)", done.stdout)}
