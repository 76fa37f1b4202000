"""The mirror loop: changes in, pushes out, through outages and restarts.

It merges changes while a push is in flight, keeps them through outages (reconnecting with a
backoff), ends a burst with a whole-tree pass, refuses to start from an empty folder while the
server copy is not, and answers ``stats``/``flush``/``stop`` on its control socket. The pieces it
holds: a :class:`Link` and a :class:`Channel` (the server), a :class:`Lane` (big files, beside the
batches: the worker puts what it delivered in place), a :class:`Watcher` (the folder), a
:class:`Planner` (what changes mean), a :class:`Reporter` (its status file) and a
:class:`ControlServer`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import _net, _sync
from .._daemon import Backoff, State
from ..errors import AuthenticationError, ColabRemoteError, MirrorError
from . import checks, git
from .channel import AgentChannel, Channel, Sent, open_channel
from .config import MirrorConfig
from .control import ControlServer
from .lane import Lane
from .link import ConnectionLost, Link
from .plan import Plan, Planner
from .report import Progress, Reporter, SyncMark
from .squeeze import Squeeze
from .watch import Watcher

log = logging.getLogger("colab_remote.mirror")

BURST_PATHS = 200           # pushes this big together are a burst: a whole-tree pass follows once quiet
BURST_QUIET = 0.3           # seconds without events before that pass
VERIFY_EVERY = 60.0         # a verification (a whole-tree pass) at most this often while anything changes,
VERIFY_SHARE = 0.02         # ... and never more than this share of the time (a pass of 3 s: every 150 s)
VERIFY_IDLE = 3600.0        # ... and this often anyway (a change no event reported)
RETRY_AFTER_ERROR = 30.0    # what the server refused is sent again by a whole-tree pass this much later
PRUNE_EVERY = 6 * 3600.0
KEEPALIVE = 120.0           # an idle mirror tells its agent it is still there this often (the server
                            # lets another runtime take the folder over from one silent 5 minutes)
LINK_CHECK = 1.0            # an idle mirror looks at its ssh processes this often (a dead link:
                            # ssh's keepalives end the master after 12 s of silence)
PROBE_EVERY = 0.1           # while the server is away: a probe of its SSH port this often ...
PROBE_TIMEOUT = 1.0         # ... each given this long (a black hole answers nothing): its return
                            # is noticed within about a second
MARK_EVERY = 1.0            # an idle mirror marks what the server holds at most this often
CHANGE_ADDED, CHANGE_MODIFIED, CHANGE_DELETED = 1, 2, 3  # watchfiles.Change


class Worker:
    """One mirror (see the module docstring)."""

    def __init__(self, cfg: MirrorConfig, password: str | None, *, early: object = None) -> None:
        self.cfg = cfg
        self.root = cfg.local_dir
        self.flt = _sync.MirrorFilter(self.root, cfg.exclude)
        self.link = Link(cfg, password, early=early)
        self.channel: Channel | None = None
        # the server's agent, and how to start it (restricted=False: found by the set-up this
        # process runs through its own login, see Link.set_up)
        self.agent: bool | None = None if cfg.setup is not None else cfg.agent
        self.agent_command = cfg.agent_command
        self.planner = Planner(self.root, self.flt, delete=cfg.delete, inline=cfg.agent,
                               watch=self._watch_folder)
        self.cond = threading.Condition()
        self.pending: set[str] = set()
        self.added: set[str] = set()
        self.deleted: set[str] = set()
        self.events = 0
        self.in_flight = False
        self.pushed_events = 0
        self.stop_asked = False
        self.stop_flush_until = 0.0
        self.full_due: float | None = None
        self.last_full = 0.0
        self.full_took = 0.0
        self.verify_asked = 0       # flush() asks for a verification after the events it waits for
        self.verify_after = 0       # ... have been pushed
        self.verify_done = 0
        self.verify_errors = False  # the last verification met errors
        self.verifying = 0          # the flush requests the whole-tree pass under way answers
        self.refused: dict[str, bool] = {}  # what the server refused (path -> it was a delete)
        self.last_prune = time.monotonic()
        self.last_ping = time.monotonic()
        self.changed_since_full = False
        self.run_paths = 0          # paths pushed since the last quiet spell (see push())
        self.last_push_end = 0.0
        self.stats: dict[str, Any] = {"files": 0, "bytes": 0, "pushes": 0, "full_passes": 0,
                                      "deleted": 0, "last_push": None, "last_error": None,
                                      "reconnects": 0, "verified": None, "verify_seconds": None,
                                      "verify_fixed": 0}
        self.watcher: Watcher | None = None
        self.connected = False
        self.squeeze = Squeeze()
        self.lane = Lane(self.root, self.squeeze, self._wake, Path(cfg.run_dir) / "mirror.log")
        self.report = Reporter(Path(cfg.run_dir), {
            "id": cfg.id, "local_dir": self.root, "destination": cfg.destination, "port": cfg.port,
            "sock_dir": cfg.sock_dir}, self.snapshot)
        self.control = ControlServer(Path(cfg.sock_dir) / "ctl", self._answer)
        self.mark = SyncMark(Path(cfg.run_dir))
        self.since = None if cfg.restore else self.mark.read()  # what the last mirror left
        self.marked_events = 0      # the events the mark covers
        self.last_mark = 0.0

    # -- status --------------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self.report.state

    def set_state(self, state: State, error: str | None = None) -> None:
        if error is not None:
            self.stats["last_error"] = error
            self.report.error = error
        self.report.master_pid = self.link.pid
        self.report.set_state(state)

    def snapshot(self) -> dict[str, Any]:
        with self.cond:
            pending = len(self.pending) + (1 if self.full_due is not None else 0)
        trash = getattr(self.channel, "trash", None)
        if trash is not None:
            self.stats["trash"] = trash  # kept while disconnected
        return {**self.stats, "pending": pending, "state": self.report.state.value,
                "connected": self.connected, "in_flight": self.in_flight,
                "big_files": self.lane.report(), "compression": self.squeeze.report()}

    # -- events --------------------------------------------------------------------------------
    def deliver(self, changes: list[tuple[int, str]]) -> None:
        with self.cond:
            for change, rel in changes:
                self.pending.add(rel)
                if change == CHANGE_ADDED:
                    self.added.add(rel)
                elif change == CHANGE_DELETED:
                    self.deleted.add(rel)
            self.events += 1
            self.changed_since_full = True
            self.cond.notify_all()

    def events_lost(self) -> None:
        """Changes may have gone unreported: a whole-tree pass soon (at most one a second)."""
        with self.cond:
            due = max(time.monotonic(), self.last_full + 1.0)
            self.full_due = due if self.full_due is None else min(self.full_due, due)
            self.changed_since_full = True
            self.cond.notify_all()

    def _wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def _watch_folder(self, path: str, rel: str) -> None:
        if self.watcher is not None:
            self.watcher.watch(path, rel)

    # -- the control socket --------------------------------------------------------------------
    def _answer(self, words: list[str]) -> dict[str, Any]:
        if words[0] == "stats":
            return self.snapshot()
        if words[0] == "flush":
            reason = self.flush(float(words[1]) if len(words) > 1 else 60.0)
            return {"ok": not reason, "reason": reason, "stats": self.snapshot()}
        if words[0] == "stop":
            self.request_stop(float(words[1]) if len(words) > 1 else 0.0)
            return {"ok": True}
        return {"error": f"unknown command {words[0]!r}"}

    def flush(self, timeout: float) -> str:
        """Wait until the server holds the folder as it was at the call: every change reported
        until then pushed, then a verification (the server's listing against the folder: what an
        event missed or the server refused is sent again). '' when it holds it, "timeout", or
        "errors" (the server refuses some of it)."""
        deadline = time.monotonic() + timeout
        if self.watcher is not None and not self.watcher.sync(min(timeout, 10)):
            return "timeout"
        with self.cond:
            self.verify_asked += 1
            token = self.verify_asked
            self.verify_after = max(self.verify_after, self.events)
            self.cond.notify_all()
            done = self.cond.wait_for(lambda: self.verify_done >= token and self.lane.idle
                                      and not self.in_flight,  # (placing what the lane delivered)
                                      max(0.0, deadline - time.monotonic()))
            if not done:
                return "timeout"
            return "errors" if self.verify_errors or self.state is State.REFUSED else ""

    def request_stop(self, flush_timeout: float) -> None:
        with self.cond:
            self.stop_asked = True
            self.stop_flush_until = time.monotonic() + flush_timeout
            self.cond.notify_all()

    # -- pushing -------------------------------------------------------------------------------
    def push(self, paths: set[str], added: set[str] | None = None, deleted: set[str] | None = None,
             *, whole: bool = False, progress: Progress | None = None) -> Sent:
        """Send what changed at ``paths`` (``added``/``deleted``: what the events said).

        ``whole``: part of a whole-tree pass (not counted towards a burst; the pass reports
        errors).
        """
        assert self.channel is not None
        t0 = time.monotonic()
        added, deleted = set() if added is None else added, set() if deleted is None else deleted

        def catch_up() -> Plan | None:
            return self._objects_meanwhile(paths, added, deleted)

        sent = self.channel.send(self.planner.plan(paths, added, deleted, catch_up,
                                                   remember=not whole), progress)
        took = time.monotonic() - t0
        if took > 0.2:
            log.info("pushed %d files (%d ops, %d big) in %.3f s", sent.files, sent.ops, sent.big, took)
        s = self.stats
        s["files"] += sent.files
        s["bytes"] += sent.nbytes
        s["deleted"] += sent.deletes
        s["pushes"] += 1
        s["last_push"] = time.time()
        if progress is not None:
            progress.done()
        if not whole:
            self._errors(sent)
            # a burst: pushes with no quiet spell between them that carried BURST_PATHS paths
            quiet = t0 - self.last_push_end >= BURST_QUIET
            self.run_paths = len(paths) + (0 if quiet else self.run_paths)
            self.last_push_end = time.monotonic()
            if self.run_paths >= BURST_PATHS:
                self.full_due = self.last_push_end + BURST_QUIET
        self.report.dirty = True
        return sent

    def _objects_meanwhile(self, paths: set[str], added: set[str], deleted: set[str]) -> Plan | None:
        """A batch has read a repository's names (the index, refs): the objects git wrote before
        may still be on their way here. Every event up to now, and the objects among them join
        the batch (``paths``, ``added``, ``deleted``: kept again if the push fails)."""
        if self.watcher is None or not self.watcher.sync(5):
            return None
        with self.cond:
            take = {p for p in self.pending if git.is_object(p)}
            if not take:
                return None
            self.pending -= take
            more_added, more_deleted = self.added & take, self.deleted & take
            self.added -= more_added
            self.deleted -= more_deleted
        paths |= take
        added |= more_added
        deleted |= more_deleted
        return self.planner.plan(take, more_added, more_deleted)

    def _errors(self, sent: Sent) -> None:
        """The server refused some changes (a full disk, a read-only folder): the state says so
        until a whole-tree pass gets everything there; that pass comes a little later."""
        if not sent.errors:
            return
        for rel, _ in sent.errors:
            if rel:  # sent again by the next whole-tree pass (which never deletes by itself)
                self.refused[rel] = not os.path.lexists(os.path.join(self.root, rel))
        error = "; ".join(f"{p}: {e}" if p else e for p, e in sent.errors[:5])
        log.warning("server errors: %s", error)
        self.set_state(State.REFUSED, error)
        retry = time.monotonic() + RETRY_AFTER_ERROR
        self.full_due = retry if self.full_due is None else min(self.full_due, retry)

    def whole_pass(self, phase: str | None = None, *, first: bool = False) -> None:
        """Send whatever differs from the server copy, never deleting there (``phase``: a name
        for the progress in the status file). ``first``: the start's pass, which refuses a folder
        emptied here and sets the doorbell's watches up as it lists each folder."""
        assert self.channel is not None
        t0, started = time.monotonic(), time.time_ns()
        progress = self.report.phase(phase, 0, 0) if phase else None
        sent = Sent()
        if self.refused:  # what the server refused, deletes too, first
            retry, self.refused = self.refused, {}
            sent.add(self.push(set(retry), set(), {p for p, gone in retry.items() if gone},
                               whole=True))
        sent.add(self.channel.whole_pass(
            lambda paths, added, p: self.push(paths, added, whole=True, progress=p),
            self.root, self.flt, progress, guard=self._guard if first and not self.cfg.restore else None,
            watch=self._watch_folder if first else None, changed_since=self.since if first else None))
        self._errors(sent)
        self.stats["full_passes"] += 1
        self.last_full = time.monotonic()
        self.full_took = self.last_full - t0
        self.verify_errors = bool(sent.errors)
        if not sent.errors:  # the server holds the folder as it was at the pass's listing
            self.mark.write(started)
            self.stats.update(verified=time.time(), verify_seconds=round(self.full_took, 4),
                              last_error=None)
            self.report.error = None
            if phase is None:
                self.stats["verify_fixed"] = sent.ops
                if sent.ops:
                    log.warning("the whole-tree pass sent %d changes no event had reported", sent.ops)
            if self.state is State.REFUSED:
                self.set_state(State.UP)
                log.info("the server takes every change again")
        log.info("whole-tree pass in %.3f s", self.full_took)

    def place(self) -> None:
        """Put in place what the big-file lane delivered; what it failed to send is refused."""
        assert self.channel is not None
        if self.lane.broken is not None:  # is the link still there? (the lane retries by itself)
            self.stats["last_error"] = f"big-file lane: {self.lane.broken}"
            self.lane.checked()
            self.ping()
        done = self.lane.take_finished()
        try:
            sent = self.channel.place(done, self.planner)
        except (ConnectionLost, OSError):
            self.lane.put_back(done)  # the server keeps the partials: placed after a reconnect
            raise
        sent.errors += self.lane.take_errors()
        self.stats["files"] += sent.files
        self.stats["bytes"] += sent.nbytes
        self._errors(sent)
        self.report.dirty = True

    def prune(self) -> None:
        assert self.channel is not None
        self.last_prune = time.monotonic()
        self.channel.prune()

    def mark_synced(self) -> None:
        """Nothing pending once the watcher handed over every change made up to now: the server
        holds all of them (the mark a restart starts from, see :class:`SyncMark`)."""
        now, self.last_mark = time.time_ns(), time.monotonic()
        if self.watcher is None or not self.watcher.sync(1):
            return
        with self.cond:
            if self.pending or self.refused or self.full_due is not None:
                return
            self.marked_events = self.events
        self.mark.write(now)

    def ping(self) -> None:
        assert self.channel is not None
        self.last_ping = time.monotonic()
        self.channel.ping()

    # -- the connection ------------------------------------------------------------------------
    def connect(self) -> None:
        """Log in and start the channel (the set-up found out which one; without restrictions, an
        agent an earlier set-up installed is started without one, else a set-up that then runs
        the agent in the same session)."""
        self.link.open()
        if self.cfg.setup is not None and self.agent is None:
            known, recorded = self.link.installed(self.cfg.setup)
            try:
                self.channel = open_channel(self.link, self.lane, self.squeeze, agent=True,
                                            command=known)
            except MirrorError as e:
                log.info("%s (%s): setting the server up", "the agent on record did not start"
                         if recorded else "no agent of this version on the server", e.what)
            else:
                self.agent, self.agent_command = True, known
            if self.agent is None:
                self.channel = self._set_up(self.cfg.setup)
            self.planner.inline = bool(self.agent)
        if self.channel is None:
            self.channel = open_channel(self.link, self.lane, self.squeeze, agent=bool(self.agent),
                                        command=self.agent_command)
        if self.agent:
            self.lane.attach(self.link, getattr(self.channel, "lane_token", ""), self.agent_command)
        self.connected = True


    def _set_up(self, purpose: dict[str, Any]) -> Channel | None:
        """Install the agent through this login; the set-up's command then runs it: the channel
        (None when the server has no python3: the rsync channel instead)."""
        command, data = self.link.set_up(purpose)
        channel = AgentChannel(self.link, command, self.lane, self.squeeze)
        said = channel.start(data)
        try:
            known = self.link.set_up_said(purpose, said)
            self.agent, self.agent_command = known is not None, known or ""
            if known is None:
                channel.close()
                return None
            channel.command = known  # how it starts again after an outage
            channel.greet()
        except BaseException:
            channel.close()
            raise
        return channel

    def disconnect(self) -> None:
        self.connected = False
        self.lane.detach()
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self.link.close()

    def link_alive(self) -> bool:
        """The master and the channel still run (ssh ends them when its keepalives go unanswered)."""
        return self.link.up and (self.channel is None or self.channel.alive)

    def reconnect(self) -> None:
        """Wait for the server (a port probe every PROBE_EVERY, each at most PROBE_TIMEOUT: one
        is always on its way, so the server's return is noticed within about a second) and log in
        again; after a refused login, slowly."""
        self.disconnect()
        self.planner.sent.clear()  # the server may have changed meanwhile
        self.set_state(State.RECONNECTING)
        backoff: Backoff | None = None
        while not self.stop_asked or time.monotonic() < self.stop_flush_until:
            probed = time.monotonic()
            if _net.ssh_banner(self.link.dest.host, self.cfg.port, timeout=PROBE_TIMEOUT) is not None:
                log.info("the server answers again")
                try:
                    self.connect()  # the new agent clears what a killed one left half-built
                    self.stats["reconnects"] += 1
                    self.full_due = time.monotonic()
                    self.set_state(State.UP)
                    log.info("reconnected")
                    return
                except (ColabRemoteError, ConnectionLost) as e:
                    what = e.what if isinstance(e, ColabRemoteError) else str(e)
                    self.stats["last_error"] = what
                    log.warning("reconnect failed: %s", what)
                    self.disconnect()
                    if isinstance(e, ColabRemoteError) and not isinstance(e, AuthenticationError):
                        # refused by the server's agent (another mirror writes the folder now)
                        self.set_state(State.REFUSED, what)
                    if isinstance(e, ColabRemoteError):
                        # a changed password, another writer: keep trying, but slowly (no
                        # lockouts, no log spam)
                        backoff = Backoff(30.0, 60.0)
            wait = backoff.next() if backoff is not None else \
                PROBE_EVERY - (time.monotonic() - probed)
            if wait > 0:
                with self.cond:
                    self.cond.wait(wait)
        raise ConnectionLost("stopped while the server was away")

    # -- the loop ------------------------------------------------------------------------------
    def _next(self) -> tuple[str, set[str], set[str], set[str], int] | None:
        """Wait for the next thing to do (under the lock): ("push", paths, added, deleted,
        events), ("full", ...), ("prune", ...); None to stop."""
        while True:
            now = time.monotonic()
            if self.stop_asked and (not self.pending and self.full_due is None and self.lane.idle
                                    or now >= self.stop_flush_until):
                return None
            verify = self.verify_asked > self.verify_done and self.pushed_events >= self.verify_after
            if self.pending and not verify:
                paths, added, deleted = self.pending, self.added, self.deleted
                self.pending, self.added, self.deleted = set(), set(), set()
                self.in_flight = True
                return "push", paths, added, deleted, self.events
            if self.lane.finished or self.lane.errors or self.lane.broken is not None:
                self.in_flight = True
                return "place", set(), set(), set(), self.events
            every = max(VERIFY_EVERY, self.full_took / VERIFY_SHARE)
            if verify or self.full_due is not None and now >= self.full_due or (
                    self.changed_since_full and now - self.last_full > every) or (
                    now - self.last_full > VERIFY_IDLE):
                self.full_due, self.changed_since_full = None, False
                self.in_flight = True
                self.verifying = self.verify_asked
                return "full", set(), set(), set(), self.events
            if now - self.last_prune > PRUNE_EVERY:
                self.in_flight = True
                return "prune", set(), set(), set(), self.events
            if self.events > self.marked_events and now - self.last_mark >= MARK_EVERY and \
                    self.connected and not self.refused and self.full_due is None:
                self.in_flight = True
                return "mark", set(), set(), set(), self.events
            if now - max(self.last_push_end, self.last_full, self.last_ping) > KEEPALIVE:
                self.in_flight = True
                return "ping", set(), set(), set(), self.events
            if self.watcher is not None and (self.watcher.error is not None
                                             or not self.watcher.is_alive()):
                # notify failed (the folder vanished, say): watch again, then a whole pass covers
                # whatever happened meanwhile
                self.stats["last_error"] = f"watching {self.root} failed: {self.watcher.error}"
                log.warning("%s; watching again", self.stats["last_error"])
                self.watcher = None
                if os.path.isdir(self.root):
                    self._start_watcher()
                    assert self.watcher is not None
                    self.watcher.watch_all()  # (no first pass sets this one's watches up)
                    self.full_due = now + 1
                continue
            if self.connected and not self.link_alive():
                self.in_flight = True  # the link died while idle: reconnect now, not at the next push
                return "lost", set(), set(), set(), self.events
            wait = min(LINK_CHECK, KEEPALIVE) if self.full_due is None else self.full_due - now
            if self.events > self.marked_events:
                wait = min(wait, max(0.0, self.last_mark + MARK_EVERY - now))
            if self.report.dirty:
                wait = min(wait, 1.0)
            self.in_flight = False
            self.cond.notify_all()
            self.report.write()
            self.cond.wait(max(0.001, wait))

    def loop(self) -> None:
        while True:
            with self.cond:
                job = self._next()
            if job is None:
                return
            kind, paths, added, deleted, target = job
            try:
                if kind == "full":
                    self.whole_pass()
                elif kind == "prune":
                    self.prune()
                elif kind == "ping":
                    self.ping()
                elif kind == "place":
                    self.place()
                elif kind == "mark":
                    self.mark_synced()
                elif kind == "lost":
                    raise ConnectionLost(f"ssh ended ({self.link.exit_text})")
                else:
                    self.push(paths, added, deleted)
            except (ConnectionLost, OSError) as e:
                log.warning("push failed (%s); keeping %d changes", e, len(paths))
                with self.cond:
                    self.pending |= paths
                    self.added |= added
                    self.deleted |= deleted
                    if kind == "full":
                        self.full_due = time.monotonic()
                self.stats["last_error"] = f"server unreachable: {e}"
                try:
                    self.reconnect()
                except ConnectionLost:
                    return
                continue
            with self.cond:
                self.pushed_events = max(self.pushed_events, target)
                if kind == "full":
                    self.verify_done = max(self.verify_done, self.verifying)
                if not self.pending:
                    self.in_flight = False
                self.cond.notify_all()
            self.report.write()

    # -- start ---------------------------------------------------------------------------------
    def _start_watcher(self) -> None:
        self.watcher = Watcher(self.root, self.flt, self.deliver, self.events_lost)
        self.watcher.start()

    def _guard(self, server_files: int, count_local: Callable[[int], int]) -> None:
        checks.refuse_emptied(self.root, self.cfg.destination, server_files, count_local)

    def start(self) -> None:
        """Connect, restore (or refuse an emptied folder), start watching, first push. Raises on
        failure. The first push lists the server copy and compares it folder by folder as it
        comes, sets up the watches on the way and sends new folders as it reads them (see
        :mod:`.compare`): one walk here, overlapping the agent's."""
        self.set_state(State.CONNECTING)
        self.connect()
        self.report.master_pid = self.link.pid
        self.report.write(force=True)
        assert self.channel is not None
        root = Path(self.root)
        if self.cfg.restore:
            listing = self.channel.listing()
            server_files = self.channel.count(listing)
            log.info("server copy: %d files", server_files)
            root.mkdir(parents=True, exist_ok=True)
            if server_files:
                self.set_state(State.RESTORING)
                try:
                    self.channel.restore(self.root, self.flt, listing,
                                         self.report.phase("restoring", 0, 0))
                except ConnectionLost as e:
                    raise MirrorError("restoring from the server failed", log_tail=str(e),
                                      fix="check the connection and try again") from e
        elif not root.is_dir():
            server_files = self.channel.count(None)
            if server_files:
                raise checks.refusal(self.root, self.cfg.destination, "is missing"
                                     if not root.exists() else "is not a folder", server_files)
        root.mkdir(parents=True, exist_ok=True)
        self._start_watcher()
        assert self.watcher is not None
        if not self.watcher.ready.wait(600) or self.watcher.error is not None:
            raise MirrorError(f"cannot watch {self.root}: {self.watcher.error}",
                              fix="check the folder exists and is readable; raise "
                                  "fs.inotify.max_user_watches for very large trees")
        if not self.channel.lists:
            self.watcher.watch_all()
        self.set_state(State.FIRST_PUSH)
        self.prune()
        try:
            self.whole_pass("first push", first=True)
        except ConnectionLost as e:
            raise MirrorError("the first push failed", log_tail=str(e),
                              fix="check the connection and the server's disk") from e
        self.changed_since_full = False
        if self.state is not State.REFUSED:
            self.set_state(State.UP)  # with the first push's last progress, for the bar

    def shutdown(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.control.close()
        self.disconnect()
        self.lane.close()
        if Path(self.cfg.sock_dir) != Path(self.cfg.run_dir):  # a short folder in /tmp of our own
            with contextlib.suppress(OSError):
                Path(self.cfg.sock_dir).rmdir()
