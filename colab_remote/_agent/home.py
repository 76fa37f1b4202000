"""The agent's own folder in the server account's home (``~/.colab-remote``): agents, the
mirrors' config, the tunnels' sessions; who this agent is (its zip, its sha256) and key ids."""

import errno
import hashlib
import os
import pwd

from .protocol import HOME_DIR, O_DIR


def own_archive() -> str:
    """The zip this agent runs from (``agent-<sha12>.pyz``; at set-up a private temporary copy)."""
    return getattr(globals().get("__loader__"), "archive", "")


def own_sha() -> str:
    """sha256 of the zip this agent runs from (what the client pinned); "" when not from one."""
    try:
        with open(own_archive(), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return ""


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
