"""The wire protocol between the runtime's mirror and the agent, and the names both sides share.

Every message, both ways, is one record: a fixed header, the path, then ``data``. The client
(:mod:`colab_remote._mirror.channel`) imports these; the agent answers them (:mod:`.serve`).
"""

import errno
import hashlib
import io
import os
import struct
import sys
import time
import zlib
from typing import Callable, Dict, Iterator, Optional, Tuple

VERSION = "5"  # the protocol: the client refuses an agent that speaks another one

# --- the wire protocol ------------------------------------------------------------------------
#
# Every message, both ways, is one record: a fixed header, the path, then ``data``.
#   op (1 byte), path length (4), mode (4), mtime in ns (8), offset (8), data length (8)
HEADER = struct.Struct(">cIIqQQ")

# client -> agent
OP_PUT = b"P"       # a whole (small) file: mode, mtime, data
OP_MKDIR = b"D"     # a folder: mode
OP_LINK = b"L"      # a symlink: data is its target
OP_DELETE = b"X"    # move path to the trash
OP_CHUNK = b"K"     # a part of a big file: mode, mtime, offset, data (offset 0 starts it anew)
OP_COMMIT = b"F"    # a big file is whole: mode, mtime, offset = its size, data = its digest
OP_END = b"E"       # end of a batch: the agent applies what is pending and answers R_ACK
OP_MANIFEST = b"M"  # list the copy: R_FOLDER records, a folder at a time, then R_DONE
OP_GET = b"G"       # read one file back (restore): R_DATA chunks, then R_DONE, or R_FAIL
OP_PLACE = b"Q"     # a big file a lane received is whole: put it in place: mode, mtime, offset =
                    # its size, data = its digest (the lane checked it: see .partials)
OP_ZIP = b"Z"       # records compressed together (zlib): unpacked and applied in their place

# client -> lane (the big-file lane: a second session of the same mirror, see .lane); every
# record but OP_DROP gets one answer, in order
OP_JOIN = b"J"      # the first record: data = the lane token of the writer's hello
OP_HAVE = b"W"      # what the server holds of this file to build on: offset = its size here now
                    # -> R_HAVE
# OP_CHUNK          # a part of the file into its partial (offset 0 starts it anew) -> R_GOT
OP_FINISH = b"N"    # the partial is whole: offset = its size, data = its digest -> R_DONE
OP_DROP = b"R"      # forget this file's partial (no answer)

# agent -> client
R_HELLO = b"H"      # first record: data is JSON (protocol, version, sha, trash, ...); or R_FAIL
                    # (data: why) when another mirror writes this destination
R_ACK = b"A"        # a batch is applied: offset = ops, data = JSON {"errors": [[path, error]...],
                    # "trash": what it holds and what was pruned (see Tree.trash_report)}
R_FOLDER = b"f"     # the manifest's entries in one folder: path = the folder (b"" the top), offset
                    # = 1 when more records of the same folder follow, data = LIST_ENTRY + name
                    # (+ a link's target) for each entry (see entries())
R_DATA = b"g"       # a chunk of a file being read: mode, mtime, offset, data
R_DONE = b"z"       # the end of a manifest (offset = entries) or of a file (offset = size)
R_FAIL = b"!"       # a file could not be read: data is why (a lane: the request failed)
R_HAVE = b"w"       # offset = bytes the server holds of the file (its partial, or the file itself
                    # when it may have grown), data = their digest; offset 0: nothing to build on
R_GOT = b"k"        # a chunk is written: offset = the partial's size now

TRASH = b".colab-remote-trash"   # in the destination: what was replaced or deleted, by time
STAGING = b".staging"            # in the trash: new folders and big files being built
PARTIALS = b"partial"            # in the staging folder: what lanes received, one file per path
TMP_INFIX = b".colab-remote-tmp."  # our temporary names: ``.NAME.colab-remote-tmp.PID``
STAMP_FORMAT = "%Y-%m-%dT%H-%M-%S"  # trash folders: STAMP_FORMAT + ".ffffffZ" (UTC)
CHUNK = 1 << 20                  # bytes per record when a file is read back
MODE_MASK = 0o755                # nothing we create is group/world-writable, setuid or setgid
DIGEST_SIZE = 16                 # blake2b digest of a big file, checked before it is put in place
PRUNE_EVERY = 6 * 3600.0
WRITER = b".writer"              # in the trash: the lock of the agent writing this copy, and who
SIZES = b".sizes"                # in the trash: bytes and versions of each trash folder (a cache)
TRASH_SHARE = 0.25               # the trash holds at most this share of the room it could use
TRASH_MAX_GB = 10.0              # ... and at most this many GB (1e9 bytes)
ROOM_SLACK = 1 << 20             # a full disk: prune until a write has this much room beyond it
STALE_AFTER = 300.0              # a writer silent this long may be replaced by another mirror
TOUCH_EVERY = 30.0               # how often the writer notes that it is still active
FULL = (errno.ENOSPC, errno.EDQUOT)
MAX_ZIP = 64 << 20               # the most an OP_ZIP record may unpack to

