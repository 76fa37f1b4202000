"""The coordinator: changes from both sides in, one decision per path, the actions out.

One thread runs :meth:`Engine.serve`; the laptop's watcher, the link's reader and the control
socket only :meth:`Engine.post` to it. Per path it compares the laptop (looked at now), the runtime
(as last reported) and the last common state (:func:`base.decide`), then:

- PUSH: the laptop's version goes to the runtime, guarded (it lands only if the runtime's path is
  still what was last reported, else the runtime says what is there and the path is decided again);
- PULL: the runtime's version is applied here (:mod:`.local`: the confined writer), guarded by a
  look at the laptop's path just before;
- CONFLICT: the runtime renames its version aside (``name.conflict-runtime-<time>.ext``); that copy
  then comes to the laptop and the laptop's version goes to the runtime: both kept on both sides;
- deletes wait a moment (:data:`DELETE_SETTLE`) and, when together with the recent ones they are
  a large share of the tree, the sync pauses and asks (:mod:`.pause`) instead of propagating.

What travels is in :mod:`.actions`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import _agent
from .._agent import peer, rules
from .actions import FETCH_WINDOW, Actions
from .base import CONFLICT, PULL, PUSH, SAME, Base, Entry, decide, needs_digest, same
from .config import SyncConfig
from .link import ConnectionLost, Link, Waiter
from .local import Local, enc
from .pause import Pause

log = logging.getLogger("colab_remote.sync")

DELETE_SETTLE = 0.3   # s without a new delete from that side before its deletes go
DELETE_MAX = 2.0      # ... or this long after the first one
MASS_WINDOW = 10.0    # deletes of the last this many seconds count together
RETRY_AFTER_ERROR = 30.0
UPKEEP_EVERY = 3600.0


class Filter:
    """The rules in force (they change with a .gitignore), for the laptop's watcher."""

    def __init__(self, root: str, current: rules.Rules) -> None:
        self.root, self.rules = root.rstrip("/"), current

    def excluded(self, rel: str, is_dir: bool = False) -> bool:
        return self.rules.excluded(rel, is_dir)

    def relative(self, path: str) -> str | None:
        if not path.startswith(self.root + "/"):
            return None
        return path[len(self.root) + 1:]


def make_rules(cfg: SyncConfig, local: Local) -> rules.Rules:
    """The defaults and ``exclude``, and the laptop's .gitignore files unless turned off."""
    patterns = [*rules.DEFAULT_IGNORES, *cfg.exclude]
    plain = rules.Rules(patterns, root=cfg.local_dir)
    return rules.Rules(patterns, local.gitignores(plain) if cfg.gitignore else {}, root=cfg.local_dir)


