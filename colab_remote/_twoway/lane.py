"""Big files' own lane: one thread that feeds the second peer (:attr:`.link.Link.big`).

A big file's parts go over a channel of their own (a second peer on the same ssh master), written
by this thread: the engine never waits for a big file's bytes, and a small edit never queues behind
them in a pipe (ssh shares the connection between the channels by their windows, so at most a
window of the big file's bytes is ahead of it). Reads of big files from the runtime go the same way.
Jobs run in order: a file's ``BIG``, its parts, its ``JOIN``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .link import ConnectionLost, Handler

if TYPE_CHECKING:
    from .link import Link

log = logging.getLogger("colab_remote.sync")

Job = Callable[[], None]


class Lane(threading.Thread):
    """The jobs of one connection, in order (a new connection gets a new lane)."""

    def __init__(self) -> None:
        super().__init__(name="sync-big", daemon=True)
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.start()

    def put(self, job: Job) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        """Stop after the jobs queued (those of a dead connection fail at once)."""
        self.jobs.put(None)

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                job()
            except ConnectionLost:
                pass  # the engine hears of it from the link, and a new connection starts over
            except Exception:
                log.exception("a big file's transfer failed (it is tried again)")


class Channel:
    """Where one connection's big files go: sends only while that connection is the current one
    (the link object lives on across connections)."""

    def __init__(self, link: Link) -> None:
        self.link = link.big
        self.generation = self.link.generation

    def send(self, data: bytes, handler: Handler | None = None) -> None:
        if self.link.generation != self.generation:
            raise ConnectionLost("an earlier connection's transfer")
        self.link.send(data, handler)
