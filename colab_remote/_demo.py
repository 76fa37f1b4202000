"""``colab-remote demo``: the whole product on one machine, with throwaway accounts.

A "runtime" sshd (start_sshd) and a stand-in "server" (a second sshd of its own on 127.0.0.1 with
its own throwaway account), the reverse tunnel between them and a mirror of a demo folder. It then
proves that it works: a login through the tunnel runs a command, and a file written in the project
arrives on the server. Everything it made (processes, accounts, folders) is removed at the end.
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
from pathlib import Path
from types import FrameType

from . import _proc
from .errors import ColabRemoteError, InstallError


def _say(text: str) -> None:
    print(text, flush=True)


def _step(text: str) -> None:
    _say(f"\n== {text}")


def run_demo(*, check: bool = False, timeout: float | None = None, base_dir: str | None = None) -> int:
    """Run the demo; with ``check`` exit after the proof instead of waiting for Ctrl-C.

    Returns the process exit status: 0 when every proof passed.
    """
    if os.geteuid() != 0:
        raise InstallError("the demo needs root (it creates throwaway accounts)",
                           fix="run: sudo colab-remote demo")
    for program, package in (("sshd", "openssh-server"), ("ssh", "openssh-client"), ("rsync", "rsync")):
        _proc.require_program(program, package=package, install=True, error=InstallError)

    from .mirror import mirror
    from .reverse import reverse_forward
    from .server import start_sshd
    from .status import self_check, stop_all

    base = Path(tempfile.mkdtemp(prefix="colab-remote-demo-", dir=base_dir))
    runtime_state, server_state = base / "runtime", base / "server"
    tag = secrets.token_hex(3)
    runtime_user, server_user = f"crdemo{tag}", f"crserver{tag}"
    made_users: list[str] = []
    failures = 0
    try:
        _step("1. the runtime's SSH server: start_sshd()")
        runtime_port = _proc.free_port()
        made_users.append(runtime_user)
        sshd = start_sshd(runtime_port, user=runtime_user, state_dir=runtime_state,
                          listen_address="127.0.0.1")

        _step("2. a stand-in for your server: another sshd on 127.0.0.1 with a throwaway account")
        server_port = _proc.free_port()
        made_users.append(server_user)
        server = start_sshd(server_port, user=server_user, state_dir=server_state,
                            listen_address="127.0.0.1", quiet=True)
        server_password = server.password
        assert server_password is not None
        _say(f"server: {server_user}@127.0.0.1 port {server_port} (password set, not shown)")

        _step("3. the reverse tunnel: reverse_forward()")
        tunnel = reverse_forward(f"{server_user}@127.0.0.1", port=server_port,
                                 password=server_password, remote_port=_proc.free_port(),
                                 state_dir=runtime_state)

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

        _step("how you would connect")
        _say(f"  {tunnel.connection_string}")
        _say(f"  (server password: {server_password}; runtime password: {sshd.password}; both throwaway)")
        _say("VS Code Remote-SSH / ~/.ssh/config:\n" + tunnel.ssh_config(alias="colab-demo"))

        if not check:
            _say("\nEverything is running. Try the ssh command above in another terminal."
                 + (f" Stopping in {timeout:g} s." if timeout else " Ctrl-C stops and cleans up."))
            _wait(timeout)
        _say("\n" + ("demo: every check passed" if not failures else f"demo: {failures} check(s) FAILED"))
    except ColabRemoteError as e:
        failures += 1
        _say(f"\ndemo FAILED: {type(e).__name__}: {e}")
    except KeyboardInterrupt:
        pass
    finally:
        _step("cleaning up: processes, throwaway accounts, folders")
        with contextlib.suppress(Exception):
            stop_all(runtime_state)
        with contextlib.suppress(Exception):
            stop_all(server_state)
        for user in made_users:
            with contextlib.suppress(KeyError):
                pwd.getpwnam(user)
                _proc.run(["userdel", "--remove", "--force", user], check=False)
        shutil.rmtree(base, ignore_errors=True)
        _say("done")
    return 1 if failures else 0


def _wait(timeout: float | None) -> None:
    """Sleep until Ctrl-C, SIGTERM or ``timeout`` seconds."""
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        deadline = time.monotonic() + timeout if timeout else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        signal.signal(signal.SIGTERM, old)
