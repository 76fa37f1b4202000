"""``colab-remote demo`` stopped at any point leaves nothing behind; its accounts are throwaway.

The demo runs for real (two sshd, the tunnel, the mirror, throwaway accounts) and is killed the way
a CI timeout or a closed terminal kills it. Afterwards no account, process or folder of it is left.
Only the accounts the demo names are looked at (something else may create accounts meanwhile).
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from colab_remote import _demo, _proc

from .conftest import needs_root, needs_sshd

pytestmark = [needs_root, needs_sshd]


def _exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _processes_naming(*words: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and _proc.pid_alive(int(entry)):
            line = " ".join(_proc.cmdline(int(entry)))
            if any(w in line for w in words):
                found.append(f"{entry}: {line[:160]}")
    return found


class Demo:
    """``colab-remote demo`` in a child process, its output read line by line."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.tmp_path = tmp_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "colab_remote", "demo", "--base-dir", str(tmp_path), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.lines: list[str] = []
        self.users: list[str] = []

    def wait_for(self, text: str, timeout: float = 120) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                pytest.fail(f"the demo ended before {text!r}:\n" + "".join(self.lines))
            self.lines.append(line)
            named = re.match(r"throwaway accounts: (\S+) (\S+)", line)
            if named:
                self.users = list(named.groups())
            if text in line:
                return
        pytest.fail(f"no {text!r} within {timeout} s:\n" + "".join(self.lines))

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, "".join(self.lines) + out

    def assert_nothing_left(self) -> None:
        assert self.users, "the demo did not name its accounts"
        assert [u for u in self.users if _exists(u)] == []
        assert _processes_naming(str(self.tmp_path), *self.users) == []
        assert list(self.tmp_path.iterdir()) == []
        assert not [p for p in Path("/home").iterdir() if p.name in self.users]


# Inside each step: while the accounts are made, sshd starts, the tunnel and the mirror come up,
# the proofs run, and while it waits for Ctrl-C.
POINTS = ["throwaway accounts", "== 1.", "== 2.", "== 3.", "== 4.", "== 5.", "== 6."]


@pytest.mark.parametrize("point", POINTS)
def test_sigterm_at_any_point_leaves_nothing(tmp_path, point) -> None:
    demo = Demo(tmp_path, "--check")
    demo.wait_for(point)
    demo.proc.send_signal(signal.SIGTERM)
    code, out = demo.finish()
    assert "cleaning up" in out and out.rstrip().endswith("done"), out
    if "every check passed" not in out:  # stopped before the proofs ended: not a success
        assert code == 1 and "stopped by SIGTERM" in out, out
    demo.assert_nothing_left()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP, signal.SIGTERM])
def test_signals_while_running_clean_up(tmp_path, sig) -> None:
    """Without --check it waits; Ctrl-C, a closed terminal or SIGTERM end it cleanly (exit 0)."""
    demo = Demo(tmp_path, "--timeout", "120")
    demo.wait_for("Everything is running")
    demo.proc.send_signal(sig)
    code, out = demo.finish()
    assert code == 0 and f"stopped by {sig.name}" in out and out.rstrip().endswith("done"), out
    demo.assert_nothing_left()


def test_output_closed_midway_still_cleans_up(tmp_path) -> None:
    """`colab-remote demo | head`: the reader goes away; the demo still removes everything."""
    demo = Demo(tmp_path, "--check")
    demo.wait_for("== 3.")
    assert demo.proc.stdout is not None
    demo.proc.stdout.close()
    assert demo.proc.wait(120) in (0, 1)
    demo.assert_nothing_left()


def test_throwaway_accounts_expire_and_get_a_minimal_environment(tmp_path) -> None:
    demo = Demo(tmp_path, "--timeout", "120", env={"CI_SECRET_TOKEN": "do-not-leak-1234"})
    demo.wait_for("Everything is running")
    try:
        for user in demo.users:
            shadow = subprocess.run(["getent", "shadow", user], capture_output=True, text=True,
                                    check=True).stdout.split(":")
            tomorrow = int(time.time() // 86400) + 1
            assert int(shadow[7]) in (tomorrow, tomorrow - 1, tomorrow + 1), shadow  # expires
        configs = list(tmp_path.glob("colab-remote-demo-*/*/sshd/sshd_config"))
        assert len(configs) == 2
        for config in configs:
            text = config.read_text()
            assert "do-not-leak-1234" not in text and "CI_SECRET_TOKEN" not in text
            assert 'SetEnv "COLAB_REMOTE_PATH=' in text and '"LANG=C.UTF-8"' in text
        # Nothing of the demo's environment in the accounts' homes either.
        for user in demo.users:
            home = Path(pwd.getpwnam(user).pw_dir)
            for path in home.rglob("*"):
                if path.is_file():
                    assert "do-not-leak-1234" not in path.read_text(errors="replace"), path
    finally:
        demo.proc.send_signal(signal.SIGTERM)
        demo.finish()
    demo.assert_nothing_left()


def test_an_existing_account_is_never_the_demos(tmp_path, monkeypatch, capsys) -> None:
    """A name that exists already is an error; the demo neither uses nor deletes that account."""
    monkeypatch.setattr(_demo.secrets, "token_hex", lambda n: "c0ffee")
    subprocess.run(["useradd", "--create-home", "crdemoc0ffee"], check=True)
    try:
        before = subprocess.run(["getent", "shadow", "crdemoc0ffee"], capture_output=True, text=True,
                                check=True).stdout
        assert _demo.run_demo(check=True, base_dir=str(tmp_path)) == 1
        out = capsys.readouterr().out
        assert "crdemoc0ffee exists already" in out
        assert _exists("crdemoc0ffee") and Path("/home/crdemoc0ffee").is_dir()
        after = subprocess.run(["getent", "shadow", "crdemoc0ffee"], capture_output=True, text=True,
                               check=True).stdout
        assert after == before  # its password was not changed either
        assert list(tmp_path.iterdir()) == []
    finally:
        subprocess.run(["userdel", "--remove", "--force", "crdemoc0ffee"], capture_output=True)
