"""Root-side hardening: nothing root writes follows a link another user planted.

Each test plays the other user for real: a throwaway account whose home holds links to files
outside it, or a shared temporary folder with a link planted at the name root would use. The
file outside must stay as it was (content, owner, mode) and the call must say why it refused.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pexpect
import pytest

from colab_remote import (
    ColabRemoteError,
    SshdError,
    _home,
    _install,
    _net,
    _proc,
    server,
    start_sshd,
)
from colab_remote._daemon import socket_dir
from colab_remote.server import Sshd
from colab_remote.status import _forget_one_off_key, _one_off_key

from .conftest import needs_root, needs_sshd, ssh_run, wait_for

pytestmark = [needs_root, needs_sshd]
SECRET = "TOP SECRET: root's own data\n"
SLEEPER = [sys.executable, "-c", "import time; time.sleep(30)"]  # + a marker argument


def _outside(tmp_path: Path) -> Path:
    """A root-owned 0600 file outside every home: what an attacker points a link at."""
    folder = tmp_path / "outside"
    folder.mkdir(mode=0o755, exist_ok=True)
    target = folder / "secret"
    target.write_text(SECRET)
    target.chmod(0o600)
    return target


def _outside_file(tmp_path: Path) -> Path:
    return tmp_path / "outside" / "secret"


def _snapshot(path: Path) -> tuple[str, int, int, int]:
    st = path.lstat()
    content = path.read_text() if path.is_file() else "\n".join(sorted(os.listdir(path)))
    return content, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def _no_copy_in_home(user, target: Path) -> None:
    """No file of the user's (other than the planted link itself) holds the secret."""
    for path in user.home.rglob("*"):
        if path.is_file() and not path.is_symlink() and not path.samefile(target):
            assert "TOP SECRET" not in path.read_text(errors="replace"), path


def _start(tmp_path: Path, user, port: int, **kw) -> Sshd:
    kw.setdefault("password", None if kw.get("authorized_keys") else user.password)
    return start_sshd(port, user=user.name, state_dir=tmp_path / "state", quiet=True, **kw)


# --- ~user: links to files outside the home ----------------------------------------------------


@pytest.mark.parametrize("case", ["ssh_dir", "authorized_keys", "hard_link", "profile", "bash_profile",
                                  "bash_login"])
def test_start_sshd_refuses_links_in_the_home(tmp_path, make_user, free_port, client_key, case) -> None:
    user = make_user()
    target = _outside(tmp_path)
    kw: dict = {}
    if case == "ssh_dir":  # ~/.ssh -> a root-owned folder (the issue's /etc)
        target = target.parent
        os.symlink(target, user.home / ".ssh")
        kw["authorized_keys"] = Path(str(client_key) + ".pub")
    elif case in ("authorized_keys", "hard_link"):  # authorized_keys -> /etc/shadow, say
        ssh_dir = user.home / ".ssh"
        ssh_dir.mkdir(mode=0o700)
        os.chown(ssh_dir, user.uid, user.gid)
        (os.symlink if case == "authorized_keys" else os.link)(target, ssh_dir / "authorized_keys")
        kw["authorized_keys"] = Path(str(client_key) + ".pub")
    elif case == "profile":  # ~/.profile -> /root/.bashrc, say
        (user.home / ".profile").unlink()
        os.symlink(target, user.home / ".profile")
    else:
        os.symlink(target, user.home / f".{case}")
    before = _snapshot(target)
    why = "hard links" if case == "hard_link" else "symbolic link"
    with pytest.raises(SshdError, match=why) as raised:
        _start(tmp_path, user, free_port, **kw)
    assert "refusing" in str(raised.value) and user.name in str(raised.value)
    assert _snapshot(target) == before
    _no_copy_in_home(user, _outside_file(tmp_path))
    assert not (target.parent / "authorized_keys").exists()


