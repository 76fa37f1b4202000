"""gcloud: the real CLI with a throwaway config, against a stand-in Compute API on 127.0.0.1.

gcloud starts in 1-2 s, so each test makes as few calls as it can.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import stat
from pathlib import Path

import pexpect
import pytest

from colab_remote import GcloudError, _net, _proc, gcloud_setup
from colab_remote._gcloud import external_ip, gcloud_ssh_argv, key_expiration
from colab_remote._ssh import Destination, parse_destination

from .conftest import needs_root, needs_sshd
from .fake_compute import FakeCompute
from .gcloud_helpers import (
    GCLOUD,
    SANDBOX_PROPERTIES,
    fake_gcloud,  # noqa: F401  (fixture)
    needs_gcloud,
    sandbox_env,
    write_gcloud_config,
)

STRACE = shutil.which("strace")

# What gcloud 528 asks the Compute API during its first `gcloud compute ssh`, in order.
FIRST_SSH_REQUESTS = [
    "GET /compute/v1/projects/{p}/zones/{z}/instances/{i}",
    "GET /compute/v1/projects/{p}",
    "GET /compute/v1/projects/{p}/zones/{z}/instances/{i}/getGuestAttributes?queryPath=hostkeys/",
    "POST /compute/v1/projects/{p}/setCommonInstanceMetadata",
    "POST /compute/v1/projects/{p}/global/operations/operation-1/wait",
    "GET /compute/v1/projects/{p}",
]


# --- argv, pure ------------------------------------------------------------------------------


def test_gcloud_ssh_argv_shape() -> None:
    argv = gcloud_ssh_argv("/usr/bin/gcloud", parse_destination("me@my-vm"), zone="us-central1-a",
                           project="my-project", ssh_flags=["-p", "2222", "-o", "ServerAliveInterval=15"],
                           command=["-N", "-R", "20022:localhost:22"])
    expires = f"--ssh-key-expiration={key_expiration()}"
    assert argv == [
        "/usr/bin/gcloud", "compute", "ssh", "me@my-vm", "--zone=us-central1-a",
        "--project=my-project", "--quiet", expires, "--ssh-flag=-p", "--ssh-flag=2222",
        "--ssh-flag=-o", "--ssh-flag=ServerAliveInterval=15", "--", "-N", "-R", "20022:localhost:22",
    ]
    # zone/project from gcloud's config; nothing after "--" when there is no command
    argv = gcloud_ssh_argv("gcloud", Destination("me", "vm1"), zone=None, project=None,
                           ssh_flags=[], command=[], strict_host_key_checking=True,
                           key_expires="2030-01-31T00:00:00Z")
    assert argv == ["gcloud", "compute", "ssh", "me@vm1", "--quiet",
                    "--ssh-key-expiration=2030-01-31T00:00:00Z", "--strict-host-key-checking=yes"]
    assert not any("StrictHostKeyChecking=no" in a or a == "--strict-host-key-checking=no"
                   for a in argv)


@pytest.mark.parametrize(("kwargs", "error", "text"), [
    ({"dest": "me@vm"}, TypeError, "Destination"),
    ({"dest": Destination("me", "10.0.0.1")}, ValueError, "instance name"),
    ({"dest": Destination("me", "My_VM")}, ValueError, "instance name"),
    ({"zone": "us central1"}, ValueError, "zone"),
    ({"zone": "--zone=x"}, ValueError, "zone"),
    ({"project": "Bad Project"}, ValueError, "project"),
    ({"project": "abc"}, ValueError, "project"),
    ({"ssh_flags": ["-o ServerAliveInterval=15"]}, ValueError, "white space"),
    ({"ssh_flags": ["--"]}, ValueError, "ssh_flags"),
    ({"ssh_flags": "-p 22"}, TypeError, "list"),
    ({"ssh_flags": [22]}, TypeError, "str"),
    ({"command": ["echo", "a\nb"]}, ValueError, "newline"),
    ({"key_expires": "tomorrow"}, ValueError, "key_expires"),
])
def test_gcloud_ssh_argv_rejects(kwargs: dict, error: type, text: str) -> None:
    args: dict = {"dest": Destination("me", "vm1"), "zone": "us-central1-a", "project": "my-project",
                  "ssh_flags": ["-p", "22"], "command": ["-N"]}
    args.update(kwargs)
    dest = args.pop("dest")
    with pytest.raises(error, match=text):
        gcloud_ssh_argv("gcloud", dest, **args)


@pytest.mark.parametrize(("kwargs", "error", "text"), [
    ({"project": "My Project"}, ValueError, "project"),
    ({"project": "a;rm -rf /"}, ValueError, "project"),
    ({"project": "ok-project", "zone": "us-central1 a"}, ValueError, "zone"),
    ({"project": "ok-project", "region": "US-CENTRAL1"}, ValueError, "region"),
    ({"project": "ok-project", "region": "us-east1", "zone": "us-central1-a"}, ValueError,
     "not in region"),
    ({"account": "not-an-address"}, ValueError, "account"),
    ({"account": "me @example.com"}, ValueError, "account"),
    ({"project": 42}, TypeError, "str"),
    ({"disable_usage_reporting": "yes"}, TypeError, "bool"),
])
def test_gcloud_setup_rejects_bad_input_before_running(kwargs: dict, error: type, text: str,
                                                         tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    fake = tmp_path / "gcloud"
    fake.write_text(f"#!/bin/sh\ntouch {marker}\n")
    fake.chmod(0o755)
    with pytest.raises(error, match=text):
        gcloud_setup(gcloud=str(fake), **kwargs)
    assert not marker.exists()


def test_gcloud_setup_reports_gcloud_failure(tmp_path: Path) -> None:
    fake = tmp_path / "gcloud"
    fake.write_text("#!/bin/sh\necho 'ERROR: (gcloud.config.set) something is wrong' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(GcloudError) as info:
        gcloud_setup(project="ok-project", gcloud=str(fake))
    assert "something is wrong" in info.value.log_tail
    assert "gcloud config set" in str(info.value)


def test_cli_gcloud_setup_runs_steps_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from colab_remote import cli

    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    assert cli.main(["gcloud-setup", "--zone", "us-central1-a", "--account", "me@example.com",
                     "--region", "us-central1", "--project", "my-project"]) == 0
    assert calls.read_text().splitlines() == [
        "config set core/disable_usage_reporting true --quiet",
        "config set core/project my-project --quiet",
        "config set compute/region us-central1 --quiet",
        "config set compute/zone us-central1-a --quiet",
        "config set core/account me@example.com --quiet",
    ]
    assert "core/project = my-project" in capsys.readouterr().out


# --- the real gcloud CLI -----------------------------------------------------------------------


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A throwaway gcloud config (no server) whose compute API is a FakeCompute."""
    fake = FakeCompute(project="colab-remote-test", zone="us-test1-a").start()
    config_dir = tmp_path / "gcloud-config"
    properties = {section: dict(values) for section, values in SANDBOX_PROPERTIES.items()}
    properties["api_endpoint_overrides"] = {"compute": fake.endpoint}
    write_gcloud_config(config_dir, properties)
    home = tmp_path / "home"
    home.mkdir()
    for name, value in sandbox_env(config_dir, home).items():
        monkeypatch.setenv(name, value)
    yield fake
    fake.stop()


