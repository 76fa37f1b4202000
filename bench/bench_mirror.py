"""Benchmark of mirror() against the issue's targets, beside lsyncd and plain ``rsync -a``.

Run as root (it creates a throwaway user and an sshd on 127.0.0.1, and removes both):

    .venv/bin/python bench/bench_mirror.py            # the full run (100,000 files, 60 s idle)
    .venv/bin/python bench/bench_mirror.py --quick    # 10,000 files, 15 s idle
    .venv/bin/python bench/bench_mirror.py --only burst             # target 2 only, disk and tmpfs
    .venv/bin/python bench/bench_mirror.py --only burst --tmpfs on  # target 2 only, tmpfs only

``--tmpfs`` puts target 2's local tree AND the server copy (and the ``rsync -a`` anchor's trees)
on a tmpfs (/dev/shm when it is one with room, else one the bench mounts in its own folder), so
the figure is the mirror's own cost rather than the disk's; ``both`` (the default) runs target 2
on the disk and on the tmpfs in the same run. After the three timed bursts of each, one more
traced burst shows where the time goes (the mirror's log, its rsync children, its stats). Each
burst (and each anchor run) starts once the machine is quiet again: ``sync``, then < 5 % CPU busy
over half a second, so the writeback of the 100,000-file trees of targets 1 and 3 (or of the burst
before) is not measured with it.

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
import os
import pwd
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (  # noqa: E402
    Inotify,
    cmdline,
    compile_package,
    cpu_seconds,
    pct,
    rss_mb,
    settle,
    tree_pids,
    user_pids,
)
from colab_remote import _install, _net, _proc  # noqa: E402
from colab_remote.mirror import Mirror, mirror  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


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
        self.port = _net.free_port()
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
        sshd = _install.find_program("sshd")
        assert sshd is not None
        self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=open(base / "sshd.log", "ab"),
                                     start_new_session=True)
        if not _proc.wait_until(lambda: _net.ssh_banner("127.0.0.1", self.port) is not None, 10):
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


def reaped_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and of the children it has waited for (rsync, ssh: the mirror's)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[11:15]) / TICK
    return 0.0


def thread_cpu(pid: int | None) -> dict[str, float]:
    """CPU seconds of a process's threads by thread name (watchfiles' notify thread has its own)."""
    out: dict[str, float] = {}
    if not pid:
        return out
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                text = Path(f"/proc/{pid}/task/{task}/stat").read_text()
                name = text[text.index("(") + 1:text.rindex(")")]
                fields = text.rsplit(")", 1)[1].split()
                out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
    return out


def cpu_now(mirror_pid: int | None, server_uid: int | None) -> tuple[float, float, dict[int, float]]:
    """CPU seconds so far: this process (the creating loop and the polling), the mirror process
    with its children (live and reaped), the server user's processes (sshd session, agent, rsync)
    by pid (see :func:`cpu_spent`)."""
    mine = os.times()
    own = mine.user + mine.system
    mir = 0.0
    if mirror_pid:
        mir = reaped_cpu(mirror_pid) + sum(reaped_cpu(p) for p in tree_pids(mirror_pid)[1:])
    srv = {p: reaped_cpu(p) for p in user_pids(server_uid)} if server_uid is not None else {}
    return own, mir, srv


def cpu_spent(before: tuple[float, float, dict[int, float]],
              after: tuple[float, float, dict[int, float]]) -> tuple[float, float, float]:
    """CPU seconds between two :func:`cpu_now`; a server process that exited meanwhile (a session
    ending) is left out rather than subtracted, so the server figure can only undercount."""
    srv = sum(v - before[2].get(p, 0.0) for p, v in after[2].items())
    return after[0] - before[0], after[1] - before[1], srv


def burst(local_root: Path, server_root: Path, tag: str,
          samples: list[tuple[float, int]] | None = None, mirror_pid: int | None = None,
          server_uid: int | None = None) -> tuple[float, float, int]:
    """10,000 new 1 KiB files in 100 new folders; seconds to create them, seconds until the server
    has them all, files missing. ``samples`` (traced runs) gets (seconds, server count) pairs."""
    src = local_root / tag
    dst = server_root / tag
    quiet = settle(60)
    load = os.getloadavg()[0]
    cpu0 = cpu_now(mirror_pid, server_uid)
    threads0 = thread_cpu(mirror_pid)
    t0 = time.perf_counter()
    write_burst(src)
    created = time.perf_counter() - t0
    deadline = t0 + 30
    while True:
        n = count_files(dst)
        if samples is not None:
            samples.append((time.perf_counter() - t0, n))
        if n >= 10_000 or time.perf_counter() >= deadline:
            break
        time.sleep(0.01)
    elapsed = time.perf_counter() - t0
    cpu = cpu_spent(cpu0, cpu_now(mirror_pid, server_uid))
    threads = {k: v - threads0.get(k, 0.0) for k, v in thread_cpu(mirror_pid).items()}
    missing = 0
    for i in range(100):
        for j in range(100):
            p = dst / f"dir{i:03d}" / f"file{j:03d}.bin"
            if not p.exists() or p.stat().st_size != 1024:
                missing += 1
    print(f"  burst {tag}: files created locally in {created:.3f} s, server complete after "
          f"{elapsed:.3f} s, missing {missing}; CPU s until complete: bench {cpu[0]:.2f}, mirror "
          f"{cpu[1]:.2f}, server {cpu[2]:.2f} (machine quiet after {quiet:.1f} s; load average "
          f"{load:.2f})"
          + ("; mirror threads: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(threads.items()))
             if threads else ""), flush=True)
    return created, elapsed, missing


class Tracer(threading.Thread):
    """Where a traced burst's time goes: the mirror's rsync children (whole-tree pass or a list of
    files) and the moments its stats (pushes, files, whole-tree passes) change, every 5 ms."""

    def __init__(self, m: Mirror, t0: float) -> None:
        super().__init__(daemon=True)
        self.m, self.t0 = m, t0
        self.stopping = False
        self.procs: dict[int, list[Any]] = {}  # pid -> [kind, first seen, last seen]
        self.changes: list[tuple[float, str]] = []

    def run(self) -> None:
        last: dict[str, object] = {}
        while not self.stopping:
            now = time.perf_counter() - self.t0
            for pid in tree_pids(self.m.pid or 0)[1:]:
                if pid in self.procs:
                    self.procs[pid][2] = now
                    continue
                with contextlib.suppress(OSError):
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if os.path.basename(argv[0]) == b"rsync":
                        kind = "rsync --files-from" if any(a.startswith(b"--files-from")
                                                           for a in argv) else "rsync whole tree"
                        self.procs[pid] = [kind, now, now]
            with contextlib.suppress(Exception):
                stats = self.m.stats
                now = time.perf_counter() - self.t0
                for key in ("pushes", "files", "full_passes", "pending"):
                    if stats.get(key) != last.get(key):
                        self.changes.append((now, f"{key} {last.get(key)} -> {stats.get(key)}"))
                        last[key] = stats.get(key)
            time.sleep(0.005)

    def stop(self) -> None:
        self.stopping = True
        self.join(5)


def mirror_log_since(log_path: Path, wall0: float) -> list[tuple[float, str]]:
    """The mirror log's lines written after ``wall0`` (time.time()), as (seconds after, text)."""
    out = []
    with contextlib.suppress(OSError):
        for line in log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))
                stamp += int(line[20:23]) / 1000
                if stamp >= wall0 - 0.001:
                    out.append((stamp - wall0, line[24:]))
    return out


