"""What a batch of changes means (the planner), the handle and mirror()'s input checks: no server."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zlib
from pathlib import Path

import pytest

from colab_remote import _agent, _sync
from colab_remote._mirror import git
from colab_remote._mirror import plan as plan_module
from colab_remote._mirror.compare import Compare
from colab_remote._mirror.plan import Entry, Plan, Planner, Stage, read_file, scan_local
from colab_remote._progress import Bar
from colab_remote.mirror import Mirror, mirror, push

TRASH = _sync.TRASH


def test_push_reads_files_not_links(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"grown since the lstat")
    assert read_file(str(tmp_path / "f"), 5) == b"grown since the lstat"
    assert read_file(str(tmp_path / "f"), 100) == b"grown since the lstat"
    (tmp_path / "e").write_bytes(b"")
    assert read_file(str(tmp_path / "e"), 0) == b""
    (tmp_path / "link").symlink_to(tmp_path / "f")  # a file replaced by a link meanwhile
    with pytest.raises(OSError):
        read_file(str(tmp_path / "link"), 5)
    os.mkfifo(tmp_path / "fifo")  # never blocks
    assert read_file(str(tmp_path / "fifo"), 5) == b""




def test_bad_inputs_raise_before_anything_runs(tmp_path: Path) -> None:
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    state = tmp_path / "state"
    good = "bob@127.0.0.1:backup/p"
    cases = [
        ((tmp_path, "bob@127.0.0.1"), {}, ValueError),           # no :path
        ((tmp_path, "bob@127.0.0.1:/"), {}, ValueError),         # remote /
        ((tmp_path, "bob@127.0.0.1:"), {}, ValueError),          # empty remote path
        ((tmp_path, "bob@127.0.0.1:~"), {}, ValueError),         # the home itself
        ((a_file, good), {}, ValueError),                        # a file
        ((tmp_path / TRASH, good), {}, ValueError),              # the trash
        ((tmp_path / TRASH / "x", good), {}, ValueError),        # inside the trash
        ((tmp_path, good), {"port": 0}, ValueError),
        ((tmp_path, good), {"port": 70000}, ValueError),
        ((tmp_path, good), {"port": "22"}, TypeError),
        ((tmp_path, good), {"exclude": [""]}, ValueError),
        ((tmp_path, good), {"delete": "yes"}, TypeError),
        ((tmp_path, good), {"password": "a\nb"}, ValueError),
        ((tmp_path, good), {"identity_file": tmp_path / "nope"}, ValueError),
        ((42, good), {}, TypeError),
    ]
    for args, kw, error in cases:
        with pytest.raises(error):
            mirror(*args, state_dir=state, quiet=True, **kw)
    with pytest.raises(ValueError):
        push(tmp_path / "missing", good, state_dir=state)
    with pytest.raises(ValueError):
        push(tmp_path, "bob@127.0.0.1:/", state_dir=state)
    assert not (state / "mirror").exists()  # nothing ran


def test_html_escapes_everything(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({
        "pid": None, "local_dir": "/content/<b>x</b>", "destination": "u@h:<script>",
        "port": 22, "state": "stopped", "stats": {"last_error": "<img src=x>", "pushes": 1}}))
    m = Mirror(run)
    page = m._repr_html_()
    assert "<script>" not in page and "<b>x" not in page and "<img" not in page
    assert "&lt;script&gt;" in page and "&lt;img src=x&gt;" in page
    assert not m.alive and m.state == "stopped" and m.stats["pushes"] == 1
    m.stop()  # nothing running: a no-op


def test_no_bar_flashes_for_a_quick_sync(capsys) -> None:
    bar = Bar()
    bar.show("first push", 0.5, "1 MB")
    bar.show("first push", 1.0, "2 MB")
    bar.close(done=True)
    assert capsys.readouterr().err == ""


def test_a_plan_is_a_value_read_from_the_folder(tmp_path: Path) -> None:
    root = tmp_path / "p"
    (root / "new" / "sub").mkdir(parents=True)
    (root / "new" / "a.txt").write_bytes(b"a")
    (root / "new" / "sub" / "b.txt").write_bytes(b"b")
    (root / "new" / "link").symlink_to("a.txt")
    (root / "big.bin").write_bytes(b"x" * _sync.BIG_FILE)
    (root / "skip.pyc").write_bytes(b"excluded")
    watched: list[str] = []
    planner = Planner(str(root), _sync.MirrorFilter(str(root)), delete=True,
                      watch=lambda path, rel: watched.append(rel))
    plan = planner.plan({"new", "gone", "big.bin", "skip.pyc"}, added={"new"}, deleted={"gone"})
    ops = [(op, rel) for op, rel, *_ in plan]
    assert ops.index((_agent.OP_MKDIR, "new")) < ops.index((_agent.OP_PUT, "new/a.txt"))  # folder first
    assert set(ops) == {(_agent.OP_MKDIR, "new"), (_agent.OP_PUT, "new/a.txt"),
                        (_agent.OP_MKDIR, "new/sub"), (_agent.OP_PUT, "new/sub/b.txt"),
                        (_agent.OP_LINK, "new/link"), (_agent.OP_DELETE, "gone"),
                        (_agent.OP_PUT, "skip.pyc")}  # asked for by name: the filter is the watcher's
    assert plan.big == ["big.bin"] and plan.deletes == ["gone"]
    assert set(plan.sending) == {"new/a.txt", "new/sub/b.txt", "skip.pyc"}
    assert set(plan.big_keys) == {"big.bin"}  # the lane's: on the server once placed, not before
    assert sorted(watched) == ["new", "new/sub"]  # watched before they were listed
    planner.acknowledged(plan, ok=True)
    waiting = planner.plan({"big.bin"})
    list(waiting)
    assert waiting.big == ["big.bin"]
    planner.placed("big.bin", plan.big_keys["big.bin"])
    again = planner.plan({"new/a.txt", "new/sub/b.txt", "big.bin"})
    assert [(op, rel) for op, rel, *_ in again] == [] and again.big == []  # not sent twice
    (root / "big.bin").write_bytes(b"y" * _sync.BIG_FILE)  # same size, new times
    fresh = planner.plan({"big.bin"})
    list(fresh)
    assert fresh.big == ["big.bin"]
    (root / "new" / "a.txt").write_bytes(b"A")
    assert [rel for _, rel, *_ in planner.plan({"new/a.txt"})] == ["new/a.txt"]
    # a whole-tree pass remembers nothing (memory in proportion to the tree), and what it sends
    # replaces what an earlier batch remembered
    whole = planner.plan({"new"}, added={"new"}, remember=False)
    assert [rel for _, rel, *_ in whole if rel == "new/a.txt"] == ["new/a.txt"]
    planner.acknowledged(whole, ok=True)
    assert not whole.sending and "new/a.txt" not in planner.sent
    assert "new/sub/b.txt" in planner.sent  # not sent again by that pass: still known
    # a new folder's files reported with it go once, by its walk, and a path deleted under it
    # is deleted; the plan holds the reported paths it took, not every path a walk read (a first
    # push of 300,000 files kept 20 MB more)
    (root / "new" / "sub" / "b.txt").write_bytes(b"B")
    nested = planner.plan({"new", "new/a.txt", "new/sub", "new/sub/b.txt", "new/sub/gone"},
                          added={"new", "new/sub"}, deleted={"new/sub/gone"}, remember=False)
    ops = [(op, rel) for op, rel, *_ in nested]
    assert sorted(rel for _, rel in ops) == ["new", "new/a.txt", "new/link", "new/sub",
                                             "new/sub/b.txt", "new/sub/gone"]
    assert (_agent.OP_DELETE, "new/sub/gone") in ops
    whole_tree = planner.plan({"new"}, added={"new"}, remember=False)
    assert len(list(whole_tree)) == 5 and whole_tree._seen == {"new"}
    everything = Planner(str(root), _sync.MirrorFilter(str(root)), delete=True, inline=False)
    shell = everything.plan({"new"}, added={"new"})
    assert {op for op, *_ in shell} == {_agent.OP_MKDIR, _agent.OP_LINK}  # files all go to rsync
    assert sorted(shell.big) == ["new/a.txt", "new/sub/b.txt"]


def test_a_file_that_grows_past_the_lanes_size_while_it_is_read_goes_to_the_lane(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file being written, small at its lstat and big by the time it is read, goes to the
    big-file lane as it is then, not into a batch: one record of all of it (a 200 MiB file, read
    while it was written) held up every edit behind it and was sent again whole after a killed
    mirror (issue 15: bench_wan's killed figure, 1.52 times the file, now and then)."""
    root = tmp_path / "p"
    root.mkdir()
    (root / "out.bin").write_bytes(b"x" * 1000)
    real = plan_module.read_file

    def written_meanwhile(path: str, size: int, dir_fd: int | None = None,
                          limit: int | None = None) -> bytes:
        with open(root / "out.bin", "ab") as f:
            f.write(b"y" * 2 * _sync.BIG_FILE)
        return real(path, size, dir_fd) if limit is None else real(path, size, dir_fd, limit)

    monkeypatch.setattr(plan_module, "read_file", written_meanwhile)
    planner = Planner(str(root), _sync.MirrorFilter(str(root)), delete=True)
    plan = planner.plan({"out.bin"})
    assert [(op, rel) for op, rel, *_ in plan] == []
    assert plan.big == ["out.bin"] and plan.big_keys["out.bin"][0] == 1000 + 2 * _sync.BIG_FILE
    assert plan.sending == {}


