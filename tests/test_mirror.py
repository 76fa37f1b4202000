"""mirror() and push() against a real sshd on 127.0.0.1 with a throwaway user (no mocks)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from colab_remote import _net, _proc, _sync
from colab_remote.errors import AuthenticationError, MirrorError
from colab_remote.mirror import Mirror, find_mirrors, mirror, push, stop_mirrors

from .conftest import needs_root, needs_sshd, wait_for

pytestmark = [needs_root, needs_sshd, pytest.mark.timeout(180)]

TRASH = _sync.TRASH


def dest_of(server) -> str:
    return f"{server.user.name}@127.0.0.1:backup/project"


def server_root(server) -> Path:
    return server.user.home / "backup" / "project"


def start(tmp_path: Path, server, local: Path, **kw) -> Mirror:
    kw.setdefault("password", server.user.password)
    kw.setdefault("quiet", True)
    return mirror(local, dest_of(server), port=server.port, state_dir=tmp_path / "state", **kw)


def tree(root: Path, *, skip_trash: bool = True) -> dict[str, str]:
    """rel path -> content hash ('link:target' for symlinks, 'dir' for folders), filtered."""
    flt = _sync.MirrorFilter(str(root))
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        rel = "" if rel == "." else rel
        keep = []
        for d in dirs:
            r = f"{rel}/{d}" if rel else d
            if (skip_trash and d == TRASH and not rel) or flt.excluded(r):
                continue
            p = os.path.join(folder, d)
            if os.path.islink(p):
                out[r] = "link:" + os.readlink(p)
            else:
                out[r] = "dir"
                keep.append(d)
        dirs[:] = keep
        for f in files:
            r = f"{rel}/{f}" if rel else f
            if flt.excluded(r):
                continue
            p = os.path.join(folder, f)
            if os.path.islink(p):
                out[r] = "link:" + os.readlink(p)
            else:
                out[r] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def trash_files(server) -> dict[str, list[bytes]]:
    """rel path inside its timestamp folder -> every version of it in the server's trash.

    (A rewrite can be seen half-way: truncated, then written. Each push keeps what it replaced.)
    """
    found: dict[str, list[bytes]] = {}
    top = server_root(server) / TRASH
    if not top.exists():
        return found
    for stamp in top.iterdir():
        for folder, _, files in os.walk(stamp):
            for f in files:
                p = Path(folder, f)
                found.setdefault(str(p.relative_to(stamp)), []).append(
                    p.read_bytes() if not p.is_symlink() else b"")
    return found


def _owner(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def converged(local: Path, server) -> bool:
    a, b = tree(local), tree(server_root(server))
    assert a == b, ("local ^ server:", sorted(set(a.items()) ^ set(b.items()))[:20])
    return True


# --- pure -------------------------------------------------------------------------------------










# --- real server ------------------------------------------------------------------------------


def test_create_edit_delete_rename_nested_symlinks_trash(tmp_path: Path, server) -> None:
    local = tmp_path / "project"
    (local / "src" / "pkg").mkdir(parents=True)
    (local / "src" / "pkg" / "a.py").write_text("print('a')\n")
    (local / "old.txt").write_text("old version\n")
    (local / "gone.txt").write_text("to be deleted\n")
    (local / "src" / "__pycache__").mkdir()
    (local / "src" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0pyc")
    m = start(tmp_path, server, local)
    try:
        assert m.alive and m.state == "up"
        assert converged(local, server)
        assert not (server_root(server) / "src" / "__pycache__").exists()  # default exclude

        # create, nested, spaces and non-ASCII names, symlinks
        (local / "deep" / "er" / "est").mkdir(parents=True)
        (local / "deep" / "er" / "est" / "file with spaces.txt").write_text("spaces\n")
        (local / "日本語 ファイル.md").write_text("こんにちは\n")
        (local / "link-to-a").symlink_to("src/pkg/a.py")
        (local / "dirlink").symlink_to("src")
        # edit (old version must land in the trash) and delete
        (local / "old.txt").write_text("new version\n")
        (local / "gone.txt").unlink()
        m.flush(30)
        assert converged(local, server)
        srv = server_root(server)
        assert os.readlink(srv / "link-to-a") == "src/pkg/a.py"
        assert os.readlink(srv / "dirlink") == "src"
        trash = trash_files(server)
        assert b"to be deleted\n" in trash["gone.txt"]
        assert b"old version\n" in trash["old.txt"]

        # renames: a file and a whole folder
        (local / "src" / "pkg" / "a.py").rename(local / "src" / "pkg" / "b.py")
        (local / "deep").rename(local / "deeper")
        m.flush(30)
        assert converged(local, server)
        assert not (srv / "deep").exists() and not (srv / "src" / "pkg" / "a.py").exists()
        assert "deep/er/est/file with spaces.txt" in trash_files(server)

        # the same size, rewritten within the same second: still sent
        f = local / "same.txt"
        f.write_text("AAAA")
        m.flush(30)
        st = f.stat()
        f.write_text("BBBB")
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the very same mtime
        m.flush(30)
        assert (srv / "same.txt").read_text() == "BBBB"

        # a folder replaced by a file of the same name, and back
        (local / "flip").mkdir()
        (local / "flip" / "x").write_text("x")
        m.flush(30)
        import shutil
        shutil.rmtree(local / "flip")
        (local / "flip").write_text("now a file")
        m.flush(30)
        assert converged(local, server)
        # no temporary names left behind on the server
        assert not [p for p in srv.rglob(f"*{_sync.TMP_INFIX}*")]
        stats = m.stats
        assert stats["pushes"] >= 5 and stats["files"] >= 5 and stats["pending"] == 0
        assert "Mirror" in repr(m) and "<table" in m._repr_html_()
        info = m.run_dir / "status.json"
        assert stat.S_IMODE(info.stat().st_mode) == 0o600
    finally:
        m.stop()
    assert not m.alive
    m.stop()  # idempotent


def test_big_file_and_git_internals(tmp_path: Path, server) -> None:
    local = tmp_path / "project"
    local.mkdir()
    (local / "README.md").write_text("hello\n")
    m = start(tmp_path, server, local)
    try:
        env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@e", GIT_COMMITTER_NAME="t",
                   GIT_COMMITTER_EMAIL="t@e", HOME=str(tmp_path))
        git = ["git", "-C", str(local)]
        subprocess.run([*git, "init", "-q"], check=True, env=env)
        for i in range(3):
            (local / f"f{i}.py").write_text(f"x = {i}\n")
            subprocess.run([*git, "add", "-A"], check=True, env=env)
            subprocess.run([*git, "commit", "-q", "-m", f"c{i}"], check=True, env=env)
        with open(local / "big.bin", "wb") as f:
            for _ in range(100):
                f.write(os.urandom(1 << 20))
        m.flush(120)
        assert converged(local, server)
        srv = server_root(server)
        # the server copy is a working repository
        out = subprocess.run(["git", "-c", f"safe.directory={srv}", "-C", str(srv), "log", "--oneline"],
                             capture_output=True, text=True, env=env)
        assert out.returncode == 0 and len(out.stdout.splitlines()) == 3, out.stderr
        fsck = subprocess.run(["git", "-c", f"safe.directory={srv}", "-C", str(srv), "fsck", "--strict"],
                              capture_output=True, text=True, env=env)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        assert (srv / "big.bin").stat().st_size == 100 << 20
    finally:
        m.stop()


def test_a_repository_whose_pack_is_a_big_file(tmp_path: Path, server) -> None:
    """A ``git gc`` packs a 10 MiB blob: the pack travels in the big-file lane, and the names
    written after it (its index, packed refs) are sent only once it is in place; the server copy
    passes ``git fsck`` (issue 15: the lane keeps git's order)."""
    local = tmp_path / "project"
    local.mkdir()
    m = start(tmp_path, server, local)
    try:
        env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@e", GIT_COMMITTER_NAME="t",
                   GIT_COMMITTER_EMAIL="t@e", HOME=str(tmp_path))
        git = ["git", "-C", str(local)]
        subprocess.run([*git, "init", "-q"], check=True, env=env)
        (local / "weights.bin").write_bytes(os.urandom(10 << 20))
        (local / "a.py").write_text("a = 1\n")
        subprocess.run([*git, "add", "-A"], check=True, env=env)
        subprocess.run([*git, "commit", "-q", "-m", "big"], check=True, env=env)
        subprocess.run([*git, "gc", "-q", "--prune=now"], check=True, env=env)
        m.flush(120)
        assert converged(local, server)
        srv = server_root(server)
        packs = list((srv / ".git" / "objects" / "pack").glob("*.pack"))
        assert packs and max(p.stat().st_size for p in packs) >= _sync.BIG_FILE
        fsck = subprocess.run(["git", "-c", f"safe.directory={srv}", "-C", str(srv), "fsck", "--strict"],
                              capture_output=True, text=True, env=env)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    finally:
        m.stop()


