"""mirror() and reverse_forward() over an emulated WAN, against the physical floor, rsync and lsyncd.

Run as root (it creates throwaway users, an sshd of its own on 127.0.0.1 and a runtime sshd, and
removes them all):

    .venv/bin/python bench/bench_wan.py                    # loopback, P1 and P2, full sizes
    .venv/bin/python bench/bench_wan.py --quick            # smaller files, fewer repeats
    .venv/bin/python bench/bench_wan.py --only bigedit --profiles P1
    .venv/bin/python bench/bench_wan.py --only startup --startup-sizes 10000,100000,300000

Every figure runs, per profile, through the same relay (bench/wan.py: P1 = RTT 100 ms, 50 Mbit/s;
P2 = RTT 200 ms, 20 Mbit/s up, 50 down; loopback = no relay) for the mirror and for its anchors
in the same run: ``rsync -a`` over a warm ControlMaster, and lsyncd (default.rsync, delay=0, rsync
through that ControlMaster). The floor is what physics allows: one-way delay + size / bandwidth.
Trees and server copies live on a tmpfs, so the disk is not what is measured. Each figure starts
once the machine is quiet (``sync``, then < 5 % busy over half a second, at most 5 s).

Figures (``--only NAME``):
  sanity    the relay meets its profile: scp of 50 MiB within 10 % of size/bandwidth + handshake
  edit      a 1 KiB edit in a 2,000-file tree, until complete on the server
  burst     2,000 new 4 KiB files in 20 new folders, until all are on the server
  first     first push of a 2,000-file tree (mirror() + flush()) vs rsync -a with a fresh login
  bigedit   a 1 KiB edit written 1 s after a 200 MiB file starts crossing the link
  cut       a 200 MiB file, the link cut for 10 s (and 30 s: ``--cut-seconds``) halfway: time
            after the link returns, and the bytes that crossed the link / the file's size
            (counted at the relay)
  killed    a 200 MiB file, the mirror process SIGKILLed once half of it crossed, mirror() run
            again: time from that call until the server has it, bytes over the link / its size
  growing   a 200 MiB file on the server grows by 1 MiB here (a log, a checkpoint written in
            pieces): time until the server has it, bytes over the link / 1 MiB; rsync -a the same
  reverse   100 MiB read through reverse_forward()'s tunnel vs plain ``ssh -R``
  compress  a 10 MiB text tree and a 10 MiB random tree (P1/P2): the mirror, rsync -a, rsync -az
  startup   loopback only: mirror() (and then flush()) vs rsync -a, fresh (empty server copy) and restart
            (identical server copy), at ``--startup-sizes`` files of 1 KiB, 100 per folder
  link      P1/P2: the link's return and a silent drop. Return: every connection reset and the
            link cut; a file written meanwhile; 5 s later the link is back: when the mirror saw
            the server again (its log), was up again, and the file was on the server. Silent drop:
            an idle mirror, packets vanish, connections stay open: when the mirror left 'up';
            then the same three after the link is back
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as C  # noqa: E402
from bench.wan import P1, P2, Profile, WanRelay  # noqa: E402
from colab_remote import Mirror, mirror, reverse_forward, start_sshd  # noqa: E402

FIGURES = ("sanity", "edit", "burst", "first", "bigedit", "cut", "killed", "growing", "reverse",
           "compress", "startup", "link")
MiB = 1 << 20
TREE_FILES, TREE_SIZE, TREE_PER_DIR = 2000, 4096, 100


@dataclass
class Sizes:
    edits: int = 25
    bursts: int = 3
    firsts: int = 2
    big: int = 200 * MiB
    reverse: int = 100 * MiB
    reverse_runs: int = 1
    sanity: int = 50 * MiB
    compress: int = 10 * MiB
    cuts: tuple[float, ...] = (10.0, 30.0)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(edits=10, bursts=1, firsts=1, big=50 * MiB, reverse=25 * MiB, reverse_runs=1,
                   sanity=20 * MiB, compress=4 * MiB)


@dataclass
class Result:
    figure: str
    link: str
    ours: float | None
    floor: float | None = None
    rsync: float | None = None
    lsyncd: float | None = None
    unit: str = "s"
    notes: list[str] = field(default_factory=list)


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.0f} ms" if unit == "ms" else f"{v:.2f} s"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def say(text: str) -> None:
    print(text, flush=True)


# --- what the figures run on -----------------------------------------------------------------------


class Link:
    """One profile's path to the server: the relay (none on loopback) and a warm ControlMaster."""

    def __init__(self, bench: Bench, profile: Profile | None) -> None:
        self.bench = bench
        self.profile = profile
        self.name = profile.name if profile else "loopback"
        self.relay = WanRelay(bench.server.port, profile) if profile else None
        self.port = self.relay.port if self.relay else bench.server.port
        self.ctl = bench.base / f"cm-{self.name}"
        self.master = bench.server.open_master(self.port, self.ctl)

    def floor(self, nbytes: float, direction: str = "up") -> float | None:
        """delay + size / bandwidth; None on loopback (no floor worth the name)."""
        return self.profile.floor(nbytes, direction) if self.profile else None

    def wire_time(self, nbytes: float) -> float:
        """The floor for timeouts: 0 on loopback."""
        return self.profile.floor(nbytes) if self.profile else 0.0

    @property
    def delay(self) -> float:
        return self.profile.delay("up") if self.profile else 0.0

    def up_bytes(self) -> int | None:
        return self.relay.up_bytes() if self.relay else None

    def rsh(self, warm: bool = True) -> list[str]:
        return self.bench.server.ssh_argv(self.port, self.ctl if warm else None)

    def rewarm(self) -> None:
        """A new ControlMaster when a cut longer than ssh's keepalive ended the old one, or left
        it running with a connection that no longer answers (a command through it must return
        within 15 s)."""
        try:
            answers = subprocess.run([*self.rsh(), f"{self.bench.server.name}@127.0.0.1", "true"],
                                     stdin=subprocess.DEVNULL, capture_output=True,
                                     timeout=15).returncode == 0
        except subprocess.TimeoutExpired:
            answers = False
        if self.master.poll() is not None or not answers:
            self.bench.server.close_master(self.master)
            with contextlib.suppress(FileNotFoundError):
                self.ctl.unlink()
            self.master = self.bench.server.open_master(self.port, self.ctl)

    def rsync_argv(self, src: str, dest: Path, *, warm: bool = True, extra: tuple[str, ...] = ()
                   ) -> list[str]:
        return ["rsync", "-a", *extra, "-e", shlex.join(self.rsh(warm)), src,
                f"{self.bench.server.name}@127.0.0.1:{dest}"]

    def rsync(self, src: str, dest: Path, *, warm: bool = True, extra: tuple[str, ...] = ()) -> float:
        t0 = time.perf_counter()
        subprocess.run(self.rsync_argv(src, dest, warm=warm, extra=extra), check=True)
        return time.perf_counter() - t0

    def mirror(self, local: Path, dest: Path, **kw: Any) -> Mirror:
        kw.setdefault("identity_file", self.bench.server.key)
        kw.setdefault("state_dir", self.bench.state)
        return mirror(local, f"{self.bench.server.name}@127.0.0.1:{dest}", port=self.port,
                      quiet=True, **kw)

    def close(self) -> None:
        self.bench.server.close_master(self.master)
        if self.relay is not None:
            self.relay.close()


