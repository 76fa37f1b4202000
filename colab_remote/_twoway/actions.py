"""What the coordinator's decisions send and apply.

- to the runtime: batches of guarded records (``GUARD`` + ``PUT``/``MKDIR``/``LINK``/``DELETE``,
  ``ASIDE`` for a conflict), one ``END`` each; git's refs, HEAD and index in a batch after the one
  with their objects; big files in resumable parts (``BIG``, the runtime says what it has, ``PART``
  from there, ``GUARD`` + ``JOIN``) in their own lane (:mod:`.lane`). The base follows at once
  and is set back for what the runtime refused (its guard did not hold: the path is decided again
  with what is there).
- to the laptop: small files that came with their change are applied at once; others are read
  (``READ``, 64 at a time; big ones from where an earlier, cut read stopped) and applied when they
  are here, each through :class:`.local.Local` after a last look at the laptop's path.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import _agent
from .._agent import fs as agent_fs
from .._agent import peer, rules
from .._agent import syncfs as fs
from .base import Entry, stat_of
from .lane import Channel, Lane
from .link import Record
from .local import Refused, enc

if TYPE_CHECKING:
    from .core import Core

log = logging.getLogger("colab_remote.sync")

BATCH_BYTES = 4 << 20
BATCH_OPS = 500
FETCH_WINDOW = 64
BIG_STEADY = 0.3  # s a big file must stay the same (size, mtime) before it goes
Item = tuple[str, "Entry | None", "Entry | None"]  # path, the laptop's, the runtime's


def order(item: Item) -> tuple[int, int, str]:
    """Folders first (shallow ones first), then files and links, deletes last (deep ones first)."""
    rel, here, there = item
    new = here if here is not None else None
    if new is None:  # a delete
        return (2, -rel.count("/"), rel)
    return (0 if new.is_dir else 1, rel.count("/"), rel)


def guard(rel: str, expect: Entry | None, empty: bool = False) -> bytes:
    st = stat_of(expect)
    return _agent.pack(peer.OP_GUARD, enc(rel), mode=st[0], mtime_ns=st[2], offset=st[1],
                       data=b"empty" if empty else st[3])


class Actions:
    """The transfers of one engine (its state is reset with each connection)."""

    def __init__(self, engine: Core) -> None:
        self.e = engine
        self.watch_folder: Callable[[str], object] = lambda rel: None
        self.numbers = itertools.count(1)  # batches, from the engine's thread and the lane's
        self.lane: Lane | None = None
        self.reset()

    def reset(self) -> None:
        self.inflight: dict[int, tuple[dict[str, Entry | None], list[dict[str, Any]]]] = {}
        if self.lane is not None:
            self.lane.close()
        self.lane = Lane()
        self.fetching: dict[str, tuple[Entry | None, Entry]] = {}
        self.fetch_queue: collections.deque[tuple[str, Entry | None, Entry]] = collections.deque()
        self.fetch_out = 0
        self.bigs: dict[str, tuple[Entry, Entry | None]] = {}
        self.big_again: set[str] = set()  # changed again while its first version was on its way
        self.steady: dict[str, fs.Stat] = {}  # big files seen once: sent when still the same
        for reader in getattr(self, "readers", []):
            reader.close()
        self.readers: list[Reader] = []

    # --- to the runtime -----------------------------------------------------------------------------
    def run(self, pushes: list[Item], pulls: list[Item], conflicts: list[Item]) -> None:
        asides: list[tuple[str, Entry | None, Entry | None, str]] = []
        for rel, here, there in conflicts:
            asides.append((rel, here, there, self._conflict_name(rel)))
            pushes.append((rel, here, None))  # the runtime's version moves aside first
        if pushes or asides:
            self._push(pushes, asides)
        if pulls:
            self._pull(pulls)

    def _conflict_name(self, rel: str) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        side = self.e.cfg.remote_side  # the other side's version goes aside: its name says which
        name, n = rules.conflict_name(rel, stamp, side), 1
        while self.e.local.entry(name) is not None or self.e.remote(name) is not None \
                or name in self.e.base:
            n += 1
            name = rules.conflict_name(rel, f"{stamp}-{n}", side)
        return name

    def _push(self, items: list[Item], asides: list[tuple[str, Entry | None, Entry | None, str]]) -> None:
        """Guarded records in batches, sent as they fill (a first fill of 100,000 files is never
        all in memory at once); git's last writes in a batch after all the others."""
        e = self.e
        batches = [Batch(self), Batch(self, hold=True)]  # git's last writes wait for all the others
        for rel, here, there, copy in asides:
            batches[0].add(rel, [guard(rel, there), _agent.pack(peer.OP_ASIDE, enc(rel), data=enc(copy))])
            e.remote_over[rel] = None
            e.inline.pop(rel, None)
            sides = {"laptop": describe(here), "runtime": describe(there)}
            if e.cfg.remote_side == "laptop":  # started in the runtime: here is the runtime
                sides = {"laptop": sides["runtime"], "runtime": sides["laptop"]}
            batches[0].conflicts.append({"path": rel, "copy": copy, "time": time.time(), **sides})
        for rel, here, there in sorted(items, key=order):
            if here is not None and here.is_file and here.size >= e.cfg.big_file:
                self._begin_big(rel, here, there)
                continue
            record, entry = self._record(rel, here, there)
            if record is None:
                continue
            empty = here is None and there is not None and there.is_dir
            batches[rules.git_phase(rel)].add(rel, [guard(rel, there, empty=empty), record])
            e.settle(rel, entry)
            self._count_push(rel, here, entry)
        batches[0].send()
        batches[1].send()

    def _record(self, rel: str, here: Entry | None, there: Entry | None) -> tuple[bytes | None, Entry | None]:
        """The record that puts the laptop's version of ``rel`` in the runtime, and that version."""
        p = enc(rel)
        if here is None:
            return _agent.pack(peer.OP_DELETE, p), None
        if here.is_dir:
            return _agent.pack(peer.OP_MKDIR, p, mode=stat.S_IMODE(here.mode)), here
        if here.is_link:
            return _agent.pack(peer.OP_LINK, p, data=here.target), here
        try:
            entry, data = self.e.local.read(rel, self.e.cfg.big_file)
        except (OSError, ValueError):
            return None, None  # gone, changed or bigger meanwhile: its own event follows
        return _agent.pack(peer.OP_PUT, p, mode=stat.S_IMODE(entry.mode), mtime_ns=entry.mtime_ns,
                           data=data), entry

    def _count_push(self, rel: str, here: Entry | None, sent: Entry | None) -> None:
        s = self.e.stats
        if here is None:
            s["deleted_runtime"] += 1
        elif sent is not None and sent.is_file:
            s["pushed"] += 1
            s["bytes_pushed"] += sent.size
        s["last_change"] = time.time()

    def _send(self, records: list[bytes], prev: dict[str, Entry | None],
              conflicts: list[dict[str, Any]]) -> None:
        assert self.e.link is not None
        n = next(self.numbers)
        self.inflight[n] = (prev, conflicts)

        def acked(rec: Record) -> bool:
            self.e.post("ack", n, json.loads(rec[5] or b"{}"))
            return True

        self.e.link.send(b"".join(records) + _agent.pack(peer.OP_END), acked)

    def acked(self, n: int, result: dict[str, Any]) -> set[str]:
        """The runtime did a batch: what it refused is decided again (the paths returned)."""
        prev, conflicts = self.inflight.pop(n, ({}, []))
        again: set[str] = set()
        e = self.e
        for rel, mode, mtime, size, target in result.get("refused", []):
            entry = Entry.of((mode, size, mtime, os.fsencode(target)))
            if rel in prev:
                e.base.set(rel, prev[rel])
            e.remote_over[rel] = entry
            again.add(rel)
        for rel, why in result.get("errors", []):
            log.warning("the runtime refused %s: %s", _safe(rel), _safe(why))
            e.stats["last_error"] = f"{rel}: {why}"[:500]
            if rel in prev:
                e.base.set(rel, prev[rel])
            e.rescan_due = time.monotonic() + 30.0  # sent again then, if it still differs
        failed = again | {rel for rel, _ in result.get("errors", [])}
        for record in conflicts:
            if record["path"] not in failed:
                e.conflict(record)
        return again

    # --- big files ------------------------------------------------------------------------------------
    def _begin_big(self, rel: str, here: Entry, there: Entry | None) -> None:
        assert self.e.link is not None
        if rel in self.bigs:
            self.big_again.add(rel)
            return
        if self.steady.get(rel) != here.stat:  # still being written? (one write sets mtime once)
            self.steady[rel] = here.stat
            self.e.later(rel, BIG_STEADY)
            return
        del self.steady[rel]
        self.bigs[rel] = (here, there)

        def have(rec: Record) -> bool:
            self.e.post("have", rel, rec[4], rec[5].decode(errors="replace") if rec[2] else "")
            return True

        self._big_send(_agent.pack(peer.OP_BIG, enc(rel), mtime_ns=here.mtime_ns, offset=here.size), have)

    def _big_send(self, data: bytes, handler: Any = None) -> None:
        """``data`` on the big files' lane, after what is queued there."""
        assert self.e.link is not None and self.lane is not None
        channel = Channel(self.e.link)
        self.lane.put(lambda: channel.send(data, handler))

    def stream(self, rel: str, offset: int, failed: str) -> None:
        """The runtime has ``offset`` bytes of ``rel`` already: the lane sends the rest, then joins
        it (``failed``: why it cannot begin now: tried again in a second)."""
        e = self.e
        here, there = self.bigs.get(rel, (None, None))
        if failed:
            log.info("%s cannot begin in the runtime (%s): trying again", _safe(rel), _safe(failed))
            self.streamed(rel, here, None, 0)
            e.later(rel, 1.0)
            return
        if here is None or e.link is None or self.lane is None:
            return
        channel = Channel(e.link)
        self.lane.put(lambda: self._stream(channel, rel, here, there, offset))

    def _stream(self, channel: Channel, rel: str, here: Entry, there: Entry | None, offset: int) -> None:
        """In the lane's thread: the parts from ``offset``, then (guarded) the join."""
        e = self.e
        try:
            f = e.local.open(rel)
        except (OSError, ValueError):
            e.post("streamed", rel, here, None, 0)
            return
        p, same, digest = enc(rel), False, b""
        try:
            st = os.fstat(f)
            if (st.st_size, st.st_mtime_ns) == (here.size, here.mtime_ns):  # else changed: decided again
                if offset:
                    log.info("%s: the runtime has %d of %d bytes from before: resuming", _safe(rel), offset,
                             st.st_size)
                at, digest = agent_fs.read_digest(f, lambda off, data: channel.send(
                    _agent.pack(peer.OP_PART, p, offset=off, data=data)), offset)
                same = at == here.size  # else it grew or shrank while it was read
        finally:
            os.close(f)
        if not same:
            e.post("streamed", rel, here, None, 0)
            return
        entry = here._replace(digest=digest)
        n = next(self.numbers)
        e.post("streamed", rel, here, entry, n)  # the base follows before the runtime's answer

        def acked(rec: Record) -> bool:
            e.post("ack", n, json.loads(rec[5] or b"{}"))
            return True

        join = _agent.pack(peer.OP_JOIN, p, mode=stat.S_IMODE(here.mode), mtime_ns=here.mtime_ns,
                           offset=here.size, data=entry.digest)
        channel.send(guard(rel, there) + join + _agent.pack(peer.OP_END), acked)

    def streamed(self, rel: str, here: Entry | None, entry: Entry | None, n: int) -> set[str]:
        """The lane sent ``rel`` (``entry``, its join in batch ``n``) or could not (None); the
        paths to decide again."""
        if here is None or self.bigs.get(rel, (None, None))[0] is not here:
            return set()  # an earlier connection's
        _, there = self.bigs.pop(rel)
        again = set()
        if rel in self.big_again:
            self.big_again.discard(rel)
            again.add(rel)
        if entry is None:
            return again | {rel}
        e = self.e
        prev = {rel: e.base.get(rel)}
        e.settle(rel, entry)
        self._count_push(rel, here, entry)
        self.inflight[n] = (prev, [])
        return again

    # --- to the laptop ----------------------------------------------------------------------------------
    def _pull(self, items: list[Item]) -> None:
        e = self.e
        by_phase: list[list[Item]] = [[], []]
        for item in items:
            by_phase[rules.git_phase(item[0])].append(item)
        for phase in by_phase:
            for rel, here, there in sorted(phase, key=lambda i: order((i[0], i[2], None))):
                self._apply(rel, here, there)
            for rel, why in e.local.finish():
                log.warning("the laptop could not take %s: %s", _safe(rel), _safe(why))

    def _apply(self, rel: str, here: Entry | None, there: Entry | None, data: bytes | None = None) -> bool:
        """The runtime's version of ``rel`` here (``data``: its bytes when they came with it); True
        when applied or being fetched."""
        e = self.e
        try:
            e.local.check(rel, there, e.protect)
        except (Refused, ValueError) as err:
            e.refused(rel, str(err))
            return False
        if not e.local.holds(rel, here):
            e.requeue.add(rel)  # the laptop's own change meanwhile: decided again
            return False
        try:
            if there is None:
                e.local.delete(rel)
                e.stats["deleted_laptop"] += 1
            elif there.is_dir:
                e.local.mkdir(rel, there)
            elif there.is_link:
                e.local.link(rel, there)
            else:
                if data is None:
                    have = e.inline.get(rel)
                    if have is None or have[0].stat != there.stat:
                        self._fetch(rel, here, there)
                        return True
                    there, data = have
                e.local.put(rel, there, data)
                e.stats["pulled"] += 1
                e.stats["bytes_pulled"] += there.size
        except OSError as err:
            log.warning("the laptop could not take %s: %s", _safe(rel), err)
            e.stats["last_error"] = f"{rel}: {err}"[:500]
            e.tree_forget()
            return False
        e.settle(rel, there)
        e.stats["last_change"] = time.time()
        return True

    def _fetch(self, rel: str, here: Entry | None, there: Entry) -> None:
        if rel in self.fetching and self.fetching[rel][1].stat == there.stat:
            return
        self.fetching[rel] = (here, there)
        self.fetch_queue.append((rel, here, there))

    def pump(self) -> None:
        """Ask for more files while fewer than FETCH_WINDOW are on their way."""
        e = self.e
        while self.fetch_queue and self.fetch_out < FETCH_WINDOW and e.link is not None:
            rel, here, there = self.fetch_queue.popleft()
            if self.fetching.get(rel, (None, None))[1] is not there:
                continue  # a newer version was asked for since
            big = there.size >= e.cfg.big_file
            offset, out = 0, -1
            if big:
                try:
                    offset = e.local.partials.begin(enc(rel), there.size, there.mtime_ns)
                    out = e.local.partials.open(enc(rel))
                except (OSError, ValueError) as err:
                    log.info("%s cannot begin here (%s): trying again", _safe(rel), err)
                    self.fetching.pop(rel, None)
                    e.later(rel, 1.0)
                    continue
                if offset:
                    log.info("%s: %d of %d bytes are here from before: resuming", _safe(rel), offset,
                             there.size)
            self.fetch_out += 1
            reader = Reader(e, rel, out, offset)
            self.readers = [r for r in self.readers if not r.done] + [reader]
            read = _agent.pack(peer.OP_READ, enc(rel), offset=offset)
            if big:
                self._big_send(read, reader)  # its own lane: the runtime's reports never wait for it
            else:
                e.link.send(read, reader)

    def fetched(self, rel: str, entry: Entry | None, data: bytes | None, why: str) -> set[str]:
        """A file read from the runtime is here (or could not be read)."""
        e = self.e
        self.fetch_out -= 1
        here, there = self.fetching.pop(rel, (None, None))
        if there is None or entry is None:
            if why:
                log.info("reading %s from the runtime: %s (its next change brings it)", _safe(rel),
                         _safe(why))
            return set()
        now = e.remote(rel)
        if entry.stat != there.stat or now is None or now.stat != there.stat:
            return {rel}  # it changed since it was asked for: decided again
        if data is None:  # a big one, whole in the partial file
            if not self._join(rel, here, entry):
                return set()
        elif not self._apply(rel, here, entry, data):
            return set()
        for r, why2 in e.local.finish():
            log.warning("the laptop could not take %s: %s", _safe(r), _safe(why2))
        return set()

    def _join(self, rel: str, here: Entry | None, entry: Entry) -> bool:
        e = self.e
        try:
            e.local.check(rel, entry, e.protect)
        except (Refused, ValueError) as err:
            e.refused(rel, str(err))
            return False
        if not e.local.holds(rel, here):
            e.requeue.add(rel)
            return False
        try:
            e.local.join(rel, entry)
        except (OSError, ValueError) as err:
            log.warning("the laptop could not take %s: %s", _safe(rel), err)
            e.tree_forget()
            return False
        e.settle(rel, entry)
        e.stats["pulled"] += 1
        e.stats["bytes_pulled"] += entry.size
        e.stats["last_change"] = time.time()
        return True