def test_server_down_mid_edits_then_back(tmp_path: Path, server) -> None:
    local = tmp_path / "project"
    local.mkdir()
    (local / "a.txt").write_text("a0")
    m = start(tmp_path, server, local)
    try:
        server.stop()
        for i in range(20):
            (local / f"n{i}.txt").write_text(f"written while the server was down {i}")
        (local / "a.txt").write_text("a1")
        (local / "sub").mkdir()
        (local / "sub" / "x.txt").write_text("x")
        wait_for(lambda: m.stats.get("state") == "reconnecting", 20, "the mirror notices the outage")
        with pytest.raises(MirrorError):
            m.flush(1)
        assert m.stats["pending"] > 0
        time.sleep(2)
        (local / "n0.txt").unlink()  # a delete while away
        server.start()
        m.flush(60)
        assert converged(local, server)
        assert m.stats["reconnects"] >= 1 and m.alive
    finally:
        m.stop()


def test_empty_local_is_refused_and_restore_resumes(tmp_path: Path, server) -> None:
    import pwd
    # a server copy from an earlier runtime
    first = tmp_path / "old-runtime"
    (first / "src").mkdir(parents=True)
    for i in range(6):
        (first / "src" / f"m{i}.py").write_text(f"v = {i}\n")
    (first / "lib").mkdir()
    (first / "lib" / "x.py").write_text("x")
    m = start(tmp_path, server, first)
    m.stop()
    before = tree(server_root(server))
    assert len([v for v in before.values() if v != "dir"]) == 7

    fresh = tmp_path / "new-runtime"
    fresh.mkdir()
    with pytest.raises(MirrorError, match="restore=True"):
        start(tmp_path, server, fresh)
    # a missing folder is now refused before anything runs, whatever the server holds (issue 12)
    with pytest.raises(ValueError, match="not-there does not exist.*restore=True"):
        start(tmp_path, server, tmp_path / "not-there")
    few = tmp_path / "few"
    few.mkdir()
    (few / "one.py").write_text("1")
    with pytest.raises(MirrorError, match="fewer than half"):
        start(tmp_path, server, few)
    assert tree(server_root(server)) == before  # server copy intact

    # restore: keeps a newer runtime file, deletes nothing, owner is the runtime user
    (fresh / "src").mkdir()
    newer = fresh / "src" / "m0.py"
    newer.write_text("edited in the runtime\n")
    os.utime(newer, (time.time() + 60, time.time() + 60))
    (fresh / "local-only.txt").write_text("keep me")
    (fresh / "lib").write_text("a file here where the server has a folder")  # the one here wins
    m = start(tmp_path, server, fresh, restore=True)
    try:
        assert (fresh / "src" / "m3.py").read_text() == "v = 3\n"
        assert (fresh / "lib").read_text() == "a file here where the server has a folder"
        assert newer.read_text() == "edited in the runtime\n"
        assert (fresh / "local-only.txt").exists()
        me = pwd.getpwuid(os.getuid()).pw_name
        assert {pwd.getpwuid(p.stat().st_uid).pw_name for p in fresh.rglob("*")} == {me}
        m.flush(30)
        assert converged(fresh, server)
        assert b"v = 0\n" in trash_files(server)["src/m0.py"]  # the server's version kept
    finally:
        m.stop()


