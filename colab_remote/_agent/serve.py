"""The mirror's agent: records in, the tree changed, answers out (:func:`serve`), and how sshd
starts it for a mirror's key (:func:`run_mirror`, the server's config for that key; its big-file
lane: :mod:`.lane`)."""

import fcntl
import json
import os
import sys
import time
from typing import BinaryIO, Callable, List, Optional

from .home import home, ok_id, own_sha, resolve_dest
from .lane import run_lane
from .protocol import (
    HOME_DIR,
    OP_CHUNK,
    OP_COMMIT,
    OP_DELETE,
    OP_END,
    OP_GET,
    OP_LINK,
    OP_MANIFEST,
    OP_MKDIR,
    OP_PLACE,
    OP_PUT,
    PRUNE_EVERY,
    R_ACK,
    R_DATA,
    R_DONE,
    R_FAIL,
    R_FOLDER,
    R_HELLO,
    TRASH_MAX_GB,
    TRASH_SHARE,
    VERSION,
    check_path,
    pack,
    records,
    refuse,
)
from .trash import check_budget
from .tree import Tree


def serve(tree: Tree, inp: BinaryIO, out: BinaryIO, *, keep_days: float, hello: dict) -> None:
    """Answer the client's records until the channel closes."""
    out.write(pack(R_HELLO, data=json.dumps(hello).encode()))
    out.flush()
    errors: List[List[str]] = []
    n = 0
    last_prune = 0.0
    for rec in records(inp.read):  # until the channel breaks (a cut record is not applied) or ends
        op, p, mode, mtime, offset, data = rec
        if tree.writer is not None:
            tree.writer.touch()
        if op == OP_END:
            tree.finish(errors)
            try:
                tree.trash.keep_within_budget()
            except OSError:
                pass
            out.write(pack(R_ACK, offset=n, data=json.dumps(
                {"errors": errors[:50], "trash": tree.trash.report()}).encode()))
            out.flush()
            errors, n = [], 0
            if time.monotonic() - last_prune > PRUNE_EVERY:
                last_prune = time.monotonic()
                _prune_quietly(tree, keep_days)
            continue
        if op == OP_MANIFEST:
            tree.finish(errors)
            count = 0
            for folder, data, more in tree.listing():
                out.write(pack(R_FOLDER, folder, offset=int(more), data=data))
                count += 1
            out.write(pack(R_DONE, offset=count))
            out.flush()
            continue
        if op == OP_GET:
            try:
                check_path(p)
                size = 0
                for fmode, fmtime, off, chunk in tree.read(p):
                    out.write(pack(R_DATA, p, mode=fmode, mtime_ns=fmtime, offset=off, data=chunk))
                    size = off + len(chunk)
                out.write(pack(R_DONE, p, offset=size))
            except (OSError, ValueError) as e:
                out.write(pack(R_FAIL, p, data=("%s: %s" % (type(e).__name__, e)).encode()))
            out.flush()
            continue
        n += 1
        try:
            if op not in (OP_PUT, OP_MKDIR, OP_LINK, OP_DELETE, OP_CHUNK, OP_COMMIT, OP_PLACE):
                raise ValueError("unknown operation %r" % op)
            check_path(p)
            if op == OP_CHUNK:  # (these two make room themselves: a failure drops the partial)
                tree.chunk(p, offset, data)
            elif op == OP_COMMIT:
                tree.commit(p, mode, mtime, offset, data)
            elif op == OP_PLACE:  # (makes room itself, as a put into place)
                tree.place(p, mode, mtime, offset, data)
            else:  # a full disk: the trash is pruned and the op done again (the live copy wins)
                tree.trash.roomy(_op(tree, op, p, mode, mtime, data), len(data))
        except Exception as e:  # noqa: BLE001 - reported to the client, the agent goes on
            tree.live.forget()
            errors.append([p.decode("utf-8", "replace"), "%s: %s" % (type(e).__name__, e)])
    tree.finish(errors)  # the new folders of a cut batch hold whole files only: keep them


