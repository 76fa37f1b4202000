"""The mirror process's life: ``python .../_mirror/boot.py --run-dir DIR`` (detached, its
secret on stdin), or the CLI's foreground mirror; signals, the start, the loop, the shutdown."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from .. import _proc
from .._daemon import State
from ..errors import ColabRemoteError
from .config import MirrorConfig
from .worker import Worker

log = logging.getLogger("colab_remote.mirror")


def run(cfg: MirrorConfig, password: str | None, *, foreground: bool = False,
        early: object = None) -> int:
    """Run one mirror until stopped (SIGTERM, SIGINT, or ``stop`` on the control socket).

    In the foreground a failure to start is raised (the CLI prints it); detached it goes into the
    status file for :func:`colab_remote.mirror` to raise. ``early``: ssh of the first login,
    already started (see :mod:`.boot`).
    """
    worker = Worker(cfg, password, early=early)

    def on_signal(signum: int, frame: object) -> None:
        # Never block in a handler: a helper thread takes the lock and wakes the loop.
        threading.Thread(target=worker.request_stop,
                         args=(cfg.stop_flush if foreground else 2.0,), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    bar = None
    logs: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if foreground:
        from tqdm.contrib.logging import logging_redirect_tqdm

        from .._progress import Bar

        bar = Bar()
        worker.report.on_progress = bar.show
        logs = logging_redirect_tqdm()  # log lines above the bar, not through it
    try:
        worker.control.start()
        try:
            with logs:
                worker.start()
            if bar is not None:
                bar.close(done=True)
        except ColabRemoteError as e:
            worker.report.error_detail = {"type": type(e).__name__, "what": e.what,
                                          "log_tail": e.log_tail, "fix": e.fix}
            worker.set_state(State.FAILED, str(e))
            if foreground:
                raise
            log.error("%s", e)
            return 1
        except Exception as e:
            log.exception("the mirror failed to start")
            worker.set_state(State.FAILED, f"{type(e).__name__}: {e}")
            return 1
        if foreground:
            print(f"mirroring {cfg.local_dir} -> {cfg.destination} (Ctrl-C stops)", flush=True)
        try:
            worker.loop()
        except Exception as e:
            log.exception("the mirror failed")
            worker.set_state(State.FAILED, f"{type(e).__name__}: {e}")
            return 1
        worker.set_state(State.STOPPED)
        return 0
    finally:
        if bar is not None:
            bar.close(done=False)
        worker.shutdown()
        if worker.state is not State.FAILED:
            worker.report.state = State.STOPPED
        worker.report.write(force=True)


def main(argv: list[str] | None = None, early: object = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m colab_remote._mirror")
    parser.add_argument("--run-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    cfg = MirrorConfig.load(args.run_dir)
    password = _proc.receive_secret() if cfg.has_secret else None
    return run(cfg, password, early=early)
