"""The laptop's folder: looked at without following links, changed only through a confined writer.

Everything the runtime sends is applied through :class:`colab_remote._agent.Tree` (the same writer
that confines the mirror on a server): each path checked (no ``..``, no absolute path, not the
trash), every folder on the way opened with ``O_NOFOLLOW`` from the folder's own descriptor, modes
masked (no setuid, setgid, group or world write), files written under a temporary name and renamed
into place, new folders built whole in the staging folder, and every replaced or deleted file kept
in ``.colab-remote-trash`` (pruned by age and by a byte budget). On top of the tree, this side
refuses what the runtime may never write here (:func:`rules.protected`) and links that point out
of the folder (:func:`rules.link_inside`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .. import _agent
from .._agent import rules
from .._agent import syncfs as fs
from .base import Entry

log = logging.getLogger("colab_remote.sync")


def enc(rel: str) -> bytes:
    return os.fsencode(rel)


class Refused(Exception):
    """The runtime sent something this side never takes (a protected path, a link out)."""


class Local:
    """The laptop's folder (``root``), its tree and its big files arriving."""

    def __init__(self, root: str) -> None:
        self.root = root
        Path(root).mkdir(parents=True, exist_ok=True)
        self.tree = _agent.Tree(enc(root))
        self.partials = fs.Partials(self.tree)
        self.errors: list[list[str]] = []

    def close(self) -> None:
        self.partials.close()
        self.tree.close()

    # --- looking -----------------------------------------------------------------------------------
    def entry(self, rel: str) -> Entry | None:
        return Entry.of(fs.stat_at(self.tree.root_fd, enc(rel)))

    def read(self, rel: str, limit: int) -> tuple[Entry, bytes]:
        """A small file's entry (with its digest) and bytes; OSError/ValueError when it is gone,
        no longer a plain file, too big or changing."""
        st, data = fs.read_whole(self.tree.root_fd, enc(rel), limit)
        return Entry(st[0], st[1], st[2], b"", _agent.digest(data)), data

    def digest(self, rel: str) -> Entry | None:
        try:
            st, digest = fs.digest_of(self.tree.root_fd, enc(rel))
        except (OSError, ValueError):
            return None
        return Entry(st[0], st[1], st[2], b"", digest)

    def open(self, rel: str) -> int:
        return fs.open_file(self.tree.root_fd, enc(rel))

    def scan(self, flt: rules.Rules, folder: str = "") -> dict[str, Entry]:
        """Every synced entry (below ``folder``)."""
        if not folder:
            return {os.fsdecode(r): Entry(*st) for r, st in fs.walk(self.tree.root_fd, flt)}
        fd = fs.open_parent(self.tree.root_fd, enc(folder) + b"/x")
        if fd is None:
            return {}
        try:
            return {os.fsdecode(r): Entry(*st) for r, st in fs.walk(fd, flt, enc(folder))}
        finally:
            os.close(fd)

    def gitignores(self, flt: rules.Rules) -> dict[str, list[str]]:
        """The ``.gitignore`` files of the folder (``{folder: lines}``), found through ``flt``."""
        found: dict[str, list[str]] = {}
        for rel, _ in fs.walk(self.tree.root_fd, flt):
            if rel == b".gitignore" or rel.endswith(b"/.gitignore"):
                try:
                    _, data = fs.read_whole(self.tree.root_fd, rel, 1 << 20)
                except (OSError, ValueError):
                    continue
                found[os.fsdecode(rel.rpartition(b"/")[0])] = rules.parse_lines(
                    data.decode("utf-8", "replace"))
        return found

    # --- changing (the runtime's changes, after the caller's checks) -------------------------------
    def holds(self, rel: str, want: Entry | None) -> bool:
        """``rel`` is still what the decision saw (a guard against the user's own edit meanwhile)."""
        return fs.matches(fs.stat_at(self.tree.root_fd, enc(rel)), fs.ABSENT if want is None else want.stat)

    def check(self, rel: str, entry: Entry | None, protect: tuple[rules.Rule, ...]) -> None:
        """Refuse what the runtime may never write here."""
        _agent.check_path(enc(rel))
        if rules.protected(rel, protect):
            raise Refused(f"{rel}: the runtime's version of this path is never applied on the laptop")
        if entry is not None and entry.is_link and not rules.link_inside(rel, entry.target):
            raise Refused(f"{rel}: a link out of the folder ({entry.target!r}) is not taken from the runtime")

    def put(self, rel: str, entry: Entry, data: bytes) -> None:
        self.tree.put(enc(rel), entry.mode, entry.mtime_ns, data)

    def mkdir(self, rel: str, entry: Entry) -> None:
        self.tree.mkdir(enc(rel), entry.mode)

    def link(self, rel: str, entry: Entry) -> None:
        self.tree.link(enc(rel), entry.target)

    def delete(self, rel: str) -> None:
        self.tree.delete(enc(rel))

    def join(self, rel: str, entry: Entry) -> None:
        self.partials.join(enc(rel), entry.mode, entry.mtime_ns, entry.size, entry.digest)

    def finish(self) -> list[list[str]]:
        """End of a batch: new folders into place; the errors of the batch."""
        errors: list[list[str]] = []
        self.tree.finish(errors)
        self.tree.live.forget()  # the user renames folders: look them up afresh next time
        return errors

    def upkeep(self, keep_days: float, budget: int) -> None:
        try:
            removed = fs.upkeep(self.tree, keep_days, budget)
            self.partials.clean()
            self.tree.clean_staging()
        except OSError as e:
            log.warning("the laptop's trash: %s", e)
            return
        if removed:
            log.info("trash over its budget: removed %d of its oldest folders", len(removed))
