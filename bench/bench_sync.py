"""Benchmark of sync() (issue 16): both directions' latency, unison beside it, the laptop at idle.

Run as root (it creates two throwaway users, a runtime sshd, a stand-in server and the tunnel
between them on 127.0.0.1, as the demo does, and removes them all); the laptop side is this
process's user with an ssh config file of the bench's own (``ssh -F``: ProxyJump through the
server, as ``tunnel.ssh_config()`` prints it):

    .venv/bin/python bench/bench_sync.py             # 100,000 files for the idle figures, 60 s idle
    .venv/bin/python bench/bench_sync.py --quick     # 10,000 files, 15 s idle
    .venv/bin/python bench/bench_sync.py --no-unison
    .venv/bin/python bench/bench_sync.py --wan P2 --wan-only    # one WAN profile, nothing else

Figures:
1. a small file written on the laptop -> complete in the runtime, and the other way round: median
   and p95 of 50 edits (100-200 ms apart), each direction; unison 2.5x (``-repeat watch``, the
   same ssh alias) in the same run, as ratios. mutagen is not installable here (only from its own
   release downloads, no package registry has it), so it is not measured.
2. the first fill of an empty runtime folder from a laptop folder of N files;
3. the laptop's sync process at idle while watching N files: CPU over the idle time (the sync
   process, its ssh channel and its ssh master), RSS; the runtime's peer's CPU beside it.
4. the same latencies over the WAN emulator's profiles (bench/wan.py: P1 RTT 100 ms, 50 Mbit/s each
   way; P2 RTT 200 ms, 20 Mbit/s up, 50 down), the relay between the laptop and the server (the
   laptop's ProxyJump connects to it; the tunnel server -> runtime stays on loopback), sync and
   unison over the same relay in the same run, against the issue's target: the one-way delay +
   20 ms (the physical floor is the one-way delay); then 5 small edits each way while a 50 MB file
   goes the same way (big files have a lane of their own), and that file's own time.
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
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import Inotify, cpu_seconds, pct, rss_mb, tree_pids  # noqa: E402
from bench.wan import PROFILES, WanRelay  # noqa: E402
from colab_remote import _net, _proc  # noqa: E402
from colab_remote._demo import MINIMAL_ENVIRONMENT  # noqa: E402
from colab_remote.reverse import reverse_forward  # noqa: E402
from colab_remote.server import start_sshd  # noqa: E402
from colab_remote.status import stop_all  # noqa: E402
from colab_remote.sync import sync  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
def make_user(prefix: str) -> tuple[str, Path, int, int]:
    name = prefix + secrets.token_hex(4)
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
    pw = pwd.getpwnam(name)
    return name, Path(pw.pw_dir), pw.pw_uid, pw.pw_gid


class Setup:
    """The runtime, the server, the tunnel, and the laptop's ssh config (``-F``)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.users: list[str] = []
        self.state = base / "runtime-state"

    def start(self) -> None:
        base = self.base
        self.runtime, self.rhome, self.ruid, self.rgid = self._user("crbrt")
        subprocess.run(["usermod", "-p", "*", self.runtime], check=True)  # key logins only
        self.server_user = self._user("crbsv")[0]
        self.key = base / "laptop_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        self.sshd = start_sshd(_net.free_port(), user=self.runtime,
                               authorized_keys=Path(f"{self.key}.pub").read_text(), state_dir=self.state,
                               environment=MINIMAL_ENVIRONMENT, install=False, quiet=True)
        server = start_sshd(_net.free_port(), user=self.server_user, state_dir=base / "server-state",
                            environment=MINIMAL_ENVIRONMENT, install=False, quiet=True)
        self.server = server
        remote_port = _net.free_port()
        self.tunnel = reverse_forward(f"{self.server_user}@127.0.0.1", port=server.port,
                                      password=server.password, remote_port=remote_port,
                                      local_port=self.sshd.port, state_dir=self.state, quiet=True)
        keys = Path(pwd.getpwnam(self.server_user).pw_dir) / ".ssh" / "authorized_keys"
        with keys.open("a") as f:
            f.write(f'restrict,port-forwarding,permitopen="localhost:{remote_port}" '
                    f"{Path(f'{self.key}.pub').read_text().strip()}\n")
        known = base / "known_hosts"
        known.write_text(self.tunnel.known_hosts(alias="colab") + "\n")
        self.config = base / "ssh_config"
        self.config.write_text(self.tunnel.ssh_config(alias="colab")
                               + f"    IdentityFile {self.key}\n    IdentitiesOnly yes\n"
                               + f"    UserKnownHostsFile {known}\n\n"
                               + f"Host 127.0.0.1\n    IdentityFile {self.key}\n    IdentitiesOnly yes\n"
                               + f"    UserKnownHostsFile {known}\n    StrictHostKeyChecking accept-new\n")

    def _user(self, prefix: str) -> tuple[str, Path, int, int]:
        found = make_user(prefix)
        self.users.append(found[0])
        return found

    def runtime_folder(self, name: str) -> Path:
        path = self.rhome / name
        path.mkdir()
        os.chown(path, self.ruid, self.rgid)
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            stop_all(self.state)
        with contextlib.suppress(Exception):
            stop_all(self.base / "server-state")
        for name in self.users:
            subprocess.run(["userdel", "--remove", "--force", name], capture_output=True)


