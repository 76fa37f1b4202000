"""mirror(): keep a project folder safe on your own server, fast, without ever losing a file.

The recipe this grew from watched the folder and ran ``rsync --delete`` from it, which wipes the
server when it runs from a fresh, empty runtime. Here the server copy is only ever added to:
files the mirror overwrites or deletes (only what it saw deleted while watching) go to
``<dest>/.colab-remote-trash/<UTC time>/`` first, a missing or near-empty runtime folder is refused
(``restore=True`` resumes from the server instead), and every file is written under a temporary
name and renamed into place.

The work happens in a detached process (see :mod:`colab_remote._mirror`) that outlives the cell and a
kernel restart; :class:`Mirror` is its handle, and :func:`find_mirrors` finds it again from a fresh
process.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import _access, _agent, _html, _install, _proc, _ssh, _sync
from ._daemon import Handle, State, StatusFile, socket_dir, state_path
from ._html import announce
from ._mirror import boot, checks
from ._mirror.channel import ShellChannel
from ._mirror.config import MirrorConfig
from ._mirror.control import query
from ._mirror.link import ConnectionLost, Link
from ._mirror.plan import scan_local
from ._mirror.report import trash_text
from ._progress import Bar
from .errors import AuthenticationError, MirrorError

__all__ = ["Mirror", "find_mirrors", "mirror", "push", "stop_mirrors"]

log = logging.getLogger(__name__)

SYNC_PHASES = ("restoring", "first push")


class Mirror(Handle):
    """A running mirror (or the record of one). Start it with :func:`mirror`.

    Attributes: ``local_dir``, ``destination``, ``port``, ``pid``, ``run_dir`` (status and log).

    Example:
        >>> with mirror("/content/project", "me@server:backup/project", password=pw) as m:  # doctest: +SKIP
        ...     train()
        ...     m.flush()
    """

    kind = "mirror"
    log_name = "mirror"
    config_type = MirrorConfig
    config: MirrorConfig

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir)
        # config.json holds the call's values before the process starts (status.json comes later)
        info = StatusFile.read(self.run_dir / "status.json")
        self.local_dir: str = self.config.local_dir or str(info.get("local_dir", ""))
        self.destination: str = self.config.destination or str(info.get("destination", ""))
        self.port: int = int(info.get("port") or self.config.port)

    @property
    def _sock(self) -> Path:
        sock_dir = self.config.sock_dir or self.status().get("sock_dir")
        return Path(sock_dir or self.run_dir) / "ctl"

    @property
    def stats(self) -> dict[str, Any]:
        """files and bytes pushed, pushes, whole-tree passes, last push time, pending changes,
        last error, reconnects (live from the process; from its status file once it stopped)."""
        live = query(self._sock, "stats", 2) if self.alive else None
        if live is not None:
            return live
        return dict(self.status().get("stats") or {})

    def flush(self, timeout: float = 60) -> None:
        """Push everything pending now and wait until the server has it.

        Raises:
            MirrorError: not done within ``timeout`` (the server unreachable, say); nothing is lost,
                the mirror keeps trying.
        """
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not self.alive:
            raise MirrorError("the mirror is not running", log_tail=self.logs(),
                              fix="start it again with mirror(...)")
        reply = query(self._sock, f"flush {timeout:g}", timeout + 5)
        if reply is None or not reply.get("ok"):
            stats = (reply or {}).get("stats") or {}
            if (reply or {}).get("reason") == "errors":
                what = "the server refused some changes"
                fix = "see the errors above (permissions? a full disk?); a whole-tree pass retries them"
            else:
                what = (f"the mirror did not reach the server within {timeout:g} s "
                        f"({stats.get('pending', '?')} changes pending, state {stats.get('state', '?')})")
                fix = "check the server; the mirror keeps every change and retries"
            raise MirrorError(what, log_tail=str(stats.get("last_error") or "") or self.logs(5), fix=fix)

    def stop(self, flush: bool = True, timeout: float = 30) -> None:
        """Stop the mirror (after pushing what is pending, with ``flush``). Safe to call twice.

        Its ssh ControlMaster runs in a session of its own: it is stopped too, also when the
        mirror process itself was killed.
        """
        status = self.status()
        if self.alive:
            if flush:
                with contextlib.suppress(MirrorError):
                    self.flush(timeout)
            query(self._sock, "stop 0", 2)
            _proc.wait_until(lambda: not self.alive, 5, interval=0.02)
        self._stop_process()
        self._stop_master(status)

    def _summary(self) -> tuple[str, dict[str, Any]]:
        stats = self.stats
        return self.state, stats

    def __repr__(self) -> str:
        state, s = self._summary()
        return (f"<Mirror {self.local_dir} -> {self.destination} {state}, {s.get('pushes', 0)} pushes, "
                f"{s.get('files', 0)} files, {s.get('pending', 0)} pending, pid {self.pid}>")

    def _repr_html_(self) -> str:
        state, s = self._summary()
        last = s.get("last_push")
        rows = [("local", self.local_dir), ("server", self.destination), ("port", str(self.port)),
                ("pid", str(self.pid)),
                ("pushed", f"{s.get('files', 0)} files, {s.get('bytes', 0)} bytes in "
                           f"{s.get('pushes', 0)} pushes"),
                ("pending", str(s.get("pending", 0))),
                ("last push", time.strftime("%H:%M:%S", time.localtime(last)) if last else "never"),
                ("last error", str(s.get("last_error") or "none")),
                ("trash", trash_text(s.get("trash")))]
        return _html.card("mirror", State.of(state), rows)


def mirror(
    local_dir: str | os.PathLike[str],
    destination: str,
    *,
    port: int = 22,
    password: str | None = None,
    identity_file: str | os.PathLike[str] | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    exclude: str | list[str] | None = None,
    delete: bool = True,
    backup: bool = True,
    restore: bool = False,
    host_key: str | None = None,
    keep_days: float = _sync.TRASH_KEEP_DAYS,
    trash_share: float = _agent.TRASH_SHARE,
    trash_max_gb: float = _agent.TRASH_MAX_GB,
    timeout: float = 600,
    restricted: bool = True,
    key_days: float = _access.KEY_DAYS,
    quiet: bool = False,
) -> Mirror:
    """Mirror ``local_dir`` to ``destination`` (``user@host:path``) and keep it mirrored.

    The first login installs a key for this mirror alone on the server (see ``restricted``); the
    detached mirror process logs in with it only and never holds the password.

    Runs detached: it survives the cell being interrupted and a kernel restart
    (:func:`find_mirrors` finds it again), and the server being away for minutes (changes are kept
    and sent when it is back).

    Args:
        local_dir: the folder in the runtime (created when missing and ``restore``).
        destination: ``user@host:path``; a relative path is under the server account's home.
        port: the server's SSH port.
        password: the server password (or ``identity_file``'s passphrase), typed at ssh's prompt
            and kept only in the mirror process's memory, to log in again after an outage.
        identity_file: a private key to log in with.
        state_dir: status, logs and known_hosts (default ``~/.colab_remote``).
        exclude: more glob patterns not to mirror (``"*.ckpt"``, ``"data/"``); always left out:
            ``__pycache__``, ``.ipynb_checkpoints``, ``*.pyc``. ``.git`` IS mirrored.
        delete: delete on the server what is deleted (or renamed away) here while watching.
        backup: keep deleted and overwritten server files in ``<dest>/.colab-remote-trash``.
        restore: first copy the server copy into ``local_dir`` (never deleting, keeping newer
            local files): how a fresh runtime resumes.
        host_key: pin the server's host key (a key line or ``SHA256:`` fingerprint); default:
            accept it the first time and check it afterwards.
        keep_days: trash older than this is pruned (the server keeps this number: a runtime
            cannot prune sooner).
        trash_share: the trash holds at most this share of the room it could take on the
            server's disk (its free space plus the trash itself); older versions are pruned
            first, and a write that finds the disk full prunes the trash and is done again.
        trash_max_gb: and at most this many GB (1e9 bytes). Both are kept by the server.
        timeout: how long to wait for the first push before returning anyway.
        restricted: log in once (password or your own key) to install a key for this mirror
            alone (the default): it can only write into ``destination`` through the server-side
            agent (keeping the trash) and read it back, nothing else, and expires after
            ``key_days``. ``False`` keeps the password in the mirror process's memory (or uses
            ``identity_file`` as given) for every login: anything running in the runtime can then
            log in to your server as you.
        key_days: the restricted key's lifetime (``expiry-time`` on the server).
        quiet: do not print or display the handle.

    Returns:
        a :class:`Mirror` handle.

    Raises:
        MirrorError: refused (empty runtime folder, non-empty server copy), unreachable server,
            rsync missing on the server.
        AuthenticationError: the server refused the password or key.

    Example:
        >>> m = mirror("/content/project", "me@my-server:backup/project",
        ...            password=pw)       # doctest: +SKIP
        >>> m.flush(); m.stats["pending"]  # doctest: +SKIP
        0
    """
    args = checks.prepare(local_dir, destination, port=port, password=password,
                          identity_file=identity_file, state_dir=state_dir, exclude=exclude,
                          host_key=host_key)
    for name, value in (("delete", delete), ("backup", backup), ("restore", restore)):
        checks.check_bool(name, value)
    if isinstance(keep_days, bool) or not isinstance(keep_days, (int, float)) or keep_days <= 0:
        raise ValueError(f"keep_days must be a positive number of days, got {keep_days!r}")
    checks.check_budget(trash_share, trash_max_gb)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    checks.check_bool("restricted", restricted)
    _access.check_days(key_days)
    checks.check_local_folder(args["local_dir"], local_dir, create=restore)
    flags: dict[str, Any] = dict(delete=delete, backup=backup, restore=restore, keep_days=keep_days,
                                 trash_share=float(trash_share), trash_max_gb=float(trash_max_gb),
                                 restricted=restricted, key_days=key_days, quiet=quiet)
    cfg, run_dir, secret, trusted = _config(args, trust=True, **flags)
    login = _access.Login(ssh=cfg.ssh, dest=args["dest"], port=cfg.port,
                          known_hosts=Path(cfg.known_hosts), pinned=cfg.pinned,
                          identity_file=cfg.identity_file)
    known_before = _access.known_lines(login)  # the mirror process may make the first contact
    try:
        handle = _launch(run_dir, secret, timeout, quiet)
    except (AuthenticationError, MirrorError) as e:
        if not trusted:
            raise
        # the key on record, taken without a login to check it (a re-run's start-up is one login
        # shorter), did not work: set the server up again, as a first run does
        log.info("the mirror's key on record did not work (%s): setting the server up again", e.what)
        cfg, run_dir, secret, _ = _config(args, trust=False, **flags)
        handle = _launch(run_dir, secret, timeout, quiet)
    _access.announce_new_host_key(login, known_before, quiet)
    if not quiet:
        announce(handle)
    return handle


def _launch(run_dir: Path, secret: str | None, timeout: float, quiet: bool) -> Mirror:
    """Start the mirror process of ``run_dir`` and wait (showing its progress) until it is up, or
    ``timeout``; its failure to start is raised here."""
    pid = _proc.spawn_detached([sys.executable, "-S", str(Path(boot.__file__)), "--run-dir",
                                str(run_dir)], run_dir=run_dir, name="mirror", secret=secret)
    handle = Mirror(run_dir)
    status = run_dir / "status.json"
    bar = Bar(quiet=quiet)

    def settled() -> bool:
        info = StatusFile.read(status)
        state = info.get("state")
        progress = info.get("progress") or {}
        alive = _proc.pid_alive(pid)
        if bar.phase is not None and progress.get("phase") == bar.phase:
            bar.show(bar.phase, progress.get("fraction"), progress.get("text", ""))  # its last word
        if state in SYNC_PHASES:
            mine = progress.get("phase") == state
            bar.show(state, progress.get("fraction") if mine else None,
                     progress.get("text", "") if mine else "")
        elif bar.phase is not None:
            bar.close(done=alive and state not in ("failed", "stopped"))
        return state in ("up", "refused", "failed", "stopped", "reconnecting") or not alive

    try:
        _proc.wait_until(settled, timeout, interval=0.005)
    finally:
        bar.close(done=False)
    info = StatusFile.read(status)
    if info.get("state") == "failed" or not _proc.pid_alive(pid):
        handle.stop(flush=False)
        detail = info.get("error_detail") or {}
        if detail:
            kind = AuthenticationError if detail.get("type") == "AuthenticationError" else MirrorError
            raise kind(detail.get("what", ""), log_tail=detail.get("log_tail", ""),
                       fix=detail.get("fix", ""))
        raise MirrorError(info.get("error") or "the mirror process exited", log_tail=handle.logs(),
                          fix="see the log above")
    if not status.exists():
        log.warning("the mirror is still starting after %g s; see .logs()", timeout)
    return handle


def _config(args: dict[str, Any], *, restricted: bool, key_days: float, quiet: bool,
            trust: bool = False, **flags: Any) -> tuple[MirrorConfig, Path, str | None, bool]:
    """Set the server up (one login; none for a key on record with ``trust``), write the
    mirror's config (no secret in it) and stop an earlier mirror of the same pair. Returns the
    config, its run folder, the secret the mirror process needs (only without restrictions: the
    password), and whether the key was taken on the record's word (see :func:`_access.grant`)."""
    dest: _ssh.Destination = args["dest"]
    state: Path = args["state"]
    ident = _sync.mirror_id(args["local_dir"], str(dest), args["port"])
    run_dir = Mirror.folder(state) / ident
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    state.chmod(0o700)
    rsync = _install.require_program("rsync", package="rsync", install=True, error=MirrorError)
    ssh = _install.require_program("ssh", package="openssh-client", install=True, error=MirrorError)
    known_hosts, pinned = _access.known_hosts_file(state, run_dir, dest, args["port"],
                                                       args["host_key"], MirrorError)
    restricted = restricted and args["identity_file"] is None
    agent = os.environ.get("COLAB_REMOTE_MIRROR_AGENT", "1") != "0"  # tests: a server without python3
    cfg: dict[str, Any] = {
        "id": ident, "local_dir": args["local_dir"], "destination": str(dest), "user": dest.user,
        "host": dest.host, "path": dest.path, "port": args["port"],
        "identity_file": args["identity_file"], "known_hosts": str(known_hosts), "pinned": pinned,
        "exclude": args["exclude"], "ssh": ssh, "rsync": rsync, "agent": agent,
        "restricted": restricted, "state_dir": str(state), **flags}
    secret = args["password"]
    trusted = False
    purpose = {"purpose": "mirror", "name": f"mirror-{ident}", "dest": dest.path,
               "keep_days": flags["keep_days"], "backup": flags["backup"],
               "trash_share": flags.get("trash_share", _agent.TRASH_SHARE),
               "trash_max_gb": flags.get("trash_max_gb", _agent.TRASH_MAX_GB)}
    if agent and not restricted:
        # The mirror process logs in with the account's own login anyway: it sets the server up
        # through that login (one login in all, not two: a whole handshake less at start-up).
        cfg["setup"] = purpose
    elif agent or restricted:
        login = _access.Login(ssh=ssh, dest=dest, port=args["port"], known_hosts=known_hosts,
                              pinned=pinned, identity_file=args["identity_file"])
        granted = _access.grant(state, login, purpose, password=args["password"], restricted=restricted,
                                days=key_days, error=MirrorError, quiet=quiet, trust=trust)
        trusted = granted.trusted
        cfg.update(agent=granted.agent, key_id=granted.key_id, key_expires=granted.expires,
                   remote_root=granted.dest)
        if granted.key is not None:  # the password goes no further
            cfg.update(identity_file=str(granted.key), agent_command="colab-remote agent")
            secret = None
        else:
            cfg["agent_command"] = shlex.join(granted.command)
    if not restricted and not quiet:
        print(_access.unrestricted_warning(dest, "mirror", args["identity_file"]), flush=True)
    if (run_dir / "config.json").exists():
        Mirror(run_dir).stop(flush=True)  # the mirror this call replaces (or what it left running)
    with contextlib.suppress(FileNotFoundError):
        (run_dir / "status.json").unlink()
    config = MirrorConfig(run_dir=str(run_dir), has_secret=secret is not None,
                          sock_dir=str(socket_dir(run_dir)),  # after the old one removed its own
                          **cfg)
    if secret is None:  # a key login: the mirror process starts it before its imports (see boot)
        config = dataclasses.replace(config, early_login=Link(config, None).master_argv(),
                                     early_path=_proc.pty_path())
    config.save()
    return config, run_dir, secret, trusted


