"""The runtime's half of a two-way sync, and the one home of its wire protocol.

The laptop starts it over its ssh connection (``python3 -I -B -c <loader>``; the loader reads this
package from stdin and imports it from memory, so nothing is installed in the runtime). A sync
started in the runtime runs it on the laptop instead, installed with the agent and started by a
restricted key's forced command (:func:`main` with ``fixed``: the folder, the trash and the paths
never taken are the laptop account's, see :meth:`Peer.confine`). It answers the coordinator's
records on stdin and reports every change in its folder on stdout as it happens (inotify through
ctypes; a cheap scan every second where there is none). It writes only what the coordinator sends,
through :class:`.tree.Tree` (temporary names, staging, the trash), and each write may carry a
guard: it happens only when the path is still what the coordinator last saw, else the coordinator
hears what is there instead (a conflict).

Records are the agent's (:mod:`.protocol`) (``HEADER``: op, path, mode, mtime, offset, data). A
path's state travels as mode (with its type bits; 0: absent), mtime, offset (a file's size) and
data (a link's target).

Standard library only, Python >= 3.6 (it runs on whatever python3 the runtime has).
"""

import json
import os
import pwd
import select
import stat
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from . import fs as agent_fs
from . import protocol
from . import syncfs as fs
from .inotify import IN as _IN
from .inotify import Inotify
from .rules import MARKER, Rule, Rules, link_inside, protected
from .tree import Tree

PROTOCOL = "twoway-1"
MAGIC = b"\0colab-remote-peer\0"  # before the first record: what a chatty shell printed is skipped

# laptop -> peer. The agent's own ops keep their meaning: PUT, MKDIR, LINK, DELETE, END.
OP_PUT, OP_MKDIR, OP_LINK, OP_DELETE, OP_END = (protocol.OP_PUT, protocol.OP_MKDIR, protocol.OP_LINK,
                                                protocol.OP_DELETE, protocol.OP_END)
OP_START = b"S"   # data: JSON {root, rules, inline_max, keep_days, trash_budget}; R_HELLO answers
OP_RULES = b"N"   # data: JSON rules (a .gitignore changed): watched anew, then R_RESCAN
OP_MARK = b"T"    # data: the marker's text (which sync filled this folder)
OP_LIST = b"I"    # every synced entry: R_ENTRY each, then R_LISTED
OP_HASH = b"C"    # a file's digest: R_HASH, or R_FAIL
OP_READ = b"R"    # a file from offset: R_DATA parts, then R_DONE (data: its digest), or R_FAIL
OP_GUARD = b"Q"   # the next write to path happens only if it is as given (mode 0: absent; a
                  # folder with data b"empty": one with nothing synced in it)
OP_ASIDE = b"V"   # rename path to data, in its folder (the runtime's version of a conflict)
OP_BIG = b"B"     # a big file begins or resumes: mode, mtime, offset = size; R_HAVE answers
OP_PART = b"O"    # a part of it: offset, data
OP_JOIN = b"J"    # it is whole: mode, mtime, offset = size, data = digest (after a guard)
OP_PING = b"Z"    # report every change noticed so far, then R_PONG

# peer -> laptop
R_HELLO = b"H"    # JSON {protocol, pid, boot_id, marker, created, watch, python}
R_ACK = b"A"      # a batch is done: offset = ops, data = JSON {"errors": [[p, why]],
                  # "refused": [[p, mode, mtime, size, target]]} (guards that did not hold)
R_ENTRY = b"m"    # one entry of the listing (a path's state)
R_LISTED = b"e"   # the end of the listing: offset = entries; data b"missing" when the folder is gone
R_DATA = b"g"     # part of a file being read: mode, mtime, offset, data
R_DONE = b"z"     # its end: mode, mtime, offset = size, data = digest
R_FAIL = b"!"     # a read or a hash failed: data says why
R_HASH = b"#"     # mode, mtime, offset = size, data = digest
R_HAVE = b"h"     # offset = bytes of a big file here already (mode 1: it cannot begin, data: why)
R_CHANGE = b"c"   # a path changed (its state now; mode 0: gone)
R_FILE = b"f"     # a small file changed: its state and its bytes
R_RESCAN = b"o"   # changes may have gone unseen (data: why): the laptop compares everything
R_PONG = b"y"
R_NOTE = b"w"     # a line for the laptop's log