def _loose(kind: bytes, body: bytes) -> tuple[str, bytes]:
    """A loose git object: its id and its file's bytes."""
    raw = kind + b" %d\0" % len(body) + body
    return hashlib.sha1(raw).hexdigest(), zlib.compress(raw)


def test_a_repositorys_files_travel_in_the_order_git_writes_them(tmp_path: Path) -> None:
    """Issue 13, item 4: sorted by name, HEAD, the index and reflogs came before the objects they
    name, a tree before its subtree, a big pack after the refs; a copy cut in between was broken."""
    assert git.stage("src/a.py") == git.BLOBS
    assert git.stage(".git") == git.BLOBS and git.stage(".github/x") == git.BLOBS
    assert git.stage(".git/objects/pack/pack-1.pack") == git.BLOBS
    assert git.stage(".git/objects/pack/pack-1.idx") == git.INDEXES
    for names in (".git/HEAD", ".git/index", ".git/refs/heads/main", ".git/packed-refs",
                  ".git/logs/HEAD", "lib/.git/modules/sub/refs/heads/x", ".git/objects/info/commit-graph",
                  "lib/.git/modules/sub/objects/pack/multi-pack-index"):
        assert git.stage(names) == git.NAMES, names
    assert git.stage(".git/objects/ab/cdef", delete=True) == git.PACKED
    assert git.stage(".git/refs/heads/old", delete=True) == git.NAMES  # after packed-refs
    assert git.is_object(".git/objects/ab/cdef") and git.is_object(".git/objects/pack/p.idx")
    assert not git.is_object(".git/objects/info/commit-graph") and not git.is_object(".git/index")
    assert git.keeps(".git/objects/ab") and git.keeps("x/.git/modules/s/objects/pack")
    assert not git.keeps(".git/objects") and not git.keeps(".git/refs/heads")

    blob, blob_data = _loose(b"blob", b"hello\n")
    sub, sub_data = _loose(b"tree", b"100644 a.txt\0" + bytes.fromhex(blob))
    top, top_data = _loose(b"tree", b"40000 sub\0" + bytes.fromhex(sub) +
                           b"160000 module\0" + bytes(20))  # a submodule's commit: not here
    commit, commit_data = _loose(b"commit", b"tree %s\nauthor a <a@x> 0 +0000\n\nmsg\n" % top.encode())
    root = tmp_path / "p"
    files = {".git/HEAD": b"ref: refs/heads/main\n", ".git/index": b"i", ".git/logs/HEAD": b"l",
             ".git/objects/pack/pack-1.idx": b"x", ".git/packed-refs": b"p",
             ".git/refs/heads/main": commit.encode(), "a.txt": b"a", "zzz.txt": b"z"}
    for oid, data in ((blob, blob_data), (sub, sub_data), (top, top_data), (commit, commit_data)):
        files[f".git/objects/{oid[:2]}/{oid[2:]}"] = data
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / ".git/objects/pack/pack-1.pack").write_bytes(b"p" * _sync.BIG_FILE)
    assert git.stage(f".git/objects/{blob[:2]}/{blob[2:]}", data=blob_data) == git.BLOBS
    assert git.stage(f".git/objects/{top[:2]}/{top[2:]}", data=top_data) == git.OBJECTS
    planner = Planner(str(root), _sync.MirrorFilter(str(root)), delete=True)
    plan = planner.plan(set(files) | {".git/objects/pack/pack-1.pack", ".git/objects/12/gone"},
                        deleted={".git/objects/12/gone"})
    stages = [([(op, rel) for op, rel, *_ in stage.ops], list(stage.big)) for stage in plan.stages()]
    put = _agent.OP_PUT
    assert stages == [
        ([(put, f".git/objects/{blob[:2]}/{blob[2:]}"), (put, "a.txt"), (put, "zzz.txt")],
         [".git/objects/pack/pack-1.pack"]),
        ([(put, ".git/objects/pack/pack-1.idx")], []),
        ([(put, f".git/objects/{oid[:2]}/{oid[2:]}") for oid in (sub, top, commit)], []),
        ([(put, rel) for rel in (".git/HEAD", ".git/index", ".git/logs/HEAD", ".git/packed-refs",
                                 ".git/refs/heads/main")], []),
        ([(_agent.OP_DELETE, ".git/objects/12/gone")], [])]
    assert plan.big == [".git/objects/pack/pack-1.pack"] and plan.deletes == [".git/objects/12/gone"]
    # a commit read by a whole-tree pass whose tree (and that tree's subtree) were written after
    # their folders were listed: they come from the watcher before the trees and commits go
    calls: list[int] = []

    def catch_up() -> Plan | None:
        calls.append(1)
        if len(calls) > 1:
            return None
        return planner.plan({f".git/objects/{oid[:2]}/{oid[2:]}" for oid in (sub, top)})

    planner.sent.clear()
    late = planner.plan({f".git/objects/{commit[:2]}/{commit[2:]}", ".git/refs/heads/main"},
                        catch_up=catch_up)
    order = [rel for stage in late.stages() for _, rel, *_ in stage.ops]
    assert order == [f".git/objects/{oid[:2]}/{oid[2:]}" for oid in (sub, top, commit)] + [
        ".git/refs/heads/main"], order
    assert len(calls) == 2  # before the trees and commits, and before the names
    # before the deletes of packed objects, once the stages before are in place: what git wrote
    # meanwhile (the pack that holds the objects now: a second gc may have deleted the one this
    # batch sent) goes first
    (root / ".git/objects/pack/pack-2.pack").write_bytes(b"q" * _sync.BIG_FILE)
    calls.clear()

    def pack_meanwhile() -> Plan | None:
        calls.append(1)
        return planner.plan({".git/objects/pack/pack-2.pack"})

    gc = planner.plan({".git/objects/12/gone2", ".git/refs/heads/main"}, deleted={".git/objects/12/gone2"},
                      catch_up=pack_meanwhile)
    extras, kinds = [], []
    for stage in gc.stages():  # as the channel sends them: each read once the one before is sent
        extras.append(gc.catch_up_before(stage))
        kinds.append(sorted({op for op, *_ in stage.ops}))
    # the first stage; pack-2 caught up before the names; the names; the deletes
    assert kinds == [[], [], [_agent.OP_PUT], [_agent.OP_DELETE]]
    assert [e is not None for e in extras] == [False, False, False, True] and len(calls) == 2
    late_pack = extras[3]
    assert late_pack is not None and (list(late_pack), late_pack.big) == (
        [], [".git/objects/pack/pack-2.pack"])
    assert planner.plan({".git/objects/12/gone2"}, deleted={".git/objects/12/gone2"}).catch_up_before(
        Stage()) is None  # a catch-up's own plan asks nothing further
    # an object folder gc emptied and a commit filled again is the same folder: nothing deleted
    again = planner.plan({f".git/objects/{top[:2]}"}, added={f".git/objects/{top[:2]}"},
                         deleted={f".git/objects/{top[:2]}"})
    assert _agent.OP_DELETE not in [op for op, *_ in again]


