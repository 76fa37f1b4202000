"""The destination's tree: puts, folders, links, deletes, big files in chunks, the listing
(:mod:`.listing`) and reads, every write through :mod:`.fs` and everything replaced kept in the
:class:`~.trash.Trash`."""

import os
import stat
from typing import Dict, Iterator, List, Optional, Tuple

from .fs import (
    Folders,
    chmod_folder,
    join,
    lstat_at,
    names_in,
    read_digest,
    remove_at,
    remove_quietly,
    same_content,
    set_mode_time,
    split,
    write_at,
    write_new,
)
from .listing import listing
from .partials import Partials
from .procs import left_by_dead
from .protocol import (
    CHUNK,
    MODE_MASK,
    O_CLOEXEC,
    O_DIR,
    O_NEW,
    O_READ,
    STAGING,
    TMP_INFIX,
    TRASH_MAX_GB,
    TRASH_SHARE,
)
from .trash import Trash
from .writer import Writer


class Tree:
    """The destination folder, changed only through descriptors opened from it (never a path).

    Puts go under a temporary name and are renamed into place; what they replace is linked into
    the trash first. A folder that is new on the server is built whole in the staging folder and
    renamed into place when its batch ends (no temporary name per file, never visible half-built).
    """

    def __init__(self, root: bytes, *, backup: bool = True, share: float = TRASH_SHARE,
                 max_bytes: int = int(TRASH_MAX_GB * 1e9)) -> None:
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | O_CLOEXEC)
        self.live = Folders(self.root_fd)
        self.trash = Trash(self.root_fd, backup=backup, share=share, max_bytes=max_bytes)
        self.writer: Optional[Writer] = None
        self.stage: Optional[Folders] = None
        self.stage_name = b"%d" % os.getpid()
        self.staging_tried = False
        self.fresh: Dict[bytes, bytes] = {}  # new folder -> where it is built (in the stage)
        self.tops: List[Tuple[bytes, bytes]] = []  # (built at, real path), in order
        self.later: List[Tuple[bytes, int]] = []  # folder modes set once their files are in
        self.big: Dict[bytes, bytes] = {}  # big file -> its partial file (in the stage)
        self.partials = Partials(self.root_fd, self.trash.roomy)  # what lanes receive (OP_PLACE)
        self.counter = 0
        self.tmp_end = TMP_INFIX + b"%d" % os.getpid()

    def _name(self, prefix: bytes) -> bytes:
        self.counter += 1
        return prefix + b"%d" % self.counter

    def discard(self, fd: int, name: bytes, rel: bytes) -> None:
        """Move ``rel`` (``name`` in folder ``fd``) to the trash, or remove it without a backup."""
        self.live.forget(rel)
        self.trash.discard(fd, name, rel)

    def _make_way(self, parent: int, name: bytes, rel: bytes) -> None:
        self.discard(parent, name, rel)  # a file or link where a folder belongs

    # -- new folders, built in the stage -----------------------------------------------------
    def _stage(self) -> Optional[Folders]:
        """This agent's staging folder (None when it cannot be made on the copy's file system)."""
        if not self.staging_tried:
            self.staging_tried = True
            try:
                tfd = self.trash.folders().get(STAGING, create=True)
                assert tfd is not None
                remove_at(tfd, self.stage_name)  # an earlier agent with the same pid
                os.mkdir(self.stage_name, 0o700, dir_fd=tfd)
                fd = os.open(self.stage_name, O_DIR, dir_fd=tfd)
                if os.fstat(fd).st_dev == os.fstat(self.root_fd).st_dev:  # rename: one file system
                    self.stage = Folders(fd)
                else:
                    os.close(fd)
            except OSError:
                pass  # new folders are then made in place, as any other
        return self.stage

    def _built(self, rel: bytes, create: bool) -> Optional[bytes]:
        """Where ``rel`` is built in the stage when it or a folder above it is new in this batch,
        else None. With ``create``, ``rel`` is a folder: it and the folders between are made in
        the stage; without, nothing is made (a delete never builds what it deletes)."""
        if not self.fresh or self.stage is None:
            return None
        cur, rest = rel, []  # type: bytes, List[bytes]
        while cur and cur not in self.fresh:
            cur, name = split(cur)
            rest.append(name)
        if not cur:
            return None
        at = self.fresh[cur]
        for name in reversed(rest):
            at, cur = join(at, name), join(cur, name)
            if create:
                fd = self.stage.get(split(at)[0], create=False)
                if fd is None:
                    return None
                st = lstat_at(fd, name)
                if st is not None and not stat.S_ISDIR(st.st_mode):
                    remove_at(fd, name)
                    st = None
                if st is None:
                    os.mkdir(name, 0o700, dir_fd=fd)  # a folder the batch did not list
                self.fresh[cur] = at
        return at

    def _in_stage(self, p: bytes) -> Optional[Tuple[int, bytes, bytes]]:
        """(folder fd in the stage, name, where p goes) when p's folder is being built."""
        d, name = split(p)
        at = self._built(d, create=True) if d else None
        if at is None:
            return None
        assert self.stage is not None
        fd = self.stage.get(at, create=False)
        return None if fd is None else (fd, name, join(at, name))

    def _live_parent(self, p: bytes) -> Tuple[int, bytes, Optional[os.stat_result]]:
        """(folder fd, name, lstat) of ``p`` in the copy, its folders made (links moved away)."""
        d, name = split(p)
        fd = self.live.get(d, create=True, make=self._make_way)
        assert fd is not None
        return fd, name, lstat_at(fd, name)

    # -- operations ----------------------------------------------------------------------------
    def put(self, p: bytes, mode: int, mtime: int, data: bytes) -> None:
        mode &= MODE_MASK
        staged = self._in_stage(p)
        if staged is not None:  # a folder this batch builds: the name is new but for a resend
            fd, name, _ = staged
            try:
                write_new(fd, name, mode, mtime, data)
            except FileExistsError:
                remove_at(fd, name)
                write_new(fd, name, mode, mtime, data)
            return
        fd, name, st = self._live_parent(p)
        if st is not None and stat.S_ISDIR(st.st_mode):
            self.discard(fd, name, p)
            st = None
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == len(data) \
                and same_content(fd, name, data):
            if stat.S_IMODE(st.st_mode) != mode or st.st_mtime_ns != mtime:
                set_mode_time(fd, name, mode, mtime)
            return
        tmp = self._tmpname(name)
        remove_at(fd, tmp)  # left by an earlier agent of the same pid
        write_new(fd, tmp, mode, mtime, data)
        self._into_place(fd, tmp, fd, name, p, st)

    def _into_place(self, src_fd: int, tmp: bytes, fd: int, name: bytes, p: bytes,
                    st: Optional[os.stat_result]) -> None:
        """Rename ``tmp`` over ``name`` (what it replaces into the trash first); on failure the
        temporary file goes, so a full disk leaves no debris."""
        try:
            if st is not None:
                old = st
                self.trash.roomy(lambda: self.trash.keep_old(fd, name, p, old))
            self.trash.roomy(lambda: os.rename(tmp, name, src_dir_fd=src_fd, dst_dir_fd=fd))
        except BaseException:
            remove_quietly(src_fd, tmp)
            raise

    def _tmpname(self, name: bytes) -> bytes:
        return b"." + name[:180] + self.tmp_end

    def mkdir(self, p: bytes, mode: int) -> None:
        mode &= MODE_MASK
        if p in self.fresh:
            return
        staged = self._in_stage(p)
        if staged is not None:
            fd, name, at = staged
            remove_at(fd, name)
        else:
            fd, name, st = self._live_parent(p)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                self.discard(fd, name, p)
                st = None
            stage = self._stage() if st is None and not _in_place(p) else None
            if stage is None:
                if st is None:
                    os.mkdir(name, 0o700, dir_fd=fd)
                if st is None or stat.S_IMODE(st.st_mode) != mode:
                    chmod_folder(fd, name, mode)
                return
            at = self._name(b"new-")
            remove_at(stage.root, at)
            self.tops.append((at, p))
            fd, name = stage.root, at
        os.mkdir(name, 0o700, dir_fd=fd)
        if mode != 0o700:
            self.later.append((p, mode))  # set once its files are in
        self.fresh[p] = at

    def link(self, p: bytes, target: bytes) -> None:
        if b"\0" in target or not target:
            raise ValueError("refused link target")
        staged = self._in_stage(p)
        if staged is not None:
            fd, name, _ = staged
            remove_at(fd, name)
            os.symlink(target, name, dir_fd=fd)
            return
        fd, name, st = self._live_parent(p)
        if st is not None and stat.S_ISLNK(st.st_mode) and os.readlink(name, dir_fd=fd) == target:
            return
        if st is not None and stat.S_ISDIR(st.st_mode):
            self.discard(fd, name, p)
            st = None
        tmp = self._tmpname(name)
        remove_at(fd, tmp)
        os.symlink(target, tmp, dir_fd=fd)
        self._into_place(fd, tmp, fd, name, p, st)

    def delete(self, p: bytes) -> None:
        at = self._built(p, create=False)
        if at is not None:  # new in this batch: never on the server, nothing to keep
            assert self.stage is not None
            d, name = split(at)
            fd = self.stage.get(d, create=False)
            if fd is not None:
                self.stage.forget(at)
                remove_at(fd, name)
            for k in [k for k in self.fresh if k == p or k.startswith(p + b"/")]:
                del self.fresh[k]
            self.tops = [t for t in self.tops if t[1] != p]
            return
        d, name = split(p)
        fd = self.live.get(d, create=False)  # its folder is not there (or is a link): nothing to do
        if fd is not None and lstat_at(fd, name) is not None:
            self.discard(fd, name, p)

    def _partials(self) -> int:
        stage = self._stage()
        if stage is not None:
            return stage.root
        fd = self.trash.folders().get(STAGING, create=True)
        assert fd is not None
        return fd

    def chunk(self, p: bytes, offset: int, data: bytes) -> None:
        """Part of a big file, written into a partial file in the stage."""
        fd = self._partials()
        name = self.big.get(p)
        if offset == 0 or name is None:
            if offset != 0:
                raise ValueError("a chunk at %d of a file not begun" % offset)
            if name is not None:
                remove_quietly(fd, name)
            name = self.big[p] = self._name(b"big-" + self.stage_name + b"-")
            out = os.open(name, O_NEW, 0o600, dir_fd=fd)
        else:
            out = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | O_CLOEXEC, dir_fd=fd)
        try:
            have = os.fstat(out).st_size
            if have != offset:
                raise ValueError("a chunk at %d does not follow the %d bytes received" % (offset, have))
            self.trash.roomy(lambda: write_at(out, offset, data), len(data))
        except BaseException:
            os.close(out)
            remove_quietly(fd, name)
            self.big.pop(p, None)
            raise
        os.close(out)

    def commit(self, p: bytes, mode: int, mtime: int, size: int, want: bytes) -> None:
        """A big file is whole: check it and put it in place (what it replaces to the trash)."""
        name = self.big.pop(p, None)
        if name is None:
            raise ValueError("no part of this file arrived")
        sfd = self._partials()
        fd = os.open(name, O_READ, dir_fd=sfd)
        try:
            got, digest = read_digest(fd)
            if got != size or (want and digest != want):
                raise ValueError("the file arrived damaged (%d of %d bytes)" % (got, size))
            os.fchmod(fd, mode & MODE_MASK)
            os.utime(fd, ns=(mtime, mtime))
        except BaseException:
            os.close(fd)
            remove_quietly(sfd, name)
            raise
        os.close(fd)
        self._put_whole(sfd, name, p)

    def place(self, p: bytes, mode: int, mtime: int, size: int, want: bytes) -> None:
        """A big file a lane received and checked (its partial named by its digest): in place."""
        sfd, name = self.partials.whole(p, size, want)
        fd = os.open(name, O_READ, dir_fd=sfd)
        try:
            os.fchmod(fd, mode & MODE_MASK)
            os.utime(fd, ns=(mtime, mtime))
        finally:
            os.close(fd)
        self._put_whole(sfd, name, p)

    def _put_whole(self, sfd: int, name: bytes, p: bytes) -> None:
        """Rename a whole file from the staging area to ``p`` (what it replaces to the trash)."""
        staged = self._in_stage(p)
        if staged is not None:
            dfd, dname, _ = staged
            remove_at(dfd, dname)
            os.rename(name, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
            return
        dfd, dname, st = self._live_parent(p)
        if st is not None and stat.S_ISDIR(st.st_mode):
            self.discard(dfd, dname, p)
            st = None
        self._into_place(sfd, name, dfd, dname, p, st)

    def finish(self, errors: List[List[str]]) -> None:
        """End of a batch: the new folders into place (the client hears of it only after this)."""
        for at, p in self.tops:
            try:
                self._settle(at, p)
            except Exception as e:  # noqa: BLE001 - reported to the client
                self.live.forget()
                errors.append([p.decode("utf-8", "replace"), "%s: %s" % (type(e).__name__, e)])
        for p, mode in reversed(self.later):
            d, name = split(p)
            fd = self.live.get(d, create=False)
            if fd is not None:
                try:
                    chmod_folder(fd, name, mode)
                except OSError:
                    pass
        if self.stage is not None:
            self.stage.forget()
        self.fresh.clear()
        self.tops, self.later = [], []
        self.trash.batch_done()

    def _settle(self, at: bytes, p: bytes) -> None:
        """Put folder ``at`` (built in the stage) at ``p``; merge when ``p`` appeared meanwhile."""
        assert self.stage is not None
        fd, name, st = self._live_parent(p)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            self.discard(fd, name, p)
            st = None
        if st is None:
            os.rename(at, name, src_dir_fd=self.stage.root, dst_dir_fd=fd)
        else:
            self._merge(self.stage.root, at, fd, name, p)

    def _merge(self, sparent: int, sname: bytes, dparent: int, dname: bytes, rel: bytes) -> None:
        src = os.open(sname, O_DIR, dir_fd=sparent)
        try:
            dst = os.open(dname, O_DIR, dir_fd=dparent)
            try:
                for n in names_in(src):
                    r = join(rel, n)
                    new_is_dir = stat.S_ISDIR(os.stat(n, dir_fd=src, follow_symlinks=False).st_mode)
                    old = lstat_at(dst, n)
                    if old is not None:
                        if new_is_dir and stat.S_ISDIR(old.st_mode):
                            self._merge(src, n, dst, n, r)
                            continue
                        if new_is_dir or stat.S_ISDIR(old.st_mode):
                            self.discard(dst, n, r)
                        else:
                            self.trash.keep_old(dst, n, r, old)
                    os.rename(n, n, src_dir_fd=src, dst_dir_fd=dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        os.rmdir(sname, dir_fd=sparent)

    # -- reading -------------------------------------------------------------------------------
    def listing(self) -> Iterator[Tuple[bytes, bytes, bool]]:
        """The copy a folder at a time: see :func:`.listing.listing`."""
        return listing(self.root_fd)

    def read(self, p: bytes) -> Iterator[Tuple[int, int, int, bytes]]:
        """A file's chunks: (mode, mtime, offset, data); the last one is short (maybe empty)."""
        d, name = split(p)
        fd = self.live.get(d, create=False)
        if fd is None:
            raise FileNotFoundError(p.decode("utf-8", "replace"))
        f = os.open(name, O_READ, dir_fd=fd)
        try:
            st = os.fstat(f)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError("not a regular file")
            offset = 0
            while True:
                chunk = os.read(f, CHUNK)
                yield st.st_mode, st.st_mtime_ns, offset, chunk
                offset += len(chunk)
                if len(chunk) < CHUNK:
                    return
        finally:
            os.close(f)

    # -- upkeep --------------------------------------------------------------------------------
    def clean_staging(self) -> None:
        """Remove what agents that are gone left in the staging folder."""
        tfd = self.trash.folders().get(STAGING, create=False)
        if tfd is None:
            return
        for name in names_in(tfd):
            owner = name.split(b"-")[1] if name.startswith(b"big-") else name
            if left_by_dead(owner):
                try:
                    remove_at(tfd, name)
                except OSError:
                    pass

    # -- one writer ------------------------------------------------------------------------------
    def lock(self, key_id: str, root: str) -> Optional[str]:
        """Become this destination's one writer (see :class:`Writer`); None, or why not."""
        self.writer = Writer(self.trash.folders().root, key_id, root)
        return self.writer.acquire()

    def close(self) -> None:
        """Close every descriptor; the empty staging folder (and an empty trash) go."""
        self.live.forget()
        self.partials.close()
        if self.stage is not None:
            self.stage.forget()
            os.close(self.stage.root)
            self.stage = None
        if self.writer is not None:
            self.writer.release()
            self.writer = None
        self.trash.close(self.stage_name)
        os.close(self.root_fd)


def _in_place(p: bytes) -> bool:
    """A git repository's object folder (``.git/objects/ab``) is made in place, not in the stage:
    the client sends each object after those it names, and each must be there once written."""
    parts = p.split(b"/")
    return len(parts) >= 3 and parts[-2] == b"objects" and b".git" in parts[:-2]
