"""Benchmark of mirror() against the issue's targets, beside lsyncd and plain ``rsync -a``.

Run as root (it creates a throwaway user and an sshd on 127.0.0.1, and removes both):

    .venv/bin/python bench/bench_mirror.py            # the full run (100,000 files, 60 s idle)
    .venv/bin/python bench/bench_mirror.py --quick    # 10,000 files, 15 s idle

Targets (issue 4):
1. write of a small file -> complete on the server: median <= 20 ms, p95 <= 30 ms (50 edits), with
   the idle CPU of target 3 at the same time; <= 30 ms median with a 100 ms ~/.bashrc on the server.
2. 10,000 new 1 KiB files in 100 new folders: complete on the server <= 0.8 s after the first
   create (median of 3), none missing; plain ``rsync -a`` of the same tree timed beside it.
3. idle CPU over 60 s <= 1 % of a core; RSS while watching 100,000 files <= 150 MB.
Anchor: lsyncd (Debian package) with delay=0 and an ssh ControlMaster, in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import pwd
import random
import secrets
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from colab_remote import _proc  # noqa: E402
from colab_remote.mirror import mirror  # noqa: E402

IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE = 0x08, 0x80, 0x100
TICK = os.sysconf("SC_CLK_TCK")


class Inotify:
    """Readable when something lands in one folder (to time arrivals without polling)."""

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


class Server:
    """A throwaway user and an sshd of our own on 127.0.0.1 (password and key login)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.name = "crb" + secrets.token_hex(4)
        self.password = secrets.token_urlsafe(12).replace("-", "x").replace("_", "y")
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", self.name], check=True)
        subprocess.run(["chpasswd"], input=f"{self.name}:{self.password}\n", text=True, check=True)
        pw = pwd.getpwnam(self.name)
        self.home, self.uid, self.gid = Path(pw.pw_dir), pw.pw_uid, pw.pw_gid
        self.port = _proc.free_port()
        self.key = base / "client_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        ssh_dir = self.home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(Path(str(self.key) + ".pub").read_text())
        for p in (ssh_dir, ssh_dir / "authorized_keys"):
            os.chown(p, self.uid, self.gid)
        self.bashrc = self.home / ".bashrc"
        self.original_bashrc = self.bashrc.read_text() if self.bashrc.exists() else ""
        host_key = base / "ssh_host_ed25519_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
        config = base / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}",
            f"PidFile {base / 'sshd.pid'}", "UsePAM no", "PasswordAuthentication yes",
            "KbdInteractiveAuthentication no", f"AllowUsers {self.name}", "PrintMotd no",
            "UseDNS no", "MaxStartups 100:30:200", "MaxSessions 100"]) + "\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        sshd = _proc.find_program("sshd")
        assert sshd is not None
        self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=open(base / "sshd.log", "ab"),
                                     start_new_session=True)
        if not _proc.wait_until(lambda: _proc.ssh_banner("127.0.0.1", self.port) is not None, 10):
            raise RuntimeError("sshd did not start")
        self.known_hosts = base / "known_hosts"
        self.ctl = base / "cm"
        self.master: subprocess.Popen[bytes] | None = None

    def slow_bashrc(self, on: bool) -> None:
        """A 100 ms ~/.bashrc with no interactive guard (bash runs it for every ssh command)."""
        self.bashrc.write_text(("sleep 0.1\n" if on else "") + self.original_bashrc)
        os.chown(self.bashrc, self.uid, self.gid)

    def ssh_argv(self) -> list[str]:
        return ["ssh", "-p", str(self.port), "-i", str(self.key), "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=accept-new", "-o", "LogLevel=ERROR",
                "-o", f"ControlPath={self.ctl}",
                "-o", "ControlMaster=no"]

    def open_master(self) -> None:
        argv = self.ssh_argv()[:-2] + ["-o", "ControlMaster=yes", "-o", "ControlPersist=no", "-N",
                                       f"{self.name}@127.0.0.1"]
        self.master = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        if not _proc.wait_until(self.ctl.exists, 10):
            raise RuntimeError("ControlMaster did not come up")

    def close(self) -> None:
        if self.master is not None:
            self.master.terminate()
            self.master.wait(5)
        pids = [self.proc.pid, *_proc.children(self.proc.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        self.proc.wait(5)
        _proc.wait_until(lambda: not any(_proc.pid_alive(p) for p in pids), 5)
        subprocess.run(["userdel", "--remove", "--force", self.name], capture_output=True)


# --- measuring -----------------------------------------------------------------------------------


def tree_pids(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        if _proc.pid_alive(p):
            found.append(p)
            todo += _proc.children(p)
    return found


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


def edit_latencies(local_file: Path, server_file: Path, n: int = 50) -> list[float]:
    """Write ``local_file`` n times (100-200 ms apart); ms until the server file has the content."""
    rng = random.Random(4)
    watch = Inotify(server_file.parent)
    out = []
    try:
        for i in range(n):
            # a different size every time: rsync's quick check (size + mtime in whole seconds)
            # skips a same-size rewrite within the same second, and lsyncd loses that edit
            content = f"edit {i} {secrets.token_hex(8)} {'x' * i}\n".encode()
            t0 = time.perf_counter()
            with open(local_file, "wb") as f:
                f.write(content)
            deadline = t0 + 10
            while True:
                with contextlib.suppress(OSError):
                    if server_file.read_bytes() == content:
                        break
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"edit {i} did not arrive within 10 s")
                watch.wait(0.05)
            out.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.1 + rng.random() * 0.1)
    finally:
        watch.close()
    return out


def summary(label: str, ms: list[float]) -> str:
    return (f"{label:<58} median {statistics.median(ms):7.1f} ms   p95 {pct(ms, 0.95):7.1f} ms   "
            f"(n={len(ms)})")


def make_tree(root: Path, files: int, per_dir: int, size: int) -> None:
    blob = b"x" * size
    for i in range(files):
        d = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:06d}.txt").write_bytes(blob[:-8] + f"{i:08d}".encode())