# --- measuring -------------------------------------------------------------------------------------


def latencies(src: Path, dst: Path, n: int, owner: tuple[int, int] | None = None) -> list[float]:
    """Write ``src`` n times (100-200 ms apart); ms until ``dst`` has the content."""
    rng = random.Random(16)
    watch = Inotify(dst.parent)
    out = []
    try:
        for i in range(n):
            text = f"edit {i} {secrets.token_hex(8)} {'x' * rng.randint(0, 300)}\n".encode()  # unison: size
            t0 = time.perf_counter()
            with open(src, "wb") as f:
                f.write(text)
            if owner is not None and i == 0:
                os.chown(src, *owner)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    if dst.read_bytes() == text:
                        break
                watch.wait(0.002)
            else:
                raise RuntimeError(f"{dst} never got edit {i}")
            out.append((time.perf_counter() - t0) * 1000)
            time.sleep(rng.uniform(0.1, 0.2))
    finally:
        watch.close()
    return out


def describe(values: list[float]) -> str:
    return f"median {statistics.median(values):6.1f} ms, p95 {pct(values, 0.95):6.1f} ms"


# --- the two tools ---------------------------------------------------------------------------------


def bench_sync(s: Setup, n: int, config: Path | None = None, tag: str = "small",
               big_mb: int = 0) -> dict[str, list[float]]:
    """Both directions' latency of small edits; with ``big_mb``, also while a file of that size
    goes the same way (a model saved in the runtime, a data set copied on the laptop)."""
    local = s.base / f"laptop-{tag}"
    local.mkdir()
    remote = s.runtime_folder(tag)
    for i in range(200):
        (local / f"f{i}.txt").write_text(f"{i}\n")
    handle = sync(local, f"colab:{tag}", ssh_config=config or s.config, state_dir=s.base / "laptop-state",
                  quiet=True, notify=False, yes=True)
    try:
        handle.flush(60)
        (local / "edit.txt").write_text("x")
        handle.flush(30)
        up = latencies(local / "edit.txt", remote / "edit.txt", n)
        (remote / "out.txt").write_text("x")
        os.chown(remote / "out.txt", s.ruid, s.rgid)
        handle.flush(30)
        down = latencies(remote / "out.txt", local / "out.txt", n)
        found = {"laptop -> runtime": up, "runtime -> laptop": down}
        if big_mb:
            for way, src, dst, owner in (("laptop -> runtime", local, remote, None),
                                         ("runtime -> laptop", remote, local, (s.ruid, s.rgid))):
                t0, still, name = time.monotonic(), True, f"big-{'up' if owner is None else 'down'}.bin"
                with open(src / name, "wb") as f:
                    f.write(os.urandom(big_mb << 20))
                if owner:
                    os.chown(src / name, *owner)
                time.sleep(1.0)  # it is on its way (a big file goes once it stayed the same 0.3 s)
                edit = "edit.txt" if owner is None else "out.txt"
                found[f"{way}, while {big_mb} MB go the same way"] = latencies(src / edit, dst / edit, 5)
                with contextlib.suppress(OSError):
                    still = (dst / name).stat().st_size != big_mb << 20  # (an early look may be there)
                handle.flush(600)
                found[f"{way}: the {big_mb} MB file itself (s)"] = [time.monotonic() - t0]
                if not still:
                    print(f"  (the {big_mb} MB file {way} was there before the edits ended: "
                          "raise --wan-big-mb)")
    finally:
        handle.stop()
    return found


