"""The two-way sync's test set-up: a runtime, a server, the tunnel, and a laptop user.

As the demo does on one machine: the runtime's sshd (``start_sshd``, a throwaway runtime user,
key-only), a stand-in server (a second sshd with a throwaway account), the reverse tunnel between
them, and a throwaway *laptop* user with nothing but ssh: ``~/.ssh/config`` holds the block
``tunnel.ssh_config()`` prints (ProxyJump through the server), ``~/.ssh/known_hosts`` the lines of
``tunnel.known_hosts()`` and the server's key. The sync runs as that user (no root), from a
world-readable copy of the package (the ``as_nobody`` fixture's). Everything lives in a folder of
its own under /tmp (the laptop user must reach it); a process of ours left running fails the test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from colab_remote import _net, _proc
from colab_remote._agent import rules
from colab_remote._demo import MINIMAL_ENVIRONMENT
from colab_remote.reverse import reverse_forward
from colab_remote.server import start_sshd
from colab_remote.status import stop_all
from colab_remote.sync import Sync

from .conftest import ServerSshd, User, wait_for


def chown_tree(path: Path, user: User) -> None:
    for folder, dirs, files in os.walk(path):
        for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
            os.lchown(name, user.uid, user.gid)


def write(path: Path, data: str | bytes, user: User) -> Path:
    """Write a file as ``user`` would (the folders it makes and the file are theirs)."""
    missing, cur = [], path.parent
    while not cur.exists():
        missing.append(cur)
        cur = cur.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    for folder in missing:
        os.chown(folder, user.uid, user.gid)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chown(path, user.uid, user.gid)
    return path


def tree(root: Path, flt: rules.Rules | None = None) -> dict[str, str]:
    """rel path -> content ('dir' for folders, 'link:target' for links) of what a sync carries
    (``flt``: default rules)."""
    flt = flt or rules.Rules()
    out: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        rel = "" if rel == "." else rel
        dirs[:] = [d for d in dirs if not flt.excluded(os.path.join(rel, d), True)]
        for name in dirs + files:
            p = Path(folder, name)
            r = os.path.join(rel, name)
            if flt.excluded(r, p.is_dir() and not p.is_symlink()):
                continue
            if p.is_symlink():
                out[r] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[r] = "dir"
            else:
                out[r] = p.read_bytes().decode(errors="replace")
    return out


def trash_of(root: Path) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    top = root / ".colab-remote-trash"
    if top.is_dir():
        for stamp in top.iterdir():
            if stamp.name[:1].isdigit():
                for folder, _, files in os.walk(stamp):
                    for f in files:
                        found[str(Path(folder, f).relative_to(stamp))] = Path(folder, f).read_bytes()
    return found


class Env:
    """The runtime, the server, the tunnel, the laptop user, and how to run the sync as them."""

    def __init__(self, base: Path, runtime_user: User, server_user: User, laptop: User,
                 nobody: tuple[list[str], dict[str, str]]) -> None:
        self.base, self.runtime_user, self.server_user, self.laptop = base, runtime_user, server_user, laptop
        self.runtime_state = base / "runtime-state"
        self.laptop_state = base / "laptop-state"
        self.local = laptop.home / "project"
        self.remote_dir = runtime_user.home / "project"
        self.remote = "colab:project"
        prefix, env = nobody
        self.python = [*prefix[-2:]]  # the interpreter and -s
        self.env = {**env, "HOME": str(laptop.home), "USER": laptop.name, "LOGNAME": laptop.name}
        self.sshd: Any = None
        self.server: ServerSshd | None = None
        self.tunnel: Any = None

    def pick_python(self) -> None:
        """An interpreter the laptop user can run that imports the package copy (the one the
        ``as_nobody`` fixture found may sit where only its own uid mapping reaches)."""
        for python in dict.fromkeys([self.python[0], "/usr/bin/python3", shutil.which("python3") or ""]):
            if not python:
                continue
            self.python = [python, "-s"]
            check = ("import subprocess, sys, colab_remote.sync, watchfiles; "  # the daemon: sys.executable
                     "subprocess.run([sys.executable, '-c', 'import colab_remote'], check=True)")
            done = subprocess.run([*self.as_laptop, "-c", check], cwd="/",
                                  env=self.env, capture_output=True, text=True, timeout=60)
            if done.returncode == 0:
                return
        pytest.skip(f"no Python the laptop user can run imports colab_remote: {done.stderr[-300:]}")

    @property
    def as_laptop(self) -> list[str]:
        return ["setpriv", f"--reuid={self.laptop.uid}", f"--regid={self.laptop.gid}", "--init-groups",
                *self.python]

    def start_runtime(self) -> None:
        key = (self.laptop.home / ".ssh" / "id_ed25519.pub").read_text()
        self.sshd = start_sshd(self.sshd_port, user=self.runtime_user.name, authorized_keys=key,
                               state_dir=self.runtime_state, environment=MINIMAL_ENVIRONMENT,
                               install=False, quiet=True)

    def python_as_laptop(self, code: str, timeout: float = 120,
                         check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*self.as_laptop, "-c", textwrap.dedent(code)], cwd="/", env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"exit {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.as_laptop, "-m", "colab_remote", *args], cwd="/", env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def start_sync(self, **options: Any) -> Sync:
        options.setdefault("quiet", True)
        options.setdefault("notify", False)
        args = ", ".join(f"{k}={v!r}" for k, v in options.items())
        done = self.python_as_laptop(f"""
            import colab_remote
            s = colab_remote.sync({str(self.local)!r}, {self.remote!r}, state_dir={str(self.laptop_state)!r},
                                  {args})
            print("RUN_DIR", s.run_dir)
        """)
        (run_dir,) = [line[8:] for line in done.stdout.splitlines() if line.startswith("RUN_DIR ")]
        return Sync(Path(run_dir))

    def local_write(self, rel: str, data: str | bytes) -> Path:
        return write(self.local / rel, data, self.laptop)

    def remote_write(self, rel: str, data: str | bytes) -> Path:
        return write(self.remote_dir / rel, data, self.runtime_user)

    def converged(self, timeout: float = 20, ignore: tuple[str, ...] = ()) -> None:
        flt = rules.Rules([*rules.DEFAULT_IGNORES, *ignore])

        def same() -> bool:
            return tree(self.local, flt) == tree(self.remote_dir, flt)
        if not _proc.wait_until(same, timeout, 0.05):
            a, b = tree(self.local, flt), tree(self.remote_dir, flt)
            pytest.fail(f"not the same after {timeout} s: laptop ^ runtime = "
                        f"{sorted(set(a.items()) ^ set(b.items()))[:20]}")


@contextlib.contextmanager
def environment(make_user: Any, nobody: tuple[list[str], dict[str, str]]) -> Iterator[Env]:
    base = Path(tempfile.mkdtemp(prefix="crsync-"))
    base.chmod(0o711)
    env: Env | None = None
    try:
        runtime_user, server_user, laptop = make_user(), make_user(), make_user()
        for user in (runtime_user, server_user, laptop):
            user.home.chmod(0o711)
        env = Env(base, runtime_user, server_user, laptop, nobody)
        env.pick_python()
        env.laptop_state.mkdir()
        os.chown(env.laptop_state, laptop.uid, laptop.gid)
        ssh_dir = laptop.home / ".ssh"
        ssh_dir.mkdir(mode=0o700)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "laptop", "-f",
                        str(ssh_dir / "id_ed25519")], check=True)
        env.sshd_port = _net.free_port()
        env.start_runtime()
        env.server = ServerSshd(base / "server", _net.free_port(), server_user).start()
        remote_port = _net.free_port()
        env.tunnel = reverse_forward(f"{server_user.name}@127.0.0.1", port=env.server.port,
                                     password=server_user.password, remote_port=remote_port,
                                     local_port=env.sshd_port, state_dir=env.runtime_state, quiet=True)
        # the laptop's key may open the tunnel's port through the server (ProxyJump), nothing else
        pub = (ssh_dir / "id_ed25519.pub").read_text().strip()
        keys = server_user.home / ".ssh" / "authorized_keys"
        with keys.open("a") as f:
            f.write(f'restrict,port-forwarding,permitopen="localhost:{remote_port}" {pub}\n')
        (ssh_dir / "config").write_text(env.tunnel.ssh_config(alias="colab") + "    IdentitiesOnly yes\n"
                                        "    IdentityFile ~/.ssh/id_ed25519\n")
        (ssh_dir / "known_hosts").write_text(
            env.tunnel.known_hosts(alias="colab") + "\n"
            + f"[127.0.0.1]:{env.server.port} {env.server.host_key_line}\n")
        chown_tree(laptop.home, laptop)
        env.remote_dir.mkdir()
        os.chown(env.remote_dir, runtime_user.uid, runtime_user.gid)
        env.local.mkdir()
        os.chown(env.local, laptop.uid, laptop.gid)
        yield env
    finally:
        if env is not None:
            for sync in Sync.find(env.laptop_state):
                with contextlib.suppress(Exception):
                    sync.stop()
            with contextlib.suppress(Exception):
                stop_all(env.runtime_state)
            if env.server is not None:
                env.server.stop()
        left = [p for p in _ours(str(base))]
        for pid in left:
            _proc.stop(pid, marker=str(base), timeout=2)
        shutil.rmtree(base, ignore_errors=True)
        if left:
            pytest.fail(f"the sync test left processes running: {left}")


def _ours(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and _proc.pid_alive(int(entry)):
            if any(marker in a for a in _proc.cmdline(int(entry))):
                found.append(int(entry))
    return found


def wait_state(sync: Sync, state: str, timeout: float = 30) -> None:
    wait_for(lambda: sync.state == state, timeout, f"the sync to be {state} (it is {sync.state}):\n"
             + sync.logs(30))
