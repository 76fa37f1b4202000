"""The real gcloud CLI in a sandbox: a throwaway config and HOME, talking only to FakeCompute.

Import the fixture into a test module (``from .gcloud_helpers import fake_gcloud  # noqa: F401``).
The config is written as a file (one ``gcloud config set`` costs 1-2 s of start-up): credentials
off, the compute endpoint on 127.0.0.1, no prompts, no usage reporting, no update check, no GCE
metadata-server probe. Nothing leaves loopback.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .fake_compute import FakeCompute

GCLOUD = shutil.which("gcloud")
needs_gcloud = pytest.mark.skipif(GCLOUD is None, reason="the gcloud CLI is not installed")

# Properties that keep gcloud local and quiet (section -> {name: value}).
SANDBOX_PROPERTIES: dict[str, dict[str, str]] = {
    "core": {"disable_usage_reporting": "true", "check_gce_metadata": "false",
             "disable_prompts": "true"},
    "auth": {"disable_credentials": "true"},
    "component_manager": {"disable_update_check": "true"},
    "survey": {"disable_prompts": "true"},
}


def write_gcloud_config(config_dir: Path, properties: dict[str, dict[str, str]]) -> None:
    """Write ``config_dir`` as gcloud keeps it: ``active_config`` and ``configurations/config_default``.

    Also the ``gce`` cache file that gcloud writes after asking metadata.google.internal whether
    it runs on GCE: without it every command resolves that name for its user-agent string
    (``properties.GetMetricsEnvironment``), even with ``core/check_gce_metadata false``.
    """
    (config_dir / "configurations").mkdir(parents=True, exist_ok=True)
    (config_dir / "active_config").write_text("default")
    (config_dir / "gce").write_text("False")
    lines = []
    for section, values in properties.items():
        lines.append(f"[{section}]")
        lines += [f"{name} = {value}" for name, value in values.items()]
        lines.append("")
    (config_dir / "configurations" / "config_default").write_text("\n".join(lines))


def sandbox_env(config_dir: Path, home: Path) -> dict[str, str]:
    """The variables that point gcloud (and the ssh-keygen it runs) at the sandbox."""
    return {"CLOUDSDK_CONFIG": str(config_dir), "HOME": str(home)}


@dataclass
class GcloudSandbox:
    env: dict[str, str]
    fake: FakeCompute
    config_dir: Path
    home: Path
    user: str
    instance: str
    zone: str
    project: str

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.instance}"

    def full_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}


def authorize(user, key: str) -> None:
    """Append ``key`` to the throwaway ``user``'s authorized_keys, as GCE's guest agent does."""
    path = user.home / ".ssh" / "authorized_keys"
    old = path.read_text() if path.exists() else ""
    user.write(".ssh/authorized_keys", old + key.strip() + "\n", mode=0o600)
    (user.home / ".ssh").chmod(0o700)


@pytest.fixture
def fake_gcloud(server, tmp_path: Path) -> Iterator[GcloudSandbox]:
    """gcloud set up so that ``gcloud compute ssh USER@INSTANCE`` reaches the ``server`` sshd.

    The instance's natIP is 127.0.0.1 and its guest attributes publish the server's host key;
    keys gcloud pushes into the project metadata land in the server user's authorized_keys.
    The server's port is not known to GCE: pass ``--ssh-flag=-p --ssh-flag=PORT``.
    """
    if GCLOUD is None:
        pytest.skip("the gcloud CLI is not installed")
    user = server.user

    def install(name: str, key: str) -> None:
        if name == user.name:
            authorize(user, key)

    fake = FakeCompute(project="colab-remote-test", zone="us-test1-a", instance="tunnel-vm",
                       host_keys=[server.host_key_line], install_key=install).start()
    config_dir = tmp_path / "gcloud-config"
    home = tmp_path / "gcloud-home"
    home.mkdir(mode=0o700)
    properties = {section: dict(values) for section, values in SANDBOX_PROPERTIES.items()}
    properties["core"]["project"] = fake.project
    properties["api_endpoint_overrides"] = {"compute": fake.endpoint}
    write_gcloud_config(config_dir, properties)
    try:
        yield GcloudSandbox(env=sandbox_env(config_dir, home), fake=fake, config_dir=config_dir,
                            home=home, user=user.name, instance=fake.instance, zone=fake.zone,
                            project=fake.project)
    finally:
        fake.stop()
