"""sync(): one folder on the laptop and one in the runtime, kept the same both ways.

Run on the laptop (Linux or macOS; no root, no sshd; ssh, rsync-free, Python 3.10+) with the alias
that ``tunnel.ssh_config()`` printed: edit locally, run in the runtime, outputs come back. The
laptop coordinates and holds the last common state; the runtime only runs a small peer that
reports its changes and writes what the laptop sends. The runtime is not trusted: what it sends is
applied on the laptop through the same confined writer as the mirror's server half (no ``..``, no
link followed, no setuid, modes masked, the trash), never to git's config or hooks or an editor's
task folders, and it gets nothing else from the laptop (no shell, no agent, no forwards).

The work happens in a detached process (:mod:`colab_remote._twoway`); :class:`Sync` is its handle
and :func:`find_syncs` finds it again from a fresh process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from . import _access, _html, _install, _proc, _ssh
from ._agent import rules
from ._daemon import Handle, State, StatusFile, socket_dir, state_path
from ._html import announce
from ._mirror import checks
from ._mirror.control import query
from ._twoway.config import SyncConfig
from .errors import AuthenticationError, SyncError

__all__ = ["Sync", "find_syncs", "sync"]

log = logging.getLogger(__name__)

SETTLED = ("up", "paused", "failed", "stopped", "waiting")
_REMOTE = re.compile(r"((?:[A-Za-z_][A-Za-z0-9_.-]{0,31}@)?"            # user@ (optional)
                     r"(?:\[[0-9A-Fa-f:.%]+\]|[A-Za-z0-9_][A-Za-z0-9_.%-]*))"  # [v6] or a name
                     r":(.*)", re.S)


class Sync(Handle):
    """A running two-way sync (or the record of one). Start it with :func:`sync`.

    Example:
        >>> s = sync("~/project", "colab:/content/project")  # doctest: +SKIP
        >>> s.flush(); s.conflicts                           # doctest: +SKIP
        []
    """

    kind = "sync"
    log_name = "sync"
    config_type = SyncConfig
    config: SyncConfig

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir)
        self.local_dir: str = self.config.local_dir
        self.remote: str = self.config.remote

    @property
    def _sock(self) -> Path:
        return Path(self.config.sock_dir or self.run_dir) / "ctl"

    @property
    def stats(self) -> dict[str, Any]:
        """Files and bytes each way, deletes, conflicts, what is pending, the last error, the
        runtime's boot id (live from the process; from its status file once it stopped)."""
        live = query(self._sock, "stats", 2) if self.alive else None
        if live is not None:
            return live
        return dict(self.status().get("stats") or {})

    @property
    def conflicts(self) -> list[dict[str, Any]]:
        """Every conflict kept so far: ``path`` (the laptop's version, on both sides), ``copy``
        (the runtime's version, on both sides), ``time``, what each side held."""
        try:
            return list(json.loads((self.run_dir / "conflicts.json").read_text()))
        except (OSError, ValueError):
            return []

    @property
    def question(self) -> str | None:
        """Why the sync is paused and what :meth:`resume` takes (None while it is not)."""
        paused = (self.stats or {}).get("paused")
        return str(paused["question"]) if paused else None

    @property
    def plan(self) -> dict[str, Any] | None:
        """What the last comparison of both sides found (counts, and ``text``)."""
        found = (self.stats or {}).get("plan")
        return dict(found) if found else None

    def flush(self, timeout: float = 60) -> None:
        """Wait until every change made before the call (on either side) is on the other side.

        Raises:
            SyncError: not done within ``timeout``, the sync is paused, or the runtime is away
                (nothing is lost: it goes on when it can).
        """
        _check_seconds("timeout", timeout)
        if not self.alive:
            raise SyncError("the sync is not running", log_tail=self.logs(),
                            fix="start it again with sync(...)")
        reply = query(self._sock, f"flush {timeout:g}", timeout + 15)
        if reply is None or not reply.get("ok"):
            reason = (reply or {}).get("reason") or "no answer"
            fix = {"paused": f"answer its question: {self.question}",
                   "disconnected": "the runtime is away: the sync waits for it and goes on by itself"
                   }.get(reason, "see .logs(); the sync keeps every change and goes on")
            raise SyncError(f"the sync did not settle within {timeout:g} s ({reason})",
                            log_tail=self.logs(5), fix=fix)

    def resume(self, action: str = "yes") -> str:
        """Answer a pause: ``"yes"`` (go on after the first comparison), ``"delete"`` (a mass
        delete: delete on the other side too, into its trash) or ``"restore"`` (bring the deleted
        files back from the other side). Returns what the sync said.

        Raises:
            ValueError: the sync is not paused, or not for that.
        """
        if action not in ("yes", "delete", "restore"):
            raise ValueError(f"action must be 'yes', 'delete' or 'restore', got {action!r}")
        reply = query(self._sock, f"resume {action}", 40) if self.alive else None
        if reply is None:
            raise SyncError("the sync is not running", log_tail=self.logs(),
                            fix="start it again with sync(...)")
        if not reply.get("ok"):
            raise ValueError(str(reply.get("text") or reply))
        return str(reply.get("text", ""))

    def stop(self, timeout: float = 30) -> None:
        """Stop the sync (what is on its way is finished first, for at most ``timeout``
        seconds). Safe to call twice."""
        status = self.status()
        if self.alive:
            query(self._sock, "stop", 2)
            _proc.wait_until(lambda: not self.alive, timeout, interval=0.02)
        self._stop_process()
        self._stop_master(status)

    def __repr__(self) -> str:
        s = self.stats
        extra = f", paused: {s['paused']['kind']}" if s.get("paused") else ""
        return (f"<Sync {self.local_dir} <-> {self.remote} {self.state}, {s.get('pushed', 0)} up, "
                f"{s.get('pulled', 0)} down, {s.get('conflicts', 0)} conflicts{extra}, pid {self.pid}>")

    def _repr_html_(self) -> str:
        s = self.stats
        last = s.get("last_change")
        rows = [("laptop", self.local_dir), ("runtime", self.remote), ("pid", str(self.pid)),
                ("to the runtime", f"{s.get('pushed', 0)} files, {s.get('bytes_pushed', 0)} bytes"),
                ("to the laptop", f"{s.get('pulled', 0)} files, {s.get('bytes_pulled', 0)} bytes"),
                ("conflicts", str(s.get("conflicts", 0))),
                ("last change", time.strftime("%H:%M:%S", time.localtime(last)) if last else "none"),
                ("last error", str(s.get("last_error") or "none"))]
        if s.get("paused"):
            rows.append(("question", s["paused"]["question"]))
        return _html.card("sync", State.of(self.state), rows)


