"""The server half of colab-remote: the mirror's agent, the tunnel's helper, and their set-up.

This package is installed once on the user's server as one zip file,
``~/.colab-remote/agent-<sha12>.pyz`` (:func:`bundle`, its modules compiled there by
:func:`.setup.compiled`), by the set-up login
(:mod:`colab_remote._access`, the one login that may use the password), and is then run there by
sshd as the forced command of a restricted key (``~/.ssh/authorized_keys``)::

    restrict,command="python3 -I -B ~/.colab-remote/agent-<sha12>.pyz --forced mirror ID" ssh-ed25519 ...
    restrict,port-forwarding,permitlisten="localhost:PORT",permitopen="localhost:PORT",
        command="python3 -I -B ~/.colab-remote/agent-<sha12>.pyz --forced tunnel ID PORT" ssh-ed25519 ...
    restrict,command="python3 -I -B ~/.colab-remote/agent-<sha12>.pyz --forced sync ID" ssh-ed25519 ...

(the last on a laptop, for a two-way sync started in the runtime: the laptop is then the server).

So whatever the runtime holds (that key, a ControlMaster socket) can only do what this package
answers: write into one destination folder (everything it replaces or deletes goes to the trash,
kept ``keep_days`` and within a budget as the *server's* config says), read that folder back, list
and reclaim the tunnel's own port; a sync's key runs the sync's peer in its one folder. No shell,
no other file, no pruning on request. One agent writes a destination at a time (:mod:`.writer`).

The modules: :mod:`.protocol` (the records and the names both sides share: the client imports
them from here), :mod:`.fs` (every write through a descriptor, never a path), :mod:`.tree` (the
destination), :mod:`.listing` (the copy listed a folder at a time), :mod:`.trash` (what is
replaced, within a budget), :mod:`.writer` (one writer per destination), :mod:`.serve` (the
mirror's agent), :mod:`.lane` and :mod:`.partials` (its big-file lane: a second session that joins
the writer and receives big files into partials kept across agents), :mod:`.tunnel` (the tunnel's
helper), :mod:`.setup` (keys, config, revocation), :mod:`.main` (the entry point); the two-way
sync's peer (:mod:`.peer`, also sent into the runtime for a sync started on the laptop) and what it
stands on: :mod:`.rules`, :mod:`.syncfs`, :mod:`.inotify`.

Constraints: standard library only, Python >= 3.6 (old servers), relative imports only (inside the
zip the package has another name), no import from the rest of colab_remote.
"""

import hashlib
import io
import os
import zipfile
from typing import Tuple

from .protocol import (
    CHUNK,
    DIGEST_SIZE,
    HEADER,
    HOME_DIR,
    LIST_BYTES,
    LIST_ENTRY,
    MODE_MASK,
    OP_CHUNK,
    OP_COMMIT,
    OP_DELETE,
    OP_DROP,
    OP_END,
    OP_FINISH,
    OP_GET,
    OP_HAVE,
    OP_JOIN,
    OP_LINK,
    OP_MANIFEST,
    OP_MKDIR,
    OP_PLACE,
    OP_PUT,
    OP_ZIP,
    R_ACK,
    R_DATA,
    R_DONE,
    R_FAIL,
    R_FOLDER,
    R_GOT,
    R_HAVE,
    R_HELLO,
    STAGING,
    STALE_AFTER,
    STAMP_FORMAT,
    TMP_INFIX,
    TRASH,
    TRASH_MAX_GB,
    TRASH_SHARE,
    VERSION,
    check_path,
    digest,
    entries,
    pack,
    read_record,
    records,
    trash_stamp,
)
from .setup import revoke
from .tree import Tree

__all__ = ["CHUNK", "DIGEST_SIZE", "HEADER", "HOME_DIR", "LIST_BYTES", "LIST_ENTRY", "MODE_MASK", "OP_CHUNK",
           "OP_COMMIT", "OP_DELETE", "OP_DROP", "OP_END", "OP_FINISH", "OP_GET", "OP_HAVE", "OP_JOIN",
           "OP_LINK", "OP_MANIFEST", "OP_MKDIR", "OP_PLACE", "OP_PUT", "OP_ZIP", "R_ACK", "R_DATA",
           "R_DONE", "R_FAIL", "R_FOLDER", "R_GOT", "R_HAVE", "R_HELLO", "STAGING", "STALE_AFTER",
           "STAMP_FORMAT", "TMP_INFIX", "TRASH", "TRASH_MAX_GB", "TRASH_SHARE", "VERSION", "Tree",
           "bundle", "check_path", "digest", "entries", "pack", "read_record", "records", "revoke",
           "trash_stamp"]

PACKAGE = "colab_remote_agent"  # its name inside the zip
_MAIN = b"import sys\nfrom %s.main import main\nsys.exit(main(sys.argv[1:]))\n" % PACKAGE.encode()
_INIT = b'"""The server half of colab-remote (its modules: see colab_remote/_agent)."""\n'


def bundle() -> Tuple[bytes, str]:
    """This package as the zip the server runs (``python3 agent.pyz ARGS``), and its sha256.

    The same source always gives the same bytes (fixed times, sorted names, stored): a runtime
    with the same version finds the agent already installed."""
    here = os.path.dirname(os.path.abspath(__file__))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        def add(name: str, data: bytes) -> None:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            z.writestr(info, data)
        add("__main__.py", _MAIN)
        add("%s/__init__.py" % PACKAGE, _INIT)  # the client's names above cost the server's start-up
        for name in sorted(os.listdir(here)):
            if name.endswith(".py") and name != "__init__.py":
                with open(os.path.join(here, name), "rb") as f:
                    add("%s/%s" % (PACKAGE, name), f.read())
    data = out.getvalue()
    return data, hashlib.sha256(data).hexdigest()
