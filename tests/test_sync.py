"""The mirror's pure pieces in _sync: the filter, rsync's argv and its progress lines."""

from __future__ import annotations

from colab_remote import _sync

TRASH = _sync.TRASH

# Real rsync 3.x output (--info=progress2 --no-inc-recursive), captured on a tree of 3,000 small
# files and one 30 MB file: records start with \r, the last one ends with \n.
RSYNC_FIRST = ("\r         32,768   0%    0.00kB/s    0:00:00  "
               "\r     30,000,000  83%  539.23MB/s    0:00:00 (xfr#1, to-chk=3001/3003)"
               "\r     30,002,000  83%  539.26MB/s    0:00:00 (xfr#2, to-chk=2999/3003)"
               "\r     35,802,000  99%   91.45MB/s    0:00:00 (xfr#2902, to-chk=99/3003) "
               "\r     36,000,000 100%   87.28MB/s    0:00:00 (xfr#3001, to-chk=0/3003)\n")
RSYNC_NOTHING = ("\r              0   0%    0.00kB/s    0:00:00 (xfr#0, to-chk=0/3003)"
                 "\r              0   0%    0.00kB/s    0:00:00 (xfr#0, to-chk=0/3003)\n")
RSYNC_TWO_CHANGED = ("\r              2   0%    0.00kB/s    0:00:00  "
                     "\r              2   0%    0.00kB/s    0:00:00 (xfr#1, to-chk=554/3003)"
                     "\r          2,002   0%    1.91MB/s    0:00:00 (xfr#2, to-chk=332/3003)"
                     "\r          2,002   0%    1.91MB/s    0:00:00 (xfr#2, to-chk=0/3003)  \n")


def test_filter_drives_watchfiles_and_rsync() -> None:
    f = _sync.MirrorFilter("/p", ["*.log", "data/", "build/out"])
    assert f.excluded("x/__pycache__/m.cpython-311.pyc")
    assert f.excluded("a.pyc") and f.excluded(".ipynb_checkpoints/n.ipynb")
    assert f.excluded(TRASH) and f.excluded(f"{TRASH}/2026/x")
    assert f.excluded("logs/run.log") and f.excluded("data/big.bin") and f.excluded("build/out/a")
    assert not f.excluded(".git/objects/ab/cdef") and not f.excluded("build/keep")
    assert not f.excluded("src/main.py")
    from watchfiles import Change
    assert f(Change.added, "/p/src/main.py") and not f(Change.added, "/p/a.pyc")
    assert not f(Change.added, "/elsewhere/x")
    args = f.rsync_args()
    assert f"--exclude=/{TRASH}/" in args and "--exclude=__pycache__" in args
    assert "--exclude=*.log" in args and "--exclude=/build/out" in args


def test_filter_patterns_anchored_and_by_name() -> None:
    # all patterns of a kind are one regex: each must still match the whole name or path
    f = _sync.MirrorFilter("/p", ["a?c", "/top/*.x", "[ab]*.tmp"])
    assert f.excluded("q/abc") and not f.excluded("q/abcd") and not f.excluded("xabc")
    assert f.excluded("top/q.x") and f.excluded("top/q.x/in") and not f.excluded("s/top/q.x")
    assert f.excluded("d/b1.tmp") and not f.excluded("d/c1.tmp")
    assert f.excluded(f"d/.f{_sync.TMP_INFIX}12") and not f.excluded("d/f.colab")


def test_argv_builders_have_no_delete() -> None:
    push_argv = _sync.rsync_push_argv("rsync", "ssh -S x", "/l", "u@h:d", filters=["--exclude=a"],
                                      backup_dir=f"{TRASH}/t")
    assert not any(a.startswith("--delete") for a in push_argv)
    assert push_argv[-2:] == ["/l/", "u@h:d/"] and "--backup" in push_argv
    files = _sync.rsync_files_argv("rsync", "ssh", "/l", "u@h:d", backup_dir=None)
    assert "-lptI" in files and "--from0" in files
    pull = _sync.rsync_pull_argv("rsync", "ssh", "u@h:d", "/l", filters=[])
    assert "--update" in pull and not any(a.startswith("--delete") for a in pull)
    script = _sync.remote_delete_script(["a b/c'd"], "T", backup=True)
    assert "mv -f -- 'a b/c'\"'\"'d'" in script