def traced_burst(m: Mirror, local_root: Path, server_root: Path, tag: str, uid: int) -> None:
    """One more burst with the tracer on (kept out of the median: the tracer costs some CPU)."""
    samples: list[tuple[float, int]] = []
    wall0 = time.time()
    tracer = Tracer(m, time.perf_counter())
    tracer.start()
    try:
        created, elapsed, missing = burst(local_root, server_root, tag, samples, m.pid, uid)
        time.sleep(0.5)
    finally:
        tracer.stop()
    print(f"  trace of burst {tag} (seconds after the first create; creates end at {created:.3f}):")
    firsts: dict[int, tuple[float, str]] = {}
    for t, n in samples:  # the first sample at or past each 10 % of the files
        if n:
            firsts.setdefault(n * 10 // 10_000, (t, f"server count {n}"))
    events = list(firsts.values())
    events += [(first, f"{kind} starts (pid {pid})") for pid, (kind, first, _) in tracer.procs.items()]
    events += [(last, f"{kind} gone (pid {pid}; ran ~{last - first:.3f} s)")
               for pid, (kind, first, last) in tracer.procs.items()]
    events += [(t, f"stats: {text}") for t, text in tracer.changes]
    events += [(t, f"log: {text}") for t, text in mirror_log_since(
        m.run_dir / "mirror.log", wall0)]
    shown = -1.0
    for t, text in sorted(events):
        # many small pushes (a slow disk): the stats at most every 100 ms, everything else always
        if text.startswith("stats: ") and len(events) > 120:
            if 0 < t - shown < 0.1:
                continue
            shown = t
        print(f"    {t:7.3f}  {text}")
    whole = sum(last - first for kind, first, last in tracer.procs.values() if kind.endswith("tree"))
    listed = sum(last - first for kind, first, last in tracer.procs.values() if "files-from" in kind)
    print(f"    rsync children alive: whole-tree passes ~{whole:.3f} s, --files-from pushes "
          f"~{listed:.3f} s (5 ms sampling); server complete at {elapsed:.3f} s, missing {missing}",
          flush=True)


@contextlib.contextmanager
def tmpfs_folder(base: Path, need_bytes: int) -> Iterator[tuple[Path, str]]:
    """A folder of ours on a tmpfs: in /dev/shm when it is a tmpfs with room, else a tmpfs the
    bench mounts itself (and unmounts at the end)."""
    shm = Path("/dev/shm")
    fstype = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if fields[1] == str(shm):
                fstype = fields[2]
    if fstype == "tmpfs" and shutil.disk_usage(shm).free > need_bytes:
        folder = Path(tempfile.mkdtemp(prefix="bench-mirror-", dir=shm))
        os.chmod(folder, 0o755)
        try:
            yield folder, "/dev/shm (tmpfs)"
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    folder = base / "tmpfs"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={need_bytes},mode=0755", "tmpfs",
                    str(folder)], check=True)
    try:
        yield folder, f"a tmpfs mounted on {folder}"
    finally:
        for _ in range(10):
            if subprocess.run(["umount", str(folder)], capture_output=True).returncode == 0:
                break
            time.sleep(0.5)