def test_self_check_one_off_key_refuses_links(tmp_path, make_user) -> None:
    user = make_user()
    target = _outside(tmp_path)
    ssh_dir = user.home / ".ssh"
    ssh_dir.mkdir(mode=0o700)
    os.chown(ssh_dir, user.uid, user.gid)
    os.symlink(target, ssh_dir / "authorized_keys")
    handle = Sshd(user=user.name, port=22, password=None, pid=0, fingerprints={},
                  state_dir=tmp_path / "state", listen_address=None)
    before = _snapshot(target)
    with pytest.raises(SshdError, match="symbolic link"):
        _one_off_key(handle, tmp_path)
    assert _snapshot(target) == before
    # The key is removed afterwards the same careful way.
    key = tmp_path / "another_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    with pytest.raises(SshdError, match="symbolic link"):
        _forget_one_off_key(handle, key)
    assert _snapshot(target) == before
    _no_copy_in_home(user, target)


def test_a_real_home_still_works(tmp_path, make_user, free_port, client_key) -> None:
    """The careful writes still do their job: ~/.ssh made 0700, keys added 0600, both the user's."""
    user = make_user()
    # What an earlier version wrote (PermitUserEnvironment): removed; the user's own file is not.
    old_env = user.write(".ssh/environment", _home.OLD_ENV_HEADER + "\nTOKEN=abc\n", 0o600)
    with _start(tmp_path, user, free_port, authorized_keys=Path(str(client_key) + ".pub")):
        assert not old_env.exists()
        out = ssh_run(free_port, user.name, None, "echo key-ok", known_hosts=tmp_path / "kh",
                      identity=client_key)
        assert out.endswith("key-ok")
    ssh_dir, keys = user.home / ".ssh", user.home / ".ssh" / "authorized_keys"
    assert stat.S_IMODE(ssh_dir.stat().st_mode) == 0o700 and ssh_dir.stat().st_uid == user.uid
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600 and keys.stat().st_uid == user.uid
    profile = user.home / ".profile"
    assert profile.stat().st_uid == user.uid and server.PROFILE_BEGIN in profile.read_text()
    assert not [p for p in ssh_dir.iterdir() if p.name.startswith(".")]  # no temporary left


# --- shared temporary folders ------------------------------------------------------------------


@pytest.fixture
def shared_tmp(tmp_path, monkeypatch) -> Path:
    """A sticky world-writable folder standing in for /tmp (tempfile uses it)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    return shared


def test_write_private_does_not_follow_a_planted_link(tmp_path) -> None:
    target = _outside(tmp_path)
    folder = tmp_path / "state"
    folder.mkdir()
    # The temporary name the old code used, predicted and planted.
    os.symlink(target, folder / f".config.json.{os.getpid()}.tmp")
    before = _snapshot(target)
    _proc.write_private(folder / "config.json", "{}\n")
    assert _snapshot(target) == before
    assert (folder / "config.json").read_text() == "{}\n" and not (folder / "config.json").is_symlink()
    assert stat.S_IMODE((folder / "config.json").stat().st_mode) == 0o600


def _attacker_folder(tmp_path: Path) -> Path:
    evil = tmp_path / "attacker"
    evil.mkdir(mode=0o755)
    os.chown(evil, 65534, 65534)
    return evil


def test_socket_folder_is_private(tmp_path, shared_tmp) -> None:
    """The tunnel's control sockets and the mirror's sockets: one private folder of ours each."""
    evil = _attacker_folder(tmp_path)
    os.symlink(evil, shared_tmp / f"colab_remote-{os.getuid()}")
    before = _snapshot(evil)
    for run_dir in (tmp_path / "state" / "tunnels" / "20022-h-22", tmp_path / ("d" * 90) / "mirror"):
        folder = socket_dir(run_dir)
        assert not str(folder).startswith(str(shared_tmp / f"colab_remote-{os.getuid()}") + "/")
        for path in (folder, folder.parent):
            st = path.lstat()
            assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
            assert stat.S_IMODE(st.st_mode) == 0o700
        assert len(folder.name) == 12  # short: under /tmp a control socket's path fits sun_path
    assert _snapshot(evil) == before
    # Someone else's real folder at that name, or one open to others, is not used either.
    (shared_tmp / f"colab_remote-{os.getuid()}").unlink()
    for mode, owner in ((0o700, 65534), (0o777, os.getuid())):
        taken = shared_tmp / f"colab_remote-{os.getuid()}"
        taken.mkdir()
        taken.chmod(mode)
        os.chown(taken, owner, owner)
        assert socket_dir(tmp_path / "x").parent != taken
        taken.rmdir()


def test_apt_log_is_private(tmp_path, shared_tmp, monkeypatch) -> None:
    """apt-get's log is not a fixed name in /tmp that root opens for writing."""
    target = _outside(tmp_path)
    os.symlink(target, shared_tmp / "colab_remote-apt.log")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    apt = bin_dir / "apt-get"  # a real program that says what apt-get would and changes nothing
    apt.write_text("#!/bin/sh\necho \"apt-get $1: nothing to do\"\n")
    apt.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    before = _snapshot(target)
    _install.apt_install(["no-such-package"], progress=False)
    assert _snapshot(target) == before
    log = shared_tmp / f"colab_remote-{os.geteuid()}" / "apt.log"
    assert "apt-get install: nothing to do" in log.read_text()
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert stat.S_IMODE(log.parent.stat().st_mode) == 0o700


