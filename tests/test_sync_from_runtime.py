"""sync() started in the runtime, the other way round: the laptop is the other side (issue 16).

The "laptop" is a real sshd on 127.0.0.1 with a throwaway account; the sync runs in this process
as root, standing for the runtime (which the laptop must not trust). One password login installs
a key on the laptop that runs only the sync's peer, in that folder; after it the password is
never needed, the key gets no shell and writes nowhere else, and revoke() takes it back.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

import colab_remote
from colab_remote import _agent, _proc
from colab_remote._agent import peer
from colab_remote.sync import sync

from .conftest import ServerSshd, needs_root, needs_sshd, wait_for
from .sync_helpers import wait_state

pytestmark = [needs_root, needs_sshd, pytest.mark.timeout(300)]


def as_user(server: ServerSshd, path: Path, text: str) -> None:
    """Write a file on the "laptop" as its user would."""
    rel = path.relative_to(server.user.home)
    server.user.write(str(rel), text)


def key_ssh(key: Path, server: ServerSshd, state: Path, *words: str, data: bytes = b"",
            timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    """ssh with the sync's key alone, as anything running in the runtime could."""
    argv = ["ssh", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={state / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes",
            "-o", "GlobalKnownHostsFile=/dev/null", "-F", "/dev/null", "-p", str(server.port),
            f"{server.user.name}@127.0.0.1", *words]
    return subprocess.run(argv, input=data, capture_output=True, timeout=timeout)


def start(here: Path, server: ServerSshd, state: Path, **kw):
    return sync(here, f"{server.user.name}@127.0.0.1:project", port=server.port, state_dir=state,
                remote_side="laptop", quiet=True, timeout=120, **kw)


def test_a_sync_started_in_the_runtime_through_a_restricted_key(tmp_path: Path, server) -> None:
    state = tmp_path / "state"
    here = tmp_path / "content" / "project"
    here.mkdir(parents=True)
    (here / "train.py").write_text("print('runtime')\n")
    laptop = server.user.home / "project"
    outside = server.user.home / "notes.txt"
    as_user(server, outside, "the user's own file\n")
    s = start(here, server, state, password=server.user.password)
    try:
        s.flush(60)
        assert (laptop / "train.py").read_text() == "print('runtime')\n", s.logs(40)
        assert laptop.stat().st_uid == server.user.uid
        # the key line: the sync's peer alone, in that folder, expiring
        lines = (server.user.home / ".ssh" / "authorized_keys").read_text().splitlines()
        (line,) = [x for x in lines if "--forced sync" in x]
        assert line.startswith('restrict,command="') and 'expiry-time="' in line, line
        assert server.user.password not in (Path(s.run_dir) / "config.json").read_text()
        assert not json.loads((Path(s.run_dir) / "config.json").read_text())["has_secret"]

        # edits both ways
        as_user(server, laptop / "src" / "model.py", "laptop edit\n")
        wait_for(lambda: (here / "src" / "model.py").exists(), 15, "the laptop's edit in the runtime")
        (here / "outputs").mkdir()
        (here / "outputs" / "ckpt.txt").write_text("epoch 1\n")
        if not _proc.wait_until(lambda: (laptop / "outputs" / "ckpt.txt").exists(), 15):
            pytest.fail("the runtime's output did not reach the laptop:\n" + s.logs(60))
        s.flush(30)
        assert (laptop / "outputs" / "ckpt.txt").stat().st_uid == server.user.uid
        # what the laptop's own coordinator refuses, the laptop's peer refuses too
        (here / ".git" / "hooks").mkdir(parents=True)
        (here / ".git" / "hooks" / "pre-commit").write_text("#!/bin/sh\necho evil\n")
        os.symlink("/etc/passwd", here / "escape")
        time.sleep(1)
        with contextlib.suppress(colab_remote.SyncError):
            s.flush(10)
        assert not (laptop / ".git" / "hooks").exists() and not os.path.lexists(laptop / "escape")
        (here / ".git" / "hooks" / "pre-commit").unlink()
        (here / "escape").unlink()
    finally:
        s.stop()

    # the password is no longer needed: the throwaway account's password is locked
    subprocess.run(["usermod", "-p", "*", server.user.name], check=True)
    s = start(here, server, state)  # no password: the key set up before
    try:
        (here / "after.txt").write_text("no password\n")
        wait_for(lambda: (laptop / "after.txt").exists(), 20, "a change after the password went")
        as_user(server, laptop / "back.txt", "and back\n")
        wait_for(lambda: (here / "back.txt").exists(), 20, "the laptop's change, still")
    finally:
        s.stop()

    key = state / "keys" / f"sync-{s.config.id}"
    # a shell command gets the peer's refusal, not a shell
    done = key_ssh(key, server, state, "echo PWNED")
    assert b"PWNED" not in done.stdout and done.returncode != 0, done
    assert b"only runs the colab-remote sync peer" in done.stderr, done
    # the peer itself: its folder is the laptop's record, whatever the runtime asks for
    ask = {"root": str(server.user.home), "rules": {}, "keep_days": 0.0001, "trash_budget": 1}
    records = b"".join([
        _agent.pack(peer.OP_START, data=json.dumps(ask).encode()),
        _agent.pack(peer.OP_PUT, b"../evil.txt", mode=0o644, data=b"x"),
        _agent.pack(peer.OP_PUT, b".bashrc", mode=0o644, data=b"echo PWNED\n"),
        _agent.pack(peer.OP_PUT, b".git/config", mode=0o644, data=b"[core]\n\tfsmonitor = evil\n"),
        _agent.pack(peer.OP_LINK, b"out", data=b"/home"),
        _agent.pack(peer.OP_END)])
    done = key_ssh(key, server, state, "colab-remote", "peer", data=records)
    hello = done.stdout[done.stdout.index(peer.MAGIC) + len(peer.MAGIC):]
    assert str(laptop).encode() in hello and str(server.user.home).encode() + b'"' not in hello, done
    assert not (server.user.home / "evil.txt").exists()
    bashrc = server.user.home / ".bashrc"  # (/etc/skel's, if any)
    assert not bashrc.exists() or b"PWNED" not in bashrc.read_bytes()
    assert outside.read_text() == "the user's own file\n"
    assert (laptop / ".bashrc").read_text() == "echo PWNED\n"  # inside the folder: allowed
    assert not (laptop / ".git").exists() and not os.path.lexists(laptop / "out")
    assert (laptop / "train.py").exists()  # keep_days from the laptop's record, not the request

    outcomes = colab_remote.revoke(state, quiet=True)
    assert (f"{_runtime(state)}.sync-{s.config.id}", "revoked") in outcomes, outcomes
    lines = (server.user.home / ".ssh" / "authorized_keys").read_text()
    assert "--forced sync" not in lines
    assert key_ssh(key, server, state, "hello").returncode != 0


def _runtime(state: Path) -> str:
    return (state / "runtime-id").read_text().strip()


def test_a_conflict_says_which_side_is_which(tmp_path: Path, server) -> None:
    state = tmp_path / "state"
    here = tmp_path / "content" / "project"
    here.mkdir(parents=True)
    (here / "notes.txt").write_text("v1\n")
    laptop = server.user.home / "project"
    s = start(here, server, state, password=server.user.password)
    s.flush(60)
    s.stop()
    (here / "notes.txt").write_text("the runtime's v2\n")
    as_user(server, laptop / "notes.txt", "the laptop's v2\n")
    s = start(here, server, state, yes=True)
    try:
        wait_state(s, "up")
        s.flush(30)
        (record,) = s.conflicts
        copy = record["copy"]
        assert copy.startswith("notes.conflict-laptop-") and copy.endswith(".txt"), record
        for side in (here, laptop):
            assert (side / "notes.txt").read_text() == "the runtime's v2\n"
            assert (side / copy).read_text() == "the laptop's v2\n"
        assert f"the laptop's version is {copy}" in s.logs(100)
        assert record["laptop"].startswith("16 bytes") and record["runtime"].startswith("17 bytes"), record
    finally:
        s.stop()
        colab_remote.revoke(state, quiet=True)


def test_bad_input_from_the_runtime_is_said_before_anything_runs(tmp_path: Path) -> None:
    here = tmp_path / "p"
    for remote, kw in (("colab:/content/x", {}), ("me@127.0.0.1:x", {"remote_side": "server"}),
                       ("me@127.0.0.1:x", {"ssh_config": "/dev/null"})):
        with pytest.raises(ValueError):
            sync(here, remote, state_dir=tmp_path / "s", **{"remote_side": "laptop", **kw})
    assert not (tmp_path / "s").exists()