@needs_gcloud
def test_gcloud_setup_with_real_gcloud(sandbox: FakeCompute) -> None:
    # zone and region without a project: real gcloud refuses them; we say so before it runs
    with pytest.raises(ValueError, match="need a project"):
        gcloud_setup(zone="us-test1-a")
    done = gcloud_setup(project=sandbox.project, zone="us-test1-a", region="us-test1",
                        account="someone@example.com")
    assert list(done) == ["core/disable_usage_reporting", "core/project", "compute/region",
                          "compute/zone", "core/account"]
    listed = _proc.run([str(GCLOUD), "config", "list", "--format=json"], timeout=60)
    values = json.loads(listed.stdout)
    assert values["core"]["project"] == sandbox.project
    assert values["core"]["account"] == "someone@example.com"
    assert values["core"]["disable_usage_reporting"] == "true"
    assert values["compute"] == {"region": "us-test1", "zone": "us-test1-a"}
    # gcloud checked the zone and region against the project's Compute API: ours
    assert sandbox.requests == [f"GET /compute/v1/projects/{sandbox.project}/regions/us-test1",
                                f"GET /compute/v1/projects/{sandbox.project}/zones/us-test1-a"]


@needs_root
@needs_sshd
@needs_gcloud
def test_gcloud_compute_ssh_reaches_the_server(fake_gcloud, server) -> None:  # noqa: F811
    g = fake_gcloud
    assert GCLOUD is not None
    assert not (g.home / ".ssh").exists()
    argv = gcloud_ssh_argv(GCLOUD, parse_destination(g.destination), zone=g.zone, project=g.project,
                           ssh_flags=["-p", str(server.port), "-o", "BatchMode=yes",
                                      "-o", "ConnectTimeout=10"],
                           command=["echo", "ok"])
    # First run, on a terminal: gcloud creates ~/.ssh and a key. Were it to ask anything
    # (create the folder? a passphrase?), pexpect would time out instead of seeing EOF.
    # Under strace (when there is one) to show that nothing leaves loopback.
    trace = g.home.parent / "connect.trace"
    command = ["strace", "-f", "-e", "trace=connect", "-o", str(trace), *argv] if STRACE else argv
    child = pexpect.spawn(command[0], command[1:], env=g.full_env(), encoding="utf-8", timeout=90)
    try:
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    out = child.before or ""
    assert child.exitstatus == 0, out
    assert "ok" in out.replace("\r", "").splitlines(), out
    assert "passphrase" not in out.lower() and "continue (Y/n)" not in out
    key = g.home / ".ssh" / "google_compute_engine"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "ENCRYPTED" not in key.read_text()
    # the key reached the project metadata and, as the guest agent would, authorized_keys
    pub = (g.home / ".ssh" / "google_compute_engine.pub").read_text().strip()
    key = " ".join(pub.split()[:2])
    entry = json.dumps({"userName": g.user, "expireOn": key_expiration().replace("Z", "+0000")})
    assert g.fake.project_metadata["ssh-keys"] == f"{g.user}:{key} google-ssh {entry.replace(' ', '')}"
    _expires_within_two_days(g.fake.expiries[(g.user, key)])
    assert key in (server.user.home / ".ssh" / "authorized_keys").read_text()
    # the server's host key was pinned from the guest attributes (StrictHostKeyChecking=yes)
    known = (g.home / ".ssh" / "google_compute_known_hosts").read_text()
    assert f"compute.{g.fake.instance_id} {server.host_key_line.split()[0]}" in known
    assert server.host_key_line.split()[1] in known
    expected = [r.format(p=g.project, z=g.zone, i=g.instance) for r in FIRST_SSH_REQUESTS]
    assert g.fake.requests == expected
    if STRACE:
        inet = [line for line in trace.read_text().splitlines() if "sa_family=AF_INET" in line]
        assert inet, "strace saw no connection at all"
        assert all('inet_addr("127.0.0.1")' in line or 'inet_pton(AF_INET6, "::1"' in line
                   for line in inet), "\n".join(inet)

    # Later runs (each reconnection of a tunnel): no terminal, key already there: no metadata write.
    g.fake.requests.clear()
    done = _proc.run(argv, env=g.full_env(), timeout=60)
    assert done.stdout.strip() == "ok"
    assert g.fake.requests == expected[:3]
    assert "setCommonInstanceMetadata" not in " ".join(g.fake.requests)

    # the connection string names the VM's external address
    assert external_ip(GCLOUD, g.instance, g.zone, g.project, env=g.full_env()) == "127.0.0.1"
    g.fake.nat_ip = ""
    with pytest.raises(GcloudError, match="no external IP"):
        external_ip(GCLOUD, g.instance, g.zone, g.project, env=g.full_env())
    with pytest.raises(GcloudError, match="could not describe") as info:
        external_ip(GCLOUD, "no-such-vm", g.zone, g.project, env=g.full_env())
    assert "was not found" in info.value.log_tail


