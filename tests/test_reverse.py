"""reverse_forward() against two real sshd on 127.0.0.1: the runtime's (start_sshd) and a server's.

Logins go through the tunnel with real ``ssh -J`` typing both passwords. The tunnel is broken the
ways it breaks in the field: its ssh killed (TERM and KILL), the server crashing and coming back,
a link that goes silent (a relay that stops passing data), and a new kernel finding it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest

from colab_remote import AuthenticationError, TunnelError, _net, _proc, _ssh, reverse, start_sshd
from colab_remote.reverse import Tunnel, find_tunnels, load_tunnel, reverse_forward, stop_tunnels

from .conftest import needs_root, needs_sshd, ssh_run, wait_for
from .reverse_helpers import Connector, Relay, forward_answers, wait_forward

# --- pure functions (no processes) -------------------------------------------------------------


def test_tunnel_argv_and_options() -> None:
    dest = _ssh.parse_destination("bob@example.org")
    options = _ssh.tunnel_options(known_hosts=Path("/s/known_hosts"), pinned=False, identity_file=None,
                                  password=True)
    argv = _ssh.tunnel_ssh_argv("ssh", dest, port=2222, remote_port=20022, local_port=22, options=options)
    assert argv[:4] == ["ssh", "-N", "-R", "20022:localhost:22"]
    assert argv[-3:] == ["-p", "2222", "bob@example.org"]
    words = " ".join(argv)
    for needed in ("ExitOnForwardFailure=yes", "ServerAliveInterval=3", "ServerAliveCountMax=3",
                   "StrictHostKeyChecking=accept-new", "UserKnownHostsFile=/s/known_hosts"):
        assert needed in words
    assert "StrictHostKeyChecking=no" not in words
    pinned = _ssh.tunnel_options(known_hosts=Path("/k"), pinned=True, identity_file="/id", password=False)
    assert pinned["StrictHostKeyChecking"] == "yes" and pinned["BatchMode"] == "yes"
    assert pinned["IdentityFile"] == "/id" and pinned["IdentitiesOnly"] == "yes"
    master = _ssh.master_argv("ssh", dest, port=22, control_path=Path("/c/c1"), options={})
    assert "ControlMaster=yes" in master and "ControlPath=/c/c1" in master and "-N" in master
    assert "-R" not in master  # the forward is added through the control socket
    assert _ssh.mux_argv("ssh", Path("/c/c1"), "-O", "forward", "-R", "0:localhost:22")[:4] == [
        "ssh", "-S", "/c/c1", "-O"]
    assert _ssh.reverse_spec(0, 2222) == "0:localhost:2222"
    assert _ssh.reclaim_command([12, 34]).startswith("for p in 12 34;")


def test_connection_string_and_config_block() -> None:
    assert _ssh.connection_string("bob@h", remote_port=20022, login_user="root") == \
        "ssh -J bob@h -p 20022 root@localhost"
    jump = _ssh.jump_spec(_ssh.Destination("bob", "::1"), 2222)
    assert jump == "bob@[::1]:2222"
    block = _ssh.ssh_config_block("colab", jump=jump, remote_port=20022, login_user="root")
    assert block.splitlines() == ["Host colab", "    HostName localhost", "    Port 20022",
                                  "    User root", "    ProxyJump bob@[::1]:2222",
                                  "    HostKeyAlias colab", "    ServerAliveInterval 15"]
    with pytest.raises(ValueError):
        _ssh.ssh_config_block("co lab", jump=jump, remote_port=1, login_user="root")


def test_host_key_forms(tmp_path) -> None:
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me@h"
    fp = _ssh.fingerprint(key)
    assert _ssh.check_host_key(fp) == fp
    assert _ssh.check_host_key("[h]:2222 " + key) == "[h]:2222 " + key
    assert _ssh.known_hosts_line("h", 2222, key).startswith("[h]:2222 ssh-ed25519 AAAA")
    assert _ssh.known_hosts_line("h", 22, key).startswith("h ssh-ed25519 ")
    for bad in ("SHA256:short", "md5:aa", "ssh-ed25519 notbase64", "", "a\nb"):
        with pytest.raises(ValueError):
            _ssh.check_host_key(bad)
    with pytest.raises(TypeError):
        _ssh.check_host_key(123)


BAD_INPUT = [
    (("user@",), {}), (("@host",), {}), (("",), {}), (("bob",), {}), (("bo b@host",), {}),
    (("bob@ho st",), {}), (("bob@host;ls",), {}), (("b$ob@host",), {}), (("bob@$(id)",), {}),
    (("bob@host`id`",), {}), (("bob@host:22",), {}), (("bob@[::1",), {}), (("-oProxyCommand=x@h",), {}),
    (("bob@host",), {"remote_port": -1}), (("bob@host",), {"remote_port": 65536}),
    (("bob@host",), {"port": 0}), (("bob@host",), {"port": 70000}), (("bob@host",), {"local_port": 0}),
    (("bob@host",), {"via": "telnet"}), (("bob@10.0.0.1",), {"via": "gcloud"}),  # not an instance name
    (("bob@",), {"via": "gcloud"}), (("",), {"via": "gcloud"}), (("bob@My_VM",), {"via": "gcloud"}),
    (("bob@vm",), {"via": "gcloud", "zone": "us central"}),
    (("bob@vm",), {"via": "gcloud", "project": "x;rm"}),
    (("bob@host",), {"zone": "us-central1-a"}), (("bob@host",), {"project": "my-project"}),
    (("bob@host",), {"password": "a\nb"}), (("bob@host",), {"password": ""}),
    (("bob@host",), {"host_key": "SHA256:nope"}), (("bob@host",), {"identity_file": "/nonexistent/key"}),
    (("bob@host",), {"timeout": 0}),
]


@pytest.mark.parametrize(("args", "kwargs"), BAD_INPUT)
def test_bad_input_raises_before_anything_runs(tmp_path, args, kwargs) -> None:
    state = tmp_path / "state"
    with pytest.raises(ValueError):
        reverse_forward(*args, state_dir=state, quiet=True, **kwargs)
    assert not state.exists()


@pytest.mark.parametrize("kwargs", [{"remote_port": "20022"}, {"port": 22.0}, {"reconnect": "yes"},
                                    {"remote_port": True}])
def test_bad_types(tmp_path, kwargs) -> None:
    with pytest.raises(TypeError):
        reverse_forward("bob@host", state_dir=tmp_path / "state", quiet=True, **kwargs)
    with pytest.raises(TypeError):
        reverse_forward(123, state_dir=tmp_path / "state", quiet=True)  # type: ignore[arg-type]


# --- real tunnels ------------------------------------------------------------------------------

@pytest.fixture
def runtime(tmp_path, make_user):
    """The runtime's sshd (start_sshd) on 127.0.0.1 with a throwaway login user."""
    user = make_user()
    sshd = start_sshd(_net.free_port(), user=user.name, password=user.password,
                      state_dir=tmp_path / "state", listen_address="127.0.0.1", quiet=True)
    sshd.login = user
    yield sshd
    stop_tunnels(tmp_path / "state")
    sshd.stop()


