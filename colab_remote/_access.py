"""The one login that may use the server password; after it, the runtime holds keys that can do
almost nothing.

:func:`reverse_forward` and :func:`mirror` call :func:`grant` before they start their detached
process. It logs in once (the password typed at ssh's prompt, or the user's own key), installs the
server half (:mod:`colab_remote._agent`, a file pinned by its sha256) and appends one restricted
line for this runtime and purpose to the server's ``~/.ssh/authorized_keys``:

- a tunnel's key may listen on its own port on the server's loopback and open that port (``-W``
  for :func:`self_check`), and run only the helper that reports and reclaims its own sessions;
- a mirror's key runs only the agent, confined to the destination folder, with the trash kept as
  the server's own config says.

Both carry ``expiry-time``. It then logs in with the new key to check that the server takes it, and
returns. The password goes no further: the detached processes get the key file only, log in with
``BatchMode=yes`` and ``IdentitiesOnly=yes``, and a prompt is a failure with a clear message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import secrets
import shlex
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _agent, _install, _net, _proc, _ssh
from ._master import LoginFailed, Master
from .errors import AuthenticationError, ColabRemoteError

log = logging.getLogger(__name__)

KEY_DAYS = 3.0            # restricted keys expire after this many days unless told otherwise
MIN_OPENSSH = (7, 8)      # permitlisten; restrict 7.2, expiry-time 7.7
SETUP_TIMEOUT = 60.0
_OPENSSH = re.compile(r"SSH-2\.0-OpenSSH_(\d+)\.(\d+)")


def check_days(days: object, name: str = "key_days") -> float:
    """``days`` if it is a positive number of days (a restricted key's lifetime), else an error."""
    if isinstance(days, bool) or not isinstance(days, (int, float)) or not 0 < days <= 3650:
        raise ValueError(f"{name} must be a number of days > 0 (at most 3650), got {days!r}")
    return float(days)


def short_hash(text: str) -> str:
    """A short stable name part for ``text`` (a key's purpose)."""
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def unrestricted_warning(dest: _ssh.Destination, what: str, identity_file: str | None) -> str:
    """What the runtime can do on the server when no restricted key is used."""
    how = f"the key {identity_file}" if identity_file else "the password (kept in memory)"
    return (f"note: the {what} logs in to {dest.target} with {how}: anything running in this "
            "runtime can log in to your server as that account. restricted=True (the default, "
            "with a password or your default keys) installs a key that can do only this.")


def agent_source() -> tuple[bytes, str]:
    """The server half (:mod:`colab_remote._agent` as one zip) and its sha256 (what the server
    will run)."""
    return _agent.bundle()


def runtime_id(state: Path) -> str:
    """This runtime's id (made once per state folder): it names its key lines on the server."""
    path = state / "runtime-id"
    with contextlib.suppress(OSError, ValueError):
        rid = path.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{12}", rid):
            return rid
    rid = secrets.token_hex(6)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    _proc.write_private(path, rid + "\n")
    return rid


def key_id(state: Path, purpose: dict[str, Any]) -> str:
    """``<runtime id>.<purpose's name>``: one purpose of this runtime on a server (its key line,
    its mirror's writer)."""
    return f"{runtime_id(state)}.{purpose['name']}"


def key_file(state: Path, name: str) -> Path:
    """``state/keys/name``: an ed25519 key of this runtime for one purpose, made once (0600)."""
    folder = state / "keys"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.chmod(0o700)
    key = folder / name
    if not key.is_file() or not Path(f"{key}.pub").is_file():
        with contextlib.suppress(FileNotFoundError):
            key.unlink()
        keygen = _install.require_program("ssh-keygen", package="openssh-client", install=True,
                                       error=ColabRemoteError)
        _proc.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", f"colab-remote {name}",
                   "-f", str(key)], what="making a key for the server failed")
    key.chmod(0o600)
    return key