def _run_foreground(local_dir: str | os.PathLike[str], destination: str, *, port: int = 22,
                   password: str | None = None, identity_file: str | None = None,
                   state_dir: str | os.PathLike[str] | None = None, exclude: list[str] | None = None,
                   delete: bool = True, backup: bool = True, restore: bool = False,
                   host_key: str | None = None, keep_days: float = _sync.TRASH_KEEP_DAYS,
                   trash_share: float = _agent.TRASH_SHARE, trash_max_gb: float = _agent.TRASH_MAX_GB,
                   restricted: bool = True, key_days: float = _access.KEY_DAYS) -> int:
    """``colab-remote mirror``: the same mirror in this process until Ctrl-C (then it flushes).

    A failure to start raises the mirror's error (AuthenticationError, MirrorError)."""
    from ._mirror import main as process

    args = checks.prepare(local_dir, destination, port=port, password=password,
                          identity_file=identity_file, state_dir=state_dir, exclude=exclude,
                          host_key=host_key)
    checks.check_budget(trash_share, trash_max_gb)
    _access.check_days(key_days)
    checks.check_local_folder(args["local_dir"], local_dir, create=restore)
    cfg, run_dir, secret, _ = _config(args, delete=delete, backup=backup, restore=restore,
                                   keep_days=keep_days, trash_share=float(trash_share),
                                   trash_max_gb=float(trash_max_gb), restricted=restricted,
                                   key_days=key_days, quiet=False)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return process.run(cfg, secret, foreground=True)