class Bench:
    def __init__(self, args: argparse.Namespace, base: Path, fast: Path) -> None:
        self.args = args
        self.sizes = Sizes.quick() if args.quick else Sizes()
        self.base = base
        self.fast = fast
        self.state = base / "state"
        self.server = C.Server(base)
        self.server_root = fast / "server"
        self.server_root.mkdir(mode=0o755)
        os.chown(self.server_root, self.server.uid, self.server.gid)
        self.results: list[Result] = []
        self.cleanup: list[Callable[[], None]] = []
        self._random: dict[tuple[int, int], bytes] = {}

    def local(self, link: Link, name: str) -> Path:
        path = self.fast / "local" / link.name / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def remote(self, link: Link, name: str) -> Path:
        """A folder on the server (made by the server user) for one tool of one figure."""
        path = self.server_root / link.name / name
        for p in reversed([path, *path.parents]):
            if p == self.server_root or self.server_root not in p.parents:
                continue
            if not p.exists():
                p.mkdir(mode=0o755)
                os.chown(p, self.server.uid, self.server.gid)
        return path

    def random_bytes(self, size: int, k: int = 0) -> bytes:
        if (size, k) not in self._random:
            self._random.clear()
            self._random[(size, k)] = os.urandom(size)
        return self._random[(size, k)]

    def add(self, r: Result) -> None:
        self.results.append(r)
        extra = f"; {'; '.join(r.notes)}" if r.notes else ""
        say(f"  [{r.link}] {r.figure}: ours {fmt(r.ours, r.unit)} (floor {fmt(r.floor, r.unit)}, "
            f"rsync {fmt(r.rsync, r.unit)}, lsyncd {fmt(r.lsyncd, r.unit)}; ours/floor "
            f"{ratio(r.ours, r.floor)}, ours/rsync {ratio(r.ours, r.rsync)}, ours/lsyncd "
            f"{ratio(r.ours, r.lsyncd)}){extra}")


# --- measuring helpers -------------------------------------------------------------------------------


def edit_latencies(local_file: Path, server_file: Path, n: int,
                   after_write: Callable[[], Any] | None = None) -> list[float]:
    """Write ``local_file`` n times, 100-200 ms apart; seconds until the server has each content.
    ``after_write`` runs right after each write (the rsync anchor starts its rsync there)."""
    rng = random.Random(4)
    out = []
    for i in range(n):
        # 1 KiB, but never the same size twice in a row (rsync's quick check is size + mtime)
        content = (f"edit {i} {secrets.token_hex(8)} ".encode() + b"e" * 1024)[:1024 + i % 2]
        t0 = time.perf_counter()
        local_file.write_bytes(content)
        running = after_write() if after_write else None
        t1 = C.wait_content(server_file, content, 300)
        if running is not None:
            running.wait(300)
        if t1 is None:
            raise RuntimeError(f"edit {i} did not arrive within 300 s")
        out.append(t1 - t0)
        time.sleep(0.1 + rng.random() * 0.1)
    return out


