"""Least privilege: what a runtime that is taken over can do on the user's server (issue 10).

Real sshd, real ssh/scp/sftp/rsync, a throwaway server account. The "attacker" is this test
acting as root in the runtime with everything it can find there: the private keys in the state
folder and temp folders, every ControlMaster socket, the memory of the package's processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

import colab_remote
from colab_remote import _access, _agent, _install, _net, _proc
from colab_remote.errors import MirrorError, TunnelError
from colab_remote.mirror import mirror
from colab_remote.reverse import reverse_forward

from .conftest import ServerSshd, needs_root, needs_sshd, wait_for
from .reverse_helpers import forward_answers

pytestmark = [needs_root, needs_sshd, pytest.mark.timeout(240)]


def start_both(tmp_path: Path, server: ServerSshd, state: Path | None = None,
               folder: str = "backup/project", **kw):
    """A tunnel (forwarding back to the server's own sshd: any listening port will do) and a
    mirror into ``folder``, both set up with the password (one mirror writes a folder at a time:
    two runtimes get a folder each)."""
    state = state or tmp_path / "state"
    local = state.parent / f"{state.name}-project"
    local.mkdir(parents=True, exist_ok=True)
    (local / "a.txt").write_text("a")
    tunnel = reverse_forward(f"{server.user.name}@127.0.0.1", port=server.port,
                             password=server.user.password, remote_port=_net.free_port(),
                             local_port=server.port, state_dir=state, quiet=True, **kw)
    m = mirror(local, f"{server.user.name}@127.0.0.1:{folder}", port=server.port,
               password=server.user.password, state_dir=state, quiet=True, **kw)
    return tunnel, m, local


def package_pids(*roots: int) -> list[int]:
    found = list(roots)
    for pid in found:
        found += [c for c in _proc.children(pid) if c not in found]
    return [p for p in found if _proc.pid_alive(p)]


def memory_holds(pid: int, needle: bytes) -> bool:
    """Whether ``needle`` is anywhere in the readable memory of ``pid`` (read as root)."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if "r" not in perms:
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
            except (OSError, OverflowError, ValueError):
                continue
    return False


def private_keys(*folders: Path) -> list[Path]:
    found = []
    for folder in folders:
        for p in folder.rglob("*"):
            with_errors = p.is_file() and not p.is_symlink()
            if with_errors and b"PRIVATE KEY" in p.read_bytes()[:100]:
                found.append(p)
    return found


def control_sockets(*folders: Path) -> list[Path]:
    found = []
    for folder in folders:
        for p in folder.rglob("*"):
            try:
                if stat.S_ISSOCK(p.lstat().st_mode):
                    found.append(p)
            except OSError:
                continue
    return found


def temp_folders(*handles) -> list[Path]:
    """The temp folders of these tunnels and mirrors (control sockets): only ours, since other
    tests may run beside this one on the same machine."""
    found = []
    for h in handles:
        folder = h.config.get("control_dir") or h.config.get("sock_dir")
        if folder and Path(folder).is_dir():
            found.append(Path(folder))
    return found


def snapshot(home: Path, skip: Path) -> dict[str, str]:
    """Every file of the server account outside the mirror's destination: path -> content hash."""
    out = {}
    for p in sorted(home.rglob("*")):
        if skip in p.parents or p == skip or p.is_dir() and not p.is_symlink():
            continue
        if ".colab-remote" in p.parts and p.name.startswith(("sessions", ".lock")) \
                or "sessions" in p.parts:
            continue  # the tunnel helper's own notes of its sessions
        out[str(p.relative_to(home))] = (os.readlink(p) if p.is_symlink()
                                         else hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def key_options(key: Path, state: Path) -> list[str]:
    """ssh/scp/sftp options to log in with one of the runtime's keys and its known_hosts."""
    return ["-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={state / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes",
            "-o", "ConnectTimeout=10"]


def ssh_as(key: Path, server: ServerSshd, state: Path, *args: str, timeout: float = 20
           ) -> subprocess.CompletedProcess[str]:
    """ssh with one of the runtime's keys, as an attacker in the runtime would."""
    argv = ["ssh", *key_options(key, state), "-p", str(server.port), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def target(server: ServerSshd) -> str:
    return f"{server.user.name}@127.0.0.1"


def test_a_runtime_taken_over_gets_no_shell_and_no_other_port(tmp_path: Path, server) -> None:
    state = tmp_path / "state"
    tunnel, m, local = start_both(tmp_path, server)
    home = server.user.home
    dest = home / "backup" / "project"
    (home / "secret.txt").write_text("the user's own file")
    os.chown(home / "secret.txt", server.user.uid, server.user.gid)
    try:
        wait_for(lambda: (dest / "a.txt").exists(), 20, "the first push")
        (local / "a.txt").write_text("second version")  # so the trash holds something
        m.flush(30)
        trash_before = sorted(str(p.relative_to(dest)) for p in (dest / _agent.TRASH.decode()).rglob("*"))
        assert any(p.endswith("a.txt") for p in trash_before)
        outside_before = snapshot(home, dest)
        keys = private_keys(state, *temp_folders(tunnel, m))
        assert len(keys) == 2  # one per purpose; nothing else the runtime could use
        other_port = _net.free_port()

        for key in keys:
            tag = key.name
            # a shell, a command: only the forced command runs, and it refuses
            for args in ([target(server), "echo PWNED"], [target(server)], ["-tt", target(server)]):
                done = ssh_as(key, server, state, *args)
                assert "PWNED" not in done.stdout and done.returncode != 0, (tag, args, done)
            # -W / -L / -D to anything but the tunnel's own port: refused
            done = ssh_as(key, server, state, "-W", f"127.0.0.1:{server.port}", target(server))
            assert done.returncode != 0 and "SSH-2.0" not in done.stdout, (tag, done)
            assert not socks_connect_works(key, server, state, server.port), tag
            # -R to another port: refused
            done = ssh_as(key, server, state, "-N", "-o", "ExitOnForwardFailure=yes",
                          "-R", f"{other_port}:localhost:{server.port}", target(server))
            assert done.returncode != 0 and not forward_answers(other_port), (tag, done)
            # sftp, scp (both protocols) and rsync from outside the destination
            sftp = subprocess.run(["sftp", *key_options(key, state), "-P", str(server.port), "-b", "-",
                                   target(server)], input="get secret.txt\n", capture_output=True,
                                  text=True, timeout=20)
            assert sftp.returncode != 0, (tag, sftp)
            for legacy in ([], ["-O"]):
                scp = subprocess.run(["scp", *legacy, *key_options(key, state), "-P", str(server.port),
                                      f"{target(server)}:secret.txt", str(tmp_path / "stolen")],
                                     capture_output=True, text=True, timeout=20)
                assert scp.returncode != 0 and not (tmp_path / "stolen").exists(), (tag, scp)
            ssh_e = " ".join(["ssh", *key_options(key, state), "-p", str(server.port)])
            into = f"{target(server)}:backup/project/"
            for args in (["-r", f"{target(server)}:./", str(tmp_path / "rs")],
                         ["-r", "--delete", str(tmp_path / "empty") + "/", into]):
                (tmp_path / "empty").mkdir(exist_ok=True)
                done = subprocess.run(["rsync", "-e", ssh_e, *args], capture_output=True, text=True,
                                      timeout=30)
                assert done.returncode != 0, (tag, args, done)
            assert not (tmp_path / "rs" / "secret.txt").exists()

        # every ControlMaster socket the runtime holds: the same refusals
        socks = control_sockets(state, *temp_folders(tunnel, m))
        assert len(socks) >= 3  # the tunnel's two connections and the mirror's
        for sock in socks:
            done = subprocess.run(["ssh", "-S", str(sock), "-o", "BatchMode=yes", "-o", "ControlMaster=no",
                                   "x", "echo PWNED"], capture_output=True, text=True, timeout=20)
            assert "PWNED" not in done.stdout, (sock, done)
            done = subprocess.run(["ssh", "-S", str(sock), "-O", "forward", "-R",
                                   f"{other_port}:localhost:{server.port}", "x"],
                                  capture_output=True, text=True, timeout=20)
            assert not forward_answers(other_port), (sock, done)
            done = subprocess.run(["ssh", "-S", str(sock), "-o", "BatchMode=yes", "-W",
                                   f"127.0.0.1:{server.port}", "x"],
                                  capture_output=True, text=True, timeout=20)
            assert "SSH-2.0" not in done.stdout, (sock, done)

        # the agent itself, asked for what it must not do
        mirror_key = next(k for k in keys if k.name.startswith("mirror-"))
        (dest / "evil").symlink_to(home)  # planted on the server by a link op, say
        answers = talk_to_agent(mirror_key, server, state, [
            _agent.pack(_agent.OP_PUT, b"../x", data=b"x"),
            _agent.pack(_agent.OP_PUT, b"evil/.ssh/authorized_keys", data=b"ssh-ed25519 AAAA attacker"),
            _agent.pack(_agent.OP_DELETE, b"evil/secret.txt"),
            _agent.pack(_agent.OP_PUT, b"suid", mode=0o6755, data=b"#!/bin/sh\n"),
            _agent.pack(b"T", mtime_ns=0),  # "prune now", as the old protocol had it
            _agent.pack(_agent.OP_DELETE, _agent.TRASH),
            _agent.pack(_agent.OP_PUT, _agent.TRASH + b"/x", data=b"x"),
        ])
        errors = dict(answers)
        assert {"../x", ".colab-remote-trash", ".colab-remote-trash/x"} <= set(errors) and "T" not in errors
        assert stat.S_IMODE((dest / "suid").stat().st_mode) == 0o755
        assert (dest / "evil").is_dir() and not (dest / "evil").is_symlink()
        # nothing outside the destination changed; the trash still holds what it held
        assert snapshot(home, dest) == outside_before
        trash_after = sorted(str(p.relative_to(dest)) for p in (dest / _agent.TRASH.decode()).rglob("*"))
        assert set(trash_before) <= set(trash_after)
        # and the tunnel and the mirror still work
        assert forward_answers(tunnel.remote_port)
        (local / "b.txt").write_text("b")
        m.flush(30)
        assert (dest / "b.txt").read_text() == "b"
    finally:
        m.stop()
        tunnel.stop()


def socks_connect_works(key: Path, server: ServerSshd, state: Path, port: int) -> bool:
    """``ssh -D``, then a SOCKS5 connect to 127.0.0.1:port through it: did it go through?"""
    local = _net.free_port()
    proc = subprocess.Popen(["ssh", *key_options(key, state), "-p", str(server.port),
                             "-N", "-D", f"127.0.0.1:{local}", target(server)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not _proc.wait_until(lambda: _net.port_in_use("127.0.0.1", local) or proc.poll() is not None, 10):
            return False
        if proc.poll() is not None:
            return False
        with socket.create_connection(("127.0.0.1", local), timeout=5) as s:
            s.sendall(b"\x05\x01\x00")
            if s.recv(2) != b"\x05\x00":
                return False
            s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + port.to_bytes(2, "big"))
            reply = s.recv(10)
            if len(reply) < 2 or reply[1] != 0:
                return False
            s.settimeout(3)
            return s.recv(8).startswith(b"SSH-")
    except OSError:
        return False
    finally:
        proc.kill()
        proc.wait(10)


def talk_to_agent(key: Path, server: ServerSshd, state: Path, records: list[bytes]) -> list[list[str]]:
    """Speak the agent's protocol with the mirror's key, as the runtime's root could."""
    argv = ["ssh", *key_options(key, state), "-p", str(server.port), target(server), "colab-remote agent"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        hello = _agent.read_record(proc.stdout.read)
        assert hello is not None and hello[0] == _agent.R_HELLO
        proc.stdin.write(b"".join(records) + _agent.pack(_agent.OP_END))
        proc.stdin.flush()
        ack = _agent.read_record(proc.stdout.read)
        assert ack is not None and ack[0] == _agent.R_ACK
        return json.loads(ack[5])["errors"]
    finally:
        proc.stdin.close()
        proc.wait(20)


def test_no_password_in_memory_or_files_and_keys_survive_a_password_change(tmp_path: Path, server) -> None:
    state = tmp_path / "state"
    secret = server.user.password.encode()
    tunnel, m, local = start_both(tmp_path, server)
    try:
        pids = package_pids(*(p for p in (tunnel.pid, m.pid) if p is not None))
        assert len(pids) >= 4  # the supervisor, the mirror, their ssh connections
        for pid in pids:
            assert not memory_holds(pid, secret), (pid, _proc.cmdline(pid))
        for folder in (state, local, *temp_folders(tunnel, m)):
            for f in folder.rglob("*"):
                if f.is_file() and not f.is_symlink():
                    assert secret not in f.read_bytes(), f
        # the user changes the server password; every ssh of ours is killed: all comes back
        subprocess.run(["chpasswd"], input=f"{server.user.name}:Changed-{os.urandom(6).hex()}\n",
                       text=True, check=True)
        for pid in package_pids(*(p for p in (tunnel.pid, m.pid) if p is not None)):
            if os.path.basename((_proc.cmdline(pid) or [""])[0]) == "ssh":
                os.kill(pid, signal.SIGKILL)  # our own test's processes, by pid
        wait_for(lambda: tunnel.restarts >= 1 and tunnel.state == "up", 30, "the tunnel back")
        wait_for(lambda: forward_answers(tunnel.remote_port), 10, "the forward to answer")
        (local / "after.txt").write_text("after the password changed")
        m.flush(60)
        assert (server.user.home / "backup/project/after.txt").read_text() == "after the password changed"
        assert m.stats["reconnects"] >= 1
    finally:
        m.stop()
        tunnel.stop()


def authorized_ids(server: ServerSshd) -> list[str]:
    text = (server.user.home / ".ssh" / "authorized_keys").read_text()
    return re.findall(r"colab-remote:(\S+)", text)


def test_expired_and_revoked_keys_stop_working_and_runtimes_keep_their_own(tmp_path: Path, server) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    t1, m1, local1 = start_both(tmp_path, server, first)
    t2, m2, _ = start_both(tmp_path, server, second, folder="backup/second",
                           key_days=5 / 86400)  # expires in 5 s
    try:
        ids = authorized_ids(server)
        assert len(ids) == 4 and len({i.split(".")[0] for i in ids}) == 2  # two runtimes, two each
        line = next(li for li in (server.user.home / ".ssh/authorized_keys").read_text().splitlines()
                    if "tunnel-" in li)
        for needed in ("restrict", "port-forwarding", f'permitlisten="localhost:{t1.remote_port}"'
                       if t1.config.get("key_id", "") in line else "permitlisten=", "permitopen=",
                       'command="', "--forced tunnel", "expiry-time=", f"runtime={socket.gethostname()}"):
            assert needed in line, line
        key2 = next(k for k in (second / "keys").iterdir() if k.name.startswith("tunnel-") and not k.suffix)
        assert ssh_as(key2, server, second, target(server), "hello").stdout.startswith("colab-remote-agent")
        time.sleep(6)
        assert ssh_as(key2, server, second, target(server), "hello").returncode != 0  # expired
        # revoking the first runtime removes its lines only
        outcomes = colab_remote.revoke(first)
        assert [o for _, o in outcomes] == ["revoked", "revoked"], outcomes
        assert not list((first / "keys").glob("*"))
        left = authorized_ids(server)
        assert all(i.split(".")[0] != _access.runtime_id(first) for i in left)
        assert {i.split(".")[0] for i in left} == {_access.runtime_id(second)}
        # the first runtime's processes can no longer log in: kill their ssh, nothing comes back
        for pid in package_pids(m1.pid or 0):
            if os.path.basename((_proc.cmdline(pid) or [""])[0]) == "ssh":
                os.kill(pid, signal.SIGKILL)
        (local1 / "later.txt").write_text("a change after the revocation")
        wait_for(lambda: m1.state == "reconnecting" and "key" in (m1.stats.get("last_error") or ""), 30,
                 "the revoked mirror to fail its login")
        assert m1.stats.get("reconnects", 0) == 0
        assert "restricted key" in (m1.stats.get("last_error") or "") or "refused" in (
            m1.stats.get("last_error") or "")
        # revoke --all on the server removes every colab-remote line
        # the server's own python3 and the installed agent, as the key lines name them
        lines = (server.user.home / ".ssh/authorized_keys").read_text()
        python, installed = re.search(r'command="(\S+) -I -B (\S+) --forced', lines).groups()
        done = subprocess.run(["setpriv", f"--reuid={server.user.uid}", f"--regid={server.user.gid}",
                               "--init-groups", python, "-I", "-B", str(installed), "revoke", "--all"],
                              capture_output=True, text=True, timeout=30,
                              env={"HOME": str(server.user.home), "PATH": "/usr/bin:/bin"})
        assert done.returncode == 0, done.stderr
        assert authorized_ids(server) == []
    finally:
        for h in (m1, m2, t1, t2):
            h.stop()


def test_unrestricted_and_identity_file_behave_as_before(tmp_path: Path, server, client_key) -> None:
    state = tmp_path / "state"
    tunnel, m, _ = start_both(tmp_path, server, restricted=False)
    try:
        assert not (state / "keys").exists() or not list((state / "keys").glob("*-*"))
        ak = server.user.home / ".ssh" / "authorized_keys"
        assert not ak.exists() or "colab-remote:" not in ak.read_text()
        assert tunnel.config["has_secret"] and forward_answers(tunnel.remote_port)
        assert m.alive
    finally:
        m.stop()
        tunnel.stop()


def test_a_server_without_python3_or_with_an_old_sshd_gets_a_clear_message(tmp_path: Path, make_user) -> None:
    # sessions on this server see a PATH without python3 (sh, rsync and friends only; in a folder
    # the server's user can reach, as pytest's own are not)
    bin_dir = Path(tempfile.mkdtemp(prefix="crt-bin-"))
    bin_dir.chmod(0o755)
    for tool in ("sh", "bash", "rsync", "mkdir", "find", "wc", "cat", "mv", "rm", "env", "ls", "test"):
        found = _install.find_program(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    srv = ServerSshd(tmp_path / "server", _net.free_port(), make_user(),
                     extra=[f"SetEnv PATH={bin_dir}"]).start()
    try:
        local = tmp_path / "project"
        local.mkdir()
        with pytest.raises(MirrorError, match="has no python3"):
            mirror(local, f"{srv.user.name}@127.0.0.1:backup/p", port=srv.port,
                   password=srv.user.password, state_dir=tmp_path / "state", quiet=True)
        # without restrictions the mirror copies with rsync alone (its set-up's command said so)
        (local / "a.txt").write_text("with rsync alone")
        m = mirror(local, f"{srv.user.name}@127.0.0.1:backup/p", port=srv.port, restricted=False,
                   password=srv.user.password, state_dir=tmp_path / "state", quiet=True)
        try:
            m.flush(30)
            assert (srv.user.home / "backup" / "p" / "a.txt").read_text() == "with rsync alone"
            assert "copies with rsync alone" in m.logs(40)
        finally:
            m.stop()
        with pytest.raises(TunnelError, match="has no python3"):
            reverse_forward(f"{srv.user.name}@127.0.0.1", port=srv.port, password=srv.user.password,
                            remote_port=_net.free_port(), local_port=srv.port,
                            state_dir=tmp_path / "state", quiet=True)
    finally:
        srv.stop()
        shutil.rmtree(bin_dir)
    # an sshd too old for restricted keys: said before any login (a server that only shows a banner)
    with socket.socket() as old:
        old.bind(("127.0.0.1", 0))
        old.listen(4)
        port = old.getsockname()[1]

        def banner() -> None:
            for _ in range(4):
                try:
                    conn, _ = old.accept()
                except OSError:
                    return
                with conn:
                    conn.sendall(b"SSH-2.0-OpenSSH_7.4\r\n")
                    time.sleep(0.2)

        threading.Thread(target=banner, daemon=True).start()
        with pytest.raises(TunnelError, match="OpenSSH 7.8") as caught:
            reverse_forward("bob@127.0.0.1", port=port, password="x" * 12, remote_port=_net.free_port(),
                            local_port=port, state_dir=tmp_path / "state2", quiet=True)
        assert "restricted=False" in str(caught.value)


def test_a_rerun_in_the_same_runtime_needs_no_password(tmp_path: Path, server) -> None:
    state = tmp_path / "state"
    tunnel, m, local = start_both(tmp_path, server)
    port = tunnel.remote_port
    lines = (server.user.home / ".ssh/authorized_keys").read_text()
    m.stop()
    tunnel.stop()
    # the same cells again, the password variable gone: the keys installed earlier are reused
    tunnel = reverse_forward(f"{server.user.name}@127.0.0.1", port=server.port, password=None,
                             remote_port=port, local_port=server.port, state_dir=state, quiet=True)
    m = mirror(local, f"{server.user.name}@127.0.0.1:backup/project", port=server.port, password=None,
               state_dir=state, quiet=True)
    try:
        assert forward_answers(tunnel.remote_port) and m.alive
        assert (server.user.home / ".ssh/authorized_keys").read_text() == lines  # nothing new
    finally:
        m.stop()
        tunnel.stop()


def test_a_rerun_takes_the_mirrors_key_on_record_and_sets_up_again_when_it_fails(
        tmp_path: Path, server, caplog: pytest.LogCaptureFixture) -> None:
    """A re-run's mirror() took the key on record only after a login that checked it (a whole
    handshake before the mirror's own): now the mirror's own login checks it. A key the server no
    longer takes (its line removed by hand) fails that login, and mirror() sets the server up
    again with the password, as a first run does."""
    state = tmp_path / "state"
    local = tmp_path / "project"
    local.mkdir()
    (local / "a.txt").write_text("a")
    dest = f"{server.user.name}@127.0.0.1:backup/project"

    def run(password: str | None) -> colab_remote.Mirror:
        return mirror(local, dest, port=server.port, password=password, state_dir=state, quiet=True)

    run(server.user.password).stop()
    keys = server.user.home / ".ssh" / "authorized_keys"
    caplog.set_level("INFO", logger="colab_remote")
    caplog.clear()
    m = run(None)
    try:
        assert any("(on record)" in r.getMessage() for r in caplog.records), caplog.text
        assert not any("the server still takes it" in r.getMessage() for r in caplog.records)
        (local / "b.txt").write_text("b")
        m.flush(30)
        assert (server.user.home / "backup/project/b.txt").read_text() == "b"
    finally:
        m.stop()
    keys.write_text("".join(line + "\n" for line in keys.read_text().splitlines()
                            if ".mirror-" not in line))  # the mirror's line gone, by hand
    with pytest.raises(colab_remote.AuthenticationError):
        run(None)  # no password and no other way in
    caplog.clear()
    m = run(server.user.password)
    try:
        assert "setting the server up again" in caplog.text
        assert ".mirror-" in keys.read_text()
        (local / "c.txt").write_text("c")
        m.flush(30)
        assert (server.user.home / "backup/project/c.txt").read_text() == "c"
    finally:
        m.stop()


@pytest.mark.parametrize("link", ["ssh_dir", "authorized_keys"])
def test_setup_refuses_a_linked_ssh_folder_or_authorized_keys(tmp_path: Path, make_user, link) -> None:
    """The set-up runs as the server account: it never writes through a link it finds there."""
    python = "/usr/bin/python3"
    if not os.path.exists(python):
        pytest.skip("no system python3")
    user = make_user()
    elsewhere = Path(f"/tmp/crt-elsewhere-{os.urandom(4).hex()}")
    elsewhere.mkdir(mode=0o700)
    os.chown(elsewhere, user.uid, user.gid)
    try:
        if link == "ssh_dir":
            (user.home / ".ssh").symlink_to(elsewhere)
        else:
            user.write(".ssh/.keep", "")
            user.write("other_file", "untouched\n")
            (user.home / ".ssh" / "authorized_keys").symlink_to(user.home / "other_file")
        source, sha = _access.agent_source()
        user.write("agent.pyz", source, 0o644)
        request = {"sha": sha, "restricted": True, "keys": [
            {"id": "rid.tunnel-1", "purpose": "tunnel", "port": 20022, "days": 1,
             "pubkey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHk4pGZ5p0S0mR0nGJ0nYF0s3pF1t3nQ7XhGq2xJj8lI x"}]}
        done = subprocess.run(["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups",
                               python, "-I", "-B", str(user.home / "agent.pyz"), "setup"],
                              input=json.dumps(request), capture_output=True, text=True, timeout=30,
                              env={"HOME": str(user.home), "PATH": "/usr/bin:/bin"}, cwd=user.home)
        reply = json.loads(done.stdout.split("CRA-SETUP ", 1)[1])
        assert not reply["ok"] and "is a link" in reply["error"] and "refused" in reply["error"], reply
        assert list(elsewhere.iterdir()) == []
        if link == "authorized_keys":
            assert (user.home / "other_file").read_text() == "untouched\n"
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


def test_a_refused_destination_is_refused_before_anything_is_made(make_user) -> None:
    """The agent refused ``~/.colab-remote/x`` or ``~/.ssh/keys`` only after making the folder
    (``os.makedirs`` came first): now nothing is made for a refused destination."""
    python = "/usr/bin/python3"
    if not os.path.exists(python):
        pytest.skip("no system python3")
    user = make_user()
    source, _ = _access.agent_source()
    agent = user.write("agent.pyz", source, 0o644)
    for dest in ("~/.colab-remote/x/y", ".ssh/keys", "~/"):
        done = subprocess.run(["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups",
                               python, "-I", "-B", "-S", str(agent), "mirror", "--dest", dest,
                               "--keep-days", "7"], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL, env={"HOME": str(user.home), "PATH": "/usr/bin:/bin"},
                              cwd=user.home)
        assert done.returncode == 1 and "refused" in done.stderr, (dest, done.stderr)
    assert not (user.home / ".colab-remote").exists() and not (user.home / ".ssh").exists()