def count_files(root: Path) -> int:
    n = 0
    with contextlib.suppress(FileNotFoundError):
        for d in os.scandir(root):
            if d.is_dir(follow_symlinks=False):
                n += sum(1 for e in os.scandir(d.path) if ".colab-remote-tmp." not in e.name
                         and not e.name.startswith("."))
    return n


def write_burst(src: Path) -> None:
    blob = b"y" * 1024
    src.mkdir()
    for i in range(100):
        d = src / f"dir{i:03d}"
        d.mkdir()
        for j in range(100):
            (d / f"file{j:03d}.bin").write_bytes(blob)


def burst(local_root: Path, server_root: Path, tag: str) -> tuple[float, int]:
    """10,000 new 1 KiB files in 100 new folders; seconds until the server has them all."""
    src = local_root / tag
    dst = server_root / tag
    t0 = time.perf_counter()
    write_burst(src)
    created = time.perf_counter() - t0
    deadline = t0 + 30
    while count_files(dst) < 10_000 and time.perf_counter() < deadline:
        time.sleep(0.01)
    elapsed = time.perf_counter() - t0
    missing = 0
    for i in range(100):
        for j in range(100):
            p = dst / f"dir{i:03d}" / f"file{j:03d}.bin"
            if not p.exists() or p.stat().st_size != 1024:
                missing += 1
    print(f"  burst {tag}: files created locally in {created:.3f} s, server complete after "
          f"{elapsed:.3f} s, missing {missing}", flush=True)
    return elapsed, missing


# --- the runs ------------------------------------------------------------------------------------


