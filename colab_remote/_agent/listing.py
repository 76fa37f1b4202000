"""The copy listed a folder at a time (the answer to ``OP_MANIFEST``: one ``R_FOLDER`` record per
folder, see :func:`.protocol.entries`), what the whole-tree pass compares with the runtime's folder
(:mod:`colab_remote._mirror.compare`) as it streams."""

import os
import stat
import sys
from typing import Iterator, List, Tuple

from .fs import join, open_folder, remove_quietly
from .procs import left_by_dead
from .protocol import LIST_BYTES, LIST_ENTRY, TMP_INFIX, TRASH


def listing(root_fd: int, limit: int = LIST_BYTES) -> Iterator[Tuple[bytes, bytes, bool]]:
    """The copy under ``root_fd`` a folder at a time (the trash and temporary names left out):
    ``(folder, packed entries, more of this folder follows)``, a folder before the folders in it.

    One stat per entry and one record per folder: the whole-tree pass's listing costs about what
    ``rsync -a``'s own file list does. Folders are opened one level at a time (open descriptors:
    the depth, not the width of the tree); temporary names left by dead agents are removed on the
    way."""
    subs: List[bytes] = []
    top = os.dup(root_fd)
    stack = [(b"", top, subs)]
    try:
        for block in _list_folder(b"", top, subs, limit):
            yield block
        while stack:
            rel, fd, subs = stack[-1]
            if not subs:
                os.close(fd)
                stack.pop()
                continue
            name = subs.pop()
            sub = open_folder(fd, name, False)
            if sub is None:
                continue
            r = join(rel, name)
            stack.append((r, sub, []))
            for block in _list_folder(r, sub, stack[-1][2], limit):
                yield block
    finally:
        for _, fd, _ in stack:
            os.close(fd)


def _list_folder(rel: bytes, fd: int, subs: List[bytes], limit: int) -> Iterator[Tuple[bytes, bytes, bool]]:
    """One folder's R_FOLDER blocks; its subfolders' names go to ``subs``."""
    pack_entry, parts, size = LIST_ENTRY.pack, [], 0
    is_reg, is_dir, is_lnk = stat.S_ISREG, stat.S_ISDIR, stat.S_ISLNK
    encoding, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
    for text in os.listdir(fd):
        name = text.encode(encoding, errors)  # os.fsencode, without its cost per name
        if TMP_INFIX in name:
            if left_by_dead(name):
                remove_quietly(fd, name)
            continue
        if not rel and name == TRASH:
            continue
        try:
            st = os.stat(text, dir_fd=fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            continue
        mode = st.st_mode
        if is_reg(mode):
            part = pack_entry(len(name), mode, st.st_mtime_ns, st.st_size, 0) + name
        elif is_dir(mode):
            subs.append(name)
            part = pack_entry(len(name), mode, st.st_mtime_ns, 0, 0) + name
        elif is_lnk(mode):
            try:
                target = os.readlink(name, dir_fd=fd)
            except OSError:
                continue
            part = pack_entry(len(name), mode, st.st_mtime_ns, 0, len(target)) + name + target
        else:
            continue
        parts.append(part)
        size += len(part)
        if size >= limit:
            yield rel, b"".join(parts), True
            parts, size = [], 0
    yield rel, b"".join(parts), False
