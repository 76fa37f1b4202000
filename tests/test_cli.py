"""The first hour at the command line: ``python -m colab_remote`` in a subprocess, against real
sshd servers on 127.0.0.1. One voice for errors, the subcommand's usage for a caller mistake, quick
answers for a wrong host or port, and ``status``/``stop`` that tell live from dead."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import colab_remote
import colab_remote.mirror
from colab_remote import (
    Mirror,
    MirrorError,
    Sshd,
    TunnelError,
    _net,
    find_tunnels,
    mirror,
    reverse_forward,
)
from colab_remote._mirror import checks

from .conftest import needs_root, needs_sshd

ROOT = Path(__file__).resolve().parent.parent
mirror_module = sys.modules["colab_remote.mirror"]  # the package's name "mirror" is the function
CLI = [sys.executable, "-m", "colab_remote"]
TIMESTAMPED = re.compile(r"(?m)^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def cli(*args: str, stdin: str = "", timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, timeout=timeout)


# --- caller mistakes: the subcommand's usage, then the error -------------------------------------


def test_a_caller_mistake_shows_the_subcommands_usage(tmp_path) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    bad_port = cli("tunnel", "bob@127.0.0.1", "--port", "0", *state)
    assert bad_port.returncode == 2
    assert bad_port.stderr.startswith("usage: colab-remote tunnel ")
    assert "colab-remote: ValueError: port must be 1..65535, got 0" in bad_port.stderr
    missing = cli("push", str(tmp_path / "nope"), "root@localhost:/content/p", *state)
    assert missing.returncode == 2 and missing.stderr.startswith("usage: colab-remote push ")
    assert f"colab-remote: ValueError: local_dir {tmp_path / 'nope'} does not exist" in missing.stderr


@pytest.mark.parametrize("lines", ["-5", "0", "x"])
def test_logs_refuses_a_line_count_that_is_not_positive(tmp_path, lines) -> None:
    done = cli("logs", "-n", lines, "--state-dir", str(tmp_path / "state"))
    assert done.returncode == 2 and done.stderr.startswith("usage: colab-remote logs ")
    assert "must be a whole number above 0" in done.stderr


def test_a_missing_folder_is_an_error_before_anything_runs(tmp_path) -> None:
    missing = tmp_path / "path" / "that" / "does" / "not" / "exist"
    state = tmp_path / "state"
    done = cli("mirror", str(missing), "bob@127.0.0.1:backup", "--port", str(_net.free_port()),
               "--state-dir", str(state))
    assert done.returncode == 2
    assert f"colab-remote: ValueError: local_dir {missing} does not exist" in done.stderr
    assert "restore=True" in done.stderr
    assert not missing.exists() and not (state / "mirror").exists()  # nothing ran, nothing made
    with pytest.raises(ValueError, match=f"local_dir {missing} does not exist"):
        mirror(missing, "bob@127.0.0.1:backup", state_dir=state, quiet=True)
    assert not missing.exists() and not (state / "mirror").exists()


NON_ROOT_MIRROR = """
import sys
from colab_remote import mirror
try:
    mirror(sys.argv[1], "nobody@127.0.0.1:backup", port=int(sys.argv[2]), state_dir=sys.argv[3],
           restore=sys.argv[4] == "1", quiet=True)
except ValueError as e:
    print(f"ValueError: {e}")
