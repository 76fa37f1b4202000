"""The sync's process: the laptop's watcher, the connection (and waiting for it), the engine.

Detached (``python -m colab_remote._twoway --run-dir D``, from :func:`colab_remote.sync`) or in
the foreground (``colab-remote sync``: the plan, conflicts and questions on the terminal). It
writes ``status.json`` (state, stats, conflicts, the question when paused) and answers ``stats``,
``flush S``, ``resume ACTION`` and ``stop`` on its control socket. When the runtime goes away it
waits (state ``waiting``, not an error), trying again with a backoff, and compares both sides
when it is back: a new runtime behind the same alias (its folder lacks this sync's marker) is
filled from the laptop.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .. import _proc
from .._daemon import Backoff, State
from .._mirror.control import ControlServer
from .._mirror.report import Reporter
from .._mirror.watch import Watcher
from ..errors import ColabRemoteError, SyncError
from .base import Base
from .config import SyncConfig
from .engine import Engine, rules_safe
from .link import Link
from .local import Local

log = logging.getLogger("colab_remote.sync")

STATUS_EVERY = 1.0


class Worker:
    """One sync (see the module docstring)."""

    def __init__(self, cfg: SyncConfig, password: str | None, *, foreground: bool = False) -> None:
        self.cfg, self.foreground = cfg, foreground
        self.base = Base(Path(cfg.run_dir) / "base.sqlite")
        self.local = Local(cfg.local_dir)
        self.engine = Engine(cfg, self.base, self.local, announce=self.announce)
        self.link = Link(cfg, password, self.engine.on_event, self.engine.on_lost)
        self.report = Reporter(Path(cfg.run_dir), {
            "id": cfg.id, "local_dir": cfg.local_dir, "remote": cfg.remote, "sock_dir": cfg.sock_dir},
            self.engine.snapshot)
        self.control = ControlServer(Path(cfg.sock_dir) / "ctl", self.answer)
        self.watcher: Watcher | None = None
        self.stopping = False
        self.comparing = False
        self.hello: dict[str, Any] = {}
        self.status_lock = threading.Lock()
        self.last_status: tuple[Any, ...] = ()

    # --- what it says ---------------------------------------------------------------------------------
    def state(self) -> State:
        if self.report.state in (State.FAILED, State.STOPPED):
            return self.report.state
        if self.engine.pause.active:
            return State.PAUSED
        if self.comparing:
            return State.COMPARING
        if self.engine.connected:
            return State.UP
        return self.report.state

    def write_status(self) -> None:
        with self.status_lock:
            self._write_status()

    def _write_status(self) -> None:
        """The status file, rewritten only when something in it changed (an idle sync writes
        nothing)."""
        state = self.state()
        self.report.master_pid = self.link.master_pid
        self.report.static["runtime"] = {k: self.hello.get(k)
                                         for k in ("boot_id", "root", "python", "watch", "pid")}
        now = (state, self.report.master_pid, json.dumps(self.engine.snapshot(), sort_keys=True, default=str))
        if now == self.last_status:
            return
        self.last_status = now
        if state is not self.report.state:
            self.report.set_state(state)
        else:
            self.report.dirty = True
            self.report.write(force=True)

    def announce(self, text: str) -> None:
        """A line the user should see now: the terminal (foreground) and the desktop."""
        if self.foreground:
            with contextlib.suppress(OSError):
                print(rules_safe(text), flush=True)
        if self.cfg.notify:
            threading.Thread(target=desktop_notification, args=(rules_safe(text),), daemon=True).start()

    def answer(self, words: list[str]) -> dict[str, Any]:
        try:
            return self._answer(words)
        finally:
            with contextlib.suppress(Exception):
                self.write_status()  # what the command changed, in the status file at once

    def _answer(self, words: list[str]) -> dict[str, Any]:
        if words[0] == "stats":
            return {**self.engine.snapshot(), "state": self.state().value}
        if words[0] == "flush":
            timeout = float(words[1]) if len(words) > 1 else 60.0
            if self.watcher is not None and not self.watcher.sync(min(timeout, 10)):
                return {"ok": False, "reason": "timeout"}
            reason = self.engine.flush(timeout)
            return {"ok": not reason, "reason": reason, "stats": self.engine.snapshot()}
        if words[0] == "resume" and len(words) == 2:
            return self.resume(words[1])
        if words[0] == "stop":
            self.stop()
            return {"ok": True}
        return {"error": f"unknown command {words[0]!r}"}

    def resume(self, action: str, timeout: float = 30) -> dict[str, Any]:
        done: dict[str, Any] = {}
        event = threading.Event()
        self.engine.post("resume", action, (event, done))
        if not event.wait(timeout):
            return {"ok": False, "text": "the sync did not answer (still connecting?)"}
        return done

    def stop(self) -> None:
        self.stopping = True
        self.engine.stop()

    # --- running --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Watch the laptop's folder, connect, compare. Raises our errors when it cannot."""
        self.control.start()
        self.report.set_state(State.CONNECTING)
        watcher = self.watcher = Watcher(self.cfg.local_dir, self.engine.filter,  # type: ignore[arg-type]
                                         self.engine.deliver, self.engine.events_lost)
        if watcher.bell.fd < 0:
            watcher.idle_check = 0.02  # no inotify (macOS): nothing rings, so look often
        root = self.cfg.local_dir
        self.engine.actions.watch_folder = lambda rel: watcher.bell.add(os.path.join(root, rel), rel)
        watcher.start()
        if not self.watcher.ready.wait(600) or self.watcher.error is not None:
            raise SyncError(f"cannot watch {self.cfg.local_dir}: {self.watcher.error}",
                            fix="check the folder is readable; raise fs.inotify.max_user_watches for "
                                "big trees")
        watcher.watch_all()  # the doorbell watches only the folders it is given (the local scan
        # lists without it); new folders are added as they come (engine: _local_change)
        self.connect()

    def connect(self) -> None:
        self.hello = self.link.open(self.engine.rules.to_json())
        log.info("connected to %s: peer pid %s, python %s, %s, runtime boot %s", self.cfg.host,
                 self.hello.get("pid"), self.hello.get("python"), self.hello.get("watch"),
                 self.hello.get("boot_id"))
        self.comparing = True
        self.write_status()
        try:
            plan = self.engine.attach(self.link, self.hello)
        finally:
            self.comparing = False
        if self.foreground:
            print(rules_safe(plan["text"]), flush=True)
        self.write_status()

    def loop(self) -> None:
        status = threading.Thread(target=self._status_loop, name="status", daemon=True)
        status.start()
        while not self.stopping:
            why = self.engine.serve()
            self.link.close()
            if self.stopping or why == "stop":
                break
            log.warning("the runtime is away (%s): waiting for it", why)
            self.engine.stats["last_error"] = f"the runtime is away: {why}"
            self.report.set_state(State.WAITING)
            self.wait_for_runtime()

    def wait_for_runtime(self) -> None:
        backoff = Backoff(0.5, 5.0)
        said, said_at = "", 0.0
        while not self.stopping:
            try:
                self.connect()
                self.engine.stats["reconnects"] += 1
                log.info("the runtime is back")
                return
            except Exception as e:  # our error (no login yet), or the link broke while comparing
                why = e.what if isinstance(e, ColabRemoteError) else f"{type(e).__name__}: {e}"
                self.link.close()
                if why != said or time.monotonic() - said_at > 60:  # a line a minute, not one a try
                    log.info("still waiting for the runtime: %s", why)
                    said, said_at = why, time.monotonic()
                self.engine.stats["last_error"] = f"waiting for the runtime: {why}"[:500]
            self.report.set_state(State.WAITING)
            with self.engine.cond:
                self.engine.cond.wait_for(lambda: self.stopping, backoff.next())

    def _status_loop(self) -> None:
        while not self.stopping:
            with contextlib.suppress(Exception):
                self.write_status()
            time.sleep(STATUS_EVERY)

    def shutdown(self) -> None:
        self.stopping = True
        if self.watcher is not None:
            self.watcher.stop()
        self.control.close()
        self.link.close()
        self.base.close()
        self.local.close()
        if Path(self.cfg.sock_dir) != Path(self.cfg.run_dir):
            with contextlib.suppress(OSError):
                Path(self.cfg.sock_dir).rmdir()


