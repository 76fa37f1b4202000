"""Root's reads and writes in a user's home, without following anything the user controls.

``start_sshd(user="alice")`` runs as root and writes ``~alice/.ssh/authorized_keys`` and
``~alice/.profile``. Alice owns her home: she can make ``~/.ssh`` a link to ``/etc`` or
``authorized_keys`` a link (or a hard link) to ``/etc/shadow``. Every path below the home is
therefore walked one component at a time from the home's descriptor with ``O_NOFOLLOW``; a
link, a non-regular file or a file with other hard links is refused with an :class:`SshdError`
that says which path and why. New files are written under an unpredictable name created
exclusively in the same folder, handed to the user with ``fchown`` on the open descriptor, and
renamed into place (a rename replaces a name, it never writes through it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import secrets
import stat
from collections.abc import Iterator

from .errors import SshdError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _refuse(account: pwd.struct_passwd, relpath: str, why: str) -> SshdError:
    return SshdError(
        f"refusing to write ~{account.pw_name}/{relpath} as root: it {why}",
        fix=(f"colab-remote writes into {account.pw_name}'s home only through real files and "
             f"folders; replace {os.path.join(account.pw_dir, relpath)} by a regular "
             "file/folder of that user, or use another user="),
    )


@contextlib.contextmanager
def _folder(account: pwd.struct_passwd, parts: list[str], *, create: bool) -> Iterator[int]:
    """A descriptor of ``~user/parts...``, each component opened without following links.

    ``create`` makes missing folders (0700, owned by the user). Yields -1 when a folder is
    missing and ``create`` is false.
    """
    try:
        fd = os.open(account.pw_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise SshdError(f"cannot open the home folder {account.pw_dir} of {account.pw_name}: "
                        f"{e.strerror}",
                        fix=f"create it (mkhomedir_helper {account.pw_name}) or use another user=") from e
    done: list[str] = []
    try:
        for part in parts:
            done.append(part)
            where = "/".join(done)
            if create:
                try:
                    os.mkdir(part, 0o700, dir_fd=fd)
                    made = True
                except FileExistsError:
                    made = False
            try:
                sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if create:
                    raise
                os.close(fd)
                fd = -1
                break
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    link = stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode)
                    raise _refuse(account, where, "is a symbolic link" if link else
                                  "is not a folder") from e
                raise
            os.close(fd)
            fd = sub
            st = os.fstat(fd)
            if st.st_uid not in (account.pw_uid, 0):
                raise _refuse(account, where, f"belongs to another user (uid {st.st_uid})")
            if create and (made or st.st_uid != account.pw_uid):
                # Ours to hand over: a folder we just made, or one root left in the user's home.
                os.fchown(fd, account.pw_uid, account.pw_gid)
                os.fchmod(fd, 0o700)
            elif create and stat.S_IMODE(st.st_mode) & 0o077:
                os.fchmod(fd, 0o700)  # sshd's StrictModes wants ~/.ssh private
        yield fd
    finally:
        if fd >= 0:
            os.close(fd)


def _split(relpath: str) -> tuple[list[str], str]:
    parts = relpath.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"not a plain relative path: {relpath!r}")
    return parts[:-1], parts[-1]


def _entry(account: pwd.struct_passwd, folder: int, name: str, relpath: str) -> os.stat_result | None:
    """lstat of ``name`` in ``folder``; refuses anything but a regular file of the user (or root)."""
    try:
        st = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return _check(account, st, relpath)


def _check(account: pwd.struct_passwd, st: os.stat_result, relpath: str) -> os.stat_result:
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(account, relpath, "is a symbolic link")
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(account, relpath, "is not a regular file")
    if st.st_nlink > 1:
        raise _refuse(account, relpath, f"has {st.st_nlink} hard links (it may be another file)")
    if st.st_uid not in (account.pw_uid, 0):
        raise _refuse(account, relpath, f"belongs to another user (uid {st.st_uid})")
    return st


def read(account: pwd.struct_passwd, relpath: str) -> str | None:
    """The text of ``~user/relpath``, or None when it (or a folder on the way) does not exist."""
    parents, name = _split(relpath)
    with _folder(account, parents, create=False) as folder:
        if folder < 0 or _entry(account, folder, name, relpath) is None:
            return None
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=folder)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise _refuse(account, relpath, "is a symbolic link") from e
            raise
        with open(fd, "rb") as f:
            _check(account, os.fstat(f.fileno()), relpath)  # the same file as the lstat saw
            return f.read().decode(errors="surrogateescape")


def write(account: pwd.struct_passwd, relpath: str, text: str, mode: int | None = None) -> None:
    """Replace ``~user/relpath`` with ``text``, owned by the user.

    ``mode`` defaults to the existing file's permissions (0600 for a new file). Folders on the
    way are made 0700 when missing (``~/.ssh``).
    """
    parents, name = _split(relpath)
    with _folder(account, parents, create=True) as folder:
        old = _entry(account, folder, name, relpath)
        if mode is None:
            mode = stat.S_IMODE(old.st_mode) & 0o777 if old is not None else 0o600
        tmp = f".{name}.colab-remote-{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=folder)
        try:
            try:
                data = text.encode(errors="surrogateescape")
                while data:
                    data = data[os.write(fd, data):]
                os.fchown(fd, account.pw_uid, account.pw_gid)
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=folder)
            raise


def remove(account: pwd.struct_passwd, relpath: str, *, if_starts_with: str) -> bool:
    """Delete ``~user/relpath`` when it is a regular file starting with ``if_starts_with``."""
    text = read(account, relpath)
    if text is None or not text.startswith(if_starts_with):
        return False
    parents, name = _split(relpath)
    with _folder(account, parents, create=False) as folder:
        if folder >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=folder)
    return True
