"""The big-file lane: files too big for one record stream beside the batches, never ahead of them.

A file of ``_sync.BIG_FILE`` bytes or more is not sent by the worker: :meth:`Lane.submit` hands it
to a thread of its own, which sends it over a second session of the same agent on the server
(``colab-remote lane``, through the same ControlMaster; it joins the agent that writes the copy
with the token of that agent's hello, see :func:`colab_remote._agent.lane.run_lane`). So a small edit
written while a checkpoint streams travels in the batches' session and crosses the link after at
most the lane's short queue, not after the checkpoint.

Each file starts by asking how much of it the server holds (``OP_HAVE``): its partial from a cut
link or a killed mirror, or the file in place when it may have grown here (a log, a checkpoint
written in pieces). When the digest of those bytes is the digest of the first bytes here, the rest
is sent from there; else all of it. The agent writes the chunks into the file's partial in the
staging folder and, at ``OP_FINISH``, checks the digest and keeps it under that digest; the worker
then puts it in place with an ``OP_PLACE`` among its batches (:attr:`Lane.finished`): the live
copy keeps one writer, and a delete or a new small version of the file, sent by the worker after it
cancelled the transfer (:meth:`Lane.cancel`), is never overtaken by an older big one.

Pacing (LEDBAT, RFC 6817): at most :attr:`Pacer.window` bytes of chunks are unanswered; the window
grows (by a chunk per round trip at most) while answers come back within TARGET_DELAY of the lowest
round trip seen, and shrinks (by half per round trip at most) when they come later, so the link's
queue holds about TARGET_DELAY of the lane's data and the batches' records cross it within that.
Files in the lane take turns chunk by chunk (STREAMING at once).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import select
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .. import _agent, _proc
from ..errors import MirrorError
from . import git
from .link import ConnectionLost, Link
from .plan import Digest, identity
from .squeeze import Squeeze

log = logging.getLogger("colab_remote.mirror")

CHUNK = 128 * 1024
TARGET_DELAY = 0.1        # seconds of the lane's data the link's queue may hold
MIN_WINDOW = 2 * CHUNK
START_WINDOW = 4 * CHUNK
MAX_WINDOW = 64 << 20
BASE_HISTORY = 10         # the base round trip: the lowest of the last 10 minutes
STALL = 60.0              # no answer for this long: the session is lost (ssh's keepalive says so first)
STREAMING = 8             # files sent at once, a chunk each in turn (the rest wait)
IDLE_CLOSE = 120.0        # an idle lane's session ends (the next big file opens one again)
RETRY = (1.0, 30.0)       # a session that failed is opened again after this backoff
IDLE_LOOK = 60.0          # idle, the thread sleeps until woken (attach, submit, cancel, close notify)
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
NEW, ASKED, SENDING, FINISHING = range(4)


@dataclass(frozen=True)
class Finished:
    """A big file whose bytes the server holds whole (its partial, checked): for ``OP_PLACE``.

    ``key`` is the file as it was when the lane opened it, before it read a byte: what is read is
    that version only while the file still has that identity when it is placed (else the worker
    leaves it, and the change's own event sends the file again, building on these bytes)."""

    rel: str
    key: Digest       # size, mtime, mode, inode:ctime when it was opened
    size: int         # the bytes read (more than key's size when it grew meanwhile)
    digest: bytes


class Transfer:
    """One big file on its way. ``key`` and ``epoch`` change under the lane's lock (a new
    ``epoch``: start again, and answers to earlier requests are stale); the rest is the lane
    thread's alone (it reads the file, and only it closes it)."""

    def __init__(self, rel: str, key: Digest) -> None:
        self.rel, self.key = rel, key
        self.epoch = 0
        self.started = -1     # the epoch the thread is sending
        self.state = NEW
        self.fd = -1
        self.offset = 0       # the next chunk starts here
        self.hasher = hashlib.blake2b(digest_size=_agent.DIGEST_SIZE)
        self.opened: Digest | None = None  # the file as it was when it was opened
        self.touched = False  # the server may hold a partial of it

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Pacer:
    """How many bytes of chunks may be unanswered (see the module docstring), and the lane's
    delivery rate."""

    def __init__(self) -> None:
        self.window = float(START_WINDOW)
        self.slow_start = True
        self.base: collections.deque[tuple[float, float]] = collections.deque()  # (minute, lowest)
        self.acked: collections.deque[tuple[float, int]] = collections.deque()   # (when, bytes)

    @property
    def base_rtt(self) -> float | None:
        return min(low for _, low in self.base) if self.base else None

    def answered(self, nbytes: int, rtt: float, now: float) -> None:
        minute = now // 60
        if self.base and self.base[-1][0] == minute:
            self.base[-1] = (minute, min(self.base[-1][1], rtt))
        else:
            self.base.append((minute, rtt))
            while len(self.base) > BASE_HISTORY:
                self.base.popleft()
        queued = rtt - (self.base_rtt or rtt)
        if self.slow_start and queued < TARGET_DELAY / 2:
            self.window += nbytes  # doubles each round trip until the queue starts to grow
        else:
            self.slow_start = False
            off_target = max(-1.0, min(1.0, (TARGET_DELAY - queued) / TARGET_DELAY))
            if off_target >= 0:  # a chunk more per round trip at most
                self.window += off_target * nbytes * CHUNK / self.window
            else:  # at most half the window per round trip
                self.window += off_target * nbytes / 2
        self.window = max(float(MIN_WINDOW), min(float(MAX_WINDOW), self.window))
        self.acked.append((now, nbytes))
        while self.acked and now - self.acked[0][0] > 2.0:
            self.acked.popleft()

    def rate(self) -> float | None:
        """Bytes/s answered over the last two seconds (None: too few answers to tell)."""
        if len(self.acked) < 4:
            return None
        span = self.acked[-1][0] - self.acked[0][0]
        return sum(n for _, n in list(self.acked)[1:]) / span if span > 0.05 else None


def lane_command(agent_command: str) -> str:
    """How to start the lane: ``colab-remote lane`` under a restricted key, else the agent's
    command with ``--lane``."""
    if agent_command == "colab-remote agent":
        return "colab-remote lane"
    return f"{agent_command} --lane"


class Session:
    """One lane session: the ssh process through the master, records both ways without blocking."""

    def __init__(self, link: Link, token: str, command: str, log_path: Path) -> None:
        self.log_path = log_path
        self.proc = _proc.open_pipes(link.mux(lane_command(command)), stderr_path=log_path)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.wfd, self.rfd = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        os.set_blocking(self.wfd, False)
        self.inbuf = b""
        self.out = bytearray()
        try:
            self.out += _agent.pack(_agent.OP_JOIN, data=token.encode())
            deadline = time.monotonic() + 30
            while True:
                self.pump(min(1.0, deadline - time.monotonic()))
                found = self.answers()
                if found:
                    break
                if time.monotonic() > deadline:
                    raise ConnectionLost("the lane's agent did not answer")
            op, _, data = found[0][0], found[0][1], found[0][5]
            if op == _agent.R_FAIL:
                raise ConnectionLost(f"the server refused the lane: {data.decode(errors='replace')}")
            hello = json.loads(data) if op == _agent.R_HELLO else {}
            if hello.get("protocol") != _agent.VERSION:
                raise MirrorError(f"the lane's agent speaks protocol {hello.get('protocol')!r}")
        except BaseException:
            self.close()
            raise

    def pump(self, timeout: float, extra: Iterable[int] = ()) -> list[int]:
        """Write what is queued, read what came (at most ``timeout`` s); the ``extra`` descriptors
        that are readable."""
        readable, writable, _ = select.select([self.rfd, *extra], [self.wfd] if self.out else [], [],
                                              max(0.0, timeout))
        if writable:
            try:
                n = os.write(self.wfd, self.out[:1 << 20])
                del self.out[:n]
            except BlockingIOError:
                pass
            except OSError as e:
                raise ConnectionLost(f"the lane's session closed: {e}") from e
        if self.rfd in readable:
            chunk = os.read(self.rfd, 1 << 20)
            if not chunk:
                raise ConnectionLost(f"the lane's session closed: {_proc.tail(self.log_path)[-300:]}")
            self.inbuf += chunk
        elif self.proc.poll() is not None:
            raise ConnectionLost(f"the lane's session ended: {_proc.tail(self.log_path)[-300:]}")
        return [fd for fd in readable if fd != self.rfd]

    def answers(self) -> list[tuple[bytes, bytes, int, int, int, bytes]]:
        """The complete records read so far."""
        found = []
        size = _agent.HEADER.size
        while len(self.inbuf) >= size:
            op, plen, mode, mtime, offset, dlen = _agent.HEADER.unpack(self.inbuf[:size])
            if len(self.inbuf) < size + plen + dlen:
                break
            path = self.inbuf[size:size + plen]
            data = self.inbuf[size + plen:size + plen + dlen]
            self.inbuf = self.inbuf[size + plen + dlen:]
            found.append((op, path, mode, mtime, offset, data))
        return found

    def close(self) -> None:
        _proc.end_pipes(self.proc, timeout=1)


class Lane:
    """The big-file lane of one mirror (see the module docstring); its own thread.

    The worker calls :meth:`attach` / :meth:`detach` as it connects, :meth:`submit` and
    :meth:`cancel` as it plans, takes :meth:`take_finished` (to place) and :meth:`take_errors`;
    ``notify`` wakes the worker when there is something to take or the session failed
    (:attr:`broken`).
    """

    def __init__(self, root: str, squeeze: Squeeze, notify: Callable[[], None], log_path: Path) -> None:
        self.root, self.squeeze, self.notify, self.log_path = root, squeeze, notify, log_path
        self.cond = threading.Condition()
        self.transfers: dict[str, Transfer] = {}
        self.finished: dict[str, Finished] = {}
        self.errors: list[list[str]] = []
        self.dropped: list[Transfer] = []   # cancelled: the thread closes them, the server forgets
        self.link: Link | None = None
        self.token = ""
        self.command = ""  # how the server starts the agent (the lane adds --lane)
        self.generation = 0                 # each attach and detach
        self.broken: str | None = None      # why the session failed (the worker checks the link)
        self.closing = False
        self.progress = 0                   # answers received (wait_for's liveness)
        self.pacer = Pacer()
        self.stats = {"files": 0, "sent_bytes": 0, "resumed_bytes": 0, "sessions": 0}
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.thread = threading.Thread(target=self._run, name="big-file lane", daemon=True)
        self.thread.start()

    # -- the worker's side ---------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def attach(self, link: Link, token: str, command: str) -> None:
        with self.cond:
            self.link, self.token, self.command, self.broken = link, token, command, None
            self.generation += 1
            self.cond.notify_all()
        self._wake()

    def detach(self) -> None:
        with self.cond:
            self.link = None
            self.generation += 1
            self.cond.notify_all()
        self._wake()

    def submit(self, rel: str, key: Digest) -> bool:
        """Send ``rel`` (as ``key`` says it is now); False when it is on its way already."""
        with self.cond:
            t = self.transfers.get(rel)
            done = self.finished.get(rel)
            if (t is not None and t.key == key) or (done is not None and done.key == key):
                return False
            self.finished.pop(rel, None)
            if t is None:
                self.transfers[rel] = Transfer(rel, key)
            else:  # changed while it was sent: again, from what the server holds of it
                t.key = key
                t.epoch += 1
            self.cond.notify_all()
        self._wake()
        return True

    def cancel(self, rel: str, *, below: bool = False) -> None:
        """Stop sending ``rel`` (and, with ``below``, everything under it) and forget what the
        server holds of it: the worker is about to send something else there."""
        with self.cond:
            if not self.transfers and not self.finished:
                return
            prefix = rel + "/"
            for name in [n for n in [*self.transfers, *self.finished]
                         if n == rel or below and n.startswith(prefix)]:
                t = self.transfers.pop(name, None)
                if t is None:
                    t = Transfer(name, self.finished.pop(name).key)
                    t.touched = True
                t.epoch += 1
                self.dropped.append(t)
            self.cond.notify_all()
        self._wake()

    def in_repositories(self) -> list[str]:
        """A repository's big files on their way or not placed yet (a later batch's trees, names
        or deletes of packed objects may need them: a pack)."""
        with self.cond:
            return [r for r in (*self.transfers, *self.finished) if git.in_repository(r)]

    def busy_at(self, rel: str) -> bool:
        return rel in self.transfers or rel in self.finished

    def take_finished(self, rels: Iterable[str] | None = None) -> list[Finished]:
        with self.cond:
            names = list(self.finished) if rels is None else [r for r in rels if r in self.finished]
            return [self.finished.pop(r) for r in names]

    def put_back(self, done: list[Finished]) -> None:
        """Placing ``done`` failed (the link): placed after the reconnect."""
        with self.cond:
            for f in done:
                if f.rel not in self.transfers:
                    self.finished.setdefault(f.rel, f)

    def checked(self) -> None:
        """The worker looked at the link after the session failed (the lane retries by itself)."""
        with self.cond:
            self.broken = None

    def take_errors(self) -> list[list[str]]:
        with self.cond:
            errors, self.errors = self.errors, []
            return errors

    @property
    def idle(self) -> bool:
        """Nothing on its way, nothing for the worker to take."""
        return not self.transfers and not self.finished and not self.errors

    def wait_for(self, rels: list[str]) -> None:
        """Until none of ``rels`` is on its way (finished or failed); ConnectionLost when the lane
        fails or makes no progress for STALL seconds."""
        with self.cond:
            seen, since = self.progress, time.monotonic()
            while any(r in self.transfers for r in rels):
                if self.broken is not None or self.link is None:
                    raise ConnectionLost(f"the big-file lane failed: {self.broken}")
                if self.progress != seen:
                    seen, since = self.progress, time.monotonic()
                elif time.monotonic() - since > STALL:
                    raise ConnectionLost("the big-file lane made no progress for a minute")
                self.cond.wait(0.5)

    def report(self) -> dict[str, object]:
        with self.cond:
            active = len(self.transfers)
        return {**self.stats, "active": active, "window": int(self.pacer.window),
                "rate": self.pacer.rate()}

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self._wake()
        self.thread.join(10)
        for fd in (self.wake_r, self.wake_w):
            os.close(fd)

    # -- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        session: Session | None = None
        backoff, retry_at = RETRY[0], 0.0
        try:
            while True:
                with self.cond:
                    while not self.closing and (self.link is None or not (self.transfers or self.dropped)
                                                or time.monotonic() < retry_at):
                        # a retry due: until then; else until woken. Idle it woke every 50 ms
                        # (0.4 % of a core), then every second (0.02 %: a wake costs 0.2 ms)
                        left = retry_at - time.monotonic()
                        self.cond.wait(min(max(0.05, left), IDLE_LOOK) if left > 0 else IDLE_LOOK)
                        self._drain_wake()
                    if self.closing:
                        return
                    link, token, command, generation = (self.link, self.token, self.command,
                                                        self.generation)
                assert link is not None
                try:
                    session = Session(link, token, command, self.log_path)
                    self.stats["sessions"] += 1
                    backoff = RETRY[0]
                    self._serve(session, generation)
                except (ConnectionLost, MirrorError, OSError) as e:
                    why = e.what if isinstance(e, MirrorError) else str(e)
                    log.warning("big-file lane: %s", why)
                    retry_at, backoff = time.monotonic() + backoff, min(RETRY[1], backoff * 2)
                    with self.cond:
                        if self.generation == generation:
                            self.broken = why
                        self.progress += 1
                        self.cond.notify_all()
                    self.notify()
                finally:
                    if session is not None:
                        session.close()
                        session = None
        finally:
            with self.cond:
                for t in [*self.transfers.values(), *self.dropped]:
                    t.close()

    def _drain_wake(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _serve(self, s: Session, generation: int) -> None:
        """Send and answer until the worker detaches, the lane is idle a while, or it fails."""
        waiting: collections.deque[tuple[int, Transfer, bytes, int, float]] = collections.deque()
        unanswered = 0          # bytes of chunks in flight
        turn = 0
        idle_since: float | None = None
        last_answer = time.monotonic()
        with self.cond:
            for t in self.transfers.values():
                t.epoch += 1  # a new session: each file asks again what the server holds
        while True:
            now = time.monotonic()
            with self.cond:
                if self.closing or self.generation != generation:
                    return
                dropped, self.dropped = self.dropped, []
                active = list(self.transfers.values())[:STREAMING]
                restarted = [t for t in active if t.started != t.epoch]
            for t in restarted:
                t.close()
                t.state = NEW
            for t in dropped:
                t.close()
                if t.touched:
                    s.out += _agent.pack(_agent.OP_DROP, os.fsencode(t.rel))
            if not active and not waiting and not s.out:
                idle_since = idle_since or now
                if now - idle_since > IDLE_CLOSE:
                    return
            else:
                idle_since = None
            for t in active:
                if t.state == NEW and len(s.out) < CHUNK:
                    self._ask(s, t, waiting, now)
            sending = [t for t in active if t.state == SENDING]
            while sending and unanswered < self.pacer.window and len(s.out) < CHUNK:
                t = sending[turn % len(sending)]
                turn += 1
                unanswered += self._next_record(s, t, waiting, now)
                if t.state != SENDING or t.started != t.epoch:
                    sending.remove(t)
            s.pump(0.5, [self.wake_r])
            self._drain_wake()
            for op, _, _, _, offset, data in s.answers():
                last_answer = time.monotonic()
                if not waiting:
                    raise ConnectionLost(f"an answer nobody asked for from the lane: {op!r}")
                epoch, t, kind, nbytes, sent_at = waiting.popleft()
                if kind == _agent.OP_CHUNK:
                    unanswered -= nbytes
                    self.pacer.answered(nbytes, last_answer - sent_at, last_answer)
                self._answered(t, epoch, kind, op, offset, data)
            rate = self.pacer.rate()
            if rate is not None:
                self.squeeze.note_rate(rate)
            if waiting and time.monotonic() - last_answer > STALL:
                raise ConnectionLost(f"the lane's agent did not answer for {STALL:g} s")

    def _ask(self, s: Session, t: Transfer, waiting: collections.deque, now: float) -> None:
        """Open the file and ask the server what it holds of it."""
        with self.cond:
            if self.transfers.get(t.rel) is not t:
                return
            epoch = t.started = t.epoch
        t.close()
        try:
            t.fd = os.open(os.path.join(self.root, t.rel), _READ_FLAGS)
            st = os.fstat(t.fd)
            if not stat.S_ISREG(st.st_mode):
                raise FileNotFoundError(t.rel)
        except OSError:
            self._gone(t, epoch)  # deleted (or no longer a file): its event says what it became
            return
        t.state, t.touched, t.opened = ASKED, True, identity(st)
        s.out += _agent.pack(_agent.OP_HAVE, os.fsencode(t.rel), offset=st.st_size)
        waiting.append((epoch, t, _agent.OP_HAVE, 0, now))

    def _next_record(self, s: Session, t: Transfer, waiting: collections.deque, now: float) -> int:
        """Queue ``t``'s next chunk (or, at its end, OP_FINISH); the chunk's bytes on the wire."""
        epoch = t.epoch
        path = os.fsencode(t.rel)
        data = os.pread(t.fd, CHUNK, t.offset)
        if data:
            record = self.squeeze.pack(_agent.pack(_agent.OP_CHUNK, path, offset=t.offset, data=data))
            t.hasher.update(data)
            t.offset += len(data)
            s.out += record
            waiting.append((epoch, t, _agent.OP_CHUNK, len(record), now))
            self.stats["sent_bytes"] += len(data)
            return len(record)
        st = os.fstat(t.fd)
        try:
            here = os.lstat(os.path.join(self.root, t.rel))
        except OSError:
            here = None
        if here is None or (here.st_ino, here.st_dev) != (st.st_ino, st.st_dev):
            self._gone(t, epoch)  # deleted or replaced while it was read: its event follows
            return 0
        if st.st_size > t.offset:
            return 0  # it grew since that read: the rest next turn
        if st.st_size < t.offset:  # cut short while it was read: again
            with self.cond:
                t.epoch += 1
            return 0
        t.state = FINISHING
        s.out += _agent.pack(_agent.OP_FINISH, path, offset=t.offset, data=t.hasher.digest())
        waiting.append((epoch, t, _agent.OP_FINISH, 0, now))
        return 0

    def _answered(self, t: Transfer, epoch: int, kind: bytes, op: bytes, offset: int,
                  data: bytes) -> None:
        with self.cond:
            self.progress += 1
            current = self.transfers.get(t.rel) is t and t.epoch == epoch
            self.cond.notify_all()
        if not current:
            return  # restarted, cancelled or failed since it was asked
        if op == _agent.R_FAIL:
            self._failed(t, epoch, data.decode(errors="replace"))
        elif kind == _agent.OP_HAVE and op == _agent.R_HAVE:
            self._resume(t, offset, data)
        elif kind == _agent.OP_FINISH and op == _agent.R_DONE:
            with self.cond:
                if self.transfers.get(t.rel) is t and t.epoch == epoch and t.opened is not None:
                    del self.transfers[t.rel]
                    self.finished[t.rel] = Finished(t.rel, t.opened, t.offset, t.hasher.digest())
                    self.stats["files"] += 1
                    self.cond.notify_all()
            t.close()
            self.notify()
        elif kind != _agent.OP_CHUNK or op != _agent.R_GOT:
            raise ConnectionLost(f"unexpected answer from the lane: {op!r}")

    def _resume(self, t: Transfer, held: int, want: bytes) -> None:
        """The server holds ``held`` bytes of ``t`` whose digest is ``want``: from there when
        they are our first bytes, else from the start."""
        t.hasher = hashlib.blake2b(digest_size=_agent.DIGEST_SIZE)
        t.offset = 0
        if held:
            h = hashlib.blake2b(digest_size=_agent.DIGEST_SIZE)
            at = 0
            while at < held:
                chunk = os.pread(t.fd, min(1 << 20, held - at), at)
                if not chunk:
                    break
                h.update(chunk)
                at += len(chunk)
            if at == held and h.digest() == want:
                t.hasher, t.offset = h, held
                self.stats["resumed_bytes"] += held
                log.info("%s: the server holds %d bytes of it already; sending the rest", t.rel, held)
        t.state = SENDING

    def _gone(self, t: Transfer, epoch: int) -> None:
        with self.cond:
            if self.transfers.get(t.rel) is t and t.epoch == epoch:
                del self.transfers[t.rel]
                t.epoch += 1
                self.dropped.append(t)
                self.progress += 1
                self.cond.notify_all()

    def _failed(self, t: Transfer, epoch: int, why: str) -> None:
        with self.cond:
            if self.transfers.get(t.rel) is t and t.epoch == epoch:
                del self.transfers[t.rel]
                t.epoch += 1
                self.errors.append([t.rel, why])
                self.progress += 1
                self.cond.notify_all()
        t.close()
        self.notify()