def open_tunnel(server, runtime, **kw) -> Tunnel:
    kw.setdefault("remote_port", _net.free_port())
    kw.setdefault("password", server.user.password)
    kw.setdefault("quiet", True)
    return reverse_forward(f"{server.user.name}@127.0.0.1", port=kw.pop("port", server.port),
                           state_dir=runtime.state_dir, **kw)


def login_through(tunnel: Tunnel, server, runtime, tmp_path: Path) -> str:
    return ssh_run(tunnel.remote_port, runtime.login.name, runtime.login.password, "id -un",
                   known_hosts=tmp_path / "client_known_hosts",
                   jump=(f"{server.user.name}@127.0.0.1:{server.port}", server.user.password))


def restored(tunnel: Tunnel, restarts: int, timeout: float) -> None:
    wait_for(lambda: tunnel.restarts >= restarts and tunnel.state == "up", timeout,
             f"restart {restarts} of the tunnel")
    assert wait_forward(tunnel.remote_port, 5) is not None


@needs_root
@needs_sshd
def test_login_through_tunnel_and_heal_after_kill(tmp_path, server, runtime, capsys) -> None:
    tunnel = reverse_forward(f"{server.user.name}@127.0.0.1", port=server.port,
                             password=server.user.password, remote_port=_net.free_port(),
                             state_dir=runtime.state_dir)
    printed = capsys.readouterr().out
    assert tunnel.connection_string in printed and "Host colab" in printed
    assert tunnel.connection_string == (f"ssh -J {server.user.name}@127.0.0.1:{server.port} "
                                        f"-p {tunnel.remote_port} {runtime.login.name}@localhost")
    assert f"ProxyJump {server.user.name}@127.0.0.1:{server.port}" in tunnel.ssh_config()
    assert f"User {runtime.login.name}" in tunnel.ssh_config()
    assert tunnel.alive and tunnel.state == "up" and tunnel.restarts == 0
    assert tunnel.config["local_port"] == runtime.port  # taken from start_sshd in the same state_dir
    assert repr(tunnel).endswith("up, 0 restarts>")
    assert login_through(tunnel, server, runtime, tmp_path).splitlines()[-1] == runtime.login.name

    # The tunnel's ssh exits for any reason (TERM makes ssh -N exit 0): the forward is back.
    for n, sig in enumerate((signal.SIGTERM, signal.SIGKILL, signal.SIGHUP), start=1):
        wait_for(lambda: tunnel.status().get("standby_ready"), 10, "a standby connection")
        ssh_pid = tunnel.ssh_pid
        assert ssh_pid is not None and _proc.is_ours(ssh_pid, str(runtime.state_dir))
        os.kill(ssh_pid, sig)
        restored(tunnel, n, 10)
        assert tunnel.ssh_pid != ssh_pid
    assert login_through(tunnel, server, runtime, tmp_path).splitlines()[-1] == runtime.login.name
    assert "restart 3" in tunnel.logs(100)

    # Secrets: in no file, no argv, no environment; status and config are private.
    run_dir = tunnel.run_dir
    for path in runtime.state_dir.rglob("*"):
        if path.is_file():
            assert server.user.password not in path.read_text(errors="replace"), path
    for name in ("status.json", "config.json"):
        assert _proc.is_private(run_dir / name)
    for pid in [tunnel.pid, *tunnel.status()["ssh_pids"]]:
        assert server.user.password not in " ".join(_proc.cmdline(pid))
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        assert server.user.password not in environ
    html_card = tunnel._repr_html_()
    assert "<code>" in html_card and tunnel.connection_string in html_card

    tunnel.stop()
    tunnel.stop()  # idempotent
    assert not tunnel.alive and tunnel.state == "stopped"
    assert not forward_answers(tunnel.remote_port)