def records(server: dict[str, Entry]) -> list[tuple[bytes, bytes, bool]]:
    """The agent's R_FOLDER records for a listing (a folder before those in it; the top's in two)."""
    folders: dict[str, list[bytes]] = {"": []}
    for rel in sorted(server):
        folder, _, name = rel.rpartition("/")
        e = server[rel]
        folders.setdefault(folder, []).append(_agent.LIST_ENTRY.pack(
            len(name.encode()), e.mode, e.mtime_ns, e.size, len(e.target)) + name.encode() + e.target)
        if stat.S_ISDIR(e.mode):
            folders.setdefault(rel, [])
    out = []
    for folder in sorted(folders, key=lambda f: (f.count("/") + bool(f), f)):
        parts = folders[folder]
        if not folder and len(parts) > 1:  # a big folder comes in several records
            out.append((b"", b"".join(parts[:1]), True))
            parts = parts[1:]
        out.append((folder.encode(), b"".join(parts), False))
    return out


def test_the_comparison_against_the_servers_listing(tmp_path: Path) -> None:
    root = tmp_path / "p"
    (root / "d").mkdir(parents=True)
    (root / "d" / "same").write_bytes(b"same")
    (root / "d" / "newer").write_bytes(b"newer")
    (root / "l").symlink_to("d")
    (root / "x.pyc").write_bytes(b"skip")
    (root / "new" / "deep").mkdir(parents=True)
    (root / "new" / "deep" / "f").write_bytes(b"f")
    (root / "__pycache__").mkdir()
    st = {n: os.lstat(root / n) for n in ("d", "d/same", "d/newer")}

    def entry(name: str, **change: object) -> Entry:
        s = st[name]
        fields = {"mode": s.st_mode, "size": s.st_size, "mtime_ns": s.st_mtime_ns, "target": b""}
        return Entry(**{**fields, **change})  # type: ignore[arg-type]

    server = {"d": entry("d"), "d/same": entry("d/same"),
              "d/newer": entry("d/newer", mtime_ns=st["d/newer"].st_mtime_ns - 10**9),
              "l": Entry(stat.S_IFDIR | 0o755, 0, 0, b""),  # a folder there, a link here
              "l/inside": Entry(stat.S_IFREG | 0o644, 1, 0, b""),
              "only-there": Entry(stat.S_IFREG | 0o644, 1, 0, b"")}
    flt = _sync.MirrorFilter(str(root))
    watched: list[str] = []

    def compare(server: dict[str, Entry]) -> Compare:
        c = Compare(str(root), flt, lambda path, rel: watched.append(rel))
        for folder, data, more in records(server):
            c.record(folder, data, more)
        return c

    c = compare(server)
    # never what exists only on the server; a new folder whole (the plan walks it), not its files
    assert c.paths == {"d/newer", "l"} and c.added == {"new"} and c.nbytes == 5
    assert c.server_files == 4 and c.local_files == 3  # d/same, d/newer, l (new/ not walked)
    assert c.count_local(3) == 3 and c.count_local(10) == 4  # new/ walked only when needed
    assert watched == ["", "d"]  # each folder compared is watched before it is listed
    # a server that keeps whole seconds: the same second is the same time
    coarse = {**server, "d/newer": entry("d/newer", mtime_ns=st["d/newer"].st_mtime_ns // 10**9 * 10**9)}
    assert compare(coarse).paths == {"l"}
    # a mode that differs is a difference; a link's target too
    (root / "d" / "same").chmod(0o600)
    (root / "l").unlink()
    (root / "l").symlink_to("elsewhere")
    server["l"] = Entry(stat.S_IFLNK | 0o777, 0, 0, b"elsewhere")
    assert compare(server).paths == {"d/newer", "d/same"}
    assert scan_local(str(root), _sync.MirrorFilter(str(root))) == (4, 8, 10)


def test_a_delete_that_travels_last_is_dropped_when_git_made_the_path_again(tmp_path: Path) -> None:
    """A gc empties ``objects/d6`` (git removes the folder) and the plan, reading it gone, puts its
    delete last; before the deletes go, a commit writes ``objects/d6/74f5`` and this batch's
    earlier stages send it. The folder's delete then went after it and took the commit from the
    server: a copy cut there was broken (the cut test failed 6 times in 6 once the agent started
    30 ms sooner). Each late delete is sent only when its path is still gone here."""
    root = tmp_path / "p"
    (root / ".git" / "objects" / "12").mkdir(parents=True)
    (root / ".git" / "HEAD").write_bytes(b"ref: refs/heads/main\n")
    planner = Planner(str(root), _sync.MirrorFilter(str(root)), delete=True)
    plan = planner.plan({".git/objects/d6", ".git/objects/12/gone", ".git/HEAD"},
                        deleted={".git/objects/d6", ".git/objects/12/gone"})
    late: list[tuple[bytes, str]] = []
    for stage in plan.stages():
        ops = [(op, rel) for op, rel, *_ in stage.ops]
        if ops == [(_agent.OP_PUT, ".git/HEAD")]:  # the names: the deletes come next
            commit, data = _loose(b"commit", b"tree %s\n\nmsg\n" % (b"0" * 40))
            (root / ".git" / "objects" / "d6").mkdir()
            (root / ".git" / "objects" / "d6" / commit[2:]).write_bytes(data)
        late = ops
    assert late == [(_agent.OP_DELETE, ".git/objects/12/gone")], late