@dataclass(frozen=True)
class Login:
    """How to reach the server: the account, the port, the host keys it is checked against."""

    ssh: str
    dest: _ssh.Destination
    port: int
    known_hosts: Path
    pinned: bool
    identity_file: str | None = None

    def options(self, *, key: str | None = None, password: bool = False) -> dict[str, str | int]:
        """ssh options: with ``key`` that key alone and no prompt at all (``BatchMode``)."""
        opts: dict[str, str | int] = {
            "ConnectTimeout": 10, "ServerAliveInterval": 5, "ServerAliveCountMax": 3,
            "NumberOfPasswordPrompts": 1, "PermitLocalCommand": "no", "LogLevel": "ERROR",
            "ControlMaster": "no", "ControlPath": "none",
        }
        opts.update(_ssh.host_key_options(self.known_hosts, pinned=self.pinned))
        identity = key or self.identity_file
        if identity is not None:
            opts.update(IdentityFile=identity, IdentitiesOnly="yes", IdentityAgent="none")
        if key is not None or not password:
            opts.update(BatchMode="yes", PasswordAuthentication="no", KbdInteractiveAuthentication="no")
        else:
            opts.update(BatchMode="no", PubkeyAuthentication="no",
                        PreferredAuthentications="password,keyboard-interactive")
        return opts

    def argv(self, *words: str, key: str | None = None, password: bool = False) -> list[str]:
        return [self.ssh, *_ssh.ssh_option_argv(self.options(key=key, password=password)),
                "-p", str(self.port), self.dest.target, *words]


@dataclass(frozen=True)
class Grant:
    """What the set-up left on the server for one purpose."""

    key: Path | None              # the restricted key (None: the account's own login is used)
    key_id: str
    port: int | None = None       # a tunnel's port on the server (the one it picked for 0)
    dest: str | None = None       # a mirror's destination, as a real path on the server
    command: tuple[str, ...] = () # a mirror without restrictions: how to run the agent directly
    expires: float | None = None
    agent: bool = True            # the server has python3 (without it: no agent, rsync only)
    trusted: bool = False         # reused on the record's word, not checked by a login (trust=True)


class _Session:
    """One login to the server (a :class:`Master`: the password is typed once), for the set-up."""

    def __init__(self, login: Login, password: str | None, error: type[ColabRemoteError],
                 timeout: float) -> None:
        self.login, self.password, self.error, self.timeout = login, password, error, timeout
        self.folder = Path(tempfile.mkdtemp(prefix="crs-"))  # 0700, ours alone
        self.master: Master | None = None

    def __enter__(self) -> _Session:
        control = self.folder / "cm"
        options = self.login.options(password=self.password is not None)
        options.update(ControlMaster="yes", ControlPath=str(control), ControlPersist="no")
        argv = [self.login.ssh, "-N", "-T", *_ssh.ssh_option_argv(options), "-p", str(self.login.port),
                self.login.dest.target]
        self.master = Master(argv, control, self.password)
        try:
            self.master.start().wait(self.timeout)
        except LoginFailed as e:
            self.__exit__()
            raise self._failure(e) from None
        except BaseException:
            self.__exit__()
            raise
        return self

    def _failure(self, e: LoginFailed) -> ColabRemoteError:
        login, tail = self.login, e.output[-2000:]
        target = f"{login.dest.target} (port {login.port})"
        if e.kind == "auth":
            return AuthenticationError(f"{target} refused the login: {e.message}", log_tail=tail,
                                       fix="check the user and password= (or identity_file=)")
        if e.kind == "hostkey":
            return self.error(f"the host key of {login.dest.host} does not match: {e.message}",
                              log_tail=tail,
                              fix="check the server's fingerprint (ssh-keygen -lf "
                                  "/etc/ssh/ssh_host_ed25519_key.pub on the server); if it really "
                                  f"changed, remove its line from {login.known_hosts}")
        if e.kind in ("down", "resolve"):
            return self.error(f"could not reach {login.dest.host} port {login.port}: {e.message}",
                              log_tail=tail,
                              fix="check the host name, the port (port=) and that the server's sshd runs")
        if e.kind == "timeout":
            return self.error(f"no SSH login to {target} within {self.timeout:g} s", log_tail=tail,
                              fix="check the host, the port and that the server is up")
        return self.error(f"could not log in to {target}: {e.message}", log_tail=tail,
                          fix="check the host name, the port and that the server's sshd runs")

    def run(self, command: str, data: bytes, timeout: float) -> _proc.Result:
        """Run ``command`` (text for the account's shell) with ``data`` on stdin."""
        assert self.master is not None
        return _proc.run(self.master.mux(command, options=["-o", "ControlMaster=no"]), input=data,
                         timeout=timeout, check=False)

    def __exit__(self, *exc: object) -> None:
        if self.master is not None:
            self.master.end()
            self.master = None
        shutil.rmtree(self.folder, ignore_errors=True)


