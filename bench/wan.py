"""A WAN emulator for the benchmarks: a TCP relay on 127.0.0.1 in front of an sshd port.

Each direction has a fixed one-way delay and a bandwidth cap, and the relay counts the bytes it
passes. "up" is client -> upstream (the runtime sending to the server), "down" the other way.

How a direction works (one asyncio loop in a process of its own, so the benchmark's own Python
work never delays a packet):

- a chunk read from the sender (at most 16 KiB) is *serialized* on the direction's one link
  after everything queued before it, from every connection: it leaves at ``link_free =
  max(now, link_free) + size / rate`` and arrives ``delay`` later, when it is written to the
  receiver. So a 50 Mbit/s link delivers 50 Mbit/s (of payload) and no more, whatever the
  number of connections, and a small write behind a big one waits for it, as on a real link;
- while more than ``queue`` seconds of data wait for the link (the bottleneck router's buffer,
  one RTT by default: the textbook size), the relay stops reading, so TCP's flow control pushes
  back on the sender: the sender's own socket buffer is its queue, as on a real link. The relay's
  receive buffers are kept small (SO_RCVBUF) so they add little queue of their own;
- a new connection takes one RTT before the client's first byte may leave (the TCP handshake a
  loopback connect skips): the relay connects upstream after the up delay, and the client's
  data may start one RTT after the accept.

``cut()`` makes packets vanish: every connection stays open, nothing passes in either direction,
new connections are accepted but get nothing (as a SYN into a black hole would: ssh's
ConnectTimeout fires on the banner); ``restore()`` resumes, with what was in flight delivered
after the outage (TCP would retransmit it). ``reset()`` ends every connection with an RST.

Use it from Python::

    with WanRelay(sshd_port, P1) as relay:   # relay.port: connect here instead of sshd_port
        ...
        relay.cut(); time.sleep(10); relay.restore()
        relay.counters()  # {"up": {"in": ..., "out": ...}, "down": {...}, "connections": ...}

or by hand: ``python bench/wan.py --upstream-port 2222 --profile P1`` prints its port, then takes
``cut``, ``restore``, ``reset``, ``counters`` lines on stdin (EOF stops it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from typing import Any

CHUNK = 16 * 1024
RCVBUF = 32 * 1024       # the kernel doubles it: ~64 KiB of hidden queue per relay socket


@dataclass(frozen=True)
class Profile:
    """A link: one-way delays (ms) and caps (Mbit/s of payload, None: no cap) per direction."""

    name: str
    delay_up_ms: float
    delay_down_ms: float
    up_mbit: float | None
    down_mbit: float | None
    queue_ms: float | None = None   # the bottleneck's buffer; None: one RTT

    @property
    def rtt(self) -> float:
        return (self.delay_up_ms + self.delay_down_ms) / 1000

    def delay(self, direction: str = "up") -> float:
        """One-way delay in seconds."""
        return (self.delay_up_ms if direction == "up" else self.delay_down_ms) / 1000

    def rate(self, direction: str = "up") -> float | None:
        """Bytes per second (None: no cap)."""
        mbit = self.up_mbit if direction == "up" else self.down_mbit
        return None if mbit is None else mbit * 1e6 / 8

    def queue(self) -> float:
        return (self.queue_ms / 1000) if self.queue_ms is not None else self.rtt

    def floor(self, nbytes: float, direction: str = "up") -> float:
        """The physical floor of sending ``nbytes`` one way: delay + size / bandwidth (s)."""
        rate = self.rate(direction)
        return self.delay(direction) + (nbytes / rate if rate else 0.0)

    def describe(self) -> str:
        def cap(v: float | None) -> str:
            return "uncapped" if v is None else f"{v:g} Mbit/s"

        return (f"{self.name}: RTT {self.rtt * 1000:g} ms ({self.delay_up_ms:g} up, "
                f"{self.delay_down_ms:g} down), up {cap(self.up_mbit)}, down {cap(self.down_mbit)}, "
                f"queue {self.queue() * 1000:g} ms")


P1 = Profile("P1", 50, 50, 50, 50)
P2 = Profile("P2", 100, 100, 20, 50)
PROFILES = {"P1": P1, "P2": P2}


# --- the relay (runs in its own process) ----------------------------------------------------------


def _rst(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a reset link or a crashed peer would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Direction:
    def __init__(self, delay: float, rate: float | None, queue: float) -> None:
        self.delay, self.rate, self.queue = delay, rate, queue
        self.link_free = 0.0          # when the link has serialized everything admitted so far
        self.bytes_in = 0             # read from senders
        self.bytes_out = 0            # delivered to receivers
        self.pipes: set[_Pipe] = set()


_EOF = b""


class _Pipe:
    """One connection, one direction: read, serialize on the shared link, deliver when due."""

    def __init__(self, link: _Link, d: _Direction, src: socket.socket, dst: socket.socket,
                 not_before: float) -> None:
        self.link, self.d, self.src, self.dst = link, d, src, dst
        self.not_before = not_before
        self.queue: deque[tuple[float, bytes]] = deque()
        self.wake = asyncio.Event()
        self.early = asyncio.Event()
        self.last_due = 0.0

    async def read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await loop.sock_recv(self.src, CHUNK)
                if not data:
                    break
                self.d.bytes_in += len(data)
                wait = self.not_before - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                due = await self.link.admit(self.d, len(data))
                self.last_due = max(self.last_due, due)
                self.queue.append((self.last_due, data))
                self.wake.set()
        finally:
            # the sender's EOF (or its error) travels after its last data
            self.last_due = max(self.last_due, loop.time() + self.d.delay)
            self.queue.append((self.last_due, _EOF))
            self.wake.set()

    async def write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.wake.clear()
                await self.wake.wait()
            if self.link.cut_since is not None:
                await self.link.restored.wait()
                continue
            due, data = self.queue[0]
            wait = due - loop.time()
            if wait > 0:
                # a cut or a restore (which moves the dues) wakes this early: look again then
                self.early.clear()
                self.link.sleepers.add(self)
                try:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self.early.wait(), wait)
                finally:
                    self.link.sleepers.discard(self)
                continue
            self.queue.popleft()
            if data is _EOF:
                with contextlib.suppress(OSError):
                    self.dst.shutdown(socket.SHUT_WR)
                return
            await loop.sock_sendall(self.dst, data)
            self.d.bytes_out += len(data)

    def shift(self, by: float) -> None:
        self.queue = deque((due + by, data) for due, data in self.queue)
        self.last_due += by


class _Link:
    def __init__(self, upstream: tuple[str, int], profile: Profile) -> None:
        self.upstream = upstream
        self.profile = profile
        self.up = _Direction(profile.delay("up"), profile.rate("up"), profile.queue())
        self.down = _Direction(profile.delay("down"), profile.rate("down"), profile.queue())
        self.cut_since: float | None = None
        self.outage = 0.0
        self.restored = asyncio.Event()
        self.restored.set()
        self.sleepers: set[_Pipe] = set()
        self.conns: dict[asyncio.Task[Any], list[socket.socket]] = {}
        self.opened = 0
        self.refused = 0

    async def admit(self, d: _Direction, nbytes: int) -> float:
        """Wait for room in the bottleneck's queue (and for the link); the chunk's arrival time."""
        loop = asyncio.get_running_loop()
        while True:
            if self.cut_since is not None:
                await self.restored.wait()
                continue
            now = loop.time()
            if d.rate is None:
                return now + d.delay
            backlog = d.link_free - now
            if backlog > d.queue:
                await asyncio.sleep(backlog - d.queue)
                continue
            d.link_free = max(now, d.link_free) + nbytes / d.rate
            return d.link_free + d.delay

    async def until_up(self) -> None:
        while self.cut_since is not None:
            await self.restored.wait()

    def _wake_sleepers(self) -> None:
        for pipe in list(self.sleepers):
            pipe.early.set()

    def cut(self) -> None:
        if self.cut_since is None:
            self.cut_since = asyncio.get_running_loop().time()
            self.restored.clear()
            self._wake_sleepers()

    def restore(self) -> None:
        if self.cut_since is None:
            return
        now = asyncio.get_running_loop().time()
        by = now - self.cut_since
        self.outage += by
        for d in (self.up, self.down):
            if d.link_free > self.cut_since:
                d.link_free += by
            for pipe in d.pipes:
                pipe.shift(by)
        self.cut_since = None
        self.restored.set()
        self._wake_sleepers()

    def reset(self) -> int:
        """RST both sides of every connection (closed by its task, cancelled here)."""
        for task, socks in list(self.conns.items()):
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            task.cancel()
        return len(self.conns)

    def counters(self) -> dict[str, Any]:
        return {"up": {"in": self.up.bytes_in, "out": self.up.bytes_out},
                "down": {"in": self.down.bytes_in, "out": self.down.bytes_out},
                "connections": self.opened, "open": len(self.conns), "refused": self.refused,
                "cut": self.cut_since is not None, "outage_s": self.outage}

    async def handle(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        me = asyncio.current_task()
        assert me is not None
        socks = self.conns[me] = [client]
        try:
            await self.until_up()
            await asyncio.sleep(self.up.delay)          # the SYN travelling
            await self.until_up()
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(upstream)
            upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream.setblocking(False)
            try:
                await loop.sock_connect(upstream, self.upstream)
            except OSError:
                self.refused += 1
                await asyncio.sleep(self.down.delay)    # the RST travelling back
                _rst(client)
                return
            self.opened += 1
            up = _Pipe(self, self.up, client, upstream, t0 + self.profile.rtt)
            down = _Pipe(self, self.down, upstream, client, 0.0)
            await self._run(up, down)
        except OSError:
            pass
        finally:
            del self.conns[me]
            for sock in socks:
                sock.close()

    async def _run(self, up: _Pipe, down: _Pipe) -> None:
        self.up.pipes.add(up)
        self.down.pipes.add(down)
        tasks = [asyncio.ensure_future(c) for c in
                 (up.read_loop(), up.write_loop(), down.read_loop(), down.write_loop())]
        writers = {tasks[1], tasks[3]}
        try:
            # the connection ends when both directions delivered their EOF, or on an error
            running = set(tasks)
            while writers & running:
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                if any(not t.cancelled() and t.exception() is not None for t in done):
                    break
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.up.pipes.discard(up)
            self.down.pipes.discard(down)

    async def serve(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            client, _ = await loop.sock_accept(listener)
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            asyncio.ensure_future(self.handle(client))


def _listener(host: str) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)  # accepted sockets inherit it
    listener.bind((host, 0))
    listener.listen(128)
    listener.setblocking(False)
    return listener


def serve(upstream_port: int, profile: Profile, host: str = "127.0.0.1") -> None:
    """Run a relay: print {"port": N} on stdout, then answer one JSON line per command line on
    stdin (cut, restore, reset, counters); return at EOF."""
    if os.geteuid() == 0:
        # the network is not a program competing for the CPU: ahead of ssh, rsync and sshd
        with contextlib.suppress(OSError):
            os.nice(-5)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    link = _Link((host, upstream_port), profile)
    listener = _listener(host)
    server = loop.create_task(link.serve(listener))
    done = asyncio.Event()

    def answer(line: str) -> dict[str, Any]:
        cmd = line.strip()
        if cmd == "cut":
            link.cut()
        elif cmd == "restore":
            link.restore()
        elif cmd == "reset":
            return {"ok": True, "reset": link.reset(), **link.counters()}
        elif cmd != "counters":
            return {"ok": False, "error": f"unknown command {cmd!r}"}
        return {"ok": True, **link.counters()}

    def commands() -> None:
        out = sys.stdout
        out.write(json.dumps({"port": listener.getsockname()[1], "pid": os.getpid(),
                              "profile": asdict(profile)}) + "\n")
        out.flush()
        for line in sys.stdin:
            if not line.strip():
                continue
            reply = asyncio.run_coroutine_threadsafe(_call(answer, line), loop).result(10)
            out.write(json.dumps(reply) + "\n")
            out.flush()
        loop.call_soon_threadsafe(done.set)

    threading.Thread(target=commands, daemon=True).start()
    try:
        loop.run_until_complete(done.wait())
    finally:
        server.cancel()
        link.reset()
        with contextlib.suppress(Exception):
            loop.run_until_complete(asyncio.gather(server, *link.conns, return_exceptions=True))
        listener.close()
        loop.close()


async def _call(fn: Any, arg: str) -> Any:
    return fn(arg)


# --- the handle the benchmarks use ----------------------------------------------------------------


class WanRelay:
    """A relay process in front of 127.0.0.1:``upstream_port`` with ``profile``; ``.port`` is where
    to connect instead. Stop it with :meth:`close` (or use it as a context manager)."""

    def __init__(self, upstream_port: int, profile: Profile, *, host: str = "127.0.0.1",
                 timeout: float = 10) -> None:
        self.profile = profile
        self.upstream_port = upstream_port
        self._lock = threading.Lock()
        self._buf = b""
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--upstream-port", str(upstream_port),
             "--host", host, "--profile-json", json.dumps(asdict(profile))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, start_new_session=True)
        self.pid = self.proc.pid
        try:
            hello = self._line(timeout)
        except Exception:
            self.close()
            raise
        self.port = int(hello["port"])

    def _line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError("the WAN relay did not answer")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"the WAN relay exited (code {self.proc.poll()})")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return dict(json.loads(line))

    def _ask(self, command: str) -> dict[str, Any]:
        with self._lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write(command.encode() + b"\n")
            reply = self._line(10)
        if not reply.get("ok"):
            raise RuntimeError(f"the WAN relay refused {command!r}: {reply}")
        return reply

    def cut(self) -> None:
        """Packets vanish from now on: connections stay open, nothing passes."""
        self._ask("cut")

    def restore(self) -> None:
        """The link is back: what was held is delivered (after the delay), new data flows."""
        self._ask("restore")

    def reset(self) -> int:
        """End every connection with an RST (both sides); how many there were."""
        return int(self._ask("reset")["reset"])

    def counters(self) -> dict[str, Any]:
        """Bytes per direction (``in``: read from senders, ``out``: delivered), connections."""
        return self._ask("counters")

    def up_bytes(self) -> int:
        """Bytes delivered runtime -> server so far."""
        return int(self.counters()["up"]["out"])

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, 9)
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> WanRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<WanRelay 127.0.0.1:{self.port} -> {self.upstream_port} {self.profile.describe()}>"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="P1")
    parser.add_argument("--queue-ms", type=float, help="the bottleneck's buffer (default: one RTT)")
    parser.add_argument("--profile-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.profile_json:
        profile = Profile(**json.loads(args.profile_json))
    else:
        profile = PROFILES[args.profile]
    if args.queue_ms is not None:
        profile = replace(profile, queue_ms=args.queue_ms)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        parser.error("the relay only listens on, and connects to, this machine")
    serve(args.upstream_port, profile, args.host)
    return 0


if __name__ == "__main__":
    sys.exit(main())