"""


@needs_root
def test_an_unreadable_or_unreachable_folder_is_a_clear_error(tmp_path, make_user) -> None:
    """As a user who cannot read everything (root can): ValueErrors naming the folder, before
    anything runs, instead of rsync's exit 23 in a log or a PermissionError traceback."""
    user = make_user()
    home = user.home
    secret = home / "secret"  # the user's own folder, mode 000
    secret.mkdir()
    os.chown(secret, user.uid, user.gid)
    secret.chmod(0)
    locked = home / "locked"  # root's 0700 folder: what is inside cannot be reached
    locked.mkdir(mode=0o700)
    (locked / "project").mkdir()
    readonly = home / "readonly"  # root's 0755 folder: the user cannot create in it
    readonly.mkdir(mode=0o755)
    state = home / "state"
    state.mkdir()
    os.chown(state, user.uid, user.gid)
    as_user = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's code, whatever is installed
    closed = str(_net.free_port())
    for folder, restore, said in ((home / "typo", "0", "does not exist"),
                                  (secret, "0", f"cannot be read by {user.name} (mode d---------"),
                                  (locked / "project", "0", f"cannot be reached by {user.name}: a folder "
                                                            "above it cannot be entered"),
                                  (readonly / "new", "1", f"{user.name} cannot create it: {readonly} "
                                                          "is not writable")):
        done = subprocess.run([*as_user, sys.executable, "-c", NON_ROOT_MIRROR, str(folder), closed,
                               str(state), restore], cwd=home, env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.stdout.startswith(f"ValueError: local_dir {folder} "), done.stdout + done.stderr
        assert said in done.stdout, done.stdout
        assert not (state / "mirror").exists()  # before anything ran
    done = subprocess.run([*as_user, *CLI, "mirror", str(secret), "nobody@127.0.0.1:backup", "--port",
                           closed, "--state-dir", str(state)], cwd=home, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert f"colab-remote: ValueError: local_dir {secret} cannot be read" in done.stderr
    assert "Traceback" not in done.stderr


# --- a new Mirror or Sshd handle shows what it is at once ----------------------------------------


def test_a_new_mirror_handle_knows_the_calls_values(tmp_path, monkeypatch) -> None:
    """What mirror() returns (and find_mirrors finds) before the process wrote its status."""
    project = tmp_path / "project"
    project.mkdir()
    state = tmp_path / "state"
    args = checks.prepare(project, "bob@127.0.0.1:backup/p", port=2222, password=None,
                           identity_file=None, state_dir=state, exclude=None, host_key=None)
    monkeypatch.setenv("COLAB_REMOTE_MIRROR_AGENT", "0")  # no set-up login: nothing listens there
    _, run_dir, _, _ = mirror_module._config(args, delete=True, backup=True, restore=False, keep_days=7,
                                             restricted=False, key_days=3, quiet=True)
    assert not (run_dir / "status.json").exists()
    handle = Mirror(run_dir)
    assert (handle.local_dir, handle.port) == (str(project), 2222)
    assert handle.destination == "bob@127.0.0.1:backup/p"
    assert repr(handle).startswith(f"<Mirror {project} -> bob@127.0.0.1:backup/p stopped")
    card = handle._repr_html_()
    assert "<code>2222</code>" in card and f"<code>{project}</code>" in card
    (found,) = colab_remote.find_mirrors(state)
    assert (found.local_dir, found.port) == (str(project), 2222)


@pytest.mark.parametrize(("listen", "shown"), [("127.0.0.1", "127.0.0.1"), (None, "*"), ("::1", "[::1]")])
def test_an_sshd_handle_names_where_it_listens(tmp_path, listen, shown) -> None:
    sshd = Sshd(user="root", port=2222, password=None, pid=1, fingerprints={}, state_dir=tmp_path,
                listen_address=listen)
    assert repr(sshd) == f"<Sshd root@{shown}:2222 stopped, pid 1>"


# --- a wrong host or port ends the wait at once ---------------------------------------------------


@needs_root
@needs_sshd
def test_a_refused_connection_or_unknown_host_fails_at_once(tmp_path, make_user) -> None:
    state = tmp_path / "state"
    closed = _net.free_port()
    for destination, port, said in (("bob@127.0.0.1", closed, "Connection refused"),
                                    ("bob@no-such-host.invalid", 22, "Could not resolve hostname")):
        t0 = time.monotonic()
        with pytest.raises(TunnelError, match=said) as caught:
            reverse_forward(destination, port=port, remote_port=_net.free_port(), state_dir=state,
                            quiet=True)  # the default timeout, 30 s
        took = time.monotonic() - t0
        assert took < 5, f"{said}: reported after {took:.1f} s"
        assert "could not reach" in str(caught.value) and "fix:" in str(caught.value)
    assert not any(t.alive for t in find_tunnels(state))
    assert all(t.logs(100).count("dialling") == 1 for t in find_tunnels(state))  # no retry
    project = tmp_path / "project"
    project.mkdir()
    t0 = time.monotonic()
    with pytest.raises(MirrorError, match="Connection refused"):
        mirror(project, "bob@127.0.0.1:backup", port=closed, state_dir=state, quiet=True)
    assert time.monotonic() - t0 < 5


@needs_root
@needs_sshd
def test_the_tunnel_command_takes_a_timeout(tmp_path) -> None:
    t0 = time.monotonic()
    done = cli("tunnel", "bob@127.0.0.1", "--port", str(_net.free_port()), "--timeout", "5",
               "--remote-port", str(_net.free_port()), "--state-dir", str(tmp_path / "state"))
    assert done.returncode == 1 and time.monotonic() - t0 < 10
    assert done.stderr.startswith("colab-remote: TunnelError: could not reach 127.0.0.1 port")
    assert "fix: " in done.stderr
    assert "--timeout TIMEOUT" in cli("tunnel", "--help").stdout
    assert "--timeout" in cli("push", "--help").stdout


# --- one voice for a failing tool -----------------------------------------------------------------


@needs_root
@needs_sshd
def test_the_mirror_commands_wrong_password_is_one_clear_error(tmp_path, server) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "a.txt").write_text("a\n")
    done = cli("mirror", str(project), f"{server.user.name}@127.0.0.1:backup", "--port", str(server.port),
               "--password-stdin", "--state-dir", str(tmp_path / "state"), stdin="wrong-password\n")
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.startswith("colab-remote: AuthenticationError: "), done.stderr
    assert "refused the" in done.stderr and "Permission denied" in done.stderr and "fix: " in done.stderr
    assert not TIMESTAMPED.search(done.stdout + done.stderr), done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "wrong-password" not in done.stdout + done.stderr


# --- status and stop -------------------------------------------------------------------------------


@needs_root
@needs_sshd
def test_status_lists_the_dead_apart_and_stop_names_what_it_stopped(tmp_path, server, make_user) -> None:
    runtime = make_user()
    state = tmp_path / "state"
    sshd = colab_remote.start_sshd(_net.free_port(), user=runtime.name, password=runtime.password,
                                   state_dir=state, listen_address="127.0.0.1", quiet=True)
    closed, live_port = _net.free_port(), _net.free_port()
    with pytest.raises(TunnelError):  # a supervisor that failed (a restricted set-up starts none)
        reverse_forward("bob@127.0.0.1", port=closed, remote_port=_net.free_port(), state_dir=state,
                        quiet=True, restricted=False)
    live = reverse_forward(f"{server.user.name}@127.0.0.1", port=server.port, remote_port=live_port,
                           password=server.user.password, state_dir=state, quiet=True)
    live_pid = live.pid
    try:
        shown = cli("status", "--state-dir", str(state)).stdout
        running, _, dead = shown.partition("not running")
        assert f"<Sshd {runtime.name}@127.0.0.1:{sshd.port} up" in running
        assert f"-R {live_port}:localhost:{sshd.port} up" in running
        assert "failed" not in running and dead
        (failed,) = [line for line in dead.splitlines() if "<Tunnel bob@127.0.0.1" in line]
        assert " failed, " in failed and "Connection refused" in failed

        stopped = cli("stop", "--state-dir", str(state))
        lines = stopped.stdout.splitlines()
        assert f"stopped tunnel {server.user.name}@127.0.0.1 -R {live_port}:localhost:{sshd.port} " \
               f"(pid {live_pid})" in lines
        assert f"stopped sshd {runtime.name}@127.0.0.1:{sshd.port} (pid {sshd.pid})" in lines
        assert any(line.startswith("removed the record of the failed tunnel bob@127.0.0.1 -R ")
                   for line in lines), lines
        assert "stopped 2 running processes, removed 1 record" in stopped.stdout
        after = colab_remote.status(state)
        assert after.running() == [] and after.tunnels == []
        assert "nothing running" in repr(after)
    finally:
        live.stop()
        sshd.stop()


def test_stop_on_an_empty_state_folder_says_so(tmp_path) -> None:
    done = cli("stop", "--state-dir", str(tmp_path / "state"))
    assert done.returncode == 0 and done.stdout.strip() == "stopped 0 running processes"
    assert isinstance(colab_remote.stop_all(tmp_path / "state"), int)