@needs_root
@needs_sshd
def test_the_laptop_checks_the_runtimes_key_from_the_first_login(tmp_path, server, runtime) -> None:
    """The card's ~/.ssh/config block and known_hosts lines, used as a laptop would: strict."""
    tunnel = open_tunnel(server, runtime)
    try:
        assert "a key for this tunnel only" in tunnel.summary()
        assert tunnel.known_hosts() in tunnel.summary().replace("  ", "") or tunnel.known_hosts()
        home = tmp_path / "laptop"
        home.mkdir()
        server_line = f"[127.0.0.1]:{server.port} " + " ".join(server.host_key_line.split()[:2])
        strict = (f"    UserKnownHostsFile {home / 'known_hosts'}\n    GlobalKnownHostsFile /dev/null\n"
                  "    StrictHostKeyChecking yes\n")
        # the card's block, with the jump spelled as a ProxyCommand so it reads this config too
        block = tunnel.ssh_config("colab").replace("    ProxyJump", "    #ProxyJump")
        (home / "config").write_text(
            block + f"    ProxyCommand ssh -F {home / 'config'} -W %h:%p -p {server.port} "
            f"{server.user.name}@127.0.0.1\n" + strict + "Host 127.0.0.1\n" + strict)

        def login() -> tuple[int | None, str]:
            child = pexpect.spawn("ssh", ["-F", str(home / "config"), "-o", "PubkeyAuthentication=no",
                                          "colab", "id -un"], encoding="utf-8", timeout=20)
            said = ""
            try:
                for pw in (server.user.password, runtime.login.password):
                    at = child.expect(["assword:", pexpect.EOF])
                    said += child.before or ""
                    if at == 1:
                        break
                    child.sendline(pw)
                else:
                    child.expect(pexpect.EOF)
                    said += child.before or ""
            finally:
                child.close(force=True)
            return child.exitstatus, said

        (home / "known_hosts").write_text(tunnel.known_hosts("colab") + server_line + "\n")
        code, out = login()
        assert code == 0 and runtime.login.name in out, out
        # a runtime whose key is not the one on the card: refused, never accepted
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / "k")], check=True)
        fake = (home / "k.pub").read_text().split()
        (home / "known_hosts").write_text(f"colab {fake[0]} {fake[1]}\n{server_line}\n")
        code, out = login()
        assert code != 0 and "verification failed" in out, out
    finally:
        tunnel.stop()


