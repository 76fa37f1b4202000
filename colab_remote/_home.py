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

from ._sshd_config import PATH_VARIABLE
from .errors import SshdError

PROFILE_BEGIN = "# >>> colab-remote: the notebook kernel's environment in SSH login shells >>>"
PROFILE_END = "# <<< colab-remote <<<"
# Earlier versions wrote the environment to ~/.ssh/environment (PermitUserEnvironment): removed.
OLD_ENV_HEADER = "# Written by colab_remote.start_sshd(): the notebook kernel's environment."
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


# --- what start_sshd and self_check write -------------------------------------------------------


def add_authorized_keys(account: pwd.struct_passwd, keys: list[str]) -> None:
    """Add keys to ~/.ssh/authorized_keys: existing lines kept, no duplicates, 0600.

    Written as root without following links (see the top of this module).
    """
    existing = (read(account, ".ssh/authorized_keys") or "").splitlines()
    lines = list(existing)
    have = {key_identity(line) for line in existing}
    for key in keys:
        if key_identity(key) not in have:
            have.add(key_identity(key))
            lines.append(key)
    write(account, ".ssh/authorized_keys", "\n".join(lines).strip("\n") + "\n", 0o600)


def remove_authorized_key(account: pwd.struct_passwd, blob: str) -> None:
    """Remove every line holding the key ``blob`` from ~/.ssh/authorized_keys (no links followed)."""
    text = read(account, ".ssh/authorized_keys")
    if text is None:
        return
    lines = [line for line in text.splitlines() if blob not in line]
    write(account, ".ssh/authorized_keys", "\n".join(lines) + ("\n" if lines else ""), 0o600)


def key_identity(line: str) -> str:
    words = line.split()
    for i, w in enumerate(words[:-1]):
        if w.startswith(("ssh-", "ecdsa-", "sk-")):
            return words[i + 1]
    return line


def write_login_profile(account: pwd.struct_passwd) -> None:
    """A marked block in the user's profile that puts the kernel's PATH back in login shells.

    sshd gives every session the kernel's environment (SetEnv in its root-owned config); a login
    shell then runs /etc/profile, which resets PATH. The block restores it from
    ``COLAB_REMOTE_PATH``, which sshd itself set. Written as root without following links.
    """
    with contextlib.suppress(SshdError):  # a tidy-up only: never through a link
        remove(account, ".ssh/environment", if_starts_with=OLD_ENV_HEADER)
    block = "\n".join([
        PROFILE_BEGIN,
        f'if [ -n "${{SSH_CONNECTION-}}" ] && [ -n "${{{PATH_VARIABLE}-}}" ]; then',
        f'  PATH="${PATH_VARIABLE}"; export PATH',
        "fi",
        PROFILE_END,
    ]) + "\n"
    names = [".profile"] + [n for n in (".bash_profile", ".bash_login")
                            if read(account, n) is not None]
    for name in names:
        old = read(account, name) or ""
        start, end = old.find(PROFILE_BEGIN), old.find(PROFILE_END)
        if start != -1 and end != -1:
            new = old[:start] + block + old[end + len(PROFILE_END):].lstrip("\n")
        else:
            new = old + ("\n" if old and not old.endswith("\n") else "") + block
        if new != old:
            write(account, name, new, None if old else 0o644)
