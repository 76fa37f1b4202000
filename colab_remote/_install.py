"""The programs colab-remote drives: found on PATH or in the sbin folders, installed with apt-get.

sshd lives in /usr/sbin (not on a user's PATH); a missing one is installed when the caller allows
(``install=True``), with apt-get's own status lines as a progress bar and a policy-rc.d that keeps
the system's sshd from starting on port 22 (Colab has no systemd to do that).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import _proc
from .errors import ColabRemoteError, InstallError

_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def find_program(name: str) -> str | None:
    """Absolute path of ``name`` on PATH or in the sbin folders (sshd lives in /usr/sbin)."""
    found = shutil.which(name)
    if found:
        return found
    for folder in _SBIN_DIRS:
        candidate = os.path.join(folder, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def require_program(name: str, *, package: str, install: bool, error: type[ColabRemoteError]) -> str:
    """Path of ``name``; installs ``package`` with apt-get first when missing and ``install``."""
    path = find_program(name)
    if path:
        return path
    if install:
        apt_install([package])
        path = find_program(name)
        if path:
            return path
    raise error(
        f"{name} not found",
        fix=f"pass install=True to install {package}, or run: apt-get install -y {package}",
    )


def apt_install(packages: Sequence[str], *, timeout: float = 900, progress: bool = True) -> None:
    """``apt-get install -y packages`` non-interactively, with a progress bar."""
    apt = shutil.which("apt-get")
    if apt is None:
        raise InstallError(
            f"cannot install {' '.join(packages)}: this system has no apt-get",
            fix=f"install {' '.join(packages)} with this system's package manager",
        )
    if os.geteuid() != 0:
        raise InstallError(
            f"cannot install {' '.join(packages)}: installing needs root",
            fix=f"run as root, or: sudo apt-get install -y {' '.join(packages)}",
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log_file = _proc.private_dir(f"colab_remote-{os.geteuid()}") / "apt.log"
    quiet = ["-q", "-o", "Dpkg::Use-Pty=0", "-o", "APT::Status-Fd=1"]
    install = [apt, "install", "-y", "--no-install-recommends", *quiet,
               "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold",
               *packages]
    deadline = time.monotonic() + timeout
    # Without systemd, openssh-server's postinst would start the system's own sshd on port 22
    # (the port start_sshd wants). A policy-rc.d that says "no" keeps it from starting.
    policy = Path("/usr/sbin/policy-rc.d")
    added_policy = not policy.exists()
    if added_policy:
        policy.write_text("#!/bin/sh\n# colab_remote: no service starts during apt-get install\nexit 101\n")
        policy.chmod(0o755)
    try:
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with open(fd, "w") as out:
            for step, argv in (("update", [apt, "update", *quiet]), ("install", install)):
                rc = _run_with_status(argv, out, env, deadline, f"apt-get {step}", progress)
                if rc != 0 and step == "install":
                    raise InstallError(
                        f"apt-get install {' '.join(packages)} failed (exit {rc})",
                        log_tail=_proc.tail(log_file),
                        fix=f"run apt-get install -y {' '.join(packages)} by hand and read its output",
                    )
    finally:
        if added_policy:
            with contextlib.suppress(OSError):
                policy.unlink()


def _run_with_status(argv: list[str], out: Any, env: Mapping[str, str], deadline: float,
                     label: str, progress: bool) -> int:
    """Run apt-get, its output into ``out``, its ``pmstatus``/``dlstatus`` lines into a tqdm bar."""
    bar = None
    if progress:
        with contextlib.suppress(ImportError):
            from tqdm.auto import tqdm

            bar = tqdm(total=100, desc=label, bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")
    partial = [b""]

    def on_output(chunk: bytes) -> None:
        *lines, partial[0] = (partial[0] + chunk).split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            out.write(line + "\n")
            fields = line.split(":", 3)
            if bar is not None and len(fields) == 4 and fields[0] in ("pmstatus", "dlstatus"):
                with contextlib.suppress(ValueError):
                    bar.n = float(fields[2])
                    bar.set_postfix_str(fields[3].strip()[:40], refresh=True)

    try:
        done = _proc.run(argv, timeout=max(0.0, deadline - time.monotonic()), check=False, env=env,
                   merge=True, on_output=on_output)
        out.write(partial[0].decode(errors="replace"))
    finally:
        if bar is not None:
            bar.close()
    return done.returncode
