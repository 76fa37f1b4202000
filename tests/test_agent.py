"""The server-side agent run directly (what sshd runs on the server), without ssh or root.

Pure tier: a subprocess reading records on stdin in a temporary folder; any laptop runs these.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import resource
import signal
import stat
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from colab_remote import _agent as A

from .conftest import wait_for

AGENT = Path()  # the zip the server runs (made once per module: agent_zip)
TRASH = A.TRASH.decode()


@pytest.fixture(scope="module", autouse=True)
def agent_zip(tmp_path_factory: pytest.TempPathFactory) -> None:
    global AGENT
    AGENT = tmp_path_factory.mktemp("agent") / "agent.pyz"
    AGENT.write_bytes(A.bundle()[0])


class Agent:
    """``python3 -I -B agent.pyz mirror --root DEST``: records in, records out."""

    def __init__(self, dest: Path, *, keep_days: float = 7, backup: bool = True,
                 fsize: int | None = None, extra: tuple[str, ...] = ()) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-I", "-B", str(AGENT), "mirror", "--root", str(dest),
                "--keep-days", str(keep_days), *([] if backup else ["--no-backup"]), *extra]

        def limit() -> None:  # a small disk: writes past fsize fail (EFBIG) instead of killing it
            if fsize is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     preexec_fn=limit)
        hello = self.record()
        assert hello[0] == A.R_HELLO, hello
        self.hello = json.loads(hello[5])
        self.stage = dest / TRASH / ".staging" / str(self.proc.pid)

    def send(self, *records: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"".join(records))
        self.proc.stdin.flush()

    def record(self) -> tuple[bytes, bytes, int, int, int, bytes]:
        assert self.proc.stdout is not None
        rec = A.read_record(self.proc.stdout.read)
        assert rec is not None, "the agent closed the channel"
        return rec

    def end(self) -> list[list[str]]:
        """End the batch; the errors the agent reported."""
        self.send(A.pack(A.OP_END))
        op, _, _, _, _, data = self.record()
        assert op == A.R_ACK
        answer = json.loads(data)
        self.trash = answer["trash"]
        return answer["errors"]

    def manifest(self) -> dict[str, tuple[int, int, bytes]]:
        self.send(A.pack(A.OP_MANIFEST))
        found: dict[str, tuple[int, int, bytes]] = {}
        records = 0
        while True:
            op, path, _, _, more, data = self.record()
            if op == A.R_DONE:
                assert more == records
                return found
            assert op == A.R_FOLDER
            records += 1
            folder = path.decode()
            assert not folder or folder in found  # a folder before what is in it
            for name, (mode, _, size, target) in A.entries(data).items():
                found[f"{folder}/{name.decode()}" if folder else name.decode()] = (mode, size, target)

    def get(self, rel: str) -> bytes | str:
        self.send(A.pack(A.OP_GET, rel.encode()))
        chunks = []
        while True:
            op, _, _, _, offset, data = self.record()
            if op == A.R_FAIL:
                return data.decode()
            if op == A.R_DONE:
                return b"".join(chunks)
            assert op == A.R_DATA and offset == sum(map(len, chunks))
            chunks.append(data)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(10) == 0


def put(rel: str, data: bytes, mode: int = 0o644, mtime_ns: int = 1_600_000_000_123_456_789) -> bytes:
    return A.pack(A.OP_PUT, rel.encode(), mode=mode, mtime_ns=mtime_ns, data=data)


def mkdir(rel: str, mode: int = 0o755) -> bytes:
    return A.pack(A.OP_MKDIR, rel.encode(), mode=mode)


def link(rel: str, target: str) -> bytes:
    return A.pack(A.OP_LINK, rel.encode(), data=target.encode())


def delete(rel: str) -> bytes:
    return A.pack(A.OP_DELETE, rel.encode())


def trash_of(dest: Path) -> dict[str, bytes]:
    """rel path inside its time stamp folder -> content (b'link:...' for links)."""
    found = {}
    for stamp in (dest / TRASH).glob("20*"):
        for p in stamp.rglob("*"):
            if p.is_symlink():
                found[str(p.relative_to(stamp))] = b"link:" + os.readlink(p).encode()
            elif p.is_file():
                found[str(p.relative_to(stamp))] = p.read_bytes()
    return found


def test_the_agent_runs_on_python_3_6() -> None:
    vermin = Path(sys.executable).with_name("vermin")
    if not vermin.exists():
        pytest.skip("vermin is not installed (pip install -e '.[test]')")
    done = subprocess.run([str(vermin), "--no-tips", "--violations", "-t=3.6-", str(Path(A.__file__).parent)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_agent_builds_new_folders_whole_and_renames_them_into_place(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    agent = Agent(dest)
    try:
        agent.send(mkdir("new"), put("new/a.txt", b"one"), mkdir("new/ro", 0o555),
                   put("new/ro/b.txt", b"two", 0o600), put("new/a.txt", b"again"),
                   link("new/link", "a.txt"),
                   put("new/deep/er/c.txt", b"three"),  # its folders were not listed first
                   mkdir("gone"), put("gone/x", b"x"), delete("gone/x"), delete("gone"))
        wait_for(lambda: any(agent.stage.glob("*/deep/er/c.txt")), 10, "the agent to build it")
        assert not (dest / "new").exists()  # nothing visible before the batch ends
        assert agent.end() == []
        assert (dest / "new/a.txt").read_bytes() == b"again"
        assert (dest / "new/ro/b.txt").read_bytes() == b"two"
        assert (dest / "new/deep/er/c.txt").read_bytes() == b"three"
        assert os.readlink(dest / "new/link") == "a.txt"
        assert stat.S_IMODE((dest / "new/ro").stat().st_mode) == 0o555
        assert stat.S_IMODE((dest / "new/ro/b.txt").stat().st_mode) == 0o600
        assert (dest / "new/a.txt").stat().st_mtime_ns == 1_600_000_000_123_456_789
        assert not (dest / "gone").exists()
        assert not list(agent.stage.iterdir())
        assert trash_of(dest) == {}  # nothing was replaced: nothing in the trash

        # a folder that appears on the server while the batch builds it: merged, nothing lost
        agent.send(mkdir("race"), put("race/ours.txt", b"ours"), put("race/both.txt", b"new"))
        wait_for(lambda: any(agent.stage.glob("*/both.txt")), 10, "the agent to build it")
        (dest / "race").mkdir()
        (dest / "race/theirs.txt").write_bytes(b"theirs")
        (dest / "race/both.txt").write_bytes(b"old")
        assert agent.end() == []
        assert {p.name: p.read_bytes() for p in (dest / "race").iterdir()} == {
            "ours.txt": b"ours", "both.txt": b"new", "theirs.txt": b"theirs"}
        assert trash_of(dest) == {"race/both.txt": b"old"}
    finally:
        agent.close()
    assert not agent.stage.exists()  # the agent removes its empty staging folder on exit
    assert not (dest / TRASH / ".staging").exists() and (dest / TRASH).exists()  # trash kept
    (dest / "new/ro").chmod(0o755)


def test_a_deleted_folder_inside_a_new_one_never_comes_back(tmp_path: Path) -> None:
    """mkdir -p C/s1/s2 && echo x > C/s1/s2/f && echo y > C/keep && rm -r C/s1, as the mirror
    sends it when the listing of the new folder C no longer finds s1 (issue 13, item 1)."""
    dest = tmp_path / "dest"
    agent = Agent(dest)
    try:
        agent.send(mkdir("C"), put("C/keep", b"y"), delete("C/s1"), delete("C/s1/s2"),
                   delete("C/s1/s2/f"))
        assert agent.end() == []
        assert sorted(p.name for p in (dest / "C").iterdir()) == ["keep"]
        # the same deletes under a folder that already exists on the server: nothing made either
        agent.send(delete("C/t1/t2/f"), delete("C/t1/t2"), delete("C/t1"))
        assert agent.end() == []
        assert sorted(p.name for p in (dest / "C").iterdir()) == ["keep"]
    finally:
        agent.close()


def test_nothing_outside_the_destination_is_written_read_or_deleted(tmp_path: Path) -> None:
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (outside / "victim").write_bytes(b"victim")
    dest.mkdir()
    (dest / "evil").symlink_to(outside)           # a link where the client says a folder is
    (dest / "f").symlink_to(outside / "victim")   # a link where the client writes a file
    agent = Agent(dest)
    try:
        agent.send(put("../x", b"x"), put("/abs", b"x"), put(f"{TRASH}/x", b"x"), put("a/../b", b"x"),
                   put("./c", b"x"), put("d//e", b"x"), mkdir(TRASH), delete(TRASH), delete(".."),
                   link(f"{TRASH}/l", "/"))
        errors = agent.end()
        assert len(errors) == 10 and all("refused path" in e for _, e in errors), errors
        # reading and deleting through the link: nothing there, as far as the copy goes
        assert "FileNotFoundError" in agent.get("evil/secret") or "OSError" in agent.get("evil/secret")
        agent.send(delete("evil/secret"))
        assert agent.end() == []
        assert (outside / "secret").read_bytes() == b"secret"
        # writing through the link: the link goes to the trash, a real folder takes its place
        agent.send(put("evil/new", b"new"), put("f", b"file"))
        assert agent.end() == []
        assert (dest / "evil").is_dir() and not (dest / "evil").is_symlink()
        assert (dest / "evil/new").read_bytes() == b"new" and not (outside / "new").exists()
        assert (dest / "f").read_bytes() == b"file" and not (dest / "f").is_symlink()
        assert (outside / "victim").read_bytes() == b"victim"
        kept = trash_of(dest)
        assert kept["evil"] == f"link:{outside}".encode() and kept["f"] == f"link:{outside}/victim".encode()
        assert sorted(p.name for p in outside.iterdir()) == ["secret", "victim"]
    finally:
        agent.close()


def test_modes_never_group_or_world_writable_nor_setuid(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    agent = Agent(dest)
    try:
        agent.send(put("s", b"#!/bin/sh\n", mode=0o6777), mkdir("d", 0o2777), put("d/w", b"w", mode=0o666),
                   mkdir("x"), mkdir("x", 0o1777))
        assert agent.end() == []
        assert stat.S_IMODE((dest / "s").stat().st_mode) == 0o755
        assert stat.S_IMODE((dest / "d").stat().st_mode) == 0o755
        assert stat.S_IMODE((dest / "d/w").stat().st_mode) == 0o644
        assert stat.S_IMODE((dest / "x").stat().st_mode) == 0o755
        staging = dest / TRASH / ".staging"
        assert stat.S_IMODE(staging.stat().st_mode) == 0o700
    finally:
        agent.close()


def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    (dest / "d").mkdir(parents=True)
    (dest / "d" / "old").write_bytes(b"old")
    agent = Agent(dest, fsize=1000)  # files may not grow past 1,000 bytes: a full disk
    try:
        agent.send(put("d/old", b"x" * 5000), put("d/new", b"y" * 5000), put("d/small", b"ok"),
                   mkdir("n"), put("n/big", b"z" * 5000))
        errors = agent.end()
        assert {p for p, _ in errors} == {"d/old", "d/new", "n/big"}, errors
        assert sorted(p.name for p in (dest / "d").iterdir()) == ["new", "old", "small"] or \
            sorted(p.name for p in (dest / "d").iterdir()) == ["old", "small"]
        assert (dest / "d/old").read_bytes() == b"old" and not list(dest.rglob(f"*{A.TMP_INFIX.decode()}*"))
    finally:
        agent.close()


def test_big_files_in_chunks_checked_before_they_are_put_in_place(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    (dest / "b").mkdir(parents=True)
    (dest / "b" / "f").write_bytes(b"the old version")
    data = os.urandom(3 * 1000 + 17)
    agent = Agent(dest)
    try:
        chunks = [data[i:i + 1000] for i in range(0, len(data), 1000)]
        agent.send(*[A.pack(A.OP_CHUNK, b"b/f", offset=i * 1000, data=c) for i, c in enumerate(chunks)])
        assert (dest / "b" / "f").read_bytes() == b"the old version"  # not before the commit
        agent.send(A.pack(A.OP_COMMIT, b"b/f", mode=0o640, mtime_ns=1_700_000_000_000_000_000,
                          offset=len(data), data=A.digest(data)))
        assert agent.end() == []
        assert (dest / "b" / "f").read_bytes() == data
        assert stat.S_IMODE((dest / "b" / "f").stat().st_mode) == 0o640
        assert trash_of(dest) == {"b/f": b"the old version"}
        # damaged (a wrong digest), out of order, never begun: refused, nothing left behind
        agent.send(A.pack(A.OP_CHUNK, b"b/f", data=b"abc"),
                   A.pack(A.OP_COMMIT, b"b/f", offset=3, data=A.digest(b"abd")),
                   A.pack(A.OP_CHUNK, b"b/g", offset=5, data=b"abc"),
                   A.pack(A.OP_CHUNK, b"b/h", data=b"abc"), A.pack(A.OP_CHUNK, b"b/h", offset=7, data=b"x"),
                   A.pack(A.OP_COMMIT, b"b/i", offset=3))
        errors = dict(agent.end())
        assert set(errors) == {"b/f", "b/g", "b/h", "b/i"}, errors
        assert (dest / "b" / "f").read_bytes() == data
        assert sorted(p.name for p in (dest / "b").iterdir()) == ["f"]
        assert not [p for p in (dest / TRASH / ".staging").rglob("*") if p.is_file()]
    finally:
        agent.close()


class Lane:
    """``agent.pyz mirror --root DEST --lane``: the big-file lane of the agent that writes DEST."""

    def __init__(self, dest: Path, token: str) -> None:
        argv = [sys.executable, "-I", "-B", str(AGENT), "mirror", "--root", str(dest),
                "--keep-days", "7", "--lane"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.send(A.pack(A.OP_JOIN, data=token.encode()))
        self.hello = self.record()

    send = Agent.send
    record = Agent.record

    def ask(self, *records: bytes) -> tuple[bytes, bytes, int, int, int, bytes]:
        self.send(*records)
        return self.record()

    def close(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(10)


def test_a_lane_joins_its_writer_and_resumes_partials_across_lanes(tmp_path: Path) -> None:
    """The lane (a second session of the same mirror) is not refused by the writer's lock: it
    joins with the token of the writer's hello (another token, or no writer: refused). A partial
    it received survives the lane: the next lane says how much it holds and its digest, and
    carries on from there; the writer puts the checked file in place (OP_PLACE), the partial goes."""
    dest = tmp_path / "dest"
    agent = Agent(dest)
    data = os.urandom(300_000)
    try:
        stranger = Lane(dest, "not-the-token")
        assert stranger.hello[0] == A.R_FAIL and stranger.close() == 1
        lane = Lane(dest, agent.hello["lane"])
        assert lane.hello[0] == A.R_HELLO and json.loads(lane.hello[5])["lane"] is True
        assert lane.ask(A.pack(A.OP_HAVE, b"d/big", offset=len(data)))[:5] == (A.R_HAVE, b"d/big", 0, 0, 0)
        got = lane.ask(A.pack(A.OP_CHUNK, b"d/big", data=data[:100_000]))
        assert (got[0], got[4]) == (A.R_GOT, 100_000)
        assert lane.close() == 0  # cut off mid-file
        lane = Lane(dest, agent.hello["lane"])
        op, _, _, _, held, digest = lane.ask(A.pack(A.OP_HAVE, b"d/big", offset=len(data)))
        assert (op, held, digest) == (A.R_HAVE, 100_000, A.digest(data[:100_000]))
        assert lane.ask(A.pack(A.OP_CHUNK, b"d/big", offset=held, data=data[held:]))[4] == len(data)
        # a chunk that does not follow, and a damaged file: refused (the damaged partial goes)
        assert lane.ask(A.pack(A.OP_CHUNK, b"d/big", offset=7, data=b"x"))[0] == A.R_FAIL
        assert lane.ask(A.pack(A.OP_FINISH, b"d/big", offset=len(data), data=A.digest(b"x")))[0] == A.R_FAIL
        assert lane.ask(A.pack(A.OP_HAVE, b"d/big", offset=len(data)))[4] == 0
        lane.ask(A.pack(A.OP_CHUNK, b"d/big", data=data[:200_000]))
        lane.send(A.pack(A.OP_ZIP, data=zlib.compress(A.pack(A.OP_CHUNK, b"d/big", offset=200_000,
                                                             data=data[200_000:]))))
        assert lane.record()[4] == len(data)
        done = lane.ask(A.pack(A.OP_FINISH, b"d/big", offset=len(data), data=A.digest(data)))
        assert done[:5] == (A.R_DONE, b"d/big", 0, 0, len(data))
        assert not (dest / "d").exists()  # not in place before the writer says so
        agent.send(mkdir("d"), A.pack(A.OP_PLACE, b"d/big", mode=0o640, mtime_ns=1_700_000_000_000_000_000,
                                      offset=len(data), data=A.digest(data)))
        assert agent.end() == []
        assert (dest / "d/big").read_bytes() == data
        assert stat.S_IMODE((dest / "d/big").stat().st_mode) == 0o640
        assert os.listdir(dest / TRASH / ".staging" / "partial") == []
        # a file that grew: the server's copy is what to build on, checked by its digest
        more = data + os.urandom(5000)
        op, _, _, _, held, digest = lane.ask(A.pack(A.OP_HAVE, b"d/big", offset=len(more)))
        assert (op, held, digest) == (A.R_HAVE, len(data), A.digest(data))
        assert lane.ask(A.pack(A.OP_CHUNK, b"d/big", offset=held, data=more[held:]))[4] == len(more)
        assert lane.ask(A.pack(A.OP_FINISH, b"d/big", offset=len(more), data=A.digest(more)))[0] == A.R_DONE
        agent.send(A.pack(A.OP_PLACE, b"d/big", mode=0o644, offset=len(more), data=A.digest(more)),
                   A.pack(A.OP_PLACE, b"d/other", offset=3, data=A.digest(b"abc")))
        assert [e[0] for e in agent.end()] == ["d/other"]  # no lane delivered it
        assert (dest / "d/big").read_bytes() == more and trash_of(dest) == {"d/big": data}
        # a file no longer big (or deleted): its partial forgotten
        lane.ask(A.pack(A.OP_HAVE, b"d/x", offset=9))
        assert lane.ask(A.pack(A.OP_CHUNK, b"d/x", data=b"abc"))[4] == 3
        lane.send(A.pack(A.OP_DROP, b"d/x"))
        assert lane.ask(A.pack(A.OP_HAVE, b"d/x", offset=9))[4] == 0
        assert lane.close() == 0
    finally:
        agent.close()
    again = Agent(dest)  # the writer replaced: its old token no longer joins
    try:
        old = Lane(dest, agent.hello["lane"])
        assert old.hello[0] == A.R_FAIL and old.close() == 1
    finally:
        again.close()


def test_manifest_and_get_read_the_copy_back(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    agent = Agent(dest)
    try:
        big = os.urandom(A.CHUNK * 2 + 5)
        agent.send(mkdir("d"), put("d/a", b"a", mode=0o600), link("d/l", "a"), put("top", b""),
                   put("d/big", big))
        assert agent.end() == []
        (dest / "d" / f".x{A.TMP_INFIX.decode()}999999999").write_bytes(b"left by a dead agent")
        found = agent.manifest()
        assert set(found) == {"d", "d/a", "d/l", "top", "d/big"}
        assert stat.S_ISDIR(found["d"][0]) and stat.S_ISLNK(found["d/l"][0])
        assert found["d/l"][2] == b"a" and found["d/a"][1] == 1 and found["d/big"][1] == len(big)
        assert stat.S_IMODE(found["d/a"][0]) == 0o600
        assert not list(dest.rglob(f"*{A.TMP_INFIX.decode()}*"))  # the dead agent's leftover went
        assert agent.get("d/a") == b"a" and agent.get("top") == b"" and agent.get("d/big") == big
        assert "ValueError" in agent.get("d/l") or "OSError" in agent.get("d/l")  # a link is not read
        assert "refused" in agent.get("../etc/passwd")
    finally:
        agent.close()


def test_cut_mid_record_and_leftovers_of_dead_agents(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dead = "999999999"  # above any pid_max: no such process
    (dest / "d").mkdir(parents=True)
    (dest / TRASH / ".staging" / dead / "new-1").mkdir(parents=True)
    agent = Agent(dest)
    try:
        assert not (dest / TRASH / ".staging" / dead).exists()  # cleaned when the agent starts
        record = put("d/cut.txt", b"x" * 1000)
        agent.send(put("d/whole.txt", b"whole"), record[:-400])  # the channel breaks mid-record
    finally:
        agent.close()
    assert (dest / "d" / "whole.txt").read_bytes() == b"whole"
    assert sorted(p.name for p in (dest / "d").iterdir()) == ["whole.txt"]


def test_trash_is_pruned_by_the_servers_keep_days_only(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    old, recent = dest / TRASH / "2020-01-01T00-00-00.000000Z", dest / TRASH / "2099-01-01T00-00-00.000000Z"
    for d in (old, recent):
        d.mkdir(parents=True)
        (d / "f.txt").write_text("trash")
    agent = Agent(dest, keep_days=3)
    try:
        assert not old.exists() and recent.exists()
        agent.send(A.pack(b"T", mtime_ns=0))  # the old "prune now" record: no such thing any more
        assert "unknown operation" in agent.end()[0][1]
        assert recent.exists()
    finally:
        agent.close()


def test_the_installed_agent_starts_from_its_compiled_modules(tmp_path: Path) -> None:
    """The set-up installs the zip with each module compiled by the server's python: nothing is
    compiled at a start (the agent's start took 64 ms, 32 ms with them here). It still says the sha
    of the zip as sent; a python with another magic compiles the source as before."""
    from colab_remote._agent.setup import compiled

    source, sha = A.bundle()
    path = tmp_path / f"agent-{sha[:12]}.pyz"
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import colab_remote_agent.serve as s; "
             "from colab_remote_agent.home import own_sha; print(s.__file__, own_sha())")
    for magic, suffix in ((None, ".pyc"), (b"\x00\x00\r\n", ".py")):
        data = compiled(source, str(path), sha)
        if magic is not None:  # as another python finds it
            data = data.replace(importlib.util.MAGIC_NUMBER, magic)
        path.write_bytes(data)
        done = subprocess.run([sys.executable, "-I", "-B", "-S", "-c", probe, str(path)],
                              capture_output=True, text=True, timeout=30)
        assert done.stdout.split() == [f"{path}/colab_remote_agent/serve{suffix}", sha], done.stderr
        hello = subprocess.run([sys.executable, "-I", "-B", "-S", str(path), "--forced", "mirror",
                                "rid.mirror-1"], env=dict(os.environ, SSH_ORIGINAL_COMMAND="hello"),
                               capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert hello.stdout == f"colab-remote-agent {A.VERSION} {sha} mirror\n", hello.stderr
    assert len(source) < len(data) and sha != hashlib.sha256(data).hexdigest()


def test_forced_command_runs_only_the_agent(tmp_path: Path) -> None:
    env = dict(os.environ, HOME=str(tmp_path))
    for words in ("echo PWNED", "", "sh -c id", "/usr/lib/openssh/sftp-server", "internal-sftp",
                  "scp -f /etc/passwd", "rsync --server --sender -vlogDtpre.iLsfxC . /",
                  "colab-remote agent; echo PWNED"):
        done = subprocess.run([sys.executable, "-I", "-B", str(AGENT), "--forced", "mirror", "rid.mirror-1"],
                              env={**env, "SSH_ORIGINAL_COMMAND": words}, capture_output=True,
                              text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert done.returncode == 1 and "refused" in done.stderr and "PWNED" not in done.stdout, words
    tunnel = [sys.executable, "-I", "-B", str(AGENT), "--forced", "tunnel", "rid.t", "20022"]
    for words in ("echo PWNED", "", "reclaim 1; id", "reclaim x", "session now", "sh"):
        done = subprocess.run(tunnel,
                              env={**env, "SSH_ORIGINAL_COMMAND": words}, capture_output=True,
                              text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert done.returncode == 1 and "refused" in done.stderr, words
    done = subprocess.run(tunnel, env={**env, "SSH_ORIGINAL_COMMAND": "hello"}, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.startswith(f"colab-remote-agent {A.VERSION} ")


def test_protocol_records_round_trip() -> None:
    rec = A.pack(A.OP_CHUNK, "é/\n".encode(), mode=0o755, mtime_ns=-5, offset=1 << 40, data=b"xyz")
    data = iter([rec])
    buf = bytearray(next(data))

    def read(n: int) -> bytes:
        out = bytes(buf[:n])
        del buf[:n]
        return out

    assert A.read_record(read) == (A.OP_CHUNK, "é/\n".encode(), 0o755, -5, 1 << 40, b"xyz")
    assert A.read_record(read) is None
    stamp = A.trash_stamp(0.25).decode()
    assert stamp == "1970-01-01T00-00-00.250000Z"
    assert time.strptime(stamp[:19], A.STAMP_FORMAT)
    for bad in (b"", b"/a", b"a/../b", b"a//b", b"./a", A.TRASH + b"/x", b"a\0b"):
        with pytest.raises(ValueError):
            A.check_path(bad)
    A.check_path(b"a/b c/.d..e")


def test_the_trash_stays_within_its_cap_oldest_first(tmp_path: Path) -> None:
    """--trash-max-gb (the server's config): each batch ends with the trash within it; the oldest
    versions go first, also what sits in read-only folders; the agent says what it holds and what
    it pruned (issue 13, item 2)."""
    dest = tmp_path / "dest"
    cap = 300_000
    agent = Agent(dest, extra=("--trash-max-gb", repr(cap / 1e9)))
    try:
        assert agent.hello["trash"]["bytes"] == 0
        agent.send(mkdir("ro", 0o555), put("ro/f", b"r" * 5000), mkdir("ro/inner", 0o500),
                   put("ro/inner/g", b"g"), mkdir("nothing", 0o000))
        assert agent.end() == []
        agent.send(delete("ro"), delete("nothing"))  # a read-only folder into the trash
        assert agent.end() == []
        versions = []
        for i in range(12):
            data = bytes([65 + i]) * 100_000
            agent.send(put("big.bin", data))
            assert agent.end() == []
            versions.append(data)
            held = sum(p.stat().st_blocks * 512 for p in (dest / TRASH).rglob("*")
                       if not p.name.startswith(".") and ".staging" not in p.parts)
            assert agent.trash["bytes"] <= cap and held <= cap, (i, agent.trash, held)
        assert (dest / "big.bin").read_bytes() == versions[-1]
        kept = [p.read_bytes() for p in (dest / TRASH).glob("20*/big.bin")]
        assert versions[-2] in kept and versions[0] not in kept  # the oldest went first
        assert "ro/f" not in trash_of(dest)  # ... read-only folder and all
        report = agent.trash
        assert report["pruned"]["reasons"]["cap"] >= 9 and report["pruned"]["last"] == "cap"
        assert report["versions"] == len(list((dest / TRASH).glob("20*/*")))
    finally:
        agent.close()
    sizes = (dest / TRASH / ".sizes").read_text().split("\n")
    assert len([line for line in sizes if line]) == report["folders"]
    again = Agent(dest, extra=("--trash-max-gb", repr(cap / 1e9)))  # from the cache: the same
    try:
        assert {k: again.hello["trash"][k] for k in ("bytes", "versions", "folders")} == {
            k: report[k] for k in ("bytes", "versions", "folders")}
    finally:
        again.close()


def writer_agent(dest: Path, key: str) -> subprocess.Popen[bytes]:
    dest.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-I", "-B", str(AGENT), "mirror", "--root", str(dest),
                             "--keep-days", "7", "--id", key],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def first_record(proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    assert proc.stdout is not None
    rec = A.read_record(proc.stdout.read)
    assert rec is not None, "the agent closed the channel"
    return rec[0], rec[5]


def test_one_writer_per_destination(tmp_path: Path) -> None:
    """The agent holds a lock in the destination for its life: another mirror is refused, naming
    the holder; the same mirror again (a re-run, a new login) replaces it; a holder silent for
    STALE_AFTER is replaced, and the one replaced is refused from then on (issue 13, item 7)."""
    dest = tmp_path / "dest"
    first = writer_agent(dest, "aaaa11112222.mirror-one")
    others = []
    try:
        assert first_record(first)[0] == A.R_HELLO
        second = writer_agent(dest, "bbbb33334444.mirror-two")
        others.append(second)
        op, why = first_record(second)
        assert op == A.R_FAIL and second.wait(10) == 1
        text = why.decode()
        assert "another mirror writes to" in text and str(dest) in text, text
        assert "runtime aaaa11112222" in text and "since 20" in text and "last active" in text, text
        # the same mirror logging in again: the earlier agent ends, the new one writes
        again = writer_agent(dest, "aaaa11112222.mirror-one")
        others.append(again)
        assert first_record(again)[0] == A.R_HELLO
        assert first.wait(10) != 0  # ended by the new one (SIGTERM)
        holder = json.loads((dest / TRASH / ".writer").read_text())
        assert holder["pid"] == again.pid and holder["key"] == "aaaa11112222.mirror-one"
        # silent for longer than STALE_AFTER (a runtime that is gone): another mirror takes over
        holder["active"] -= A.STALE_AFTER + 1
        (dest / TRASH / ".writer").write_text(json.dumps(holder))
        third = writer_agent(dest, "bbbb33334444.mirror-two")
        others.append(third)
        assert first_record(third)[0] == A.R_HELLO and again.wait(10) != 0
        # ... and the mirror it replaced cannot take it back while that one runs
        back = writer_agent(dest, "aaaa11112222.mirror-one")
        others.append(back)
        op, why = first_record(back)
        assert op == A.R_FAIL and "was taken over by another mirror" in why.decode()
        assert "runtime bbbb33334444" in why.decode() and back.wait(10) == 1
        assert third.stdin is not None
        third.stdin.close()
        assert third.wait(10) == 0
        after = writer_agent(dest, "aaaa11112222.mirror-one")  # free again: anyone may write
        others.append(after)
        assert first_record(after)[0] == A.R_HELLO
    finally:
        for proc in (first, *others):
            if proc.poll() is None:
                assert proc.stdin is not None
                proc.stdin.close()
                proc.wait(10)
            for f in (proc.stdin, proc.stdout, proc.stderr):
                if f is not None:
                    f.close()


def test_a_direct_mirror_checks_the_destination_as_the_set_up_does(tmp_path: Path) -> None:
    """``mirror --dest PATH`` (how a mirror without restrictions starts an agent installed
    earlier, without a set-up) refuses what the set-up refuses, before writing anything."""
    for dest in ("/", "a/../b", "~other/x", ""):
        done = subprocess.run([sys.executable, "-I", "-B", "-S", str(AGENT), "mirror", "--dest", dest,
                               "--keep-days", "7"], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 1 and "refused" in done.stderr and not done.stdout, (dest, done)
    assert "holds the home folder" in subprocess.run(
        [sys.executable, "-I", "-B", "-S", str(AGENT), "mirror", "--dest", "/", "--keep-days", "7"],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL).stderr
    dest = tmp_path / "made" / "here"
    agent = subprocess.run([sys.executable, "-I", "-B", "-S", str(AGENT), "mirror", "--dest", str(dest),
                            "--keep-days", "7"], capture_output=True, timeout=30,
                           stdin=subprocess.DEVNULL)
    assert agent.returncode == 0 and dest.is_dir() and b'"protocol"' in agent.stdout, agent
    hello = json.loads(agent.stdout[agent.stdout.index(b"{"):agent.stdout.rindex(b"}") + 1])
    assert hello["root"] == str(dest.resolve())
