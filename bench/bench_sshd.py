"""Time from calling start_sshd() to the SSH banner: first call (host keys generated) and repeat call.

Run as root: ``.venv/bin/python bench/bench_sshd.py [--runs 10]``. Uses a throwaway user, a free
port on 127.0.0.1 and temporary state folders; removes all of it at the end. start_sshd() returns
only once the port answers with an SSH banner, so the time of the call is the time to the banner;
the banner is read once more after each call to prove it.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from colab_remote import _net, start_sshd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    user = "crtbench" + secrets.token_hex(3)
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", user], check=True)
    password = secrets.token_hex(10)
    first: list[float] = []
    repeat: list[float] = []
    try:
        with tempfile.TemporaryDirectory(prefix="colab-remote-bench-") as tmp:
            port = _net.free_port()
            for i in range(args.runs):
                state = Path(tmp) / f"fresh{i}"
                t0 = time.perf_counter()
                sshd = start_sshd(port, user=user, password=password, state_dir=state,
                                  listen_address="127.0.0.1", quiet=True)
                first.append(time.perf_counter() - t0)
                assert _net.ssh_banner("127.0.0.1", port) is not None
                sshd.stop()
            state = Path(tmp) / "fresh0"
            for _ in range(args.runs):
                t0 = time.perf_counter()
                sshd = start_sshd(port, user=user, password=password, state_dir=state,
                                  listen_address="127.0.0.1", quiet=True)
                repeat.append(time.perf_counter() - t0)
                assert _net.ssh_banner("127.0.0.1", port) is not None
            sshd.stop()
    finally:
        subprocess.run(["userdel", "--remove", "--force", user], capture_output=True)
    print(f"start_sshd() until the SSH banner answers, {args.runs} runs each")
    print(f"{'case':<32}{'median':>10}{'min':>10}{'max':>10}")
    for label, values in (("first call (host keys generated)", first),
                          ("repeat call (keys reused)", repeat)):
        print(f"{label:<32}{statistics.median(values):>9.3f}s{min(values):>9.3f}s{max(values):>9.3f}s")
    verdict = "met" if statistics.median(repeat) <= 0.3 else "MISSED"
    print(f"target repeat call <= 0.300 s: {verdict}")


if __name__ == "__main__":
    main()
