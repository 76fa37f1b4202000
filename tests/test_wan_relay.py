"""The WAN emulator of the benchmarks (bench/wan.py): delay and bandwidth per direction, byte
counts, cut/restore, reset. Plain TCP through a real relay process; small sizes, seconds each."""

from __future__ import annotations

import contextlib
import socket
import statistics
import threading
import time
from collections.abc import Iterator

import pytest

from bench.wan import P1, P2, Profile, WanRelay


class Upstream:
    """A TCP server in a thread: records when bytes arrive, answers ``PING`` with ``PONG``,
    and can send bytes back on request."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.received: dict[int, int] = {}        # connection index -> bytes
        self.arrivals: dict[int, list[tuple[float, int]]] = {}   # (time, bytes so far)
        self.pings: list[float] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                k = len(self.conns)
                self.conns.append(conn)
                self.received[k] = 0
                self.arrivals[k] = []
            threading.Thread(target=self._read, args=(k, conn), daemon=True).start()

    def _read(self, k: int, conn: socket.socket) -> None:
        while True:
            try:
                data = conn.recv(1 << 20)
            except OSError:
                return
            now = time.monotonic()
            if not data:
                return
            if data == b"PING":
                self.pings.append(now)
                conn.sendall(b"PONG")
                continue
            with self.lock:
                self.received[k] += len(data)
                self.arrivals[k].append((now, self.received[k]))

    def when(self, k: int, nbytes: int, timeout: float = 10) -> float:
        """time.monotonic() when connection k had received ``nbytes``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for t, n in self.arrivals.get(k, []):
                    if n >= nbytes:
                        return t
            time.sleep(0.002)
        raise AssertionError(f"connection {k}: {self.received.get(k)} of {nbytes} bytes arrived")

    def close(self) -> None:
        self.listener.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    up = Upstream()
    yield up
    up.close()


def connect(relay: WanRelay) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def test_profiles_match_the_issue() -> None:
    assert (P1.rtt, P1.rate("up"), P1.rate("down")) == (0.1, 50e6 / 8, 50e6 / 8)
    assert (P2.rtt, P2.rate("up"), P2.rate("down")) == (0.2, 20e6 / 8, 50e6 / 8)
    assert P1.floor(200 * 2**20) == pytest.approx(0.05 + 200 * 2**20 * 8 / 50e6)


def test_delay_per_direction(upstream: Upstream) -> None:
    profile = Profile("t", 40, 90, None, None)
    with WanRelay(upstream.port, profile) as relay, connect(relay) as s:
        time.sleep(0.3)  # past the emulated handshake
        ups, downs = [], []
        for _ in range(5):
            n = len(upstream.pings)
            t0 = time.monotonic()
            s.sendall(b"PING")
            assert s.recv(16) == b"PONG"
            t1 = time.monotonic()
            ups.append(upstream.pings[n] - t0)
            downs.append(t1 - upstream.pings[n])
            time.sleep(0.05)
    assert 0.040 <= statistics.median(ups) <= 0.040 + 0.02, ups
    assert 0.090 <= statistics.median(downs) <= 0.090 + 0.02, downs


def test_a_new_connection_costs_one_rtt(upstream: Upstream) -> None:
    """The client's first byte arrives 1.5 RTT after connect(), as over a real TCP handshake."""
    profile = Profile("t", 50, 50, None, None)
    with WanRelay(upstream.port, profile) as relay:
        t0 = time.monotonic()
        with connect(relay) as s:
            s.sendall(b"hello")
            arrived = upstream.when(0, 5) - t0
    assert 0.15 <= arrived <= 0.15 + 0.03, arrived


@pytest.mark.parametrize(("direction", "mbit", "size"), [("up", 50, 3_000_000),
                                                         ("down", 8, 1_000_000)])
