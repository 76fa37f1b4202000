"""The agent's own folder in the server account's home (``~/.colab-remote``): agents, the
mirrors' config, the tunnels' sessions; who this agent is (its zip, its sha256), key ids, and
which folders of the account a mirror or a sync may write."""

import errno
import hashlib
import os
import pwd

from .protocol import HOME_DIR, O_DIR


def own_archive() -> str:
    """The zip this agent runs from (``agent-<sha12>.pyz``; at set-up a private temporary copy)."""
    return getattr(globals().get("__loader__"), "archive", "")


STAMP = "colab-remote-agent"  # an installed agent's zip comment starts so (see .setup.stamp)


def installed_stamp(data: bytes) -> bytes:
    """The comment of an installed agent's zip ``data`` (b"" when it has none of ours)."""
    at = data.rfind(STAMP.encode(), -200)
    if at < 2 or int.from_bytes(data[at - 2:at], "little") != len(data) - at:
        return b""
    return data[at:]


def own_sha() -> str:
    """sha256 of the zip this agent came as (what the client pinned: an installed agent's zip
    also holds its compiled modules, and says so in its comment); "" when not from one."""
    try:
        with open(own_archive(), "rb") as f:
            data = f.read()
    except OSError:
        return ""
    words = installed_stamp(data).split()
    return words[1].decode() if len(words) == 3 else hashlib.sha256(data).hexdigest()


def home() -> str:
    return pwd.getpwuid(os.getuid()).pw_dir


def own_folder(path: str, mode: int = 0o700) -> int:
    """A folder of this user's, opened (created 0700 when missing); never a link."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, O_DIR)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise PermissionError("%s is a link or not a folder: refused (nothing is written "
                                  "through a link)" % path) from None
        raise
    st = os.fstat(fd)
    if st.st_uid != os.getuid():
        os.close(fd)
        raise PermissionError("%s belongs to another user" % path)
    return fd


def state_dir() -> int:
    return own_folder(os.path.join(home(), HOME_DIR))


def runtime_of(key_id: str) -> str:
    """The runtime part of a key id (``RUNTIME.PURPOSE``)."""
    return key_id.split(".", 1)[0]


def ok_id(text: str) -> str:
    if not text or len(text) > 80 or any(not (c.isalnum() or c in "-_.") for c in text):
        raise ValueError("a key id is 1-80 letters, digits, '-', '_', '.': %r" % text)
    return text


def resolve_dest(dest: str) -> str:
    """The destination as an absolute real path (made when missing); refused when the mirror could
    write over the account itself (the home folder, ``~/.ssh``, our own folder) from there."""
    if not dest or "\0" in dest or "\n" in dest:
        raise ValueError("the destination must be a folder path")
    if ".." in dest.split("/"):
        raise ValueError("the destination must not contain '..': %r" % dest)
    if dest.startswith("~") and not dest.startswith("~/"):
        raise ValueError("the destination must be a folder of this account: %r" % dest)
    own = os.path.realpath(home())
    path = os.path.join(own, dest[2:] if dest.startswith("~/") else dest)
    _refused(os.path.realpath(path), own)  # before anything is made
    os.makedirs(path, 0o700, exist_ok=True)
    real = os.path.realpath(path)
    _refused(real, own)  # (and as made: a link may have appeared on the way)
    return real


def _refused(real: str, own: str) -> None:
    if real == own or own.startswith(real.rstrip("/") + "/"):
        raise ValueError("the destination %s holds the home folder: pick a folder of its own, "
                         "e.g. ~/backup/project" % real)
    for guarded in (os.path.join(own, ".ssh"), os.path.join(own, HOME_DIR)):
        if real == guarded or real.startswith(guarded + "/"):
            raise ValueError("the destination %s is inside %s" % (real, guarded))


def resolve_sync_folder(dest: str) -> str:
    """A two-way sync's folder on this account (see :func:`resolve_dest`), and never one inside a
    dot folder of the home (``~/.config``, ``~/.local``: what they hold decides what runs here)."""
    real = resolve_dest(dest)
    own = os.path.realpath(home())
    if real.startswith(own + "/") and real[len(own) + 1:].startswith("."):
        raise ValueError("the sync's folder %s is inside a dot folder of the home: pick a project "
                         "folder, e.g. ~/project" % real)
    return real
