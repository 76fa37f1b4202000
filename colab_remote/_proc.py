"""The only module that starts, signals or waits on processes.

Long-lived children run detached (their own session, stdin from /dev/null, output to a log file,
a pid file in the state folder) so they outlive the cell, an interrupted cell and a kernel restart.
They are stopped only by the pid we recorded, and only after checking that the pid still runs the
program we started (a pid can be reused): SIGTERM to the process group, wait, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ColabRemoteError

log = logging.getLogger(__name__)

SECRET_FIFO_ENV = "COLAB_REMOTE_SECRET_FIFO"
# Text handed to IPython's system_raw goes through var_expand ($name, {expr}): allow none of it.
_INERT_PATH = re.compile(r"[A-Za-z0-9_./+-]+")


# --- short-lived commands ----------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """What a short command did: the exit status (-9 when it was killed at its timeout, -1 when it
    could not start), what it printed, and whether time ran out."""

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def tail(self) -> str:
        """The last lines of everything it printed."""
        return last_lines((self.stdout + self.stderr).strip())


def run(argv: Sequence[str], *, input: str | bytes | None = None, timeout: float = 30,
        error: type[ColabRemoteError] = ColabRemoteError, what: str = "", fix: str = "",
        check: bool = True, env: Mapping[str, str] | None = None,
        on_output: Callable[[bytes], None] | None = None, merge: bool = False) -> Result:
    """Run a short command; a secret goes in ``input`` (stdin), never in ``argv``.

    ``on_output`` gets its stdout as it comes (and ``b""`` every 0.2 s while it is silent); with
    ``merge`` stderr goes there too. With ``check``, a non-zero exit or the timeout raises ``error``
    with the command's output tail; without, the :class:`Result` says so (-9 after ``timeout``).
    """
    label = what or f"{os.path.basename(argv[0])} failed"
    try:
        done = _run(argv, input, timeout, env, on_output, merge)
    except OSError as e:
        if check:
            raise error(f"{label}: {e}", fix=fix) from e
        return Result(-1, "", str(e))
    if check and done.timed_out:
        raise error(f"{label}: no answer within {timeout:g} s", log_tail=done.tail, fix=fix)
    if check and done.returncode != 0:
        raise error(f"{label} (exit {done.returncode})", log_tail=done.tail, fix=fix)
    return done


def _run(argv: Sequence[str], data: str | bytes | None, timeout: float,
         env: Mapping[str, str] | None, on_output: Callable[[bytes], None] | None,
         merge: bool) -> Result:
    """One way to run a command with a deadline: stdin fed by a thread, stdout and stderr read in
    one select loop (never an unread pipe), killed when the deadline passes."""
    import select

    proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE if data else subprocess.DEVNULL,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge else subprocess.PIPE,
                            env=dict(env) if env is not None else None)
    feeder = None
    if data:
        payload = data.encode() if isinstance(data, str) else data

        def feed() -> None:
            assert proc.stdin is not None
            with contextlib.suppress(OSError):  # it may exit before reading everything
                proc.stdin.write(payload)
            with contextlib.suppress(OSError):
                proc.stdin.close()

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
    out, err = bytearray(), bytearray()
    streams = {proc.stdout.fileno(): out} if proc.stdout is not None else {}
    if proc.stderr is not None:
        streams[proc.stderr.fileno()] = err
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        while streams:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select(list(streams), [], [], min(0.2, left))
            if not ready and on_output is not None:
                on_output(b"")
            for fd in ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    del streams[fd]
                    continue
                streams[fd].extend(chunk)
                if on_output is not None and streams[fd] is out:
                    on_output(chunk)
                    del out[:-(1 << 20)]  # what was shown as it came: keep only its end
        if not timed_out:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if feeder is not None:
            feeder.join(5)
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
    return Result(-9 if timed_out else proc.returncode, out.decode(errors="replace"),
                  err.decode(errors="replace"), timed_out)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def last_lines(text: str, lines: int = 15) -> str:
    return "\n".join(text.splitlines()[-lines:])


def tail(path: str | os.PathLike[str], lines: int = 15) -> str:
    """The last ``lines`` lines of a log file ('' when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            return last_lines(f.read().decode(errors="replace"), lines)
    except OSError:
        return ""


# --- long-lived, detached children -------------------------------------------------------------


def in_ipython() -> Any:
    """The running IPython shell, or None."""
    if "IPython" not in sys.modules:
        return None
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def spawn_detached(argv: Sequence[str], *, run_dir: Path, name: str, secret: str | None = None,
                   env: Mapping[str, str] | None = None, timeout: float = 10) -> int:
    """Start ``argv`` in its own session, output to ``run_dir/name.log``; return its pid.

    The launch is written into ``run_dir/name.launch.sh``. Inside IPython it is started through
    ``get_ipython().system_raw`` (the way Colab expects background programs), elsewhere through
    ``/bin/sh``; the text given to either holds only that script's path, so IPython's ``$name`` /
    ``{expr}`` expansion has nothing to change. ``secret`` is handed over once through a 0600 FIFO
    whose path the child finds in ``COLAB_REMOTE_SECRET_FIFO`` (see :func:`receive_secret`).
    """
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    pid_path = run_dir / f"{name}.pid"
    log_path = run_dir / f"{name}.log"
    launcher = run_dir / f"{name}.launch.sh"
    if not _INERT_PATH.fullmatch(str(run_dir)):
        tag = hashlib.sha256(str(run_dir).encode()).hexdigest()[:12]
        launcher = private_dir(f"colab_remote-{os.geteuid()}") / f"{name}-{tag}.launch.sh"
    with contextlib.suppress(FileNotFoundError):
        pid_path.unlink()
    fifo: Path | None = None
    lines = ["#!/bin/sh", f"# written by colab_remote to start {name} detached",
             f"echo $$ > {shlex.quote(str(pid_path))}.tmp && mv -f {shlex.quote(str(pid_path))}.tmp "
             f"{shlex.quote(str(pid_path))} || exit 1"]  # no pid file, no start: nobody could stop it
    extra = dict(env or {})
    if secret is not None:
        fifo = run_dir / f"{name}.secret"
        with contextlib.suppress(FileNotFoundError):
            fifo.unlink()
        os.mkfifo(fifo, 0o600)
        extra[SECRET_FIFO_ENV] = str(fifo)
    lines += [f"export {k}={shlex.quote(v)}" for k, v in extra.items()]
    lines.append(f"exec {shlex.join(argv)} </dev/null >>{shlex.quote(str(log_path))} 2>&1")
    write_private(launcher, "\n".join(lines) + "\n", 0o700)
    command = f"setsid /bin/sh {launcher} </dev/null >/dev/null 2>&1 &"
    shell = in_ipython()
    try:
        if shell is not None and hasattr(shell, "system_raw"):
            shell.system_raw(command)
        else:
            subprocess.run(["/bin/sh", "-c", command], timeout=timeout, check=True)
        deadline = time.monotonic() + timeout
        pid = None
        while time.monotonic() < deadline:
            pid = read_pid(pid_path)
            if pid is not None:
                break
            time.sleep(0.005)
        if pid is None:
            raise ColabRemoteError(f"{name} did not start within {timeout:g} s",
                                   log_tail=tail(log_path),
                                   fix=f"run {shlex.join(argv)} by hand to see why")
        if fifo is not None:
            try:
                _hand_over(fifo, secret or "", pid, deadline=time.monotonic() + timeout)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    fifo.unlink()
    except BaseException:
        # Given up (an error, a signal, Ctrl-C) after the launch: the child may still be on its
        # way up, with no pid file yet for anyone to find it by. Stop it here.
        _abandon(pid_path, argv, markers=(str(run_dir), str(launcher)), wait=5)
        raise
    return pid


def _abandon(pid_path: Path, argv: Sequence[str], *, markers: Sequence[str], wait: float) -> None:
    """Stop the child a launch recorded in ``pid_path`` (waiting up to ``wait`` s for the record).

    It is ours when it still runs the launcher or already ``argv`` (or names our run folder).
    """
    deadline = time.monotonic() + wait
    pid = read_pid(pid_path)
    while pid is None and time.monotonic() < deadline:
        time.sleep(0.01)
        pid = read_pid(pid_path)
    if pid is None:
        return
    now = cmdline(pid)
    if now and (now == list(argv) or any(m in a for a in now for m in markers)):
        stop(pid, marker=now[-1], timeout=2)


def _hand_over(fifo: Path, secret: str, pid: int, *, deadline: float) -> None:
    """Write ``secret`` into the FIFO once the child has opened it for reading."""
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        if not pid_alive(pid) or time.monotonic() > deadline:
            raise ColabRemoteError("the background process exited before it took its password",
                                   fix="see its log with .logs()")
        time.sleep(0.005)
    try:
        os.set_blocking(fd, True)
        os.write(fd, secret.encode() + b"\n")
    finally:
        os.close(fd)


def receive_secret(timeout: float = 30) -> str | None:
    """In a child started with ``secret=``: read it from the FIFO (once) and forget the path."""
    path = os.environ.pop(SECRET_FIFO_ENV, None)
    if not path:
        return None
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(timeout))
    try:
        with open(path, "rb") as f:
            data = f.read()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return data.decode().rstrip("\n")