@needs_root
@needs_sshd
def test_server_crash_and_restart(tmp_path, server, runtime) -> None:
    with open_tunnel(server, runtime) as tunnel:
        # (a connection the server forks while it is being killed would survive it)
        wait_for(lambda: tunnel.status().get("standby_ready"), 10, "a standby connection")
        server.stop()
        wait_for(lambda: tunnel.state == "reconnecting", 10, "the tunnel to notice the crash")
        time.sleep(1.0)
        assert tunnel.alive and not forward_answers(tunnel.remote_port)
        t0 = time.monotonic()
        server.start()
        back = wait_forward(tunnel.remote_port, 10)
        assert back is not None, tunnel.logs(30)
        assert back - t0 < 5  # the benchmark measures it properly
        # the status file says so just after the forward answers (seen: 0 restarts read, 1 a
        # moment later)
        wait_for(lambda: tunnel.restarts >= 1 and tunnel.state == "up", 5,
                 "the status to count the restart")
        assert login_through(tunnel, server, runtime, tmp_path).splitlines()[-1] == runtime.login.name
    assert not tunnel.alive


@needs_root
@needs_sshd
def test_silent_link_break_reclaims_port(tmp_path, server, runtime) -> None:
    # The server's own keepalives would end the dead session after 15 s, but not while something
    # keeps connecting to its forwarded port: the tunnel must take the port back itself.
    server.stop()
    server.extra = ["ClientAliveInterval 5", "ClientAliveCountMax 3"]
    server.start()
    relay = Relay(server.port)
    connector = None
    try:
        tunnel = reverse_forward(f"{server.user.name}@127.0.0.1", port=relay.port,
                                 password=server.user.password, remote_port=_net.free_port(),
                                 state_dir=runtime.state_dir, quiet=True)
        wait_for(lambda: tunnel.status().get("standby_ready"), 10, "a standby connection")
        connector = Connector(tunnel.remote_port, 0.5)
        t0 = time.monotonic()
        assert relay.freeze() >= 2
        restored(tunnel, 1, 30)
        took = time.monotonic() - t0
        assert took < 25, took
        assert connector.attempts >= 10
        assert "reclaiming" in tunnel.logs(200) or took < 14
        assert login_through(tunnel, server, runtime, tmp_path).splitlines()[-1] == runtime.login.name
        tunnel.stop()
    finally:
        if connector is not None:
            connector.stop()
        relay.close()


