"""The two ways the mirror reaches its copy on the server, behind one interface.

- :class:`AgentChannel`: the server runs our agent (:mod:`colab_remote._agent`, the only thing a
  restricted key may run); records go both ways over one ssh channel: changed files, new folders
  built whole, big files in checked chunks, the listing for whole-tree passes, files read back.
- :class:`ShellChannel`: the server has no python3 (``restricted=False`` only): deletes as a small
  ``sh`` script, everything else through rsync (no ``--delete``; the trash as ``--backup-dir``).

The worker calls the same methods on either: :meth:`Channel.send`, :meth:`Channel.whole_pass`,
:meth:`Channel.restore`, :meth:`Channel.count`, :meth:`Channel.prune`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
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
from .link import ConnectionLost, Link
from .plan import Entry, Plan, Planner, Stage, changed_paths
from .report import Progress
from .restore import Selection, Writer

log = logging.getLogger("colab_remote.mirror")

BATCH_BYTES = 4 * 1024 * 1024
BATCH_OPS = 500
BIG_CHUNK = 1 << 20  # a big file goes to the agent in records of this size
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


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


Push = Callable[[set[str], Progress | None], Sent]  # the worker's push of a set of paths


class Channel:
    """What the worker needs from the server side (see the module docstring)."""

    inline = True  # small files travel as whole records (the agent), not through rsync

    def __init__(self, link: Link) -> None:
        self.link = link
        self.cfg = link.cfg

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

    def whole_pass(self, push: Push, root: str, flt: _sync.MirrorFilter,
                   listing: dict[str, Entry] | None, progress: Progress | None) -> Sent:
        """Send whatever differs from the server copy, never deleting there."""
        raise NotImplementedError

    def restore(self, root: str, flt: _sync.MirrorFilter, listing: dict[str, Entry] | None,
                progress: Progress) -> None:
        raise NotImplementedError

    def prune(self) -> None:
        """Remove old trash on the server (the agent does it itself)."""

    def ping(self) -> None:
        """Tell the server-side agent the mirror is still there (an idle mirror)."""


def _stamp() -> str:
    t = time.time()
    return time.strftime(_agent.STAMP_FORMAT, time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


class AgentChannel(Channel):
    """Records to and from the agent over one ssh channel (non-blocking I/O with deadlines, so a
    dead link never hangs the mirror)."""

    def __init__(self, link: Link) -> None:
        super().__init__(link)
        self.proc: subprocess.Popen[bytes] | None = None
        self._buf = b""
        self.outstanding = 0
        self.sent_bytes = 0
        self.trash: dict[str, object] | None = None  # what the server's trash holds (the agent says)

    # --- start and stop ------------------------------------------------------------------------
    def open(self) -> None:
        """Start the agent installed on the server (a restricted key runs nothing else)."""
        log_path = Path(self.cfg.run_dir) / "mirror.log"
        self.proc = _proc.open_pipes(self.link.mux(self.cfg.agent_command), stderr_path=log_path)
        assert self.proc.stdin is not None
        os.set_blocking(self.proc.stdin.fileno(), False)
        self._buf = b""
        self.outstanding = self.sent_bytes = 0
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
                              log_tail=_proc.tail(log_path),
                              fix="run mirror() again with the password: it installs the agent") from e
        if hello.get("protocol") != _agent.VERSION:
            self.close()
            raise MirrorError(f"the agent on the server speaks protocol {hello.get('protocol')!r}, "
                              f"this colab-remote {_agent.VERSION!r}",
                              fix="run mirror() again with the password: it installs this version")
        self.trash = hello.get("trash")
        log.info("agent on the server: pid %s, keeps the trash %s days", hello.get("pid"),
                 hello.get("keep_days"))

    def close(self) -> None:
        _proc.end_pipes(self.proc, timeout=1)
        self.proc = None

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

    def _read(self, n: int, deadline: float) -> bytes:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while len(self._buf) < n:
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
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _record(self, deadline: float) -> tuple[bytes, bytes, int, int, int, bytes]:
        """The agent's next record (see :mod:`colab_remote._agent` for the protocol)."""
        op, plen, mode, mtime, offset, dlen = _agent.HEADER.unpack(self._read(_agent.HEADER.size, deadline))
        path = self._read(plen, deadline) if plen else b""
        data = self._read(dlen, deadline) if dlen else b""
        return op, path, mode, mtime, offset, data

    def _send(self, records: list[bytes], *, end: bool = True) -> None:
        """Send records (and an end mark) without waiting; :meth:`_collect` reads the answers."""
        data = b"".join(records) + (_agent.pack(_agent.OP_END) if end else b"")
        self._write(data, time.monotonic() + 30 + len(data) / 2e6)
        self.outstanding += int(end)
        self.sent_bytes += len(data)

    def _collect(self) -> list[list[str]]:
        """Wait for the answer to every batch sent; the errors the agent reported."""
        errors: list[list[str]] = []
        deadline = time.monotonic() + 30 + self.sent_bytes / 2e6
        while self.outstanding:
            op, _, _, _, _, data = self._record(deadline)
            if op != _agent.R_ACK:
                raise ConnectionLost(f"unexpected answer from the server: {op!r}")
            answer = json.loads(data)
            errors += answer["errors"]
            self.trash = answer.get("trash") or self.trash
            self.outstanding -= 1
        self.sent_bytes = 0
        return errors

    # --- the interface --------------------------------------------------------------------------
    def listing(self) -> dict[str, Entry]:
        errors = self._collect()  # nothing may be in flight: the listing comes in the same stream
        if errors:
            log.warning("server errors: %s", errors[:5])
        self._write(_agent.pack(_agent.OP_MANIFEST), time.monotonic() + 30)
        found: dict[str, Entry] = {}
        deadline = time.monotonic() + 300
        while True:
            op, path, mode, mtime, size, data = self._record(deadline)
            if op == _agent.R_DONE:
                return found
            if op != _agent.R_ENTRY:
                raise ConnectionLost(f"unexpected answer from the server: {op!r}")
            found[os.fsdecode(path)] = Entry(mode, size, mtime, data)

    def ping(self) -> None:
        self._send([])  # an empty batch: the agent notes the writer is active and answers
        errors = self._collect()
        if errors:
            log.warning("server errors: %s", errors[:5])

    def count(self, listing: dict[str, Entry] | None) -> int:
        listing = self.listing() if listing is None else listing
        return sum(1 for e in listing.values() if not stat.S_ISDIR(e.mode))

    def send(self, plan: Plan, progress: Progress | None = None) -> Sent:
        """Each stage's records, then its big files, before the next stage (see :class:`Plan`)."""
        sent = Sent()
        for stage in plan.stages():
            self._send_stage(stage, plan.planner, sent, progress)
        sent.deletes = len(plan.deletes)
        sent.errors += self._collect()
        plan.planner.acknowledged(plan, ok=not sent.errors)
        return sent

    def _send_stage(self, stage: Stage, planner: Planner, sent: Sent, progress: Progress | None) -> None:
        records: list[bytes] = []
        size = 0
        pack = _agent.pack
        for op, rel, mode, mtime, data in stage.ops:
            sent.ops += 1
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
            nbytes = self._send_big(rel, planner)
            if nbytes is not None:
                sent.files += 1
                sent.big += 1
                sent.nbytes += nbytes
                if progress is not None:
                    progress.add(1, nbytes)

    def _send_big(self, rel: str, planner: Planner) -> int | None:
        """Stream one big file in chunks (the agent checks the digest before putting the file in
        place); its size, or None when it is gone or no longer a file."""
        try:
            fd = os.open(os.path.join(planner.root, rel), _READ_FLAGS)
        except OSError:
            return None  # gone (or a link now): its event follows
        path = os.fsencode(rel)
        h = hashlib.blake2b(digest_size=_agent.DIGEST_SIZE)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            offset = 0
            while True:
                chunk = os.read(fd, BIG_CHUNK)
                h.update(chunk)
                self._send([_agent.pack(_agent.OP_CHUNK, path, offset=offset, data=chunk)], end=False)
                offset += len(chunk)
                if not chunk:
                    break
        finally:
            os.close(fd)
        self._send([_agent.pack(_agent.OP_COMMIT, path, mode=stat.S_IMODE(st.st_mode),
                                mtime_ns=st.st_mtime_ns, offset=offset, data=h.digest())])
        planner.forget(rel)
        return offset

    def whole_pass(self, push: Push, root: str, flt: _sync.MirrorFilter,
                   listing: dict[str, Entry] | None, progress: Progress | None) -> Sent:
        listing = self.listing() if listing is None else listing
        paths, nbytes = changed_paths(root, flt, listing)
        log.info("whole-tree pass: %d of %d server entries differ", len(paths), len(listing))
        if not paths:
            return Sent()
        if progress is not None:
            progress = Progress(progress.reporter, progress.phase, len(paths), nbytes)
        return push(paths, progress)

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
        log.info("restored %d files (%d bytes), %d folders, %d links", len(chosen.files),
                 chosen.nbytes, len(chosen.folders), len(chosen.links))

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

    def whole_pass(self, push: Push, root: str, flt: _sync.MirrorFilter,
                   listing: dict[str, Entry] | None, progress: Progress | None) -> Sent:
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


def open_channel(link: Link) -> Channel:
    """The channel this mirror's server takes (the set-up found out whether it has python3)."""
    channel: Channel = AgentChannel(link) if link.cfg.agent else ShellChannel(link)
    channel.open()
    return channel
