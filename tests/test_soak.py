"""A minute of issue 13's fault soak (bench/soak_mirror.py) against a real sshd on a small tmpfs:
`.ci/run` runs it; ``-m "not soak"`` leaves it out.

The faults: ssh killed or stopped, the server's sshd restarted or down, its disk full. Left to the
longer soak in bench/ until the mirror process keeps deletes it could not deliver: killing the mirror
process or the cell that (re)starts it (deletes made while no mirror process runs stay on the server:
the whole-tree pass of the next start never deletes), and read-only server folders (a delete the
server refused once is not tried again).
"""

from __future__ import annotations

import pytest

from bench.soak_mirror import soak

from .conftest import needs_root, needs_sshd

pytestmark = [needs_root, needs_sshd, pytest.mark.soak, pytest.mark.timeout(900)]

CI_FAULTS = ("ssh-kill", "ssh-stop", "sshd-restart", "sshd-down", "disk-full")


def test_a_minute_of_faults_loses_nothing_and_converges() -> None:
    report = soak(60, seed=13, fault_seconds=3, faults=CI_FAULTS, converge_limit=60, disk_mb=128)
    assert report.ok, report.summary()
    assert sum(report.faults.values()) >= 3 and len(report.checkpoints) >= 4, report.summary()
