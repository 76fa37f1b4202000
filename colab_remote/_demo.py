"""``colab-remote demo``: the whole product on one machine, with throwaway accounts.

A "runtime" sshd (start_sshd) and a stand-in "server" (a second sshd of its own on 127.0.0.1 with
its own throwaway account), the reverse tunnel between them and a mirror of a demo folder. It then
proves that it works: a login through the tunnel runs a command, and a file written in the project
arrives on the server. Everything it made (processes, accounts, folders) is removed at the end,
also when it is stopped by SIGTERM, SIGINT (Ctrl-C) or SIGHUP at any point.

The throwaway accounts are made by the demo itself: an account is removed only when this run
created it (a name that exists already is an error, never "ours"). They expire tomorrow
(``useradd --expiredate``) in case a machine dies before the clean-up, and their SSH sessions
get a minimal environment, not the one the demo runs with (which may hold a CI's secrets).
Existing accounts and port 22 are never touched.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from . import _install, _net, _proc
from .errors import ColabRemoteError, InstallError

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# What the throwaway accounts' SSH sessions see (start_sshd(environment=...)).
MINIMAL_ENVIRONMENT = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                       "LANG": "C.UTF-8"}


def _say(text: str) -> None:
    # A reader that went away (``colab-remote demo | head``) must not stop the clean-up.
    with contextlib.suppress(OSError):
        print(text, flush=True)


def _step(text: str) -> None:
    _say(f"\n== {text}")


class _Interrupted(KeyboardInterrupt):
    """SIGTERM, SIGINT or SIGHUP: stop where we are and clean up."""


class _Signals:
    """Turns SIGTERM/SIGINT/SIGHUP into :class:`_Interrupted` until the clean-up starts.

    During the clean-up a signal is only noted: the clean-up always runs to its end.
    """

    def __init__(self) -> None:
        self.cleaning = False
        self.received: int | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.received is None
        self.received = self.received or signum
        if first and not self.cleaning:
            raise _Interrupted

    def __enter__(self) -> _Signals:
        for sig in SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGTERM/SIGINT/SIGHUP (delivered right after): no half-made account or record."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _expiry_date() -> str:
    """Tomorrow (UTC) as useradd's --expiredate wants it: the account works today and tomorrow."""
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400))


def _make_account(name: str, made: list[str]) -> None:
    """Create the throwaway account ``name``; it is recorded as ours only once useradd made it."""
    useradd = _install.find_program("useradd") or "useradd"
    with _signals_held():
        done = _proc.run([useradd, "--create-home", "--shell", "/bin/bash", "--expiredate",
                          _expiry_date(), "--comment", "colab-remote demo (throwaway)", name],
                         check=False, error=InstallError)
        if done.returncode == 0:
            made.append(name)
    if done.returncode == 9:  # useradd: "username already in use"
        raise InstallError(f"an account named {name} exists already: it is not the demo's, so the "
                           "demo leaves it alone and stops", fix="run the demo again (new names)")
    if done.returncode != 0:
        raise InstallError(f"useradd {name} failed (exit {done.returncode})",
                           log_tail=(done.stdout + done.stderr).strip())


def _remove_account(name: str) -> None:
    userdel = _install.find_program("userdel") or "userdel"
    with _signals_held():
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            _proc.run([userdel, "--remove", "--force", name], check=False, timeout=60)


def run_demo(*, check: bool = False, timeout: float | None = None, base_dir: str | None = None) -> int:
    """Run the demo; with ``check`` exit after the proof instead of waiting for Ctrl-C.

    Returns the process exit status: 0 when every proof passed.
    """
    if os.geteuid() != 0:
        raise InstallError("the demo needs root (it creates throwaway accounts)",
                           fix="run: sudo colab-remote demo")
    with _Signals() as signals:
        # Signals are handled from here on: an apt-get stopped by one still removes its
        # policy-rc.d, and everything made below is removed again.
        for program, package in (("sshd", "openssh-server"), ("ssh", "openssh-client"),
                                 ("rsync", "rsync")):
            _install.require_program(program, package=package, install=True, error=InstallError)
        return _run(signals, check=check, timeout=timeout, base_dir=base_dir)


