"""The set-up login's work on the server: install the agent, the restricted keys in
``~/.ssh/authorized_keys`` (under a lock, never through a link), the mirrors' server-side config;
and revocation."""

import errno
import fcntl
import hashlib
import importlib.util
import io
import json
import marshal
import os
import shlex
import socket
import stat
import sys
import time
from typing import List, Optional

from .fs import open_folder, remove_quietly, write_file_at
from .home import (
    STAMP,
    home,
    installed_stamp,
    ok_id,
    own_archive,
    own_folder,
    resolve_dest,
    resolve_sync_folder,
    runtime_of,
    state_dir,
)
from .protocol import HOME_DIR, O_CLOEXEC, O_READ, TRASH_MAX_GB, TRASH_SHARE, VERSION
from .trash import check_budget


def _marker(key_id: str) -> str:
    return "colab-remote:" + key_id


class AuthorizedKeys:
    """``~/.ssh/authorized_keys`` of this user, edited under a lock, never through a link."""

    def __init__(self) -> None:
        self.state = state_dir()
        self.lock = os.open(".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | O_CLOEXEC, 0o600,
                            dir_fd=self.state)
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        self.ssh = own_folder(os.path.join(home(), ".ssh"))

    def lines(self) -> List[str]:
        try:
            fd = os.open("authorized_keys", O_READ, dir_fd=self.ssh)
        except FileNotFoundError:
            return []
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise PermissionError("~/.ssh/authorized_keys is a link: refused (nothing is "
                                      "written through a link)") from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise PermissionError("~/.ssh/authorized_keys is not a file of this user")
            chunks = []
            while True:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(fd)
        return b"".join(chunks).decode("utf-8", "surrogateescape").splitlines()

    def write(self, lines: List[str]) -> None:
        text = "".join(line + "\n" for line in lines)
        write_file_at(self.ssh, "authorized_keys", text.encode("utf-8", "surrogateescape"))

    def close(self) -> None:
        os.close(self.ssh)
        fcntl.flock(self.lock, fcntl.LOCK_UN)
        os.close(self.lock)
        os.close(self.state)


def _ours(line: str) -> Optional[str]:
    """The key id a line of ours carries, else None."""
    for word in reversed(line.split()):
        if word.startswith("colab-remote:"):
            return word[len("colab-remote:"):]
    return None


def _expired(line: str, now: float) -> bool:
    at = line.find('expiry-time="')
    if at < 0:
        return False
    spec = line[at + 13:at + 27]
    try:
        return time.mktime(time.strptime(spec, "%Y%m%d%H%M%S")) < now
    except ValueError:
        return False


def revoke(runtime: Optional[str] = None, key_id: Optional[str] = None) -> List[str]:
    """Remove the lines of ``runtime``, or the one of ``key_id``, or every colab-remote line (both
    None), and the mirror configs only they used (and, for every line, our agents too); the key
    ids removed."""
    keys = AuthorizedKeys()
    try:
        kept, gone = [], []
        for line in keys.lines():
            kid = _ours(line)
            if kid is not None and (kid == key_id if key_id is not None else
                                    runtime is None or runtime_of(kid) == runtime):
                gone.append(kid)
            else:
                kept.append(line)
        if gone:
            keys.write(kept)
        _tidy(keys.state, kept, agents=runtime is None and key_id is None)
    finally:
        keys.close()
    return gone


def print_revoked(gone: List[str]) -> int:
    print("colab-remote-revoked %s" % " ".join(gone))
    return 0


def _tidy(state: int, lines: List[str], *, agents: bool = False) -> None:
    """Remove the mirror and sync configs no key line names (and with ``agents``, every installed agent:
    a mirror without a restricted key runs one directly, so they stay otherwise)."""
    names = {_ours(line) for line in lines}
    if agents:
        for name in os.listdir(state):
            if name.startswith("agent-") and name.endswith((".py", ".pyz")):
                remove_quietly(state, name.encode())
    for folder in (b"mirrors", b"syncs"):
        cfg = open_folder(state, folder, False)
        if cfg is None:
            continue
        try:
            for name in os.listdir(cfg):
                if name[:-5] not in names:
                    remove_quietly(cfg, name.encode())
        finally:
            os.close(cfg)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _command(words: List[str]) -> str:
    """``words`` as the text of a ``command="..."`` option (the account's shell runs it)."""
    text = " ".join(shlex.quote(w) for w in words)
    if '"' in text or "\\" in text or "\n" in text:
        raise ValueError("a path holds '\"', '\\' or a newline: %r" % text)
    return text


def _key_line(options: List[str], pubkey: str, key_id: str, label: str = "") -> str:
    """One authorized_keys line; its comment names the key (our marker) and, for people reading
    the file, the runtime and the day it was set up."""
    pub = pubkey.split()
    if len(pub) < 2 or not pub[0].startswith(("ssh-", "ecdsa-", "sk-")):
        raise ValueError("not a public key: %r" % pubkey[:40])
    words = [w for w in label.split() if all(c.isalnum() or c in "-_.:=" for c in w)][:4]
    return " ".join([",".join(options), pub[0], pub[1], _marker(key_id), *words])


def stamp(sha: str) -> bytes:
    """The installed agent's zip comment: the sha256 of the zip as sent (what the agent says it
    runs, see :func:`.home.own_sha`) and the magic of the python that compiled it ("-": none)."""
    magic = importlib.util.MAGIC_NUMBER.hex() if _PYC else "-"
    return ("%s %s %s" % (STAMP, sha, magic)).encode()


_PYC = sys.version_info >= (3, 8)  # zipimport reads hash-based .pyc files (PEP 552) from 3.8 on


