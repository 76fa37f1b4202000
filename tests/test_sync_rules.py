"""The two-way sync's pure pieces: the rules (ignores, .gitignore, what the runtime may not write,
git's write order), the three-way decision, the last common state, and the runtime's peer spoken
to through a pipe (its loader, guards, echo suppression, listing, reads, resumable big files).
No root, no sshd."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from colab_remote import _agent
from colab_remote._agent import peer, rules
from colab_remote._agent import syncfs as fs
from colab_remote._twoway import link
from colab_remote._twoway.base import CONFLICT, PULL, PUSH, SAME, Base, Entry, decide, needs_digest, same
from colab_remote.sync import _local_dir, parse_remote

F = 0o100644


def _old_python() -> list[str]:
    """The oldest python3 the runtime may have (3.6, 3.7) when this machine has one."""
    for minor in (6, 7):
        for found in [*sorted(map(str, Path.home().glob(f".pyenv/versions/3.{minor}.*/bin/python3"))),
                      shutil.which(f"python3.{minor}")]:
            if found and subprocess.run([found, "-c", ""], capture_output=True).returncode == 0:
                return [found]  # (pyenv's shims answer for versions it does not select)
    return []


PYTHONS = [sys.executable, *_old_python()]


def test_default_ignores_gitignore_syntax_and_our_own_names() -> None:
    r = rules.Rules()
    for skipped in (".venv/bin/python", "a/__pycache__/m.pyc", "node_modules/x/y.js",
                    ".ipynb_checkpoints/n-checkpoint.ipynb", "m.pyc", ".colab-remote-trash/x",
                    ".colab-remote-sync", "d/.x.colab-remote-tmp.12", ".git/index.lock", "s/.git/HEAD.lock"):
        assert r.excluded(skipped), skipped
    for kept in (".git/HEAD", ".git/objects/ab/cdef", "src/main.py", "venv.txt", ".gitignore"):
        assert not r.excluded(kept), kept
    g = rules.Rules(gitignores={"": rules.parse_lines("# c\n*.log\n!keep.log\n/build/\ndata/**/raw\n"),
                                "sub": ["x.txt", "/only-top"]})
    assert g.excluded("a/b.log") and not g.excluded("keep.log")
    assert g.excluded("build", True) and not g.excluded("build") and not g.excluded("src/build", True)
    assert g.excluded("build/out.o")  # in a skipped folder
    assert g.excluded("data/2024/01/raw") and not g.excluded("data/raw2")
    assert g.excluded("sub/x.txt") and g.excluded("sub/deep/x.txt") and not g.excluded("x.txt")
    assert g.excluded("sub/only-top") and not g.excluded("sub/deep/only-top")
    assert rules.Rules.from_json(g.to_json()).excluded("sub/x.txt")


def test_what_the_runtime_may_never_write_on_the_laptop() -> None:
    for path in (".git/config", ".git/hooks/pre-commit", ".git/hooks", "lib/.git/config",
                 ".git/modules/sub/config", ".git/modules/sub/hooks/post-checkout",
                 ".git/objects/info/alternates", ".vscode/tasks.json", ".idea/workspace.xml", ".git",
                 "vendor/.git", ".git/worktrees/w/config.worktree"):
        assert rules.protected(path), path
    for path in (".git/HEAD", ".git/objects/ab/cd", ".git/refs/heads/main", "config", "hooks/x.py",
                 "src/.vscode-like/x", "notes.conflict-runtime-1.txt"):
        assert not rules.protected(path), path
    assert rules.protected("secrets.env", (rules.Rule("*.env"),))
    assert rules.link_inside("a/b", b"../c") and rules.link_inside("x", b"y/z")
    for target in (b"/etc/passwd", b"../x", b"a/../../x", b"", b"a\0b"):
        assert not rules.link_inside("top", target), target


def test_git_writes_refs_after_objects_and_conflict_names() -> None:
    assert [rules.git_phase(p) for p in (".git/objects/ab/cd", ".git/HEAD", ".git/index",
                                         ".git/refs/heads/main", ".git/packed-refs", "sub/.git/HEAD",
                                         "HEAD", ".git/logs/HEAD")] == [0, 1, 1, 1, 1, 1, 0, 1]
    stamp = "20260101-120000"
    assert rules.conflict_name("a/train.py", stamp) == "a/train.conflict-runtime-20260101-120000.py"
    assert rules.conflict_name("Makefile", stamp) == "Makefile.conflict-runtime-20260101-120000"
    assert rules.conflict_name(".bashrc", stamp) == ".bashrc.conflict-runtime-20260101-120000"
    assert rules.conflict_name("x.tar.gz", stamp) == "x.tar.conflict-runtime-20260101-120000.gz"


def test_the_three_way_decision() -> None:
    base = Entry(F, 3, 1)
    newer = base._replace(mtime_ns=2)
    assert decide(base, base, base) == SAME
    assert decide(base, newer, base) == PUSH          # the laptop changed it
    assert decide(base, base, newer) == PULL          # the runtime changed it
    assert decide(base, None, base) == PUSH           # deleted on the laptop: delete there
    assert decide(base, base, None) == PULL           # deleted in the runtime: delete here
    assert decide(base, None, newer) == PULL          # deleted here, changed there: the change wins
    assert decide(base, newer, None) == PUSH
    assert decide(base, newer, base._replace(size=4)) == CONFLICT
    assert decide(None, base, base._replace(size=4)) == CONFLICT  # no common state: both kept
    assert decide(None, base, None) == PUSH and decide(None, None, base) == PULL
    assert decide(None, Entry(0o40755), Entry(0o40700)) == SAME
    assert decide(None, Entry(0o40755), base) == CONFLICT  # a folder here, a file there
    # the same content with another mtime is the same once the digests say so
    a, b = base._replace(digest=b"d"), newer._replace(digest=b"d")
    assert not same(base, newer) and same(a, b) and needs_digest(base, newer) and not needs_digest(a, b)
    assert same(Entry(0o100664, 3, 1), Entry(0o100644, 3, 1))  # modes compare masked (0o755)


def test_the_last_common_state_is_kept(tmp_path: Path) -> None:
    b = Base(tmp_path / "base.sqlite")
    b.set("a", Entry(F, 1, 2, b"", b"d"))
    b.set("dir", Entry(0o40755))
    b.set("dir/x", Entry(F))
    b.set_meta("boot_id", "xyz")
    b.commit()
    b.set("a", None)
    b.commit()
    b.close()
    again = Base(tmp_path / "base.sqlite")
    assert again.entries == {"dir": Entry(0o40755), "dir/x": Entry(F)} and again.meta["boot_id"] == "xyz"
    assert again.under("dir") == ["dir/x"]
    assert oct(os.stat(tmp_path / "base.sqlite").st_mode & 0o777) == "0o600"


def test_gitignore_is_honoured_unless_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from colab_remote._twoway.engine import make_rules
    from colab_remote._twoway.local import Local
    from colab_remote.sync import _prepare

    monkeypatch.setenv("HOME", str(tmp_path))
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    (project / ".gitignore").write_text("*.log\n")
    (project / "sub" / ".gitignore").write_text("cache/\n")
    for flag, skipped in ((True, True), (False, False)):
        cfg = _prepare(project, "colab:/content/project", state_dir=tmp_path / "state", gitignore=flag,
                       exclude="*.ckpt")
        local = Local(cfg.local_dir)
        try:
            r = make_rules(cfg, local)
        finally:
            local.close()
        assert r.excluded("run.log") is skipped and r.excluded("sub/cache", True) is skipped
        assert r.excluded("model.ckpt") and r.excluded(".venv", True)  # exclude= and the defaults always
        assert not r.excluded("src/main.py")


def test_arguments_are_checked_before_anything_runs(tmp_path: Path) -> None:
    assert parse_remote("colab:/content/project") == ("colab", "/content/project")
    assert parse_remote("root@localhost:~/p") == ("root@localhost", "p")
    for bad in ("colab", "colab:/", "colab:~", "colab:a/../b", "-oProxyCommand=x:y", "a b:c"):
        with pytest.raises(ValueError):
            parse_remote(bad)
    home = os.path.expanduser("~")
    for bad in (home, "/", os.path.join(home, ".ssh", "x"), os.path.join(home, ".config", "p"),
                os.path.dirname(home)):
        with pytest.raises(ValueError):
            _local_dir(bad)
    assert _local_dir(tmp_path / "project") == str((tmp_path / "project").resolve())


def test_the_peer_runs_on_python_3_6(tmp_path: Path) -> None:
    vermin = Path(sys.executable).with_name("vermin")
    if not vermin.exists():
        pytest.skip("vermin is not installed (pip install -e '.[test]')")
    loader = tmp_path / "loader.py"
    loader.write_text(link.LOADER)
    files = [str(Path(m.__file__ or "")) for m in (peer, rules, fs)] + [str(loader)]
    done = subprocess.run([str(vermin), "--no-tips", "--violations", "-t=3.6-", *files],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


class Peer:
    """The runtime's peer, started through the real loader, over a pipe."""

    def __init__(self, root: Path, python: str = sys.executable, **start: object) -> None:
        # as the runtime's shell runs it, a chatty start-up file first
        shell = 'echo "welcome to the runtime"; exec "$0" -I -B -c "$1" peer'
        self.proc = subprocess.Popen(["/bin/sh", "-c", shell, python, link.LOADER],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self.buf = bytearray()
        assert self.proc.stdin is not None
        request = json.dumps({"root": str(root), **start}).encode()
        self.proc.stdin.write(link.payload() + _agent.pack(peer.OP_START, data=request))
        self.hello = json.loads(self.next()[5])

    def send(self, *records: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"".join(records))

    def next(self, timeout: float = 5) -> tuple[bytes, bytes, int, int, int, bytes]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            magic = self.buf.find(peer.MAGIC)
            if magic >= 0:
                del self.buf[:magic + len(peer.MAGIC)]
            size = _agent.HEADER.size
            if len(self.buf) >= size:
                op, plen, mode, mtime, off, dlen = _agent.HEADER.unpack_from(self.buf)
                if len(self.buf) >= size + plen + dlen:
                    rec = (op, bytes(self.buf[size:size + plen]), mode, mtime, off,
                           bytes(self.buf[size + plen:size + plen + dlen]))
                    del self.buf[:size + plen + dlen]
                    return rec
            ready, _, _ = select.select([fd], [], [], max(0, deadline - time.monotonic()))
            assert ready, "the peer said nothing"
            more = os.read(fd, 1 << 20)
            assert more, f"the peer ended: {self.buf!r}"
            self.buf += more

    def until(self, op: bytes) -> list[tuple[bytes, bytes, int, int, int, bytes]]:
        found = [self.next()]
        while found[-1][0] != op:
            found.append(self.next())
        return found

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


@pytest.mark.parametrize("python", PYTHONS, ids=lambda p: "this" if p == sys.executable else "old")
def test_the_peer_guards_writes_suppresses_echoes_and_reports_changes(tmp_path: Path, python: str) -> None:
    """Through the real loader (the runtime's oldest python too, when this machine has one)."""
    root = tmp_path / "rt"
    p = Peer(root, python)
    try:
        assert p.hello["protocol"] == peer.PROTOCOL and p.hello["created"] and p.hello["marker"] == ""
        pack = _agent.pack
        p.send(pack(peer.OP_GUARD, b"a.txt"),
               pack(peer.OP_PUT, b"a.txt", mode=0o4777, mtime_ns=10**18, data=b"one"),
               pack(peer.OP_MKDIR, b"d", mode=0o755), pack(peer.OP_PUT, b"d/x", mtime_ns=10**18, data=b"x"),
               pack(peer.OP_END))
        op, *_, data = p.next()
        assert op == peer.R_ACK and json.loads(data) == {"errors": [], "refused": []}
        assert (root / "a.txt").read_bytes() == b"one" and (root / "a.txt").stat().st_mode & 0o7777 == 0o755
        # a guard that does not hold: nothing written, the laptop hears what is there
        p.send(pack(peer.OP_GUARD, b"a.txt"), pack(peer.OP_PUT, b"a.txt", data=b"two"), pack(peer.OP_END))
        refused = json.loads(p.next()[5])["refused"]
        assert refused[0][0] == "a.txt" and refused[0][3] == 3 and (root / "a.txt").read_bytes() == b"one"
        p.send(pack(peer.OP_PUT, b"../x", data=b"no"), pack(peer.OP_PUT, b".venv/x", data=b"no"),
               pack(peer.OP_END))
        assert len(json.loads(p.next()[5])["errors"]) == 2 and not (tmp_path / "x").exists()
        # what the runtime writes comes back at once, small files with their bytes; our own writes do not
        (root / "out.txt").write_bytes(b"result")
        (root / "sub").mkdir()
        (root / "sub" / "y").write_bytes(b"y")
        p.send(pack(peer.OP_PING))
        seen = {rec[1]: rec for rec in p.until(peer.R_PONG)[:-1]}
        assert seen[b"out.txt"][0] == peer.R_FILE and seen[b"out.txt"][5] == b"result"
        assert seen[b"sub"][0] == peer.R_CHANGE and b"sub/y" in seen
        assert b"a.txt" not in seen and b"d/x" not in seen
        # the listing, a read from an offset (with the whole file's digest), the marker
        p.send(pack(peer.OP_MARK, data=b'{"sync": "s1"}'), pack(peer.OP_LIST))
        listed = p.until(peer.R_LISTED)
        assert {r[1] for r in listed[:-1]} == {b"a.txt", b"d", b"d/x", b"out.txt", b"sub", b"sub/y"}
        p.send(pack(peer.OP_READ, b"out.txt", offset=2))
        data, done = p.next(), p.next()
        assert data[5] == b"sult" and done[0] == peer.R_DONE and done[5] == _agent.digest(b"result")
        # a big file in parts: cut, then resumed where it stopped
        blob = os.urandom(3 << 20)
        p.send(pack(peer.OP_BIG, b"big", mtime_ns=5, offset=len(blob)))
        assert p.next()[4] == 0
        p.send(pack(peer.OP_PART, b"big", offset=0, data=blob[:1 << 20]))
    finally:
        p.close()
    p = Peer(root, python)
    try:
        assert json.loads(p.hello["marker"]) == {"sync": "s1"} and not p.hello["created"]
        p.send(_agent.pack(peer.OP_BIG, b"big", mtime_ns=5, offset=len(blob)))
        assert p.next()[4] == 1 << 20  # what arrived before the cut is kept
        p.send(_agent.pack(peer.OP_PART, b"big", offset=1 << 20, data=blob[1 << 20:]),
               _agent.pack(peer.OP_JOIN, b"big", mode=0o644, mtime_ns=5, offset=len(blob),
                           data=_agent.digest(blob)),
               _agent.pack(peer.OP_END))
        assert json.loads(p.next()[5]) == {"errors": [], "refused": []}
        assert (root / "big").read_bytes() == blob
    finally:
        p.close()


def test_notifications_and_terminal_lines_carry_no_escape_sequences(tmp_path: Path, monkeypatch) -> None:
    from colab_remote._twoway import worker
    from colab_remote._twoway.engine import rules_safe

    assert rules_safe("a\x1b[31mb\nc") == "a\\x1b[31mb\\nc"
    said = tmp_path / "said"
    notifier = tmp_path / "notify-send"
    notifier.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {said}\n')
    notifier.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setattr(sys, "platform", "linux")
    worker.desktop_notification("conflict in $(touch x); `y`")
    assert said.read_text().splitlines()[-1] == "conflict in $(touch x); `y`"  # an argument, never a script


def test_the_command_line_says_what_it_needs() -> None:
    from colab_remote import cli

    assert cli.main(["sync"]) == 2
    assert cli.main(["sync", "./x", "colab:/"]) == 2
    assert cli.main(["sync", "./x", "colab:p", "--mass-delete", "2"]) == 2