def burst_target(server: Server, state: Path, local_base: Path, server_base: Path, where: str,
                 trace: bool) -> list[str]:
    """Target 2 with the local tree under ``local_base`` and the server copy (and the anchor's)
    under ``server_base`` (a folder the server user may write); the summary lines."""
    lines: list[str] = []
    target = f"{server.name}@127.0.0.1:{server_base}"
    burst_root = local_base / "burst"
    burst_root.mkdir()
    m = mirror(burst_root, f"{target}/backup/burst", port=server.port, password=server.password,
               state_dir=state, quiet=True)
    try:
        times, creates, missing = [], [], 0
        for k in range(3):
            created, elapsed, miss = burst(burst_root, server_base / "backup/burst", f"b{k}",
                                           None, m.pid, server.uid)
            times.append(elapsed)
            creates.append(created)
            missing += miss
            m.flush(120)
            time.sleep(1)
        print("  the burst mirror's log:\n" + "\n".join("    " + x for x in m.logs(8).splitlines()))
        if trace:
            traced_burst(m, burst_root, server_base / "backup/burst", "traced", server.uid)
            m.flush(120)
        stats = m.stats
    finally:
        m.stop()
    lines.append(f"target 2 [{where}]: burst of 10,000 files / 100 folders: median "
                 f"{statistics.median(times):.3f} s "
                 f"(runs {', '.join(f'{t:.3f}' for t in times)}), missing {missing}   [<= 0.8 s, 0]")
    lines.append(f"target 2 [{where}]: creating the files alone: median "
                 f"{statistics.median(creates):.3f} s (runs {', '.join(f'{t:.3f}' for t in creates)})"
                 f"; mirror stats: {stats.get('pushes')} pushes, {stats.get('full_passes')} "
                 f"whole-tree passes, {stats.get('files')} files")
    print(lines[-2], lines[-1], sep="\n", flush=True)
    # the anchor under the same conditions: the same burst into an unwatched folder, then one
    # plain rsync -a right after the last create (fresh files still being written back)
    plain, after, plain_creates = [], [], []
    rsync_cpu: list[tuple[float, float]] = []
    for k in range(3):
        src = local_base / f"plain-b{k}"
        settle(60)
        t0 = time.perf_counter()
        write_burst(src)
        t1 = time.perf_counter()
        master = server.master.pid if server.master is not None else 0
        kids0, srv0, cm0 = os.times(), cpu_now(None, server.uid), reaped_cpu(master)
        subprocess.run(["rsync", "-a", "-e", " ".join(server.ssh_argv()), f"{src}/",
                        f"{target}/rsync-plain-{k}/"], check=True)
        kids1, srv1, cm1 = os.times(), cpu_now(None, server.uid), reaped_cpu(master)
        rsync_cpu.append((kids1.children_user + kids1.children_system - kids0.children_user
                          - kids0.children_system + cm1 - cm0, cpu_spent(srv0, srv1)[2]))
        plain.append(time.perf_counter() - t0)
        after.append(time.perf_counter() - t1)
        plain_creates.append(t1 - t0)
        time.sleep(1)
    lines.append(f"anchor [{where}]: the same burst, then one plain rsync -a (ControlMaster): median "
                 f"{statistics.median(plain):.3f} s after the first create (runs "
                 f"{', '.join(f'{t:.3f}' for t in plain)}; creates "
                 f"{', '.join(f'{t:.3f}' for t in plain_creates)}; rsync alone median "
                 f"{statistics.median(after):.3f} s: {', '.join(f'{t:.3f}' for t in after)}; "
                 f"its CPU s, client (rsync, ssh, the ControlMaster) / server: "
                 f"{', '.join(f'{c:.2f} / {v:.2f}' for c, v in rsync_cpu)})")
    print(lines[-1], flush=True)
    settle(60)
    t0 = time.perf_counter()
    subprocess.run(["rsync", "-a", "-e", " ".join(server.ssh_argv()), f"{burst_root}/b0/",
                    f"{target}/rsync-settled/"], check=True)
    lines.append(f"anchor [{where}]: plain rsync -a of a settled 10,000-file tree (written "
                 f"minutes before): {time.perf_counter() - t0:.3f} s")
    print(lines[-1], flush=True)
    return lines


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
    parser.add_argument("--only", choices=("all", "burst", "watch"), default="all",
                        help="burst: run target 2 (and its rsync -a anchor) only; watch: targets "
                             "1 and 3 and the verification only (--files 300000: the large tree)")
    parser.add_argument("--tmpfs", choices=("off", "on", "both"), default="both",
                        help="target 2's local tree and server copy on the disk (off), on a tmpfs "
                             "(on), or both in the same run (default)")
    parser.add_argument("--no-trace", action="store_true",
                        help="skip the extra traced burst that shows where the time goes")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root: the benchmark creates a throwaway user and an sshd", file=sys.stderr)
        return 2
    compile_package()
    n_files = args.files or (10_000 if args.quick else 100_000)
    idle_s = 15 if args.quick else 60
    base = Path(tempfile.mkdtemp(prefix="bench-mirror-"))
    os.chmod(base, 0o755)
    server = Server(base)
    lines: list[str] = []
    mirrors: list[Mirror] = []
    try:
        server.open_master()
        dest_base = f"{server.name}@127.0.0.1:"
        state = base / "state"
        print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}" +
              (f"; {n_files} watched files; idle window {idle_s} s" if args.only == "all" else ""),
              flush=True)
        if args.only in ("all", "watch"):
            lines += targets_1_and_3(server, base, state, dest_base, n_files, idle_s, mirrors)
        if args.only == "watch":
            args.tmpfs = "none"

        # target 2: bursts, on the disk and/or on a tmpfs
        if args.tmpfs in ("off", "both"):
            disk = base / "disk"
            disk.mkdir()
            lines += burst_target(server, state, disk, server.home, "disk", not args.no_trace)
        if args.tmpfs in ("on", "both"):
            # 4 x 10,000 files of 4 KiB pages (+ inodes) on each side, twice over: room to spare
            with tmpfs_folder(base, 1 << 30) as (folder, what):
                print(f"tmpfs: {what}: {folder}", flush=True)
                local, remote = folder / "local", folder / "server"
                local.mkdir()
                remote.mkdir(mode=0o755)
                os.chown(remote, server.uid, server.gid)
                lines += burst_target(server, state, local, remote, "tmpfs", not args.no_trace)
    finally:
        for m in mirrors:
            with contextlib.suppress(Exception):
                m.stop(flush=False)
        server.close()
        shutil.rmtree(base, ignore_errors=True)
    print("\n== summary (loopback, this machine) ==")
    print("\n".join(lines))
    return 0