def test_detached_launch_leaves_no_folder_behind(tmp_path, shared_tmp) -> None:
    """A state folder whose path IPython would expand launches from our private folder."""
    run_dir = tmp_path / "state $x" / "run"
    pids = []
    for _ in range(3):
        pids.append(_proc.spawn_detached(SLEEPER + [str(tmp_path)], run_dir=run_dir, name="sleeper"))
        # (a busy machine: the launcher may not have become the sleeper yet)
        wait_for(lambda: _proc.is_ours(pids[-1], str(tmp_path)), 10, "the sleeper to start")
        _proc.stop(pids[-1], marker=str(tmp_path))
    assert [p.name for p in shared_tmp.iterdir()] == [f"colab_remote-{os.geteuid()}"]
    launchers = list((shared_tmp / f"colab_remote-{os.geteuid()}").iterdir())
    assert len(launchers) == 1 and stat.S_IMODE(launchers[0].stat().st_mode) == 0o700


# --- the environment comes only from root ------------------------------------------------------


def test_user_written_environment_has_no_effect(tmp_path, make_user, free_port, client_key) -> None:
    """PermitUserEnvironment is off: ~/.ssh/environment and environment="..." key options do nothing."""
    user = make_user()
    pub = Path(str(client_key) + ".pub").read_text().strip()
    with _start(tmp_path, user, free_port, password=user.password):
        evil = user.write("evil.sh", "echo PWNED-BASH_ENV\n", 0o755)
        user.write(".ssh/environment", f"BASH_ENV={evil}\nLD_PRELOAD=/nonexistent/evil.so\n"
                                       "PATH=/evil\nCOLAB_REMOTE_PATH=/evil\n", 0o600)
        user.write(".ssh/authorized_keys", f'environment="BASH_ENV={evil}" {pub}\n', 0o600)
        (user.home / ".ssh").chmod(0o700)
        show = 'echo "B=${BASH_ENV-unset}" "L=${LD_PRELOAD-unset}"; echo "P=$PATH"'
        for identity, password in ((None, user.password), (client_key, None)):
            out = ssh_run(free_port, user.name, password, show, known_hosts=tmp_path / "kh",
                          identity=identity)
            assert "PWNED" not in out and "evil.so" not in out and "/evil" not in out
            assert "B=unset L=unset" in out and f"P={os.environ['PATH']}" in out
            login = ssh_run(free_port, user.name, password, f"bash -lc '{show}'",
                            known_hosts=tmp_path / "kh", identity=identity)
            assert "PWNED" not in login and f"P={os.environ['PATH']}" in login
    config = (tmp_path / "state" / "sshd" / "sshd_config").read_text()
    assert "PermitUserEnvironment no" in config.splitlines()
    assert "PermitUserEnvironment yes" not in config


