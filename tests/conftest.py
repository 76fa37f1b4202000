"""Shared fixtures: real sshd servers on 127.0.0.1, throwaway users, and a leftover-process check.

Nothing here mocks ssh, sshd or rsync. Every process a test starts carries the test's tmp_path in
its command line (config, state folder), which is how the autouse ``no_leftovers`` fixture finds
anything a test left running: it kills those by pid and fails the test.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from colab_remote import _install, _net, _proc

SSHD = _install.find_program("sshd")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (creates users, runs sshd)")
# Tests by tier: "real" ones start sshd, create users or run as root; the rest are "pure" (any
# laptop, no root, seconds: pytest -m pure). A test is real when it is marked needs_root or
# needs_sshd or uses one of these fixtures; .ci/run runs both tiers.
REAL_FIXTURES = {"server", "make_user", "runtime", "fake_gcloud", "sandbox", "as_nobody"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        reasons = " ".join(str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif"))
        real = ("needs root" in reasons or "openssh-server" in reasons
                or bool(REAL_FIXTURES & set(getattr(item, "fixturenames", ()))))
        item.add_marker(pytest.mark.real if real else pytest.mark.pure)
needs_sshd = pytest.mark.skipif(SSHD is None, reason="openssh-server is not installed")


def _ours(marker: str) -> list[int]:
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me and _proc.pid_alive(int(entry)):
            if any(marker in a for a in _proc.cmdline(int(entry))):
                found.append(int(entry))
    return found


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path: Path) -> Iterator[None]:
    """Fail any test that leaves a process of ours running (found by its tmp_path)."""
    yield
    marker = str(tmp_path)
    left = [p for p in _ours(marker) if _proc.pid_alive(p)]
    if left:
        # A process may be on its way out (SIGTERM sent): give it a moment before judging.
        _proc.wait_until(lambda: not any(_proc.pid_alive(p) for p in left), 3)
        left = [p for p in left if _proc.pid_alive(p)]
    if left:
        described = [f"{p}: {' '.join(_proc.cmdline(p))[:200]}" for p in left]
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pytest.fail("test left processes running:\n" + "\n".join(described))


@pytest.fixture
def free_port() -> int:
    return _net.free_port()


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
_IMPORTS = "import colab_remote, colab_remote.cli, colab_remote._demo, colab_remote._twoway.worker, pexpect"


@pytest.fixture(scope="session")
def as_nobody() -> Iterator[tuple[list[str], dict[str, str]]]:
    """``(argv prefix, env)`` that run Python as user ``nobody`` with this colab_remote importable.

    The checkout may sit where nobody may enter (a clone in /root, a ``mktemp -d`` folder): the
    package and the third-party modules it imports are copied into a world-readable folder under
    /tmp for these runs, and an interpreter nobody can run is picked. Run with ``cwd="/"``.
    """
    import json
    import shutil
    import sys
    import tempfile
    import textwrap

    # Where each top-level module the package imports comes from (stdlib and builtins aside).
    listing = textwrap.dedent("""
        import json, sys
        found = {}
        for name, module in list(sys.modules.items()):
            top = name.split(".")[0]
            if "." in name or top in sys.stdlib_module_names or top.startswith("__editable__"):
                continue
            path = (getattr(module, "__path__", None) or [getattr(module, "__file__", None)])[0]
            if path:
                found[top] = path
        print(json.dumps(found))
    """)
    found = subprocess.run([sys.executable, "-c", f"{_IMPORTS}\n{listing}"], capture_output=True,
                           text=True, check=True)
    tops = [Path(p) for p in json.loads(found.stdout).values()]
    copy = Path(tempfile.mkdtemp(prefix="colab-remote-nobody-"))
    try:
        copy.chmod(0o755)
        for top in tops:
            if top.is_dir():
                shutil.copytree(top, copy / top.name, ignore=shutil.ignore_patterns("__pycache__"))
            elif top.suffix in (".py", ".so"):
                shutil.copy2(top, copy / top.name)
        subprocess.run(["chmod", "-R", "a+rX", str(copy)], check=True)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": str(copy), "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        candidates = [os.path.realpath(sys.executable), getattr(sys, "_base_executable", ""),
                      shutil.which("python3", path="/usr/local/bin:/usr/bin") or ""]
        for python in dict.fromkeys(c for c in candidates if c):
            tried = subprocess.run([*NOBODY, python, "-s", "-c", _IMPORTS], cwd="/", env=env,
                                   capture_output=True, text=True, timeout=60)
            if tried.returncode == 0:
                yield [*NOBODY, python, "-s"], env
                break
        else:
            pytest.fail("no Python interpreter that user nobody can run imports colab_remote "
                        f"from {copy}: {tried.stderr[-500:]}")
    finally:
        shutil.rmtree(copy, ignore_errors=True)


class User:
    def __init__(self, name: str, password: str) -> None:
        self.name = name
        self.password = password
        self.home = Path(pwd.getpwnam(name).pw_dir)
        self.uid = pwd.getpwnam(name).pw_uid
        self.gid = pwd.getpwnam(name).pw_gid

    def write(self, relpath: str, text: str | bytes, mode: int = 0o644) -> Path:
        """Write a file in the user's home, owned by the user."""
        path = self.home / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chown(path.parent, self.uid, self.gid)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        path.chmod(mode)
        os.chown(path, self.uid, self.gid)
        return path


