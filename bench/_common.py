"""What the WAN benchmark and the soak share: a throwaway server (user + sshd of our own), the
machine's quiet moments, trees, counting, lsyncd, tmpfs folders, and process look-ups.

Only the library's public API is used by the benchmarks; everything about processes here reads
/proc directly (pids and command lines), so it keeps working while the library's internals change.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import secrets
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE = 0x08, 0x80, 0x100


# --- processes and ports -------------------------------------------------------------------------


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ssh_banner(port: int, timeout: float = 1.0) -> bytes | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            data = s.recv(64)
    except OSError:
        return None
    return data if data.startswith(b"SSH-") else None


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def parent_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def all_pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (one pass over /proc)."""
    kids: dict[int, list[int]] = {}
    for p in all_pids():
        kids.setdefault(parent_of(p), []).append(p)
    found, todo = [], list(kids.get(pid, []))
    while todo:
        p = todo.pop()
        if pid_alive(p):
            found.append(p)
        todo += kids.get(p, [])
    return found


def pids_mentioning(text: str) -> list[int]:
    """Live processes whose command line mentions ``text`` (a folder of ours), not this one."""
    me = os.getpid()
    return [p for p in all_pids() if p != me and pid_alive(p) and any(text in a for a in cmdline(p))]


def exit_on_sigterm() -> None:
    """SIGTERM ends the program through its ``finally`` blocks (users, sshd, mounts removed)."""
    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- the machine -----------------------------------------------------------------------------------


def busy_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far (iowait counts as idle)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(fields[:8])
    return total - fields[3] - fields[4], total


def compile_package() -> None:
    """Byte-compile the package, as pip does when it installs one: with PYTHONDONTWRITEBYTECODE
    set (some machines set it), every process of a checkout would compile its sources again,
    which is no cost a user's runtime pays (the mirror process alone: about 0.15 s)."""
    import compileall

    compileall.compile_dir(str(Path(__file__).resolve().parents[1] / "colab_remote"), quiet=1)


def settle(limit: float = 5.0) -> float:
    """``sync``, then wait (at most ``limit`` s) until the machine is quiet (< 5 % busy over
    0.5 s): a figure is not measured against the writeback of what the step before wrote. On a
    machine others keep busy it never gets that quiet: hence the limit. The seconds it took."""
    t0 = time.perf_counter()
    os.sync()
    while time.perf_counter() - t0 < limit:
        b0, n0 = busy_ticks()
        time.sleep(0.5)
        b1, n1 = busy_ticks()
        if n1 > n0 and (b1 - b0) / (n1 - n0) < 0.05:
            break
    return time.perf_counter() - t0