def test_agent_forwarding_is_off(tmp_path, make_user, free_port) -> None:
    user = make_user()
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        assert _proc.wait_until(sock.exists, 5)
        with _start(tmp_path, user, free_port):
            child = pexpect.spawn("ssh", ["-A", "-p", str(free_port),
                                          "-o", f"UserKnownHostsFile={tmp_path}/kh",
                                          "-o", "StrictHostKeyChecking=accept-new",
                                          "-o", "PubkeyAuthentication=no", f"{user.name}@127.0.0.1",
                                          'echo "A=${SSH_AUTH_SOCK-unset}"'],
                                  env={**os.environ, "SSH_AUTH_SOCK": str(sock)}, encoding="utf-8",
                                  timeout=20)
            child.expect("assword:")
            child.sendline(user.password)
            child.expect(pexpect.EOF)
            child.close()
            assert "A=unset" in child.before, child.before
    finally:
        agent.terminate()
        agent.wait(5)


# --- host keys from Colab Secrets --------------------------------------------------------------


def _stand_in_colab(tmp_path: Path, secrets: dict[str, str]) -> Path:
    """A ``google.colab.userdata`` module as Colab has it (``get``, ``SecretNotFoundError``)."""
    root = tmp_path / "stand-in-colab"
    pkg = root / "google" / "colab"
    pkg.mkdir(parents=True)
    (root / "google" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "userdata.py").write_text(textwrap.dedent(f"""
        class SecretNotFoundError(Exception):
            def __init__(self, key):
                super().__init__(f"Secret {{key}} does not exist.")

        _SECRETS = {secrets!r}

        def get(key):
            if key not in _SECRETS:
                raise SecretNotFoundError(key)
            return _SECRETS[key]
    """))
    return root


@pytest.fixture
def colab(tmp_path, monkeypatch):
    def install(secrets: dict[str, str]) -> None:
        for name in ("google", "google.colab", "google.colab.userdata"):
            monkeypatch.delitem(sys.modules, name, raising=False)
        monkeypatch.syspath_prepend(str(_stand_in_colab(tmp_path, secrets)))

    yield install
    for name in ("google", "google.colab", "google.colab.userdata"):
        sys.modules.pop(name, None)


def test_host_keys_from_a_colab_secret(tmp_path, make_user, colab, capsys) -> None:
    key = tmp_path / "host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "laptop", "-f", str(key)],
                   check=True)
    pub = Path(f"{key}.pub").read_text().split()
    # As pasted into the Secrets form: one line, the line breaks turned into spaces.
    colab({"SSH_HOST_KEY": key.read_text().replace("\n", " ")})
    user = make_user()
    ports = _net.free_port(), _net.free_port()
    handles = []
    try:
        for i, port in enumerate(ports):
            handles.append(start_sshd(port, user=user.name, password=user.password,
                                      state_dir=tmp_path / f"rt{i}", host_keys="colab-secret:SSH_HOST_KEY",
                                      quiet=True))
        wanted = server._ssh.fingerprint(" ".join(pub))
        assert [h.fingerprints for h in handles] == [{"ED25519": wanted}] * 2
        live = tmp_path / "rt1" / "sshd" / "host_keys" / "ssh_host_ed25519_key"
        assert stat.S_IMODE(live.stat().st_mode) == 0o600
        assert "plain text" not in capsys.readouterr().out
        # The laptop pins the key once; the second runtime passes strict checking.
        kh = tmp_path / "kh"
        kh.write_text(f"[127.0.0.1]:{ports[1]} {pub[0]} {pub[1]}\n")
        child = pexpect.spawn("ssh", ["-p", str(ports[1]), "-o", f"UserKnownHostsFile={kh}",
                                      "-o", "StrictHostKeyChecking=yes", "-o", "PubkeyAuthentication=no",
                                      f"{user.name}@127.0.0.1", "echo strict-ok"], encoding="utf-8",
                              timeout=15)
        child.expect("assword:")
        child.sendline(user.password)
        child.expect(pexpect.EOF)
        child.close()
        assert "strict-ok" in child.before
    finally:
        for h in handles:
            h.stop()


