"""The mirror's start-up and its link: one walk of the folder, no watch on reads, a server that
comes back is noticed at once, a silently dead link is noticed (issue 15, part B).

Real sshd, real ssh, the relay of the benchmarks (bench/wan.py) between them; small sizes. Timings
are the benchmark's business (bench/bench_wan.py): these tests only check what happens.
"""

from __future__ import annotations

import collections
import ctypes
import json
import os
import select
import struct
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.wan import Profile, WanRelay
from colab_remote import _agent
from colab_remote._mirror.report import SyncMark
from colab_remote.errors import AuthenticationError
from colab_remote.mirror import Mirror, mirror

from .conftest import needs_root, needs_sshd, wait_for

pytestmark = [needs_root, needs_sshd, pytest.mark.timeout(180)]

IN_OPEN, IN_ISDIR = 0x20, 0x40000000
FAST = Profile("test", 5, 5, None, None)  # the relay without a cap: only its cut matters here


def dest_of(server) -> str:
    return f"{server.user.name}@127.0.0.1:backup/project"


def server_root(server) -> Path:
    return server.user.home / "backup" / "project"


def start(tmp_path: Path, server, local: Path, port: int | None = None, **kw) -> Mirror:
    kw.setdefault("password", server.user.password)
    return mirror(local, dest_of(server), port=port or server.port, state_dir=tmp_path / "state",
                  quiet=True, **kw)


def make_tree(root: Path, folders: int = 5, files: int = 20) -> None:
    for d in range(folders):
        (root / f"d{d}").mkdir(parents=True)
        for i in range(files):
            (root / f"d{d}" / f"f{i}.txt").write_text(f"{d}/{i}\n")