class Engine:
    """One two-way sync's decisions (see the module docstring)."""

    def __init__(self, cfg: SyncConfig, base: Base, local: Local,
                 announce: Callable[[str], None] | None = None) -> None:
        self.cfg, self.base, self.local = cfg, base, local
        self.announce = announce or (lambda text: None)
        self.filter = Filter(cfg.local_dir, make_rules(cfg, local))
        self.protect = tuple(rules.Rule(p) for p in cfg.protect)
        self.cond = threading.Condition()
        self.queue: list[tuple[Any, ...]] = []
        self.link: Link | None = None
        self.remote_over: dict[str, Entry | None] = {}   # the runtime, where it differs from the base
        self.inline: dict[str, tuple[Entry, bytes]] = {}  # small files reported with their bytes
        self.requeue: set[str] = set()
        self.retry: dict[str, float] = {}  # path -> when to decide it again
        self.held: dict[str, dict[str, float]] = {"laptop": {}, "runtime": {}}
        self.held_last = {"laptop": 0.0, "runtime": 0.0}
        self.recent: collections.deque[tuple[float, str, int]] = collections.deque(maxlen=1000)
        self.pause = Pause(self)
        self.actions = Actions(self)
        self.conflicts_path = Path(cfg.run_dir) / "conflicts.json"
        self.conflicts: list[dict[str, Any]] = self._load_conflicts()
        self.refused_seen: set[str] = set()
        self.stats: dict[str, Any] = {"pushed": 0, "pulled": 0, "deleted_runtime": 0, "deleted_laptop": 0,
                                      "bytes_pushed": 0, "bytes_pulled": 0, "conflicts": len(self.conflicts),
                                      "last_change": None, "last_error": None, "reconnects": 0}
        self.stopping = False
        self.rescan_due: float | None = None
        self.next_upkeep = 0.0
        self.pongs = self.pongs_seen = 0
        self.plan: dict[str, Any] | None = None
        self.connected = False
        self.busy = False  # the loop is deciding or applying (a flush waits for the end of it)

    @property
    def rules(self) -> rules.Rules:
        return self.filter.rules

    def later(self, rel: str, delay: float) -> None:
        """Decide ``rel`` again in ``delay`` seconds (something on the other side is busy)."""
        self.retry[rel] = time.monotonic() + delay

    def tree_forget(self) -> None:
        """After a failed write: the laptop's folders are looked up afresh."""
        self.local.tree.live.forget()

    # --- from other threads -----------------------------------------------------------------------
    def post(self, *item: Any) -> None:
        with self.cond:
            self.queue.append(item)
            self.cond.notify_all()

    def deliver(self, changes: list[tuple[int, str]]) -> None:
        self.post("local", changes)

    def events_lost(self) -> None:
        self.post("rescan", "the laptop's watcher lost events")

    def on_event(self, rec: tuple[bytes, bytes, int, int, int, bytes]) -> None:
        self.post("remote", rec)

    def on_lost(self, why: str) -> None:
        self.post("lost", why)

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    def quiet(self) -> bool:
        """Nothing queued, being decided, in flight, being fetched or held (under the lock)."""
        a = self.actions
        return not (self.queue or self.busy or a.inflight or a.fetching or a.fetch_queue or a.bigs
                    or self.requeue or any(self.held.values()))

    def flush(self, timeout: float) -> str:
        """Wait until every change noticed before the call is on both sides: '' when it is,
        "paused", "timeout" or "disconnected"."""
        deadline = time.monotonic() + timeout
        with self.cond:
            token = self.pongs + 1
        self.post("ping")
        with self.cond:
            done = self.cond.wait_for(lambda: not self.connected or self.pause.active or (
                self.pongs >= token and self.quiet()), max(0.0, deadline - time.monotonic()))
            if self.pause.active:
                return "paused"
            if not self.connected:
                return "disconnected"
        return "" if done else "timeout"

    # --- the connection ---------------------------------------------------------------------------
    def attach(self, link: Link, hello: dict[str, Any]) -> dict[str, Any]:
        """A connection is up: the runtime's folder is this sync's (its marker) or a new one; then
        both sides are compared. The plan of that comparison."""
        self.link = link
        with self.cond:  # what an earlier connection said (or left in flight) is not this one's
            self.queue = [i for i in self.queue if i[0] in ("local", "rescan", "resume", "ping")]
        self.connected = True
        self.actions.reset()
        self.remote_over.clear()
        self.inline.clear()
        self.requeue.clear()  # the comparison below decides every path afresh
        for held in self.held.values():
            held.clear()
        try:
            fresh = json.loads(hello.get("marker") or "{}").get("sync") != self.cfg.sync_id
        except (ValueError, AttributeError):
            fresh = True
        first = self.plan is None
        if fresh:
            if len(self.base):
                log.warning("a new runtime (or another folder) behind %s: it is filled from the laptop; "
                            "nothing on the laptop is deleted", self.cfg.host)
            self.base.clear()
            self.base.commit()
            marker = {"sync": self.cfg.sync_id, "laptop": self.cfg.local_dir, "since": time.time()}
            link.send(_agent.pack(peer.OP_MARK, data=json.dumps(marker).encode()))
        self.base.set_meta("boot_id", str(hello.get("boot_id", "")))
        self.plan = self.reconcile(fresh=fresh, ask=first)
        return self.plan

    # --- the loop ---------------------------------------------------------------------------------
    def serve(self) -> str:
        """Until the connection is lost ("lost: why") or the sync stops ("stop")."""
        try:
            while True:
                with self.cond:
                    if not self.queue and not self.stopping:
                        wait = self._wait()
                        if wait > 0:
                            self.cond.wait(wait)
                    if self.stopping:
                        return "stop"
                    items, self.queue = self.queue, []
                    self.busy = True
                paths = self.requeue
                self.requeue = set()
                due = [rel for rel, at in self.retry.items() if at <= time.monotonic()]
                for rel in due:
                    del self.retry[rel]
                paths.update(due)
                rescan = ""
                for item in items:
                    if item[0] == "lost":
                        return "lost: " + item[1]
                    rescan = self._take(item, paths) or rescan
                now = time.monotonic()
                if rescan or self.rescan_due is not None and now >= self.rescan_due:
                    log.info("comparing both sides again: %s", rescan or "after an error")
                    self.rescan_due = None
                    self.reconcile(fresh=False, ask=False)
                elif paths:
                    self.process(paths)
                self._flush_held()
                self.actions.pump()
                if now > self.next_upkeep:
                    self.next_upkeep = now + UPKEEP_EVERY
                    self.local.upkeep(self.cfg.keep_days, self.cfg.trash_budget)
                self.base.commit()
                with self.cond:
                    self.pongs = self.pongs_seen
                    self.busy = False
                    self.cond.notify_all()  # a flush waiting for quiet
        except ConnectionLost as e:
            return f"lost: {e}"
        finally:
            self.connected = False
            self.base.commit()
            with self.cond:
                self.busy = False
                self.cond.notify_all()

    def _wait(self) -> float:
        """Seconds until something is due (paths to decide again, held deletes, a retry), at most 30."""
        a = self.actions
        if self.requeue and not self.pause.active or a.fetch_queue and a.fetch_out < FETCH_WINDOW:
            return 0.0
        now, wait = time.monotonic(), 30.0
        for side, held in self.held.items():
            if held and not self.pause.active:
                wait = min(wait, max(0.0, min(self.held_last[side] + DELETE_SETTLE,
                                              min(held.values()) + DELETE_MAX) - now))
        if self.rescan_due is not None:
            wait = min(wait, max(0.0, self.rescan_due - now))
        if self.retry:
            wait = min(wait, max(0.0, min(self.retry.values()) - now))
        return wait

    def _take(self, item: tuple[Any, ...], paths: set[str]) -> str:
        """One posted item into ``paths`` (what to decide); a reason when everything must be
        compared again."""
        kind = item[0]
        if kind == "local":
            for change, rel in item[1]:
                self._local_change(change, rel, paths)
        elif kind == "remote":
            return self._remote_change(item[1], paths)
        elif kind == "rescan":
            return str(item[1])
        elif kind == "ack":
            paths |= self.actions.acked(item[1], item[2])
        elif kind == "fetched":
            paths |= self.actions.fetched(*item[1:])
        elif kind == "have":
            self.actions.stream(*item[1:])
        elif kind == "streamed":
            paths |= self.actions.streamed(*item[1:])
        elif kind == "ping":
            assert self.link is not None
            self.link.send(_agent.pack(peer.OP_PING), lambda rec: self._pong(rec))
        elif kind == "pong":
            self.pongs_seen += 1  # counted once what came before it is decided (see serve)
        elif kind == "resume":
            paths |= self.pause.resume(item[1], item[2])
        return ""

    def _pong(self, rec: tuple[bytes, bytes, int, int, int, bytes]) -> bool:
        self.post("pong")
        return True

    def _local_change(self, change: int, rel: str, paths: set[str]) -> None:
        paths.add(rel)
        entry = self.local.entry(rel)
        if entry is not None and entry.is_dir:
            if self.rules.excluded(rel, True):
                return
            self.actions.watch_folder(rel)  # before it is listed: nothing falls in between
            paths.update(self.local.scan(self.rules, rel))
        elif entry is None:
            paths.update(self.base.under(rel))

    def _remote_change(self, rec: tuple[bytes, bytes, int, int, int, bytes], paths: set[str]) -> str:
        op, p, mode, mtime, size, data = rec
        if op == peer.R_RESCAN:
            return "the runtime's " + data.decode(errors="replace")
        if op == peer.R_NOTE:
            log.warning("runtime: %s", rules_safe(data.decode(errors="replace")))
            return ""
        rel = p.decode("utf-8", "surrogateescape")
        try:
            _agent.check_path(p)
        except ValueError:
            log.warning("the runtime reported a path that is not one: %r", p[:200])
            return ""
        entry = Entry.of((mode, size, mtime, data if op == peer.R_CHANGE else b""))
        if op == peer.R_FILE and entry is not None:
            entry = entry._replace(digest=_agent.digest(data))
            self.inline[rel] = (entry, data)
        else:
            self.inline.pop(rel, None)
        self.remote_over[rel] = entry
        paths.add(rel)
        if entry is None:
            for child in self.base.under(rel):
                self.remote_over[child] = None
                paths.add(child)
        return ""

    # --- deciding -----------------------------------------------------------------------------------
    def remote(self, rel: str) -> Entry | None:
        return self.remote_over[rel] if rel in self.remote_over else self.base.get(rel)

    def settle(self, rel: str, entry: Entry | None) -> None:
        """Both sides hold ``entry`` now."""
        self.base.set(rel, entry)
        self.remote_over.pop(rel, None)
        self.inline.pop(rel, None)

    def _digests(self, rel: str, local: Entry | None,
                 remote: Entry | None) -> tuple[Entry | None, Entry | None]:
        """Contents' digests where only they can tell the two sides apart."""
        if not needs_digest(local, remote):
            return local, remote
        assert local is not None and remote is not None
        if not local.digest:
            local = self.local.digest(rel) or local
        if not remote.digest:
            base = self.base.get(rel)
            if base is not None and base.digest and base.stat == remote.stat:
                remote = remote._replace(digest=base.digest)
            else:
                found = self.remote_digests([rel]).get(rel)
                if found is not None:
                    remote = found
                    self.remote_over[rel] = found
        return local, remote

    def remote_digests(self, rels: list[str]) -> dict[str, Entry]:
        """The runtime's files with their digests (one request each, all in flight at once)."""
        assert self.link is not None
        found: dict[str, Entry] = {}
        for start in range(0, len(rels), 1000):
            part = rels[start:start + 1000]
            waiter = Waiter((peer.R_HASH, peer.R_FAIL), len(part))
            self.link.send(b"".join(_agent.pack(peer.OP_HASH, enc(r)) for r in part), waiter)
            for op, p, mode, mtime, size, data in waiter.wait(120 + len(part) * 0.05):
                if op == peer.R_HASH:
                    entry = Entry.of((mode, size, mtime, b""), data)
                    if entry is not None:
                        found[p.decode("utf-8", "surrogateescape")] = entry
        return found

    def process(self, paths: set[str], known: dict[str, Entry] | None = None, *, hold: bool = True) -> None:
        """Decide each path and act (``known``: the laptop's entries just scanned)."""
        if self.pause.active:
            self.pause.waiting |= paths
            return
        pushes, pulls, conflicts = [], [], []
        gitignore = False
        for rel in sorted(paths):
            local = known.get(rel) if known is not None else self.local.entry(rel)
            remote = self.remote(rel)
            is_dir = any(e is not None and e.is_dir for e in (local, remote))
            if self.rules.excluded(rel, is_dir):
                self.settle(rel, None)  # skipped now (a new rule): forgotten, never deleted
                continue
            local, remote = self._digests(rel, local, remote)
            base = self.base.get(rel)
            action = decide(base, local, remote)
            gitignore = gitignore or rel.rpartition("/")[2] == ".gitignore" and action != SAME
            if action == SAME:
                self.settle(rel, local if local is not None and local.digest else remote)
            elif action == PUSH and local is None and base is not None and hold:
                self._hold("laptop", rel)
            elif action == PULL and remote is None and base is not None and local is not None and hold:
                self._hold("runtime", rel)
            elif action == PUSH:
                pushes.append((rel, local, remote))
            elif action == PULL:
                if rules.protected(rel, self.protect):
                    self.refused(rel, "the runtime's version of this path is never applied on the laptop")
                    continue
                pulls.append((rel, local, remote))
            elif action == CONFLICT:
                conflicts.append((rel, local, remote))
        self.actions.run(pushes, pulls, conflicts)
        if gitignore and self.cfg.gitignore:
            self._reload_rules()

    def refused(self, rel: str, why: str) -> None:
        if rel not in self.refused_seen:
            self.refused_seen.add(rel)
            log.warning("%s: %s (the laptop keeps its own)", rules_safe(rel), why)

    def _reload_rules(self) -> None:
        new = make_rules(self.cfg, self.local)
        if new.to_json() == self.rules.to_json():
            return
        log.info("a .gitignore changed: the rules are read again")
        self.filter.rules = new
        if self.link is not None:
            self.link.send(_agent.pack(peer.OP_RULES, data=json.dumps(new.to_json()).encode()))

    # --- the comparison of both sides ----------------------------------------------------------------
    def list_remote(self) -> dict[str, Entry] | None:
        """The runtime's folder, entry by entry (None when the folder is gone)."""
        assert self.link is not None
        waiter = Waiter((peer.R_LISTED,))
        self.link.send(_agent.pack(peer.OP_LIST), waiter)
        found: dict[str, Entry] = {}
        for op, p, mode, mtime, size, data in waiter.wait(600):
            if op == peer.R_LISTED:
                return None if data == b"missing" else found
            entry = Entry.of((mode, size, mtime, data))
            if entry is not None:
                found[p.decode("utf-8", "surrogateescape")] = entry
        return found

    def reconcile(self, *, fresh: bool, ask: bool) -> dict[str, Any]:
        """Compare everything (at a connection, after lost events); ``ask``: pause on conflicts
        when ``yes`` was not given. The plan: what it does, counted."""
        listing = self.list_remote()
        gone = listing is None
        listing = listing or {}
        local = self.local.scan(self.rules)
        self.remote_over = {p: e for p, e in listing.items() if not same(e, self.base.get(p))}
        self.remote_over.update({p: None for p in self.base.entries if p not in listing})
        paths = set(local) | set(listing) | set(self.base.entries)
        unclear = [p for p in paths if needs_digest(local.get(p), self.remote(p))]
        if unclear:
            found = self.remote_digests(unclear)
            for p in unclear:
                entry = self.local.digest(p)
                if entry is not None:
                    local[p] = entry
                if p in found:
                    self.remote_over[p] = found[p]
        plan = self._plan(paths, local, fresh=fresh, gone=gone)
        log.info("%s", plan["text"])
        if ask and plan["conflict"] and not self.cfg.yes:
            self.pause.ask_first(plan, paths)
        else:
            self.process(paths, local)
        del local, listing, paths
        give_back_memory()
        return plan

    def _plan(self, paths: set[str], local: dict[str, Entry], *, fresh: bool, gone: bool) -> dict[str, Any]:
        counts: dict[str, Any] = {PUSH: 0, PULL: 0, CONFLICT: 0, SAME: 0, "delete_laptop": 0,
                                  "delete_runtime": 0}
        nbytes = {PUSH: 0, PULL: 0}
        for rel in paths:
            lo, re_, base = local.get(rel), self.remote(rel), self.base.get(rel)
            action = decide(base, lo, re_)
            if action == PUSH and lo is None:
                counts["delete_runtime"] += 1
            elif action == PULL and re_ is None:
                counts["delete_laptop"] += 1
            else:
                counts[action] += 1
                moving = lo if action == PUSH else re_ if action == PULL else None
                if moving is not None:
                    nbytes[action] += moving.size
        counts.update(bytes_push=nbytes[PUSH], bytes_pull=nbytes[PULL], fresh=fresh, gone=gone,
                      laptop=len(local), runtime=sum(1 for p in paths if self.remote(p) is not None))
        counts["text"] = describe_plan(counts)
        return counts

    # --- deletes --------------------------------------------------------------------------------------
    def _hold(self, side: str, rel: str) -> None:
        now = time.monotonic()
        self.held[side].setdefault(rel, now)
        self.held_last[side] = now

    def _flush_held(self) -> None:
        if self.pause.active:
            return
        now = time.monotonic()
        for side, held in self.held.items():
            if not held:
                continue
            if now - self.held_last[side] < DELETE_SETTLE and now - min(held.values()) < DELETE_MAX:
                continue
            recent = sum(n for t, s, n in self.recent if s == side and now - t < MASS_WINDOW)
            count, tracked = len(held) + recent, max(len(self.base), 1)
            if count >= max(self.cfg.mass_delete_min, self.cfg.mass_delete * tracked):
                self.pause.mass_delete(side, sorted(held), count, tracked)
                held.clear()
                return
            paths = set(held)
            held.clear()
            self.recent.append((now, side, len(paths)))
            self.process(paths, hold=False)

    # --- conflicts ------------------------------------------------------------------------------------
    def _load_conflicts(self) -> list[dict[str, Any]]:
        try:
            return list(json.loads(self.conflicts_path.read_text()))
        except (OSError, ValueError):
            return []

    def conflict(self, record: dict[str, Any]) -> None:
        """A conflict was kept on both sides: listed by --status, said at once."""
        from .. import _proc

        self.conflicts = [*self.conflicts[-999:], record]
        self.stats["conflicts"] = len(self.conflicts)
        _proc.write_private(self.conflicts_path, json.dumps(self.conflicts, indent=1))
        text = (f"colab-remote sync: conflict in {rules_safe(record['path'])}: changed on both sides; the "
                f"{self.cfg.remote_side}'s version is {rules_safe(record['copy'])} (both sides have both)")
        log.warning("%s", text)
        self.announce(text)

    def snapshot(self) -> dict[str, Any]:
        a = self.actions
        with self.cond:
            pending = len(self.queue) + len(self.requeue) + sum(len(h) for h in self.held.values())
        return {**self.stats, "pending": pending + len(a.fetching) + len(a.fetch_queue) + len(a.bigs),
                "in_flight": len(a.inflight), "tracked": len(self.base), "connected": self.connected,
                "paused": self.pause.info(), "plan": self.plan, "recent_conflicts": self.conflicts[-20:]}


