"""colab-remote: SSH into a notebook runtime, keep the tunnel up, never lose a file.

Example:
    >>> from colab_remote import start_sshd
    >>> sshd = start_sshd()  # doctest: +SKIP
"""

from ._gcloud import gcloud_setup
from .errors import (
    AuthenticationError,
    ColabRemoteError,
    GcloudError,
    InstallError,
    MirrorError,
    SshdError,
    SyncError,
    TunnelError,
)
from .mirror import Mirror, find_mirrors, mirror, push, stop_mirrors
from .reverse import Tunnel, find_tunnels, load_tunnel, reverse_forward, stop_tunnels
from .server import Sshd, kernel_environment, refresh_environment, start_sshd
from .status import CheckResult, Status, revoke, self_check, status, stop_all
from .sync import Sync, find_syncs, sync

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "CheckResult",
    "ColabRemoteError",
    "GcloudError",
    "InstallError",
    "Mirror",
    "MirrorError",
    "Sshd",
    "Status",
    "SshdError",
    "Sync",
    "SyncError",
    "Tunnel",
    "TunnelError",
    "find_mirrors",
    "find_syncs",
    "find_tunnels",
    "gcloud_setup",
    "kernel_environment",
    "load_tunnel",
    "mirror",
    "push",
    "refresh_environment",
    "reverse_forward",
    "revoke",
    "self_check",
    "start_sshd",
    "status",
    "stop_all",
    "stop_mirrors",
    "stop_tunnels",
    "sync",
]