def compiled(source: bytes, path: str, sha: str) -> bytes:
    """The agent's zip as it is installed at ``path``: the zip as sent, each module beside its
    code compiled by this python (an unchecked hash-based ``.pyc``, which zipimport takes first:
    Python compiles nothing at each start, about 40 ms less), :func:`stamp` in its comment. Another
    python's zipimport finds the magic wrong and compiles the source as before."""
    import zipfile  # here: a set-up that finds the agent installed needs none of it

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(source)) as sent, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in sent.infolist():
            data = sent.read(info)
            z.writestr(info, data)
            if _PYC and info.filename.endswith(".py"):
                code = compile(data, "%s/%s" % (path, info.filename), "exec", dont_inherit=True)
                pyc = zipfile.ZipInfo(info.filename + "c", date_time=info.date_time)
                pyc.external_attr = info.external_attr
                unchecked = importlib.util.source_hash(data)  # novermin (3.7+: _PYC says)
                z.writestr(pyc, importlib.util.MAGIC_NUMBER + b"\x01\x00\x00\x00" + unchecked
                           + marshal.dumps(code))
        z.comment = stamp(sha)
    return out.getvalue()


def setup(request: dict) -> dict:
    """Install this agent and, with ``restricted``, the runtime's restricted keys (run once,
    through the login that may use the password).

    ``request``: ``sha`` (of the zip this runs from), ``restricted``, and ``keys``: a list of
    ``{"id", "purpose": "tunnel", "port", "pubkey", "days"}``, ``{"id", "purpose": "mirror",
    "dest", "keep_days", "backup", "trash_share", "trash_max_gb", "pubkey", "days"}`` or
    ``{"id", "purpose": "sync", "dest", "keep_days", "trash_budget", "protect", "pubkey", "days"}``
    (a two-way sync started in the runtime: its key runs only the sync's peer, in that folder). The reply
    says, for each, the port (a free one for port 0), the destination's real path and when the key
    expires; and for all, the python and the agent's path (how the client runs the agent directly
    without ``restricted``).
    """
    with open(own_archive(), "rb") as f:
        source = f.read()
    sha = hashlib.sha256(source).hexdigest()
    if sha != request["sha"]:
        raise ValueError("the agent arrived damaged")
    restricted = bool(request.get("restricted", True))
    state = state_dir()
    name = "agent-%s.pyz" % sha[:12]
    agent = os.path.join(home(), HOME_DIR, name)
    try:
        try:
            with open(os.open(name, O_READ, dir_fd=state), "rb") as f:
                same = installed_stamp(f.read()) == stamp(sha)
        except OSError:
            same = False
        if not same:
            write_file_at(state, name, compiled(source, agent, sha))
        run = [sys.executable or "python3", "-I", "-B", agent]
        replies, lines, now = [], [], time.time()
        for key in request["keys"]:
            kid = ok_id(key["id"])
            reply: dict = {"id": kid}
            if key["purpose"] == "tunnel":
                port = int(key["port"]) or _free_port()
                reply["port"] = port
                forced = run + ["--forced", "tunnel", kid, str(port)]
                options = ["restrict", "port-forwarding", 'permitlisten="localhost:%d"' % port,
                           'permitopen="localhost:%d"' % port]
            elif key["purpose"] == "mirror":
                share, max_gb = check_budget(key.get("trash_share", TRASH_SHARE),
                                             key.get("trash_max_gb", TRASH_MAX_GB))
                config = {"root": resolve_dest(key["dest"]),
                          "keep_days": float(key.get("keep_days", 7)),
                          "backup": bool(key.get("backup", True)),
                          "trash_share": share, "trash_max_gb": max_gb}
                reply["dest"] = config["root"]
                forced = run + ["--forced", "mirror", kid]
                options = ["restrict"]
                if restricted:  # what the key may do is fixed here, on the server
                    cfg = own_folder(os.path.join(home(), HOME_DIR, "mirrors"))
                    try:
                        write_file_at(cfg, kid + ".json", json.dumps(config).encode())
                    finally:
                        os.close(cfg)
            elif key["purpose"] == "sync":
                keep, budget = float(key.get("keep_days", 7)), int(key.get("trash_budget", 2 << 30))
                if not keep > 0 or not budget > 0:
                    raise ValueError("keep_days and trash_budget must be > 0")
                config = {"root": resolve_sync_folder(key["dest"]), "keep_days": keep,
                          "trash_budget": budget, "protect": [str(p) for p in key.get("protect", [])]}
                reply["dest"] = config["root"]
                forced = run + ["--forced", "sync", kid]
                options = ["restrict"]
                if not restricted:
                    raise ValueError("a sync from the runtime needs a restricted key")
                cfg = own_folder(os.path.join(home(), HOME_DIR, "syncs"))
                try:
                    write_file_at(cfg, kid + ".json", json.dumps(config).encode())
                finally:
                    os.close(cfg)
            else:
                raise ValueError("unknown purpose %r" % key["purpose"])
            if restricted:
                until = now + float(key["days"]) * 86400
                reply["expires"] = until
                options += ['command="%s"' % _command(forced),
                            'expiry-time="%s"' % time.strftime("%Y%m%d%H%M%S", time.localtime(until))]
                lines.append(_key_line(options, key["pubkey"], kid, str(key.get("label", ""))))
            replies.append(reply)
    finally:
        os.close(state)
    if lines:
        keys = AuthorizedKeys()
        try:
            ids = {_ours(line) for line in lines}
            kept = [line for line in keys.lines()  # a re-run replaces; expired lines of ours go
                    if _ours(line) not in ids and not (_ours(line) and _expired(line, now))]
            keys.write(kept + lines)
            _tidy(keys.state, kept + lines)
        finally:
            keys.close()
    return {"ok": True, "python": sys.executable, "home": home(), "agent": agent, "sha": sha,
            "keys": replies, "protocol": VERSION}
