"""CPU of the mirror's server-side agent alone: 10,000 new 1 KiB files in 100 new folders.

Run: ``.venv/bin/python bench/bench_agent.py [--runs 3] [--where /dev/shm]``. The records the mirror
would send for target 2's burst are piped into the agent (python3, as ssh would start it) in a
temporary folder under ``--where``; the script prints its wall time and CPU (user, system) per run
and checks that all 10,000 files arrived. No ssh, no network: the agent's own cost, without the
writer and the mirror competing for the cores.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from colab_remote import _sync  # noqa: E402


def records() -> bytes:
    blob = b"y" * 1024
    mtime = time.time_ns()
    out = []
    for i in range(100):
        out.append(_sync.pack(_sync.OP_MKDIR, b"dir%03d" % i, mode=0o755))
        for j in range(100):
            out.append(_sync.pack(_sync.OP_PUT, b"dir%03d/file%03d.bin" % (i, j), mode=0o644,
                                  mtime_ns=mtime, data=blob))
    out.append(_sync.pack(_sync.OP_END))
    return b"".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--where", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                        help="the folder to write into (default /dev/shm)")
    args = parser.parse_args()
    data = records()
    walls, cpus = [], []
    for k in range(args.runs):
        dest = Path(tempfile.mkdtemp(prefix="bench-agent-", dir=args.where))
        try:
            command, source = _sync.agent_command(str(dest), backup=True, keep_days=7)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            done = subprocess.run(["sh", "-c", command], input=source + data, capture_output=True,
                                  timeout=300, check=True)
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
            files = sum(len(f) for _, _, f in os.walk(dest))
            answer = done.stdout.decode().splitlines()[-1]
            print(f"run {k}: {wall:.3f} s wall, CPU {user + system:.3f} s (user {user:.3f}, system "
                  f"{system:.3f}); {files} files; agent said {answer!r}", flush=True)
            if files != 10_000:
                print("files missing", file=sys.stderr)
                return 1
            walls.append(wall)
            cpus.append(user + system)
        finally:
            shutil.rmtree(dest, ignore_errors=True)
    print(f"agent, 10,000 x 1 KiB in 100 new folders under {args.where}: median "
          f"{statistics.median(walls):.3f} s wall, {statistics.median(cpus):.3f} CPU-s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