def write_burst(root: Path) -> None:
    blob = b"b" * TREE_SIZE
    root.mkdir()
    for i in range(TREE_FILES // TREE_PER_DIR):
        d = root / f"dir{i:03d}"
        d.mkdir()
        for j in range(TREE_PER_DIR):
            (d / f"file{j:03d}.bin").write_bytes(blob)


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        view = memoryview(data)
        for i in range(0, len(data), MiB):
            f.write(view[i:i + MiB])


TEMPLATES = ["def {a}_{b}({c}, {d}=None):\n", "    return {a}.{b}({c}, {n})\n", "    {a} = {b}[{n}]\n",
             "    # {a} {b} the {c} of {d}\n", "    if {a} is None:\n        raise ValueError(\"{b} {c}\")\n",
             "    for {a} in {b}.{c}():\n        {d}.append({a})\n", "\n", "class {A}({B}):\n",
             "    {a}: int = {n}\n", "import {a}\n", "from .{a} import {b}, {c}\n"]


def text_tree(root: Path, total: int, seed: int) -> int:
    """Source-like text in 256 KiB files (zlib -6 packs it about 3.5:1, as it does real Python
    source); the file count."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 10)))
             for _ in range(400)]
    root.mkdir()
    n = 0
    per_file = 256 * 1024
    while n * per_file < total:
        lines, size = [], 0
        while size < per_file:
            w = [rng.choice(words) for _ in range(4)]
            line = rng.choice(TEMPLATES).format(a=w[0], b=w[1], c=w[2], d=w[3], A=w[0].title(),
                                                B=w[1].title(), n=rng.randint(0, 99))
            lines.append(line)
            size += len(line)
        (root / f"text{n:03d}.py").write_text("".join(lines)[:per_file])
        n += 1
    return n


def random_tree(root: Path, total: int, count: int) -> None:
    root.mkdir()
    per = total // count
    for i in range(count):
        (root / f"blob{i:03d}.bin").write_bytes(os.urandom(per))


def tree_bytes(root: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)


def wait_tree(server: Path, files: int, size: int, timeout: float) -> float | None:
    """time.perf_counter() when the server folder holds ``files`` files of ``size`` bytes in all."""
    deadline = time.perf_counter() + timeout
    while True:
        with contextlib.suppress(OSError):
            if C.count_files(server) >= files and tree_bytes_final(server) >= size:
                return time.perf_counter()
        if time.perf_counter() > deadline:
            return None
        time.sleep(0.02)


def tree_bytes_final(root: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs
               if not f.startswith("."))


# --- the figures ---------------------------------------------------------------------------------


def sanity(b: Bench, link: Link) -> None:
    """scp of a file through the relay against size / bandwidth + the handshake (an empty scp)."""
    assert link.profile is not None and link.relay is not None
    src = b.fast / "sanity.bin"
    empty = b.fast / "empty.bin"
    write_file(src, b.random_bytes(b.sizes.sanity))
    empty.write_bytes(b"")
    dest = b.remote(link, "sanity")
    argv = ["scp", "-q", "-P", str(link.port), *b.server.ssh_argv()[3:]]
    C.settle()

    def scp(path: Path) -> float:
        t0 = time.perf_counter()
        subprocess.run([*argv, str(path), f"{b.server.name}@127.0.0.1:{dest}/"], check=True)
        return time.perf_counter() - t0

    handshake = statistics.median([scp(empty) for _ in range(3)])
    cpu0 = relay_cpu(link.relay.pid)
    elapsed = scp(src)
    cpu = relay_cpu(link.relay.pid) - cpu0
    rate = link.profile.rate("up")
    assert rate is not None
    floor = b.sizes.sanity / rate + handshake
    ok = "ok" if elapsed <= 1.10 * floor else "OUTSIDE 10 %"
    b.add(Result("sanity", link.name, elapsed, floor, unit="s", notes=[
        f"scp {b.sizes.sanity // MiB} MiB; floor = {b.sizes.sanity // MiB} MiB / "
        f"{link.profile.up_mbit:g} Mbit/s + handshake {handshake:.2f} s "
        f"({handshake / link.profile.rtt:.1f} RTT, an empty scp); within 10 %: {ok}; relay CPU "
        f"{cpu:.2f} s ({cpu / elapsed * 100:.0f} % of a core)"]))
    src.unlink()
    shutil.rmtree(dest, ignore_errors=True)


def relay_cpu(pid: int) -> float:
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / C.TICK
    return 0.0


class Trees:
    """The mirror's 2,000-file tree, lsyncd's copy, and the rsync anchor's copy of one link."""

    def __init__(self, b: Bench, link: Link, need_lsyncd: bool) -> None:
        self.b, self.link = b, link
        self.ours, self.ours_server = b.local(link, "ours"), b.remote(link, "ours")
        self.rs, self.rs_server = b.local(link, "rsync"), b.remote(link, "rsync")
        C.make_tree(self.ours, TREE_FILES, TREE_PER_DIR, TREE_SIZE)
        C.make_tree(self.rs, TREE_FILES, TREE_PER_DIR, TREE_SIZE)
        (self.ours / "edit.txt").write_text("start\n")
        (self.rs / "edit.txt").write_text("start\n")
        self.m = link.mirror(self.ours, self.ours_server)
        self.m.flush(300)
        link.rsync(f"{self.rs}/", self.rs_server)
        self.lsyncd: C.Lsyncd | None = None
        self.ls = b.local(link, "lsyncd")
        self.ls_server = b.remote(link, "lsyncd")
        if need_lsyncd and shutil.which("lsyncd"):
            C.make_tree(self.ls, TREE_FILES, TREE_PER_DIR, TREE_SIZE)
            (self.ls / "edit.txt").write_text("start\n")
            self.lsyncd = C.Lsyncd(b.base, link.name, self.ls,
                                   f"{b.server.name}@127.0.0.1:{self.ls_server}", link.rsh())
            if C.wait_count(self.ls_server, TREE_FILES + 1, 300) is None:
                raise RuntimeError("lsyncd's first sync did not arrive:\n" + C.tail(self.lsyncd.log))
            time.sleep(1)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.m.stop(flush=False)
        if self.lsyncd is not None:
            self.lsyncd.stop()


def edit(b: Bench, link: Link, t: Trees) -> None:
    n = b.sizes.edits
    C.settle()
    ours = edit_latencies(t.ours / "edit.txt", t.ours_server / "edit.txt", n)
    C.settle()
    lsy = (edit_latencies(t.ls / "edit.txt", t.ls_server / "edit.txt", n)
           if t.lsyncd is not None else [])
    C.settle()
    argv = link.rsync_argv(f"{t.rs}/", t.rs_server)
    rs = edit_latencies(t.rs / "edit.txt", t.rs_server / "edit.txt", n,
                        after_write=lambda: subprocess.Popen(argv))
    b.add(Result("edit", link.name, median(ours), link.floor(1024), median(rs), median(lsy), "ms",
                 [f"p95 ours {p95(ours) * 1000:.0f} ms, rsync {p95(rs) * 1000:.0f} ms"
                  + (f", lsyncd {p95(lsy) * 1000:.0f} ms" if lsy else "") + f"; n={n}"]))


def burst(b: Bench, link: Link, t: Trees) -> None:
    ours, rs, lsy = [], [], []
    for k in range(b.sizes.bursts):
        C.settle()
        t0 = time.perf_counter()
        write_burst(t.ours / f"burst{k}")
        done = C.wait_count(t.ours_server / f"burst{k}", TREE_FILES, 600)
        if done is not None:
            ours.append(done - t0)
        t.m.flush(300)
        if t.lsyncd is not None:
            C.settle()
            t0 = time.perf_counter()
            write_burst(t.ls / f"burst{k}")
            done = C.wait_count(t.ls_server / f"burst{k}", TREE_FILES, 600)
            if done is not None:
                lsy.append(done - t0)
        C.settle()
        unwatched = b.local(link, "unwatched")
        t0 = time.perf_counter()
        write_burst(unwatched / f"burst{k}")
        link.rsync(f"{unwatched}/burst{k}/", t.rs_server / f"burst{k}")
        rs.append(time.perf_counter() - t0)
    b.add(Result("burst", link.name, median(ours), link.floor(TREE_FILES * TREE_SIZE), median(rs),
                 median(lsy), "s", [f"runs ours {', '.join(f'{v:.2f}' for v in ours)}; "
                                    f"rsync = the burst, then one rsync -a"]))


def first(b: Bench, link: Link) -> None:
    ours, rs = [], []
    for k in range(b.sizes.firsts):
        src = b.local(link, f"first{k}")
        C.make_tree(src, TREE_FILES, TREE_PER_DIR, TREE_SIZE)
        dest = b.remote(link, f"first{k}-ours")
        C.settle()
        t0 = time.perf_counter()
        m = link.mirror(src, dest)
        try:
            m.flush(600)
            ours.append(time.perf_counter() - t0)
        finally:
            m.stop(flush=False)
        C.settle()
        rs.append(link.rsync(f"{src}/", b.remote(link, f"first{k}-rsync"), warm=False))
    b.add(Result("first", link.name, median(ours), link.floor(TREE_FILES * TREE_SIZE), median(rs),
                 None, "s", [f"runs ours {', '.join(f'{v:.2f}' for v in ours)}, rsync "
                             f"{', '.join(f'{v:.2f}' for v in rs)} (rsync -a with a fresh login)"]))


def bigedit(b: Bench, link: Link, t: Trees) -> None:
    """A 1 KiB edit written 1 s after a big file's first bytes cross the link (on loopback: 1 s
    after the big file was written): does the edit wait for the whole big file?"""
    size = b.sizes.big
    data = b.random_bytes(size)
    timeout = 3 * link.wire_time(size) + 120
    relay = link.relay

    def run(local: Path, server: Path, label: str) -> tuple[float | None, float | None, float]:
        C.settle()
        content = b"after the big file " + secrets.token_hex(8).encode() + b"e" * 990
        base = relay.up_bytes() if relay else 0
        t0 = time.perf_counter()
        write_file(local / f"big-{label}.bin", data)
        if relay is not None and not C.wait_until(lambda: relay.up_bytes() - base > MiB, timeout,
                                                  0.005):
            raise RuntimeError("the big file never started crossing the link")
        started = time.perf_counter() - t0
        time.sleep(1)
        t1 = time.perf_counter()
        (local / "edit.txt").write_bytes(content)
        arrived = C.wait_content(server / "edit.txt", content, timeout)
        big = C.wait_size(server / f"big-{label}.bin", size, timeout)
        return ((None if arrived is None else arrived - t1), (None if big is None else big - t0),
                started)

    ours, ours_big, ours_start = run(t.ours, t.ours_server, "ours")
    t.m.flush(timeout)
    lsy = lsy_big = None
    if t.lsyncd is not None:
        lsy, lsy_big, _ = run(t.ls, t.ls_server, "lsyncd")
    b.add(Result("bigedit", link.name, ours, link.floor(1024), None, lsy, "s", [
        f"the {size // MiB} MiB file on the wire {ours_start:.2f} s after it was written; complete "
        f"after ours {fmt(ours_big, 's')}, lsyncd {fmt(lsy_big, 's')} (floor "
        f"{fmt(link.floor(size), 's')}); rsync: one rsync carries both"]))
    for path in (t.ours / "big-ours.bin", t.ls / "big-lsyncd.bin"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    t.m.flush(300)


def cut(b: Bench, link: Link, t: Trees, pause: float) -> None:
    """A big file, the link cut for ``pause`` s once half of it crossed: seconds after the link
    returns until the server has it, and the bytes that crossed / its size."""
    assert link.relay is not None
    size = b.sizes.big
    data = b.random_bytes(size, 1)
    timeout = 4 * link.wire_time(size) + 180 + pause

    relay = link.relay

    def run(start: Callable[[], Any], server_file: Path) -> tuple[float | None, float, float]:
        """seconds after the link returns, bytes over the link / size, seconds before the cut"""
        C.settle()
        base = relay.up_bytes()
        t0 = time.perf_counter()
        proc = start()
        if not C.wait_until(lambda: relay.up_bytes() - base >= size // 2
                            or proc is not None and proc.poll() is not None, timeout, 0.01) \
                or relay.up_bytes() - base < size // 2:
            ended = proc.poll() if proc is not None else None
            raise RuntimeError(f"half the file never crossed the link "
                               f"({'timeout' if ended is None else f'exit {ended}'})")
        before = time.perf_counter() - t0
        relay.cut()
        time.sleep(pause)
        relay.restore()
        back = time.perf_counter()
        done = C.wait_size(server_file, size, timeout, 0.02)
        if proc is not None:
            proc.wait(timeout)
        time.sleep(1)  # what still crosses (a second pass, say) counts too
        sent = relay.up_bytes() - base
        return (None if done is None else done - back), sent / size, before

    local = t.ours / "cut.bin"
    ours, ours_bytes, before = run(lambda: write_file(local, data), t.ours_server / "cut.bin")
    with contextlib.suppress(Exception):
        t.m.flush(timeout)
    src = b.local(link, "cut-rsync")
    write_file(src / "cut.bin", data)
    link.rewarm()
    rs, rs_bytes, _ = run(lambda: subprocess.Popen(link.rsync_argv(f"{src}/cut.bin", t.rs_server)),
                          t.rs_server / "cut.bin")
    ok = hashlib.sha256((t.ours_server / "cut.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
    b.add(Result(f"cut-{pause:g}s", link.name, ours, link.floor(size - size // 2), rs, None, "s", [
        f"cut {pause:g} s after {before:.1f} s; bytes over the link / file size: ours "
        f"{ours_bytes:.2f}, rsync {rs_bytes:.2f}; server copy intact: {ok}; floor = delay + "
        f"the half left / bandwidth; rsync = rsync -a over the warm ControlMaster, same cut"]))
    local.unlink()
    for done in (src / "cut.bin", t.rs_server / "cut.bin"):  # the next cut's rsync starts afresh
        done.unlink(missing_ok=True)                        # (the same bytes: nothing to send)
    t.m.flush(300)


def killed(b: Bench, link: Link, t: Trees) -> None:
    """A big file, the mirror process SIGKILLed once half of it crossed, then mirror() run again
    (a new kernel): seconds from that call until the server has the file, and the bytes that
    crossed / its size."""
    assert link.relay is not None
    relay = link.relay
    size = b.sizes.big
    data = b.random_bytes(size, 3)
    timeout = 4 * link.wire_time(size) + 180
    local, server_file = t.ours / "killed.bin", t.ours_server / "killed.bin"
    C.settle()
    base = relay.up_bytes()
    write_file(local, data)
    if not C.wait_until(lambda: relay.up_bytes() - base >= size // 2, timeout, 0.01):
        raise RuntimeError("half the file never crossed the link")
    pid = t.m.pid
    assert pid is not None
    os.kill(pid, 9)
    C.wait_until(lambda: not C.pid_alive(pid), 10)
    t0 = time.perf_counter()
    t.m = link.mirror(t.ours, t.ours_server)
    returned = time.perf_counter() - t0
    done = C.wait_size(server_file, size, timeout, 0.02)
    time.sleep(1)
    sent = (relay.up_bytes() - base) / size
    ok = done is not None and hashlib.sha256(server_file.read_bytes()).digest() == \
        hashlib.sha256(data).digest()
    b.add(Result("killed", link.name, None if done is None else done - t0,
                 link.floor(size - size // 2), None, None, "s", [
                     f"mirror() re-run returned after {returned:.2f} s; bytes over the link / file "
                     f"size {sent:.2f} (the re-run's first pass over the 2,000-file tree included); "
                     f"server copy intact: {ok}; floor = delay + the half left / bandwidth"]))
    local.unlink()
    t.m.flush(300)


def growing(b: Bench, link: Link, t: Trees) -> None:
    """A big file on the server that grows by 1 MiB here: seconds until the server has it, and
    the bytes that crossed / 1 MiB (ours, then rsync -a over the warm ControlMaster)."""
    relay = link.relay
    size, extra = b.sizes.big, MiB
    data, more = b.random_bytes(size, 4), os.urandom(extra)
    timeout = 4 * link.wire_time(size) + 180

    def run(local: Path, server_file: Path, after: Callable[[], Any]) -> tuple[float | None, float | None]:
        C.settle()
        base = relay.up_bytes() if relay else 0
        t0 = time.perf_counter()
        with open(local, "ab") as f:
            f.write(more)
        after()
        done = C.wait_size(server_file, size + extra, timeout, 0.02)
        time.sleep(1)  # what still crosses counts too
        sent = (relay.up_bytes() - base) / extra if relay else None
        return (None if done is None else done - t0), sent

    local = t.ours / "grow.bin"
    write_file(local, data)
    t.m.flush(timeout)
    ours, ours_bytes = run(local, t.ours_server / "grow.bin", lambda: None)
    t.m.flush(timeout)
    src = b.local(link, "grow-rsync")
    write_file(src / "grow.bin", data)
    link.rsync(f"{src}/grow.bin", t.rs_server)
    rs, rs_bytes = run(src / "grow.bin", t.rs_server / "grow.bin",
                       lambda: link.rsync(f"{src}/grow.bin", t.rs_server))
    ok = hashlib.sha256((t.ours_server / "grow.bin").read_bytes()).digest() == \
        hashlib.sha256(data + more).digest()
    b.add(Result("growing", link.name, ours, link.floor(extra), rs, None, "s", [
        f"{size // MiB} MiB + 1 MiB; bytes over the link / 1 MiB: ours "
        f"{'-' if ours_bytes is None else f'{ours_bytes:.2f}'}, rsync -a "
        f"{'-' if rs_bytes is None else f'{rs_bytes:.2f}'}; server copy intact: {ok}"]))
    local.unlink()
    t.m.flush(300)


class Runtime:
    """The runtime's sshd (start_sshd) with a throwaway login user, for the reverse tunnel."""

    def __init__(self, b: Bench) -> None:
        self.b = b
        self.user, _ = C.make_user("crwr")
        self.state = b.base / "rt"
        self.sshd = start_sshd(C.free_port(), user=self.user, authorized_keys=f"{b.server.key}.pub",
                               state_dir=self.state, listen_address="127.0.0.1", quiet=True)
        self.known_hosts = b.base / "runtime_known_hosts"

    def read(self, port: int, size: int) -> float:
        """Seconds from the first byte to the last of ``size`` bytes read through ``port``."""
        argv = ["ssh", "-p", str(port), "-i", str(self.b.server.key), "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=accept-new", "-o", "HostKeyAlias=bench-runtime",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                f"{self.user}@127.0.0.1", f"head -c {size} /dev/zero"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        got, first_at = 0, None
        while True:
            chunk = proc.stdout.read1(1 << 20)  # type: ignore[attr-defined]
            if not chunk:
                break
            if first_at is None:
                first_at = time.perf_counter()
            got += len(chunk)
        end = time.perf_counter()
        proc.wait(30)
        if got != size or first_at is None:
            raise RuntimeError(f"read {got} of {size} bytes through port {port}")
        return end - first_at

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sshd.stop()
        C.remove_user(self.user)


def reverse(b: Bench, link: Link, rt: Runtime) -> None:
    size = b.sizes.reverse
    tunnel = reverse_forward(f"{b.server.name}@127.0.0.1", port=link.port,
                             remote_port=C.free_port(), local_port=rt.sshd.port,
                             identity_file=b.server.key, state_dir=rt.state, quiet=True)
    plain_port = C.free_port()
    plain = subprocess.Popen([*b.server.ssh_argv(link.port), "-N", "-o", "ExitOnForwardFailure=yes",
                              "-R", f"{plain_port}:127.0.0.1:{rt.sshd.port}",
                              f"{b.server.name}@127.0.0.1"], stdin=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        for port in (tunnel.remote_port, plain_port):
            if not C.wait_until(lambda p=port: C.ssh_banner(p, 2) is not None,  # type: ignore[misc]
                                30, 0.1):
                raise RuntimeError(f"the forward on port {port} did not come up")
        ours, pl = [], []
        for k in range(b.sizes.reverse_runs):
            for which in ((0, 1) if k % 2 == 0 else (1, 0)):
                C.settle()
                if which == 0:
                    ours.append(rt.read(tunnel.remote_port, size))
                else:
                    pl.append(rt.read(plain_port, size))
    finally:
        tunnel.stop()
        plain.terminate()
        plain.wait(10)
    mo, mp = median(ours), median(pl)
    assert mo is not None and mp is not None
    rate = link.profile.rate("up") if link.profile else None
    b.add(Result("reverse", link.name, mo, size / rate if rate else None, mp, None, "s", [
        f"{size // MiB} MiB: ours {size / mo / 1e6:.1f} MB/s, plain ssh -R {size / mp / 1e6:.1f} MB/s "
        f"(ours / plain throughput {mp / mo:.2f}); first byte to last (floor: size / bandwidth); "
        f"the rsync column is plain ssh -R"]))


def compress(b: Bench, link: Link, t: Trees) -> None:
    assert link.relay is not None
    total = b.sizes.compress
    for kind in ("text", "random"):
        def make(root: Path, kind: str = kind) -> None:
            if kind == "text":
                text_tree(root, total, 7)
            else:
                random_tree(root, total, max(1, total // (256 * 1024)))

        sample = b.local(link, f"sample-{kind}")
        shutil.rmtree(sample)
        make(sample)
        files, size = C.count_files(sample), tree_bytes(sample)
        blob = b"".join(p.read_bytes() for p in sorted(sample.iterdir()))
        zratio = len(blob) / len(zlib.compress(blob, 6))
        C.settle()
        base = link.relay.up_bytes()
        t0 = time.perf_counter()
        shutil.copytree(sample, t.ours / kind)
        done = wait_tree(t.ours_server / kind, files, size, 600)
        ours = None if done is None else done - t0
        time.sleep(0.5)
        ours_wire = link.relay.up_bytes() - base
        t.m.flush(300)
        anchors = {}
        for label, extra in (("rsync -a", ()), ("rsync -az", ("-z",))):
            C.settle()
            base = link.relay.up_bytes()
            dest = b.remote(link, f"compress-{kind}-{label[-1]}")
            secs = link.rsync(f"{sample}/", dest, extra=extra)
            anchors[label] = (secs, link.relay.up_bytes() - base)
        b.add(Result(f"compress-{kind}", link.name, ours, link.floor(size), anchors["rsync -a"][0],
                     None, "s", [
                         f"{files} files, {size / MiB:.1f} MiB (zlib -6 ratio {zratio:.1f}); bytes "
                         f"on the link / size: ours {ours_wire / size:.2f}, rsync -a "
                         f"{anchors['rsync -a'][1] / size:.2f}, rsync -az "
                         f"{anchors['rsync -az'][1] / size:.2f} ({anchors['rsync -az'][0]:.2f} s)"]))
        shutil.rmtree(sample)


def _log_time(line: str) -> float | None:
    """The wall-clock time of one line of the mirror's log (``2026-01-31 12:00:00,123 ...``)."""
    with contextlib.suppress(ValueError, IndexError):
        stamp, ms = line[:23].split(",")
        return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000
    return None


def _back(m: Mirror, link: Link, server_file: Path, content: bytes) -> tuple[float | None, ...]:
    """Restore the link; seconds until the mirror saw the server again (its log line: None where
    it writes none), was up again, and ``server_file`` held ``content``."""
    assert link.relay is not None
    t0, w0 = time.perf_counter(), time.time()
    link.relay.restore()
    up = C.wait_until(lambda: m.status().get("state") == "up", 120, interval=0.005)
    t_up = time.perf_counter() - t0 if up else None
    arrived = C.wait_content(server_file, content, 120)
    seen = [t for line in m.logs(400).splitlines() if "the server answers again" in line
            and (t := _log_time(line)) is not None and t >= w0 - 0.01]
    return (seen[0] - w0 if seen else None), t_up, (arrived - t0 if arrived else None)


def link_figure(b: Bench, link: Link) -> None:
    """The link's return after a cut, and a silent drop (see the module docstring)."""
    assert link.relay is not None
    src = b.local(link, "link")
    C.make_tree(src, 200, 100, 1024)
    dest = b.remote(link, "link-ours")
    m = link.mirror(src, dest)
    try:
        m.flush(120)
        C.settle()
        link.relay.cut()
        link.relay.reset()
        during = b"written while the link was down\n"
        (src / "during.txt").write_bytes(during)  # (an idle mirror that never looks would not see it)
        C.wait_until(lambda: m.status().get("state") != "up", 60, interval=0.01)
        time.sleep(5)
        seen, up, arrived = _back(m, link, dest / "during.txt", during)
        b.add(Result("link-return", link.name, seen if seen is not None else up, None, None, None, "s",
                     [f"after a reset and 5 s cut: server seen again {fmt(seen, 's')}, mirror up "
                      f"{fmt(up, 's')}, the file written meanwhile on the server {fmt(arrived, 's')} "
                      "after the link returned"]))
        m.flush(120)
        C.settle()
        t0 = time.perf_counter()
        link.relay.cut()
        left = C.wait_until(lambda: m.status().get("state") != "up", 60, interval=0.01)
        noticed = time.perf_counter() - t0 if left else None
        after = b"written after a silent drop\n"
        (src / "after.txt").write_bytes(after)
        time.sleep(max(0.0, 20 - (time.perf_counter() - t0)))
        seen, up, arrived = _back(m, link, dest / "after.txt", after)
        b.add(Result("silent-drop", link.name, noticed, None, None, None, "s",
                     [f"an idle mirror left 'up' {fmt(noticed, 's')} after packets vanished (none "
                      f"within 60 s: '-'); link back 20 s after the drop: server seen again "
                      f"{fmt(seen, 's')}, mirror up {fmt(up, 's')}, the file written meanwhile on the "
                      f"server {fmt(arrived, 's')} after that"]))
    finally:
        link.relay.restore()
        m.stop(flush=False)


def startup(b: Bench, sizes: list[int]) -> None:
    """Loopback, tmpfs: mirror() (its first pass on the server) against rsync -a (fresh login),
    fresh and restart; mirror() then flush() beside it. Fresh: a new runtime (a state folder of
    its own) and an empty server copy; the server has this version's agent, as after any earlier
    runtime's first start. The very first contact (a server without the agent: the set-up
    installs it) is shown at the first size. Each figure is the median of runs interleaved with
    rsync's (5 at 10,000 files, 3 at 100,000, 2 at 300,000: start-ups of a second vary with the
    machine's load by more than the gaps measured), the runs' range in the notes."""
    link = Link(b, None)

    def timed(src: Path, dest: Path, **kw: Any) -> tuple[float, float]:
        """mirror(src, dest): (until it returned, until flush() returned)"""
        C.settle(15)
        t0 = time.perf_counter()
        m = link.mirror(src, dest, timeout=3600, **kw)
        returned = time.perf_counter() - t0
        m.flush(3600)
        flushed = time.perf_counter() - t0
        m.stop()
        return returned, flushed

    def rsync(src: Path, dest: Path) -> float:
        C.settle(15)
        return link.rsync(f"{src}/", dest, warm=False)

    def add(figure: str, ours: list[tuple[float, float]], theirs: list[float], note: str) -> None:
        mid, rs = median([o[0] for o in ours]), median(theirs)
        assert mid is not None and rs is not None
        flushed = median([o[1] for o in ours])
        b.add(Result(figure, "loopback", mid, None, rs, None, "s", [
            f"{note}; median of {len(ours)} (ours {min(o[0] for o in ours):.2f}-"
            f"{max(o[0] for o in ours):.2f} s, rsync {min(theirs):.2f}-{max(theirs):.2f} s); "
            f"mirror() then flush(): {flushed:.2f} s ({ratio(flushed, rs)})"]))

    try:
        for n in sizes:
            src = b.fast / f"startup-{n}"
            t0 = time.perf_counter()
            C.make_tree(src, n, 100, 1024)
            say(f"  [startup] made {n} files in {time.perf_counter() - t0:.1f} s")
            runs = max(2, min(5, 300_000 // n))
            rs_fresh: list[float] = []
            first: list[tuple[float, float]] = []
            fresh: list[tuple[float, float]] = []
            for i in range(runs):
                dest_r = b.remote(link, f"startup-{n}-rsync-{i}")
                rs_fresh.append(rsync(src, dest_r))
                if i < runs - 1:
                    shutil.rmtree(dest_r)
                if n == sizes[0]:
                    shutil.rmtree(b.server.home / ".colab-remote", ignore_errors=True)
                    dest_f = b.remote(link, f"startup-{n}-first-{i}")
                    first.append(timed(src, dest_f, state_dir=b.base / f"state-first-{i}"))
                    shutil.rmtree(dest_f)
                dest_m = b.remote(link, f"startup-{n}-ours-{i}")
                state = b.base / f"state-{n}-{i}"  # a new runtime
                fresh.append(timed(src, dest_m, state_dir=state))
                if i < runs - 1:
                    shutil.rmtree(dest_m)
            if first:
                add(f"startup-{n}-first-contact", first, rs_fresh,
                    "a server without this version's agent: the set-up installs it (once per "
                    "server and version)")
            # mirror() returns once its first pass is on the server (rsync's whole job); flush()
            # then verifies with a second whole-tree pass (issue 13), shown beside it
            add(f"startup-{n}-fresh", fresh, rs_fresh, "a new runtime, an empty server copy")
            rs_again: list[float] = []
            again: list[tuple[float, float]] = []
            for _ in range(runs):
                rs_again.append(rsync(src, dest_r))
                again.append(timed(src, dest_m, state_dir=state))
            add(f"startup-{n}-restart", again, rs_again,
                "restart over an identical server copy; rsync -a no-op")
            if n == sizes[0]:  # the default way: the password once, then the mirror's own key
                pw = dict(identity_file=None, password=b.server.password)
                link.mirror(src, dest_m, timeout=3600, **pw).stop()
                keyed = [timed(src, dest_m, password=None, identity_file=None)
                         for _ in range(runs)]
                add(f"startup-{n}-restart-key", keyed, rs_again,
                    "restart of a mirror set up with the password (restricted=True, the "
                    "default): its own key on record; rsync -a no-op")
            for p in (src, dest_m, dest_r):
                shutil.rmtree(p, ignore_errors=True)
    finally:
        link.close()


# --- the run -------------------------------------------------------------------------------------


def run_link(b: Bench, profile: Profile | None, only: set[str], rt: Runtime | None) -> None:
    def want(name: str) -> bool:
        return name in only

    link = Link(b, profile)
    say(f"== {profile.describe() if profile else 'loopback (no relay)'}; port {link.port}")
    trees: Trees | None = None
    try:
        if profile is not None and want("sanity"):
            sanity(b, link)
        needs_trees = [f for f in ("edit", "burst", "bigedit", "cut", "killed", "growing",
                                   "compress") if want(f)
                       and (profile is not None or f not in ("cut", "killed", "compress"))]
        if needs_trees:
            trees = Trees(b, link, need_lsyncd=bool({"edit", "burst", "bigedit"} & set(needs_trees)))
        if trees is not None and want("edit"):
            edit(b, link, trees)
        if trees is not None and want("burst"):
            burst(b, link, trees)
        if want("first"):
            first(b, link)
        if trees is not None and profile is not None and want("compress"):
            compress(b, link, trees)
        if rt is not None and want("reverse"):
            reverse(b, link, rt)
        if trees is not None and want("bigedit"):
            bigedit(b, link, trees)
        if trees is not None and profile is not None and want("cut"):
            for pause in b.sizes.cuts:
                cut(b, link, trees, pause)
        if trees is not None and profile is not None and want("killed"):
            killed(b, link, trees)
        if trees is not None and want("growing"):
            growing(b, link, trees)
        if profile is not None and want("link"):
            link_figure(b, link)
    finally:
        if trees is not None:
            trees.close()
        link.close()
        shutil.rmtree(b.fast / "local" / link.name, ignore_errors=True)
        shutil.rmtree(b.server_root / link.name, ignore_errors=True)


WORK = {
    "sanity": "relay sanity: scp through the link vs size/bandwidth + handshake",
    "edit": "1 KiB edit in a 2,000-file tree, until complete on the server",
    "burst": "2,000 x 4 KiB burst",
    "first": "first push of a 2,000-file tree (rsync: fresh login)",
    "bigedit": "1 KiB edit written 1 s after a big file starts",
    "cut-10s": "big file, link cut 10 s halfway: done after the link returns",
    "cut-30s": "big file, link cut 30 s halfway (beyond ssh's 15 s keepalive): done after return",
    "killed": "big file, mirror process killed halfway, mirror() re-run: done after the re-run",
    "growing": "big file grows by 1 MiB: done after the append (rsync column: rsync -a)",
    "reverse": "read through the reverse tunnel (rsync column: plain ssh -R)",
    "compress-text": "text tree (rsync column: rsync -a)",
    "compress-random": "random tree (rsync column: rsync -a)",
    "link-return": "the link's return noticed (reset + 5 s cut)",
    "silent-drop": "a silent drop noticed (idle mirror)",
}


def report(b: Bench, links: list[str]) -> None:
    say("\n== summary: ours (floor; rsync; lsyncd) per link ==")
    figures: list[str] = []
    for r in b.results:
        if r.figure not in figures:
            figures.append(r.figure)
    say("| work (runtime -> server) | " + " | ".join(links) + " |")
    say("|---|" + "---|" * len(links))
    for f in figures:
        cells = []
        for name in links:
            found = [x for x in b.results if x.figure == f and x.link == name]
            if not found:
                cells.append("")
                continue
            r = found[0]
            parts = [f"floor {fmt(r.floor, r.unit)}"] if r.floor is not None else []
            if r.rsync is not None:
                parts.append(f"rsync {fmt(r.rsync, r.unit)} ({ratio(r.ours, r.rsync)})")
            if r.lsyncd is not None:
                parts.append(f"lsyncd {fmt(r.lsyncd, r.unit)} ({ratio(r.ours, r.lsyncd)})")
            cells.append(f"**{fmt(r.ours, r.unit)}** ({'; '.join(parts)})")
        say(f"| {WORK.get(f, f)} | " + " | ".join(cells) + " |")
    say("\nnotes:")
    for r in b.results:
        for note in r.notes:
            say(f"  [{r.link}] {r.figure}: {note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="50 MiB big files, 10 edits, one run of each burst and first push")
    parser.add_argument("--only", help=f"these figures only (comma-separated: {', '.join(FIGURES)})")
    parser.add_argument("--profiles", default="loopback,P1,P2",
                        help="comma-separated: loopback, P1, P2 (default all three)")
    parser.add_argument("--startup-sizes", default="10000",
                        help="file counts for the start-up figure (the issue's: 10000,100000,300000)")
    parser.add_argument("--big-mb", type=int, help="size of the big files in MiB")
    parser.add_argument("--cut-seconds", default="10,30",
                        help="how long the link is cut halfway through the big file (default "
                             "10 s, the issue's, and 30 s, longer than ssh's keepalive allows)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root: the benchmark creates throwaway users and sshd servers", file=sys.stderr)
        return 2
    C.exit_on_sigterm()
    C.compile_package()
    profiles: list[Profile | None] = []
    names = [p.strip() for p in args.profiles.split(",") if p.strip()]
    for name in names:
        if name not in ("loopback", "P1", "P2"):
            parser.error(f"unknown profile {name!r}")
        profiles.append({"loopback": None, "P1": P1, "P2": P2}[name])
    sizes = [int(x) for x in args.startup_sizes.split(",") if x.strip()]
    only = set(args.only.split(",")) if args.only else set(FIGURES)
    if only - set(FIGURES):
        parser.error(f"unknown figures {sorted(only - set(FIGURES))}; known: {', '.join(FIGURES)}")
    base = Path(tempfile.mkdtemp(prefix="bench-wan-"))
    os.chmod(base, 0o755)
    started = time.monotonic()
    need = (4 * (args.big_mb or 200) * MiB + 6 * max(sizes, default=0) * 4096 + (1 << 30))
    b: Bench | None = None
    rt: Runtime | None = None
    try:
        with C.tmpfs_folder(base, need) as fast:
            b = Bench(args, base, fast)
            if args.big_mb:
                b.sizes.big = args.big_mb * MiB
            b.sizes.cuts = tuple(float(x) for x in args.cut_seconds.split(",") if x.strip())
            say(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; trees on "
                f"{fast}; {'quick' if args.quick else 'full'} sizes: {b.sizes}")
            if "reverse" in only:
                rt = Runtime(b)
            for profile in profiles:
                if only - {"startup"}:
                    run_link(b, profile, only, rt)
            if "startup" in only and "loopback" in names:
                say("== start-up, loopback, tmpfs")
                startup(b, sizes)
    finally:
        if rt is not None:
            rt.close()
        if b is not None:
            b.server.close()
        if args.keep:
            say(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    assert b is not None
    report(b, [n for n in names])
    say(f"\n({time.monotonic() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