def test_throughput_near_the_cap_and_bytes_counted(upstream: Upstream, direction: str, mbit: float,
                                                   size: int) -> None:
    profile = Profile("t", 20, 20, mbit if direction == "up" else None,
                      mbit if direction == "down" else None)
    with WanRelay(upstream.port, profile) as relay, connect(relay) as s:
        time.sleep(0.1)
        blob = b"z" * size
        if direction == "up":
            t0 = time.monotonic()
            s.sendall(blob)
            elapsed = upstream.when(0, size) - t0
        else:
            deadline = time.monotonic() + 5
            while not upstream.conns and time.monotonic() < deadline:
                time.sleep(0.005)
            t0 = time.monotonic()
            threading.Thread(target=upstream.conns[0].sendall, args=(blob,), daemon=True).start()
            got = 0
            while got < size:
                got += len(s.recv(1 << 20))
            elapsed = time.monotonic() - t0
        counters = relay.counters()
    floor = profile.floor(size, direction)
    assert 0.97 * floor <= elapsed <= 1.2 * floor, (elapsed, floor)
    assert counters[direction]["in"] == counters[direction]["out"] == size
    assert counters["connections"] == 1


def test_the_link_is_shared_by_its_connections(upstream: Upstream) -> None:
    profile = Profile("t", 10, 10, 16, None)
    size = 1_000_000
    with WanRelay(upstream.port, profile) as relay:
        a, b = connect(relay), connect(relay)
        time.sleep(0.1)
        t0 = time.monotonic()
        threads = [threading.Thread(target=c.sendall, args=(b"q" * size,)) for c in (a, b)]
        for t in threads:
            t.start()
        done = max(upstream.when(0, size), upstream.when(1, size)) - t0
        for t in threads:
            t.join()
        a.close()
        b.close()
    assert done >= 0.97 * profile.floor(2 * size), done  # 2 MB at 16 Mbit/s: 1 s, not 0.5
    assert done <= 1.2 * profile.floor(2 * size), done


def test_the_relay_pushes_back_instead_of_buffering(upstream: Upstream) -> None:
    """Beyond the bottleneck's queue the relay reads nothing: what it holds stays bounded."""
    profile = Profile("t", 20, 20, 8, None, queue_ms=50)
    with WanRelay(upstream.port, profile) as relay, connect(relay) as s:
        def send() -> None:
            with contextlib.suppress(OSError):
                s.sendall(b"w" * 8_000_000)   # more than the kernel's buffers take

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        time.sleep(0.8)
        c = relay.counters()
        held = c["up"]["in"] - c["up"]["out"]
        # the queue (50 ms), what is in flight (20 ms), a chunk read ahead, at 1 MB/s, and 100 ms
        # of slack for a busy machine (the relay's own timers run late); without the pushback it
        # would hold what the sender wrote and the link has not carried yet: megabytes
        assert held <= (0.05 + 0.02 + 0.1) * 1e6 + 2 * 16384, held
        assert sender.is_alive()   # the sender waits for the link
        s.shutdown(socket.SHUT_RDWR)


def test_cut_holds_everything_and_restore_delivers_it(upstream: Upstream) -> None:
    profile = Profile("t", 20, 20, None, None)
    with WanRelay(upstream.port, profile) as relay, connect(relay) as s:
        time.sleep(0.1)
        s.sendall(b"before")
        upstream.when(0, 6)
        relay.cut()
        s.sendall(b"during")
        late = connect(relay)    # a connection made while the link is down waits too
        late.sendall(b"late!")
        time.sleep(0.5)
        assert upstream.received[0] == 6
        assert len(upstream.conns) == 1
        assert relay.counters()["cut"]
        t0 = time.monotonic()
        relay.restore()
        arrived = upstream.when(0, 12) - t0
        upstream.when(1, 5)
        assert 0.02 <= arrived <= 0.02 + 0.05, arrived
        s.sendall(b"after")
        upstream.when(0, 17)
        c = relay.counters()
        assert c["up"]["out"] == 6 + 6 + 5 + 5
        assert 0.5 <= c["outage_s"] <= 0.7
        late.close()


def test_reset_ends_connections_with_an_rst(upstream: Upstream) -> None:
    with WanRelay(upstream.port, Profile("t", 5, 5, None, None)) as relay, connect(relay) as s:
        time.sleep(0.1)
        s.sendall(b"x")
        upstream.when(0, 1)
        assert relay.reset() == 1
        s.settimeout(5)
        with pytest.raises(ConnectionResetError):
            s.recv(10)