@needs_root
@needs_sshd
def test_reconnect_false_stops_with_its_ssh(tmp_path, server, runtime) -> None:
    tunnel = open_tunnel(server, runtime, reconnect=False)
    assert tunnel.status()["standby_pid"] is None  # no standby without reconnecting
    os.kill(tunnel.ssh_pid, signal.SIGTERM)
    wait_for(lambda: not tunnel.alive, 10, "the supervisor to exit")
    assert tunnel.state == "stopped" and tunnel.restarts == 0
    assert not forward_answers(tunnel.remote_port)


@needs_root
@needs_sshd
def test_unreachable_server_gives_up_after_timeout(tmp_path, runtime) -> None:
    nobody = _net.free_port()
    t0 = time.monotonic()
    with pytest.raises(TunnelError, match=f"could not reach 127.0.0.1 port {nobody}"):
        reverse_forward("bob@127.0.0.1", port=nobody, password="x", remote_port=_net.free_port(),
                        state_dir=runtime.state_dir, timeout=2, quiet=True)
    assert time.monotonic() - t0 < 8
    assert not any(t.alive for t in find_tunnels(runtime.state_dir))


@needs_root
@needs_sshd
@pytest.mark.parametrize("restricted", [True, False])
def test_wrong_password(tmp_path, server, runtime, restricted) -> None:
    t0 = time.monotonic()
    with pytest.raises(AuthenticationError) as caught:
        open_tunnel(server, runtime, password="wrong-" + server.user.password, restricted=restricted)
    assert time.monotonic() - t0 < 5
    assert "refused" in str(caught.value) and "password" in str(caught.value)
    assert "wrong-" not in str(caught.value)
    if restricted:  # the set-up login failed: nothing was started
        assert not any(t.alive for t in find_tunnels(runtime.state_dir))
        return
    (tunnel,) = find_tunnels(runtime.state_dir)
    assert not tunnel.alive
    assert tunnel.logs(100).count("dialling") == 1  # no retry


@needs_root
@needs_sshd
def test_no_password_and_no_key_fails_fast(tmp_path, server, runtime, client_key) -> None:
    with pytest.raises(AuthenticationError):
        open_tunnel(server, runtime, password=None, identity_file=client_key)


