"""What the tunnel's supervisor and the mirror's worker share, and their handles.

Both are "a detached process that holds an authenticated ssh ControlMaster (:mod:`_master`), with a
typed config written once by the caller, a status file it rewrites, a state, a backoff, and a handle
that finds and stops it from a fresh process". The pieces of that, once:

- :class:`Config`: a frozen dataclass read from and written to ``config.json`` (no secret in it);
- :class:`State`: one vocabulary for the status file, the handles' ``state``, ``repr`` and cards;
- :class:`StatusFile`: ``status.json`` (0600), rewritten only when it changed;
- :class:`Backoff`: how long to wait after failures in a row;
- :class:`Handle`: ``alive``, ``pid``, ``state``, ``logs()``, ``stop()``, a context manager, and
  :meth:`Handle.find` for every one recorded in a state folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from . import _proc

C = TypeVar("C", bound="Config")
H = TypeVar("H", bound="Handle")


def default_state_dir() -> Path:
    """Where the sshd, the tunnels, the mirrors and the keys of this runtime are recorded."""
    return Path("~/.colab_remote").expanduser()


def state_path(state_dir: object) -> Path:
    """``state_dir`` as an absolute path (default ``~/.colab_remote``); ValueError/TypeError if unusable."""
    if state_dir is None:
        return default_state_dir()
    if not isinstance(state_dir, (str, os.PathLike)):
        raise TypeError(f"state_dir must be a path, got {state_dir!r}")
    state = Path(state_dir).expanduser().absolute()
    if state.exists() and not state.is_dir():
        raise ValueError(f"state_dir {state} exists and is not a folder")
    return state


def socket_dir(run_dir: Path) -> Path:
    """A short private folder for a process's unix sockets (a socket path must stay under 108
    bytes, and ssh adds 17 characters to a ControlPath while it sets one up): one per run folder
    under ``/tmp/colab_remote-<uid>`` (ours, 0700, no link: else a fresh one)."""
    base = _proc.private_dir(f"colab_remote-{os.getuid()}")
    folder = base / hashlib.sha256(str(run_dir).encode()).hexdigest()[:12]
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    return folder


class State(str, enum.Enum):
    """Where a tunnel or a mirror is. The same words in the status file, ``repr`` and the cards."""

    STARTING = "starting"
    CONNECTING = "connecting"
    RESTORING = "restoring"
    FIRST_PUSH = "first push"
    UP = "up"
    REFUSED = "refused"  # a mirror whose server refuses some changes (a full disk): retrying
    RECONNECTING = "reconnecting"
    COMPARING = "comparing"      # a two-way sync comparing both sides
    WAITING = "waiting"          # a two-way sync waiting for the runtime to come back
    PAUSED = "paused"            # a two-way sync asking before it goes on
    FAILED = "failed"
    STOPPED = "stopped"

    def __str__(self) -> str:
        return self.value

    @property
    def busy(self) -> bool:
        """On its way (amber in a card), as opposed to up (green), failed (red) or stopped."""
        return self in (State.STARTING, State.CONNECTING, State.RESTORING, State.FIRST_PUSH,
                        State.REFUSED, State.RECONNECTING, State.COMPARING, State.WAITING,
                        State.PAUSED)

    @classmethod
    def of(cls, value: object) -> State:
        """The state a status file holds (STOPPED for anything unknown)."""
        try:
            return cls(str(value))
        except ValueError:
            return cls.STOPPED


@dataclasses.dataclass(frozen=True)
class Config:
    """A detached process's settings: written by the call that starts it, read by the process."""

    run_dir: str

    def __getitem__(self, key: str) -> Any:
        """Read like the dict it used to be (``tunnel.config["remote_port"]``)."""
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def save(self) -> None:
        _proc.write_private(Path(self.run_dir) / "config.json",
                            json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls: type[C], run_dir: Path) -> C:
        """The config in ``run_dir`` (keys this version does not know are ignored)."""
        data = json.loads((run_dir / "config.json").read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class StatusFile:
    """``status.json`` of a detached process: 0600, replaced whole, written only when it changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.written: dict[str, Any] = {}

    def write(self, status: dict[str, Any]) -> None:
        if status != self.written:
            _proc.write_private(self.path, json.dumps(status, indent=1, default=str))
            self.written = dict(status)

    @staticmethod
    def read(path: Path) -> dict[str, Any]:
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            return {}


class Backoff:
    """The wait after failures in a row: ``first`` doubled each time, at most ``cap``."""

    def __init__(self, first: float, cap: float) -> None:
        self.first, self.cap, self.failures = first, cap, 0

    def next(self) -> float:
        self.failures += 1
        return float(min(self.cap, self.first * 2 ** (self.failures - 1)))

    def reset(self) -> None:
        self.failures = 0


class Handle:
    """A tunnel or a mirror, found by its run folder (``state_dir/<kind>/<name>``).

    Everything is read from the files there, so a handle made in a fresh process (a new kernel)
    sees the same process; ``kind`` names the folder, ``log_name`` the log file.
    """

    kind: ClassVar[str] = ""
    log_name: ClassVar[str] = ""
    config_type: ClassVar[type[Config]] = Config

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        try:
            self.config: Any = self.config_type.load(self.run_dir)
        except FileNotFoundError:  # a record from before config.json was written: defaults
            self.config = self.config_type(run_dir=str(self.run_dir))
        # a handle is one process: a later one in the same folder (a re-run cell) is not this one
        self._pid: int | None = self._live_pid(StatusFile.read(self.run_dir / "status.json"))

    def _live_pid(self, data: dict[str, Any]) -> int | None:
        pid = data.get("pid")
        if pid is None:
            pid = _proc.read_pid(self.run_dir / f"{self.log_name}.pid")
        return int(pid) if pid is not None else None

    @classmethod
    def folder(cls, state: Path) -> Path:
        return state / cls.kind

    @classmethod
    def find(cls: type[H], state: Path) -> list[H]:
        """Every one recorded in ``state`` (running or not)."""
        found = []
        top = cls.folder(state)
        if top.is_dir():
            for run_dir in sorted(top.iterdir()):
                if (run_dir / "config.json").is_file():
                    with contextlib.suppress(OSError, ValueError, TypeError):
                        found.append(cls(run_dir))
        return found

    # --- what the process says ------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The process's status file; its state is STOPPED once the process is gone (FAILED stays)."""
        data = StatusFile.read(self.run_dir / "status.json")
        live = self._live_pid(data)
        if self._pid is None:
            self._pid = live  # made before its process started
        elif live != self._pid:  # replaced by a later process in the same folder
            data = {"state": State.STOPPED.value}
        data["pid"] = self._pid
        if not self._ours(data.get("pid")):
            if State.of(data.get("state")) is not State.FAILED:
                data["state"] = State.STOPPED.value
            self._gone(data)
        elif "state" not in data:
            data["state"] = State.STARTING.value  # running, its first status not written yet
        return data

    def _gone(self, status: dict[str, Any]) -> None:
        """What a status says of a process that is not running any more (subclasses clear pids)."""

    def _ours(self, pid: object) -> bool:
        return isinstance(pid, int) and _proc.is_ours(pid, str(self.run_dir))

    @property
    def pid(self) -> int | None:
        pid = self.status().get("pid")
        return int(pid) if pid is not None else None

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self._ours(self.status().get("pid"))

    @property
    def state(self) -> str:
        """starting, connecting, restoring, first push, up, reconnecting, failed or stopped."""
        return State.of(self.status().get("state")).value

    @property
    def last_error(self) -> str:
        return str(self.status().get("last_error") or "")

    def logs(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the process's log (ssh's messages included)."""
        return _proc.tail(self.run_dir / f"{self.log_name}.log", lines)

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self: H) -> H:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _stop_master(self, status: dict[str, Any]) -> None:
        """The process's ssh ControlMaster (a session of its own: it outlives a killed process),
        then its short socket folder in /tmp (``status``: read before the process was stopped)."""
        sock_dir = Path(getattr(self.config, "sock_dir", "") or status.get("sock_dir") or self.run_dir)
        master = status.get("master_pid")
        if isinstance(master, int):
            _proc.stop(master, marker=f"ControlPath={sock_dir / 'cm'}", timeout=2)
        if sock_dir != self.run_dir:
            for name in ("ctl", "cm"):
                with contextlib.suppress(OSError):
                    (sock_dir / name).unlink()
            with contextlib.suppress(OSError):
                sock_dir.rmdir()

    def _stop_process(self, also: Iterable[int] = ()) -> None:
        """SIGTERM to the process group (and ``also``), wait, then SIGKILL: only pids still ours."""
        pid = self.status().get("pid")
        marker = str(self.run_dir)
        others = [p for p in also if _proc.is_ours(p, marker)]
        if self._ours(pid):
            _proc.stop(pid, marker=marker, timeout=5, also=others)
        else:
            for p in others:
                _proc.stop(p, marker=marker, timeout=2)
