"""What mirror() and push() refuse before anything runs, and what rsync's exit codes mean (issue 13,
items 7-9). Pure tier and real rsync on local folders: no root, no sshd."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from colab_remote import _install, _ssh, _sync
from colab_remote._mirror.checks import prepare
from colab_remote.mirror import mirror, push


def prepared(tmp_path: Path, destination: str, **kw):
    return prepare(tmp_path, destination, port=22, password=None, identity_file=None,
                    state_dir=tmp_path / "state", exclude=kw.get("exclude"), host_key=None)


@pytest.mark.parametrize(("destination", "why"), [
    ("bob@127.0.0.1:backup/../inside", "'..'"),
    ("bob@127.0.0.1:../x", "'..'"),
    ("bob@127.0.0.1:/home/bob/..", "'..'"),
    ("bob@127.0.0.1:~other/project", "~user"),
    ("bob@127.0.0.1:~root", "~user"),
    ("bob@127.0.0.1:*", "glob"),
    ("bob@127.0.0.1:backup/*", "glob"),
    ("bob@127.0.0.1:backup/p?", "glob"),
    ("bob@127.0.0.1:backup/[ab]", "glob"),
    ("bob@127.0.0.1:-rf", "'-'"),
    ("bob@127.0.0.1:./", "must name a folder"),
    ("bob@127.0.0.1:~/", "must name a folder"),
    ("bob@127.0.0.1:~/.colab-remote-trash/x", "inside"),
])
def test_destinations_that_cannot_be_meant_are_refused(tmp_path: Path, destination: str, why: str) -> None:
    state = tmp_path / "state"
    with pytest.raises(ValueError, match=why.replace("?", r"\?")):
        mirror(tmp_path, destination, state_dir=state, quiet=True)
    with pytest.raises(ValueError, match=why.replace("?", r"\?")):
        push(tmp_path, destination, state_dir=state)
    assert not state.exists()  # nothing ran


@pytest.mark.parametrize("exclude", ["*", ["*.log", "*"], "/*", "*/", "?*", "**", ["[a-m]*", "[!a-m]*"]])
def test_exclude_sets_that_leave_nothing_are_refused(tmp_path: Path, exclude) -> None:
    with pytest.raises(ValueError, match="leaves nothing to mirror"):
        mirror(tmp_path, "bob@127.0.0.1:backup/p", state_dir=tmp_path / "state", exclude=exclude,
               quiet=True)
    assert not (tmp_path / "state").exists()


def test_ordinary_excludes_and_spellings_are_taken(tmp_path: Path) -> None:
    for exclude in (["*.log", "data/", "/build", ".git"], "*.*", "[!.]*", ".*"):
        assert _sync.check_excludes(exclude)
    # one folder, one spelling: one mirror id, one key, one run folder (issue 13, item 7)
    spellings = ["proj", "~/proj", "proj/", "./proj", "~/proj//", "proj/."]
    found = {str(prepared(tmp_path, f"bob@127.0.0.1:{s}")["dest"]) for s in spellings}
    assert found == {"bob@127.0.0.1:proj"}
    assert str(prepared(tmp_path, "bob@127.0.0.1:/srv/x//y/")["dest"]) == "bob@127.0.0.1:/srv/x/y"
    assert str(prepared(tmp_path, "bob@[::1]:a/./b")["dest"]) == "bob@[::1]:a/b"
    assert _ssh.parse_destination("bob@h:we~ird/na-me", with_path=True).path == "we~ird/na-me"


def test_rsync_never_hands_the_remote_path_to_a_shell() -> None:
    """-s: the paths travel in rsync's protocol (an rsync older than 3.2.4 gives them to the
    remote shell unquoted otherwise), for the whole-tree pass, the file lists and the restore."""
    for argv in (_sync.rsync_push_argv("rsync", "ssh", "/l", "u@h:d", filters=[], backup_dir=None),
                 _sync.rsync_files_argv("rsync", "ssh", "/l", "u@h:d", backup_dir=None),
                 _sync.rsync_pull_argv("rsync", "ssh", "u@h:d", "/l", filters=[])):
        assert "-s" in argv, argv


def test_a_file_deleted_before_rsync_read_it_is_no_error(tmp_path: Path) -> None:
    """rsync's exit 23 with only link_stat / vanished lines for files that are gone here is not an
    error (issue 13, item 9); any other message, or a file that is there after all, is."""
    rsync = _install.find_program("rsync")
    if rsync is None:
        pytest.skip("rsync is not installed")
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "here.txt").write_text("here")
    listed = b"here.txt\0gone.txt\0sub/gone-too.txt\0"
    old = subprocess.run([rsync, "-lptI", "--from0", "--files-from=-", f"{src}/", f"{dst}/"],
                         input=listed, capture_output=True, timeout=30)
    output = (old.stdout + old.stderr).decode()
    assert old.returncode == 23 and "link_stat" in output, output
    assert _sync.rsync_exit_ok(23, output)
    assert not _sync.only_vanished(output, exists=lambda p: True)  # there after all: an error
    assert not _sync.rsync_exit_ok(23, "")
    denied = ('rsync: [sender] send_files failed to open "/x/y": Permission denied (13)\n'
              "rsync error: some files/attrs were not transferred (see previous errors) (code 23)")
    assert not _sync.rsync_exit_ok(23, denied)
    assert not _sync.rsync_exit_ok(23, output + "rsync: [Receiver] mkstemp \"/d/.x\" failed: "
                                   "No space left on device (28)\n")
    assert _sync.rsync_exit_ok(24, "file has vanished: \"/x\"") and not _sync.rsync_exit_ok(12, "")
    # what the mirror runs now: the same list is no error at all
    argv = _sync.rsync_files_argv(rsync, "ssh", str(src), str(dst), backup_dir=None)
    argv = [a for a in argv if a not in ("-e", "ssh")]
    done = subprocess.run(argv, input=listed, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert (dst / "here.txt").read_text() == "here"


@pytest.mark.parametrize(("kw", "error"), [
    ({"trash_share": 0}, ValueError), ({"trash_share": 1.5}, ValueError),
    ({"trash_share": -0.1}, ValueError), ({"trash_share": "half"}, TypeError),
    ({"trash_share": True}, TypeError), ({"trash_max_gb": 0}, ValueError),
    ({"trash_max_gb": -1}, ValueError), ({"trash_max_gb": float("inf")}, ValueError),
    ({"trash_max_gb": float("nan")}, ValueError), ({"trash_max_gb": None}, TypeError),
])
def test_the_trash_budget_is_checked_before_anything_runs(tmp_path: Path, kw, error) -> None:
    with pytest.raises(error, match="trash_"):
        mirror(tmp_path, "bob@127.0.0.1:backup/p", state_dir=tmp_path / "state", quiet=True, **kw)
    assert not (tmp_path / "state").exists()


def test_the_trash_text_on_the_card() -> None:
    from colab_remote._mirror.report import trash_text

    assert ".colab-remote-trash" in trash_text(None)
    text = trash_text({"bytes": 12_300_000, "versions": 45, "folders": 7, "limit": 9_000_000,
                        "pruned": {"versions": 22, "bytes": 80_000_000, "folders": 5,
                                   "reasons": {"space": 20, "full": 2}, "last": "full"}})
    assert text == ("12.3 MB, 45 versions (at most 9.0 MB now); pruned 22 versions, 80.0 MB "
                    "(disk space low: 20, disk full: 2)")