def _check_server(login: Login, restricted: bool, error: type[ColabRemoteError]) -> None:
    """Restricted keys need OpenSSH >= 7.8 on the server: say so before logging in."""
    if not restricted:
        return
    banner = _net.ssh_banner(login.dest.host, login.port, timeout=5)
    if banner is None:
        return  # the login says why
    found = _OPENSSH.match(banner)
    if found is None or (int(found.group(1)), int(found.group(2))) < MIN_OPENSSH:
        raise error(
            f"{login.dest.host} runs {banner.split('-', 2)[-1]}: restricted keys need OpenSSH 7.8 or "
            "newer (authorized_keys' restrict, permitlisten, expiry-time)",
            fix="upgrade the server's OpenSSH; or pass restricted=False, which hands the runtime "
                "your whole server account (anything running there can log in as you)")


# The set-up's first bytes on stdin are the agent's zip: into a private temporary file (mkstemp:
# 0600, made exclusively; removed at exit), run from there (it installs itself for good). One line:
# gcloud passes the command as an argument, which may hold no newline.
_BOOT = ("import atexit, os, sys, tempfile; fd, path = tempfile.mkstemp(suffix='.pyz'); "
         "atexit.register(os.unlink, path); f = os.fdopen(fd, 'wb'); "
         "f.write(sys.stdin.buffer.read(%d)); f.close(); sys.path.insert(0, path); "
         "from %s.main import main; sys.exit(main(sys.argv[1:]))")


def _setup_command(source: bytes, then: list[str] | None = None) -> str:
    boot = _BOOT % (len(source), _agent.PACKAGE)
    more = " --then " + shlex.join(then) if then else ""
    return ("if command -v python3 >/dev/null 2>&1; then exec python3 -I -B -c "
            f"{shlex.quote(boot)} setup{more}; fi; echo CRA-NOPYTHON; exit 97")


def _request(state: Path, purpose: dict[str, Any], *, restricted: bool, days: float = KEY_DAYS,
             key: Path | None = None) -> tuple[bytes, str, bytes]:
    """The set-up's request for one purpose: (the agent's zip, its sha256, the request)."""
    source, sha = agent_source()
    request = {"sha": sha, "restricted": restricted,
               "keys": [{**purpose, "id": key_id(state, purpose), "days": days,
                         "label": f"runtime={socket.gethostname()} set-up={time.strftime('%Y-%m-%d')}",
                         "pubkey": Path(f"{key}.pub").read_text().strip() if key else ""}]}
    return source, sha, json.dumps(request).encode()


def setup_then_mirror(state: Path, purpose: dict[str, Any]) -> tuple[str, bytes]:
    """``restricted=False``: the set-up of a mirror through the account's own login that then runs
    the mirror's agent in the same session (a runtime's first start runs one command on the
    server, not two): (the command, its stdin). Its first line out: see :func:`mirror_set_up`."""
    source, _, request = _request(state, purpose, restricted=False)
    return (_setup_command(source, then=mirror_args(purpose, key_id(state, purpose))),
            source + request + b"\n")


def mirror_set_up(state: Path, login: Login, purpose: dict[str, Any], stdout: str,
                  error: type[ColabRemoteError]) -> list[str] | None:
    """What :func:`setup_then_mirror`'s command printed before its agent's records, taken as
    :func:`grant` takes a set-up's reply: how to start the agent from now on (recorded, see
    :func:`installed_agent`), or None when the server has no python3. Raises ``error`` when the
    set-up failed."""
    if "CRA-NOPYTHON" in stdout:
        log.warning("%s has no python3: the mirror copies with rsync alone", login.dest.host)
        return None
    reply = _reply(_proc.Result(0, stdout, ""), login, error)
    _record_agent(state, login, reply)
    log.info("set up mirror on %s: the account's own login (its agent runs next)", login.dest.target)
    return direct_command(reply["python"], reply["agent"], purpose, key_id(state, purpose))


Runner = Callable[[str, bytes, float], "_proc.Result"]  # (command, stdin, timeout) -> what it did


