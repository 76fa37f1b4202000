"""The soak's own machinery (bench/soak_mirror.py): its tree comparison and its random work.

Pure tests on temporary folders, no sshd, no root: the checks must see every kind of difference,
and the work must be reproducible from its seed. (The soak itself, ``soak(60)``, needs root and a
mirror; it is not run here.)
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from bench.soak_mirror import (
    FAULTS,
    TRASH,
    Digests,
    Work,
    all_digests,
    compare,
    meta_snapshot,
    snapshot,
    soak,
)


def make(root: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for rel, target in (links or {}).items():
        (root / rel).symlink_to(target)


def test_compare_names_missing_stale_ghost_mode_and_temp(tmp_path: Path) -> None:
    local, server = tmp_path / "local", tmp_path / "server"
    odd = "new\nline\tand tab é"
    make(local, {"same": b"1", "missing": b"2", "stale": b"3", f"d/{odd}": b"4", "mode": b"5"},
         {"link": "same", "link2": "same"})
    make(server, {"same": b"1", "stale": b"3!", f"d/{odd}": b"4", "mode": b"5", "ghost/x": b"6",
                  "d/.f.colab-remote-tmp.123": b"", f"{TRASH}/2024/missing": b"2"},
         {"link": "same", "link2": "other"})
    os.chmod(local / "mode", 0o600)
    os.chmod(server / "mode", 0o644)
    d = compare(snapshot(local, Digests()), snapshot(server, Digests()))
    assert d.missing == ["missing"]
    assert sorted(d.stale) == ["link2", "stale"]
    assert sorted(d.ghost) == ["ghost", "ghost/x"]
    assert d.mode == ["mode"]
    assert d.temp == ["d/.f.colab-remote-tmp.123"]
    assert not d.clean and d.count() == 7
    assert "1 missing: 'missing'" in d.describe()
    # the trash is not part of the copy, but its versions count
    assert compare(snapshot(local, Digests()), snapshot(local, Digests())).clean
    digests = Digests()
    found = all_digests(server, digests)
    assert snapshot(local, digests)["missing"].digest in found


def test_a_folder_replaced_by_a_file_is_stale(tmp_path: Path) -> None:
    local, server = tmp_path / "local", tmp_path / "server"
    make(local, {"x": b"file"})
    make(server, {"x/inside": b"file"})
    d = compare(snapshot(local, Digests()), snapshot(server, Digests()))
    assert d.stale == ["x"] and d.ghost == ["x/inside"]


def test_meta_snapshot_sees_changes_outside(tmp_path: Path) -> None:
    make(tmp_path, {"keep/a": b"1", "dest/b": b"2"})
    before = meta_snapshot(tmp_path, {tmp_path / "dest"})
    (tmp_path / "dest" / "c").write_bytes(b"ignored")
    assert meta_snapshot(tmp_path, {tmp_path / "dest"}) == before
    (tmp_path / "keep" / "a").write_bytes(b"changed")
    assert meta_snapshot(tmp_path, {tmp_path / "dest"}) != before


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_the_work_is_reproducible_from_its_seed(tmp_path: Path) -> None:
    def run(folder: Path) -> tuple[dict[str, int], list[str]]:
        folder.mkdir()
        work = Work(folder, random.Random(5))
        work.init_repo()
        for _ in range(400):
            work.step()
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                       if ".git" not in p.parts)
        return dict(work.ops), names

    ops_a, tree_a = run(tmp_path / "a")
    ops_b, tree_b = run(tmp_path / "b")
    assert ops_a == ops_b and tree_a == tree_b
    # every kind of operation ran
    for kind in ("create", "overwrite", "same-size rewrite", "delete", "rename file", "chmod",
                 "symlink", "git commit"):
        assert ops_a.get(kind), (kind, ops_a)
    assert any("\n" in n or "\t" in n for n in tree_a)


def test_versions_that_stood_long_enough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.soak_mirror as sm

    clock = [100.0]
    monkeypatch.setattr(sm.time, "monotonic", lambda: clock[0])
    work = Work(tmp_path, random.Random(1))
    work.write(tmp_path / "a", b"first")
    clock[0] += 10
    work.write(tmp_path / "a", b"second")      # "first" stood 10 s
    work.write(tmp_path / "b", b"brief")
    clock[0] += 1
    work.remove(tmp_path / "b")                # "brief" stood 1 s: not required
    lived = work.lived_versions([], since=0)
    assert list(lived.values()) == [str(tmp_path / "a")]
    assert work.lived_versions([(104.0, 105.0)], since=0) == {}   # a fault overlapped it


def test_soak_refuses_unknown_faults() -> None:
    if os.geteuid() != 0:
        with pytest.raises(PermissionError):
            soak(1)
        return
    with pytest.raises(ValueError, match="unknown faults"):
        soak(1, faults=("meteor",))
    assert "disk-full" in FAULTS