def test_host_keys_secret_errors_say_what_to_do(tmp_path, make_user, colab, free_port) -> None:
    user = make_user()
    with pytest.raises(ValueError, match="secret name"):
        start_sshd(free_port, user=user.name, password=user.password, state_dir=tmp_path / "s",
                   host_keys="colab-secret:bad name", quiet=True)
    for name in ("google", "google.colab", "google.colab.userdata"):
        sys.modules.pop(name, None)
    with pytest.raises(SshdError, match="not a Colab runtime"):
        _start(tmp_path, user, free_port, host_keys="colab-secret:SSH_HOST_KEY")
    colab({"NOT_A_KEY": "hello"})
    running = _start(tmp_path, user, free_port)
    try:
        with pytest.raises(SshdError, match="ssh-keygen -t ed25519") as missing:
            _start(tmp_path, user, free_port, host_keys="colab-secret:SSH_HOST_KEY")
        assert "SecretNotFoundError" in str(missing.value)
        with pytest.raises(SshdError, match="holds no private key"):
            _start(tmp_path, user, free_port, host_keys="colab-secret:NOT_A_KEY")
        # A re-run that fails on its host keys leaves the running sshd alone.
        assert running.alive and _net.ssh_banner("127.0.0.1", free_port, 1) is not None
    finally:
        running.stop()


def test_host_keys_folder_says_it_is_plain_text(tmp_path, make_user, free_port, capsys) -> None:
    user = make_user()
    drive = tmp_path / "drive" / "keys"
    start_sshd(free_port, user=user.name, password=user.password, state_dir=tmp_path / "state",
               host_keys=drive, quiet=False).stop()
    printed = capsys.readouterr().out
    notice = [line for line in printed.splitlines() if "plain text" in line]
    assert len(notice) == 1 and str(drive) in notice[0] and "colab-secret:NAME" in notice[0]


# --- where the runtime's sshd listens, and what it allows --------------------------------------


def _listening(port: int) -> set[str]:
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout
    return {line.split()[3] for line in out.splitlines() if line.strip()}


def test_sshd_listens_on_the_loopback_by_default(tmp_path, make_user, free_port) -> None:
    user = make_user()
    with _start(tmp_path, user, free_port) as sshd:
        assert _listening(free_port) == {f"127.0.0.1:{free_port}", f"[::1]:{free_port}"}
        assert sshd.listen_addresses == ["127.0.0.1", "::1"]
        assert _net.ssh_banner("::1", free_port) is not None
        out = ssh_run(free_port, user.name, user.password, "echo v4-ok", known_hosts=tmp_path / "kh")
        assert out.endswith("v4-ok")
    # listen_address= opens more: every IPv4 address (and still ::1), or every IPv6 one.
    for extra, wanted in (("0.0.0.0", {f"0.0.0.0:{free_port}", f"[::1]:{free_port}"}),
                          ("::", {f"127.0.0.1:{free_port}", f"[::]:{free_port}"})):
        with _start(tmp_path, user, free_port, listen_address=extra):
            assert _listening(free_port) == wanted