def grant(state: Path, login: Login, purpose: dict[str, Any], *, password: str | None,
          restricted: bool = True, days: float = KEY_DAYS, error: type[ColabRemoteError],
          quiet: bool = False, timeout: float = SETUP_TIMEOUT, runner: Runner | None = None,
          trust: bool = False) -> Grant:
    """Log in once and set the server up for one tunnel or mirror (see the module docstring).

    ``purpose``: ``{"purpose": "tunnel", "name": ..., "port": N}`` or ``{"purpose": "mirror",
    "name": ..., "dest": path, "keep_days": d, "backup": b}``. Without ``restricted`` no key is
    installed (the account's own login is used from then on) but the agent still is. ``runner``
    runs the set-up's command some other way than a login to ``login`` (``gcloud compute ssh``);
    the new key is still checked with a plain login to ``login``. ``trust``: a key this runtime
    installed for the same purpose, agent and server is taken without logging in to check it
    (``Grant.trusted``): the caller's own login then checks it, and calls again without ``trust``
    when it fails.

    Raises:
        AuthenticationError: the server refused the login.
        error: the server is unreachable, lacks python3 or a new enough OpenSSH, or did not take
            the key.
    """
    kid = key_id(state, purpose)
    if restricted and trust:
        reused = _reuse(state, login, purpose, kid, check=False)
        if reused is not None:
            log.info("reusing the key %s (on record)", kid)
            return reused
    _check_server(login, restricted, error)
    if restricted:
        reused = _reuse(state, login, purpose, kid)
        if reused is not None:
            log.info("reusing the key %s: the server still takes it", kid)
            return reused
    key = key_file(state, purpose["name"]) if restricted else None
    source, sha, request = _request(state, purpose, restricted=restricted, days=days, key=key)
    known_before = known_lines(login)
    with contextlib.ExitStack() as stack:
        if runner is None:
            runner = stack.enter_context(_Session(login, password, error, timeout)).run
        done = runner(_setup_command(source), source + request, timeout)
        if "CRA-NOPYTHON" in done.stdout and not restricted:
            log.warning("%s has no python3: the mirror copies with rsync alone", login.dest.host)
            return Grant(key=None, key_id=kid, agent=False)
        reply = _reply(done, login, error)
        found = reply["keys"][0]
        command = direct_command(reply["python"], reply["agent"], purpose, kid) \
            if purpose["purpose"] == "mirror" else []
        result = Grant(key=key, key_id=kid, port=found.get("port"), dest=found.get("dest"),
                       command=tuple(command), expires=found.get("expires"))
        if key is not None:
            _verify(runner, login, key, kid, reply, error)
            _record(state, login, purpose, result, sha)
        else:
            _record_agent(state, login, reply)
    announce_new_host_key(login, known_before, quiet)
    log.info("set up %s on %s: %s", purpose["purpose"], login.dest.target,
             "restricted key " + kid if key else "the account's own login")
    return result


def _reply(done: _proc.Result, login: Login, error: type[ColabRemoteError]) -> dict[str, Any]:
    if "CRA-NOPYTHON" in done.stdout:
        raise error(f"{login.dest.host} has no python3: the server half of colab-remote needs it",
                    fix="install it on the server (apt-get install python3); or pass "
                        "restricted=False (then the tunnel needs nothing and the mirror copies "
                        "with rsync, with your whole account in the runtime's hands)")
    for line in done.stdout.splitlines():
        if line.startswith("CRA-SETUP "):
            reply: dict[str, Any] = json.loads(line[len("CRA-SETUP "):])
            if not reply.get("ok"):
                raise error(f"setting up {login.dest.host} failed: {reply.get('error')}",
                            fix="fix what it says on the server and try again")
            return reply
    raise error(f"setting up {login.dest.host} failed (exit {done.returncode})", log_tail=done.tail,
                fix="read the output above; the server's shell start-up files must not print")


def _verify(runner: Runner, login: Login, key: Path, kid: str, reply: dict[str, Any],
            error: type[ColabRemoteError]) -> None:
    """Log in with the new key alone; when the server does not take it, take the line back."""
    done = _proc.run(login.argv("hello", key=str(key)), timeout=30, check=False, error=error)
    if done.stdout.startswith("colab-remote-agent "):
        return
    runner(shlex.join([reply["python"], "-I", "-B", reply["agent"], "revoke", "--id", kid]), b"", 30)
    raise error(f"{login.dest.host} did not accept the new restricted key",
                log_tail=(done.stderr or done.stdout).strip(),
                fix="the server's sshd may read keys from elsewhere (AuthorizedKeysFile) or forbid "
                    "key logins; check its sshd_config, or pass restricted=False")


