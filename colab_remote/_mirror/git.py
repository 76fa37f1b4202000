"""A git repository inside the mirrored folder: the order its files travel in.

Git writes a repository so that it can be read at every moment: an object after the objects it
names, a pack before its index, refs, ``HEAD`` and the index after the objects they name, loose
objects deleted only once a pack holds them. A batch of changes read from the folder comes sorted by
name instead, so :class:`~colab_remote._mirror.plan.Plan` sends it in stages (the agent applies
records in order, each stage ends with an end-of-batch mark):

=========  ==========================================================================================
BLOBS      everything outside a ``.git`` folder; blobs (loose, or too big to read: the big-file way)
           and packs
INDEXES    what indexes a pack (``.idx``, ``.rev``, ``.bitmap``)
OBJECTS    trees, commits and tags, each after the objects of the batch it names (:func:`ordered`)
NAMES      ``HEAD``, refs, ``packed-refs``, the index, reflogs, commit graphs, the multi-pack
           index: the rest of ``.git``
PACKED     deletes inside ``objects/`` (what a ``gc`` or ``repack`` made redundant)
=========  ==========================================================================================

A batch reads each file when it is planned, later than its event: a commit, the index or a ref
read then may name objects whose events are still on their way (a whole-tree pass lists each folder
once: a tree written just after its folder was listed is not in it). So before the trees and
commits are sent, and again before the names, the plan catches up (:attr:`Plan.catch_up`): the
watcher hands over every event up to now and the objects among them join the batch, ordered with
its own. So a server copy cut off anywhere (an outage, a killed agent, a full
disk) passes ``git fsck``.
The agent makes an object folder (``objects/ab``) in place, not in its staging area, so that each
object is there the moment it is written.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence

BLOBS, INDEXES, OBJECTS, NAMES, PACKED = range(5)
_PACK_INDEXES = (".idx", ".rev", ".bitmap", ".mtimes")
_GITLINK = b"160000"  # a submodule's commit in a tree: not in this repository's objects


def _inside(rel: str) -> list[str] | None:
    """The parts of ``rel`` inside its (innermost) repository's ``.git``; None outside one."""
    parts = rel.split("/")
    if ".git" not in parts[:-1]:
        return None
    inside = parts[len(parts) - parts[::-1].index(".git"):]
    while len(inside) > 2 and inside[0] == "modules":  # a submodule's repository
        inside = inside[2:]
    return inside


def in_repository(rel: str) -> bool:
    """``rel`` is inside a repository's ``.git`` (its order matters: :meth:`Plan.stages`)."""
    return _inside(rel) is not None


def is_object(rel: str) -> bool:
    """``rel`` is an object, a pack or a pack's index (what a batch's names may be waiting for),
    or a folder of them."""
    inside = _inside(rel)
    return inside is not None and inside[0] == "objects" and stage(rel) != NAMES


def keeps(rel: str) -> bool:
    """A folder a repository's objects are kept in (``objects/ab``, ``objects/pack``): git removes
    one only once it is empty, so one removed and made again is the same folder, not a folder
    replaced; its files' deletes come with their own events (and travel last)."""
    inside = _inside(rel)
    return inside is not None and len(inside) == 2 and inside[0] == "objects"


def stage(rel: str, *, delete: bool = False, data: bytes | None = None) -> int:
    """The stage ``rel`` travels in (see the module docstring); ``data``: a loose object's bytes,
    when read (a big one is taken for a blob)."""
    inside = _inside(rel)
    if inside is None:
        return BLOBS
    if inside[0] != "objects":
        return NAMES
    if delete:
        return PACKED
    last = inside[-1]
    if inside[1:2] == ["info"] or last == "multi-pack-index":
        return NAMES  # commit graphs name commits; the multi-pack index names packs
    if last.endswith(_PACK_INDEXES):
        return INDEXES
    if len(inside) == 3 and len(inside[1]) == 2 and data is not None and _kind(data) != b"blob":
        return OBJECTS
    return BLOBS


def _kind(data: bytes) -> bytes:
    """A loose object's type (``b"blob"``, ``b"tree"``, ...), from its compressed header."""
    try:
        head = zlib.decompressobj().decompress(data, 32)
    except zlib.error:
        return b""
    return head.split(b" ", 1)[0]


def _names(width: int, data: bytes) -> list[str]:
    """The objects a loose tree, commit or tag names (hex ids of ``width`` bytes: 20 for SHA-1,
    32 for SHA-256), read from its bytes."""
    try:
        raw = zlib.decompress(data)
    except zlib.error:
        return []
    header, _, body = raw.partition(b"\0")
    kind = header.split(b" ", 1)[0]
    found: list[str] = []
    if kind == b"tree":
        at = 0
        while at < len(body):
            end = body.find(b"\0", at)
            if end < 0:
                break
            if not body.startswith(_GITLINK + b" ", at):
                found.append(body[end + 1:end + 1 + width].hex())
            at = end + 1 + width
    elif kind in (b"commit", b"tag"):
        for line in body.split(b"\n"):
            if not line:
                break  # the end of the headers
            key, _, value = line.partition(b" ")
            if key in (b"tree", b"parent", b"object"):
                found.append(value.decode("ascii", "replace"))
    return found


def ordered(ops: Sequence[tuple[bytes, str, int, int, bytes | None]],
            ) -> Iterable[tuple[bytes, str, int, int, bytes | None]]:
    """``ops`` (puts of loose objects) so that each comes after the ones it names."""
    ids = []
    for op in ops:
        folder, _, name = op[1].rpartition("/")
        ids.append(folder[-2:] + name)
    by_id = {oid: i for i, oid in enumerate(ids)}
    state = [0] * len(ops)  # 0: not yet, 1: what it names under way, 2: placed
    out = []
    for first in range(len(ops)):
        todo = [(first, False)]  # depth first, each object after what it names (no recursion)
        while todo:
            i, named_placed = todo.pop()
            if named_placed:
                state[i] = 2
                out.append(ops[i])
                continue
            if state[i]:
                continue  # placed, or under way (a malformed object naming itself round)
            state[i] = 1
            todo.append((i, True))
            for ref in _names(len(ids[i]) // 2, ops[i][4] or b""):
                j = by_id.get(ref)
                if j is not None and not state[j]:
                    todo.append((j, False))
    return out
