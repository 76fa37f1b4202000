"""One authenticated ssh ControlMaster: what the tunnel, the mirror and the set-up all log in with.

ssh runs on its own pseudo-terminal (echo off from the first byte, so a typed password never comes
back in what we log); its prompts are answered from the one table in :mod:`_ssh` (the password at
most once); it is logged in once its control socket exists, and every later command (the forward,
the agent, rsync) goes through that socket without another handshake. :meth:`Master.pump` reads
without blocking, so the tunnel's supervisor can drive several at once from its own loop;
:meth:`Master.wait` blocks until logged in, for everyone else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import _proc, _ssh


class LoginFailed(Exception):
    """ssh ended (or was ended) before it logged in: ``kind`` from :func:`_ssh.classify`."""

    def __init__(self, kind: str, message: str, output: str) -> None:
        super().__init__(message)
        self.kind, self.message, self.output = kind, message, output


class Master:
    """``ssh -N -o ControlMaster=yes -o ControlPath=...`` on a pty, with its prompts answered.

    ``ssh`` is the client for commands through the control socket (when ``argv`` runs gcloud).
    ``on_line`` gets each line ssh prints (and each prompt, with what was answered): the caller's
    log. Lines are kept (the last 30) for the failure message.
    """

    def __init__(self, argv: Sequence[str], control_path: Path, secret: str | None, *,
                 ssh: str | None = None, env: dict[str, str] | None = None,
                 on_line: Callable[[str], None] | None = None) -> None:
        self.argv = list(argv)
        self.ssh = ssh or self.argv[0]  # the client that talks to the control socket (argv may be gcloud)
        self.control_path = control_path
        self.responder = _ssh.Responder(secret)
        self.env = env if env is not None else dict(os.environ, LC_ALL="C")
        self.on_line = on_line or (lambda line: None)
        self.child: Any = None
        self.lines: list[str] = []
        self.partial = ""
        self.failure: tuple[str, str] | None = None
        self.started = 0.0

    def start(self, child: Any = None) -> Master:
        """Start ssh; or take ``child``, the same argv started already (see ``_mirror.boot``)."""
        if child is None:
            with contextlib.suppress(FileNotFoundError):
                self.control_path.unlink()
        self.started = time.monotonic()
        self.child = child if child is not None else _proc.spawn_pty(self.argv, env=self.env)
        return self

    @property
    def pid(self) -> int:
        return int(self.child.pid)

    @property
    def fd(self) -> int:
        return int(self.child.child_fd)

    @property
    def alive(self) -> bool:
        return self.child is not None and self.child.isalive()

    @property
    def ready(self) -> bool:
        """Logged in: ssh creates the control socket only then."""
        return self.alive and self.control_path.exists()

    def pump(self) -> None:
        """Read what ssh printed (never blocking) and answer a prompt that ends it."""
        import pexpect

        while self.child is not None:
            try:
                data = self.child.read_nonblocking(4096, timeout=0)
            except (pexpect.TIMEOUT, pexpect.EOF, OSError, ValueError):
                return
            if not data:
                return
            self._feed(data)

    def _feed(self, data: str) -> None:
        text = self.partial + data.replace("\r", "")
        *complete, self.partial = text.split("\n")
        for line in complete:
            if line.strip():
                self.on_line(line.strip())
                self.lines = [*self.lines[-30:], line.strip()]
        kind = _ssh.prompt_kind(self.partial) if self.partial.strip() else None
        if kind is None:
            return
        reply, failure = self.responder.answer(kind)
        shown = {"new_passphrase": " (empty)", "continue": " Y", "host_key": " no"}.get(kind, "")
        self.on_line(self.partial.strip() + shown)
        self.partial = ""
        if failure is not None:
            self.failure = failure
        if reply is not None:
            self.child.sendline(reply)
        elif failure is not None:
            self.end(timeout=1)

    def output(self) -> str:
        """ssh's last lines (what a failure message shows)."""
        return "\n".join([*self.lines[-15:], self.partial]).strip()

    def why(self) -> LoginFailed:
        """Why this master did not log in (after it ended)."""
        output = self.output()
        kind, text = self.failure or ("", "")
        if not kind:
            kind = _ssh.classify(output)
        last = output.splitlines()[-1] if output else "ssh ended before logging in"
        return LoginFailed(kind, f"{text}: {last}" if text else last, output)

    def wait(self, timeout: float) -> Master:
        """Block until logged in; :class:`LoginFailed` (kind ``timeout`` after ``timeout`` s)."""
        import select

        deadline = time.monotonic() + timeout
        while not self.ready:
            if not self.alive:
                self.pump()
                failed = self.why()
                self.end()
                raise failed
            left = deadline - time.monotonic()
            if left <= 0:
                output = self.output()
                self.end()
                raise LoginFailed("timeout", f"no login within {timeout:g} s", output)
            with contextlib.suppress(OSError, ValueError):  # the socket appears silently: look often
                select.select([self.fd], [], [], min(left, 0.005))
            self.pump()
        return self

    def mux(self, *args: str, options: Sequence[str] = ()) -> list[str]:
        """A command through this master (see :func:`_ssh.mux_argv`)."""
        return _ssh.mux_argv(self.ssh, self.control_path, *args, options=options)

    def terminate(self) -> None:
        """SIGTERM without waiting (:meth:`end` several at once, then wait for each)."""
        if self.child is not None and self.alive:
            _proc.send_signal(self.pid, signal.SIGTERM)

    def end(self, timeout: float = 2) -> None:
        """SIGTERM (ssh closes its connection cleanly), then SIGKILL; the control socket goes."""
        if self.child is not None:
            _proc.end_pty(self.child, timeout=timeout)
        with contextlib.suppress(FileNotFoundError):
            self.control_path.unlink()

    @property
    def exit_text(self) -> str:
        """``exit status N`` or ``signal N`` once ssh ended."""
        if self.child is None:
            return "not started"
        status = self.child.exitstatus
        return f"exit status {status}" if status is not None else f"signal {self.child.signalstatus}"