def _alarm(signum: int, frame: object) -> None:
    raise TimeoutError("nobody handed over the secret in time")


def read_pid(path: Path) -> int | None:
    """The pid in a pid file, or None when there is none."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def cmdline(pid: int) -> list[str]:
    """The argv of ``pid`` ([] when it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def is_ours(pid: int | None, marker: str) -> bool:
    """True when ``pid`` runs and its command line names ``marker`` (our config or state path)."""
    return pid is not None and pid_alive(pid) and any(marker in a for a in cmdline(pid))


def children(pid: int) -> list[int]:
    """Pids whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(entry))
    return found


def stop(pid: int | None, *, marker: str, timeout: float = 5, also: Iterable[int] = ()) -> bool:
    """SIGTERM the process group of ``pid`` (if it is still ours), wait, then SIGKILL.

    ``also`` are more pids (e.g. sshd's per-connection children) stopped the same way.
    Returns True when something was stopped.
    """
    if not is_ours(pid, marker):
        return False
    assert pid is not None
    targets = [pid, *also]
    for target in targets:
        _signal_group(target, signal.SIGTERM)
    if not wait_until(lambda: not any(pid_alive(t) for t in targets), timeout):
        for target in targets:
            _signal_group(target, signal.SIGKILL)
        wait_until(lambda: not any(pid_alive(t) for t in targets), 2)
    for target in targets:  # reap it if it happens to be our own child
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(target, os.WNOHANG)
    return True


def _signal_group(pid: int, sig: int) -> None:
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.005) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)








def write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Write ``text`` to ``path`` atomically with ``mode`` from the first byte (never world-readable).

    The temporary file gets an unpredictable name in the same folder and is created exclusively
    (``mkstemp``: ``O_CREAT|O_EXCL``, and ``O_NOFOLLOW`` where the system has it), so a link
    planted in that folder is never followed; the rename then replaces ``path`` itself (a link
    there is replaced, not followed).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, mode)
            data = text.encode()
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def private_dir(name: str, *, under: str | os.PathLike[str] | None = None) -> Path:
    """A folder of ours, ``under/name`` (default: the system's temporary folder), mode 0700.

    Made when missing. An existing one is used only when it is a real folder (not a symbolic
    link) owned by this user with no access for anyone else; otherwise (another user made it
    first, or it is a link) a fresh ``name-XXXXXXXX`` folder is made with ``mkdtemp`` instead.
    A shared temporary folder is sticky (``/tmp``), so nobody else can rename ours away later.
    """
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"private_dir needs a plain folder name, got {name!r}")
    base = Path(under) if under is not None else Path(tempfile.gettempdir())
    path = base / name
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if (st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
            and stat.S_IMODE(st.st_mode) & 0o077 == 0):
        return path
    log.warning("%s is not a private folder of this user (a link, someone else's, or open to "
                "others): using a fresh one", path)
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))


def is_private(path: Path) -> bool:
    """True when only the owner may read ``path``."""
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0



# --- children of a supervisor (the reverse tunnel's) -------------------------------------------


def spawn_pty(argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> Any:
    """Start ``argv`` on its own pseudo-terminal (its own session), for answering ssh's prompts.

    Echo is off from the first byte, so a password typed at a prompt can never come back in the
    output we log. Returns a ``pexpect.spawn``; end it with :func:`end_pty`.
    """
    import pexpect

    child = pexpect.spawn(argv[0], list(argv[1:]), env=dict(env) if env is not None else None,
                          echo=False, encoding="utf-8", codec_errors="replace", timeout=None)
    # pexpect sleeps 0.1 s in close()/terminate() by default: not on a path a user waits on.
    for obj in (child, child.ptyproc):
        obj.delayafterclose = 0
        obj.delayafterterminate = 0
    return child


def pty_path() -> list[str]:
    """The folders :func:`spawn_pty` imports from (pexpect's, ptyprocess's): how a process started
    with ``python -S`` spawns ssh before its site-packages are set up (see ``_mirror/boot.py``)."""
    import pexpect
    import ptyprocess

    return sorted({str(Path(m.__file__).parents[1]) for m in (pexpect, ptyprocess)})


def end_pty(child: Any, timeout: float = 2) -> None:
    """Stop a :func:`spawn_pty` child: SIGTERM (ssh closes its connection cleanly), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError, OSError):
        if child.isalive():
            child.kill(signal.SIGTERM)
            wait_until(lambda: not child.isalive(), timeout, interval=0.01)
    with contextlib.suppress(Exception):
        child.close(force=True)


def start(argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    """Start a short command without waiting (its output is small and read by :func:`finish`)."""
    return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(env) if env is not None else None)


def finish(proc: subprocess.Popen[str], timeout: float = 0) -> Result | None:
    """What a :func:`start`-ed command did, or None while it runs.

    With ``timeout`` it waits that long, then kills the command (``Result.timed_out``).
    """
    timed_out = False
    if proc.poll() is None:
        if timeout <= 0:
            return None
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            timed_out = True
    out, err = proc.communicate()
    return Result(-9 if timed_out else proc.returncode, out, err, timed_out)


def send_signal(pid: int, sig: int) -> bool:
    """Signal one pid we started (the caller checked it is ours); False when it is gone."""
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True




# --- the mirror's channels ---------------------------------------------------------------------


def open_pipes(argv: Sequence[str], *, stderr_path: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` with binary pipes on stdin/stdout (a long-lived channel) and stderr to a log.

    It stays in our process group, so stopping the mirror stops it too; end it with :func:`end_pipes`.
    """
    with open(stderr_path, "ab") as err:
        proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, bufsize=0)
    for f in (proc.stdin, proc.stdout):  # 1 MiB pipes: a batch in a few writes, not sixteen
        if f is not None:
            with contextlib.suppress(OSError):
                fcntl.fcntl(f, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    return proc


def end_pipes(proc: subprocess.Popen[bytes] | None, timeout: float = 2) -> None:
    """Close a :func:`open_pipes` channel: EOF on its stdin, wait, then SIGTERM and SIGKILL."""
    if proc is None:
        return
    for f in (proc.stdin, proc.stdout):
        with contextlib.suppress(OSError):
            if f is not None:
                f.close()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def converse(argv: Sequence[str], answers: Sequence[str], *, timeout: float) -> Result:
    """Run ``argv`` on a terminal, typing ``answers`` in turn at each password prompt.

    A prompt with no answer left, a passphrase prompt or the timeout ends the program (returncode
    -1). Its output (one stream: a terminal) is ``stdout``.
    """
    import pexpect

    child = spawn_pty(argv)
    left = list(answers)
    timed_out = False
    try:
        while True:
            i = child.expect(["assword:", "passphrase", pexpect.EOF, pexpect.TIMEOUT], timeout=timeout)
            if i == 0 and left:
                child.sendline(left.pop(0))
                continue
            timed_out = i == 3
            break
    finally:
        output = child.before if isinstance(child.before, str) else ""
        end_pty(child)
    status = child.exitstatus
    return Result(-1 if status is None else status, output.replace("\r\n", "\n").strip(), "",
                  timed_out)