def test_seeded_random_operations_converge(tmp_path: Path, server) -> None:
    rng = random.Random(20260426)
    local = tmp_path / "project"
    local.mkdir()
    (local / "seed.txt").write_text("seed")
    m = start(tmp_path, server, local)
    names = ["a", "b", "c d", "é", "日本", "x.py", ".hidden"]

    def any_path(kind: str) -> Path | None:
        items = [p for p in local.rglob("*") if (p.is_dir() if kind == "dir" else p.is_file())
                 and not p.is_symlink()]
        return rng.choice(items) if items else None

    try:
        for step in range(300):
            r = rng.random()
            folder = any_path("dir") if rng.random() < 0.6 else local
            folder = folder or local
            target = folder / f"{rng.choice(names)}{rng.randrange(5)}"
            try:
                if r < 0.35:
                    target.write_bytes(os.urandom(rng.randrange(0, 3000)))
                elif r < 0.5:
                    target.mkdir()
                elif r < 0.65:
                    f = any_path("file")
                    if f:
                        f.write_bytes(os.urandom(rng.randrange(0, 200)))
                elif r < 0.75:
                    f = any_path("file")
                    if f:
                        f.unlink()
                elif r < 0.85:
                    f = any_path(rng.choice(["file", "dir"]))
                    if f and f != local and not target.exists() and local not in target.parents[:0]:
                        if f not in target.parents:
                            f.rename(target)
                elif r < 0.9:
                    d = any_path("dir")
                    if d:
                        import shutil
                        shutil.rmtree(d)
                else:
                    if not target.exists() and not target.is_symlink():
                        target.symlink_to(rng.choice(["seed.txt", "nowhere", "../x"]))
            except OSError:
                pass
            if step % 50 == 0:
                time.sleep(rng.random() * 0.05)
        m.flush(60)
        local_tree, server_tree = tree(local), tree(server_root(server))
        assert len(local_tree) > 20
        assert local_tree == server_tree, (
            sorted(set(local_tree.items()) ^ set(server_tree.items()))[:20])
    finally:
        m.stop()


def test_flush_sends_what_no_event_reported(tmp_path: Path, server) -> None:
    """Issue 13, item 3: flush() returns once the server holds the folder as it was, not once the
    events it heard of are pushed. A write through a shared mapping (numpy's memmap, say) reports
    no inotify event while the file stays open; flush's verification finds it."""
    import mmap

    local = tmp_path / "project"
    local.mkdir()
    (local / "weights.bin").write_bytes(b"0" * 65536)
    with start(tmp_path, server, local) as m:
        m.flush(30)
        fd = os.open(local / "weights.bin", os.O_RDWR)
        try:
            with mmap.mmap(fd, 65536) as mapped:
                time.sleep(0.02)  # a later mtime
                mapped[:8] = b"trained!"
                mapped.flush()
                m.flush(30)  # the file is still open: no event at all so far
                assert (server_root(server) / "weights.bin").read_bytes()[:8] == b"trained!"
                assert m.stats["verify_fixed"] >= 1 and m.stats["verified"]
        finally:
            os.close(fd)