class Opens:
    """Who opens what under ``root`` (inotify IN_OPEN on the top and on each of its folders)."""

    def __init__(self, root: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(0o4000)  # IN_NONBLOCK
        self.names: dict[int, str] = {}
        for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
            wd = self.libc.inotify_add_watch(self.fd, os.fsencode(folder), IN_OPEN)
            assert wd >= 0, ctypes.get_errno()
            self.names[wd] = "" if folder == root else folder.name
        self.counts: collections.Counter[str] = collections.Counter()

    def read(self) -> collections.Counter[str]:
        """Opens since the last read: "folder/" for a folder, "folder/name" for a file."""
        counts: collections.Counter[str] = collections.Counter()
        while select.select([self.fd], [], [], 0)[0]:
            buf = os.read(self.fd, 1 << 16)
            off = 0
            while off < len(buf):
                wd, mask, _, size = struct.unpack_from("iIII", buf, off)
                name = buf[off + 16:off + 16 + size].rstrip(b"\0").decode()
                off += 16 + size
                where = self.names.get(wd, "?")
                if mask & IN_ISDIR:
                    if name:  # a folder opened, seen from its parent
                        counts[f"{name}/"] += 1
                elif name:
                    counts[f"{where}/{name}" if where else name] += 1
        return counts

    def close(self) -> None:
        os.close(self.fd)


def inotify_masks(pid: int) -> list[int]:
    """The mask of every inotify watch process ``pid`` holds (from /proc/PID/fdinfo)."""
    masks = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        masks += [int(word[5:], 16) for line in info.splitlines() if line.startswith("inotify wd:")
                  for word in line.split() if word.startswith("mask:")]
    return masks


def test_the_start_walks_the_folder_once_and_reads_each_file_once(tmp_path: Path, server) -> None:
    """A fresh start lists each folder once and reads each file once before mirror() returns (it
    walked the tree five times: a count, watchfiles' walk, the doorbell's, the comparison, the
    plan); a restart over the same server copy lists each folder once and reads no file."""
    local = tmp_path / "project"
    make_tree(local)
    # a restart re-sends what changed less than SyncMark.MARGIN before the mark its predecessor
    # left (the kernel's coarser clock): the tree must be older than that for "reads no file"
    time.sleep(SyncMark.MARGIN / 1e9 + 0.1)
    opens = Opens(local)
    m: Mirror | None = None
    try:
        m = start(tmp_path, server, local)
        first = opens.read()
        folders = {k: v for k, v in first.items() if k.endswith("/")}
        files = {k: v for k, v in first.items() if not k.endswith("/")}
        assert folders == {f"d{d}/": 1 for d in range(5)}, folders
        assert files == {f"d{d}/f{i}.txt": 1 for d in range(5) for i in range(20)}, files
        m.flush(30)
        m.stop()
        opens.read()
        m = start(tmp_path, server, local)
        again = opens.read()
        assert {k: v for k, v in again.items() if k.endswith("/")} == {f"d{d}/": 1 for d in range(5)}
        assert not [k for k in again if not k.endswith("/")], again  # nothing read: all the same
        # and the watch on the folder asks for changes only: reading a file wakes nobody
        assert m.pid is not None
        masks = inotify_masks(m.pid)
        assert masks and not [hex(mask) for mask in masks if mask & IN_OPEN], [hex(x) for x in masks]
        (local / "d3" / "new.txt").write_text("new")
        wait_for(lambda: (server_root(server) / "d3" / "new.txt").exists(), 20, "new.txt on the server")
    finally:
        opens.close()
        if m is not None:
            m.stop()


@pytest.fixture
def relay(server) -> Iterator[WanRelay]:
    with WanRelay(server.port, FAST) as r:
        yield r


def test_the_servers_return_is_noticed_after_a_cut(tmp_path: Path, server, relay) -> None:
    """The link cut and every connection reset: the mirror probes the server's port until it
    answers (a probe always on its way, none of the back-off that waited up to 5 s) and delivers
    what changed meanwhile. (How soon: bench_wan.py's linkreturn figure.)"""
    local = tmp_path / "project"
    make_tree(local, 2, 5)
    m = start(tmp_path, server, local, port=relay.port)
    try:
        relay.cut()
        relay.reset()  # the connections die at once; new ones get nothing while it is cut
        wait_for(lambda: m.status().get("state") == "reconnecting", 20, "the mirror reconnecting")
        (local / "d1" / "during.txt").write_text("written while the server was away")
        time.sleep(1.5)  # a few probes go unanswered
        relay.restore()
        wait_for(lambda: (server_root(server) / "d1" / "during.txt").exists(), 30,
                 "during.txt on the server after the link returned")
        assert m.stats["reconnects"] >= 1
        assert m.status().get("state") == "up"
    finally:
        relay.restore()
        m.stop()


def test_a_silent_drop_is_noticed(tmp_path: Path, server, relay) -> None:
    """Packets vanish, every connection stays open, nothing changes here: the mirror leaves the
    state 'up' (ssh's keepalives end the master after 12 s; the idle mirror looks every second;
    before, an idle mirror noticed at its next keepalive batch, 2 minutes later), and once the
    link is back the edit made meanwhile arrives."""
    local = tmp_path / "project"
    make_tree(local, 2, 5)
    m = start(tmp_path, server, local, port=relay.port)
    try:
        assert m.status().get("state") == "up"
        relay.cut()
        t0 = time.monotonic()
        wait_for(lambda: m.status().get("state") != "up", 40, "the mirror to notice the dead link")
        noticed = time.monotonic() - t0
        (local / "d0" / "after.txt").write_text("after the drop")
        relay.restore()
        wait_for(lambda: (server_root(server) / "d0" / "after.txt").exists(), 30,
                 "after.txt on the server once the link is back")
        print(f"silent drop noticed after {noticed:.1f} s")
    finally:
        relay.restore()
        m.stop()


def allow_key(server, client_key: Path) -> None:
    """The account's own key on the server: ``mirror(identity_file=...)`` (no restrictions)."""
    ssh_dir = server.user.home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(Path(str(client_key) + ".pub").read_text())
    for p in (ssh_dir, ssh_dir / "authorized_keys"):
        os.chown(p, server.user.uid, server.user.gid)


def test_a_restart_runs_the_installed_agent_without_a_set_up(tmp_path: Path, server,
                                                               client_key: Path) -> None:
    """Without restrictions the set-up (install the agent, check the destination) ran at every
    start, one command on the server before the agent's own: now once per server and version. A
    restart, and a mirror to a new folder of the same server, start the installed agent at once;
    an agent gone from the server is set up again. The first login is started before the mirror
    process's imports (boot.py); a key the server refuses still says so."""
    local = tmp_path / "project"
    make_tree(local, 2, 5)
    with pytest.raises(AuthenticationError, match="refused the login"):
        start(tmp_path, server, local, password=None, identity_file=client_key)
    allow_key(server, client_key)

    def set_ups(m: Mirror) -> int:
        return (m.run_dir / "mirror.log").read_text().count("set up mirror on")

    m = start(tmp_path, server, local, password=None, identity_file=client_key)
    assert json.loads((m.run_dir / "config.json").read_text())["early_login"][0].endswith("ssh")
    m.flush(30)
    m.stop()
    # the set-up's command ran the agent next (one command on the server); it left nothing in /tmp
    # and installed the agent compiled, its sha in the zip's comment
    text = (m.run_dir / "mirror.log").read_text()
    assert "no agent of this version on the server" in text and "its agent runs next" in text
    assert set_ups(m) == 1 and text.count("agent on the server: pid") == 1, text
    assert not [p for p in Path("/tmp").glob("tmp*.pyz") if p.lstat().st_uid == server.user.uid]
    installed, = (server.user.home / ".colab-remote").glob("agent-*.pyz")
    with zipfile.ZipFile(installed) as z:
        assert "colab_remote_agent/serve.pyc" in z.namelist()
        assert z.comment.split()[1].decode() == _agent.bundle()[1]
    # a new runtime (its own state folder) starts the agent another runtime's set-up installed
    fresh = mirror(local, dest_of(server), port=server.port, identity_file=client_key,
                   state_dir=tmp_path / "new-runtime", quiet=True)
    try:
        fresh.flush(30)
        assert set_ups(fresh) == 0 and "did not start" not in fresh.logs(40), fresh.logs(40)
    finally:
        fresh.stop()
    assert set_ups(m) == 1
    (local / "d0" / "again.txt").write_text("after a restart")
    m = start(tmp_path, server, local, password=None, identity_file=client_key)
    try:
        wait_for(lambda: (server_root(server) / "d0" / "again.txt").exists(), 20, "again.txt")
        assert set_ups(m) == 1, m.logs(40)  # no second set-up
    finally:
        m.stop()
    other = mirror(local, f"{server.user.name}@127.0.0.1:backup/other", port=server.port,
                   identity_file=client_key, state_dir=tmp_path / "state", quiet=True)
    try:
        other.flush(30)
        assert (server.user.home / "backup" / "other" / "d1" / "f4.txt").read_text() == "1/4\n"
        assert set_ups(other) == 0, other.logs(40)
    finally:
        other.stop()
    for installed in (server.user.home / ".colab-remote").glob("agent-*.pyz"):
        installed.unlink()
    (local / "d1" / "gone.txt").write_text("after the agent went")
    m = start(tmp_path, server, local, password=None, identity_file=client_key)
    try:
        wait_for(lambda: (server_root(server) / "d1" / "gone.txt").exists(), 20, "gone.txt")
        text = (m.run_dir / "mirror.log").read_text()
        assert "the agent on record did not start" in text and set_ups(m) == 2, m.logs(40)
    finally:
        m.stop()
