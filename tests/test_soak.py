"""A minute of issue 13's fault soak (bench/soak_mirror.py) against a real sshd on a small tmpfs:
`.ci/run` runs it; ``-m "not soak"`` leaves it out.

Every fault the soak knows, in a seeded round robin: the mirror process killed (and mirror() run
again), the cell calling mirror() or flush() killed mid-call, ssh killed or stopped, the server's
sshd restarted or down, its disk full, server folders and files read-only for a while. Deletes made
while no mirror process runs stay on the server by design (the whole-tree pass of the next start
never deletes); the soak counts them apart.
"""

from __future__ import annotations

import pytest

from bench.soak_mirror import soak

from .conftest import needs_root, needs_sshd

pytestmark = [needs_root, needs_sshd, pytest.mark.soak, pytest.mark.timeout(900)]

CI_FAULTS = ("worker-kill", "caller-kill", "ssh-kill", "ssh-stop", "sshd-restart", "sshd-down",
             "disk-full", "read-only")


def test_a_minute_of_faults_loses_nothing_and_converges() -> None:
    report = soak(60, seed=13, fault_seconds=3, faults=CI_FAULTS, converge_limit=60, disk_mb=128)
    assert report.ok, report.summary()
    assert sum(report.faults.values()) >= 3 and len(report.checkpoints) >= 4, report.summary()
