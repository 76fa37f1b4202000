"""What :mod:`.actions` and :mod:`.pause` use of the engine (the engine imports them, so they
name its interface here instead of importing it)."""

from __future__ import annotations

from typing import Any, Protocol

from .._agent import rules
from .base import Base, Entry
from .config import SyncConfig
from .link import Link
from .local import Local


class Core(Protocol):
    cfg: SyncConfig
    base: Base
    local: Local
    link: Link | None
    stats: dict[str, Any]
    remote_over: dict[str, Entry | None]
    inline: dict[str, tuple[Entry, bytes]]
    requeue: set[str]
    protect: tuple[rules.Rule, ...]
    rescan_due: float | None

    def post(self, *item: Any) -> None: ...
    def announce(self, text: str) -> None: ...
    def remote(self, rel: str) -> Entry | None: ...
    def settle(self, rel: str, entry: Entry | None) -> None: ...
    def conflict(self, record: dict[str, Any]) -> None: ...
    def refused(self, rel: str, why: str) -> None: ...
    def tree_forget(self) -> None: ...
    def later(self, rel: str, delay: float) -> None: ...
    def process(self, paths: set[str], known: dict[str, Entry] | None = None, *,
                hold: bool = True) -> None: ...
