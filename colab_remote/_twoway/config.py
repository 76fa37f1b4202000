"""What the sync process needs: written once by :func:`colab_remote.sync`, no secret in it."""

from __future__ import annotations

import dataclasses

from .._daemon import Config


@dataclasses.dataclass(frozen=True)
class SyncConfig(Config):
    """The settings of one two-way sync (``run_dir/config.json``)."""

    id: str = ""
    sync_id: str = ""             # written into the runtime's folder: the runtime this sync filled
    local_dir: str = ""
    remote: str = ""              # host:path, as given
    host: str = ""                # an ssh alias (or user@host) the user's ssh config knows
    remote_path: str = ""         # absolute, or relative to the runtime user's home
    port: int | None = None
    identity_file: str | None = None
    ssh_config: str | None = None  # ssh -F
    ssh: str = "ssh"
    sock_dir: str = ""            # the control sockets (short: a unix socket path is < 108 bytes)
    has_secret: bool = False      # the runtime's password comes once through a pipe
    exclude: list[str] = dataclasses.field(default_factory=list)
    gitignore: bool = True
    protect: list[str] = dataclasses.field(default_factory=list)
    mass_delete: float = 0.5      # a share of the tree deleted within seconds pauses the sync
    mass_delete_min: int = 20     # ... when it is at least this many paths
    yes: bool = False             # conflicts at the first comparison: go on without asking
    keep_days: float = 7.0
    trash_budget: int = 2 << 30   # bytes of trash kept on each side at most
    inline_max: int = 1 << 20     # the runtime's changed files up to this size come with the change
    big_file: int = 8 << 20       # files this big travel in resumable parts
    notify: bool = True           # a desktop notification for each conflict (when one can be shown)
    # "laptop": started in the runtime, the other side is the laptop, whose peer is installed there
    # behind a restricted key (identity_file) and checked against known_hosts
    remote_side: str = "runtime"
    known_hosts: str | None = None