def test_a_server_that_refuses_changes_says_so_until_it_takes_them(tmp_path: Path, server) -> None:
    """Issue 13, item 3: a mirror that cannot deliver is not 'up', flush() raises with the reason,
    and once the server takes the changes again the state and last_error say so too."""
    local = tmp_path / "project"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "a.txt").write_text("a")
    with start(tmp_path, server, local) as m:
        folder = server_root(server) / "sub"
        os.chown(folder, 0, 0)  # the server's user may no longer write there (our test's folder)
        try:
            (local / "sub" / "b.txt").write_text("b")
            with pytest.raises(MirrorError, match="refused") as info:
                m.flush(30)
            assert "Permission" in str(info.value)
            assert m.state == "refused" and "Permission" in str(m.stats["last_error"])
        finally:
            os.chown(folder, server.user.uid, server.user.gid)
        m.flush(30)
        assert (folder / "b.txt").read_text() == "b"
        assert m.state == "up" and m.stats["last_error"] is None


def test_found_and_stopped_from_a_fresh_process(tmp_path: Path, server) -> None:
    local = tmp_path / "project"
    local.mkdir()
    (local / "a.txt").write_text("a")
    m = start(tmp_path, server, local)
    info = (m.run_dir / "status.json").read_text()
    master = json.loads(info)["master_pid"]
    assert _proc.pid_alive(master)
    # what a restarted kernel does
    code = ("import sys; from colab_remote.mirror import find_mirrors, stop_mirrors\n"
            "ms = [x for x in find_mirrors(sys.argv[1]) if x.alive]\n"
            "print(len(ms), ms[0].stats['state'])\n"
            "print(stop_mirrors(sys.argv[1]))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "state")], capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.split() == ["1", "up", "1"], out.stderr
    assert not m.alive and not _proc.pid_alive(master)

    def server_side() -> list[int]:  # the agent and its sshd session, run as the server's user
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and _owner(p) == server.user.uid]

    wait_for(lambda: not server_side(), 10, "the server-side agent to exit")
    assert [x.state for x in find_mirrors(tmp_path / "state")] == ["stopped"]
    assert stop_mirrors(tmp_path / "state") == 0


def test_a_killed_worker_leaves_no_master_after_a_rerun(tmp_path: Path, server) -> None:
    """Issue 13, item 6: SIGKILL the mirror process; its ssh ControlMaster (a session of its own)
    outlives it; mirror() run again for the same pair stops that master, and the new mirror works."""
    local = tmp_path / "project"
    local.mkdir()
    (local / "a.txt").write_text("a")
    m = start(tmp_path, server, local)
    info = json.loads((m.run_dir / "status.json").read_text())
    worker, master = info["pid"], info["master_pid"]
    os.kill(worker, signal.SIGKILL)  # our own test's process, by pid
    wait_for(lambda: not _proc.pid_alive(worker), 10, "the killed mirror process to go")
    assert _proc.pid_alive(master)  # what the issue saw: the master stays behind
    again = start(tmp_path, server, local, password=None)  # the same runtime: its key still works
    try:
        wait_for(lambda: not _proc.pid_alive(master), 10, "the old ControlMaster to stop")
        assert again.alive and again.pid != worker
        (local / "b.txt").write_text("b")
        again.flush(30)
        assert converged(local, server)
    finally:
        again.stop()
    assert not _proc.pid_alive(json.loads((again.run_dir / "status.json").read_text())["master_pid"])


def test_a_file_rewritten_while_no_mirror_ran_is_sent_though_size_and_time_match(
        tmp_path: Path, server) -> None:
    """A file rewritten while its mirror was killed (then while it was stopped), to the same size
    and with its old modification time put back, is sent by the next mirror: its ctime is after
    the time up to which the last mirror had everything on the server (the soak's worker-kill
    found it stale after flush())."""
    local = tmp_path / "project"
    local.mkdir()
    for name in ("a.bin", "b.bin", "same.bin"):
        (local / name).write_bytes(b"1" * 3000)
    m = start(tmp_path, server, local)
    (local / "c.txt").write_text("c")  # an edit: an idle mirror marks what the server holds
    m.flush(30)
    time.sleep(2.5)  # the mark (within a second) and its margin: files changed after it go again
    same = (server_root(server) / "same.bin").stat().st_ino

    def rewrite(name: str, byte: bytes) -> None:
        path = local / name
        st = path.stat()
        path.write_bytes(byte * st.st_size)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    info = json.loads((m.run_dir / "status.json").read_text())
    os.kill(info["pid"], signal.SIGKILL)  # our own test's process, by pid
    wait_for(lambda: not _proc.pid_alive(info["pid"]), 10, "the killed mirror process to go")
    rewrite("a.bin", b"2")
    again = start(tmp_path, server, local, password=None)
    try:
        again.flush(30)
        assert (server_root(server) / "a.bin").read_bytes() == b"2" * 3000
        assert converged(local, server)
    finally:
        again.stop()
    rewrite("b.bin", b"3")
    third = start(tmp_path, server, local, password=None)
    try:
        third.flush(30)
        assert (server_root(server) / "b.bin").read_bytes() == b"3" * 3000
        assert converged(local, server)
        assert (server_root(server) / "same.bin").stat().st_ino == same  # not sent again
        assert stat.S_IMODE((third.run_dir / "synced").stat().st_mode) == 0o600
    finally:
        third.stop()