def desktop_notification(text: str) -> None:
    """Say ``text`` on the desktop where a notifier and a display are (best effort, argv only:
    a file name from the runtime never reaches a shell or a script's text)."""
    if sys.platform == "darwin" and shutil.which("osascript"):
        argv = ["osascript", "-e", "on run argv", "-e", 'display notification (item 1 of argv) with title '
                '"colab-remote sync"', "-e", "end run", text]
    elif (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) and shutil.which("notify-send"):
        argv = ["notify-send", "--app-name=colab-remote", "--", "colab-remote sync", text]
    else:
        return
    _proc.run(argv, timeout=10, check=False)


def run(cfg: SyncConfig, password: str | None, *, foreground: bool = False) -> int:
    """Run one sync until stopped (SIGTERM, SIGINT, ``stop`` on the control socket).

    In the foreground a failure to start is raised and a pause asks on the terminal; detached, a
    failure goes into the status file for :func:`colab_remote.sync` to raise.
    """
    worker = Worker(cfg, password, foreground=foreground)

    def on_signal(signum: int, frame: object) -> None:
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if not foreground:
        signal.signal(signal.SIGINT, on_signal)
    try:
        try:
            worker.start()
        except ColabRemoteError as e:
            worker.report.error_detail = {"type": type(e).__name__, "what": e.what,
                                          "log_tail": e.log_tail, "fix": e.fix}
            worker.report.error = str(e)
            worker.report.set_state(State.FAILED)
            if foreground:
                raise
            log.error("%s", e)
            return 1
        if foreground:
            return _foreground(worker)
        worker.loop()
        return 0
    except Exception as e:
        log.exception("the sync failed")
        worker.report.error = f"{type(e).__name__}: {e}"
        worker.report.set_state(State.FAILED)
        if foreground:
            raise
        return 1
    finally:
        worker.shutdown()
        if worker.report.state is not State.FAILED:
            worker.report.state = State.STOPPED
        worker.report.write(force=True)


def _foreground(worker: Worker) -> int:
    """``colab-remote sync``: the loop in a thread; here, Ctrl-C and the questions of a pause."""
    thread = threading.Thread(target=worker.loop, name="sync", daemon=True)
    thread.start()
    print(f"syncing {worker.cfg.local_dir} <-> {worker.cfg.remote} (Ctrl-C stops)", flush=True)
    asked = ""
    try:
        while thread.is_alive():
            thread.join(0.2)
            info = worker.engine.pause.info()
            if info is None or not sys.stdin.isatty() or info["question"] == asked:
                continue
            asked = info["question"]
            choice = input(f"answer {'/'.join(info['actions'])} (or Ctrl-C to stop): ").strip()
            if choice:
                print(worker.resume(choice).get("text", ""), flush=True)
                asked = ""
    except (KeyboardInterrupt, EOFError):
        print("stopping", flush=True)
    worker.stop()
    thread.join(30)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m colab_remote._twoway")
    parser.add_argument("--run-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    cfg = SyncConfig.load(args.run_dir)
    password = _proc.receive_secret() if cfg.has_secret else None
    return run(cfg, password)
