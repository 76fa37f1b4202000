"""The server's processes as the agent sees them: is a pid alive, which process it is (its start
time: a recycled pid is another process)."""

import os
from typing import Optional, Tuple

from .protocol import TMP_INFIX


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def left_by_dead(name: bytes) -> bool:
    """True for a temporary name or a staging folder of an agent that is gone (killed mid-write)."""
    pid = name.rpartition(TMP_INFIX)[2] if TMP_INFIX in name else name
    return pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid))


def proc_stat(pid: int) -> Optional[Tuple[str, int, str]]:
    """(command name, parent pid, start time) of ``pid`` from /proc (Linux), or None.

    /proc/PID/stat is readable for every process, also sshd's (which are not dumpable, so their
    /proc/PID/fd is not).
    """
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    name = raw[raw.index(b"(") + 1:raw.rindex(b")")].decode("utf-8", "replace")
    rest = raw[raw.rindex(b")") + 2:].split()
    return name, int(rest[1]), rest[19].decode()