def _expires_within_two_days(when) -> None:
    left = (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    assert 86400 - 60 <= left <= 2 * 86400, when


@needs_root
@needs_sshd
@needs_gcloud
def test_gcloud_key_goes_to_the_instance_when_it_blocks_project_keys(fake_gcloud, server) -> None:  # noqa: F811
    """A VM with block-project-ssh-keys confines gcloud's key to that VM's metadata (with expiry)."""
    g = fake_gcloud
    assert GCLOUD is not None
    g.fake.instance_metadata["block-project-ssh-keys"] = "TRUE"
    argv = gcloud_ssh_argv(GCLOUD, parse_destination(g.destination), zone=g.zone, project=g.project,
                           ssh_flags=["-p", str(server.port), "-o", "BatchMode=yes"], command=["echo", "ok"])
    done = _proc.run(argv, env=g.full_env(), timeout=90, check=False)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "ok", done.stdout + done.stderr
    assert "ssh-keys" not in g.fake.project_metadata
    assert "setCommonInstanceMetadata" not in " ".join(g.fake.requests)
    pub = (g.home / ".ssh" / "google_compute_engine.pub").read_text().split()
    assert f"{g.user}:{pub[0]} {pub[1]} google-ssh " in g.fake.instance_metadata["ssh-keys"]
    _expires_within_two_days(g.fake.expiries[(g.user, f"{pub[0]} {pub[1]}")])


# --- a tunnel through gcloud -------------------------------------------------------------------


def _ssh_processes(pid: int) -> list[int]:
    """``pid`` and its descendants that run ssh (gcloud runs ssh as its child)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        argv = _proc.cmdline(p)
        if argv and os.path.basename(argv[0]) == "ssh":
            found.append(p)
        todo += _proc.children(p)
    return found


@needs_root
@needs_sshd
@needs_gcloud
def test_tunnel_through_gcloud_heals(fake_gcloud, server, make_user, tmp_path: Path,  # noqa: F811
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    reverse = pytest.importorskip("colab_remote.reverse")
    from colab_remote import start_sshd

    from .conftest import ssh_run, wait_for

    g = fake_gcloud
    # The supervisor inherits this environment, and with it gcloud's sandbox.
    for name, value in g.env.items():
        monkeypatch.setenv(name, value)
    runtime_user = make_user()
    state = tmp_path / "rt"
    sshd = start_sshd(port=_net.free_port(), user=runtime_user.name, password=runtime_user.password,
                      state_dir=state, listen_address="127.0.0.1", quiet=True)
    remote_port = _net.free_port()
    known_hosts = tmp_path / "client_known_hosts"
    jump = (f"{server.user.name}@127.0.0.1:{server.port}", server.user.password)
    try:
        with reverse.reverse_forward(g.destination, via="gcloud", zone=g.zone, project=g.project,
                                     port=server.port, remote_port=remote_port, state_dir=state,
                                     quiet=True) as tunnel:
            assert tunnel.alive, tunnel.logs()
            assert tunnel.remote_port == remote_port
            assert "127.0.0.1" in tunnel.connection_string  # the VM's natIP, not its name
            # gcloud (and its project-wide key) for the set-up only: the supervisor runs plain ssh
            # with a key that can keep this forward up and nothing else
            assert tunnel.config["restricted"] and "a key for this tunnel only" in tunnel.access()
            assert os.path.basename(_proc.cmdline(tunnel.ssh_pid or 0)[0]) == "ssh"
            lines = (server.user.home / ".ssh" / "authorized_keys").read_text()
            assert f'permitlisten="localhost:{remote_port}"' in lines and "colab-remote:" in lines
            assert ssh_run(remote_port, runtime_user.name, runtime_user.password, "echo via-gcloud",
                           known_hosts=known_hosts, jump=jump) == "via-gcloud"

            before = tunnel.restarts
            ssh_pid = tunnel.ssh_pid
            assert ssh_pid is not None, tunnel.logs()
            victims = _ssh_processes(ssh_pid)
            assert victims, f"no ssh under pid {ssh_pid}: {_proc.cmdline(ssh_pid)}"
            for pid in victims:
                os.kill(pid, 9)
            wait_for(lambda: tunnel.restarts > before and tunnel.alive, 60, "the tunnel to heal")
            assert ssh_run(remote_port, runtime_user.name, runtime_user.password, "echo healed",
                           known_hosts=known_hosts, jump=jump) == "healed"
            assert "setCommonInstanceMetadata" in " ".join(g.fake.requests)

            # the VM's sshd crashes and comes back (same host key): gcloud reconnects
            before = tunnel.restarts
            server.stop()
            server.start()
            wait_for(lambda: tunnel.restarts > before and tunnel.alive, 60,
                     "the tunnel to come back after the server restarted")
            assert ssh_run(remote_port, runtime_user.name, runtime_user.password, "echo back",
                           known_hosts=known_hosts, jump=jump) == "back"
    finally:
        sshd.stop()


@needs_root
@needs_sshd
@needs_gcloud
def test_tunnel_through_gcloud_unrestricted_keeps_gclouds_own_login(fake_gcloud, server,  # noqa: F811
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    reverse = pytest.importorskip("colab_remote.reverse")
    g = fake_gcloud
    for name, value in g.env.items():
        monkeypatch.setenv(name, value)
    with reverse.reverse_forward(g.destination, via="gcloud", zone=g.zone, project=g.project,
                                 port=server.port, remote_port=_net.free_port(), local_port=server.port,
                                 state_dir=tmp_path / "rt", restricted=False, quiet=True) as tunnel:
        assert tunnel.alive and not tunnel.config["restricted"], tunnel.logs()
        assert "gcloud" in " ".join(_proc.cmdline(tunnel.ssh_pid or 0))  # every login through gcloud
        assert "unrestricted" in tunnel.access()
        ak = server.user.home / ".ssh" / "authorized_keys"
        assert "colab-remote:" not in ak.read_text()
