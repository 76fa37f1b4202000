"""The gcloud side of the recipe: ``gcloud config set`` steps and ``gcloud compute ssh`` argv.

What real gcloud (SDK 528, ``surface/compute/ssh.py``) does with the argv built here:

* It looks the instance up, pushes ``~/.ssh/google_compute_engine.pub`` into the project metadata
  when it is not there yet, and then *polls* with its own ``ssh ... USER@IP -- :`` until the key
  works. That probe gets the ``--ssh-flag`` values but not what follows ``--``: the port, the
  keepalives and anything else the connection itself needs must be ``--ssh-flag``; ``-N`` and
  ``-R`` must come after ``--`` (``-N`` on the probe would keep it open forever, ``-R`` would
  fight the tunnel for its port).
* ``--ssh-flag`` values are split on white space and ``%USER%``/``%INSTANCE%``/``%INTERNAL%``
  are replaced in them, so each flag word goes in its own ``--ssh-flag`` and none may hold a space.
* On the first run it creates ``~/.ssh`` (a yes/no prompt) and runs ``ssh-keygen`` (a passphrase
  prompt). ``--quiet`` answers the first and makes the key with an empty passphrase, so a
  detached run never waits for a terminal.
* Host keys: it passes ``HostKeyAlias=compute.<id>`` with its own known_hosts file. When the VM
  publishes its host keys as guest attributes they are pinned (``StrictHostKeyChecking=yes``);
  otherwise the first connection records the key and later ones check it. ``strict_host_key_checking
  =True`` demands a pinned or recorded key every time.
* gcloud's own ssh options come first on ssh's command line and ssh keeps the first value of an
  option, so ``--ssh-flag`` cannot override ``UserKnownHostsFile``/``StrictHostKeyChecking``.
* The key it pushes has no passphrase and lands in the *project's* metadata (a login on every VM
  of the project that accepts project keys); gcloud uses the instance's metadata instead only
  when the VM sets ``block-project-ssh-keys`` (or project metadata cannot be written). There is
  no flag to choose. ``--ssh-key-expiration`` makes the entry expire (gcloud writes
  ``google-ssh {"userName":...,"expireOn":...}``; the guest agent drops it then): we pass the
  end of tomorrow (UTC), the same value all day, so a reconnection finds the entry unchanged and
  writes no metadata (``--ssh-key-expire-after`` would be a new entry on every run).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping, Sequence

from . import _install, _proc
from ._ssh import Destination
from .errors import GcloudError

log = logging.getLogger(__name__)

GCLOUD_FIX = ("install the Google Cloud CLI (Colab has it preinstalled): "
              "https://cloud.google.com/sdk/docs/install")
_LOGIN_FIX = "run `gcloud auth login` (in Colab: from google.colab import auth; auth.authenticate_user())"

# GCE resource names (RFC 1035 labels); projects may carry a legacy "domain.com:" prefix.
_INSTANCE_RE = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")
_LOCATION_RE = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)+")
_PROJECT_RE = re.compile(r"(?:[a-z0-9][a-z0-9.-]*[a-z0-9]:)?[a-z][a-z0-9-]{4,28}[a-z0-9]")
_ACCOUNT_RE = re.compile(r"[^\s@]+@[^\s@]+\.[^\s@]+")
_NAT_IP_FORMAT = "value(networkInterfaces[0].accessConfigs[0].natIP)"


# --- checks (ValueError/TypeError before anything runs) ----------------------------------------


def _check(value: object, name: str, pattern: re.Pattern[str], allowed: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {value!r}")
    if not pattern.fullmatch(value):
        raise ValueError(f"{name} {value!r} is not valid: {allowed}")
    return value


def check_instance(name: object) -> str:
    """A Compute Engine instance name (``my-vm``), else ``ValueError``."""
    return _check(name, "instance name", _INSTANCE_RE,
                  "1-63 lowercase letters, digits and '-', starting with a letter, e.g. 'my-vm' "
                  "(via='gcloud' takes user@INSTANCE, not an address)")


def check_zone(zone: object) -> str:
    """A zone like ``us-central1-a``, else ``ValueError``."""
    return _check(zone, "zone", _LOCATION_RE, "e.g. 'us-central1-a' (gcloud compute zones list)")


def check_region(region: object) -> str:
    """A region like ``us-central1``, else ``ValueError``."""
    return _check(region, "region", _LOCATION_RE, "e.g. 'us-central1' (gcloud compute regions list)")


def check_project(project: object) -> str:
    """A project ID like ``my-project-123``, else ``ValueError``."""
    return _check(project, "project", _PROJECT_RE,
                  "a project ID of 6-30 lowercase letters, digits and '-', starting with a letter "
                  "(the ID, not the display name), e.g. 'my-project-123'")


def check_account(account: object) -> str:
    """An account e-mail address, else ``ValueError``."""
    return _check(account, "account", _ACCOUNT_RE, "an e-mail address, e.g. 'me@example.com'")


def find_gcloud() -> str:
    """Path of the gcloud CLI, or :class:`GcloudError` saying how to get it."""
    path = _install.find_program("gcloud")
    if path is None:
        raise GcloudError("gcloud not found", fix=GCLOUD_FIX)
    return path


# --- gcloud compute ssh ------------------------------------------------------------------------


def key_expiration(now: float | None = None) -> str:
    """When gcloud's key stops working: midnight UTC at the end of tomorrow (24 to 48 h away)."""
    day = int((time.time() if now is None else now) // 86400) + 2
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(day * 86400))


