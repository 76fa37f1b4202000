"""The shell scripts a new user runs first: demo.sh (as root, with sudo, or neither) and
scripts/bootstrap.sh (says what it does, no setuptools warning box, quick re-runs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import needs_root

ROOT = Path(__file__).resolve().parent.parent
NOBODY = [shutil.which("setpriv") or "/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def bin_dir() -> Iterator[Path]:
    """A PATH folder nobody can read: `id`, and whatever a test adds (no sudo unless it does)."""
    folder = Path(tempfile.mkdtemp(prefix="crt-bin-"))
    folder.chmod(0o755)
    (folder / "id").symlink_to(shutil.which("id") or "/usr/bin/id")
    yield folder
    shutil.rmtree(folder)


@needs_root
def test_demo_sh_without_root_and_without_sudo_says_what_to_do(bin_dir) -> None:
    done = subprocess.run([*NOBODY, "/bin/bash", str(ROOT / "demo.sh"), "--check"], capture_output=True,
                          text=True, timeout=60, env={"PATH": str(bin_dir), "LC_ALL": "C"})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "demo.sh: needs root" in done.stderr and "no sudo" in done.stderr
    assert "root shell" in done.stderr and "command not found" not in done.stderr


@needs_root
def test_demo_sh_without_root_asks_sudo_itself(bin_dir) -> None:
    sudo = bin_dir / "sudo"  # a stand-in that shows what it was asked to run
    sudo.write_text('#!/bin/sh\necho "sudo was asked to run: $*"\n')
    sudo.chmod(0o755)
    done = subprocess.run([*NOBODY, "/bin/bash", str(ROOT / "demo.sh"), "--check", "--base-dir", "/x"],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", "LC_ALL": "C"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"sudo was asked to run: bash {ROOT / 'demo.sh'} --check --base-dir /x"
    assert "running it with sudo" in done.stderr


@needs_root
@pytest.mark.slow
def test_bootstrap_says_what_it_does_and_reruns_quickly(tmp_path) -> None:
    """A fresh checkout's first install, then a re-run: each says what it does, no warning box."""
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PYTHON"] = sys.base_prefix + "/bin/python3"  # the interpreter this venv was made from
    first = subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=checkout, capture_output=True, text=True,
                           timeout=600, env=env)
    shown = first.stdout + first.stderr
    assert first.returncode == 0, shown[-3000:]
    assert "== creating the virtual environment .venv" in first.stdout
    assert "== installing colab-remote into .venv with pip (about 30 s the first time" in first.stdout
    assert "== .venv ready (" in first.stdout
    for box in ("Editable installation", "*****", "BuildBackendWarning"):
        assert box not in shown, shown
    assert (checkout / ".venv" / "bootstrap-pip.log").is_file()  # pip's own words, kept
    t0 = time.monotonic()
    again = subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=checkout, capture_output=True, text=True,
                           timeout=120, env=env)
    assert again.returncode == 0 and time.monotonic() - t0 < 5, again.stdout + again.stderr
    assert again.stdout.startswith("== .venv is up to date") and again.stderr == ""
    (checkout / "pyproject.toml").write_text((checkout / "pyproject.toml").read_text() + "\n# changed\n")
    changed = subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=checkout, capture_output=True, text=True,
                             timeout=600, env=env)
    assert changed.returncode == 0 and "== installing colab-remote into .venv" in changed.stdout
    assert "Editable installation" not in changed.stdout + changed.stderr