@needs_root
@needs_sshd
def test_busy_remote_port(tmp_path, server, runtime) -> None:
    # sshd binds the forward on every loopback address and is content with one of them
    with socket.socket(socket.AF_INET6) as taken:
        taken.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        taken.bind(("::", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(TunnelError) as caught:
            open_tunnel(server, runtime, remote_port=port)
        assert time.monotonic() - t0 < 10
    message = str(caught.value)
    assert str(port) in message and "remote_port=0" in message


@needs_root
@needs_sshd
def test_remote_port_zero_keeps_the_port_it_got(tmp_path, server, runtime) -> None:
    with open_tunnel(server, runtime, remote_port=0) as tunnel:
        port = tunnel.remote_port
        assert port != 0 and forward_answers(port)
        assert f"-p {port} " in tunnel.connection_string
        assert load_tunnel(runtime.state_dir, port) is not None
        wait_for(lambda: tunnel.status().get("standby_ready"), 10, "a standby connection")
        os.kill(tunnel.ssh_pid, signal.SIGKILL)
        restored(tunnel, 1, 10)
        assert tunnel.remote_port == port
        assert login_through(tunnel, server, runtime, tmp_path).splitlines()[-1] == runtime.login.name


@needs_root
@needs_sshd
def test_kernel_restart_finds_and_stops_the_tunnel(tmp_path, server, runtime) -> None:
    # A "kernel" starts the tunnel and dies (SIGKILL, as a kernel restart does); the tunnel stays.
    kernel_code = (
        "import sys, time\n"
        "from colab_remote import reverse_forward\n"
        "t = reverse_forward(sys.argv[1], port=int(sys.argv[2]), remote_port=0, state_dir=sys.argv[3],\n"
        "                    password=sys.stdin.readline().rstrip('\\n'), quiet=True)\n"
        "print(t.remote_port, flush=True)\n"
        "time.sleep(600)\n"
    )
    kernel = subprocess.Popen([sys.executable, "-c", kernel_code, f"{server.user.name}@127.0.0.1",
                               str(server.port), str(runtime.state_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        kernel.stdin.write(server.user.password + "\n")
        kernel.stdin.close()
        port = int(kernel.stdout.readline())
    finally:
        kernel.kill()
        kernel.wait(10)
    assert forward_answers(port)
    tunnel = load_tunnel(runtime.state_dir, port)
    assert tunnel is not None and tunnel.alive
    # A fresh process (the new kernel) finds it and stops it.
    code = (
        "import sys\n"
        "from colab_remote.reverse import load_tunnel\n"
        "t = load_tunnel(sys.argv[1], int(sys.argv[2]))\n"
        "print(repr(t)); print(t.connection_string)\n"
        "t.stop(); print('alive after stop:', t.alive)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(runtime.state_dir), str(port)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "up, 0 restarts>" in done.stdout and "alive after stop: False" in done.stdout
    assert tunnel.connection_string in done.stdout
    assert not tunnel.alive and not forward_answers(port)
    assert load_tunnel(runtime.state_dir, port) is None


@needs_root
@needs_sshd
def test_same_remote_port_replaces_and_stop_tunnels(tmp_path, server, runtime) -> None:
    first = open_tunnel(server, runtime)
    old_pid = first.pid
    second = open_tunnel(server, runtime, remote_port=first.remote_port)
    assert not _proc.pid_alive(old_pid) and second.pid != old_pid
    assert second.alive and forward_answers(second.remote_port)
    other = open_tunnel(server, runtime, remote_port=0)
    assert {t.remote_port for t in find_tunnels(runtime.state_dir) if t.alive} == {
        second.remote_port, other.remote_port}
    assert stop_tunnels(runtime.state_dir) == 2
    assert not second.alive and not other.alive


@needs_root
@needs_sshd
def test_pinned_host_key(tmp_path, server, runtime) -> None:
    fp = _ssh.fingerprint(server.host_key_line)
    with open_tunnel(server, runtime, host_key=fp) as tunnel:
        assert "StrictHostKeyChecking=yes" in " ".join(_proc.cmdline(tunnel.ssh_pid))
    with open_tunnel(server, runtime, host_key=server.host_key_line) as tunnel:
        assert tunnel.state == "up"
    other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl x"
    with pytest.raises(TunnelError, match="does not match"):
        open_tunnel(server, runtime, host_key=_ssh.fingerprint(other))
    with pytest.raises(TunnelError, match="does not match"):
        open_tunnel(server, runtime, host_key=other)


@needs_root
@needs_sshd
def test_cli_tunnel_and_stop(tmp_path, server, runtime) -> None:
    port = _net.free_port()
    argv = [sys.executable, "-m", "colab_remote", "tunnel", f"{server.user.name}@127.0.0.1",
            "--port", str(server.port), "--remote-port", str(port), "--password-stdin",
            "--state-dir", str(runtime.state_dir)]
    done = subprocess.run(argv, input=server.user.password + "\n", capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"-p {port} {runtime.login.name}@localhost" in done.stdout
    assert forward_answers(port)
    stop = subprocess.run([sys.executable, "-m", "colab_remote", "tunnel", "--stop",
                           "--state-dir", str(runtime.state_dir)], capture_output=True, text=True,
                          timeout=60)
    assert stop.returncode == 0 and "stopped 1" in stop.stdout, stop.stdout + stop.stderr
    assert not forward_answers(port)
    status = json.loads(next(runtime.state_dir.glob("tunnels/*/status.json")).read_text())
    assert status["state"] == "stopped"
    bad = subprocess.run([sys.executable, "-m", "colab_remote", "tunnel", "bob@host;id",
                          "--state-dir", str(runtime.state_dir)], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "host;id" in bad.stderr


def test_public_names() -> None:
    import colab_remote

    for name in ("reverse_forward", "Tunnel"):
        assert hasattr(reverse, name)
        if name in getattr(colab_remote, "__all__", []):
            assert hasattr(colab_remote, name)