def _agent_pid(server) -> int | None:
    """The server-side agent of the mirror (run as the server's throwaway user)."""
    for p in os.listdir("/proc"):
        if p.isdigit() and _owner(p) == server.user.uid:
            with contextlib.suppress(OSError):
                if b"--forced\0mirror" in Path(f"/proc/{p}/cmdline").read_bytes():
                    return int(p)
    return None


def test_a_repository_cut_off_anywhere_is_one_git_can_read(tmp_path: Path, server) -> None:
    """Issue 13, item 4: while commits, branches, pack-refs and gc run here, the server's agent is
    frozen at random moments (now and then killed): each time the server copy as it is passes
    ``git fsck`` (objects before the index, reflogs and refs that name them; loose objects deleted
    only after their pack is there)."""
    local = tmp_path / "project"
    local.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@x", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path)}

    def git(*args: str, where: Path = local) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-c", "safe.directory=*", "-C", str(where), *args], env=env,
                              capture_output=True, text=True, timeout=120)

    git("init", "-q", "-b", "main")
    rng = random.Random(13)
    (local / "readme.txt").write_text("start\n")
    git("add", "-A")
    git("commit", "-q", "-m", "start")
    copy = server_root(server)
    cuts: list[str] = []
    broken: list[str] = []
    done = threading.Event()

    def cut() -> None:
        when = random.Random(4)
        while not done.is_set():
            time.sleep(when.uniform(0.005, 0.05))
            pid = _agent_pid(server)
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)  # our own test's process, by pid
                try:
                    check = git("fsck", "--cache", "--no-dangling", "--no-progress", where=copy)
                    cuts.append("kill" if len(cuts) % 6 == 5 else "stop")
                    if check.returncode != 0:
                        broken.append(check.stdout + check.stderr)
                finally:
                    os.kill(pid, signal.SIGKILL if cuts and cuts[-1] == "kill" else signal.SIGCONT)

    with start(tmp_path, server, local) as m:
        cutter = threading.Thread(target=cut, daemon=True)
        cutter.start()
        try:
            for i in range(400):  # until there were enough cuts
                if i >= 60 and len(cuts) >= 30:
                    break
                for j in range(3):
                    (local / f"d{i % 7}").mkdir(exist_ok=True)
                    (local / f"d{i % 7}" / f"f{j}.bin").write_bytes(os.urandom(rng.randrange(1, 200_000)))
                (local / "readme.txt").write_text(f"step {i}\n")
                git("add", "-A")
                assert git("commit", "-q", "-m", f"step {i}").returncode == 0
                if i % 10 == 3:
                    git("branch", f"b{i}")
                    git("pack-refs", "--all")
                if i % 20 == 9:
                    assert git("gc", "-q", "--prune=now").returncode == 0
        finally:
            done.set()
            cutter.join(30)
        m.flush(60)
        assert tree(local) == tree(copy)
    assert git("fsck", "--cache", "--no-dangling", "--no-progress", where=copy).returncode == 0
    assert len(cuts) >= 30, cuts
    assert not broken, f"{len(broken)} of {len(cuts)} cuts left a broken repository: {broken[:3]}"


def test_wrong_password_and_rerun_replaces(tmp_path: Path, server) -> None:
    local = tmp_path / "project"
    local.mkdir()
    (local / "a.txt").write_text("a")
    with pytest.raises(AuthenticationError):
        start(tmp_path, server, local, password="wrong-password")
    m1 = start(tmp_path, server, local)
    m2 = start(tmp_path, server, local)  # a re-run cell: the first one is replaced
    try:
        assert not m1.alive and m2.alive
        assert len([x for x in find_mirrors(tmp_path / "state") if x.alive]) == 1
    finally:
        m2.stop()