class Inotify:
    """Readable when something lands in one folder (to time arrivals without busy polling)."""

    def __init__(self, folder: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(0o4000)
        if self.libc.inotify_add_watch(self.fd, os.fsencode(folder),
                                       IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder}")

    def wait(self, timeout: float) -> None:
        select.select([self.fd], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(self.fd, 65536):
                pass

    def close(self) -> None:
        os.close(self.fd)


def wait_content(path: Path, content: bytes, timeout: float) -> float | None:
    """time.perf_counter() when ``path`` holds ``content`` (None: not within ``timeout``)."""
    watch = Inotify(path.parent)
    try:
        deadline = time.perf_counter() + timeout
        while True:
            with contextlib.suppress(OSError):
                if path.read_bytes() == content:
                    return time.perf_counter()
            if time.perf_counter() > deadline:
                return None
            watch.wait(0.02)
    finally:
        watch.close()


@contextlib.contextmanager
def tmpfs_folder(base: Path, need_bytes: int) -> Iterator[Path]:
    """A folder of ours on a tmpfs: in /dev/shm when it is a tmpfs with room, else a tmpfs
    mounted under ``base`` (unmounted at the end)."""
    fstype = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if fields[1] == "/dev/shm":
                fstype = fields[2]
    if fstype == "tmpfs" and shutil.disk_usage("/dev/shm").free > 2 * need_bytes:
        folder = Path(tempfile.mkdtemp(prefix="bench-wan-", dir="/dev/shm"))
        os.chmod(folder, 0o755)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    with mounted_tmpfs(base / "tmpfs", need_bytes) as folder:
        yield folder


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, size_bytes: int, mode: int = 0o755) -> Iterator[Path]:
    """A tmpfs of ``size_bytes`` mounted on ``folder`` (created; ours), unmounted at the end."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode={mode:o}", "tmpfs",
                    str(folder)], check=True)
    try:
        yield folder
    finally:
        for _ in range(20):
            if subprocess.run(["umount", str(folder)], capture_output=True).returncode == 0:
                break
            time.sleep(0.5)
        else:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


# --- trees ---------------------------------------------------------------------------------------


def make_tree(root: Path, files: int, per_dir: int, size: int, prefix: str = "d") -> int:
    """``files`` files of ``size`` bytes, ``per_dir`` per folder; the bytes written."""
    blob = b"x" * size
    for i in range(files):
        d = root / f"{prefix}{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:06d}.txt").write_bytes(blob[:-8] + f"{i:08d}".encode() if size >= 8 else blob)
    return files * size


def count_files(root: Path, skip: str = ".colab-remote") -> int:
    """Regular files under ``root``, our temporary names and the trash not counted."""
    n = 0
    for _dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(skip)]
        n += sum(1 for f in filenames if ".colab-remote-tmp." not in f and not f.startswith(".")
                 and not f.startswith("~"))
    return n


def wait_count(root: Path, n: int, timeout: float, interval: float = 0.02) -> float | None:
    """time.perf_counter() when ``root`` holds ``n`` files (None: not within ``timeout``)."""
    deadline = time.perf_counter() + timeout
    while True:
        if count_files(root) >= n:
            return time.perf_counter()
        if time.perf_counter() > deadline:
            return None
        time.sleep(interval)


def wait_size(path: Path, size: int, timeout: float, interval: float = 0.05) -> float | None:
    """time.perf_counter() when ``path`` exists with ``size`` bytes (None: not in time)."""
    deadline = time.perf_counter() + timeout
    while True:
        with contextlib.suppress(OSError):
            if path.stat().st_size == size:
                return time.perf_counter()
        if time.perf_counter() > deadline:
            return None
        time.sleep(interval)


# --- the server ----------------------------------------------------------------------------------


def make_user(prefix: str) -> tuple[str, str]:
    """A throwaway user (random name and password); remove it with :func:`remove_user`."""
    name = prefix + secrets.token_hex(4)
    password = secrets.token_urlsafe(12).replace("-", "x").replace("_", "y")
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
    subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True)
    return name, password


def remove_user(name: str) -> None:
    subprocess.run(["userdel", "--remove", "--force", name], capture_output=True)


class Server:
    """A throwaway user and an sshd of our own on 127.0.0.1 (key and password login), which can
    be stopped and started again (the soak's "server down")."""

    def __init__(self, base: Path, prefix: str = "crw") -> None:
        self.base = base
        self.name, self.password = make_user(prefix)
        pw = pwd.getpwnam(self.name)
        self.home, self.uid, self.gid = Path(pw.pw_dir), pw.pw_uid, pw.pw_gid
        self.port = free_port()
        self.key = base / "client_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        ssh_dir = self.home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(Path(str(self.key) + ".pub").read_text())
        for p in (ssh_dir, ssh_dir / "authorized_keys"):
            os.chown(p, self.uid, self.gid)
        host_key = base / "ssh_host_ed25519_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
        self.config = base / "sshd_config"
        self.config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}",
            f"PidFile {base / 'sshd.pid'}", "UsePAM no", "PasswordAuthentication yes",
            "KbdInteractiveAuthentication no", f"AllowUsers {self.name}", "PrintMotd no",
            "UseDNS no", "MaxStartups 100:30:200", "MaxSessions 100", "AllowTcpForwarding yes",
            "Subsystem sftp internal-sftp"]) + "\n")
        self.known_hosts = base / "known_hosts"
        self.proc: subprocess.Popen[bytes] | None = None
        self.masters: list[subprocess.Popen[bytes]] = []
        self.start()

    def start(self) -> None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        with open(self.base / "sshd.log", "ab") as log:
            self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(self.config)],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=log, start_new_session=True)
        if not wait_until(lambda: ssh_banner(self.port) is not None, 10):
            raise RuntimeError("sshd did not start:\n" + tail(self.base / "sshd.log"))

    def stop(self) -> None:
        """Every sshd process of ours: the listener and the sessions it serves (a crash)."""
        if self.proc is None:
            return
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        kill_pids(pids)
        self.proc.wait(5)
        wait_until(lambda: not any(pid_alive(p) for p in pids), 5)
        self.proc = None

    def ssh_argv(self, port: int | None = None, control_path: Path | None = None) -> list[str]:
        """ssh with our key and known_hosts; through ``control_path``'s master when given."""
        argv = ["ssh", "-p", str(port or self.port), "-i", str(self.key), "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=accept-new", "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR"]
        if control_path is not None:
            argv += ["-o", f"ControlPath={control_path}", "-o", "ControlMaster=no"]
        return argv

    def open_master(self, port: int, control_path: Path) -> subprocess.Popen[bytes]:
        """A warm ControlMaster to the server through ``port`` (the relay, or sshd itself)."""
        argv = self.ssh_argv(port)[:] + ["-o", f"ControlPath={control_path}", "-o", "ControlMaster=yes",
                                         "-o", "ControlPersist=no", "-N", f"{self.name}@127.0.0.1"]
        master = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
        if not wait_until(control_path.exists, 30):
            master.kill()
            master.wait(5)
            raise RuntimeError("the ControlMaster did not come up")
        self.masters.append(master)
        return master

    def close_master(self, master: subprocess.Popen[bytes]) -> None:
        if master.poll() is None:
            master.terminate()
            try:
                master.wait(5)
            except subprocess.TimeoutExpired:
                master.kill()
                master.wait(5)
        if master in self.masters:
            self.masters.remove(master)

    def server_dir(self, rel: str) -> Path:
        """A folder in the server account's home, made and owned by it."""
        path = self.home / rel
        path.mkdir(parents=True, exist_ok=True)
        for p in [path, *path.parents]:
            if p == self.home:
                break
            os.chown(p, self.uid, self.gid)
        return path

    def close(self) -> None:
        for master in list(self.masters):
            self.close_master(master)
        self.stop()
        kill_pids([p for p in all_pids() if pid_alive(p) and _uid(p) == self.uid])
        remove_user(self.name)


