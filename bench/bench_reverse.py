"""reverse_forward() against autossh, all on 127.0.0.1: how fast the forward comes back, and bulk speed.

Run as root: ``.venv/bin/python bench/bench_reverse.py`` (``--quick`` for a shorter run). It makes
two throwaway users (the runtime's login, the server's account), a runtime sshd (start_sshd) and a
"server" sshd (``ClientAliveInterval 5``, ``ClientAliveCountMax 3``) on free ports, and removes all
of it at the end. Both tunnels log in with the same key and the same ssh options
(``_ssh.tunnel_options``); autossh runs with ``-M 0``, ``AUTOSSH_GATETIME=0``, ``AUTOSSH_POLL=30``.

"The forward accepts" means: a TCP connect to the forwarded port on the server succeeds and that
connection then gets the runtime sshd's banner; the time taken is that of the connect.

1. the tunnel's ssh process killed -> forward accepts (ours: SIGTERM and SIGKILL alternately;
   autossh: SIGKILL, plus one SIGTERM round to show it does not come back);
2. server sshd crashes (every sshd process killed) and is restarted at once / after a 30 s
   outage -> forward accepts, counted from the moment the server answers again;
3. a relay between tunnel and server stops passing data (new connections still pass) -> forward
   accepts, without and with a client connecting to the forwarded port every 0.5 s;
4. 256 MiB read through each tunnel (ssh -J) and through a direct ssh connection, MB/s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from colab_remote import _net, _proc, _ssh, start_sshd  # noqa: E402
from colab_remote.reverse import Tunnel, reverse_forward  # noqa: E402
from tests.conftest import ServerSshd, User  # noqa: E402
from tests.reverse_helpers import Connector, Relay, listener_pids, wait_forward  # noqa: E402

SIZE = 256 * 1024 * 1024


def make_user() -> User:
    name = "crtb" + secrets.token_hex(4)
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
    password = secrets.token_hex(10)
    subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True)
    return User(name, password)


class Autossh:
    """autossh -M 0 with the same ssh options as our tunnel."""

    def __init__(self, tmp: Path, dest: _ssh.Destination, port: int, remote_port: int, local_port: int,
                 options: dict[str, str | int]) -> None:
        ssh_argv = _ssh.tunnel_ssh_argv("ssh", dest, port=port, remote_port=remote_port,
                                        local_port=local_port, options=options)
        self.argv = [shutil.which("autossh") or "/usr/bin/autossh", "-M", "0", *ssh_argv[1:]]
        self.log = tmp / f"autossh-{remote_port}.log"
        self.remote_port = remote_port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Autossh:
        env = dict(os.environ, AUTOSSH_GATETIME="0", AUTOSSH_POLL="30",
                   AUTOSSH_LOGLEVEL="6")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=out, start_new_session=True)
        if wait_forward(self.remote_port, 20) is None:
            raise RuntimeError("autossh tunnel did not come up:\n" + self.log.read_text()[:3000])
        return self

    def ssh_pid(self) -> int | None:
        assert self.proc is not None
        kids = [p for p in _proc.children(self.proc.pid) if "ssh" in " ".join(_proc.cmdline(p)[:1])]
        return kids[0] if kids else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        for pid in _proc.children(self.proc.pid):
            _proc.send_signal(pid, signal.SIGKILL)
        self.proc = None


def median(values: list[float | None]) -> str:
    done = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(done) < len(values):
        missing = len(values) - len(done)
        if not done:
            return f"never ({missing}/{len(values)})"
        return f"{statistics.median(done):.3f} s, {missing} never"
    return f"{statistics.median(done):.3f} s"


def kill_ssh_round(get_pid: Callable[[], int | None], remote_port: int, sig: int,
                   timeout: float) -> float | None:
    pid = get_pid()
    assert pid is not None
    t0 = time.monotonic()
    os.kill(pid, sig)
    back = wait_forward(remote_port, timeout)
    return None if back is None else back - t0


def silent_round(relay: Relay, ports: list[int], timeouts: list[float]) -> list[float | None]:
    """Freeze the relay; per port, seconds until the forward accepts again (None: not in time)."""
    old = [listener_pids(p) for p in ports]
    t0 = time.monotonic()
    relay.freeze()
    got: list[float | None] = [None] * len(ports)

    def watch(k: int) -> None:
        # Watch which process listens on the port (the dead session's until it is reclaimed
        # or times out) without connecting to it; then time the first accepted connection.
        def new_listener() -> bool:
            pids = listener_pids(ports[k])
            return bool(pids) and not pids & old[k]

        if not _proc.wait_until(new_listener, timeouts[k], 0.01):
            return
        back = wait_forward(ports[k], max(0.5, timeouts[k] - (time.monotonic() - t0)),
                            banner_timeout=0.5)
        got[k] = None if back is None else back - t0

    threads = [threading.Thread(target=watch, args=(k,)) for k in range(len(ports))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="rounds for targets 1, 2 (crash), 3")
    parser.add_argument("--outage-rounds", type=int, default=3, help="30 s outages (both tools at once)")
    parser.add_argument("--autossh-silent-rounds", type=int, default=2,
                        help="silent breaks measured for autossh too (up to 90 s each)")
    parser.add_argument("--outage", type=float, default=30.0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    parser.add_argument("--access", choices=["restricted", "key"], default="restricted",
                        help="ours logs in with the restricted key its set-up installs (the default "
                             "product path), or with the user's own key as given")
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 outage, 1 autossh silent round")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.outage_rounds, args.autossh_silent_rounds = 3, 1, 1
    if os.geteuid() != 0:
        sys.exit("run as root (creates throwaway users, runs sshd)")

    server_user = make_user()
    login_user = make_user()
    tmp = Path(tempfile.mkdtemp(prefix="crt-bench-"))
    results: dict[str, dict[str, list[float | None]]] = {"ours": {}, "autossh": {}}
    throughput: dict[str, list[float]] = {}
    started = time.monotonic()
    cleanup: list[Callable[[], None]] = []
    try:
        key = tmp / "key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        server_user.write(".ssh/authorized_keys", (tmp / "key.pub").read_text(), 0o600)
        server = ServerSshd(tmp / "server", _net.free_port(), server_user,
                            extra=["ClientAliveInterval 5", "ClientAliveCountMax 3"]).start()
        cleanup.append(server.stop)
        state = tmp / "state"
        runtime = start_sshd(_net.free_port(), user=login_user.name, password=login_user.password,
                             authorized_keys=tmp / "key.pub", state_dir=state,
                             listen_address="127.0.0.1", quiet=True)
        cleanup.append(runtime.stop)
        dest = _ssh.Destination(server_user.name, "127.0.0.1")
        options = _ssh.tunnel_options(known_hosts=state / "known_hosts", pinned=False,
                                      identity_file=str(key), password=False)

        def ours(port: int, remote_port: int) -> Tunnel:
            login = {"identity_file": key} if args.access == "key" else {"password": server_user.password}
            tunnel = reverse_forward(dest.target, port=port, remote_port=remote_port, state_dir=state,
                                     quiet=True, **login)
            cleanup.append(tunnel.stop)
            return tunnel

        def standby(tunnel: Tunnel) -> None:
            def ready() -> bool:  # from one read of the status: a live active ssh and a standby
                st = tunnel.status()
                return bool(st.get("standby_ready") and st.get("ssh_pid")
                            and _proc.pid_alive(st["ssh_pid"]) and _proc.pid_alive(st["standby_pid"]))

            if not _proc.wait_until(ready, 15, 0.01):
                raise RuntimeError("no standby:\n" + tunnel.logs(20))
            if wait_forward(tunnel.remote_port, 10) is None:
                raise RuntimeError("forward down:\n" + tunnel.logs(20))

        # --- 1: the tunnel's ssh killed --------------------------------------------------------
        print("1: killing the tunnel's ssh ...", flush=True)
        tunnel = ours(server.port, _net.free_port())
        r1: list[float | None] = []
        for i in range(args.rounds):
            standby(tunnel)
            sig = signal.SIGTERM if i % 2 == 0 else signal.SIGKILL
            r1.append(kill_ssh_round(lambda: tunnel.ssh_pid, tunnel.remote_port, sig, 10))
        results["ours"]["1 ssh killed (TERM/KILL)"] = r1
        auto = Autossh(tmp, dest, server.port, _net.free_port(), runtime.port, options).start()
        cleanup.append(auto.stop)
        a1: list[float | None] = []
        for _ in range(args.rounds):
            if wait_forward(auto.remote_port, 20) is None:
                raise RuntimeError("autossh down:\n" + _proc.tail(auto.log))
            time.sleep(0.2)
            a1.append(kill_ssh_round(auto.ssh_pid, auto.remote_port, signal.SIGKILL, 10))
        results["autossh"]["1 ssh killed (TERM/KILL)"] = a1
        wait_forward(auto.remote_port, 20)
        term = kill_ssh_round(auto.ssh_pid, auto.remote_port, signal.SIGTERM, 3)
        results["autossh"]["1' ssh killed with SIGTERM"] = [term]
        results["ours"]["1' ssh killed with SIGTERM"] = [v for i, v in enumerate(r1) if i % 2 == 0]
        auto.stop()

        # --- 2: server crash, restart at once / after an outage --------------------------------
        print("2: crashing the server ...", flush=True)

        def crash_round(port_of: list[int], outage: float, timeout: float) -> list[float | None]:
            server.stop()
            time.sleep(outage)
            up: list[float] = []

            def first_answer() -> None:  # the moment the server's port accepts again
                while time.monotonic() < deadline:
                    try:
                        socket.create_connection(("127.0.0.1", server.port), 1).close()
                    except OSError:
                        time.sleep(0.0005)
                        continue
                    up.append(time.monotonic())
                    return

            deadline = time.monotonic() + 10
            prober = threading.Thread(target=first_answer)
            prober.start()
            server.start()
            prober.join()
            t0 = up[0]
            got: list[float | None] = [None] * len(port_of)

            def watch(i: int) -> None:
                back = wait_forward(port_of[i], timeout)
                got[i] = None if back is None else back - t0

            threads = [threading.Thread(target=watch, args=(i,)) for i in range(len(port_of))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return got

        r2 = []
        for _ in range(args.rounds):
            standby(tunnel)
            r2.append(crash_round([tunnel.remote_port], 0, 10)[0])
        results["ours"]["2a server crash, restart at once"] = r2
        auto = Autossh(tmp, dest, server.port, auto.remote_port, runtime.port, options).start()
        cleanup.append(auto.stop)
        a2 = []
        for _ in range(args.rounds):
            if wait_forward(auto.remote_port, 30) is None:
                raise RuntimeError("autossh down:\n" + _proc.tail(auto.log))
            time.sleep(0.2)
            a2.append(crash_round([auto.remote_port], 0, 30)[0])
        results["autossh"]["2a server crash, restart at once"] = a2
        o_ours, o_auto = [], []
        for _ in range(args.outage_rounds):
            standby(tunnel)
            wait_forward(auto.remote_port, 30)
            print(f"   {args.outage:g} s outage ...", flush=True)
            both = crash_round([tunnel.remote_port, auto.remote_port], args.outage, 60)
            o_ours.append(both[0])
            o_auto.append(both[1])
        results["ours"][f"2b {args.outage:g} s outage (both at once)"] = o_ours
        results["autossh"][f"2b {args.outage:g} s outage (both at once)"] = o_auto
        auto.stop()

        # --- 4: throughput (before the relay rounds, on the direct tunnels) --------------------
        print("4: throughput ...", flush=True)
        auto = Autossh(tmp, dest, server.port, auto.remote_port, runtime.port, options).start()
        cleanup.append(auto.stop)
        standby(tunnel)
        client_kh = tmp / "client_known_hosts"
        base = ["ssh", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={client_kh}", "-o", "StrictHostKeyChecking=accept-new",
                "-o", "GlobalKnownHostsFile=/dev/null"]
        jump = " ".join([*base, "-W", "%h:%p", "-p", str(server.port), dest.target])

        def read_through(port: int, via_jump: bool) -> float:
            argv = [*base, "-p", str(port)]
            if via_jump:
                argv += ["-o", f"ProxyCommand={jump}", "-o", "HostKeyAlias=bench-runtime"]
            argv += [f"{login_user.name}@127.0.0.1", f"head -c {SIZE} /dev/zero"]
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
            assert proc.stdout is not None
            got = 0
            first = None
            while True:
                chunk = proc.stdout.read1(1 << 20)  # type: ignore[attr-defined]
                if not chunk:
                    break
                if first is None:
                    first = time.monotonic()
                got += len(chunk)
            end = time.monotonic()
            proc.wait(30)
            if got != SIZE or first is None:
                raise RuntimeError(f"read {got} bytes of {SIZE} through port {port}")
            return SIZE / (end - first) / 1e6

        paths = [("ours", tunnel.remote_port, True), ("autossh", auto.remote_port, True),
                 ("direct ssh", runtime.port, False)]
        for name, _, _ in paths:
            throughput[name] = []
        read_through(tunnel.remote_port, True)  # warm-up: known_hosts, page cache, CPU clocks
        for rep in range(3):  # a different order each time: the machine is shared
            for name, port, via_jump in paths[rep:] + paths[:rep]:
                throughput[name].append(read_through(port, via_jump))
        auto.stop()
        tunnel.stop()

        # --- 3: silent link break through a relay ----------------------------------------------
        print("3: silent link breaks ...", flush=True)
        relay = Relay(server.port)
        cleanup.append(relay.close)
        tunnel = ours(relay.port, _net.free_port())
        s_ours: dict[bool, list[float | None]] = {False: [], True: []}
        s_auto: dict[bool, list[float | None]] = {False: [], True: []}
        for i in range(args.rounds):
            with_connector = i % 2 == 1
            autossh_too = (len(s_auto[True]) < 1 if with_connector
                           else len(s_auto[False]) < args.autossh_silent_rounds)
            standby(tunnel)
            ports = [tunnel.remote_port]
            if autossh_too:  # a fresh port: the server may still hold the last round's
                auto = Autossh(tmp, dest, relay.port, _net.free_port(), runtime.port, options)
                auto.start()
                cleanup.append(auto.stop)
                ports.append(auto.remote_port)
            connectors = [Connector(p, 0.5) for p in ports] if with_connector else []
            print(f"   round {i + 1}: {'with' if with_connector else 'without'} connector"
                  f"{', autossh too' if autossh_too else ''} ...", flush=True)
            got = silent_round(relay, ports, [40.0, 90.0 if not with_connector else 60.0])
            for c in connectors:
                c.stop()
            s_ours[with_connector].append(got[0])
            if autossh_too:
                s_auto[with_connector].append(got[1])
                auto.stop()
        results["ours"]["3a silent link break"] = s_ours[False]
        results["ours"]["3b silent break + connects every 0.5 s"] = s_ours[True]
        results["autossh"]["3a silent link break"] = s_auto[False]
        results["autossh"]["3b silent break + connects every 0.5 s"] = s_auto[True]
        reclaims = tunnel.logs(5000).count("reclaiming")
        tunnel.stop()
    finally:
        for stop in reversed(cleanup):
            try:
                stop()
            except Exception as e:  # keep cleaning up
                print(f"cleanup: {e}", file=sys.stderr)
        for user in (server_user, login_user):
            subprocess.run(["userdel", "--remove", "--force", user.name], capture_output=True)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    how = "the restricted key of its set-up" if args.access == "restricted" else "the key as given"
    print(f"ours logs in with: {how}")
    print(f"reverse tunnel on 127.0.0.1, {time.monotonic() - started:.0f} s; times are medians "
          "(n = values measured)")
    cases = list(results["ours"])
    for case in results["autossh"]:
        if case not in cases:
            cases.append(case)
    print(f"{'case':<44}{'ours':>22}{'autossh':>24}")
    for case in cases:
        a = results["ours"].get(case, [])
        b = results["autossh"].get(case, [])
        print(f"{case:<44}{median(a) + f' (n={len(a)})':>22}{median(b) + f' (n={len(b)})':>24}")
    print(f"(ours took the server's port back from its dead session {reclaims} times in the 3x rounds)")
    print()
    print("4: 256 MiB read through each path, MB/s (median of 3):")
    for name, values in throughput.items():
        print(f"   {name:<12}{statistics.median(values):8.1f}   ({', '.join(f'{v:.1f}' for v in values)})")
    ratio = statistics.median(throughput["ours"]) / statistics.median(throughput["autossh"])
    print(f"   ours / autossh = {ratio:.3f}")
    print()
    t1 = [v for v in results["ours"]["1 ssh killed (TERM/KILL)"] if v is not None]
    t2 = [v for k in results["ours"] if k.startswith("2") for v in results["ours"][k] if v is not None]
    t3 = [v for k in results["ours"] if k.startswith("3") for v in results["ours"][k] if v is not None]

    def verdict(values: list[float], limit: float, n: int) -> str:
        ok = len(values) == n and statistics.median(values) <= limit
        return "met" if ok else "MISSED"

    n1 = len(results["ours"]["1 ssh killed (TERM/KILL)"])
    n2 = sum(len(v) for k, v in results["ours"].items() if k.startswith("2"))
    n3 = sum(len(v) for k, v in results["ours"].items() if k.startswith("3"))
    print(f"target 1 (<= 0.1 s): {verdict(t1, 0.1, n1)}   target 2 (<= 0.5 s): {verdict(t2, 0.5, n2)}   "
          f"target 3 (<= 20 s): {verdict(t3, 20, n3)}   target 4 (>= 0.95): "
          f"{'met' if ratio >= 0.95 else 'MISSED'}")


if __name__ == "__main__":
    main()