def bench_unison(s: Setup, n: int, config: Path | None = None,
                 tag: str = "uni") -> tuple[str, dict[str, list[float]]] | str:
    unison = shutil.which("unison")
    if unison is None:
        return "not installed (apt-get install -y unison)"
    # Debian's unison has no unison-fsmonitor, without which -repeat watch cannot run: then the
    # fastest unison polls both folders every second (-repeat 1).
    repeat = "watch" if shutil.which("unison-fsmonitor") else "1"
    local = s.base / f"laptop-unison-{tag}"
    local.mkdir()
    remote = s.runtime_folder(tag)
    for i in range(200):
        (local / f"f{i}.txt").write_text(f"{i}\n")
    env = {**os.environ, "UNISON": str(s.base / "unison-home")}
    argv = [unison, str(local), f"ssh://colab/{tag}", "-sshargs", f"-F {config or s.config}", "-batch",
            "-auto",
            "-ui", "text", "-times", "-perms", "0", "-confirmbigdel=false", "-logfile",
            str(s.base / "unison.log")]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode not in (0, 1):
        return f"unison's first sync failed (exit {done.returncode}): {done.stderr[-300:]}"
    with open(s.base / "unison-watch.log", "ab") as log:
        proc = subprocess.Popen([*argv, "-repeat", repeat], env=env, stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(2)
        up = latencies(local / "edit.txt", remote / "edit.txt", n)
        down = latencies(remote / "out.txt", local / "out.txt", n, owner=(s.ruid, s.rgid))
    except RuntimeError as e:
        return f"{e}; unison said:\n" + _proc.tail(s.base / "unison-watch.log", 15)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        proc.wait(10)
    return f"-repeat {repeat}", {"laptop -> runtime": up, "runtime -> laptop": down}


def wan_config(s: Setup, port: int) -> Path:
    """The laptop's ssh config with its ProxyJump to the relay instead of the server."""
    text = s.config.read_text()
    jump = f"@127.0.0.1:{s.server.port}\n"
    if jump not in text:
        raise RuntimeError(f"no ProxyJump to the server's port {s.server.port} in:\n{text}")
    path = s.base / f"ssh_config_wan_{port}"
    path.write_text(text.replace(jump, f"@127.0.0.1:{port}\n"))
    return path


def bench_wan(s: Setup, names: list[str], n: int, unison: bool, big_mb: int) -> None:
    """Both directions' latency over each profile, sync and unison through the same relay."""
    for name in names:
        profile = PROFILES[name]
        print(f"== latency over the WAN emulator, {profile.describe()}, {n} edits each way")
        print("  the relay between the laptop and the server; target: the one-way delay + 20 ms "
              f"({profile.delay('up') * 1000 + 20:g} ms laptop -> runtime, "
              f"{profile.delay('down') * 1000 + 20:g} ms runtime -> laptop)")
        relay = WanRelay(s.server.port, profile)
        try:
            config = wan_config(s, relay.port)
            tag = name.lower()
            t0 = time.monotonic()
            mine = bench_sync(s, n, config, tag=f"small-{tag}", big_mb=big_mb)
            for way, values in mine.items():
                if way.endswith("(s)"):
                    rate = profile.rate("up" if way.startswith("laptop") else "down") or 1
                    print(f"  sync    {way}: {values[0]:.1f} s from its write (the link's floor "
                          f"{(big_mb << 20) / rate:.1f} s)")
                    continue
                delay = profile.delay("up" if way.startswith("laptop") else "down") * 1000
                over = statistics.median(values) - delay
                print(f"  sync    {way}: {describe(values)}  (median {over:+.1f} ms over the one-way "
                      f"delay of {delay:g} ms)")
            print(f"  (its start, first fill of 200 files and {2 * n} edits: {time.monotonic() - t0:.1f} s)")
            if unison:
                theirs = bench_unison(s, n, config, tag=f"uni-{tag}")
                if isinstance(theirs, str):
                    print(f"  unison: {theirs}")
                else:
                    mode, found = theirs
                    for way, values in found.items():
                        ratio = statistics.median(values) / statistics.median(mine[way])
                        print(f"  unison  {way}: {describe(values)}  ({mode}; sync is {ratio:.1f}x "
                              "faster, median)")
            counters = relay.counters()
            print(f"  bytes through the relay: up {counters['up']['out']:,}, "
                  f"down {counters['down']['out']:,}")
        finally:
            relay.close()


def bench_idle(s: Setup, files: int, idle: float) -> dict[str, Any]:
    local = s.base / "laptop-big"
    per = 100
    for d in range(files // per):
        folder = local / f"d{d:04d}"
        folder.mkdir(parents=True)
        for i in range(per):
            (folder / f"f{i}.py").write_text(f"# {d} {i}\n")
    s.runtime_folder("big")
    subprocess.run(["sync"], check=False)
    t0 = time.monotonic()
    handle = sync(local, "colab:big", ssh_config=s.config, state_dir=s.base / "laptop-state",
                  quiet=True, notify=False, yes=True, timeout=1800)
    try:
        handle.flush(1800)
        fill = time.monotonic() - t0
        time.sleep(3)  # the fill's last writes settle
        status = handle.status()
        pid = handle.pid
        assert pid is not None
        parts = {"python": [pid], "ssh channel": [p for p in tree_pids(pid) if p != pid],
                 "ssh master": [status["master_pid"]] if status.get("master_pid") else []}
        peer = (status.get("runtime") or {}).get("pid")
        before = {k: cpu_seconds(v) for k, v in parts.items()}
        peer_before = cpu_seconds([peer] if peer else [])
        time.sleep(idle)
        split = {k: 100 * (cpu_seconds(v) - before[k]) / idle for k, v in parts.items()}
        used = sum(split.values()) * idle / 100
        peer_used = cpu_seconds([peer] if peer else []) - peer_before
        rss = rss_mb(pid)
    finally:
        handle.stop()
    return {"files": files, "fill_s": fill, "idle_cpu_pct": 100 * used / idle,
            "peer_idle_cpu_pct": 100 * peer_used / idle if peer else None, "rss_mb": rss, "split": split}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10,000 files, 15 s idle")
    parser.add_argument("--files", type=int, help="files for the idle figures (default 100,000)")
    parser.add_argument("--idle", type=float, help="seconds of idle measured (default 60)")
    parser.add_argument("--edits", type=int, default=50, help="edits each way (default 50)")
    parser.add_argument("--no-unison", action="store_true")
    parser.add_argument("--idle-only", action="store_true", help="only the first fill and the idle figures")
    parser.add_argument("--wan", default="P1,P2", help="WAN profiles to run (default P1,P2; '' none)")
    parser.add_argument("--wan-edits", type=int, default=20,
                        help="edits each way per WAN profile (default 20)")
    parser.add_argument("--wan-only", action="store_true", help="only the WAN figures")
    parser.add_argument("--wan-big-mb", type=int, default=50,
                        help="small edits timed while a file of this size goes the same way (0: not)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_sync: run as root (throwaway users, sshd on 127.0.0.1)", file=sys.stderr)
        return 1
    wan = [w.strip() for w in args.wan.split(",") if w.strip()]
    unknown = [w for w in wan if w not in PROFILES]
    if unknown:
        parser.error(f"--wan: unknown profiles {unknown} (known: {sorted(PROFILES)})")
    files = args.files or (10_000 if args.quick else 100_000)
    idle = args.idle or (15.0 if args.quick else 60.0)
    base = Path(tempfile.mkdtemp(prefix="crbench-sync-"))
    base.chmod(0o711)
    s = Setup(base)
    try:
        s.start()
        if not args.wan_only:
            print(f"== latency on loopback (the runtime behind a tunnel through a server), {args.edits} "
                  "edits each way")
            mine = bench_sync(s, args.edits) if not args.idle_only else {}
            for way, values in mine.items():
                print(f"  sync    {way}: {describe(values)}")
            if not args.no_unison and not args.idle_only:
                theirs = bench_unison(s, args.edits)
                if isinstance(theirs, str):
                    print(f"  unison: {theirs}")
                else:
                    mode, found = theirs
                    version = subprocess.run(["unison", "-version"], capture_output=True,
                                             text=True).stdout.strip()
                    print(f"  {version}, {mode}" + (" (no unison-fsmonitor in Debian's package: it polls "
                                                    "every second)" if mode == "-repeat 1" else ""))
                    for way, values in found.items():
                        ratio = statistics.median(values) / statistics.median(mine[way])
                        print(f"  unison  {way}: {describe(values)}  (sync is {ratio:.1f}x faster, median)")
            print("  mutagen: not measured: it installs only from its own release downloads, which this "
                  "machine cannot reach (no package registry carries it)")
        if wan and not args.idle_only:
            bench_wan(s, wan, args.wan_edits, unison=not args.no_unison, big_mb=args.wan_big_mb)
        if args.wan_only:
            return 0
        print(f"== first fill and idle at {files:,} files ({idle:g} s idle)")
        found = bench_idle(s, files, idle)
        print(f"  first fill of an empty runtime folder: {found['fill_s']:.1f} s")
        print(f"  laptop idle CPU: {found['idle_cpu_pct']:.2f} % of a core (sync process, its ssh "
              f"channel and master: {', '.join(f'{k} {v:.2f} %' for k, v in found['split'].items())}); "
              f"RSS {found['rss_mb']:.0f} MB")
        if found["peer_idle_cpu_pct"] is not None:
            print(f"  runtime peer idle CPU: {found['peer_idle_cpu_pct']:.2f} % of a core")
    finally:
        s.close()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