def gcloud_ssh_argv(gcloud: str, dest: Destination, *, zone: str | None, project: str | None,
                    ssh_flags: list[str], command: list[str],
                    strict_host_key_checking: bool = False,
                    key_expires: str | None = None) -> list[str]:
    """``gcloud compute ssh USER@INSTANCE ...`` as an argv list that never prompts.

    Args:
        gcloud: path of the gcloud CLI.
        dest: ``USER@INSTANCE`` (the host part is the instance name).
        zone, project: the instance's zone and project; None uses gcloud's configuration.
        ssh_flags: ssh options that must also apply to gcloud's key-propagation probe (``-p``,
            ``-o ServerAliveInterval=15``, ``-i``): one word per item, no white space.
        command: what follows ``--``: more ssh options (``-N``, ``-R ...``) and a remote command.
        strict_host_key_checking: require a pinned or recorded host key (gcloud's
            ``--strict-host-key-checking=yes``) instead of gcloud's trust on first use.
        key_expires: when the key gcloud puts into metadata expires, ``YYYY-MM-DDTHH:MM:SSZ``
            (default :func:`key_expiration`: the end of tomorrow, UTC).

    Example:
        >>> from colab_remote._ssh import Destination
        >>> gcloud_ssh_argv("gcloud", Destination("me", "my-vm"), zone="us-central1-a",
        ...                 project="my-project", ssh_flags=["-p", "22"], command=["-N"])[3:6]
        ['me@my-vm', '--zone=us-central1-a', '--project=my-project']
    """
    if not isinstance(dest, Destination):
        raise TypeError(f"dest must be a Destination (from parse_destination), got {dest!r}")
    check_instance(dest.host)
    flags = _words(ssh_flags, "ssh_flags")
    for flag in flags:
        if not flag or any(c.isspace() for c in flag) or flag == "--":
            raise ValueError(f"ssh_flags item {flag!r}: gcloud splits --ssh-flag at white space; "
                             "pass each word as its own item (['-o', 'ServerAliveInterval=15'])")
    words = _words(command, "command")
    argv = [gcloud, "compute", "ssh", dest.target]
    if zone is not None:
        argv.append(f"--zone={check_zone(zone)}")
    if project is not None:
        argv.append(f"--project={check_project(project)}")
    # --quiet: no yes/no prompt for creating ~/.ssh, an empty passphrase for the new key, and
    # no prompt anywhere else: a detached gcloud has no terminal to answer one.
    argv.append("--quiet")
    expires = key_expiration() if key_expires is None else key_expires
    if not isinstance(expires, str) or not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", expires):
        raise ValueError(f"key_expires must look like 2030-01-31T00:00:00Z, got {expires!r}")
    argv.append(f"--ssh-key-expiration={expires}")
    if strict_host_key_checking:
        argv.append("--strict-host-key-checking=yes")
    argv += [f"--ssh-flag={flag}" for flag in flags]
    if words:
        argv += ["--", *words]
    return argv


