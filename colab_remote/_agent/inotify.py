"""inotify through ctypes (Linux): the two-way sync's peer watches every synced folder with it.

Standard library only, Python >= 3.6.
"""

import ctypes
import errno
import os
import struct
from typing import Any, Dict, List, Tuple

IN = {"MODIFY": 0x2, "ATTRIB": 0x4, "CLOSE_WRITE": 0x8, "MOVED_FROM": 0x40, "MOVED_TO": 0x80,
       "CREATE": 0x100, "DELETE": 0x200, "DELETE_SELF": 0x400, "MOVE_SELF": 0x800,
       "Q_OVERFLOW": 0x4000, "IGNORED": 0x8000, "ONLYDIR": 0x01000000, "DONT_FOLLOW": 0x02000000,
       "ISDIR": 0x40000000}
_WATCH_MASK = (0x2 | 0x4 | 0x8 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800 | 0x01000000 | 0x02000000)
_EVENT = struct.Struct("iIII")



class Inotify:
    """inotify on every synced folder (ctypes; Linux). ``fd`` is -1 where there is none."""

    def __init__(self, root: bytes) -> None:
        self.root, self.fd = root, -1
        self.libc: Any = None
        self.folders: Dict[int, bytes] = {}
        self.root_wd = -1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(0o4000 | 0o2000000)  # IN_NONBLOCK | IN_CLOEXEC
        except (OSError, AttributeError):
            return
        if fd >= 0:
            self.libc, self.fd = libc, fd

    def add(self, rel: bytes) -> bool:
        """Watch one folder; False when the kernel's limit is reached."""
        path = self.root + b"/" + rel if rel else self.root
        wd = self.libc.inotify_add_watch(self.fd, path, _WATCH_MASK)
        if wd < 0:
            return ctypes.get_errno() != errno.ENOSPC
        self.folders[wd] = rel
        if not rel:
            self.root_wd = wd
        return True

    def read(self) -> List[Tuple[int, bytes]]:
        """(mask, rel) of the events queued; rel b"" with IN_Q_OVERFLOW."""
        found: List[Tuple[int, bytes]] = []
        while True:
            try:
                buf = os.read(self.fd, 1 << 20)
            except (BlockingIOError, OSError):
                return found
            if not buf:
                return found
            off = 0
            while off < len(buf):
                wd, mask, _, size = _EVENT.unpack_from(buf, off)
                name = buf[off + 16:off + 16 + size].rstrip(b"\0")
                off += 16 + size
                if mask & IN["Q_OVERFLOW"]:
                    found.append((mask, b""))
                    continue
                folder = self.folders.get(wd)
                if mask & IN["IGNORED"]:
                    self.folders.pop(wd, None)
                if folder is None:
                    continue
                if not name:
                    if wd == self.root_wd and mask & (IN["DELETE_SELF"] | IN["MOVE_SELF"]):
                        found.append((mask, b""))
                    continue
                found.append((mask, folder + b"/" + name if folder else name))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