QUIET = 0.2           # a file still being written is reported once quiet this long ...
QUIET_MAX = 2.0       # ... or this long after its first change
CREATED = 0.05        # a new file: its close-after-write usually follows at once
SCAN_EVERY = 1.0      # without inotify
UPKEEP_EVERY = 3600.0
ECHO_KEEP = 5.0       # what the laptop wrote is not reported back for this long (unless changed)

def state_record(op: bytes, rel: bytes, st: fs.Stat, data: Optional[bytes] = None) -> bytes:
    return protocol.pack(op, rel, mode=st[0], mtime_ns=st[2], offset=st[1],
                       data=st[3] if data is None else data)


class Peer:
    """The runtime's side: one folder, its tree, its watch, and the laptop's records."""

    def __init__(self, inp: int = 0, out: int = 1, fixed: Optional[dict] = None) -> None:
        self.inp, self.out = inp, out
        # Run by a runtime's key on the laptop (:func:`run_fixed`): the folder, the trash and what
        # is never taken are the account's (``fixed``), whatever the records say.
        self.fixed = fixed
        self.protect = tuple(Rule(p) for p in (fixed or {}).get("protect", ()))
        self.outbuf: List[bytes] = []
        self.outsize = 0
        self.tree: Optional[Tree] = None
        self.partials: Optional[fs.Partials] = None
        self.root = b""
        self.rules = Rules()
        self.inline_max = 1 << 20
        self.keep_days, self.trash_budget = 7.0, 2 << 30
        self.watch: Optional[Inotify] = None
        self.snapshot: Optional[Dict[bytes, fs.Stat]] = None
        self.dirty: Dict[bytes, Tuple[float, float]] = {}
        self.expected: Dict[bytes, Tuple[fs.Stat, float]] = {}
        self.steady: Dict[bytes, fs.Stat] = {}  # big files looked at once, reported when the same
        self.guards: Dict[bytes, Tuple[fs.Stat, bytes]] = {}
        self.errors: List[List[str]] = []
        self.refused: List[List[Any]] = []
        self.ops = 0
        self.next_scan = self.next_upkeep = 0.0
        self.root_gone = False
        self.lane = False  # big files' own channel: no watch, no upkeep, no reports

    # -- output --------------------------------------------------------------------------------
    def send(self, record: bytes) -> None:
        self.outbuf.append(record)
        self.outsize += len(record)
        if self.outsize >= 1 << 20:
            self.flush()

    def flush(self) -> None:
        if self.outbuf:
            agent_fs.write_all(self.out, b"".join(self.outbuf))
            self.outbuf, self.outsize = [], 0

    def note(self, text: str) -> None:
        self.send(protocol.pack(R_NOTE, data=text.encode("utf-8", "replace")))

    # -- start ---------------------------------------------------------------------------------
    def start(self, request: dict) -> dict:
        if self.fixed is not None:
            request = dict(request, root=self.fixed["root"], keep_days=self.fixed["keep_days"],
                           trash_budget=self.fixed["trash_budget"])
        path = request["root"]
        if not path.startswith("/"):
            path = os.path.join(pwd.getpwuid(os.getuid()).pw_dir, path)
        created = not os.path.isdir(path)
        self.rules = Rules.from_json(request.get("rules") or {})
        self.inline_max = int(request.get("inline_max", self.inline_max))
        self.keep_days = float(request.get("keep_days", self.keep_days))
        self.trash_budget = int(request.get("trash_budget", self.trash_budget))
        self.lane = bool(request.get("lane"))
        self.open(os.fsencode(path))
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot = f.read().strip()
        except OSError:
            boot = ""
        return {"protocol": PROTOCOL, "pid": os.getpid(), "boot_id": boot, "root": os.fsdecode(self.root),
                "marker": self.marker(), "created": created, "python": sys.version.split()[0],
                "watch": "inotify" if self.watch is not None else "scan"}

    def open(self, path: bytes) -> None:
        """The folder (made when missing), its tree and its watch."""
        os.makedirs(path, 0o755, exist_ok=True)
        self.root = os.path.realpath(path)
        if self.root == b"/":
            raise ValueError("the runtime's folder must not be /")
        if self.tree is not None:
            assert self.partials is not None
            self.partials.close()
            self.tree.close()
        self.tree = Tree(self.root)
        self.partials = fs.Partials(self.tree)
        self.root_gone = False
        if self.lane:
            self.next_upkeep = time.monotonic() + 1e6  # the other peer keeps the trash
        else:
            self.upkeep()
            self.watch_all()

    def marker(self) -> str:
        assert self.tree is not None
        try:
            f = os.open(MARKER, fs.O_READ, dir_fd=self.tree.root_fd)
        except OSError:
            return ""
        try:
            return os.read(f, 4096).decode("utf-8", "replace")
        finally:
            os.close(f)

    def set_marker(self, text: bytes) -> None:
        assert self.tree is not None
        agent_fs.write_file_at(self.tree.root_fd, MARKER, text, 0o644)

    def upkeep(self) -> None:
        assert self.tree is not None and self.partials is not None
        self.next_upkeep = time.monotonic() + UPKEEP_EVERY
        try:
            fs.upkeep(self.tree, self.keep_days, self.trash_budget)
            self.partials.clean()
            self.tree.clean_staging()
        except OSError as e:
            self.note("trash upkeep: %s" % e)

    def watch_all(self) -> None:
        """Watch every synced folder (or take a snapshot for the scan)."""
        assert self.tree is not None
        if self.watch is not None:
            self.watch.close()
        self.watch, self.snapshot = Inotify(self.root), None
        if self.watch.fd < 0 or not self.watch.add(b""):
            self.watch.close()
            self.watch = None
        else:
            for rel, st in fs.walk(self.tree.root_fd, self.rules):
                if stat.S_ISDIR(st[0]) and not self.watch.add(rel):
                    self.note("the inotify watch limit is reached: changes are found by a scan "
                              "every %g s (raise fs.inotify.max_user_watches)" % SCAN_EVERY)
                    self.watch.close()
                    self.watch = None
                    break
        if self.watch is None:
            self.snapshot = dict(fs.walk(self.tree.root_fd, self.rules))
            self.next_scan = time.monotonic() + SCAN_EVERY

    # -- the laptop's records ------------------------------------------------------------------
    def handle(self, op: bytes, p: bytes, mode: int, mtime: int, offset: int, data: bytes) -> bool:
        """One record; False to end."""
        if op == OP_START:
            self.send(protocol.pack(R_HELLO, data=json.dumps(self.start(json.loads(data.decode()))).encode()))
            return True
        tree = self.tree
        if tree is None:
            self.note("a record before the start")
            return False
        if op == OP_END:
            tree.finish(self.errors)
            self.send(protocol.pack(R_ACK, offset=self.ops, data=json.dumps(
                {"errors": self.errors[:200], "refused": self.refused}).encode()))
            self.errors, self.refused, self.ops = [], [], 0
            self.flush()
            tree.live.forget()  # other programs rename folders: look them up afresh next time
            if time.monotonic() > self.next_upkeep:
                self.upkeep()
        elif op == OP_LIST:
            self.listing()
        elif op == OP_HASH:
            try:
                st, digest = fs.digest_of(tree.root_fd, p)
                self.send(state_record(R_HASH, p, st, digest))
            except (OSError, ValueError) as e:
                self.send(protocol.pack(R_FAIL, p, data=("%s: %s" % (type(e).__name__, e)).encode()))
        elif op == OP_READ:
            self.read(p, offset)
        elif op == OP_GUARD:
            self.guards[p] = ((mode, offset, mtime, data if stat.S_ISLNK(mode) else b""), data)
        elif op == OP_MARK:
            self.set_marker(data)
        elif op == OP_RULES:
            self.rules = Rules.from_json(json.loads(data.decode()))
            if not self.lane:
                self.watch_all()
                self.send(protocol.pack(R_RESCAN, data=b"rules"))
        elif op == OP_PING:  # what the kernel has queued counts too
            if self.watch is not None:
                self.on_events(self.watch.read())
            elif self.snapshot is not None:
                self.scan()
            self.report(everything=True)
            self.send(protocol.pack(R_PONG))
            self.flush()
        elif op == OP_BIG:
            assert self.partials is not None
            why = b""
            try:
                protocol.check_path(p)
                have = self.partials.begin(p, offset, mtime, wait=0.5)
            except (OSError, ValueError) as e:
                why, have = ("%s: %s" % (type(e).__name__, e)).encode(), -1
            self.send(protocol.pack(R_HAVE, p, offset=max(have, 0), mode=int(have < 0), data=why))
            self.flush()
        else:
            self.write(op, p, mode, mtime, offset, data)
        return True

    def write(self, op: bytes, p: bytes, mode: int, mtime: int, offset: int, data: bytes) -> None:
        """A change from the laptop, through the tree, when its guard holds."""
        if self.root_gone:  # deleted (or moved away) in the runtime: made again for the laptop's files
            self.open(self.root)
        tree, partials = self.tree, self.partials
        assert tree is not None and partials is not None
        if op != OP_PART:
            self.ops += 1
        try:
            protocol.check_path(p)
            if self.rules.excluded(os.fsdecode(p), op == OP_MKDIR):
                raise ValueError("a path this sync skips")
            if self.fixed is not None:
                self.confine(op, p, data)
            if op != OP_PART and not self.guard_holds(p):
                return
            if op == OP_PUT:
                tree.put(p, mode, mtime, data)
                self.expect(p, (stat.S_IFREG | mode, len(data), mtime, b""))
            elif op == OP_MKDIR:
                tree.mkdir(p, mode)
                self.expect(p, (stat.S_IFDIR | mode, 0, 0, b""))
            elif op == OP_LINK:
                tree.link(p, data)
                self.expect(p, (stat.S_IFLNK, 0, 0, data))
            elif op == OP_DELETE:
                tree.delete(p)
                self.expect(p, fs.ABSENT)
            elif op == OP_ASIDE:
                self.aside(p, data)
            elif op == OP_PART:
                partials.write(p, offset, data)
            elif op == OP_JOIN:
                partials.join(p, mode, mtime, offset, data)
                self.expect(p, (stat.S_IFREG | mode, offset, mtime, b""))
            else:
                raise ValueError("unknown operation %r" % op)
        except Exception as e:  # noqa: BLE001 - reported to the laptop, the peer goes on
            tree.live.forget()
            if op == OP_PART:
                partials.drop(p)
            self.errors.append([os.fsdecode(p), "%s: %s" % (type(e).__name__, e)])

    def confine(self, op: bytes, p: bytes, data: bytes) -> None:
        """On the laptop: what its own coordinator never takes from the runtime, refused here."""
        if protected(os.fsdecode(p), self.protect) or op == OP_ASIDE and protected(
                os.fsdecode(data), self.protect):
            raise ValueError("the runtime's version of this path is never applied on the laptop")
        if op == OP_LINK and not link_inside(os.fsdecode(p), data):
            raise ValueError("a link out of the folder is not taken from the runtime")

    def guard_holds(self, p: bytes) -> bool:
        guard = self.guards.pop(p, None)
        if guard is None:
            return True
        want, extra = guard
        assert self.tree is not None
        now = fs.stat_at(self.tree.root_fd, p)
        ok = fs.matches(now, want)
        if ok and extra == b"empty" and stat.S_ISDIR(now[0]):
            ok = not fs.has_entries(self.tree.root_fd, p, self.rules)
        if not ok:
            self.refused.append([os.fsdecode(p), now[0], now[2], now[1], os.fsdecode(now[3])])
        return ok

    def expect(self, p: bytes, st: fs.Stat) -> None:
        self.expected[p] = (st, time.monotonic() + ECHO_KEEP)

    def aside(self, p: bytes, new: bytes) -> None:
        """The runtime's version of a conflict to ``new`` (in the same folder), reported at once."""
        assert self.tree is not None
        protocol.check_path(new)
        if new.rpartition(b"/")[0] != p.rpartition(b"/")[0]:
            raise ValueError("a conflict's copy goes beside the file")
        fd = fs.open_parent(self.tree.root_fd, p)
        if fd is None:
            raise FileNotFoundError(os.fsdecode(p))
        try:
            old, name = p.rpartition(b"/")[2], new.rpartition(b"/")[2]
            if agent_fs.lstat_at(fd, name) is not None:
                raise FileExistsError(os.fsdecode(new))
            os.rename(old, name, src_dir_fd=fd, dst_dir_fd=fd)
        finally:
            os.close(fd)
        self.tree.live.forget()
        self.expect(p, fs.ABSENT)
        self.dirty[new] = (0.0, 0.0)
        self.report()

    def listing(self) -> None:
        assert self.tree is not None
        if self.root_gone or not os.path.isdir(self.root):
            self.send(protocol.pack(R_LISTED, data=b"missing"))
            self.flush()
            return
        count = 0
        for rel, st in fs.walk(self.tree.root_fd, self.rules):
            self.send(state_record(R_ENTRY, rel, st))
            count += 1
        self.send(protocol.pack(R_LISTED, offset=count))
        self.flush()

    def read(self, p: bytes, offset: int) -> None:
        """A file from ``offset`` in parts; its digest (of the whole file) at the end."""
        assert self.tree is not None
        try:
            f = fs.open_file(self.tree.root_fd, p)
        except (OSError, ValueError) as e:
            self.send(protocol.pack(R_FAIL, p, data=("%s: %s" % (type(e).__name__, e)).encode()))
            self.flush()
            return
        try:
            before = os.fstat(f)
            at, digest = agent_fs.read_digest(f, lambda off, data: self.send(protocol.pack(
                R_DATA, p, mode=before.st_mode, mtime_ns=before.st_mtime_ns, offset=off, data=data)), offset)
            after = os.fstat(f)
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) \
                    or at != after.st_size:
                self.send(protocol.pack(R_FAIL, p, data=b"changed while it was read"))
            else:
                self.send(state_record(R_DONE, p, fs.stat_of(after), digest))
        finally:
            os.close(f)
        self.flush()

    # -- the runtime's changes -----------------------------------------------------------------
    def on_events(self, events: List[Tuple[int, bytes]]) -> None:
        now = time.monotonic()
        for mask, rel in events:
            if not rel:
                why = b"overflow" if mask & _IN["Q_OVERFLOW"] else b"root"
                self.root_gone = why == b"root"
                self.send(protocol.pack(R_RESCAN, data=why))
                if not self.root_gone:
                    self.watch_all()
                continue
            is_dir = bool(mask & _IN["ISDIR"])
            if self.rules.excluded(os.fsdecode(rel), is_dir):
                continue
            if is_dir and mask & (_IN["CREATE"] | _IN["MOVED_TO"]):
                self.new_folder(rel, now)
                continue
            if mask & (_IN["MODIFY"] | _IN["CREATE"]) and not is_dir:
                first = self.dirty.get(rel, (0.0, now))[1]
                wait = CREATED if mask & _IN["CREATE"] else QUIET
                self.dirty[rel] = (min(now + wait, first + QUIET_MAX), first)
            else:
                self.dirty[rel] = (now, now)
        if self.tree is not None:
            self.tree.live.forget()

    def new_folder(self, rel: bytes, now: float) -> None:
        """A folder appeared (made or moved in): watch it, then report all that is in it."""
        assert self.tree is not None
        self.dirty[rel] = (now, now)
        if self.watch is not None:
            self.watch.add(rel)  # before it is listed: nothing falls in between
        fd = fs.open_parent(self.tree.root_fd, rel + b"/x")
        if fd is None:
            return
        try:
            for r, st in fs.walk(fd, self.rules, rel):
                if stat.S_ISDIR(st[0]) and self.watch is not None:
                    self.watch.add(r)
                self.dirty[r] = (now, now)
        finally:
            os.close(fd)

    def scan(self) -> None:
        """Without inotify: what differs from the last snapshot is dirty."""
        assert self.tree is not None and self.snapshot is not None
        self.next_scan = time.monotonic() + SCAN_EVERY
        now = dict(fs.walk(self.tree.root_fd, self.rules))
        for rel in set(now) | set(self.snapshot):
            if now.get(rel) != self.snapshot.get(rel):
                self.dirty[rel] = (0.0, 0.0)
        self.snapshot = now

    def report(self, everything: bool = False) -> None:
        """Report the dirty paths whose time has come (all of them with ``everything``)."""
        if not self.dirty:
            return
        assert self.tree is not None
        now = time.monotonic()
        due = sorted(rel for rel, (at, _) in self.dirty.items() if everything or at <= now)
        for rel in due:
            del self.dirty[rel]
            st = fs.stat_at(self.tree.root_fd, rel)
            data: Optional[bytes] = None
            if stat.S_ISREG(st[0]) and st[1] > self.inline_max and self.steady.pop(rel, None) != st \
                    and not everything:  # (a flush asks for what is there now)
                self.steady[rel] = st  # a big file goes once it stayed the same for QUIET
                self.dirty[rel] = (now + QUIET, now)
                continue
            if stat.S_ISREG(st[0]) and st[1] <= self.inline_max:
                try:
                    st, data = fs.read_whole(self.tree.root_fd, rel, self.inline_max)
                except (OSError, ValueError):
                    self.dirty[rel] = (now + QUIET, now)  # changed again meanwhile: its event follows
                    continue
            echo = self.expected.pop(rel, None)
            if echo is not None and echo[1] > now and fs.matches(st, echo[0]):
                continue  # what the laptop itself just wrote
            if data is not None:
                self.send(state_record(R_FILE, rel, st, data))
            else:
                self.send(state_record(R_CHANGE, rel, st))
        if len(self.expected) > 10000:
            self.expected = {k: v for k, v in self.expected.items() if v[1] > now}

    def next_wake(self) -> Optional[float]:
        waits = [at for at, _ in self.dirty.values()]
        if self.snapshot is not None:
            waits.append(self.next_scan)
        waits.append(self.next_upkeep if self.tree is not None else time.monotonic() + 3600)
        return max(0.0, min(waits) - time.monotonic())

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> int:
        agent_fs.write_all(self.out, MAGIC)
        buf = bytearray()
        size = protocol.HEADER.size
        while True:
            fds = [self.inp] + ([self.watch.fd] if self.watch is not None else [])
            ready, _, _ = select.select(fds, [], [], self.next_wake())
            if self.inp in ready:
                chunk = os.read(self.inp, 1 << 20)
                if not chunk:
                    break
                buf += chunk
                pos = 0
                while len(buf) - pos >= size:
                    op, plen, mode, mtime, offset, dlen = protocol.HEADER.unpack_from(buf, pos)
                    end = pos + size + plen + dlen
                    if end > len(buf):
                        break
                    p = bytes(buf[pos + size:pos + size + plen])
                    data = bytes(buf[pos + size + plen:end])
                    pos = end
                    if not self.handle(op, p, mode, mtime, offset, data):
                        return 1
                del buf[:pos]
            if self.watch is not None and self.watch.fd in ready:
                self.on_events(self.watch.read())
            if self.snapshot is not None and time.monotonic() >= self.next_scan:
                self.scan()
            if self.tree is not None:
                self.report()
                if time.monotonic() > self.next_upkeep:
                    self.upkeep()
            self.flush()
        if self.tree is not None:
            self.tree.finish(self.errors)  # the new folders of a cut batch hold whole files only
            if self.partials is not None:
                self.partials.close()
            self.tree.close()
        return 0


def main(fixed: Optional[dict] = None) -> int:
    """Serve the records on stdin; ``fixed``: the account's settings for a runtime's key."""
    try:  # 1 MiB pipes: a batch in a few reads (Linux; fine without)
        import fcntl
        fcntl.fcntl(0, 1031, 1 << 20)
        fcntl.fcntl(1, 1031, 1 << 20)
    except (OSError, ValueError, ImportError):
        pass
    return Peer(fixed=fixed).run()