def _op(tree: Tree, op: bytes, p: bytes, mode: int, mtime: int, data: bytes) -> Callable[[], None]:
    if op == OP_PUT:
        return lambda: tree.put(p, mode, mtime, data)
    if op == OP_MKDIR:
        return lambda: tree.mkdir(p, mode)
    if op == OP_LINK:
        return lambda: tree.link(p, data)
    return lambda: tree.delete(p)


def _prune_quietly(tree: Tree, keep_days: float) -> None:
    try:
        tree.trash.prune(keep_days)
        tree.clean_staging()
        tree.partials.clean(keep_days * 86400)
        tree.trash.keep_within_budget()
    except OSError:
        pass


def run_mirror(root: bytes, *, keep_days: float, backup: bool = True, share: float = TRASH_SHARE,
               max_gb: float = TRASH_MAX_GB, key_id: str = "", inp: Optional[BinaryIO] = None,
               out: Optional[BinaryIO] = None) -> int:
    """Serve one client: write into ``root`` as its one writer, the trash within its budget (at
    most ``share`` of the room it could use and ``max_gb``); 1 when another mirror writes there."""
    os.umask(0o077)
    try:  # 1 MiB pipe from sshd: fewer wake-ups per batch (Linux; fine without)
        fcntl.fcntl(0, 1031, 1 << 20)  # F_SETPIPE_SZ
    except (OSError, ValueError):
        pass
    share, max_gb = check_budget(share, max_gb)
    output = out or sys.stdout.buffer
    where = root.decode("utf-8", "replace")
    tree = Tree(root, backup=backup, share=share, max_bytes=int(max_gb * 1e9))
    try:
        refused = tree.lock(key_id, where)
        if refused is not None:
            output.write(pack(R_FAIL, data=refused.encode()))
            output.flush()
            sys.stderr.write("colab-remote: refused: %s\n" % refused)
            return 1
        if backup:
            _prune_quietly(tree, keep_days)
        assert tree.writer is not None
        hello = {"protocol": VERSION, "sha": own_sha(), "root": where, "keep_days": keep_days,
                 "pid": os.getpid(), "trash": tree.trash.report(), "lane": tree.writer.lane_token}
        serve(tree, inp or sys.stdin.buffer, output, keep_days=keep_days, hello=hello)
    finally:
        tree.close()
    return 0


def mirror_config(key_id: str) -> dict:
    with open(os.path.join(home(), HOME_DIR, "mirrors", ok_id(key_id) + ".json")) as f:
        return dict(json.load(f))


def direct_mirror(args: List[str]) -> int:
    """``(--root PATH | --dest PATH) --keep-days N [--trash-share S] [--trash-max-gb G] [--id KEY]
    [--no-backup] [--lane]`` (``--dest``: the destination as the user gave it, checked and made
    here as the set-up does; ``--lane``: the big-file lane of the agent that writes there, see
    :mod:`.lane`)"""
    values = {"--root": "", "--dest": "", "--keep-days": "", "--trash-share": repr(TRASH_SHARE),
              "--trash-max-gb": repr(TRASH_MAX_GB), "--id": ""}
    backup, lane, i = True, False, 0
    while i < len(args):
        if args[i] == "--no-backup":
            backup, i = False, i + 1
        elif args[i] == "--lane":
            lane, i = True, i + 1
        elif args[i] in values and i + 1 < len(args):
            values[args[i]], i = args[i + 1], i + 2
        else:
            return refuse("unknown mirror option %r" % args[i])
    if not (values["--root"] or values["--dest"]) or not values["--keep-days"]:
        return refuse("mirror needs --root PATH (or --dest PATH) --keep-days N")
    try:
        if values["--dest"]:
            values["--root"] = resolve_dest(values["--dest"])
        keep_days = float(values["--keep-days"])
        share, max_gb = check_budget(values["--trash-share"], values["--trash-max-gb"])
        key_id = ok_id(values["--id"]) if values["--id"] else ""
    except (ValueError, OSError) as e:
        return refuse(str(e))
    if lane:
        return run_lane(values["--root"].encode(), key_id=key_id, share=share, max_gb=max_gb)
    return run_mirror(values["--root"].encode(), keep_days=keep_days, backup=backup, share=share,
                      max_gb=max_gb, key_id=key_id)