HOME_DIR = ".colab-remote"       # in the server account's home: agents, configs, the lock

O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | O_CLOEXEC
O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | O_CLOEXEC
O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | O_CLOEXEC

# One entry of an R_FOLDER record: name length, mode (with the type bits), mtime in ns, size (a
# file's; 0 otherwise), the link target's length; then the name and the target.
LIST_ENTRY = struct.Struct(">HIqQH")
LIST_BYTES = 1 << 20  # an R_FOLDER record holds about this much (a big folder takes several)


def pack(op: bytes, path: bytes = b"", *, mode: int = 0, mtime_ns: int = 0, offset: int = 0,
         data: bytes = b"") -> bytes:
    """One record."""
    return HEADER.pack(op, len(path), mode, mtime_ns, offset, len(data)) + path + data


def read_record(read: Callable[[int], bytes]) -> Optional[Tuple[bytes, bytes, int, int, int, bytes]]:
    """``(op, path, mode, mtime_ns, offset, data)`` of the next record; None at the end of the
    stream or when it breaks mid-record (a cut record is never applied)."""
    head = read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    op, plen, mode, mtime, offset, dlen = HEADER.unpack(head)
    path = read(plen) if plen else b""
    data = read(dlen) if dlen else b""
    if len(path) < plen or len(data) < dlen:
        return None
    return op, path, mode, mtime, offset, data


def records(read: Callable[[int], bytes]) -> Iterator[Tuple[bytes, bytes, int, int, int, bytes]]:
    """The client's records until the stream ends, those packed in an OP_ZIP unpacked in their
    place (one that unpacks to more than MAX_ZIP, or not at all, ends the stream)."""
    while True:
        rec = read_record(read)
        if rec is None:
            return
        if rec[0] != OP_ZIP:
            yield rec
            continue
        unzip = zlib.decompressobj()
        try:
            inner = unzip.decompress(rec[5], MAX_ZIP)
        except zlib.error:
            inner = b""
        if unzip.unconsumed_tail or not unzip.eof:
            sys.stderr.write("colab-remote: a compressed record did not unpack; the stream ends\n")
            return
        stream = io.BytesIO(inner).read
        while True:
            one = read_record(stream)
            if one is None:
                break
            yield one


def entries(data: bytes) -> Dict[bytes, Tuple[int, int, int, bytes]]:
    """The entries of one R_FOLDER record: ``{name: (mode, mtime_ns, size, link target)}``."""
    found = {}
    unpack, size, off, end = LIST_ENTRY.unpack_from, LIST_ENTRY.size, 0, len(data)
    while off < end:
        nlen, mode, mtime, fsize, tlen = unpack(data, off)
        off += size
        found[data[off:off + nlen]] = (mode, mtime, fsize, data[off + nlen:off + nlen + tlen])
        off += nlen + tlen
    return found


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


def trash_stamp(now: Optional[float] = None) -> bytes:
    """The name of one trash folder: UTC time to the microsecond."""
    t = time.time() if now is None else now
    return (time.strftime(STAMP_FORMAT, time.gmtime(t)) + ".%06dZ" % int(t % 1 * 1e6)).encode()


def check_path(p: bytes) -> None:
    """Refuse anything that is not a plain relative path inside the copy (and not the trash)."""
    parts = p.split(b"/")
    if (not p or p.startswith(b"/") or b".." in parts or b"." in parts or b"" in parts
            or parts[0] == TRASH or b"\0" in p):
        raise ValueError("refused path %r" % p)


def refuse(why: str) -> int:
    sys.stderr.write("colab-remote: refused: %s\n" % why)
    return 1
