"""The two ways the mirror reaches its copy on the server, behind one interface.

- :class:`AgentChannel`: the server runs our agent (:mod:`colab_remote._agent`, the only thing a
  restricted key may run); records go both ways over one ssh channel: changed files, new folders
  built whole, the listing for whole-tree passes, files read back; big files go to the big-file
  lane (:mod:`.lane`, a second session) and are put in place from here once it delivered them.
  Records are compressed where it pays (:mod:`.squeeze`).
- :class:`ShellChannel`: the server has no python3 (``restricted=False`` only): deletes as a small
  ``sh`` script, everything else through rsync (no ``--delete``; the trash as ``--backup-dir``).

The worker calls the same methods on either: :meth:`Channel.send`, :meth:`Channel.whole_pass`,
:meth:`Channel.restore`, :meth:`Channel.count`, :meth:`Channel.prune`.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import select
import shlex
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import _agent, _proc, _sync
from ..errors import MirrorError
from . import git
from .compare import Compare, Watch
from .lane import Finished, Lane
from .link import ConnectionLost, Link
from .plan import Entry, Plan, Planner, Stage, identity, join, scan_local
from .report import Progress
from .restore import Selection, Writer
from .squeeze import Squeeze

log = logging.getLogger("colab_remote.mirror")

BATCH_BYTES = 4 * 1024 * 1024
BATCH_OPS = 500


@dataclass
class Sent:
    """What one send or whole-tree pass did."""

    files: int = 0
    nbytes: int = 0
    ops: int = 0
    deletes: int = 0
    big: int = 0
    errors: list[list[str]] = field(default_factory=list)  # [path, what the server said]

    def add(self, other: Sent) -> None:
        self.files += other.files
        self.nbytes += other.nbytes
        self.ops += other.ops
        self.deletes += other.deletes
        self.big += other.big
        self.errors += other.errors


Push = Callable[[set[str], set[str], Progress | None], Sent]  # the worker's push (paths, new folders)
Guard = Callable[[int, Callable[[int], int]], None]  # (server's files, count here up to n): may raise


class Channel:
    """What the worker needs from the server side (see the module docstring)."""

    inline = True  # small files travel as whole records (the agent), not through rsync
    lists = True   # whole_pass lists every folder here (and calls ``watch`` for each)

    def __init__(self, link: Link) -> None:
        self.link = link
        self.cfg = link.cfg

    @property
    def alive(self) -> bool:
        """What runs on the server for this channel still runs (as far as this side knows)."""
        return True

    def open(self) -> None:
        """Once the link is logged in: start what runs on the server."""

    def close(self) -> None:
        """Stop it (the link stays the caller's)."""

    def listing(self) -> dict[str, Entry] | None:
        """The server copy, entry by entry, when this channel can list it (else None)."""
        return None

    def count(self, listing: dict[str, Entry] | None) -> int:
        """Files (and links) in the server copy, the trash not counted; 0 when it is not there."""
        raise NotImplementedError

    def send(self, plan: Plan, progress: Progress | None = None) -> Sent:
        raise NotImplementedError

    def whole_pass(self, push: Push, root: str, flt: _sync.MirrorFilter, progress: Progress | None,
                   *, guard: Guard | None = None, watch: Watch | None = None,
                   changed_since: int | None = None) -> Sent:
        """Send whatever differs from the server copy, never deleting there. ``guard`` is called
        once the server's file count is known, before anything is sent; ``watch(path, rel)`` for
        each folder here before it is listed (with :attr:`lists`); ``changed_since``: files here
        whose ctime is later are sent even where size and time match (with :attr:`lists`; rsync
        goes by size and time)."""
        raise NotImplementedError

    def restore(self, root: str, flt: _sync.MirrorFilter, listing: dict[str, Entry] | None,
                progress: Progress) -> None:
        raise NotImplementedError

    def prune(self) -> None:
        """Remove old trash on the server (the agent does it itself)."""

    def ping(self) -> None:
        """Tell the server-side agent the mirror is still there (an idle mirror)."""

    def place(self, done: list[Finished], planner: Planner) -> Sent:
        """Put big files the lane delivered in place (only the agent has a lane)."""
        return Sent()


def _stamp() -> str:
    t = time.time()
    return time.strftime(_agent.STAMP_FORMAT, time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


_REPLY = re.compile(rb"^CRA-(?:SETUP .*|NOPYTHON)\n", re.M)  # a set-up's reply line (see start)


class AgentChannel(Channel):
    """Records to and from the agent over one ssh channel (non-blocking I/O with deadlines, so a
    dead link never hangs the mirror); big files through ``lane``."""

    def __init__(self, link: Link, command: str, lane: Lane, squeeze: Squeeze) -> None:
        super().__init__(link)
        self.command = command  # how the server starts the agent
        self.lane, self.squeeze = lane, squeeze
        self.proc: subprocess.Popen[bytes] | None = None
        self._buf = bytearray()  # read ahead (taken from the front: del is cheap on a bytearray)
        self.outstanding = 0
        self.sent_bytes = 0
        self.batches: collections.deque[tuple[float, int]] = collections.deque()  # (sent, bytes)
        self.last_answer = 0.0
        self.trash: dict[str, object] | None = None  # what the server's trash holds (the agent says)
        self.lane_token = ""  # how the lane joins this agent (its hello says)

    # --- start and stop ------------------------------------------------------------------------
    def open(self) -> None:
        """Start the agent installed on the server (a restricted key runs nothing else)."""
        self.start()
        self.greet()

    def start(self, setup: bytes | None = None) -> str:
        """Start ``command``; with ``setup``, a set-up's command that runs the agent next (see
        :func:`colab_remote._access.setup_then_mirror`): its stdin goes first, and what it printed
        before its reply line, that line included, is returned."""
        self.proc = _proc.open_pipes(self.link.mux(self.command), stderr_path=self.log_path)
        assert self.proc.stdin is not None
        os.set_blocking(self.proc.stdin.fileno(), False)
        self._buf = bytearray()
        self.outstanding = self.sent_bytes = 0
        self.batches.clear()
        if setup is None:
            return ""
        deadline = time.monotonic() + 60
        try:
            self._write(setup, deadline)
            while (found := _REPLY.search(self._buf)) is None:
                self._fill(deadline)  # (the account's shell may print something first)
        except ConnectionLost as e:
            self.close()
            raise MirrorError("setting the server up failed", log_tail=_proc.tail(self.log_path),
                              fix="read the log above; the server's shell start-up files must "
                                  "not print") from e
        said = bytes(self._buf[:found.end()])
        del self._buf[:found.end()]
        return said.decode(errors="replace")

    @property
    def log_path(self) -> Path:
        return Path(self.cfg.run_dir) / "mirror.log"

    def greet(self) -> None:
        """Read the agent's hello."""
        try:
            op, _, _, _, _, data = self._record(time.monotonic() + 30)
            if op == _agent.R_FAIL:  # another mirror writes there (the agent says which)
                self.close()
                raise MirrorError(data.decode(errors="replace"),
                                  fix="stop that mirror first (.stop() in its runtime), or "
                                      "mirror to another folder")
            hello = json.loads(data) if op == _agent.R_HELLO else {}
        except (ConnectionLost, ValueError) as e:
            self.close()
            raise MirrorError("the mirror's agent did not start on the server",
                              log_tail=_proc.tail(self.log_path),
                              fix="run mirror() again with the password: it installs the agent") from e
        if hello.get("protocol") != _agent.VERSION:
            self.close()
            raise MirrorError(f"the agent on the server speaks protocol {hello.get('protocol')!r}, "
                              f"this colab-remote {_agent.VERSION!r}",
                              fix="run mirror() again with the password: it installs this version")
        self.trash = hello.get("trash")
        self.lane_token = str(hello.get("lane", ""))
        log.info("agent on the server: pid %s, keeps the trash %s days", hello.get("pid"),
                 hello.get("keep_days"))

    def close(self) -> None:
        _proc.end_pipes(self.proc, timeout=1)
        self.proc = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # --- records -------------------------------------------------------------------------------
    def _write(self, data: bytes, deadline: float) -> None:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        fd, rfd = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        view = memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectionLost("timed out sending to the server")
            # Answers are read while sending, so an agent blocked on a full stdout (batches are
            # pipelined) can never block us in turn.
            readable, ready, _ = select.select([rfd], [fd], [], min(left, 1.0))
            if readable:
                chunk = os.read(rfd, 65536)
                if not chunk:
                    raise ConnectionLost("the channel to the server closed")
                self._buf += chunk
            if not ready:
                if self.proc.poll() is not None:
                    raise ConnectionLost("the channel to the server closed")
                continue
            try:
                n = os.write(fd, view[:1 << 20])
            except BlockingIOError:
                continue
            except OSError as e:
                raise ConnectionLost(f"the channel to the server closed: {e}") from e
            view = view[n:]

    def _fill(self, deadline: float) -> None:
        """Read what the agent sent next into the buffer."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectionLost("the server did not answer in time")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise ConnectionLost("the channel to the server closed")
            self._buf += chunk
            return

    def _read(self, n: int, deadline: float) -> bytes:
        while len(self._buf) < n:
            self._fill(deadline)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _record(self, deadline: float) -> tuple[bytes, bytes, int, int, int, bytes]:
        """The agent's next record (see :mod:`colab_remote._agent` for the protocol)."""
        op, plen, mode, mtime, offset, dlen = _agent.HEADER.unpack(self._read(_agent.HEADER.size, deadline))
        path = self._read(plen, deadline) if plen else b""
        data = self._read(dlen, deadline) if dlen else b""
        return op, path, mode, mtime, offset, data

    def _send(self, records: list[bytes]) -> None:
        """Send records (compressed where it pays) and an end mark without waiting;
        :meth:`_collect` reads the answers."""
        data = (self.squeeze.pack(b"".join(records)) if records else b"") + _agent.pack(_agent.OP_END)
        self._write(data, time.monotonic() + 30 + len(data) / 2e6)
        self.batches.append((time.monotonic(), len(data)))
        self.outstanding += 1
        self.sent_bytes += len(data)

    def _timed(self, now: float) -> None:
        """A batch was answered: a round trip (a small batch) or a delivery rate (a big one: its
        bytes over the time since the answer before, or since it was sent) for :mod:`.squeeze`."""
        if not self.batches:
            return
        at, nbytes = self.batches.popleft()
        if nbytes <= 16384:
            self.squeeze.note_rtt(now - at)
        elif nbytes >= 256 * 1024 and now > max(at, self.last_answer):
            self.squeeze.note_rate(nbytes / (now - max(at, self.last_answer)))
        self.last_answer = now

    def _collect(self) -> list[list[str]]:
        """Wait for the answer to every batch sent; the errors the agent reported."""
        errors: list[list[str]] = []
        deadline = time.monotonic() + 30 + self.sent_bytes / 2e6
        while self.outstanding:
            op, _, _, _, _, data = self._record(deadline)
            if op != _agent.R_ACK:
                raise ConnectionLost(f"unexpected answer from the server: {op!r}")
            self._timed(time.monotonic())
            answer = json.loads(data)
            errors += answer["errors"]
            self.trash = answer.get("trash") or self.trash
            self.outstanding -= 1
        self.sent_bytes = 0
        return errors

    # --- the interface --------------------------------------------------------------------------
    def _list(self, take: Callable[[bytes, bytes, bool], object]) -> None:
        """The server copy's listing, each R_FOLDER record handed to ``take(folder, entries,
        more)`` as it arrives (the agent lists the next folder meanwhile)."""
        errors = self._collect()  # nothing may be in flight: the listing comes in the same stream
        if errors:
            log.warning("server errors: %s", errors[:5])
        asked = time.monotonic()
        self._write(_agent.pack(_agent.OP_MANIFEST), asked + 30)
        first = True
        while True:
            op, path, _, _, more, data = self._record(time.monotonic() + 300)
            if first:
                self.squeeze.note_rtt(time.monotonic() - asked)
                first = False
            if op == _agent.R_DONE:
                return
            if op != _agent.R_FOLDER:
                raise ConnectionLost(f"unexpected answer from the server: {op!r}")
            take(path, data, bool(more))

    def listing(self) -> dict[str, Entry]:
        found: dict[str, Entry] = {}

        def take(folder: bytes, data: bytes, more: bool) -> None:
            rel = os.fsdecode(folder)
            for name, (mode, mtime, size, target) in _agent.entries(data).items():
                found[join(rel, os.fsdecode(name))] = Entry(mode, size, mtime, target)

        self._list(take)
        return found

    def ping(self) -> None:
        self._send([])  # an empty batch: the agent notes the writer is active and answers
        errors = self._collect()
        if errors:
            log.warning("server errors: %s", errors[:5])

    def count(self, listing: dict[str, Entry] | None) -> int:
        listing = self.listing() if listing is None else listing
        return sum(1 for e in listing.values() if not stat.S_ISDIR(e.mode))

    def send(self, plan: Plan, progress: Progress | None = None) -> Sent:
        """Each stage's records, its big files to the lane; a stage of a repository that follows
        big files of one (of this batch or an earlier one) is sent once those are in place (see
        :class:`Plan`)."""
        sent = Sent()
        before: list[str] = []  # a repository's big files the next stage may name
        for n, stage in enumerate(plan.stages()):
            if n:  # ... and those of earlier batches still on their way (a pack, then its gc's deletes)
                before += [rel for rel in self.lane.in_repositories() if rel not in before]
            if before:
                sent.errors += self._collect()
                self.lane.wait_for(before)
                sent.add(self.place(self.lane.take_finished(before), plan.planner))
            if (extra := plan.catch_up_before(stage)) is not None:
                sent.add(self.send(extra, progress))
            self._send_stage(stage, plan, sent, progress)
            before = [rel for rel in stage.big if git.in_repository(rel)]
        sent.deletes += len(plan.deletes)
        sent.errors += self._collect()
        plan.planner.acknowledged(plan, ok=not sent.errors)
        return sent

    def place(self, done: list[Finished], planner: Planner) -> Sent:
        """Put big files the lane delivered in place: those that have not changed since it opened
        them, and (without noting them as sent) those that only grew, as the prefix they were
        (a log: the rest follows, built on it). One that changed otherwise has its own event."""
        sent = Sent()
        records, placed = [], []
        for f in done:
            try:
                st = os.lstat(os.path.join(planner.root, f.rel))
            except OSError:
                continue  # deleted meanwhile: its event deletes it there (and drops the partial)
            same = identity(st) == f.key and f.size == f.key[0]
            grew = not same and f.key[3].startswith(b"%d:" % st.st_ino) and st.st_size > f.size
            if not same and not grew:
                continue
            records.append(_agent.pack(_agent.OP_PLACE, os.fsencode(f.rel), mode=f.key[2],
                                       mtime_ns=f.key[1], offset=f.size, data=f.digest))
            if same:
                placed.append(f)
        if not records:
            return sent
        self._send(records)
        sent.errors = self._collect()
        failed = {path for path, _ in sent.errors}
        for f in placed:
            if f.rel not in failed:
                planner.placed(f.rel, f.key)
                sent.files += 1
                sent.big += 1
                sent.nbytes += f.size
        return sent

    def _send_stage(self, stage: Stage, plan: Plan, sent: Sent, progress: Progress | None) -> None:
        records: list[bytes] = []
        size = 0
        pack = _agent.pack
        planner, lane = plan.planner, self.lane
        for op, rel, mode, mtime, data in stage.ops:
            sent.ops += 1
            if not lane.idle and lane.busy_at(rel) or op == _agent.OP_DELETE:
                lane.cancel(rel, below=op != _agent.OP_PUT)  # never overtaken by an older big file
            if op == _agent.OP_PUT:
                sent.files += 1
                sent.nbytes += len(data or b"")
            else:
                planner.forget(rel, folder=op == _agent.OP_DELETE)
            records.append(pack(op, os.fsencode(rel), mode=mode, mtime_ns=mtime, data=data or b""))
            size += len(records[-1])
            if size >= BATCH_BYTES or len(records) >= BATCH_OPS:
                self._send(records)  # pipelined: the next files are read meanwhile
                if progress is not None:
                    progress.add(len(records), size)
                records, size = [], 0
                if self.sent_bytes > 64 * BATCH_BYTES:
                    sent.errors += self._collect()
        if records:
            self._send(records)
            if progress is not None:
                progress.add(len(records), size)
        for rel in stage.big:
            if lane.submit(rel, stage.keys[rel]):
                sent.ops += 1  # (counted as pushed once placed)
                if progress is not None:
                    progress.add(1, stage.keys[rel][0])

    def whole_pass(self, push: Push, root: str, flt: _sync.MirrorFilter, progress: Progress | None,
                   *, guard: Guard | None = None, watch: Watch | None = None,
                   changed_since: int | None = None) -> Sent:
        """The listing, compared a folder at a time as it comes (see :mod:`.compare`); then what
        differs, new folders walked and sent as they are read."""
        compare = Compare(root, flt, watch, changed_since)
        self._list(compare.record)
        if guard is not None:
            guard(compare.server_files, compare.count_local)
        log.info("whole-tree pass: %d paths and %d new folders differ from the server's %d entries",
                 len(compare.paths), len(compare.added), compare.server_entries)
        if not compare.paths and not compare.added:
            return Sent()
        if progress is not None:  # new folders are counted as they are sent: no total known
            known = not compare.added
            progress = Progress(progress.reporter, progress.phase,
                                len(compare.paths) if known else 0, compare.nbytes if known else 0)
        return push(compare.paths | compare.added, compare.added, progress)

    def restore(self, root: str, flt: _sync.MirrorFilter, listing: dict[str, Entry] | None,
                progress: Progress) -> None:
        chosen = Selection(root, flt, self.listing() if listing is None else listing)
        chosen.make_folders_and_links(root)
        writer = Writer(root, Progress(progress.reporter, progress.phase, len(chosen.files),
                                       chosen.nbytes))
        self._fetch(chosen.files, writer)
        chosen.set_folder_modes(root)
        if writer.failed:
            raise MirrorError(f"restoring {len(writer.failed)} files failed", log_tail="\n".join(
                f"{rel}: {why}" for rel, why in writer.failed[:15]),
                fix="see the errors above; nothing was deleted on either side")
        log.info("restored %d files (%d bytes), %d folders, %d links; %d kept as they are here",
                 len(chosen.files), chosen.nbytes, len(chosen.folders), len(chosen.links),
                 chosen.kept)

    def _fetch(self, rels: list[str], writer: Writer, window: int = 64) -> None:
        """Read files back from the agent, ``window`` requests in flight."""
        sent = done = 0
        deadline = time.monotonic() + 300
        while done < len(rels):
            while sent < len(rels) and sent - done < window:
                self._write(_agent.pack(_agent.OP_GET, os.fsencode(rels[sent])), deadline)
                sent += 1
            op, path, mode, mtime, offset, data = self._record(deadline)
            rel = os.fsdecode(path)
            deadline = time.monotonic() + 300
            if op == _agent.R_DATA:
                writer.data(rel, mode, mtime, offset, data)
                continue
            if op == _agent.R_DONE:
                writer.end(rel)
            elif op == _agent.R_FAIL:
                writer.fail(rel, data.decode(errors="replace"))
            else:
                raise ConnectionLost(f"unexpected answer from the server: {op!r}")
            done += 1


class ShellChannel(Channel):
    """No agent on the server: rsync for files and folders, a small sh script for deletes."""

    inline = False
    lists = False

    def open(self) -> None:
        """Create the folder and check for rsync with one command."""
        path = shlex.quote(_sync.remote_path(self.link.dest.path))
        done = _proc.run(self.link.mux(f"mkdir -p -- {path} && command -v rsync"), timeout=30,
                         check=False, error=MirrorError)
        if done.returncode == 255:
            raise ConnectionLost(f"the connection broke right after the login: {done.stderr.strip()}")
        if done.returncode != 0:
            raise MirrorError(f"rsync is not installed on {self.link.dest.host}",
                              log_tail=done.stderr,
                              fix="install it on the server: apt-get install rsync (or dnf/apk add rsync)")

    def count(self, listing: dict[str, Entry] | None) -> int:
        path = _sync.remote_path(self.link.dest.path)
        script = (f"cd -- {shlex.quote(path)} 2>/dev/null || {{ echo 0; exit 0; }}; "
                  f"find . -path ./{_sync.TRASH} -prune -o ! -type d -print | wc -l")
        done = _proc.run(self.link.mux(script), timeout=120, check=False, error=MirrorError)
        try:
            return int(done.stdout.split()[-1])
        except (ValueError, IndexError) as e:
            raise ConnectionLost("could not count the server's files") from e

    def _backup_dir(self) -> str | None:
        return f"{_sync.TRASH}/{_stamp()}" if self.cfg.backup else None

    def send(self, plan: Plan, progress: Progress | None = None) -> Sent:
        """Per stage (see :class:`Plan`): its deletes, then its folders, links and files by rsync."""
        sent = Sent()
        for stage in plan.stages():
            ops = list(stage.ops)
            deletes = [rel for op, rel, *_ in ops if op == _agent.OP_DELETE]
            listed = [rel for op, rel, *_ in ops if op in (_agent.OP_MKDIR, _agent.OP_LINK)]
            sent.ops += len(listed) + len(deletes)
            if deletes:
                self._delete(deletes)
            self._rsync(listed + stage.big, plan.planner.root, sent)
        sent.deletes = len(plan.deletes)
        return sent

    def _delete(self, paths: list[str]) -> None:
        script = _sync.remote_delete_script(paths, _stamp(), backup=self.cfg.backup)
        folder = shlex.quote(_sync.remote_path(self.link.dest.path))
        done = _proc.run(self.link.mux(f"cd -- {folder} && exec sh -s"), input=script, timeout=120,
                         check=False, error=MirrorError)
        if done.returncode == 255:
            raise ConnectionLost(done.stderr)

    def _rsync(self, files: list[str], root: str, sent: Sent) -> None:
        if not files:
            return
        argv = _sync.rsync_files_argv(self.cfg.rsync, self.link.rsync_e(), root,
                                      self.link.rsync_dest, backup_dir=self._backup_dir())
        warning = self.link.run_rsync(argv, data=b"".join(os.fsencode(r) + b"\0" for r in files))
        if warning:
            sent.errors.append(["", warning])
        for rel in files:
            try:
                st = os.lstat(os.path.join(root, rel))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                sent.files += 1
                sent.nbytes += st.st_size

    def whole_pass(self, push: Push, root: str, flt: _sync.MirrorFilter, progress: Progress | None,
                   *, guard: Guard | None = None, watch: Watch | None = None,
                   changed_since: int | None = None) -> Sent:
        scanned: list[tuple[int, int, int]] = []

        def scan() -> tuple[int, int, int]:  # (files, entries, bytes) here, once
            if not scanned:
                scanned.append(scan_local(root, flt))
            return scanned[0]

        if guard is not None:
            guard(self.count(None), lambda enough: scan()[0])
        if progress is not None and not progress.estimate[0]:
            _, entries, size = scan()  # rsync's own totals grow while it lists
            progress = Progress(progress.reporter, progress.phase, entries, size)
        argv = _sync.rsync_push_argv(self.cfg.rsync, self.link.rsync_e(), root, self.link.rsync_dest,
                                     filters=flt.rsync_args(), backup_dir=self._backup_dir(),
                                     progress=progress is not None)
        warning = self.link.run_rsync(argv, on_output=progress.rsync_output() if progress else None)
        return Sent(errors=[["", warning]] if warning else [])

    def restore(self, root: str, flt: _sync.MirrorFilter, listing: dict[str, Entry] | None,
                progress: Progress) -> None:
        argv = _sync.rsync_pull_argv(self.cfg.rsync, self.link.rsync_e(), self.link.rsync_dest, root,
                                     filters=flt.rsync_args(), progress=True)
        warning = self.link.run_rsync(argv, on_output=progress.rsync_output())
        if warning:
            raise MirrorError("restoring from the server failed", log_tail=warning,
                              fix="see the log; nothing was deleted on either side")

    def prune(self) -> None:
        minutes = max(1, int(self.cfg.keep_days * 1440))
        path = shlex.quote(f"{_sync.remote_path(self.link.dest.path)}/{_sync.TRASH}")
        _proc.run(self.link.mux(f"[ -d {path} ] && find {path} -mindepth 1 -maxdepth 1 "
                                f"-mmin +{minutes} -exec rm -rf {{}} + ; true"),
                  timeout=300, check=False, error=MirrorError)


def open_channel(link: Link, lane: Lane, squeeze: Squeeze, *, agent: bool, command: str) -> Channel:
    """The channel this mirror's server takes (the set-up found out whether it has python3 and
    how to start the agent there)."""
    channel: Channel = AgentChannel(link, command, lane, squeeze) if agent else ShellChannel(link)
    channel.open()
    return channel