def targets_1_and_3(server: Server, base: Path, state: Path, dest_base: str, n_files: int,
                    idle_s: int, mirrors: list[Mirror]) -> list[str]:
    """Targets 3 and 1 (and the lsyncd anchor); the summary lines."""
    lines: list[str] = []
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
    assert m.pid is not None
    pids = tree_pids(m.pid)
    srv_pids = user_pids(server.uid)
    rss = rss_mb(m.pid)
    rss_all = sum(rss_mb(p) for p in pids)
    c0, s0 = cpu_seconds(pids), cpu_seconds(srv_pids)
    each0 = {pid: cpu_seconds([pid]) for pid in pids}
    time.sleep(idle_s)
    c1, s1 = cpu_seconds(pids), cpu_seconds(srv_pids)
    print("idle CPU per process: " + ", ".join(
        f"{' '.join(cmdline(pid)[:2])[-30:]} {(cpu_seconds([pid]) - t) / idle_s * 100:.2f} %"
        for pid, t in each0.items()), flush=True)
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
    # the verification (issue 13): flush() on an idle mirror is one whole-tree pass
    walls, c0, s0 = [], cpu_seconds(pids), cpu_seconds(srv_pids)
    for _ in range(5):
        t0 = time.perf_counter()
        m.flush(600)
        walls.append(time.perf_counter() - t0)
    c1, s1 = cpu_seconds(pids), cpu_seconds(srv_pids)
    wall = statistics.median(walls)
    every = max(60.0, wall / 0.02)
    lines.append(f"verification: a whole-tree pass over {n_files} files takes {wall:.2f} s "
                 f"(flush() on an idle mirror, median of 5; CPU per pass {(c1 - c0) / 5:.2f} s here, "
                 f"{(s1 - s0) / 5:.2f} s on the server); while anything changes it runs every "
                 f"{every:.0f} s: {(c1 - c0 + s1 - s0) / 5 / every * 100:.2f} % of a core")
    print(lines[-1], flush=True)
    m.stop()
    # the 100,000-file trees are not needed any more: gone, so that the bursts later are not
    # measured on a machine busy with (or caches full of) them
    shutil.rmtree(big, ignore_errors=True)
    shutil.rmtree(server.home / "backup/big", ignore_errors=True)

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
    return lines


if __name__ == "__main__":
    sys.exit(main())