def find_mirrors(state_dir: str | os.PathLike[str] | None = None) -> list[Mirror]:
    """Every mirror recorded in ``state_dir`` (running or not), e.g. after a kernel restart.

    Example:
        >>> [m for m in find_mirrors() if m.alive]  # doctest: +SKIP
        [<Mirror /content/project -> me@server:backup/project up, ...>]
    """
    return Mirror.find(state_path(state_dir))


def stop_mirrors(state_dir: str | os.PathLike[str] | None = None, *, flush: bool = True) -> int:
    """Stop every running mirror of ``state_dir`` (pushing what is pending first, with ``flush``).

    Returns:
        how many were running.

    Example:
        >>> stop_mirrors()  # doctest: +SKIP
        1
    """
    stopped = 0
    for m in find_mirrors(state_dir):
        if m.alive:
            m.stop(flush=flush)
            stopped += 1
    return stopped


def push(
    local_dir: str | os.PathLike[str],
    destination: str,
    *,
    port: int = 22,
    password: str | None = None,
    identity_file: str | os.PathLike[str] | None = None,
    setup: str | None = None,
    exclude: str | list[str] | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    host_key: str | None = None,
    timeout: float = 3600,
) -> int:
    """Copy a project into a runtime (run on the server, through the tunnel) and set it up there.

    Copies new and changed files (nothing is deleted in the runtime), then runs ``setup`` in the
    copied folder with its output streamed here.

    Args:
        local_dir: the project folder here.
        destination: the runtime as ``user@host:path``, e.g. ``root@localhost:/content/project``.
        port: the runtime's SSH port through the tunnel (e.g. 20022).
        password: the runtime's password, typed at ssh's prompt.
        identity_file: a private key instead.
        setup: a shell command run in the copied folder, e.g. ``pip install -r requirements.txt``.
        exclude: more glob patterns to leave out (the mirror's defaults always are).
        state_dir: where known_hosts lives (default ``~/.colab_remote``).
        host_key: pin the runtime's host key.
        timeout: seconds for the copy and for the set-up command, each.

    Returns:
        0 (the set-up command succeeded, or there was none).

    Raises:
        MirrorError: the copy or the set-up command failed (its last output lines included).

    Example:
        >>> push("~/project", "root@localhost:/content/project", port=20022,
        ...      setup="pip install -r requirements.txt")  # doctest: +SKIP
        0
    """
    args = checks.prepare(local_dir, destination, port=port, password=password,
                          identity_file=identity_file, state_dir=state_dir, exclude=exclude,
                          host_key=host_key)
    if not os.path.isdir(args["local_dir"]):
        raise ValueError(f"local_dir {local_dir} does not exist")
    if setup is not None and (not isinstance(setup, str) or not setup.strip()):
        raise ValueError("setup must be a non-empty shell command, e.g. 'pip install -r requirements.txt'")
    dest: _ssh.Destination = args["dest"]
    state: Path = args["state"]
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    work = Path(tempfile.mkdtemp(prefix="crp-", dir=state))
    sock_dir = work
    try:
        sock_dir = socket_dir(work)
        known_hosts, pinned = _access.known_hosts_file(state, work, dest, port, args["host_key"],
                                                       MirrorError)
        cfg = MirrorConfig(
            run_dir=str(work), user=dest.user, host=dest.host, path=dest.path, port=port,
            identity_file=args["identity_file"], known_hosts=str(known_hosts), pinned=pinned,
            sock_dir=str(sock_dir), agent=False, backup=False,
            ssh=_install.require_program("ssh", package="openssh-client", install=True, error=MirrorError),
            rsync=_install.require_program("rsync", package="rsync", install=True, error=MirrorError))
        link = Link(cfg, args["password"])
        link.open()
        try:
            ShellChannel(link).open()  # creates the folder there, checks for rsync
            return _push_over(link, args["local_dir"], dest, args["exclude"], setup, timeout)
        finally:
            link.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if sock_dir != work:
            shutil.rmtree(sock_dir, ignore_errors=True)


