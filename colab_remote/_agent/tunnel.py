"""The tunnel's helper: the sshd session of a tunnel's key records itself, and a new session may
reclaim the forwarded port from a dead one of the same key (only processes it recorded)."""

import os
import signal
from typing import List, Optional, Tuple

from .fs import open_folder, write_file_at
from .home import own_sha, runtime_of, state_dir
from .procs import proc_stat
from .protocol import O_READ, VERSION, refuse
from .setup import print_revoked, revoke


def session_pid() -> Optional[int]:
    """The sshd process that serves this connection: the nearest ancestor named sshd*."""
    pid = os.getppid()
    for _ in range(16):
        info = proc_stat(pid)
        if info is None:
            return None
        if info[0].startswith("sshd"):
            return pid
        pid = info[1]
    return None


def _sessions_file(key_id: str) -> Tuple[int, str]:
    state = state_dir()
    folder = open_folder(state, b"sessions", True)
    os.close(state)
    assert folder is not None
    return folder, key_id


def record_session(key_id: str) -> Optional[int]:
    """Note this connection's sshd process (pid and start time) as one of ``key_id``'s own."""
    pid = session_pid()
    info = proc_stat(pid) if pid is not None else None
    if pid is None or info is None:
        return None
    folder, name = _sessions_file(key_id)
    try:
        try:
            with open(os.open(name, O_READ, dir_fd=folder), "rb") as f:
                lines = f.read().decode().splitlines()[-31:]
        except OSError:
            lines = []
        lines.append("%d %s" % (pid, info[2]))
        write_file_at(folder, name, ("\n".join(lines) + "\n").encode())
    finally:
        os.close(folder)
    return pid


def reclaim(key_id: str, pids: List[int]) -> List[int]:
    """End sessions of this same key that still hold the tunnel's port after their link died:
    only pids that :func:`record_session` noted for ``key_id``, still the same process (start
    time), named sshd*, and not this very session. Returns the pids signalled."""
    folder, name = _sessions_file(key_id)
    try:
        with open(os.open(name, O_READ, dir_fd=folder), "rb") as f:
            known = set(f.read().decode().split("\n"))
    except OSError:
        known = set()
    finally:
        os.close(folder)
    me, done = session_pid(), []
    for pid in pids:
        info = proc_stat(pid)
        if info is None or pid == me or not info[0].startswith("sshd"):
            continue
        if "%d %s" % (pid, info[2]) not in known:
            continue
        try:
            os.kill(pid, signal.SIGTERM)
            done.append(pid)
        except OSError:
            pass
    return done


def run_tunnel(key_id: str, port: int, request: List[str]) -> int:
    word = request[0] if request else ""
    if request == ["hello"]:
        print("colab-remote-agent %s %s tunnel %d" % (VERSION, own_sha(), port))
        return 0
    if request == ["session"]:
        pid = record_session(key_id)
        print("colab-remote-session %s" % (pid if pid is not None else "?"))
        return 0
    if word == "reclaim" and len(request) > 1 and all(w.isdigit() for w in request[1:]):
        done = reclaim(key_id, [int(w) for w in request[1:]])
        print("colab-remote-reclaimed %s" % " ".join(str(p) for p in done))
        return 0
    if request == ["revoke"]:
        return print_revoked(revoke(runtime=runtime_of(key_id)))
    return refuse("this key only keeps the colab-remote tunnel on port %d up" % port)
