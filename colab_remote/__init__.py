"""colab-remote: SSH into a notebook runtime, keep the tunnel up, never lose a file.

Example:
    >>> from colab_remote import start_sshd
    >>> sshd = start_sshd()  # doctest: +SKIP
"""

from .errors import (
    AuthenticationError,
    ColabRemoteError,
    InstallError,
    MirrorError,
    SshdError,
    TunnelError,
)
from .server import Sshd, kernel_environment, start_sshd

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "ColabRemoteError",
    "InstallError",
    "MirrorError",
    "Sshd",
    "SshdError",
    "TunnelError",
    "kernel_environment",
    "start_sshd",
]