def _record(state: Path, login: Login, purpose: dict[str, Any], granted: Grant, sha: str) -> None:
    """What :func:`revoke` and a re-run need later: where the key logs in, for what."""
    _proc.write_private(state / "keys" / f"{purpose['name']}.json", json.dumps({
        "id": granted.key_id, "user": login.dest.user, "host": login.dest.host, "port": login.port,
        "known_hosts": str(login.known_hosts), "pinned": login.pinned, "ssh": login.ssh,
        "purpose": purpose, "sha": sha, "granted_port": granted.port, "dest": granted.dest,
        "expires": granted.expires}))


def direct_command(python: str, agent: str, purpose: dict[str, Any], kid: str) -> list[str]:
    """How the account's own login runs a mirror's agent (``restricted=False``): the destination
    as the user gave it (the agent checks and makes it as the set-up does); ``-S``: the agent
    needs no site-packages, and it starts sooner without them."""
    return [python, "-I", "-B", "-S", agent, *mirror_args(purpose, kid)]


def mirror_args(purpose: dict[str, Any], kid: str) -> list[str]:
    """The agent's words for a mirror run by the account's own login (see ``direct_mirror``)."""
    return ["mirror", "--dest", purpose["dest"], "--keep-days", repr(float(purpose["keep_days"])),
            "--trash-share", repr(float(purpose.get("trash_share", _agent.TRASH_SHARE))),
            "--trash-max-gb", repr(float(purpose.get("trash_max_gb", _agent.TRASH_MAX_GB))),
            "--id", kid, *([] if purpose.get("backup", True) else ["--no-backup"])]


def _agent_record(state: Path, login: Login) -> Path:
    target = f"{login.dest.user}@{login.dest.host}:{login.port}"
    return state / "agents" / f"{hashlib.sha256(target.encode()).hexdigest()[:16]}.json"


def _record_agent(state: Path, login: Login, reply: dict[str, Any]) -> None:
    """Which agent a set-up through the account's own login installed (see :func:`installed_agent`)."""
    path = _agent_record(state, login)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    _proc.write_private(path, json.dumps({"target": login.dest.target, "port": login.port,
                                          "sha": reply["sha"], "python": reply["python"],
                                          "agent": reply["agent"]}))


def installed_agent(state: Path, login: Login, purpose: dict[str, Any]) -> tuple[list[str], bool]:
    """How to run a mirror's agent through the account's own login without a set-up (a start then
    needs one command on the server, not two), and whether a set-up through this login installed
    this version's agent earlier (on record). Without that record (a new runtime), where a set-up
    installs this version (``python3``, ``~/.colab-remote/agent-<sha12>.pyz``): another runtime's
    set-up may have. When the command does not start the agent, :func:`forget_agent` and set up."""
    sha = agent_source()[1]
    kid = key_id(state, purpose)
    try:
        info = json.loads(_agent_record(state, login).read_text())
    except (OSError, ValueError):
        info = {}
    if info.get("sha") == sha and all(isinstance(info.get(k), str) and info[k]
                                      for k in ("python", "agent")):
        return direct_command(info["python"], info["agent"], purpose, kid), True
    return direct_command("python3", f"{_agent.HOME_DIR}/agent-{sha[:12]}.pyz", purpose, kid), False


def forget_agent(state: Path, login: Login) -> None:
    with contextlib.suppress(FileNotFoundError):
        _agent_record(state, login).unlink()


REUSE_MARGIN = 3600.0  # a key that expires sooner than this is replaced (when a password is given)


