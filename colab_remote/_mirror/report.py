"""What the mirror process says about itself: its status file and the first sync's progress.

:func:`colab_remote.mirror` (in the user's process) draws its progress bar from the status file;
in the foreground (``colab-remote mirror``) the bar is drawn in this process through ``on_progress``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import _proc, _sync
from .._daemon import State, StatusFile

STATUS_EVERY = 1.0      # s: the status file at most this often while something changes
PROGRESS_EVERY = 0.1    # s: the first sync's progress this often

ProgressSink = Callable[[str, float | None, str], None]  # (phase, fraction, text)


class Reporter:
    """The mirror's ``status.json``: its state, stats, last error and the sync's progress."""

    def __init__(self, run_dir: Path, static: dict[str, Any],
                 snapshot: Callable[[], dict[str, Any]]) -> None:
        self.file = StatusFile(run_dir / "status.json")
        self.static = static          # what never changes (pid, folder, destination, port, ...)
        self.snapshot = snapshot      # the live stats
        self.state = State.STARTING
        self.error: str | None = None
        self.error_detail: dict[str, str] | None = None
        self.master_pid: int | None = None
        self.progress: dict[str, Any] | None = None
        self.on_progress: ProgressSink | None = None
        self.dirty = True
        self.written = 0.0

    def write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and (not self.dirty or now - self.written < STATUS_EVERY):
            return
        failed = self.state is State.FAILED
        stats = self.snapshot()
        self.file.write({**self.static, "pid": os.getpid(), "master_pid": self.master_pid,
                         "updated": time.time(), "stats": stats, "state": self.state.value,
                         "last_error": self.error if failed else stats.get("last_error"),
                         "error": self.error if failed else None,
                         "error_detail": self.error_detail if failed else None,
                         "progress": self.progress})
        self.written = now
        self.dirty = False

    def set_state(self, state: State) -> None:
        self.state = state
        self.dirty = True
        self.write(force=True)

    def phase(self, phase: str, items: int, nbytes: int) -> Progress:
        return Progress(self, phase, items, nbytes)

    def show(self, phase: str, fraction: float | None, text: str, final: bool) -> None:
        if self.on_progress is not None:
            self.on_progress(phase, fraction, text)
        self.progress = {"phase": phase, "fraction": fraction, "text": text}
        now = time.monotonic()
        if final or now - self.written >= PROGRESS_EVERY:
            self.dirty = True
            self.write(force=True)


class Progress:
    """One sync's progress (restore, first push): what is done of ``items`` and ``nbytes``; both
    0: not known (a first push sends new folders as it reads them), the counts alone are shown."""

    def __init__(self, reporter: Reporter, phase: str, items: int, nbytes: int) -> None:
        self.reporter, self.phase, self.items, self.nbytes = reporter, phase, max(items, 1), nbytes
        self.estimate = (items or None, nbytes or None)  # for rsync: 0 means not known
        self.known = bool(items or nbytes)
        self.done_items = self.done_bytes = 0

    def add(self, items: int, nbytes: int) -> None:
        self.done_items += items
        self.done_bytes += nbytes
        self._show(False)

    def done(self) -> None:
        if self.known:
            self.done_items, self.done_bytes = self.items, self.nbytes
        self._show(True)

    def _show(self, final: bool) -> None:
        if not self.known:
            text = f"{self.done_bytes / 1e6:.1f} MB, {self.done_items:,} files"
            self.reporter.show(self.phase, 1.0 if final else None, text, final)
            return
        fraction = min(1.0, max(self.done_items / self.items,
                                self.done_bytes / self.nbytes if self.nbytes else 0.0))
        text = f"{self.done_bytes / 1e6:.1f} MB, {min(self.done_items, self.items):,}/{self.items:,} files"
        self.reporter.show(self.phase, fraction, text, final)

    def rsync_output(self) -> Callable[[bytes], None]:
        """An ``on_output`` for rsync ``--info=progress2`` (the no-agent way), measured against
        ``items`` (entries rsync lists) and ``nbytes`` (see :meth:`_sync.RsyncProgress.done`)."""
        reader = _sync.RsyncProgressReader()

        def on_output(chunk: bytes) -> None:
            found = reader.feed(chunk)
            if found is None:
                if self.reporter.on_progress is not None:
                    self.reporter.on_progress(self.phase, None, "")
                return
            entries, size = self.estimate
            fraction = found.done(entries, size)
            self.reporter.show(self.phase, fraction, _sync.describe_progress(found, entries),
                               fraction >= 1)

        return on_output


class SyncMark:
    """``synced``: a time before which every change here is on the server (0600, replaced whole).

    A file rewritten while no mirror ran, with its size and modification time as they were (a
    restore from an archive, ``cp -p``, a tool that keeps times), looks the same to the comparison;
    its ``ctime`` cannot be set back. A mirror started again sends every file whose ``ctime`` is
    after the mark its predecessor left, as a killed one left it. ``MARGIN``: the kernel's
    timestamps come from a coarser clock than ours.
    """

    MARGIN = 1_000_000_000  # ns

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "synced"

    def read(self) -> int | None:
        try:
            return int(self.path.read_text())
        except (OSError, ValueError):
            return None

    def write(self, t_ns: int) -> None:
        """Every change made before ``t_ns`` (``time.time_ns()``) is on the server."""
        _proc.write_private(self.path, str(t_ns - self.MARGIN))


def trash_text(trash: dict[str, Any] | None) -> str:
    """What the server's trash holds and what was pruned (the card's trash row)."""
    if not trash:
        return f"deleted and overwritten files: {_sync.TRASH}/ on the server"
    text = (f"{trash.get('bytes', 0) / 1e6:.1f} MB, {trash.get('versions', 0)} versions "
            f"(at most {trash.get('limit', 0) / 1e6:.1f} MB now)")
    pruned = trash.get("pruned") or {}
    if pruned.get("versions") or pruned.get("folders"):
        why = ", ".join(f"{PRUNED.get(k, k)}: {v}" for k, v in (pruned.get("reasons") or {}).items())
        text += (f"; pruned {pruned.get('versions', 0)} versions, "
                 f"{pruned.get('bytes', 0) / 1e6:.1f} MB ({why})")
    return text


PRUNED = {"cap": "over trash_max_gb", "space": "disk space low", "full": "disk full",
           "age": "older than keep_days"}