class Batch:
    """Records for the runtime, sent with an END whenever BATCH_BYTES or BATCH_OPS are reached."""

    def __init__(self, actions: Actions, hold: bool = False) -> None:
        self.actions, self.hold = actions, hold
        self.records: list[bytes] = []
        self.prev: dict[str, Entry | None] = {}   # the base before, set back for what is refused
        self.conflicts: list[dict[str, Any]] = []  # announced once the runtime did them
        self.size = 0

    def add(self, rel: str, records: list[bytes]) -> None:
        self.prev.setdefault(rel, self.actions.e.base.get(rel))
        self.records += records
        self.size += sum(len(r) for r in records)
        if not self.hold and (self.size >= BATCH_BYTES or len(self.records) >= 2 * BATCH_OPS):
            self.send()

    def send(self) -> None:
        if self.records:
            self.actions._send(self.records, self.prev, self.conflicts)
        self.records, self.prev, self.conflicts, self.size = [], {}, [], 0


class Reader:
    """The replies to one READ: parts into memory (small files) or into the partial file (big)."""

    def __init__(self, engine: Core, rel: str, out: int, offset: int) -> None:
        self.e, self.rel, self.out, self.at = engine, rel, out, offset
        self.parts: list[bytes] = []
        self.broken = self.done = False

    def close(self) -> None:
        """The connection is gone: the partial file keeps what arrived (a later read resumes)."""
        if self.out >= 0:
            os.close(self.out)
            self.out = -1

    def __call__(self, rec: Record) -> bool:
        op, _, mode, mtime, offset, data = rec
        if op == peer.R_DATA:
            if offset != self.at:
                self.broken = True
            elif self.out >= 0:
                agent_fs.write_all(self.out, data)
            else:
                self.parts.append(data)
            self.at += len(data)
            return False
        big = self.out >= 0
        self.close()
        self.done = True
        if op == peer.R_DONE and not self.broken:
            entry = Entry.of((mode, offset, mtime, b""), data)
            self.e.post("fetched", self.rel, entry, None if big else b"".join(self.parts), "")
        else:
            why = data.decode(errors="replace") if op == peer.R_FAIL else "parts out of order"
            self.e.post("fetched", self.rel, None, None, why)
        return True


def describe(entry: Entry | None) -> str:
    if entry is None:
        return "deleted"
    if entry.is_dir:
        return "a folder"
    if entry.is_link:
        return f"a link to {_safe(os.fsdecode(entry.target))}"
    return f"{entry.size} bytes, changed {time.strftime('%H:%M:%S', time.localtime(entry.mtime_ns / 1e9))}"


def _safe(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