def test_sshd_on_a_machine_without_ipv6(tmp_path, make_user, free_port) -> None:
    """In a network namespace with IPv6 off, ::1 cannot be bound: 127.0.0.1 alone, and it works."""
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a network namespace here")
    user = make_user()
    script = textwrap.dedent(f"""
        import json
        from colab_remote import _net, start_sshd
        sshd = start_sshd({free_port}, user={user.name!r}, password={user.password!r},
                          state_dir={str(tmp_path / "state")!r}, quiet=True)
        try:
            print(json.dumps({{"addresses": sshd.listen_addresses, "v6": _net.can_bind("::1"),
                              "banner": _net.ssh_banner("127.0.0.1", {free_port})}}))
        finally:
            sshd.stop()
    """)
    setup = ("ip link set lo up && sysctl -q -w net.ipv6.conf.all.disable_ipv6=1 "
             "net.ipv6.conf.default.disable_ipv6=1 net.ipv6.conf.lo.disable_ipv6=1 && exec \"$0\" -c \"$1\"")
    done = subprocess.run(["unshare", "--net", "sh", "-c", setup, sys.executable, script],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["addresses"] == ["127.0.0.1"] and report["v6"] is False
    assert report["banner"].startswith("SSH-2.0-OpenSSH")
    config = (tmp_path / "state" / "sshd" / "sshd_config").read_text()
    assert "ListenAddress 127.0.0.1" in config and "ListenAddress ::1" not in config


def _sshd_version() -> tuple[int, int]:
    done = subprocess.run([_install.find_program("sshd") or "sshd", "-V"], capture_output=True, text=True)
    found = re.search(r"OpenSSH_(\d+)\.(\d+)", done.stdout + done.stderr)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def test_loopback_is_exempt_from_penalties_where_sshd_has_them(tmp_path, make_user, free_port) -> None:
    """OpenSSH >= 9.8 penalises addresses that fail logins: exempt the loopback only, never turn
    penalties off; an older sshd gets neither line (and sshd -t passes)."""
    user = make_user()
    with _start(tmp_path, user, free_port) as sshd:
        config = sshd.config_path.read_text()
        assert "PerSourcePenalties " not in config
        has_penalties = _sshd_version() >= (9, 8)
        assert ("PerSourcePenaltyExemptList 127.0.0.1/32,::1/128" in config) == has_penalties
        checked = subprocess.run([_install.find_program("sshd") or "sshd", "-t", "-f", str(sshd.config_path)],
                                 capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr


@pytest.mark.skipif(_sshd_version() < (9, 8), reason="sshd has no per-source penalties (OpenSSH < 9.8)")
def test_failed_logins_from_the_loopback_are_not_penalised(tmp_path, make_user, free_port) -> None:
    """Every tunnelled login comes from the loopback: a few wrong passwords must not lock it out."""
    user = make_user()
    with _start(tmp_path, user, free_port):
        for _ in range(5):  # authfail is 5 s of penalty each; 15 s blocks a source by default
            with pytest.raises(AssertionError, match="exited 255"):
                ssh_run(free_port, user.name, "wrong-" + user.password, "true", known_hosts=tmp_path / "kh")
        out = ssh_run(free_port, user.name, user.password, "echo still-welcome", known_hosts=tmp_path / "kh")
        assert out.endswith("still-welcome")


def test_a_launch_given_up_leaves_no_child(tmp_path, monkeypatch) -> None:
    """A launch abandoned before the child recorded its pid (a slow machine, a signal) stops it."""
    real = _proc.read_pid
    slow_until = time.monotonic() + 0.5  # the child's pid file shows up "late"
    monkeypatch.setattr(_proc, "read_pid", lambda path: None if time.monotonic() < slow_until else real(path))
    with pytest.raises(ColabRemoteError, match="did not start"):
        _proc.spawn_detached(SLEEPER + [str(tmp_path)], run_dir=tmp_path / "run", name="sleeper",
                             timeout=0.2)
    monkeypatch.undo()
    pid = _proc.read_pid(tmp_path / "run" / "sleeper.pid")
    assert pid is not None and not _proc.pid_alive(pid)


def test_sftp_sessions_get_the_environment(tmp_path, make_user, free_port, monkeypatch) -> None:
    """SetEnv reaches subsystems too: the sftp-server of a session runs with the kernel's variables."""
    monkeypatch.setenv("COLAB_GPU", "sftp-sees-it")
    user = make_user()
    with _start(tmp_path, user, free_port) as sshd:
        child = pexpect.spawn("sftp", ["-P", str(free_port), "-o", f"UserKnownHostsFile={tmp_path}/kh",
                                       "-o", "StrictHostKeyChecking=accept-new",
                                       "-o", "PubkeyAuthentication=no", f"{user.name}@127.0.0.1"],
                              encoding="utf-8", timeout=20)
        try:
            child.expect("assword:")
            child.sendline(user.password)
            child.expect("sftp>")
            servers: list[int] = []

            def find() -> bool:
                todo = list(_proc.children(sshd.pid))
                while todo:
                    pid = todo.pop()
                    if any("sftp-server" in a for a in _proc.cmdline(pid)):
                        servers.append(pid)
                    todo += _proc.children(pid)
                return bool(servers)

            assert _proc.wait_until(find, 5)
            environ = Path(f"/proc/{servers[0]}/environ").read_bytes().split(b"\0")
            assert b"COLAB_GPU=sftp-sees-it" in environ
            assert f"PATH={os.environ['PATH']}".encode() in environ
            child.sendline("bye")
            child.expect(pexpect.EOF)
        finally:
            child.close(force=True)