def run_lsyncd(server: Server, base: Path, label: str) -> list[float]:
    """lsyncd default.rsync, delay=0, rsync through our ControlMaster; 50 edits."""
    lsyncd = shutil.which("lsyncd")
    if lsyncd is None:
        print("lsyncd not installed (apt-get install lsyncd): anchor skipped")
        return []
    src = base / f"lsync-src-{label}"
    src.mkdir()
    (src / "edit.txt").write_text("start\n")
    target = f"lsync/{label}"
    subprocess.run(server.ssh_argv() + [f"{server.name}@127.0.0.1", f"mkdir -p {target}"], check=True)
    rsh = " ".join(server.ssh_argv())
    config = base / f"lsyncd-{label}.lua"
    config.write_text(f"""
settings {{ nodaemon = true, logfile = "{base}/lsyncd-{label}.log",
           statusFile = "{base}/lsyncd-{label}.status", insist = true }}
sync {{ default.rsync, source = "{src}", target = "{server.name}@127.0.0.1:{target}", delay = 0,
       rsync = {{ archive = true, compress = false, rsh = "{rsh}" }} }}
""")
    proc = subprocess.Popen([lsyncd, str(config)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        server_file = server.home / target / "edit.txt"
        if not _proc.wait_until(server_file.exists, 30, interval=0.05):
            raise RuntimeError("lsyncd's first sync did not arrive")
        time.sleep(1)
        return edit_latencies(src / "edit.txt", server_file)
    except RuntimeError as e:
        print(f"lsyncd ({label}): {e}; its log:\n{_proc.tail(base / f'lsyncd-{label}.log', 15)}")
        return []
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 watched files and 15 s idle")
    parser.add_argument("--files", type=int, help="files in the watched tree (default 100,000)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root: the benchmark creates a throwaway user and an sshd", file=sys.stderr)
        return 2
    n_files = args.files or (10_000 if args.quick else 100_000)
    idle_s = 15 if args.quick else 60
    base = Path(tempfile.mkdtemp(prefix="bench-mirror-"))
    os.chmod(base, 0o755)
    server = Server(base)
    lines: list[str] = []
    mirrors = []
    try:
        server.open_master()
        dest_base = f"{server.name}@127.0.0.1:"
        state = base / "state"
        print(f"machine: {os.cpu_count()} cores; {n_files} watched files; idle window {idle_s} s",
              flush=True)

        # target 3 (and target 1 on the same, big, mirror)
        big = base / "big"
        t0 = time.perf_counter()
        make_tree(big, n_files, 100, 200)
        (big / "edit.txt").write_text("start\n")
        print(f"made {n_files} files in {time.perf_counter() - t0:.1f} s", flush=True)
        t0 = time.perf_counter()
        m = mirror(big, dest_base + "backup/big", port=server.port, password=server.password,
                   state_dir=state, quiet=True, timeout=1200)
        mirrors.append(m)
        print(f"first push of {n_files} files: {time.perf_counter() - t0:.1f} s", flush=True)
        m.flush(600)
        time.sleep(3)
        pids = tree_pids(m.pid)
        srv_pids = user_pids(server.uid)
        rss = rss_mb(m.pid)
        rss_all = sum(rss_mb(p) for p in pids)
        c0, s0 = cpu_seconds(pids), cpu_seconds(srv_pids)
        time.sleep(idle_s)
        c1, s1 = cpu_seconds(pids), cpu_seconds(srv_pids)
        idle_pct = (c1 - c0) / idle_s * 100
        srv_pct = (s1 - s0) / idle_s * 100
        lines.append(f"target 3: RSS of the mirror process watching {n_files} files: {rss:.1f} MB "
                     f"(with its ssh children: {rss_all:.1f} MB)   [target <= 150 MB]")
        lines.append(f"target 3: idle CPU over {idle_s} s: {idle_pct:.2f} % of a core (mirror + ssh); "
                     f"server side (sshd session + agent): {srv_pct:.2f} %   [target <= 1 %]")
        print(lines[-2], lines[-1], sep="\n", flush=True)
        lat = edit_latencies(big / "edit.txt", server.home / "backup/big/edit.txt")
        lines.append(summary(f"target 1: mirror() watching {n_files} files", lat) +
                     "   [<= 20 / <= 30]")
        print(lines[-1], flush=True)
        m.stop()

        # target 1 with a slow ~/.bashrc
        server.slow_bashrc(True)
        small = base / "small"
        small.mkdir()
        (small / "edit.txt").write_text("start\n")
        m = mirror(small, dest_base + "backup/small", port=server.port, password=server.password,
                   state_dir=state, quiet=True)
        mirrors.append(m)
        lat = edit_latencies(small / "edit.txt", server.home / "backup/small/edit.txt")
        lines.append(summary("target 1: mirror(), server ~/.bashrc sleeps 100 ms", lat) +
                     "   [median <= 30]")
        print(lines[-1], flush=True)
        m.stop()
        lat = run_lsyncd(server, base, "slowrc")
        if lat:
            lines.append(summary("anchor: lsyncd delay=0 + ControlMaster, 100 ms ~/.bashrc", lat))
            print(lines[-1], flush=True)
        server.slow_bashrc(False)
        lat = run_lsyncd(server, base, "plain")
        if lat:
            lines.append(summary("anchor: lsyncd delay=0 + ControlMaster", lat))
            print(lines[-1], flush=True)

        # target 2: bursts
        burst_root = base / "burst"
        burst_root.mkdir()
        m = mirror(burst_root, dest_base + "backup/burst", port=server.port, password=server.password,
                   state_dir=state, quiet=True)
        mirrors.append(m)
        times, missing = [], 0
        for k in range(3):
            elapsed, miss = burst(burst_root, server.home / "backup/burst", f"b{k}")
            times.append(elapsed)
            missing += miss
            m.flush(120)
            time.sleep(1)
        print("  the burst mirror's log:\n" + "\n".join("    " + x for x in m.logs(8).splitlines()))
        m.stop()
        lines.append(f"target 2: burst of 10,000 files / 100 folders: median "
                     f"{statistics.median(times):.3f} s "
                     f"(runs {', '.join(f'{t:.3f}' for t in times)}), missing {missing}   [<= 0.8 s, 0]")
        print(lines[-1], flush=True)
        # the anchor under the same conditions: the same burst into an unwatched folder, then one
        # plain rsync -a right after the last create (fresh files still being written back)
        plain, after = [], []
        for k in range(3):
            src = base / f"plain-b{k}"
            t0 = time.perf_counter()
            write_burst(src)
            t1 = time.perf_counter()
            subprocess.run(["rsync", "-a", "-e", " ".join(server.ssh_argv()), f"{src}/",
                            f"{server.name}@127.0.0.1:rsync-plain-{k}/"], check=True)
            plain.append(time.perf_counter() - t0)
            after.append(time.perf_counter() - t1)
            time.sleep(1)
        lines.append(f"anchor: the same burst, then one plain rsync -a (ControlMaster): median "
                     f"{statistics.median(plain):.3f} s after the first create (rsync alone "
                     f"{statistics.median(after):.3f} s)")
        print(lines[-1], flush=True)
        t0 = time.perf_counter()
        subprocess.run(["rsync", "-a", "-e", " ".join(server.ssh_argv()), f"{burst_root}/b0/",
                        f"{server.name}@127.0.0.1:rsync-settled/"], check=True)
        lines.append(f"anchor: plain rsync -a of a settled 10,000-file tree (written minutes before): "
                     f"{time.perf_counter() - t0:.3f} s")
        print(lines[-1], flush=True)
    finally:
        for m in mirrors:
            with contextlib.suppress(Exception):
                m.stop(flush=False)
        server.close()
        shutil.rmtree(base, ignore_errors=True)
    print("\n== summary (loopback, this machine) ==")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
