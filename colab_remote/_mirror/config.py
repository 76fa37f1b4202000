"""What the mirror process needs: written once by :func:`colab_remote.mirror`, no secret in it."""

from __future__ import annotations

import dataclasses
from typing import Any

from .._daemon import Config


@dataclasses.dataclass(frozen=True)
class MirrorConfig(Config):
    """The settings of one mirror (``run_dir/config.json``)."""

    id: str = ""
    local_dir: str = ""
    destination: str = ""        # user@host:path, as given
    user: str = ""
    host: str = ""
    path: str = ""               # the remote path, as given
    port: int = 22
    identity_file: str | None = None
    known_hosts: str = ""
    pinned: bool = False
    exclude: list[str] = dataclasses.field(default_factory=list)
    sock_dir: str = ""           # the control sockets (short: a unix socket path is < 108 bytes)
    has_secret: bool = False     # the password comes once through a pipe (restricted=False only)
    ssh: str = "ssh"
    rsync: str = "rsync"
    agent: bool = True           # the server runs our agent (it has python3)
    agent_command: str = ""      # how to start it ("colab-remote agent" under a restricted key)
    setup: dict[str, Any] | None = None  # restricted=False: the set-up this process runs through
                                 # its own login (the request's purpose), not a login of its own
    state_dir: str = ""          # the state folder (the runtime's id, for the set-up)
    early_login: list[str] = dataclasses.field(default_factory=list)  # the master's ssh, started
                                 # before the imports (key logins; see .boot)
    early_path: list[str] = dataclasses.field(default_factory=list)  # where boot finds pexpect
                                 # before the site-packages are set up
    restricted: bool = False
    key_id: str | None = None
    key_expires: float | None = None
    remote_root: str | None = None  # the destination's real path on the server
    delete: bool = True
    backup: bool = True
    restore: bool = False
    keep_days: float = 7.0
    trash_share: float = 0.25    # the trash's budget (the server keeps these numbers)
    trash_max_gb: float = 10.0
    stop_flush: float = 10.0     # seconds a foreground mirror flushes for on Ctrl-C
