"""When the sync stops and asks instead of acting.

- ``first``: the first comparison found files changed on both sides (both versions would be kept,
  the runtime's under a new name); without ``yes`` it waits for ``resume("yes")``.
- ``mass-delete``: one side deleted a large share of the tree within seconds (an ``rm -rf *``, a
  runtime recycled to an empty folder): nothing is deleted on the other side until
  ``resume("delete")`` (delete there too, into its trash) or ``resume("restore")`` (bring the
  files back from the other side). mutagen halts its two-way-safe sessions the same way.

While paused, changes are collected and decided once the sync goes on.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core import Core

log = logging.getLogger("colab_remote.sync")

ACTIONS = {"first": ("yes",), "mass-delete": ("delete", "restore")}


class Pause:
    """The engine's pause: why, the question, what waits."""

    def __init__(self, engine: Core) -> None:
        self.e = engine
        self.kind = ""
        self.side = ""
        self.paths: list[str] = []
        self.question = ""
        self.waiting: set[str] = set()

    @property
    def active(self) -> bool:
        return bool(self.kind)

    def info(self) -> dict[str, Any] | None:
        if not self.kind:
            return None
        return {"kind": self.kind, "side": self.side, "question": self.question, "count": len(self.paths),
                "examples": self.paths[:10], "actions": list(ACTIONS[self.kind])}

    def _set(self, kind: str, side: str, paths: list[str], question: str) -> None:
        self.kind, self.side, self.paths, self.question = kind, side, paths, question
        log.warning("paused (%s): %s", kind, question)
        self.e.announce("colab-remote sync paused: " + question)

    def ask_first(self, plan: dict[str, Any], paths: set[str]) -> None:
        self.waiting |= paths
        self._set("first", "", [], plan["text"] + ". Go on with resume('yes') (colab-remote sync "
                  "--resume yes), or stop the sync.")

    def mass_delete(self, side: str, paths: list[str], count: int, tracked: int) -> None:
        other = "laptop" if side == "runtime" else "runtime"
        where = "in the runtime" if side == "runtime" else "on the laptop"
        self._set("mass-delete", side, paths,
                  f"{count} of {tracked} paths were deleted {where} within seconds: nothing was deleted "
                  f"on the {other}. resume('delete') deletes them there too (into its trash); "
                  f"resume('restore') brings them back {where} from the {other}")

    def resume(self, action: str, reply: tuple[threading.Event, dict[str, Any]] | None) -> set[str]:
        """Go on with ``action``; the paths to decide now."""
        def answer(ok: bool, text: str) -> set[str]:
            if reply is not None:
                reply[1].update(ok=ok, text=text)
                reply[0].set()
            return set()

        if not self.kind:
            return answer(False, "the sync is not paused")
        if action not in ACTIONS[self.kind]:
            return answer(False, f"the sync is paused ({self.kind}): resume with one of "
                                 f"{', '.join(ACTIONS[self.kind])}")
        kind, paths = self.kind, set(self.paths)
        waiting, self.waiting = self.waiting, set()
        self.kind, self.side, self.paths, self.question = "", "", [], ""
        if kind == "mass-delete" and action == "restore":
            for rel in paths:
                self.e.base.set(rel, None)  # no common state: the side that has it brings it back
        if kind == "mass-delete":
            self.e.process(paths, hold=False)
        log.info("resumed (%s): %s, %d paths", kind, action, len(paths))
        answer(True, f"resumed: {action}")
        return waiting