def _push_over(link: Link, local_dir: str, dest: _ssh.Destination, exclude: list[str],
               setup: str | None, timeout: float) -> int:
    flt = _sync.MirrorFilter(local_dir, exclude)
    _, entries, size = scan_local(local_dir, flt)  # rsync's own totals grow while it lists
    argv = _sync.rsync_push_argv(link.cfg.rsync, link.rsync_e(), local_dir, link.rsync_dest,
                                 filters=flt.rsync_args(), backup_dir=None, progress=True)
    bar = Bar()
    reader = _sync.RsyncProgressReader()

    def on_output(chunk: bytes) -> None:
        found = reader.feed(chunk)
        if found is None:
            bar.show("copying")
        else:
            bar.show("copying", found.done(entries, size), _sync.describe_progress(found, entries))

    ok = False
    try:
        warning = link.run_rsync(argv, timeout=timeout, on_output=on_output)
        ok = not warning
    except ConnectionLost as e:
        raise MirrorError(f"copying {local_dir} to {dest} failed", log_tail=str(e),
                          fix="check the tunnel and the runtime's sshd") from e
    finally:
        bar.close(done=ok)
    if warning:
        raise MirrorError(f"copying {local_dir} to {dest} failed", log_tail=warning,
                          fix="see rsync's messages above (permissions? disk space?)")
    print(f"copied {local_dir} to {dest}", flush=True)
    if setup is None:
        return 0
    remote = _sync.remote_path(dest.path)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def echo(chunk: bytes) -> None:  # the set-up command's output, shown as it comes
        if chunk:
            sys.stdout.write(decoder.decode(chunk))
            sys.stdout.flush()

    done = _proc.run(link.mux(f"cd -- {shlex.quote(remote)} && {setup}"), timeout=timeout,
                     check=False, merge=True, on_output=echo)
    if done.returncode != 0:
        raise MirrorError(f"the set-up command failed (exit {done.returncode}): {setup}",
                          log_tail=done.tail, fix="fix the command or the project and push again")
    return 0