def give_back_memory() -> None:
    """After a whole comparison (two listings of the tree in memory): hand the freed memory back
    to the system, so the idle sync's RSS is its state, not that peak (glibc; fine without)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def rules_safe(text: str) -> str:
    """``text`` with control characters escaped: names come from the runtime and end up in a
    terminal, a log, a desktop notification (no escape sequences from there)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def describe_plan(c: dict[str, Any]) -> str:
    """What the comparison found, in one paragraph."""
    def mb(n: int) -> str:
        return f"{n / 1e6:.1f} MB"

    if c["gone"]:
        head = "the runtime's folder is gone"
    elif c["fresh"] and not c["runtime"]:
        head = "the runtime's folder is empty (a new runtime?): it is filled from the laptop"
    elif not c["laptop"] and c["runtime"]:
        head = "the laptop's folder is empty: it is filled from the runtime"
    elif c["fresh"]:
        head = "first comparison of both folders: they are merged"
    else:
        head = "both folders compared with their last common state"
    parts = [f"{c[PUSH]} to the runtime ({mb(c['bytes_push'])})",
             f"{c[PULL]} to the laptop ({mb(c['bytes_pull'])})", f"{c[SAME]} the same"]
    if c["delete_runtime"] or c["delete_laptop"]:
        parts.append(f"{c['delete_runtime']} deleted in the runtime, {c['delete_laptop']} on the "
                     "laptop (to the trash, once the mass-delete check passes)")
    if c[CONFLICT]:
        parts.append(f"{c[CONFLICT]} changed on both sides: both versions are kept (the runtime's as "
                     "name.conflict-runtime-<time>.ext)")
    return f"{head}: " + ", ".join(parts)
