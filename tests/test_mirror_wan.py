"""The mirror through the WAN relay of the benchmarks (bench/wan.py) with big files (issue 15): a
small edit and a second big file overtake a big file, a big file resumes after its connection is
reset and after its mirror process is killed, a big file deleted while it is sent is no error and
stops being sent, a big file that grows costs what it grew.

Real sshd, ssh and the relay (40 ms round trip, 40 Mbit/s: 5 MB/s), 16 MiB files: each test takes
a few seconds. Bytes are counted at the relay. No timed assertions: what arrives first, and what
crossed the link.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.wan import Profile, WanRelay
from colab_remote import _proc, _sync
from colab_remote.mirror import Mirror, mirror

from .conftest import needs_root, needs_sshd, wait_for
from .test_mirror import converged, dest_of, server_root, trash_files

pytestmark = [needs_root, needs_sshd, pytest.mark.timeout(240)]

LINK = Profile("test", 20, 20, 40, 40)
SIZE = 16 << 20
MiB = 1 << 20


@pytest.fixture
def relay(server) -> Iterator[WanRelay]:
    with WanRelay(server.port, LINK) as r:
        yield r


def start(tmp_path: Path, relay: WanRelay, server, local: Path, **kw) -> Mirror:
    kw.setdefault("password", server.user.password)
    return mirror(local, dest_of(server), port=relay.port, state_dir=tmp_path / "state", quiet=True,
                  **kw)


def big_file(path: Path, seed: int, size: int = SIZE) -> bytes:
    """A file of ``size`` bytes at ``path``, written beside the mirrored folder and renamed into it
    (so the mirror never sees it half-written)."""
    data = hashlib.shake_256(b"%d" % seed).digest(size)
    scratch = path.parent.parent / "scratch"
    scratch.mkdir(exist_ok=True)
    (scratch / path.name).write_bytes(data)
    os.replace(scratch / path.name, path)
    return data


def complete(path: Path, data: bytes) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def partials(server) -> list[str]:
    """What the big-file lane left in the staging folder."""
    folder = server_root(server) / _sync.TRASH / ".staging" / "partial"
    return sorted(os.listdir(folder)) if folder.exists() else []


class Watch:
    """Samples the size of a file on the server: it is never seen half-written."""

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size, self.seen = path, size, set()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.005):
            try:
                self.seen.add(self.path.stat().st_size)
            except OSError:
                pass

    def stop(self) -> set[int]:
        self.done.set()
        self.thread.join(5)
        return self.seen


def test_a_small_edit_and_a_second_big_file_overtake_a_big_file(tmp_path: Path, server,
                                                              relay: WanRelay) -> None:
    """A 1 KiB edit written while a big file crosses the link arrives before that file is
    complete (it waited for the whole file: 33 s at P1 before the lane), and so does a second,
    smaller big file written then (the two take turns)."""
    local = tmp_path / "project"
    local.mkdir()
    (local / "edit.txt").write_text("start")
    srv = server_root(server)
    m = start(tmp_path, relay, server, local)
    try:
        base = relay.up_bytes()
        data = big_file(local / "big.bin", 1)
        wait_for(lambda: relay.up_bytes() - base > 2 * MiB, 60, "the big file to be on the wire")
        (local / "edit.txt").write_text("after the big file started " * 40)
        second = big_file(local / "second.bin", 7, _sync.BIG_FILE)
        wait_for(lambda: (srv / "edit.txt").read_text() != "start", 60, "the edit")
        big_there_at_edit = complete(srv / "big.bin", data)
        wait_for(lambda: complete(srv / "second.bin", second), 60, "the second big file")
        big_there_at_second = complete(srv / "big.bin", data)
        m.flush(120)
        assert not big_there_at_edit, "the edit waited for the big file"
        assert not big_there_at_second, "the second big file waited for the first"
        assert (srv / "big.bin").read_bytes() == data and converged(local, server)
        assert partials(server) == []
    finally:
        m.stop()


def test_a_big_file_resumes_after_its_connection_is_reset(tmp_path: Path, server,
                                                           relay: WanRelay) -> None:
    """Halfway through a big file every connection through the relay is reset: the mirror logs
    in again and sends the rest only (it sent it all again: 1.5x); the server never shows a
    half-written file at its path, and keeps no partial once it is in place."""
    local = tmp_path / "project"
    local.mkdir()
    (local / "a.txt").write_text("a")
    srv = server_root(server)
    m = start(tmp_path, relay, server, local)
    try:
        watch = Watch(srv / "big.bin", SIZE)
        base = relay.up_bytes()
        data = big_file(local / "big.bin", 2)
        wait_for(lambda: relay.up_bytes() - base > SIZE // 2, 60, "half the file to cross")
        assert relay.reset() >= 1
        m.flush(120)
        sent = relay.up_bytes() - base
        assert (srv / "big.bin").read_bytes() == data and converged(local, server)
        assert watch.stop() <= {SIZE}, "a half-written file at its path"
        assert sent <= 1.1 * SIZE, f"{sent / SIZE:.2f} times the file crossed the link"
        assert m.stats["big_files"]["resumed_bytes"] >= SIZE // 3
        assert partials(server) == []
    finally:
        m.stop()


def test_a_killed_mirror_resumes_its_big_file_after_a_rerun(tmp_path: Path, server,
                                                            relay: WanRelay) -> None:
    """The mirror process SIGKILLed halfway through a big file, mirror() run again (a new
    kernel): the new process sends the rest of it, from the partial the server kept."""
    local = tmp_path / "project"
    local.mkdir()
    (local / "a.txt").write_text("a")
    srv = server_root(server)
    m = start(tmp_path, relay, server, local)
    base = relay.up_bytes()
    data = big_file(local / "big.bin", 3)
    wait_for(lambda: relay.up_bytes() - base > SIZE // 2, 60, "half the file to cross")
    assert m.pid is not None
    os.kill(m.pid, signal.SIGKILL)  # our own test's process, by pid
    wait_for(lambda: m.pid is None or not _proc.pid_alive(m.pid), 10, "the mirror process to go")
    again = start(tmp_path, relay, server, local, password=None)  # its key still works
    try:
        again.flush(120)
        sent = relay.up_bytes() - base
        assert (srv / "big.bin").read_bytes() == data and converged(local, server)
        # the file's bytes at most 1.1 times, and the re-run's login and listing (a few KiB)
        assert sent <= 1.1 * SIZE + 256 * 1024, f"{sent / SIZE:.2f} times the file crossed the link"
        assert partials(server) == []
    finally:
        again.stop()


def test_a_big_file_deleted_while_it_is_sent_is_no_error(tmp_path: Path, server,
                                                         relay: WanRelay) -> None:
    """A new version of a big file, deleted while it crosses the link: flush() raises nothing,
    the server copy is in the trash, and the rest of the deleted file is not sent (it was, all
    of it, before the lane)."""
    local = tmp_path / "project"
    local.mkdir()
    old = big_file(local / "big.bin", 4)
    srv = server_root(server)
    m = start(tmp_path, relay, server, local)
    try:
        m.flush(120)
        assert (srv / "big.bin").read_bytes() == old
        base = relay.up_bytes()
        big_file(local / "big.bin", 5)
        wait_for(lambda: relay.up_bytes() - base > 2 * MiB, 60, "the new version to be on the wire")
        (local / "big.bin").unlink()
        m.flush(120)
        sent = relay.up_bytes() - base
        assert not (srv / "big.bin").exists() and converged(local, server)
        assert old in trash_files(server).get("big.bin", []), "the server copy is not in the trash"
        assert not m.stats["last_error"], m.stats["last_error"]
        assert sent < SIZE // 2, f"{sent / SIZE:.2f} of the deleted file crossed the link"
        assert partials(server) == []
    finally:
        m.stop()


def test_a_big_file_that_grows_costs_what_it_grew(tmp_path: Path, server, relay: WanRelay) -> None:
    """A big file on the server grows by 1 MiB here (a log, a checkpoint written in pieces): about
    1 MiB crosses the link (the server's copy checked by its digest and built on), not the file."""
    local = tmp_path / "project"
    local.mkdir()
    data = big_file(local / "log.bin", 6)
    srv = server_root(server)
    m = start(tmp_path, relay, server, local)
    try:
        m.flush(120)
        more = os.urandom(MiB)
        base = relay.up_bytes()
        with open(local / "log.bin", "ab") as f:
            f.write(more)
        m.flush(120)
        sent = relay.up_bytes() - base
        assert (srv / "log.bin").read_bytes() == data + more and converged(local, server)
        assert sent < 1.25 * MiB, f"{sent / MiB:.2f} MiB crossed the link for 1 MiB"
        assert data in trash_files(server).get("log.bin", [])  # the version it replaced, kept
        assert partials(server) == []
    finally:
        m.stop()