def test_rsync_progress_parsing() -> None:
    p, rest = _sync.rsync_progress(RSYNC_FIRST)
    assert rest == "" and p is not None
    assert (p.bytes, p.percent, p.rate, p.files, p.checked, p.total) == (
        36_000_000, 100, "87.28MB/s", 3001, 3003, 3003)
    assert p.fraction == 1.0
    assert _sync.describe_progress(p) == "36.0 MB, 3,003/3,003 files, 87.28MB/s"
    # cut inside the last record: the one before is the latest complete one
    cut = RSYNC_FIRST.index("\r     36,000,000") + 8
    p, rest = _sync.rsync_progress(RSYNC_FIRST[:cut])
    assert p is not None and p.checked == 3003 - 99 and rest == RSYNC_FIRST[cut - 8:cut].lstrip("\r")
    assert 0.96 < p.fraction < 1
    # the first record has no counts yet; a big first file moves the bar by bytes
    p, _ = _sync.rsync_progress(RSYNC_FIRST[:RSYNC_FIRST.index("\r     30,000,000")] + "\r")
    assert p is not None and (p.bytes, p.percent, p.files, p.total) == (32_768, 0, None, None)
    p, _ = _sync.rsync_progress(RSYNC_FIRST[:RSYNC_FIRST.index("\r     30,002,000")] + "\r")
    assert p is not None and p.fraction == 0.83 and p.checked == 2
    # nothing to send, or little: rsync's percent stays 0, the files checked say it is done
    p, _ = _sync.rsync_progress(RSYNC_NOTHING)
    assert p is not None and p.percent == 0 and p.fraction == 1.0
    p, _ = _sync.rsync_progress(RSYNC_TWO_CHANGED.rsplit("\r", 1)[0] + "\r")
    assert p is not None and p.fraction == (3003 - 332) / 3003
    p, _ = _sync.rsync_progress(RSYNC_TWO_CHANGED)
    assert p is not None and p.fraction == 1.0
    # incremental recursion (total unknown), -h sizes, another locale's separators
    p, _ = _sync.rsync_progress("105.45M  13%  602.83kB/s    0:02:50 (xfr#495, ir-chk=1020/3825)\n")
    assert p is not None and (p.bytes, p.total, p.done(None, 811_150_000)) == (
        105_450_000, None, 105_450_000 / 811_150_000)
    p, _ = _sync.rsync_progress("\r      1.800.000 100%    5,46MB/s    0:00:00 (xfr#600, to-chk=0/631)\n")
    assert p is not None and p.bytes == 1_800_000 and p.fraction == 1.0
    # not progress at all
    assert _sync.rsync_progress("rsync: [sender] some warning\n")[0] is None
    assert _sync.rsync_progress("")[0] is None
    # fed in small pieces, as a pipe delivers it
    reader = _sync.RsyncProgressReader()
    seen = [p for i in range(0, len(RSYNC_FIRST), 7)
            if (p := reader.feed(RSYNC_FIRST[i:i + 7].encode())) is not None]
    assert [q.bytes for q in seen] == [32_768, 30_000_000, 30_002_000, 35_802_000, 36_000_000]
    assert reader.last == seen[-1]
    # only the first sync asks rsync for progress; a push keeps incremental recursion
    argv = _sync.rsync_push_argv("rsync", "ssh", "/l", "u@h:d", filters=[], backup_dir=None)
    assert "--info=progress2" not in argv
    argv = _sync.rsync_push_argv("rsync", "ssh", "/l", "u@h:d", filters=[], backup_dir=None,
                                 progress=True)
    assert "--info=progress2" in argv and "--no-inc-recursive" not in argv
    pull = _sync.rsync_pull_argv("rsync", "ssh", "u@h:d", "/l", filters=[], progress=True)
    assert "--info=progress2" in pull and "--no-inc-recursive" in pull


def test_rsync_progress_while_rsync_still_lists() -> None:
    # Real rsync output of a push with incremental recursion: 100 folders of 200 files of 200
    # bytes (20,101 entries with the folders and the top one, 4,000,000 bytes).
    first, mid, last = (
        "\r            200   0%    0.00kB/s    0:00:00 (xfr#1, ir-chk=1199/1301)",
        "\r      1,880,400  88%    1.50MB/s    0:00:01 (xfr#9402, ir-chk=1198/10701)",
        "\r      4,000,000 100%    1.22MB/s    0:00:03 (xfr#20000, to-chk=0/20101)\n")
    p, _ = _sync.rsync_progress(mid + "\r")
    assert p is not None and (p.checked, p.total, p.percent) == (10701 - 1198, None, 88)
    # rsync's 88 % is of what it listed so far: not used; our own count of the tree is
    assert p.fraction == 0.0
    assert p.done(20101, 4_000_000) == (10701 - 1198) / 20101
    assert p.done(None, 4_000_000) == 1_880_400 / 4_000_000
    assert _sync.describe_progress(p, 20101) == "1.9 MB, 9,503/20,101 files, 1.50MB/s"
    p, _ = _sync.rsync_progress(first + "\r")
    assert p is not None and p.done(20101, 4_000_000) == 102 / 20101
    # a low estimate never says "done" before rsync does
    p, _ = _sync.rsync_progress(mid + "\r")
    assert p is not None and p.done(100, 1000) == 0.99
    p, _ = _sync.rsync_progress(first + mid + last)
    assert p is not None and p.total == 20101 and p.done(20101, 4_000_000) == 1.0
