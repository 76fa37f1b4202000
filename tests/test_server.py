"""start_sshd() against a real sshd on 127.0.0.1, with throwaway users and real ssh clients."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pexpect
import pytest

import colab_remote
from colab_remote import SshdError, _install, _net, _proc, _ssh, server, start_sshd
from colab_remote.server import kernel_environment, load_sshd

from .conftest import needs_root, needs_sshd, ssh_run

pytestmark = [needs_root, needs_sshd]


def start(tmp_path: Path, user, port: int, **kw):
    kw.setdefault("password", None if kw.get("authorized_keys") else user.password)
    return start_sshd(port, user=user.name, state_dir=tmp_path / "state", listen_address="127.0.0.1",
                      quiet=True, **kw)


def test_api_surface() -> None:
    public = {n for n in dir(colab_remote) if not n.startswith("_")}
    modules = {"errors", "server", "cli", "reverse", "mirror"}
    assert public - modules - {"annotations"} <= set(colab_remote.__all__)
    for name in colab_remote.__all__:
        assert hasattr(colab_remote, name), name


def test_login_with_printed_password(tmp_path, make_user, free_port, capsys) -> None:
    user = make_user()
    sshd = start_sshd(free_port, user=user.name, state_dir=tmp_path / "state",
                      listen_address="127.0.0.1")
    printed = capsys.readouterr().out
    password = re.search(r"password:\s+(\S+)", printed).group(1)
    assert password == sshd.password and len(password) == 20 and password.isalnum()
    assert str(free_port) in printed and "SHA256:" in printed and "reverse_forward" in printed
    out = ssh_run(free_port, user.name, password, "id -un; echo hello", known_hosts=tmp_path / "kh")
    assert out.splitlines()[-2:] == [user.name, "hello"]
    # The password is in no file of ours but the root-only one that keeps it for a re-run.
    kept = tmp_path / "state" / "sshd" / "password"
    for path in (tmp_path / "state").rglob("*"):
        if path.is_file() and path != kept:
            assert password not in path.read_text(errors="replace"), path
    assert kept.read_text() == password + "\n" and _proc.is_private(kept) and kept.stat().st_uid == 0
    assert _proc.is_private(tmp_path / "state" / "sshd" / "sshd_config")
    sshd.stop()
    assert not sshd.alive


def test_new_user_is_created(tmp_path, free_port) -> None:
    name = "crt" + secrets.token_hex(4)
    try:
        with start_sshd(free_port, user=name, state_dir=tmp_path / "state", listen_address="127.0.0.1",
                        quiet=True) as sshd:
            out = ssh_run(free_port, name, sshd.password, "echo $HOME; echo $0",
                          known_hosts=tmp_path / "kh")
            assert f"/home/{name}" in out
    finally:
        subprocess.run(["userdel", "--remove", "--force", name], capture_output=True)


def test_key_login_and_password_refused_in_key_only_mode(tmp_path, make_user, free_port,
                                                         client_key) -> None:
    user = make_user()
    user.write(".ssh/authorized_keys", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExisting old@key\n", 0o600)
    pub = Path(str(client_key) + ".pub")
    with start(tmp_path, user, free_port, authorized_keys=pub) as sshd:
        assert sshd.password is None
        out = ssh_run(free_port, user.name, None, "echo key-ok", known_hosts=tmp_path / "kh",
                      identity=client_key)
        assert out.endswith("key-ok")
        with pytest.raises(AssertionError, match="exited 255"):
            ssh_run(free_port, user.name, user.password, "true", known_hosts=tmp_path / "kh")
        assert "PermitRootLogin prohibit-password" in sshd.config_path.read_text()
    # Existing keys kept, no duplicates after a second call with the same key text.
    start(tmp_path, user, free_port, authorized_keys=pub.read_text()).stop()
    lines = (user.home / ".ssh" / "authorized_keys").read_text().splitlines()
    assert len(lines) == 2 and lines[0].endswith("old@key")
    assert _proc.is_private(user.home / ".ssh" / "authorized_keys")


def test_environment_over_ssh_commands_and_login_shells(tmp_path, make_user, free_port,
                                                        monkeypatch) -> None:
    nvidia = tmp_path / "lib64-nvidia"
    nvidia.mkdir()
    monkeypatch.setattr(server, "NVIDIA_LIBS", str(nvidia))
    monkeypatch.setenv("LD_LIBRARY_PATH", "/usr/local/cuda/lib64")
    monkeypatch.setenv("PATH", "/opt/kernel-bin:" + os.environ["PATH"])
    monkeypatch.setenv("COLAB_GPU", "1")
    monkeypatch.setenv("TPU_NAME", "with spaces and 'quotes' $x")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("JPY_PARENT_PID", "1")
    # What sshd_config's quoting must carry: backslashes, double quotes, '#', trailing blanks.
    monkeypatch.setenv("TRICKY", 'a\\b \\"c\\" #d\tq\\\\  ')
    monkeypatch.setenv("MULTILINE", "one\ntwo")  # cannot go on a config line: left out
    user = make_user()
    with start(tmp_path, user, free_port):
        # The environment lives in sshd's own root-only config, nowhere in the user's home.
        assert not (user.home / ".ssh" / "environment").exists()
        config = tmp_path / "state" / "sshd" / "sshd_config"
        assert _proc.is_private(config) and "COLAB_GPU=1" in config.read_text()
        show = 'echo "L=$LD_LIBRARY_PATH"; echo "P=$PATH"; echo "G=$COLAB_GPU"; echo "T=$TPU_NAME"; ' \
               'echo "M=${MPLBACKEND-unset}"; echo "J=${JPY_PARENT_PID-unset}"; echo "H=$HOME"; ' \
               'printf "X=%s|\\n" "$TRICKY"; echo "N=${MULTILINE-unset}"'
        want = [f"L=/usr/local/cuda/lib64:{nvidia}", f"P={os.environ['PATH']}", "G=1",
                "T=with spaces and 'quotes' $x", "M=unset", "J=unset", f"H={user.home}",
                f"X={os.environ['TRICKY']}|", "N=unset"]
        # A non-interactive command (also how VS Code starts its server: bash -c, no login).
        out = ssh_run(free_port, user.name, user.password, show, known_hosts=tmp_path / "kh")
        assert out.splitlines()[-9:] == want
        # A login shell, which resets PATH from /etc/profile before the user's profile runs.
        out = ssh_run(free_port, user.name, user.password, f"bash -lc {_quote(show)}",
                      known_hosts=tmp_path / "kh")
        assert out.splitlines()[-9:] == want
        # An interactive login on a terminal, as a person (or VS Code's terminal) gets it.
        child = pexpect.spawn("ssh", ["-tt", "-p", str(free_port), "-o", f"UserKnownHostsFile={tmp_path}/kh",
                                      "-o", "PubkeyAuthentication=no", f"{user.name}@127.0.0.1"],
                              encoding="utf-8", timeout=15)
        try:
            child.expect("assword:")
            child.sendline(user.password)
            child.expect(r"[$#] ")
            child.sendline('echo "P=$PATH" "L=$LD_LIBRARY_PATH"; exit')
            child.expect(pexpect.EOF)
            assert f"P={os.environ['PATH']} L=/usr/local/cuda/lib64:{nvidia}" in child.before
        finally:
            child.close(force=True)
    # Re-running does not pile up profile blocks.
    start(tmp_path, user, free_port).stop()
    assert (user.home / ".profile").read_text().count(server.PROFILE_BEGIN) == 1


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def test_second_call_replaces_the_first(tmp_path, make_user, free_port) -> None:
    user = make_user()
    first = start(tmp_path, user, free_port, password=None)
    second = start(tmp_path, user, free_port, password=None)
    try:
        assert not first.alive and second.alive and first.pid != second.pid
        # The same password: saved connections keep working after a re-run of the cell.
        assert first.password == second.password and second.password_origin == "kept"
        config = second.config_path.read_text()
        assert config.count(f"Port {free_port}") == 1
        running = [p for p in os.listdir("/proc") if p.isdigit()
                   and str(second.config_path) in " ".join(_proc.cmdline(int(p)))]
        assert running == [str(second.pid)]
        ssh_run(free_port, user.name, first.password, "true", known_hosts=tmp_path / "kh")
        # A password given replaces the kept one, and is the one kept from then on.
        given = start(tmp_path, user, free_port, password="a given passphrase")
        with pytest.raises(AssertionError):
            ssh_run(free_port, user.name, first.password, "true", known_hosts=tmp_path / "kh")
        again = start(tmp_path, user, free_port, password=None)
        assert given.password == again.password == "a given passphrase"
        ssh_run(free_port, user.name, again.password, "true", known_hosts=tmp_path / "kh")
    finally:
        second.stop()
        server.load_sshd(tmp_path / "state").stop()
        second.stop()  # idempotent


def test_password_printing(tmp_path, make_user, free_port, capsys) -> None:
    """A generated password is printed; a kept one is shown as the same; a given one never."""
    user = make_user()
    kw = {"user": user.name, "state_dir": tmp_path / "state"}
    first = start_sshd(free_port, **kw)
    shown = capsys.readouterr().out
    assert f"password:    {first.password}\n" in shown and "kept" not in shown.split("password:")[1][:60]
    second = start_sshd(free_port, **kw)
    shown = capsys.readouterr().out
    assert second.password == first.password and "the same as before" in shown
    given = "correct horse battery staple"
    third = start_sshd(free_port, password=given, **kw)
    shown = capsys.readouterr().out
    assert given not in shown and "password:    the one you gave" in shown
    assert given not in third._repr_html_() and "the one you gave" in third._repr_html_()
    assert "refresh_environment()" in shown and "refresh_environment()" in third._repr_html_()
    third.stop()


def test_refresh_environment(tmp_path, make_user, free_port, monkeypatch) -> None:
    """A variable set after start_sshd() reaches new sessions after refresh_environment()."""
    user = make_user()
    show = 'echo "V=${LATE_VARIABLE-unset}"'
    with start(tmp_path, user, free_port) as sshd:
        monkeypatch.setenv("LATE_VARIABLE", "set after start_sshd, with 'quotes'")
        out = ssh_run(free_port, user.name, user.password, show, known_hosts=tmp_path / "kh")
        assert out.splitlines()[-1] == "V=unset"  # the snapshot taken by start_sshd
        # An open session lives on through the refresh; new ones get the new value.
        child = pexpect.spawn("ssh", ["-p", str(free_port), "-o", f"UserKnownHostsFile={tmp_path}/kh",
                                      "-o", "PubkeyAuthentication=no", f"{user.name}@127.0.0.1",
                                      f"{show}; sleep 2; echo still-here"], encoding="utf-8", timeout=20)
        child.expect("assword:")
        child.sendline(user.password)
        child.expect("V=unset")
        assert colab_remote.refresh_environment(sshd, quiet=True) is sshd
        assert sshd.alive and _proc.read_pid(sshd.run_dir / "sshd.pid") == sshd.pid
        out = ssh_run(free_port, user.name, user.password, show, known_hosts=tmp_path / "kh")
        assert out.splitlines()[-1] == "V=set after start_sshd, with 'quotes'"
        out = ssh_run(free_port, user.name, user.password, f"bash -lc {_quote(show)}",
                      known_hosts=tmp_path / "kh")
        assert out.splitlines()[-1] == "V=set after start_sshd, with 'quotes'"
        child.expect("still-here")
        child.expect(pexpect.EOF)
        child.close()
        # From the command line (a notebook's `!colab-remote sshd --refresh-environment`).
        done = subprocess.run([sys.executable, "-m", "colab_remote", "sshd", "--refresh-environment",
                               "--state-dir", str(tmp_path / "state")],
                              env={**os.environ, "LATE_VARIABLE": "from the CLI"},
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "new SSH sessions get" in done.stdout, done.stderr
        out = ssh_run(free_port, user.name, user.password, show, known_hosts=tmp_path / "kh")
        assert out.splitlines()[-1] == "V=from the CLI"
    with pytest.raises(SshdError, match="no running sshd"):
        colab_remote.refresh_environment(state_dir=tmp_path / "state")


def test_busy_port_names_the_port(tmp_path, make_user, free_port) -> None:
    user = make_user()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", free_port))
        busy.listen()
        with pytest.raises(SshdError, match=f"port {free_port} is already in use"):
            start(tmp_path, user, free_port)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": 0}, "1..65535"),
        ({"port": 70000}, "1..65535"),
        ({"port": "22"}, "int"),
        ({"port": True}, "int"),
        ({"user": "bad user"}, "login name"),
        ({"user": "-rf"}, "login name"),
        ({"user": "a:b"}, "login name"),
        ({"user": ""}, "login name"),
        ({"password": "two\nlines"}, "newline"),
        ({"password": "a:b"}, "':'"),
        ({"password": "nul\0"}, "NUL"),
        ({"password": ""}, "empty"),
        ({"password": "elevenchars"}, "at least 12 characters"),
        ({"environment": {"bad name": "1"}}, "not a variable name"),
        ({"environment": {"X": 1}}, "str to str"),
        ({"host_keys": "colab-secret:"}, "secret name"),
        ({"authorized_keys": "not a key at all"}, "not a public key"),
        ({"authorized_keys": "ssh-ed25519 !!!notbase64"}, "not a public key"),
        ({"authorized_keys": "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n"}, "PRIVATE"),
        ({"listen_address": "127.0.0.1; rm -rf /"}, "host name"),
    ],
)
def test_bad_input_is_refused_before_anything_runs(tmp_path, kwargs, message) -> None:
    args = {"port": 2222, "user": "root", "state_dir": tmp_path / "state", "quiet": True, **kwargs}
    port = args.pop("port")
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        start_sshd(port, **args)
    assert not (tmp_path / "state").exists()


def test_system_raw_path_in_a_real_ipython_shell(tmp_path, make_user, free_port) -> None:
    """Inside IPython the launch goes through system_raw; nothing in it is expanded."""
    user = make_user()
    state = tmp_path / "state $sh {launcher}"  # a state folder whose name IPython would expand
    cell = (f"from colab_remote import start_sshd\n"
            f"sshd = start_sshd({free_port}, user={user.name!r}, password={user.password!r}, "
            f"state_dir={str(state)!r}, listen_address='127.0.0.1', quiet=True)\n")
    script = textwrap.dedent("""
        import json, sys
        from IPython.core.interactiveshell import InteractiveShell
        shell = InteractiveShell.instance()
        calls = []
        original = shell.system_raw
        shell.system_raw = lambda cmd: (calls.append(cmd), original(cmd))[1]
        # Names like the words of the launch command, and like spawn_detached's locals.
        shell.user_ns.update(setsid="EVIL", sh="EVIL", bin="EVIL", launcher="EVIL", command="EVIL",
                             dev="EVIL", null="EVIL", run_dir="EVIL", name="EVIL", tmp="EVIL")
        result = shell.run_cell(sys.argv[1])
        result.raise_error()
        sshd = shell.user_ns["sshd"]
        print(json.dumps({"calls": calls, "pid": sshd.pid, "alive": sshd.alive}))
    """)
    done = subprocess.run([sys.executable, "-c", script, cell], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["alive"] and len(report["calls"]) == 1
    assert "$" not in report["calls"][0] and "{" not in report["calls"][0]
    # The sshd outlived the IPython process (a kernel restart) and a fresh process stops it.
    assert _proc.pid_alive(report["pid"])
    ssh_run(free_port, user.name, user.password, "true", known_hosts=tmp_path / "kh")
    found = load_sshd(state)
    assert found is not None and found.pid == report["pid"] and found.alive
    found.stop()
    assert not _proc.pid_alive(report["pid"])


def test_host_keys_kept_across_runtimes(tmp_path, make_user) -> None:
    user = make_user()
    keys = tmp_path / "drive" / "host_keys"
    port1, port2 = _net.free_port(), _net.free_port()
    first = start_sshd(port1, user=user.name, password=user.password, state_dir=tmp_path / "rt1",
                       host_keys=keys, listen_address="127.0.0.1", quiet=True)
    first.stop()
    second = start_sshd(port2, user=user.name, password=user.password, state_dir=tmp_path / "rt2",
                        host_keys=keys, listen_address="127.0.0.1", quiet=True)
    try:
        assert first.fingerprints == second.fingerprints and set(first.fingerprints) == {"ED25519", "RSA"}
        # The fingerprint printed is the one ssh-keygen computes.
        shown = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f",
                                str(keys / "ssh_host_ed25519_key.pub")],
                               capture_output=True, text=True, check=True).stdout
        assert second.fingerprints["ED25519"] in shown
        # A known_hosts line for the first runtime is accepted, with strict checking, by the second.
        kh = tmp_path / "kh"
        pub = (keys / "ssh_host_ed25519_key.pub").read_text().split()
        kh.write_text(f"[127.0.0.1]:{port2} {pub[0]} {pub[1]}\n")
        child = pexpect.spawn("ssh", ["-p", str(port2), "-o", f"UserKnownHostsFile={kh}",
                                      "-o", "StrictHostKeyChecking=yes", "-o", "PubkeyAuthentication=no",
                                      "-o", "HostKeyAlgorithms=ssh-ed25519",
                                      f"{user.name}@127.0.0.1", "echo strict-ok"],
                              encoding="utf-8", timeout=15)
        child.expect("assword:")
        child.sendline(user.password)
        child.expect(pexpect.EOF)
        child.close()
        assert "strict-ok" in child.before
        assert all(_proc.is_private(p) for p in (tmp_path / "rt2" / "sshd" / "host_keys").glob("*_key"))
    finally:
        second.stop()


def test_stop_leaves_no_process(tmp_path, make_user, free_port) -> None:
    user = make_user()
    sshd = start(tmp_path, user, free_port)
    # An open session is stopped with it.
    child = pexpect.spawn("ssh", ["-p", str(free_port), "-o", f"UserKnownHostsFile={tmp_path}/kh",
                                  "-o", "StrictHostKeyChecking=accept-new", "-o", "PubkeyAuthentication=no",
                                  f"{user.name}@127.0.0.1", "sleep 60"], encoding="utf-8", timeout=15)
    child.expect("assword:")
    child.sendline(user.password)
    sessions: list[int] = []
    assert _proc.wait_until(lambda: bool(sessions.extend(_proc.children(sshd.pid)) or sessions), 5)
    sshd.stop()
    child.expect(pexpect.EOF)
    child.close()
    assert not sshd.alive and not any(_proc.pid_alive(p) for p in [sshd.pid, *sessions])
    assert _net.ssh_banner("127.0.0.1", free_port, 0.3) is None
    sshd.stop()


def test_cli(tmp_path, make_user, free_port) -> None:
    cli = [sys.executable, "-m", "colab_remote"]
    helped = subprocess.run([*cli, "sshd", "--help"], capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0 and "--port" in helped.stdout
    user = make_user()
    state = str(tmp_path / "state")
    done = subprocess.run([*cli, "sshd", "--port", str(free_port), "--user", user.name, "--state-dir", state,
                           "--listen-address", "127.0.0.1", "--password-stdin"],
                          input=user.password + "\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # A password the caller chose is never printed back (it may come from Colab Secrets).
    assert user.password not in done.stdout and "password:    the one you gave" in done.stdout
    ssh_run(free_port, user.name, user.password, "true", known_hosts=tmp_path / "kh")
    stopped = subprocess.run([*cli, "sshd", "--stop", "--state-dir", state], capture_output=True, text=True,
                             timeout=30)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    bad = subprocess.run([*cli, "sshd", "--port", "0"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "1..65535" in bad.stderr


def test_missing_program_error_says_how_to_install() -> None:
    with pytest.raises(SshdError, match="apt-get install -y no-such-package"):
        _install.require_program("no-such-program-colab", package="no-such-package", install=False,
                              error=SshdError)


# --- pure functions ----------------------------------------------------------------------------


def test_kernel_environment_deny_list_and_nvidia(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(server, "NVIDIA_LIBS", str(tmp_path))
    env = kernel_environment({"HOME": "/root", "PWD": "/content", "JPY_SESSION_NAME": "x", "SHLVL": "1",
                              "MPLBACKEND": "inline", "CUDA_VERSION": "12.2", "COLAB_TPU_ADDR": "a",
                              "PATH": "/usr/bin", "NEWLINE": "a\nb", "bad-name": "1", "TERM": "xterm"})
    assert env == {"CUDA_VERSION": "12.2", "COLAB_TPU_ADDR": "a", "PATH": "/usr/bin",
                   "LD_LIBRARY_PATH": str(tmp_path)}
    monkeypatch.setattr(server, "NVIDIA_LIBS", str(tmp_path / "missing"))
    assert "LD_LIBRARY_PATH" not in kernel_environment({"PATH": "/usr/bin"})


def test_generated_password() -> None:
    passwords = {server.generate_password() for _ in range(50)}
    assert len(passwords) == 50
    assert all(len(p) == 20 and re.fullmatch(r"[A-Za-z0-9]+", p) for p in passwords)


def test_fingerprint_matches_ssh_keygen(client_key) -> None:
    pub = Path(str(client_key) + ".pub")
    shown = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)], capture_output=True,
                           text=True, check=True).stdout.split()[1]
    assert _ssh.fingerprint(pub.read_text()) == shown


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bob@example.org", ("bob", "example.org", "")),
        ("bob@10.0.0.1", ("bob", "10.0.0.1", "")),
        ("bob@[::1]", ("bob", "::1", "")),
        ("bob@host:backup/p", ("bob", "host", "backup/p")),
        ("bob@[::1]:/srv/p", ("bob", "::1", "/srv/p")),
    ],
)
def test_parse_destination(text, expected) -> None:
    d = _ssh.parse_destination(text, with_path=bool(expected[2]))
    assert (d.user, d.host, d.path) == expected


@pytest.mark.parametrize("text", ["user@", "@host", "host", "us er@host", "bob@ho;st", "bob@$(id)",
                                  "bob@host name", "bob@[::1", "bob@host:22", "-oProxyCommand=x@h"])
def test_parse_destination_refuses(text) -> None:
    with pytest.raises(ValueError):
        _ssh.parse_destination(text)


@pytest.mark.parametrize("text", ["bob@host", "bob@host:", "bob@host:/", "bob@host:///"])
def test_parse_destination_with_path_refuses(text) -> None:
    with pytest.raises(ValueError):
        _ssh.parse_destination(text, with_path=True)


def test_config_text_is_ours_and_complete(tmp_path) -> None:
    text = server.sshd_config(port=2222, user="root", password_login=True, host_keys=[tmp_path / "k"],
                              pid_file=tmp_path / "pid", gateway_ports=True, listen_address=None)
    for line in ("Port 2222", "PermitRootLogin yes", "PasswordAuthentication yes",
                 "ClientAliveInterval 30", "GatewayPorts yes", "PermitUserEnvironment no",
                 "AllowAgentForwarding no", "PerSourcePenaltyExemptList 127.0.0.1/32,::1/128",
                 f"HostKey {tmp_path / 'k'}", "AllowUsers root"):
        assert line in text.splitlines()
    assert "PerSourcePenalties no" not in text and "SetEnv" not in text
    env = server.with_environment(text, {"A": 'x "y" \\z', "B": ""})
    assert env.splitlines()[-1] == 'SetEnv "A=x \\"y\\" \\\\z" "B="'
    assert server.with_environment(env, {"C": "1"}).count("SetEnv") == 1  # sshd reads only the first


def test_install_errors_are_clear(as_nobody) -> None:
    script = ("from colab_remote import _install, InstallError\n"
              "try:\n    _install.apt_install(['openssh-server'], progress=False)\n"
              "except InstallError as e:\n    print(e)\n")
    no_apt = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PATH": "/nonexistent"})
    assert "has no apt-get" in no_apt.stdout
    nobody, env = as_nobody
    not_root = subprocess.run([*nobody, "-c", script], capture_output=True, text=True, timeout=60,
                              env=env, cwd="/")
    assert "needs root" in not_root.stdout and "sudo apt-get install" in not_root.stdout, not_root.stderr


def test_apt_install_runs_real_apt_get(capfd) -> None:
    """openssh-server is installed already: apt-get runs for real and changes nothing."""
    if not Path("/usr/bin/apt-get").exists():
        pytest.skip("no apt-get here")
    _install.apt_install(["openssh-server"], progress=True)
    assert "apt-get install" in capfd.readouterr().err  # the progress bar
    assert _install.find_program("sshd")


def test_status_logs_and_stop_from_the_command_line(tmp_path, make_user, free_port) -> None:
    user = make_user()
    start(tmp_path, user, free_port)
    cli = [sys.executable, "-m", "colab_remote"]
    state = ["--state-dir", str(tmp_path / "state")]
    shown = subprocess.run([*cli, "status", *state], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and f"<Sshd {user.name}@127.0.0.1:{free_port} up" in shown.stdout
    logs = subprocess.run([*cli, "logs", "sshd", "-n", "5", *state], capture_output=True, text=True,
                          timeout=60)
    assert "Server listening on 127.0.0.1" in logs.stdout
    stopped = subprocess.run([*cli, "stop", *state], capture_output=True, text=True, timeout=60)
    assert "stopped 1 " in stopped.stdout
    assert not colab_remote.status(tmp_path / "state").sshd.alive


def test_errors_are_short_in_ipython() -> None:
    """A failing tool reads as a few lines in a notebook, not a long traceback."""
    script = textwrap.dedent("""
        from IPython.core.interactiveshell import InteractiveShell
        shell = InteractiveShell.instance()
        shell.run_cell("from colab_remote import AuthenticationError\\n"
                       "raise AuthenticationError('the server refused the password for bob@host',"
                       " log_tail='Permission denied (password).', fix='check the password')")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    shown = done.stdout + done.stderr
    assert "AuthenticationError: the server refused the password for bob@host" in shown
    assert "fix: check the password" in shown and "Permission denied" in shown
    assert "Traceback" not in shown and len(shown.strip().splitlines()) <= 6


def test_key_only_on_a_locked_account_says_how_to_unlock(tmp_path, make_user, free_port, client_key) -> None:
    user = make_user()
    subprocess.run(["usermod", "-L", user.name], check=True)  # a throwaway account of the test's own
    with pytest.raises(SshdError, match=re.escape(f"usermod -p '*' {user.name}")):
        start(tmp_path, user, free_port, authorized_keys=Path(str(client_key) + ".pub"))