def _reuse(state: Path, login: Login, purpose: dict[str, Any], kid: str, *,
           check: bool = True) -> Grant | None:
    """The key a cell run earlier in this runtime installed for the same purpose, when the server
    still takes it and runs this version's agent (``check``: a login says so; else the record):
    a re-run needs no password."""
    name = purpose["name"]
    key = state / "keys" / name
    try:
        info = json.loads((state / "keys" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    same = (info.get("purpose") == purpose and info.get("id") == kid and key.is_file()
            and info.get("sha") == agent_source()[1] and info.get("host") == login.dest.host
            and info.get("port") == login.port and info.get("user") == login.dest.user)
    if not same or (info.get("expires") or 0) < time.time() + REUSE_MARGIN:
        return None
    if check:
        done = _proc.run(login.argv("hello", key=str(key)), timeout=15, check=False)
        if not done.stdout.startswith(f"colab-remote-agent {_agent.VERSION} {info['sha']}"):
            return None
    return Grant(key=key, key_id=kid, port=info.get("granted_port"), dest=info.get("dest"),
                 expires=info.get("expires"), trusted=not check)


def known_lines(login: Login) -> set[str]:
    """The lines of the login's known_hosts (before a first contact: see announce_new_host_key)."""
    try:
        return set(login.known_hosts.read_text().splitlines())
    except OSError:
        return set()


def announce_new_host_key(login: Login, before: set[str], quiet: bool) -> None:
    """First contact: show the key that was recorded and how to pin it next time."""
    new = [line for line in known_lines(login) - before if line.strip() and not line.startswith("#")]
    for line in new:
        words = line.split()
        with contextlib.suppress(ValueError, IndexError):
            fp = _ssh.fingerprint(" ".join(words[1:3]))
            text = (f"first contact with {login.dest.host}: its host key is {fp} ({words[1]}). "
                    f"Check it on the server (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub); "
                    f"pin it from now on with host_key='{fp}'")
            log.warning("%s", text)
            if not quiet:
                print(text, flush=True)


def revoke_all_here() -> list[str]:
    """On the server: remove every colab-remote key line (``colab-remote revoke --all``)."""
    return _agent.revoke(None)


def recorded_keys(state: Path) -> list[dict[str, Any]]:
    """The keys this runtime installed (from ``state/keys/*.json``)."""
    found = []
    for path in sorted((state / "keys").glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            info = dict(json.loads(path.read_text()))
            info["key"] = str(path.with_suffix(""))
            found.append(info)
    return found


def revoke_recorded(state: Path, timeout: float = 30) -> list[tuple[str, str]]:
    """Ask the server, with each of this runtime's keys, to remove this runtime's lines.

    Returns ``(key id, outcome)`` for each key.
    """
    outcomes: list[tuple[str, str]] = []
    gone: set[str] = set()
    for info in recorded_keys(state):
        if info["id"] not in gone:
            login = Login(ssh=info["ssh"], dest=_ssh.Destination(info["user"], info["host"]),
                          port=int(info["port"]), known_hosts=Path(info["known_hosts"]),
                          pinned=bool(info["pinned"]))
            done = _proc.run(login.argv("revoke", key=info["key"]), timeout=timeout, check=False)
            said = done.stdout.strip()
            if not said.startswith("colab-remote-revoked"):
                why = done.stderr.strip() or said or f"ssh exit {done.returncode}"
                outcomes.append((info["id"], "failed: " + why[-300:]))
                continue
            gone.update(said.split()[1:])  # every line of this runtime on that server
        outcomes.append((info["id"], "revoked"))
        for suffix in ("", ".pub", ".json"):
            with contextlib.suppress(FileNotFoundError):
                Path(info["key"] + suffix).unlink()
    return outcomes


def known_hosts_file(state: Path, run_dir: Path, dest: _ssh.Destination, port: int,
                     host_key: str | None, error: type[ColabRemoteError]) -> tuple[Path, bool]:
    """The known_hosts a tunnel or a mirror checks the server against, and whether it is pinned:
    the state folder's (``accept-new``: the first contact records the key) or, with ``host_key``, a
    file of its own holding only that key (``StrictHostKeyChecking=yes``)."""
    if host_key is None:
        return state / "known_hosts", False
    path = run_dir / "known_hosts.pinned"
    _proc.write_private(path, pinned_known_hosts(dest.host, port, host_key, error) + "\n")
    return path, True


def pinned_known_hosts(host: str, port: int, host_key: str, error: type[ColabRemoteError]) -> str:
    """known_hosts text pinning ``host_key`` (a key line, or a fingerprint checked against keyscan)."""
    if not host_key.startswith("SHA256:"):
        return _ssh.known_hosts_line(host, port, host_key)
    keyscan = _install.require_program("ssh-keyscan", package="openssh-client", install=True,
                                    error=error)
    done = _proc.run([keyscan, "-p", str(port), "-T", "5", host], timeout=15, check=False,
                     error=error)
    offered = {}
    for line in done.stdout.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        with contextlib.suppress(ValueError):
            offered[_ssh.fingerprint(line)] = line
    if host_key in offered:
        return _ssh.known_hosts_line(host, port, offered[host_key])
    if not offered:
        raise error(f"could not read the host key of {host} port {port}",
                          log_tail=done.stderr, fix="check the host name, port and that sshd runs")
    raise error(f"the host key of {host} does not match host_key={host_key}",
                      log_tail="the server offers:\n" + "\n".join(offered),
                      fix="check the fingerprint on the server (ssh-keygen -lf "
                          "/etc/ssh/ssh_host_ed25519_key.pub); never connect to a server whose "
                          "key you cannot confirm")