def _words(items: object, name: str) -> list[str]:
    if isinstance(items, str) or not isinstance(items, Sequence):
        raise TypeError(f"{name} must be a list of str, got {items!r}")
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{name} must hold only str, got {item!r}")
        if "\0" in item or "\n" in item:
            raise ValueError(f"{name} item {item!r} must not contain NUL or a newline")
    return list(items)


def external_ip(gcloud: str, instance: str, zone: str | None, project: str | None,
                env: Mapping[str, str] | None = None, *, timeout: float = 60) -> str:
    """The instance's external (NAT) IPv4 address, for the connection string.

    Raises:
        GcloudError: gcloud failed (log tail attached) or the instance has no external address.
    """
    argv = [gcloud, "compute", "instances", "describe", check_instance(instance)]
    if zone is not None:
        argv.append(f"--zone={check_zone(zone)}")
    if project is not None:
        argv.append(f"--project={check_project(project)}")
    argv += [f"--format={_NAT_IP_FORMAT}", "--quiet"]
    done = _proc.run(argv, timeout=timeout, env=env, error=GcloudError,
                     what=f"gcloud could not describe instance {instance}",
                     fix=f"check the instance name, zone and project; {_LOGIN_FIX} if not logged in")
    address = done.stdout.strip()
    if not address:
        raise GcloudError(
            f"instance {instance} has no external IP address",
            log_tail=done.stderr,
            fix=f"add one: gcloud compute instances add-access-config {instance}"
                + (f" --zone={zone}" if zone else ""),
        )
    return address


def instance_id(gcloud: str, instance: str, zone: str | None, project: str | None,
                env: Mapping[str, str] | None = None, *, timeout: float = 60) -> str:
    """The instance's numeric id: gcloud records its host key as ``compute.<id>``."""
    argv = [gcloud, "compute", "instances", "describe", check_instance(instance)]
    if zone is not None:
        argv.append(f"--zone={check_zone(zone)}")
    if project is not None:
        argv.append(f"--project={check_project(project)}")
    argv += ["--format=value(id)", "--quiet"]
    done = _proc.run(argv, timeout=timeout, env=env, error=GcloudError,
                     what=f"gcloud could not describe instance {instance}",
                     fix=f"check the instance name, zone and project; {_LOGIN_FIX} if not logged in")
    return done.stdout.strip()


def recorded_host_keys(home: str, ident: str) -> list[str]:
    """The VM's host keys as gcloud recorded (or pinned) them: ``type base64`` each."""
    path = os.path.join(home, ".ssh", "google_compute_known_hosts")
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        words = line.split()
        if len(words) >= 3 and f"compute.{ident}" in words[0].split(","):
            found.append(f"{words[1]} {words[2]}")
    return found


class SetupRunner:
    """Runs the set-up's command on the VM through ``gcloud compute ssh`` (its own key, once).

    gcloud pushes its key into the project's metadata on the first run and then polls with its own
    ssh until the key works; that poll would swallow stdin, so :meth:`prepare` runs a no-op first
    and the set-up command (with its stdin) comes second, when there is nothing left to poll.
    """

    def __init__(self, gcloud: str, dest: Destination, zone: str | None, project: str | None,
                 port: int, timeout: float = 120) -> None:
        self.gcloud, self.dest, self.zone, self.project = gcloud, dest, zone, project
        self.port, self.timeout = port, timeout

    def _argv(self, command: str) -> list[str]:
        flags = ["-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5"]
        if self.port != 22:
            flags = ["-p", str(self.port), *flags]
        return gcloud_ssh_argv(self.gcloud, self.dest, zone=self.zone, project=self.project,
                               ssh_flags=flags, command=["-T", command])

    def prepare(self) -> None:
        _proc.run(self._argv("true"), timeout=self.timeout, error=GcloudError,
                  what=f"gcloud compute ssh {self.dest.target} failed",
                  fix=f"{_LOGIN_FIX}; check the instance, zone, project and its firewall")

    def __call__(self, command: str, data: bytes, timeout: float) -> _proc.Result:
        return _proc.run(self._argv(command), input=data, timeout=max(timeout, self.timeout),
                         check=False)