@pytest.fixture
def make_user() -> Iterator:
    """Factory of throwaway users (random name, random password), removed afterwards."""
    made: list[str] = []

    def make(password: str | None = None, set_password: bool = True) -> User:
        name = "crt" + secrets.token_hex(4)
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
        made.append(name)
        password = password or secrets.token_urlsafe(12).replace("-", "x").replace("_", "y")
        if set_password:
            subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True)
        else:
            subprocess.run(["usermod", "-p", "*", name], check=True)
        return User(name, password)

    yield make
    for name in made:
        uid = pwd.getpwnam(name).pw_uid
        subprocess.run(["userdel", "--remove", "--force", name], capture_output=True)
        remove_private_tmp(uid)


def remove_private_tmp(uid: int) -> None:
    """The private folder a removed throwaway user's processes made in /tmp
    (``/tmp/colab_remote-<uid>``: socket folders), when it is that user's and not a link."""
    path = Path(tempfile.gettempdir()) / f"colab_remote-{uid}"
    try:
        st = path.lstat()
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
        shutil.rmtree(path, ignore_errors=True)


class ServerSshd:
    """A "server" sshd of the test's own (not start_sshd): config and host keys under ``root``."""

    def __init__(self, root: Path, port: int, user: User, extra: list[str] | None = None) -> None:
        self.root = root
        self.port = port
        self.user = user
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.host_key = root / "ssh_host_ed25519_key"
        if not self.host_key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key)],
                           check=True)
        self.config = root / "sshd_config"
        self.log = root / "sshd.log"

    @property
    def host_key_line(self) -> str:
        return Path(str(self.host_key) + ".pub").read_text().strip()

    def start(self) -> ServerSshd:
        assert SSHD is not None
        self.config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}",
            f"PidFile {self.root / 'sshd.pid'}", "UsePAM no", "PasswordAuthentication yes",
            "KbdInteractiveAuthentication no", "AllowTcpForwarding yes", f"AllowUsers {self.user.name}",
            "PrintMotd no", "UseDNS no", "MaxStartups 100:30:200", *self.extra,
        ]) + "\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)],
                                         stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        if not _proc.wait_until(lambda: _net.ssh_banner("127.0.0.1", self.port, 0.5) is not None, 10):
            self.stop()
            raise RuntimeError("server sshd did not start:\n" + _proc.tail(self.log))
        return self

    def stop(self) -> None:
        """Stop the listener and every session it serves (a crash, as far as clients can tell)."""
        if self.proc is None:
            return
        # Every descendant: with privilege separation the process that serves a session
        # (sshd: user@notty) is a grandchild and outlives its killed parent for a while.
        pids = [self.proc.pid]
        for pid in pids:
            pids += [c for c in _proc.children(pid) if c not in pids]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=5)
        _proc.wait_until(lambda: not any(_proc.pid_alive(p) for p in pids), 5)
        self.proc = None


@pytest.fixture
def server(tmp_path: Path, make_user) -> Iterator[ServerSshd]:
    """A running "server" sshd on 127.0.0.1 at a free port with a throwaway user."""
    srv = ServerSshd(tmp_path / "server", _net.free_port(), make_user())
    srv.start()
    yield srv
    srv.stop()


def ssh_run(port: int, user: str, password: str | None, command: str, *, known_hosts: Path,
            jump: tuple[str, str] | None = None, identity: Path | None = None,
            timeout: float = 20) -> str:
    """Log in with real ssh (typing passwords through pexpect) and return the command's output.

    ``jump`` is ``(jump_spec, jump_password)`` for ``ssh -J``.
    """
    args = ["-p", str(port), "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "StrictHostKeyChecking=accept-new", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "NumberOfPasswordPrompts=1", "-o", "BatchMode=no"]
    if identity is not None:
        args += ["-i", str(identity), "-o", "IdentitiesOnly=yes",
                 "-o", "PreferredAuthentications=publickey"]
    else:
        args += ["-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password"]
    if jump is not None:
        # ssh -J passes -o options on to the jump connection only through ProxyJump's own ssh:
        # use ProxyCommand so the jump connection gets the same known_hosts and auth options.
        spec, _ = jump
        juser, _, jhostport = spec.partition("@")
        jhost, _, jport = jhostport.partition(":")
        inner = ["ssh", "-W", "%h:%p", "-p", jport or "22", "-o", f"UserKnownHostsFile={known_hosts}",
                 "-o", "StrictHostKeyChecking=accept-new", "-o", "GlobalKnownHostsFile=/dev/null",
                 "-o", "PubkeyAuthentication=no", "-o", "NumberOfPasswordPrompts=1",
                 f"{juser}@{jhost}"]
        args += ["-o", "ProxyCommand=" + " ".join(inner), "-o", "HostKeyAlias=colab-runtime"]
    child = pexpect.spawn("ssh", [*args, f"{user}@127.0.0.1", command], encoding="utf-8",
                          timeout=timeout, env=dict(os.environ, LC_ALL="C"))
    passwords = [jump[1]] if jump is not None else []
    if password is not None:
        passwords.append(password)
    try:
        for pw in passwords:
            if child.expect(["assword:", pexpect.EOF]) == 1:
                break
            child.sendline(pw)
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    out = child.before or ""
    if child.exitstatus not in (0, None):
        raise AssertionError(f"ssh exited {child.exitstatus}: {out}")
    return out.replace("\r\n", "\n").strip()


@pytest.fixture
def ssh_login():
    return ssh_run


@pytest.fixture
def client_key(tmp_path: Path) -> Path:
    key = tmp_path / "client_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def wait_for(predicate, timeout: float, what: str) -> None:
    """Wait for ``predicate`` or fail the test saying ``what`` did not happen."""
    if not _proc.wait_until(predicate, timeout, interval=0.02):
        pytest.fail(f"timed out after {timeout} s waiting for: {what}")