def _check_seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def parse_remote(remote: object) -> tuple[str, str]:
    """``host:path`` (``host``: an alias of ~/.ssh/config, or ``user@host``) as (host, path).

    >>> parse_remote("colab:/content/project"), parse_remote("root@[::1]:work")
    (('colab', '/content/project'), ('root@::1', 'work'))
    """
    if not isinstance(remote, str):
        raise TypeError(f"remote must be a str like 'colab:/content/project', got {remote!r}")
    found = _REMOTE.fullmatch(remote)
    if found is None:
        raise ValueError(f"remote {remote!r} must be HOST:PATH, HOST being the alias that "
                         "tunnel.ssh_config() printed (e.g. colab:/content/project) or user@host")
    host, path = found.group(1).replace("[", "").replace("]", ""), found.group(2)
    if not path or path.strip("/") == "" or path in (".", "~", "~/"):
        raise ValueError(f"remote {remote!r}: the runtime's folder must be a folder path, not '/' or "
                         "the home folder (e.g. /content/project)")
    if ".." in path.split("/") or "\0" in path or "\n" in path:
        raise ValueError(f"remote {remote!r}: the path must not contain '..', NUL or a newline")
    return host, path[2:] if path.startswith("~/") else path


def _local_dir(local_dir: object) -> str:
    """The laptop's folder: never one whose files decide what runs on the laptop."""
    path = checks.local_dir_of(local_dir, "sync()")
    home = os.path.realpath(os.path.expanduser("~"))
    if path == home or home.startswith(path.rstrip("/") + "/"):
        raise ValueError(f"local_dir {path} holds your home folder: the runtime could then write your "
                         "shell's start-up files and ~/.ssh; sync a project folder (e.g. ~/project)")
    inside = os.path.relpath(path, home).split(os.sep)
    if not path.startswith(home + "/") and path.startswith(("/etc", "/usr", "/bin", "/sbin", "/var/lib")):
        raise ValueError(f"local_dir {path} is a system folder; sync a project folder")
    if path.startswith(home + "/") and inside[0].startswith("."):
        raise ValueError(f"local_dir {path} is inside {os.path.join(home, inside[0])}: folders like "
                         "~/.ssh, ~/.config, ~/.local hold what runs on the laptop; sync a project folder")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"local_dir {path}: {parent} is not writable by this user")
    return path


