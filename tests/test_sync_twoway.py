"""colab_remote.sync(): a laptop folder and a runtime folder kept the same both ways, for real.

The runtime's sshd, a server, the tunnel between them and an unprivileged laptop user whose only
way in is the ssh alias (see tests/sync_helpers.py); the sync runs as that user.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import time

import pytest

from colab_remote import _proc

from .conftest import needs_root, needs_sshd, wait_for
from .sync_helpers import environment, trash_of, tree, wait_state

pytestmark = [needs_root, needs_sshd, pytest.mark.timeout(240)]


@pytest.fixture
def env(make_user, as_nobody):
    with environment(make_user, as_nobody) as found:
        yield found


def test_edits_both_ways(env) -> None:
    env.local_write("src/main.py", "print('laptop')\n")
    env.local_write("README.md", "hello\n")
    env.local_write(".venv/lib/x.py", "skipped\n")
    env.local_write(".gitignore", "*.log\n")
    env.local_write("run.log", "ignored by .gitignore\n")
    env.remote_write("outputs/old.txt", "from an earlier run\n")
    s = env.start_sync()
    assert s.alive, s.logs(30)
    s.flush(30)
    assert (env.remote_dir / "src" / "main.py").read_text() == "print('laptop')\n"
    assert (env.local / "outputs" / "old.txt").read_text() == "from an earlier run\n"
    assert not (env.remote_dir / ".venv").exists() and not (env.remote_dir / "run.log").exists()
    assert s.plan is not None and s.plan["push"] == 4 and s.plan["pull"] == 2, s.plan  # files and folders

    env.local_write("src/main.py", "print('edited')\n")
    wait_for(lambda: (env.remote_dir / "src/main.py").read_text() == "print('edited')\n", 10, "the edit")
    env.remote_write("outputs/ckpt.txt", "epoch 1\n")
    env.remote_write("outputs/new/deep/result.txt", "42\n")
    wait_for(lambda: (env.local / "outputs/new/deep/result.txt").exists(), 10, "the runtime's outputs")
    (env.local / "README.md").unlink()
    wait_for(lambda: not (env.remote_dir / "README.md").exists(), 10, "the laptop's delete")
    assert trash_of(env.remote_dir).get("README.md") == b"hello\n"  # recoverable in the runtime
    (env.remote_dir / "outputs" / "old.txt").unlink()
    wait_for(lambda: not (env.local / "outputs/old.txt").exists(), 10, "the runtime's delete")
    assert trash_of(env.local).get("outputs/old.txt") == b"from an earlier run\n"  # ... and here
    env.remote_write("run.log", "the runtime's log\n")  # ignored both ways
    s.flush(30)
    env.converged(ignore=("*.log",))
    assert (env.local / "run.log").read_text() == "ignored by .gitignore\n"
    assert s.stats["pushed"] >= 3 and s.stats["pulled"] >= 3
    done = env.cli("sync", "--status", "--state-dir", str(env.laptop_state))
    assert done.returncode == 0 and "up" in done.stdout, done.stdout + done.stderr


def test_an_empty_laptop_folder_is_filled_from_the_runtime(env) -> None:
    env.remote_write("notebooks/train.ipynb", '{"cells": []}\n')
    env.remote_write("outputs/ckpt/step1.txt", "1\n")
    s = env.start_sync()
    s.flush(30)
    assert s.plan is not None and s.plan["text"].startswith("the laptop's folder is empty: it is filled "
                                                            "from the runtime"), s.plan
    assert s.plan["pull"] == 5 and s.plan["push"] == 0, s.plan  # 2 files, 3 folders; nothing deleted
    env.converged()
    assert (env.local / "outputs" / "ckpt" / "step1.txt").read_text() == "1\n"


def test_what_the_runtime_may_not_do_on_the_laptop(env) -> None:
    env.local_write(".git/config", "[core]\n\trepositoryformatversion = 0\n")
    env.local_write(".git/HEAD", "ref: refs/heads/main\n")
    s = env.start_sync()
    s.flush(30)
    assert (env.remote_dir / ".git" / "config").exists()
    env.remote_write(".git/config", "[core]\n\tfsmonitor = /tmp/evil\n")
    env.remote_write(".git/hooks/pre-commit", "#!/bin/sh\necho evil\n")
    os.symlink("/home", env.remote_dir / "escape")
    os.symlink("../project/.git/HEAD", env.remote_dir / "climb")
    os.symlink("outputs/x", env.remote_dir / "inside")
    evil = env.remote_write("setuid.sh", "#!/bin/sh\n")
    os.chmod(evil, 0o6777)
    env.remote_write(".vscode/tasks.json", "{}")
    s.flush(30)
    assert "fsmonitor" not in (env.local / ".git" / "config").read_text()
    assert not (env.local / ".git" / "hooks").exists()
    assert not (env.local / ".vscode").exists()
    assert not os.path.lexists(env.local / "escape") and not os.path.lexists(env.local / "climb")
    assert os.path.islink(env.local / "inside"), s.logs(60)
    assert os.readlink(env.local / "inside") == "outputs/x"
    mode = stat.S_IMODE((env.local / "setuid.sh").stat().st_mode)
    assert mode == 0o755, oct(mode)  # no setuid, setgid, group or world write
    assert "never applied on the laptop" in s.logs(200)


def test_a_conflict_keeps_both_versions_on_both_sides(env) -> None:
    env.local_write("notes.txt", "v1\n")
    s = env.start_sync()
    s.flush(30)
    s.stop()
    env.local_write("notes.txt", "the laptop's v2\n")
    time.sleep(0.01)
    env.remote_write("notes.txt", "the runtime's v2\n")
    s = env.start_sync()
    wait_state(s, "paused")  # the first comparison found a conflict: it asks before going on
    assert "changed on both sides" in (s.question or ""), s.question
    assert (env.remote_dir / "notes.txt").read_text() == "the runtime's v2\n"  # nothing done yet
    s.resume("yes")
    s.flush(30)
    env.converged()
    (record,) = s.conflicts
    copy = record["copy"]
    assert copy.startswith("notes.conflict-runtime-") and copy.endswith(".txt")
    for side in (env.local, env.remote_dir):
        assert (side / "notes.txt").read_text() == "the laptop's v2\n"
        assert (side / copy).read_text() == "the runtime's v2\n"
    done = env.cli("sync", "--status", "--state-dir", str(env.laptop_state))
    assert copy in done.stdout, done.stdout + done.stderr
    assert f"the runtime's version is {copy}" in s.logs(100)


def test_a_mass_delete_pauses_and_asks(env) -> None:
    for i in range(40):
        env.local_write(f"data/file{i}.txt", f"{i}\n")
    s = env.start_sync()
    s.flush(30)
    for child in (env.remote_dir / "data").iterdir():
        child.unlink()
    wait_state(s, "paused")
    assert "deleted in the runtime" in (s.question or ""), s.question
    assert len(list((env.local / "data").iterdir())) == 40  # nothing deleted on the laptop
    s.resume("restore")
    s.flush(30)
    env.converged()
    assert len(list((env.remote_dir / "data").iterdir())) == 40
    assert s.state == "up", s.logs(60)
    # the other way round: rm -rf on the laptop, then the user says the deletes are meant
    shutil.rmtree(env.local / "data")
    wait_state(s, "paused")
    assert "deleted on the laptop" in (s.question or ""), s.question
    assert len(list((env.remote_dir / "data").iterdir())) == 40  # nothing deleted in the runtime yet
    s.resume("delete")
    s.flush(30)
    env.converged()
    assert not (env.remote_dir / "data").exists()
    kept = trash_of(env.remote_dir)
    assert all(kept.get(f"data/file{i}.txt") == f"{i}\n".encode() for i in range(40)), sorted(kept)
    assert s.state == "up", s.logs(60)


def test_a_conflict_made_while_the_runtime_was_away_is_kept_and_said(env) -> None:
    env.local_write("notes.txt", "v1\n")
    env.local_write("other.txt", "same\n")
    s = env.start_sync()
    s.flush(30)
    env.sshd.stop()  # the runtime is away (its folder stays: the same runtime comes back)
    wait_state(s, "waiting")
    env.local_write("notes.txt", "the laptop's v2\n")
    env.remote_write("notes.txt", "the runtime's v2\n")
    env.remote_write("outputs/new.txt", "made while away\n")
    env.start_runtime()
    wait_state(s, "up", 60)
    s.flush(30)
    env.converged()
    (record,) = s.conflicts  # not the first comparison: kept without asking, and said
    copy = record["copy"]
    for side in (env.local, env.remote_dir):
        assert (side / "notes.txt").read_text() == "the laptop's v2\n"
        assert (side / copy).read_text() == "the runtime's v2\n"
    assert (env.local / "outputs" / "new.txt").read_text() == "made while away\n"
    assert f"conflict in notes.txt: changed on both sides; the runtime's version is {copy}" in s.logs(100)
    done = env.cli("sync", "--status", "--state-dir", str(env.laptop_state))
    assert copy in done.stdout, done.stdout + done.stderr


def test_a_new_runtime_behind_the_same_alias_is_filled_from_the_laptop(env) -> None:
    for i in range(5):
        env.local_write(f"src/m{i}.py", f"# {i}\n")
    env.remote_write("outputs/result.txt", "done\n")
    s = env.start_sync()
    s.flush(30)
    before = tree(env.local)
    env.sshd.stop()  # the runtime is recycled: its sshd and every session go
    wait_state(s, "waiting")
    shutil.rmtree(env.remote_dir)
    env.remote_dir.mkdir()
    os.chown(env.remote_dir, env.runtime_user.uid, env.runtime_user.gid)
    time.sleep(1)
    assert tree(env.local) == before  # the laptop's folder is untouched while it waits
    env.start_runtime()  # a fresh runtime behind the same port (and host key)
    wait_state(s, "up", 60)
    s.flush(30)
    assert tree(env.local) == before  # never the empty new runtime mirrored onto the laptop
    env.converged()
    assert (env.remote_dir / "outputs" / "result.txt").read_text() == "done\n"
    assert "a new runtime" in s.logs(100)


def test_a_big_file_cut_midway_resumes(env) -> None:
    data = os.urandom(96 << 20)
    s = env.start_sync()
    s.flush(30)
    env.local_write("model.bin", data)
    parts = env.remote_dir / ".colab-remote-trash" / ".staging" / "resume"

    def part_size() -> int:
        found = list(parts.glob("*")) if parts.is_dir() else []
        return max((p.stat().st_size for p in found), default=0)

    wait_for(lambda: part_size() > 8 << 20, 30, "the transfer to begin")
    master = s.status()["master_pid"]
    os.kill(master, signal.SIGKILL)  # the link dies mid-file
    if not _proc.wait_until(lambda: "resuming" in s.logs(200), 60):
        pytest.fail("the transfer did not resume:\n" + s.logs(60))
    s.flush(60)
    arrived = (env.remote_dir / "model.bin").read_bytes()
    assert hashlib.sha256(arrived).digest() == hashlib.sha256(data).digest()
    assert not list(parts.glob("*"))
    line = [x for x in s.logs(200).splitlines() if "resuming" in x][-1]
    assert "of 100663296 bytes" in line, line


def test_the_command_line_runs_in_the_foreground_and_a_wrong_alias_is_said_at_once(env) -> None:
    env.local_write("a.txt", "from the laptop\n")
    argv = [*env.as_laptop, "-m", "colab_remote", "sync", str(env.local), env.remote, "--no-notify",
            "--state-dir", str(env.laptop_state)]
    proc = subprocess.Popen(argv, cwd="/", env=env.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_for(lambda: (env.remote_dir / "a.txt").exists(), 30, "the foreground sync's first fill")
        env.remote_write("b.txt", "from the runtime\n")
        wait_for(lambda: (env.local / "b.txt").exists(), 10, "the runtime's file")
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "filled from the laptop" in out and "Ctrl-C stops" in out, out
    done = env.cli("sync", str(env.local), "nosuchhost.invalid:project", "--state-dir", str(env.laptop_state))
    assert done.returncode == 1, done.stdout + done.stderr
    said = "colab-remote: SyncError: ssh to the runtime (nosuchhost.invalid) failed"
    assert said in done.stderr, done.stderr
    assert "fix:" in done.stderr


def test_a_big_file_from_the_runtime_cut_midway_resumes(env) -> None:
    data = os.urandom(96 << 20)
    s = env.start_sync()
    s.flush(30)
    env.remote_write("outputs/ckpt.bin", data)
    parts = env.local / ".colab-remote-trash" / ".staging" / "resume"

    def part_size() -> int:
        found = list(parts.glob("*")) if parts.is_dir() else []
        return max((p.stat().st_size for p in found), default=0)

    wait_for(lambda: part_size() > 8 << 20, 30, "the transfer to begin")
    os.kill(s.status()["master_pid"], signal.SIGKILL)
    if not _proc.wait_until(lambda: "are here from before: resuming" in s.logs(200), 60):
        pytest.fail("the transfer did not resume:\n" + s.logs(60))
    s.flush(60)
    assert (env.local / "outputs" / "ckpt.bin").exists(), s.logs(60)  # flush waits for the join
    arrived = (env.local / "outputs" / "ckpt.bin").read_bytes()
    assert hashlib.sha256(arrived).digest() == hashlib.sha256(data).digest()
    assert not list(parts.glob("*"))