def _run(signals: _Signals, *, check: bool, timeout: float | None, base_dir: str | None) -> int:
    from .mirror import mirror
    from .reverse import reverse_forward
    from .server import start_sshd
    from .status import self_check, stop_all

    tag = secrets.token_hex(3)
    runtime_user, server_user = f"crdemo{tag}", f"crserver{tag}"
    made_users: list[str] = []
    base: Path | None = None
    failures = 0
    proved = False
    try:
        with _signals_held():
            base = Path(tempfile.mkdtemp(prefix="colab-remote-demo-", dir=base_dir))
        runtime_state, server_state = base / "runtime", base / "server"
        _say(f"throwaway accounts: {runtime_user} {server_user} (expire {_expiry_date()}); "
             f"folder: {base}")

        _step("1. the runtime's SSH server: start_sshd()")
        _make_account(runtime_user, made_users)
        sshd = start_sshd(_net.free_port(), user=runtime_user, state_dir=runtime_state,
                          environment=MINIMAL_ENVIRONMENT)

        _step("2. a stand-in for your server: another sshd on 127.0.0.1 with a throwaway account")
        _make_account(server_user, made_users)
        server = start_sshd(_net.free_port(), user=server_user, state_dir=server_state,
                            environment=MINIMAL_ENVIRONMENT, quiet=True)
        server_port = server.port
        server_password = server.password
        assert server_password is not None
        _say(f"server: {server_user}@127.0.0.1 port {server_port} (password set, not shown)")

        _step("3. the reverse tunnel: reverse_forward()")
        tunnel = reverse_forward(f"{server_user}@127.0.0.1", port=server_port,
                                 password=server_password, remote_port=_net.free_port(),
                                 state_dir=runtime_state, quiet=True)
        _say(f"tunnel up: {tunnel!r}")

        _step("4. the mirror of a project folder: mirror()")
        project = base / "project"
        project.mkdir()
        (project / "README.txt").write_text("a demo project\n")
        backup = mirror(str(project), f"{server_user}@127.0.0.1:backup/demo", port=server_port,
                        password=server_password, state_dir=runtime_state)

        _step("5. proof: log in through the server and the tunnel, run a command")
        result = self_check(sshd, tunnel, server_password=server_password)
        failures += not result.ok

        _step("6. proof: a file written in the runtime arrives on the server")
        note = project / "notes" / "hello.txt"
        note.parent.mkdir()
        text = f"written at {time.strftime('%H:%M:%S')}\n"
        t0 = time.monotonic()
        note.write_text(text)
        copy = Path(pwd.getpwnam(server_user).pw_dir) / "backup" / "demo" / "notes" / "hello.txt"
        arrived = _proc.wait_until(lambda: copy.is_file() and copy.read_text() == text, 30, 0.002)
        if arrived:
            _say(f"OK: {copy} arrived {1000 * (time.monotonic() - t0):.0f} ms after the write")
        else:
            failures += 1
            _say(f"FAILED: {copy} did not arrive within 30 s\n{backup.logs(10)}")
        proved = True

        _step("how you would connect")
        _say(f"  {tunnel.connection_string}")
        _say(f"  (server password: {server_password}; runtime password: {sshd.password}; "
             "both throwaway)")
        _say("For `ssh colab-demo` or VS Code Remote-SSH on this machine while the demo runs, "
             "add this block to ~/.ssh/config:\n" + tunnel.ssh_config(alias="colab-demo"))

        if not check:
            _say("\nEverything is running. Try the ssh command above in another terminal."
                 + (f" Stopping in {timeout:g} s." if timeout else " Ctrl-C stops and cleans up."))
            _wait(timeout)
        _say("\n" + ("demo: every check passed" if not failures
                     else f"demo: {failures} check(s) FAILED"))
    except ColabRemoteError as e:
        failures += 1
        _say(f"\ndemo FAILED: {type(e).__name__}: {e}")
    except _Interrupted:
        name = signal.Signals(signals.received or signal.SIGINT).name
        _say(f"\ndemo: stopped by {name}" + ("" if proved else " before the checks finished"))
        failures += not proved
    finally:
        signals.cleaning = True
        _step("cleaning up: processes, throwaway accounts, folders")
        if base is not None:
            for state in (base / "runtime", base / "server"):
                with contextlib.suppress(Exception):
                    stop_all(state)
        for user in made_users:
            with contextlib.suppress(Exception):
                _remove_account(user)
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)
        _say("done")
    return 1 if failures else 0


def _wait(timeout: float | None) -> None:
    """Sleep until a signal (it raises :class:`_Interrupted`) or ``timeout`` seconds."""
    deadline = time.monotonic() + timeout if timeout else None
    while deadline is None or time.monotonic() < deadline:
        time.sleep(0.2)