def _file(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, got {value!r}")
    path = os.path.abspath(os.path.expanduser(os.fspath(value)))
    if not os.path.isfile(path):
        raise ValueError(f"{name} {path} does not exist")
    return path


def _patterns(name: str, value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a glob pattern or a list of them, got {value!r}")
    return [rules.check_pattern(p) for p in value]


def in_runtime() -> bool:
    """True inside a Colab runtime (where ``sync()``'s other side is the laptop by default)."""
    return bool(os.environ.get("COLAB_RELEASE_TAG"))


def _side(remote_side: object, host: str) -> str:
    if remote_side is None:
        remote_side = "laptop" if in_runtime() else "runtime"
    if remote_side not in ("runtime", "laptop"):
        raise ValueError(f"remote_side must be 'runtime' (sync() runs on the laptop) or 'laptop' "
                         f"(it runs in the runtime), got {remote_side!r}")
    if remote_side == "laptop" and "@" not in host:
        raise ValueError(f"from the runtime, remote must name the laptop's account: "
                         f"user@host:path (e.g. me@192.0.2.10:project), got host {host!r}")
    return str(remote_side)


def _prepare(local_dir: object, remote: object, *, port: object = None, password: object = None,
             identity_file: object = None, ssh_config: object = None, state_dir: object = None,
             exclude: object = None, gitignore: object = True, protect: object = None,
             mass_delete: object = 0.5, yes: object = False, keep_days: object = 7,
             trash_gb: object = 2.0, notify: object = True, remote_side: object = None) -> SyncConfig:
    """Every argument checked (ValueError/TypeError before anything runs), as a config."""
    local = _local_dir(local_dir)
    host, path = parse_remote(remote)
    side = _side(remote_side, host)
    if side == "laptop":
        _ssh.parse_destination(host)
        if ssh_config is not None:
            raise ValueError("ssh_config is for a sync started on the laptop: from the runtime "
                             "the login is port=, password= or identity_file= alone")
    if port is not None:
        _ssh.check_port(port)
    if password is not None:
        _ssh.check_password(password)
    for name, flag in (("gitignore", gitignore), ("yes", yes), ("notify", notify)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if isinstance(mass_delete, bool) or not isinstance(mass_delete, (int, float)) or not 0 < mass_delete <= 1:
        raise ValueError(f"mass_delete must be a share of the tree in (0, 1], e.g. 0.5, got {mass_delete!r}")
    if isinstance(keep_days, bool) or not isinstance(keep_days, (int, float)) or keep_days <= 0:
        raise ValueError(f"keep_days must be a positive number of days, got {keep_days!r}")
    if isinstance(trash_gb, bool) or not isinstance(trash_gb, (int, float)) or trash_gb <= 0:
        raise ValueError(f"trash_gb must be a positive number of gigabytes, got {trash_gb!r}")
    state = state_path(state_dir)
    ident = hashlib.sha256(f"{local}\0{host}\0{path}\0{port}".encode()).hexdigest()[:12]
    run_dir = Sync.folder(state) / ident
    sync_id = ""
    with contextlib.suppress(OSError, ValueError, TypeError):
        sync_id = str(json.loads((run_dir / "config.json").read_text()).get("sync_id") or "")
    return SyncConfig(
        run_dir=str(run_dir), id=ident, sync_id=sync_id or secrets.token_hex(8), local_dir=local,
        remote=str(remote), host=host, remote_path=path, port=port,  # type: ignore[arg-type]
        identity_file=_file("identity_file", identity_file), ssh_config=_file("ssh_config", ssh_config),
        exclude=_patterns("exclude", exclude), gitignore=bool(gitignore),
        protect=_patterns("protect", protect),
        mass_delete=float(mass_delete), yes=bool(yes), keep_days=float(keep_days),
        trash_budget=int(float(trash_gb) * (1 << 30)), notify=bool(notify), has_secret=password is not None,
        remote_side=side)


def _grant_laptop(cfg: SyncConfig, password: str | None, quiet: bool) -> SyncConfig:
    """Started in the runtime, which the laptop must not trust: one login (the password, or the
    user's key) installs on the laptop a key that runs only the sync's peer, in that folder (the
    mirror's set-up: :func:`colab_remote._access.grant`); the sync logs in with that key alone and
    the password goes no further."""
    import dataclasses

    state = Path(cfg.run_dir).parent.parent
    ssh = _install.require_program("ssh", package="openssh-client", install=True, error=SyncError)
    login = _access.Login(ssh=ssh, dest=_ssh.parse_destination(cfg.host), port=cfg.port or 22,
                          known_hosts=state / "known_hosts", pinned=False,
                          identity_file=cfg.identity_file)
    purpose = {"purpose": "sync", "name": f"sync-{cfg.id}", "dest": cfg.remote_path,
               "keep_days": cfg.keep_days, "trash_budget": cfg.trash_budget, "protect": cfg.protect}
    granted = _access.grant(state, login, purpose, password=password, error=SyncError, quiet=quiet)
    return dataclasses.replace(cfg, identity_file=str(granted.key), known_hosts=str(login.known_hosts),
                               ssh_config=os.devnull, port=login.port, has_secret=False,
                               remote_path=granted.dest or cfg.remote_path)


def _install_config(cfg: SyncConfig) -> SyncConfig:
    """Make the run folder, stop an earlier sync of the same pair, write the config."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    run_dir.parent.parent.chmod(0o700)
    ssh = _install.find_program("ssh")
    if ssh is None:
        raise SyncError("ssh (OpenSSH's client) is not installed", fix="install it: apt-get install "
                        "openssh-client (macOS has it)")
    if (run_dir / "config.json").exists():
        Sync(run_dir).stop()
    with contextlib.suppress(FileNotFoundError):
        (run_dir / "status.json").unlink()
    import dataclasses

    cfg = dataclasses.replace(cfg, ssh=ssh, sock_dir=str(socket_dir(run_dir)))
    cfg.save()
    return cfg


def sync(
    local_dir: str | os.PathLike[str],
    remote: str,
    *,
    port: int | None = None,
    password: str | None = None,
    identity_file: str | os.PathLike[str] | None = None,
    ssh_config: str | os.PathLike[str] | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    exclude: str | list[str] | None = None,
    gitignore: bool = True,
    protect: str | list[str] | None = None,
    mass_delete: float = 0.5,
    yes: bool = False,
    keep_days: float = 7,
    trash_gb: float = 2.0,
    notify: bool = True,
    timeout: float = 600,
    quiet: bool = False,
    remote_side: str | None = None,
) -> Sync:
    """Keep ``local_dir`` (on this laptop) and ``remote`` (``host:path`` in the runtime) the same,
    both ways, from now on.

    The first time it compares both folders and says what it does: an empty side is filled from
    the other; two different folders are merged (a file changed on one side only goes to the
    other; a file changed on both sides is kept twice, the runtime's version as
    ``name.conflict-runtime-<time>.ext``, and without ``yes`` the sync asks first). Then every
    change goes across as it happens. Deletes go to a trash on the other side; a mass delete
    pauses the sync and asks (:meth:`Sync.resume`). When the runtime goes away the sync waits; a
    new runtime behind the same alias is filled from the laptop (never the other way round).

    Args:
        local_dir: the folder on this laptop (created when missing).
        remote: ``HOST:PATH``: the alias that ``tunnel.ssh_config()`` printed (in ~/.ssh/config) or
            ``user@host``, and the runtime's folder (absolute, or relative to its home).
        port: the runtime's SSH port (default: what ~/.ssh/config says).
        password: the runtime's password, typed at ssh's prompt (default: your keys).
        identity_file: a private key to log in with.
        ssh_config: another ssh config file (``ssh -F``).
        state_dir: status, logs, the last common state (default ``~/.colab_remote``).
        exclude: more patterns to leave alone (gitignore syntax: ``"*.ckpt"``, ``"data/"``); always
            left alone: ``.venv``, ``__pycache__``, ``node_modules``, ``.ipynb_checkpoints``, ``*.pyc``.
        gitignore: also leave alone what the folder's ``.gitignore`` files name.
        protect: more patterns whose runtime version is never applied here (always: git's config
            and hooks, ``.vscode``, ``.idea``, ``.devcontainer``).
        mass_delete: deleting at least this share of the tree (and 20 paths) within seconds
            on one side pauses the sync instead of deleting on the other side.
        yes: go on without asking when the first comparison finds conflicts.
        keep_days: trash older than this is removed (on both sides).
        trash_gb: each side's trash is kept under this size (oldest first out).
        notify: a desktop notification for each conflict and pause (where one can be shown).
        timeout: seconds to wait for the first comparison before returning anyway.
        quiet: do not print the plan or display the handle.
        remote_side: ``"runtime"`` (the default on a laptop) or ``"laptop"`` (the default in a Colab
            runtime): started in the runtime, ``remote`` is ``user@host:path`` on the laptop, and
            one login there (``password`` or ``identity_file``) installs a key that runs only the
            sync's peer in that folder; the sync uses that key alone from then on.

    Returns:
        a :class:`Sync` handle.

    Raises:
        AuthenticationError: the runtime refused the login.
        SyncError: the runtime could not be reached, or has no python3.

    Example:
        >>> s = sync("~/project", "colab:/content/project")  # doctest: +SKIP
        the runtime's folder is empty (a new runtime?): it is filled from the laptop: ...
    """
    cfg = _prepare(local_dir, remote, port=port, password=password, identity_file=identity_file,
                   ssh_config=ssh_config, state_dir=state_dir, exclude=exclude, gitignore=gitignore,
                   protect=protect, mass_delete=mass_delete, yes=yes, keep_days=keep_days,
                   trash_gb=trash_gb, notify=notify, remote_side=remote_side)
    _check_seconds("timeout", timeout)
    if not isinstance(quiet, bool):
        raise TypeError(f"quiet must be True or False, got {quiet!r}")
    if cfg.remote_side == "laptop":
        cfg, password = _grant_laptop(cfg, password, quiet), None
    cfg = _install_config(cfg)
    run_dir = Path(cfg.run_dir)
    pid = _proc.spawn_detached([sys.executable, "-m", "colab_remote._twoway", "--run-dir", str(run_dir)],
                               run_dir=run_dir, name="sync", secret=password)
    handle = Sync(run_dir)
    status = run_dir / "status.json"
    _proc.wait_until(lambda: StatusFile.read(status).get("state") in SETTLED or not _proc.pid_alive(pid),
                     timeout, interval=0.02)
    info = StatusFile.read(status)
    if info.get("state") == "failed" or not _proc.pid_alive(pid):
        handle.stop()
        detail = info.get("error_detail") or {}
        if detail:
            kind = AuthenticationError if detail.get("type") == "AuthenticationError" else SyncError
            raise kind(detail.get("what", ""), log_tail=detail.get("log_tail", ""), fix=detail.get("fix", ""))
        raise SyncError(info.get("error") or "the sync process exited", log_tail=handle.logs(),
                        fix="see the log above")
    if not quiet:
        plan = (info.get("stats") or {}).get("plan") or {}
        if plan.get("text"):
            print(plan["text"], flush=True)
        paused = (info.get("stats") or {}).get("paused")
        if paused:
            print("paused: " + paused["question"], flush=True)
        announce(handle)
    return handle


def _run_foreground(local_dir: str, remote: str, *, password: str | None = None, **options: Any) -> int:
    """``colab-remote sync``: the same sync in this process until Ctrl-C; a pause asks here."""
    from ._twoway import worker

    cfg = _install_config(_prepare(local_dir, remote, password=password, **options))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return worker.run(cfg, password, foreground=True)


def status_text(state_dir: str | os.PathLike[str] | None = None) -> str:
    """``colab-remote sync --status``: each sync, its question when paused, its conflicts."""
    state = state_path(state_dir)
    syncs = find_syncs(state)
    lines = [f"colab-remote sync status ({state})"]
    if not syncs:
        lines.append("  no sync recorded here (start one: colab-remote sync ./project "
                     "colab:/content/project)")
    for s in syncs:
        lines.append(f"  {s!r}")
        question = s.question if s.alive else None
        if question:
            lines.append(f"    paused: {question}")
        if s.state == "waiting":
            lines.append(f"    waiting for the runtime: {s.stats.get('last_error') or ''}")
        conflicts = s.conflicts
        if conflicts:
            lines.append(f"    conflicts ({len(conflicts)}; the laptop's version kept at the name, the "
                         "runtime's beside it, on both sides):")
            for c in conflicts[-50:]:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.get("time", 0)))
                lines.append(f"      {when}  {_shown(c.get('path', ''))} -> {_shown(c.get('copy', ''))}")
    return "\n".join(lines)


def _shown(text: str) -> str:
    """A name from the runtime, safe for a terminal (no escape sequences)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def find_syncs(state_dir: str | os.PathLike[str] | None = None) -> list[Sync]:
    """Every sync recorded in ``state_dir`` (running or not), e.g. after a kernel restart.

    Example:
        >>> [s for s in find_syncs() if s.alive]  # doctest: +SKIP
        [<Sync /home/me/project <-> colab:/content/project up, ...>]
    """
    return Sync.find(state_path(state_dir))
