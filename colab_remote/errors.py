"""Errors raised when a tool (sshd, ssh, rsync, apt-get, gcloud) fails.

Caller mistakes are ``ValueError``/``TypeError`` raised before anything runs; everything here is a
tool that ran and failed. Each message says what happened, shows the last lines of the tool's log
and says what to do about it.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ColabRemoteError",
    "GcloudError",
    "InstallError",
    "MirrorError",
    "SshdError",
    "SyncError",
    "TunnelError",
]


class ColabRemoteError(RuntimeError):
    """Base class: ``what`` happened, the ``log_tail`` of the tool, and the ``fix``."""

    def __init__(self, what: str, *, log_tail: str = "", fix: str = "") -> None:
        self.what = what
        self.log_tail = log_tail.rstrip()
        self.fix = fix
        super().__init__(self._message())

    def _message(self) -> str:
        parts = [self.what]
        if self.log_tail:
            tail = "\n".join("    " + line for line in self.log_tail.splitlines())
            parts.append("last lines of the log:\n" + tail)
        if self.fix:
            parts.append("fix: " + self.fix)
        return "\n".join(parts)

    def _render_traceback_(self) -> list[str]:
        # IPython calls this instead of printing a full traceback: a wrong password should read
        # as one short, actionable message in a notebook, not sixty lines of library frames.
        return [f"{type(self).__name__}: {line}" if i == 0 else line
                for i, line in enumerate(self._message().splitlines())]


class InstallError(ColabRemoteError):
    """A program is missing and could not be installed."""


class SshdError(ColabRemoteError):
    """The runtime's sshd could not be configured or started."""


class TunnelError(ColabRemoteError):
    """The reverse tunnel could not be established or kept up."""


class GcloudError(ColabRemoteError):
    """The gcloud CLI is missing or failed (config set, instance lookup)."""


class AuthenticationError(ColabRemoteError):
    """The server refused the password or key."""


class MirrorError(ColabRemoteError):
    """The mirror could not reach the server or could not copy files."""


class SyncError(ColabRemoteError):
    """The two-way sync could not reach the runtime or start there."""
