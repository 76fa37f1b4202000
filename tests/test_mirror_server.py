"""The mirror's server side under real sshd (issue 13): deletes that stay deleted, the trash within
its budget on a small disk, no temporary files after a failed write, one writer per destination.

The disk cases mount a small tmpfs as the server destination (root only; unmounted in a finally).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from colab_remote import _agent, _sync
from colab_remote.errors import MirrorError
from colab_remote.mirror import Mirror, mirror

from .conftest import needs_root, needs_sshd
from .test_mirror import converged, server_root, start, tree

pytestmark = [needs_root, needs_sshd, pytest.mark.timeout(240)]

TRASH = _sync.TRASH


def test_a_folder_deleted_right_after_it_was_made_never_comes_back(tmp_path: Path, server) -> None:
    """`mkdir -p C/s1/s2 && echo x > C/s1/s2/f && echo y > C/keep && rm -r C/s1`, ten times: the
    server copy never holds C/s1 (it came back in 4 runs of 5), nor does a restore from it."""
    local = tmp_path / "project"
    local.mkdir()
    (local / "a.txt").write_text("a")
    srv = server_root(server)
    m = start(tmp_path, server, local)
    try:
        for i in range(10):
            subprocess.run(["sh", "-c", f"mkdir -p C{i}/s1/s2 && echo x > C{i}/s1/s2/f && "
                                        f"echo y > C{i}/keep && rm -r C{i}/s1"],
                           cwd=local, check=True, timeout=10)
            m.flush(30)
            assert sorted(p.name for p in (srv / f"C{i}").iterdir()) == ["keep"], f"run {i}"
        assert converged(local, server)
    finally:
        m.stop()
    fresh = tmp_path / "fresh-runtime"
    m = start(tmp_path, server, fresh, restore=True)
    try:
        assert not list(fresh.glob("C*/s1")) and tree(fresh) == tree(local)
    finally:
        m.stop()


def test_files_deleted_while_rsync_sends_them_are_no_server_error(tmp_path: Path, server,
                                                                   monkeypatch) -> None:
    """A server without python3 (rsync only): files deleted in the runtime during a burst were
    logged as ``server errors: rsync exit 23 ... link_stat ... No such file or directory`` and
    made flush() say the server refused changes (issue 13, item 9)."""
    import random
    import threading
    import time

    monkeypatch.setenv("COLAB_REMOTE_MIRROR_AGENT", "0")
    local = tmp_path / "project"
    local.mkdir()
    (local / "a.txt").write_text("a")
    m = start(tmp_path, server, local, restricted=False)
    stop = threading.Event()

    def churn() -> None:  # short-lived files: many are gone by the time rsync reads its list
        rng = random.Random(13)
        n = 0
        while not stop.is_set():
            batch = []
            for _ in range(rng.randrange(5, 40)):
                p = local / f"tmp{n}.txt"
                n += 1
                p.write_text("short-lived " * 20)
                batch.append(p)
            time.sleep(rng.random() * 0.03)
            for p in batch:
                p.unlink()

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        time.sleep(4)
        stop.set()
        writer.join()
        (local / "last.txt").write_text("after the churn")
        m.flush(60)
        assert converged(local, server)
        log = m.logs(2000)
        assert "link_stat" not in log and "rsync exit 23" not in log, log[-2000:]
        assert not m.stats["last_error"], m.stats["last_error"]
    finally:
        stop.set()
        m.stop()


# --- a small disk as the server destination ---------------------------------------------------


@contextlib.contextmanager
def small_disk(server, megabytes: int) -> Iterator[Path]:
    """A tmpfs of ``megabytes`` mounted in the server account's home (its own, 0700), unmounted
    afterwards whatever happens."""
    where = server.user.home / "disk"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m,uid={server.user.uid},"
                    f"gid={server.user.gid},mode=0700", "tmpfs", str(where)], check=True, timeout=30)
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def on_disk(server, local: Path, tmp_path: Path, **kw) -> Mirror:
    kw.setdefault("password", server.user.password)
    return mirror(local, f"{server.user.name}@127.0.0.1:disk/project", port=server.port,
                  state_dir=tmp_path / "state", quiet=True, **kw)


def trash_bytes(root: Path) -> int:
    """What the trash takes on the disk (the staging folder, the lock and the cache not counted)."""
    top = root / TRASH
    if not top.exists():
        return 0
    return sum(p.lstat().st_blocks * 512 for stamp in top.iterdir() if not stamp.name.startswith(".")
               for p in [stamp, *stamp.rglob("*")])


def budget(root: Path, share: float, max_gb: float) -> int:
    """The most the trash may hold on this disk now (what the agent allows itself)."""
    st = os.statvfs(root)
    return min(int(max_gb * 1e9), int(share * (st.f_bavail * st.f_frsize + trash_bytes(root))))


def test_overwriting_a_file_on_a_small_disk_the_last_version_arrives(tmp_path: Path, server) -> None:
    """A 4 MB file overwritten 25 times onto a 40 MB disk: every version arrives (the last one
    never did: the trash filled the disk) and the trash stays within its budget (issue 13, item 2).
    Then with the trash allowed the whole disk: the writes that find it full prune the trash and
    go through, for small files and for big ones (chunks)."""
    local = tmp_path / "project"
    local.mkdir()
    with small_disk(server, 40) as disk:
        root = disk / "project"
        m = on_disk(server, local, tmp_path)
        try:
            for i in range(25):
                data = os.urandom(4 << 20)
                (local / "weights.bin").write_bytes(data)
                m.flush(60)
                assert (root / "weights.bin").read_bytes() == data, f"version {i}"
                held, allowed = trash_bytes(root), budget(root, _agent.TRASH_SHARE, _agent.TRASH_MAX_GB)
                assert held <= allowed, (i, held, allowed)
            trash = m.stats["trash"]
            assert trash["versions"] >= 1 and trash["bytes"] <= trash["limit"]
            assert trash["pruned"]["versions"] >= 15 and trash["pruned"]["reasons"]["space"] >= 15
            assert "pruned" in m._repr_html_() and "disk space low" in m._repr_html_()
        finally:
            m.stop()
        m = on_disk(server, local, tmp_path, trash_share=1.0)  # the trash may take it all
        try:
            for i in range(12):
                (local / "weights.bin").write_bytes(os.urandom(4 << 20))
                (local / "big.bin").write_bytes(os.urandom(10 << 20))  # chunks (>= BIG_FILE)
                m.flush(60)
                assert converged_at(local, root), f"round {i}"
            assert m.stats["trash"]["pruned"]["reasons"].get("full", 0) >= 1
            assert not m.stats["last_error"], m.stats["last_error"]
        finally:
            m.stop()
        assert not list(root.rglob(f"*{_sync.TMP_INFIX}*"))


def converged_at(local: Path, root: Path) -> bool:
    a, b = tree(local), tree(root)
    assert a == b, ("local ^ server:", sorted(set(a.items()) ^ set(b.items()))[:20])
    return True


def test_writes_that_fail_on_a_full_disk_leave_no_temporary_files(tmp_path: Path, server) -> None:
    """The server's disk is full of live files (no trash to prune): the writes that fail leave no
    ``.NAME.colab-remote-tmp.PID`` behind while the agent lives on (there were thousands), and
    flush() says the server refused them (issue 13, item 5)."""
    local = tmp_path / "project"
    (local / "d").mkdir(parents=True)
    (local / "d" / "keep.txt").write_text("keep")
    with small_disk(server, 24) as disk:
        root = disk / "project"
        m = on_disk(server, local, tmp_path)
        try:
            whole = tmp_path / "fill.bin"  # moved in whole: one version only, never a partial one
            whole.write_bytes(os.urandom(16 << 20))
            whole.rename(local / "fill.bin")
            m.flush(60)
            for i in range(12):
                (local / "d" / f"f{i}.bin").write_bytes(os.urandom(1 << 20))
            (local / "d" / "keep.txt").write_text("a new version that may not fit " * 100_000)
            with pytest.raises(MirrorError):
                m.flush(10)
            assert m.alive and (root / "d").is_dir()
            left = [p for p in root.rglob("*") if _sync.TMP_INFIX in p.name and TRASH not in p.parts]
            assert not left, left
            assert m.stats["last_error"] and "No space left" in m.stats["last_error"]
        finally:
            m.stop(flush=False)


# --- one writer per destination ---------------------------------------------------------------


def test_one_destination_spelled_three_ways_is_one_mirror_and_a_second_runtime_is_refused(
        tmp_path: Path, server) -> None:
    """``proj``, ``~/proj`` and ``proj/`` ran as three workers writing the same folder (every change
    pushed three times); now they are one mirror. Another runtime mirroring into that folder is
    refused, its error naming the mirror that writes there (issue 13, item 7)."""
    from colab_remote import _access
    from colab_remote.mirror import find_mirrors

    local = tmp_path / "project"
    local.mkdir()
    (local / "a.txt").write_text("a")
    state = tmp_path / "state"
    handles = []
    try:
        for spelling in ("backup/project", "~/backup/project", "backup/project/"):
            handles.append(mirror(local, f"{server.user.name}@127.0.0.1:{spelling}", port=server.port,
                                  password=server.user.password, state_dir=state, quiet=True))
        running = [m for m in find_mirrors(state) if m.alive]
        assert len(running) == 1 and running[0].destination == f"{server.user.name}@127.0.0.1:backup/project"
        keys = (server.user.home / ".ssh" / "authorized_keys").read_text()
        assert keys.count("colab-remote:") == 1 and ".mirror-" in keys, keys
        srv = server_root(server)
        stamps = set((srv / TRASH).glob("20*")) if (srv / TRASH).exists() else set()
        (local / "a.txt").write_text("edited once")
        running[0].flush(30)
        assert len(set((srv / TRASH).glob("20*")) - stamps) == 1  # pushed once, not three times

        other = tmp_path / "other-runtime"
        other.mkdir()
        (other / "b.txt").write_text("b")
        with pytest.raises(MirrorError) as refused:
            mirror(other, f"{server.user.name}@127.0.0.1:backup/project", port=server.port,
                   password=server.user.password, state_dir=tmp_path / "other-state", quiet=True)
        text = str(refused.value)
        assert "another mirror writes to" in text and str(srv) in text, text
        assert f"runtime {_access.runtime_id(state)}" in text and "since" in text, text
        assert not (srv / "b.txt").exists()
        assert running[0].alive
        (local / "a.txt").write_text("still mirrored")
        running[0].flush(30)
        assert (srv / "a.txt").read_text() == "still mirrored"
    finally:
        for m in handles:
            m.stop()


def test_a_folder_read_only_on_the_server_is_deleted_all_the_same(tmp_path: Path, server) -> None:
    """A folder without write permission on the server cannot be moved into the trash as it is (its
    '..' changes): it stayed there for good after its delete failed once (issue 13's soak, read-only
    faults). The agent moves it with its own mode; a delete inside a read-only folder is refused
    and reported, as before."""
    local = tmp_path / "project"
    (local / "ro" / "inner").mkdir(parents=True)
    (local / "ro" / "f.txt").write_text("f")
    (local / "locked").mkdir()
    (local / "locked" / "g.txt").write_text("g")
    srv = server_root(server)
    m = start(tmp_path, server, local)
    try:
        (srv / "ro").chmod(0o555)        # read-only on the server (its owner may not write there)
        (srv / "ro" / "inner").chmod(0o500)
        (srv / "locked").chmod(0o555)
        subprocess.run(["rm", "-r", str(local / "ro")], check=True)
        (local / "locked" / "g.txt").unlink()
        with pytest.raises(MirrorError, match="refused"):
            m.flush(30)
        assert not (srv / "ro").exists() and (srv / "locked" / "g.txt").exists()
        # (its inner folder may have gone in a batch of its own, into a trash folder of its own)
        (moved,) = [p for p in (srv / TRASH).glob("20*/ro") if (p / "f.txt").exists()]
        assert oct(moved.stat().st_mode & 0o777) == oct(0o555) and (moved / "f.txt").read_text() == "f"
    finally:
        (srv / "locked").chmod(0o755)
        m.stop(flush=False)


def test_a_delete_the_server_refused_is_tried_again(tmp_path: Path, server) -> None:
    """A file deleted here inside a folder that is read-only on the server: the delete is refused
    (flush() says so); once the folder is writable again it must still happen (it stayed on the
    server for good, and later flush() calls said all was well)."""
    from .conftest import wait_for

    local = tmp_path / "project"
    (local / "locked").mkdir(parents=True)
    (local / "locked" / "g.txt").write_text("g")
    srv = server_root(server)
    m = start(tmp_path, server, local)
    try:
        (srv / "locked").chmod(0o555)
        (local / "locked" / "g.txt").unlink()
        with pytest.raises(MirrorError, match="refused"):
            m.flush(30)
        (srv / "locked").chmod(0o755)
        wait_for(lambda: not (srv / "locked" / "g.txt").exists(), 45, "the delete tried again")
    finally:
        (srv / "locked").chmod(0o755)
        m.stop(flush=False)