# --- gcloud config set -------------------------------------------------------------------------


def gcloud_setup(project: str | None = None, zone: str | None = None, region: str | None = None,
                 account: str | None = None, *, disable_usage_reporting: bool = True,
                 gcloud: str | None = None, timeout: float = 60) -> dict[str, str]:
    """Run the recipe's ``gcloud config set`` steps in an order gcloud accepts.

    ``disable_usage_reporting`` first (nothing gets reported by the later steps), then the
    project: gcloud checks a zone or region against the Compute API of the configured project and
    refuses one set before any project. The account comes last, so setting the project does not
    look the project up with the account's credentials (that check only warns). Log in
    separately with ``gcloud auth login`` (or ``google.colab.auth.authenticate_user()``).

    Args:
        project: project ID (``core/project``).
        zone: default zone (``compute/zone``), e.g. ``us-central1-a``.
        region: default region (``compute/region``); must contain ``zone`` when both are given.
        account: account e-mail (``core/account``).
        disable_usage_reporting: set ``core/disable_usage_reporting`` to this value.
        gcloud: path of the gcloud CLI (default: found on PATH).
        timeout: seconds allowed for each gcloud call.

    Returns:
        The properties set, ``{"core/project": "my-project", ...}``, in the order they were set.

    Raises:
        ValueError: a malformed project, zone, region or account, or a zone outside ``region``.
        GcloudError: gcloud is missing or refused a value (with its output).

    Example:
        >>> gcloud_setup(project="my-project", zone="us-central1-a")  # doctest: +SKIP
        {'core/disable_usage_reporting': 'true', 'core/project': 'my-project', ...}
    """
    if not isinstance(disable_usage_reporting, bool):
        raise TypeError(f"disable_usage_reporting must be a bool, got {disable_usage_reporting!r}")
    steps: list[tuple[str, str]] = [
        ("core/disable_usage_reporting", "true" if disable_usage_reporting else "false")]
    if project is not None:
        steps.append(("core/project", check_project(project)))
    if region is not None:
        steps.append(("compute/region", check_region(region)))
    if zone is not None:
        check_zone(zone)
        if region is not None and not zone.startswith(region + "-"):
            raise ValueError(f"zone {zone!r} is not in region {region!r} (zones of {region!r} "
                             f"look like '{region}-a')")
        steps.append(("compute/zone", zone))
    if account is not None:
        steps.append(("core/account", check_account(account)))
    exe = gcloud if gcloud is not None else find_gcloud()
    if (zone is not None or region is not None) and project is None and not _configured_project(
            exe, timeout):
        raise ValueError("zone and region need a project: pass project= (gcloud validates them "
                         "against the project's Compute API)")
    done: dict[str, str] = {}
    for prop, value in steps:
        log.info("gcloud config set %s %s", prop, value)
        _proc.run([exe, "config", "set", prop, value, "--quiet"], timeout=timeout, error=GcloudError,
                  what=f"gcloud config set {prop} {value} failed",
                  fix=f"run: gcloud config set {prop} {value}  and read its message")
        done[prop] = value
    return done


def _configured_project(gcloud: str, timeout: float) -> str:
    done = _proc.run([gcloud, "config", "get-value", "core/project", "--quiet"], timeout=timeout,
                     error=GcloudError, what="gcloud config get-value core/project failed",
                     fix="run: gcloud config list  and read its message", check=False)
    return done.stdout.strip() if done.returncode == 0 else ""
