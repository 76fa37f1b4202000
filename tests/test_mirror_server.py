"""The mirror's server side under real sshd (issue 13): deletes that stay deleted, the trash within
its budget on a small disk, no temporary files after a failed write, one writer per destination.

The disk cases mount a small tmpfs as the server destination (root only; unmounted in a finally).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from colab_remote import _sync

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