def _uid(pid: int) -> int:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return -1


# --- lsyncd --------------------------------------------------------------------------------------


class Lsyncd:
    """lsyncd's default.rsync with delay=0, rsync over ``rsh`` (a warm ControlMaster)."""

    def __init__(self, base: Path, label: str, source: Path, target: str, rsh: list[str]) -> None:
        self.log = base / f"lsyncd-{label}.log"
        config = base / f"lsyncd-{label}.lua"
        config.write_text(f"""
settings {{ nodaemon = true, logfile = "{self.log}", statusFile = "{base}/lsyncd-{label}.status",
           insist = true, maxProcesses = 1 }}
sync {{ default.rsync, source = "{source}", target = "{target}", delay = 0,
       rsync = {{ archive = true, compress = false, rsh = "{' '.join(rsh)}" }} }}
""")
        lsyncd = shutil.which("lsyncd")
        if lsyncd is None:
            raise RuntimeError("lsyncd is not installed (apt-get install lsyncd)")
        self.proc = subprocess.Popen([lsyncd, str(config)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


# --- measuring ---------------------------------------------------------------------------------


def tree_pids(pid: int) -> list[int]:
    """``pid`` (while it lives) and every live descendant."""
    return ([pid] if pid_alive(pid) else []) + descendants(pid)


def user_pids(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
    return pids


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / TICK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]