def test_without_python_on_the_server_every_push_is_rsync(tmp_path: Path, server,
                                                           monkeypatch) -> None:
    monkeypatch.setenv("COLAB_REMOTE_MIRROR_AGENT", "0")
    local = tmp_path / "project"
    (local / "d").mkdir(parents=True)
    (local / "d" / "a.txt").write_text("a")
    (local / "b.txt").write_text("b")
    m = start(tmp_path, server, local, exclude=["*.log"])
    try:
        (local / "d" / "new.txt").write_text("new")
        (local / "b.txt").write_text("B")
        (local / "skip.log").write_text("not mirrored")
        (local / "d" / "a.txt").unlink()
        (local / "ln").symlink_to("b.txt")
        m.flush(30)
        assert not (server_root(server) / "skip.log").exists()
        (local / "skip.log").unlink()
        assert converged(local, server)
        trash = trash_files(server)
        assert b"a" in trash["d/a.txt"] and b"b" in trash["b.txt"]
    finally:
        m.stop()


def test_push_copies_into_a_runtime_and_runs_setup(tmp_path: Path, make_user, capfd) -> None:
    from colab_remote import start_sshd

    runtime_user = make_user()
    port = _net.free_port()
    sshd = start_sshd(port, user=runtime_user.name, password=runtime_user.password,
                      state_dir=tmp_path / "runtime-state", listen_address="127.0.0.1", quiet=True)
    try:
        project = tmp_path / "laptop-project"
        (project / "pkg").mkdir(parents=True)
        (project / "pkg" / "m.py").write_text("X = 1\n")
        (project / "requirements.txt").write_text("nothing\n")
        (project / "pkg" / "__pycache__").mkdir()
        (project / "pkg" / "__pycache__" / "m.pyc").write_bytes(b"junk")
        target = runtime_user.home / "content" / "project"
        rc = push(project, f"{runtime_user.name}@127.0.0.1:content/project", port=port,
                  password=runtime_user.password, state_dir=tmp_path / "server-state",
                  setup="echo setting up; ls pkg; cat requirements.txt | wc -l")
        assert rc == 0
        out = capfd.readouterr().out
        assert "setting up" in out and "m.py" in out
        assert (target / "pkg" / "m.py").read_text() == "X = 1\n"
        assert not (target / "pkg" / "__pycache__").exists()
        with pytest.raises(MirrorError, match="exit 3"):
            push(project, f"{runtime_user.name}@127.0.0.1:content/project", port=port,
                 password=runtime_user.password, state_dir=tmp_path / "server-state",
                 setup="echo failing; exit 3")
        # the CLI, password on stdin
        cli = subprocess.run([sys.executable, "-m", "colab_remote", "push", str(project),
                              f"{runtime_user.name}@127.0.0.1:content/p2", "--port", str(port),
                              "--password-stdin", "--state-dir", str(tmp_path / "server-state"),
                              "--setup", "pwd"], input=runtime_user.password + "\n",
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout.strip().splitlines()[-1].endswith("content/p2")
        # the runtime's fingerprint as start_sshd printed it: checked strictly, a wrong one refused
        fresh_state = tmp_path / "another-server-state"
        rc = push(project, f"{runtime_user.name}@127.0.0.1:content/p3", port=port,
                  password=runtime_user.password, state_dir=fresh_state,
                  host_key=sshd.fingerprints["ED25519"])
        assert rc == 0 and (target.parent / "p3" / "pkg" / "m.py").exists()
        with pytest.raises(MirrorError, match="does not match"):
            push(project, f"{runtime_user.name}@127.0.0.1:content/p4", port=port,
                 password=runtime_user.password, state_dir=fresh_state,
                 host_key="SHA256:" + "A" * 43)
        assert not (target.parent / "p4").exists()
    finally:
        sshd.stop()


def test_old_trash_pruned_and_password_kept_secret(tmp_path: Path, server) -> None:
    srv = server_root(server)
    old, recent = srv / TRASH / "2020-01-01T00-00-00.000000Z", srv / TRASH / "2099-01-01T00-00-00.000000Z"
    for d in (old, recent):
        d.mkdir(parents=True)
        (d / "f.txt").write_text("trash")
    for p in [srv.parent, srv, srv / TRASH, old, recent, old / "f.txt", recent / "f.txt"]:
        os.chown(p, server.user.uid, server.user.gid)
    local = tmp_path / "project"
    local.mkdir()
    m = start(tmp_path, server, local, keep_days=3)
    try:
        assert not old.exists() and recent.exists()
        assert "connected to" in m.logs()
        secret = server.user.password.encode()
        for pid in [m.pid, *_proc.children(m.pid)]:
            for name in ("cmdline", "environ"):
                with open(f"/proc/{pid}/{name}", "rb") as f:
                    assert secret not in f.read()
        for f in (tmp_path / "state").rglob("*"):
            if f.is_file():
                assert secret not in f.read_bytes(), f
    finally:
        m.stop()




def test_files_changing_while_sent_and_bursts(tmp_path: Path, server, client_key) -> None:
    ssh_dir = server.user.home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(Path(str(client_key) + ".pub").read_text())
    for p in (ssh_dir, ssh_dir / "authorized_keys"):
        os.chown(p, server.user.uid, server.user.gid)
    local = tmp_path / "project"
    local.mkdir()
    m = start(tmp_path, server, local, password=None, identity_file=client_key)  # key login
    try:
        import threading

        def grow(path: Path, chunks: int, size: int) -> None:
            with open(path, "wb") as f:
                for _ in range(chunks):
                    f.write(os.urandom(size))
                    f.flush()
                    time.sleep(0.01)

        writers = [threading.Thread(target=grow, args=(local / "small-growing.bin", 40, 64 << 10)),
                   threading.Thread(target=grow, args=(local / "big-growing.bin", 40, 512 << 10))]
        for w in writers:
            w.start()
        # a burst: 600 files in 6 new folders (more than a push of single files)
        for i in range(6):
            d = local / f"burst{i}"
            d.mkdir()
            for j in range(100):
                (d / f"f{j}.txt").write_text(f"{i}-{j}")
        for w in writers:
            w.join()
        m.flush(60)
        assert converged(local, server)
        assert m.stats["full_passes"] >= 2  # the first push, and the pass that ends the burst
    finally:
        m.stop()


def test_cli_mirror_runs_in_the_foreground(tmp_path: Path, server) -> None:
    import signal
    local = tmp_path / "project"
    local.mkdir()
    (local / "a.txt").write_text("a")
    proc = subprocess.Popen([sys.executable, "-m", "colab_remote", "mirror", str(local), dest_of(server),
                             "--port", str(server.port), "--password-stdin",
                             "--state-dir", str(tmp_path / "state"), "--exclude", "*.tmp"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        assert proc.stdin is not None
        proc.stdin.write(server.user.password + "\n")
        proc.stdin.close()
        wait_for(lambda: (server_root(server) / "a.txt").exists(), 30, "the first push")
        (local / "b.txt").write_text("b")
        (local / "c.tmp").write_text("excluded")
        wait_for(lambda: (server_root(server) / "b.txt").exists(), 30, "b.txt on the server")
        assert not (server_root(server) / "c.tmp").exists()
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        assert proc.stdout is not None
        out = proc.stdout.read()
        assert proc.returncode == 0, out
        assert "mirroring" in out and server.user.password not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_new_folder_of_many_files_with_a_server_folder_in_the_way(tmp_path: Path, server) -> None:
    srv = server_root(server)
    (srv / "newdir" / "f5").mkdir(parents=True)
    (srv / "newdir" / "f5" / "inner.txt").write_text("only on the server")
    (srv / "clash").mkdir()
    (srv / "clash" / "old.txt").write_text("a server folder where the runtime has a file")
    for p in srv.parent.rglob("*"):
        os.chown(p, server.user.uid, server.user.gid)
    local = tmp_path / "project"
    local.mkdir()
    for i in range(3):
        (local / f"keep{i}.txt").write_text("k")
    (local / "clash").write_text("a file")
    m = start(tmp_path, server, local)
    try:
        m.flush(30)  # the first push could not replace the folder with the file; the agent can
        assert (srv / "clash").read_text() == "a file"
        assert b"a server folder where the runtime has a file" in trash_files(server)["clash/old.txt"]
        stage = tmp_path / "stage"
        stage.mkdir()
        for i in range(300):  # a burst: the agent moves the server folder in the way to the trash
            (stage / f"f{i}").write_text(f"file {i}")
        stage.rename(local / "newdir")
        m.flush(60)
        assert converged(local, server)
        assert b"only on the server" in trash_files(server)["newdir/f5/inner.txt"]
    finally:
        m.stop()


# --- progress bars ------------------------------------------------------------------------------


def test_first_sync_and_push_show_a_progress_bar(tmp_path: Path, server, capsys,
                                                 monkeypatch) -> None:
    # a bar appears only for a sync still running after PROGRESS_AFTER; this machine is fast
    monkeypatch.setattr(importlib.import_module("colab_remote._progress"), "PROGRESS_AFTER", 0.0)
    local = tmp_path / "project"
    for d in range(20):
        (local / f"d{d}").mkdir(parents=True)
        for i in range(100):
            (local / f"d{d}" / f"f{i}.txt").write_bytes(os.urandom(1000))
    (local / "weights.bin").write_bytes(os.urandom(4 << 20))
    m = start(tmp_path, server, local, quiet=False)
    m.stop()
    err = capsys.readouterr().err
    # the entries sent: 20 folders, 2,001 files (counted as they go: new folders are sent as
    # they are read, with no walk to count them first)
    assert "first push: 100%|" in err and " 2,021 files" in err, err[-2000:]

    fresh = tmp_path / "new-runtime"
    m = start(tmp_path, server, fresh, restore=True, quiet=False)
    m.stop()
    err = capsys.readouterr().err
    # after a whole restore the first push has nothing to send (the agent compares listings)
    assert "restoring: 100%|" in err and "2,001/2,001 files" in err, err[-2000:]
    assert converged(fresh, server)

    again = tmp_path / "quiet-runtime"
    m = start(tmp_path, server, again, restore=True, quiet=True)
    m.stop()
    assert "%|" not in capsys.readouterr().err

    push(local, f"{server.user.name}@127.0.0.1:backup/pushed", port=server.port,
         password=server.user.password, state_dir=tmp_path / "state")
    err = capsys.readouterr().err
    assert "copying: 100%|" in err, err[-2000:]


def test_non_utf8_names_reach_the_server(tmp_path: Path, server) -> None:
    """watchfiles cannot name such a file (its notify thread reports an error): the mirror keeps
    watching, and the whole-tree pass that follows sends it; other changes keep flowing."""
    local = tmp_path / "project"
    local.mkdir()
    (local / "a.txt").write_text("a")
    with start(tmp_path, server, local) as m:
        odd = os.fsencode(local) + b"/caf\xe9.txt"
        with open(odd, "wb") as f:
            f.write(b"latin-1 name")
        (local / "b.txt").write_text("b")
        wait_for(lambda: (server_root(server) / "b.txt").exists(), 20, "b.txt on the server")
        wait_for(lambda: os.path.exists(os.fsencode(server_root(server)) + b"/caf\xe9.txt"), 20,
                 "the latin-1 name on the server")
        (local / "c.txt").write_text("c")
        m.flush(30)
        assert (server_root(server) / "c.txt").read_text() == "c"
        assert m.alive


def test_agent_killed_while_it_builds_new_folders(tmp_path: Path, server) -> None:
    """The server-side agent dies mid-burst (its new folders half built in the staging folder):
    the mirror logs in again, a whole-tree pass sends everything, nothing half-built is visible."""
    local = tmp_path / "project"
    local.mkdir()
    (local / "a.txt").write_text("a")
    with start(tmp_path, server, local) as m:

        pid = _agent_pid(server)
        assert pid is not None
        blob = os.urandom(2048)
        for i in range(40):
            d = local / f"new{i:02d}" / "sub"
            d.mkdir(parents=True)
            for j in range(50):
                (d / f"f{j}.bin").write_bytes(blob)
            if i == 10:
                os.kill(pid, signal.SIGKILL)  # our own test's process, by pid
        m.flush(60)
        assert converged(local, server)
        assert m.stats["reconnects"] >= 1 and m.alive
        visible = [p for p in server_root(server).rglob("*") if TRASH not in p.parts]
        assert not [p for p in visible if _sync.TMP_INFIX in p.name]


@pytest.mark.parametrize("watcher", ["doorbell", "watchfiles"])
def test_a_burst_is_read_from_inotify_directly_then_watchfiles_again(tmp_path: Path, server, watcher,
                                                                     monkeypatch) -> None:
    """A big batch switches the mirror to reading inotify in batches (with watchfiles' notify,
    the fallback when the doorbell cannot watch every folder, its thread is closed meanwhile);
    renames, moves in and out, deletes and rewrites in that window all arrive, and watchfiles
    takes over again once it is quiet. On a tmpfs: a burst fast enough to switch."""
    if watcher == "watchfiles":
        monkeypatch.setenv("COLAB_REMOTE_MIRROR_WATCHFILES", "1")
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("no /dev/shm here")
    fast = Path(tempfile.mkdtemp(prefix="colab-remote-test-", dir="/dev/shm"))
    try:
        local = fast / "project"
        local.mkdir()
        (local / "keep.txt").write_text("keep")
        (fast / "outside" / "tree" / "sub").mkdir(parents=True)
        (fast / "outside" / "tree" / "sub" / "in.txt").write_text("moved in")
        with start(tmp_path, server, local) as m:
            for i in range(12):
                d = local / f"b{i}"
                d.mkdir()
                for j in range(100):
                    (d / f"f{j}.txt").write_text(f"{i}-{j}")
            (local / "b1").rename(local / "b1-renamed")
            (local / "b1-renamed" / "late.txt").write_text("after the rename")
            (local / "b2" / "f0.txt").unlink()
            (local / "b3" / "f1.txt").write_text("3-X")  # same size, same second
            os.rename(fast / "outside" / "tree", local / "tree")
            (local / "tree" / "sub" / "more.txt").write_text("more")
            (local / "b4").rename(fast / "b4-out")
            (local / "b5" / "deep" / "er").mkdir(parents=True)
            (local / "b5" / "deep" / "er" / "x.txt").write_text("x")
            m.flush(60)
            assert converged(local, server)
            if watcher == "watchfiles":  # (the doorbell's watches come later: fewer events)
                assert "a burst: reading inotify" in m.logs(200)
                wait_for(lambda: "watchfiles again" in m.logs(200), 10, "watchfiles to watch again")
            (local / "b6" / "f2.txt").write_text("edited once it is calm")
            wait_for(lambda: (server_root(server) / "b6" / "f2.txt").read_text()
                     == "edited once it is calm", 10, "an edit after the burst on the server")
            m.flush(30)
            assert converged(local, server)
    finally:
        shutil.rmtree(fast, ignore_errors=True)
