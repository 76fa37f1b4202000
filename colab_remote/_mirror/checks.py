"""What mirror() and push() refuse before anything runs: a ValueError or TypeError that says what
was wrong and what is allowed (a local folder, a destination, ports, flags, the trash's budget);
and the mirror's refusal to start from a folder emptied here (:func:`refuse_emptied`)."""

from __future__ import annotations

import dataclasses
import logging
import os
import pwd
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import _ssh, _sync
from .._daemon import state_path
from ..errors import MirrorError

log = logging.getLogger("colab_remote.mirror")


def refuse_emptied(root: str, destination: str, server_files: int,
                   count_local: Callable[[int], int]) -> None:
    """Refuse to start from a folder holding fewer than half of the server copy's files."""
    if not server_files:
        return
    local_files = count_local((server_files + 1) // 2)
    log.info("server copy: %d files; local: at least %d files", server_files, local_files)
    if local_files * 2 < server_files:
        raise refusal(root, destination, "is empty" if local_files == 0 else
                      f"holds {local_files} files, fewer than half of the server copy's", server_files)


def refusal(root: str, destination: str, why: str, server_files: int) -> MirrorError:
    return MirrorError(
        f"refusing to mirror: {root} {why}, while the server copy {destination} holds "
        f"{server_files} files",
        fix=f"to resume from the server copy, use mirror({root!r}, {destination!r}, "
            "restore=True); or mirror into another folder")


def check_budget(trash_share: object, trash_max_gb: object) -> None:
    """ValueError/TypeError unless the trash's budget is a share in (0, 1] and a cap > 0 GB."""
    for name, value in (("trash_share", trash_share), ("trash_max_gb", trash_max_gb)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {value!r}")
    assert isinstance(trash_share, (int, float)) and isinstance(trash_max_gb, (int, float))
    if not 0 < trash_share <= 1:
        raise ValueError(f"trash_share must be a share of the free space in (0, 1], e.g. 0.25, "
                         f"got {trash_share!r}")
    if not 0 < trash_max_gb < float("inf"):
        raise ValueError(f"trash_max_gb must be a positive number of GB, got {trash_max_gb!r}")


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def local_dir_of(local_dir: object, call: str = "mirror()") -> str:
    """``local_dir`` as a real absolute path (not a file, the trash, or /); ``call`` names the
    function in the messages."""
    if not isinstance(local_dir, (str, os.PathLike)):
        raise TypeError(f"local_dir must be a path, got {local_dir!r}")
    text = os.fspath(local_dir)
    if not isinstance(text, str) or not text.strip():
        raise ValueError("local_dir must not be empty")
    path = os.path.realpath(os.path.expanduser(text))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"local_dir {text} is a file; {call} takes a folder")
    if _sync.TRASH in Path(path).parts:
        raise ValueError(f"local_dir {text} is (inside) a {_sync.TRASH} folder; use the project instead")
    if path == "/":
        raise ValueError("local_dir must not be /")
    return path


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def check_local_folder(path: str, given: object, *, create: bool) -> None:
    """ValueError naming ``path`` unless this user can list it (or, with ``create``, make it)."""
    user = _user_name()
    try:
        st = os.stat(path)
    except PermissionError:
        raise ValueError(f"local_dir {given} cannot be reached by {user}: a folder above it cannot "
                         "be entered (permission denied)") from None
    except FileNotFoundError:
        if not create:
            raise ValueError(f"local_dir {given} does not exist; check the path (a typo?), create "
                             "the folder first, or pass restore=True to fetch the server copy into "
                             "it") from None
        parent = os.path.dirname(path)
        while not os.path.lexists(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"local_dir {given} does not exist and {user} cannot create it: "
                             f"{parent} is not writable") from None
        return
    if not os.access(path, os.R_OK | os.X_OK):
        raise ValueError(f"local_dir {given} cannot be read by {user} (mode "
                         f"{stat.filemode(st.st_mode)}, owner uid {st.st_uid}); fix its permissions "
                         "or mirror it as its owner")


def identity(identity_file: object) -> str | None:
    if identity_file is None:
        return None
    if not isinstance(identity_file, (str, os.PathLike)):
        raise TypeError(f"identity_file must be a path, got {identity_file!r}")
    path = os.path.expanduser(os.fspath(identity_file))
    if not os.path.isfile(path):
        raise ValueError(f"identity_file {path} does not exist")
    return os.path.abspath(path)


def prepare(local_dir: object, destination: object, *, port: object, password: object,
             identity_file: object, state_dir: object, exclude: object, host_key: object
             ) -> dict[str, Any]:
    """Validate every argument (ValueError/TypeError before anything runs)."""
    local = local_dir_of(local_dir)
    dest = _ssh.parse_destination(destination, with_path=True)
    # one spelling per folder (proj, ~/proj, proj/): one mirror, one key, one run folder
    dest = dataclasses.replace(dest, path=_sync.check_remote_path(dest.path))
    _ssh.check_port(port)
    if password is not None:
        _ssh.check_password(password)
    key = _ssh.check_host_key(host_key) if host_key is not None else None
    return {"local_dir": local, "dest": dest, "port": port, "password": password,
            "identity_file": identity(identity_file), "state": state_path(state_dir),
            "exclude": list(_sync.check_excludes(exclude)), "host_key": key}
