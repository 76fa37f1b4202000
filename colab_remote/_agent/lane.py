"""The mirror's big-file lane on the server: a second session of the same mirror (``colab-remote
lane`` under its key) that joins the agent writing the copy with the token of that agent's hello
(:func:`run_lane`) and only receives big files into partial files (:mod:`.partials`), kept across
agents; the writer puts them in place (``OP_PLACE``)."""

import json
import os
import sys
from typing import BinaryIO, Callable, Optional

from .fs import Folders
from .partials import Partials
from .protocol import (
    OP_CHUNK,
    OP_DROP,
    OP_FINISH,
    OP_HAVE,
    OP_JOIN,
    R_DONE,
    R_FAIL,
    R_GOT,
    R_HAVE,
    R_HELLO,
    TRASH_MAX_GB,
    TRASH_SHARE,
    VERSION,
    check_path,
    pack,
    read_record,
    records,
)
from .trash import check_budget
from .tree import Tree
from .writer import lane_refusal


def serve_lane(partials: Partials, live: Folders, inp: BinaryIO, out: BinaryIO) -> None:
    """Answer a lane's records (one answer each, in order; none for OP_DROP) until it ends."""
    for op, p, _, _, offset, data in records(inp.read):
        try:
            check_path(p)
            if op == OP_HAVE:
                size, got = partials.have(p, offset, live)
                reply = pack(R_HAVE, p, offset=size, data=got)
            elif op == OP_CHUNK:
                reply = pack(R_GOT, p, offset=partials.chunk(p, offset, data))
            elif op == OP_FINISH:
                partials.finish(p, offset, data)
                reply = pack(R_DONE, p, offset=offset)
            elif op == OP_DROP:
                partials.drop(p)
                continue
            else:
                raise ValueError("unknown operation %r" % op)
        except Exception as e:  # noqa: BLE001 - reported to the client, the lane goes on
            if op == OP_DROP:
                continue
            reply = pack(R_FAIL, p, data=("%s: %s" % (type(e).__name__, e)).encode())
        out.write(reply)
        out.flush()


def run_lane(root: bytes, *, key_id: str = "", share: float = TRASH_SHARE,
             max_gb: float = TRASH_MAX_GB, inp: Optional[BinaryIO] = None,
             out: Optional[BinaryIO] = None) -> int:
    """Serve one big-file lane of the mirror that writes ``root``: it joins that writer with the
    token of the writer's hello (it takes no lock: the writer holds it); 1 when it may not. It
    writes only partials, and prunes the trash only when it finds the disk full."""
    os.umask(0o077)
    source, output = inp or sys.stdin.buffer, out or sys.stdout.buffer
    share, max_gb = check_budget(share, max_gb)
    tree = Tree(root, share=share, max_bytes=int(max_gb * 1e9))
    partials, live = tree.partials, Folders(tree.root_fd)

    def roomy(write: Callable[[], None], need: int) -> None:
        tree.trash.budget.book = None  # the writer keeps the trash: its folders are looked at afresh
        tree.trash.roomy(write, need)

    partials.roomy = roomy
    try:
        first = read_record(source.read)
        why = ("a lane first joins its mirror's writer" if first is None or first[0] != OP_JOIN
               else lane_refusal(tree.root_fd, key_id, first[5]))
        if why is not None:
            output.write(pack(R_FAIL, data=why.encode()))
            output.flush()
            sys.stderr.write("colab-remote: refused: %s\n" % why)
            return 1
        output.write(pack(R_HELLO, data=json.dumps({"protocol": VERSION, "pid": os.getpid(),
                                                     "lane": True}).encode()))
        output.flush()
        serve_lane(partials, live, source, output)
    finally:
        live.forget()
        tree.close()
    return 0
