"""``colab-remote`` / ``python -m colab_remote``: the same functions from a shell.

Passwords are never options (argv is visible to every user in ``ps``): ``--password-stdin``
reads one line from standard input, and a prompt asks when a terminal is attached.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .errors import ColabRemoteError

Command = Callable[[argparse.Namespace], int]


def positive_int(text: str) -> int:
    """argparse type: a whole number above 0 (``logs -n -5`` is refused, not read as "all")."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a whole number above 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return value


def read_password(args: argparse.Namespace, prompt: str = "password: ") -> str | None:
    """The password from stdin (``--password-stdin``) or None."""
    if getattr(args, "password_stdin", False):
        if sys.stdin.isatty():
            return getpass.getpass(prompt)
        return sys.stdin.readline().rstrip("\n")
    return None


def add_login_options(p: argparse.ArgumentParser) -> None:
    """--port, --password-stdin, --identity-file, --host-key: how to log in to the other side."""
    p.add_argument("--port", type=int, default=22, help="the other side's SSH port (default 22)")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password (or key passphrase) from stdin")
    p.add_argument("--identity-file", metavar="KEY", help="private key to log in with")
    p.add_argument("--host-key", metavar="KEY", help="pin the other side's key: SHA256:... or a key line")


def add_access_options(p: argparse.ArgumentParser) -> None:
    """--unrestricted, --key-days: what the runtime may do on the server afterwards."""
    p.add_argument("--unrestricted", dest="restricted", action="store_false",
                   help="keep using the password (or --identity-file) instead of installing a "
                        "restricted key: the runtime can then log in to the server as you")
    p.add_argument("--key-days", type=float, default=3.0, metavar="DAYS",
                   help="lifetime of the restricted key installed on the server (default 3)")


def _cmd_sshd(args: argparse.Namespace) -> int:
    from .server import load_sshd, refresh_environment, start_sshd

    if args.refresh_environment:
        refresh_environment(state_dir=args.state_dir)
        return 0
    if args.stop:
        sshd = load_sshd(args.state_dir)
        if sshd is not None:
            sshd.stop()
        print("sshd stopped" if sshd is not None else "no sshd recorded in the state folder")
        return 0
    start_sshd(args.port, user=args.user, password=read_password(args),
               authorized_keys=args.authorized_keys, state_dir=args.state_dir,
               install=args.install, host_keys=args.host_keys, gateway_ports=args.gateway_ports,
               listen_address=args.listen_address)
    return 0


def _add_sshd(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sshd", help="start (or restart) sshd in this runtime",
                       description="Start an OpenSSH server with its own config in the state folder.")
    p.add_argument("--port", type=int, default=22, help="port to listen on (default 22)")
    p.add_argument("--user", default="root", help="login user, created when missing (default root)")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from stdin instead of generating one")
    p.add_argument("--authorized-keys", metavar="FILE", help="file of public keys to allow")
    p.add_argument("--state-dir", help="config, host keys, logs (default ~/.colab_remote)")
    p.add_argument("--host-keys", metavar="DIR",
                   help="folder to load and save host keys, or colab-secret:NAME")
    p.add_argument("--listen-address",
                   help="one more address to listen on (always 127.0.0.1 and ::1)")
    p.add_argument("--gateway-ports", action="store_true", help="sshd GatewayPorts yes")
    p.add_argument("--no-install", dest="install", action="store_false",
                   help="fail instead of installing openssh-server")
    p.add_argument("--stop", action="store_true", help="stop the sshd of the state folder")
    p.add_argument("--refresh-environment", action="store_true",
                   help="new sessions of the running sshd get this shell's environment")
    p.set_defaults(func=_cmd_sshd)


def _cmd_tunnel(args: argparse.Namespace) -> int:
    from .reverse import find_tunnels, reverse_forward

    if args.stop:
        stopped = 0
        for tunnel in find_tunnels(args.state_dir):
            if args.remote_port is None or args.remote_port in (tunnel.remote_port,
                                                                tunnel.config.remote_port):
                stopped += int(tunnel.alive)
                tunnel.stop()
        print(f"stopped {stopped} tunnel{'' if stopped == 1 else 's'}")
        return 0
    if not args.destination:
        raise ValueError("give the server as user@host (or --stop)")
    reverse_forward(args.destination, remote_port=20022 if args.remote_port is None else args.remote_port,
                    local_port=args.local_port, port=args.port, password=read_password(args),
                    identity_file=args.identity_file, via=args.via, zone=args.zone,
                    project=args.project, state_dir=args.state_dir, host_key=args.host_key,
                    timeout=args.timeout, restricted=args.restricted, key_days=args.key_days)
    return 0


def _add_tunnel(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tunnel", help="keep a reverse tunnel to your server up",
                       description="Forward a port on your server back to this runtime's sshd and "
                                   "keep it up (a detached supervisor reconnects it).")
    p.add_argument("destination", nargs="?", help="the server, user@host (via gcloud: user@INSTANCE)")
    p.add_argument("--remote-port", type=int, default=None,
                   help="port on the server (default 20022; 0: the server picks one)")
    p.add_argument("--local-port", type=int, default=None,
                   help="the runtime's sshd port (default: that of `colab-remote sshd`, else 22)")
    add_login_options(p)
    add_access_options(p)
    p.add_argument("--via", choices=["ssh", "gcloud"], default="ssh",
                   help="plain ssh, or gcloud compute ssh to a Compute Engine VM")
    p.add_argument("--zone", help="the VM's zone (--via gcloud)")
    p.add_argument("--project", help="the VM's project (--via gcloud)")
    p.add_argument("--state-dir", help="status and logs (default ~/.colab_remote)")
    p.add_argument("--timeout", type=positive_float, default=30,
                   help="seconds to wait for the forward to come up (default 30)")
    p.add_argument("--stop", action="store_true",
                   help="stop the tunnels of the state folder (only --remote-port's if given)")
    p.set_defaults(func=_cmd_tunnel)


def _cmd_gcloud_setup(args: argparse.Namespace) -> int:
    from ._gcloud import gcloud_setup

    done = gcloud_setup(project=args.project, zone=args.zone, region=args.region,
                        account=args.account,
                        disable_usage_reporting=not args.enable_usage_reporting)
    for prop, value in done.items():
        print(f"{prop} = {value}")
    return 0


def _add_gcloud_setup(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gcloud-setup", help="set gcloud's project, region, zone and account",
                       description="Run `gcloud config set` for the given values, project first "
                                   "(gcloud checks a zone against the project). Log in separately "
                                   "with `gcloud auth login`.")
    p.add_argument("--project", help="project ID")
    p.add_argument("--region", help="default region, e.g. us-central1")
    p.add_argument("--zone", help="default zone, e.g. us-central1-a")
    p.add_argument("--account", help="account e-mail address")
    p.add_argument("--enable-usage-reporting", action="store_true",
                   help="let gcloud report usage (off by default)")
    p.set_defaults(func=_cmd_gcloud_setup)


def _cmd_status(args: argparse.Namespace) -> int:
    from .status import status

    print(repr(status(args.state_dir)))
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    from ._daemon import state_path
    from .status import _stop_all

    stopped, removed = _stop_all(state_path(args.state_dir))
    for name in stopped:
        print(f"stopped {name}")
    for name in removed:
        print(f"removed the record of the {name}")
    count = len(stopped)
    print(f"stopped {count} running process{'' if count == 1 else 'es'}"
          + (f", removed {len(removed)} record{'' if len(removed) == 1 else 's'} of what had stopped "
             "or failed" if removed else ""))
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    from .status import status

    found = status(args.state_dir)
    for handle in found.handles():
        kind = type(handle).__name__.lower()
        if args.which in ("all", kind):
            print(f"== {handle!r}")
            print(handle.logs(args.lines))
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    from .status import revoke

    outcomes = revoke(args.state_dir, all=args.all)
    return 1 if any(o.startswith("failed") for _, o in outcomes) else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(check=args.check, timeout=args.timeout, base_dir=args.base_dir)


def _add_status_commands(sub: argparse._SubParsersAction) -> None:
    commands = (("status", _cmd_status, "show the sshd, tunnels and mirrors of the state folder"),
                ("stop", _cmd_stop, "stop every mirror, tunnel and sshd of the state folder"))
    for name, func, text in commands:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--state-dir", help="default ~/.colab_remote")
        p.set_defaults(func=func)
    p = sub.add_parser("revoke", help="remove this runtime's keys from the servers it set up",
                       description="Ask each server this runtime set up (with its own restricted "
                                   "keys) to remove this runtime's key lines. On the server: "
                                   "--all removes every colab-remote line of this account.")
    p.add_argument("--all", action="store_true",
                   help="run on the server: remove every colab-remote key line of this account")
    p.add_argument("--state-dir", help="default ~/.colab_remote")
    p.set_defaults(func=_cmd_revoke)
    p = sub.add_parser("logs", help="show the last lines of the logs", description="Show the last log lines.")
    p.add_argument("which", nargs="?", default="all", choices=["all", "sshd", "tunnel", "mirror", "sync"])
    p.add_argument("-n", "--lines", type=positive_int, default=20,
                   help="how many lines of each log (default 20)")
    p.add_argument("--state-dir", help="default ~/.colab_remote")
    p.set_defaults(func=_cmd_logs)
    p = sub.add_parser("demo", help="run the whole flow on this machine with throwaway accounts",
                       description="Start a runtime sshd, a stand-in server, the tunnel and a mirror on "
                                   "this machine, prove they work, then remove everything.")
    p.add_argument("--check", action="store_true", help="exit after the proof instead of waiting")
    p.add_argument("--timeout", type=float, help="stop after this many seconds")
    p.add_argument("--base-dir", help="where the demo's temporary folder goes (default /tmp)")
    p.set_defaults(func=_cmd_demo)


def _cmd_mirror(args: argparse.Namespace) -> int:
    from .mirror import _run_foreground

    return _run_foreground(args.local_dir, args.destination, port=args.port,
                          password=read_password(args, "server password: "),
                          identity_file=args.identity_file, state_dir=args.state_dir,
                          exclude=args.exclude, delete=not args.no_delete,
                          backup=not args.no_backup, restore=args.restore, host_key=args.host_key,
                          keep_days=args.keep_days, trash_share=args.trash_share,
                          trash_max_gb=args.trash_max_gb, restricted=args.restricted,
                          key_days=args.key_days)


def _cmd_push(args: argparse.Namespace) -> int:
    from .mirror import push

    return push(args.local_dir, args.destination, port=args.port,
                password=read_password(args, "runtime password: "),
                identity_file=args.identity_file, setup=args.setup, exclude=args.exclude,
                state_dir=args.state_dir, host_key=args.host_key, timeout=args.timeout)


def _add_mirror_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mirror", help="mirror a folder to your server (foreground, Ctrl-C stops)",
                       description="Watch LOCAL_DIR and push every change to user@host:path. "
                                   "Deleted and overwritten server files go to the server's "
                                   ".colab-remote-trash. mirror() in Python runs the same detached.")
    p.add_argument("local_dir", metavar="LOCAL_DIR")
    p.add_argument("destination", metavar="USER@HOST:PATH")
    p.add_argument("--restore", action="store_true",
                   help="first copy the server copy into LOCAL_DIR (a fresh runtime resumes)")
    p.add_argument("--no-delete", action="store_true", help="never delete on the server")
    p.add_argument("--no-backup", action="store_true", help="no trash on the server")
    p.add_argument("--keep-days", type=positive_float, default=7.0, metavar="DAYS",
                   help="the server prunes trash older than this (default 7)")
    p.add_argument("--trash-share", type=positive_float, default=0.25, metavar="SHARE",
                   help="the trash takes at most this share of the room on the server's disk "
                        "(0 to 1, default 0.25)")
    p.add_argument("--trash-max-gb", type=positive_float, default=10.0, metavar="GB",
                   help="and at most this many GB (default 10)")
    add_access_options(p)
    for q in (p, sub.add_parser(
            "push", help="copy a project into a runtime and set it up (run on the server)",
            description="Copy LOCAL_DIR into the runtime through the tunnel (nothing is deleted "
                        "there), then run --setup in the copied folder with its output shown.")):
        if q is not p:
            q.add_argument("local_dir", metavar="LOCAL_DIR")
            q.add_argument("destination", metavar="USER@HOST:PATH",
                           help="e.g. root@localhost:/content/project")
            q.add_argument("--setup", metavar="CMD", help="e.g. 'pip install -r requirements.txt'")
            q.add_argument("--timeout", type=positive_float, default=3600,
                           help="seconds for the copy and for the set-up command, each (default 3600)")
            q.set_defaults(func=_cmd_push)
        add_login_options(q)
        q.add_argument("--exclude", action="append", metavar="GLOB", help="also leave out (repeatable)")
        q.add_argument("--state-dir", help="status, logs, known_hosts (default ~/.colab_remote)")
    p.set_defaults(func=_cmd_mirror)


def _cmd_sync(args: argparse.Namespace) -> int:
    from .sync import _run_foreground, find_syncs, status_text

    if args.status:
        print(status_text(args.state_dir))
        return 0
    if args.stop or args.resume:
        found = [s for s in find_syncs(args.state_dir) if s.alive]
        if args.local_dir:
            local = os.path.realpath(os.path.expanduser(args.local_dir))
            found = [s for s in found if s.local_dir == local]
        if not found:
            print("no running sync" + (f" of {args.local_dir}" if args.local_dir else ""))
            return 1
        for s in found:
            if args.stop:
                s.stop()
                print(f"stopped the sync of {s.local_dir} <-> {s.remote}")
            else:
                print(f"{s.local_dir} <-> {s.remote}: {s.resume(args.resume)}")
        return 0
    if not args.local_dir or not args.remote:
        raise ValueError("give LOCAL_DIR and HOST:PATH (e.g. ./project colab:/content/project), "
                         "or --status, --stop, --resume")
    return _run_foreground(args.local_dir, args.remote, password=read_password(args, "runtime password: "),
                           port=args.port, identity_file=args.identity_file, ssh_config=args.ssh_config,
                           state_dir=args.state_dir, exclude=args.exclude, gitignore=args.gitignore,
                           protect=args.protect, mass_delete=args.mass_delete, yes=args.yes,
                           keep_days=args.keep_days, trash_gb=args.trash_gb, notify=args.notify)


def _add_sync(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sync", help="keep a laptop folder and a runtime folder the same, both ways",
                       description="Run on the laptop: keep LOCAL_DIR and HOST:PATH (the alias that "
                                   "tunnel.ssh_config() printed) the same both ways until Ctrl-C. The "
                                   "first comparison says what it does; conflicts keep both versions; "
                                   "a mass delete pauses and asks. sync() in Python runs it detached.")
    p.add_argument("local_dir", metavar="LOCAL_DIR", nargs="?")
    p.add_argument("remote", metavar="HOST:PATH", nargs="?", help="e.g. colab:/content/project")
    p.add_argument("--status", action="store_true", help="the syncs of the state folder, their conflicts "
                   "and questions")
    p.add_argument("--stop", action="store_true", help="stop the running syncs (of LOCAL_DIR if given)")
    p.add_argument("--resume", choices=["yes", "delete", "restore"],
                   help="answer a paused sync (of LOCAL_DIR if given)")
    p.add_argument("--port", type=int, default=None, help="the runtime's SSH port (default: ~/.ssh/config's)")
    p.add_argument("--password-stdin", action="store_true", help="read the runtime's password from stdin")
    p.add_argument("--identity-file", metavar="KEY", help="private key to log in with")
    p.add_argument("--ssh-config", metavar="FILE", help="another ssh config file (ssh -F)")
    p.add_argument("--exclude", action="append", metavar="GLOB",
                   help="also leave out (gitignore syntax, repeatable)")
    p.add_argument("--no-gitignore", dest="gitignore", action="store_false",
                   help="sync what .gitignore names too")
    p.add_argument("--protect", action="append", metavar="GLOB",
                   help="never take the runtime's version of these (repeatable; git's config and hooks "
                        "always)")
    p.add_argument("--mass-delete", type=float, default=0.5, metavar="SHARE",
                   help="deleting this share of the tree within seconds pauses the sync (default 0.5)")
    p.add_argument("--yes", action="store_true", help="do not ask when the first comparison finds conflicts")
    p.add_argument("--keep-days", type=float, default=7, help="days the trash keeps a file (default 7)")
    p.add_argument("--trash-gb", type=float, default=2.0, help="each side's trash at most (default 2 GB)")
    p.add_argument("--no-notify", dest="notify", action="store_false", help="no desktop notifications")
    p.add_argument("--state-dir", help="status, logs, the last common state (default ~/.colab_remote)")
    p.set_defaults(func=_cmd_sync)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_sshd, _add_tunnel, _add_mirror_commands, _add_sync, _add_gcloud_setup, _add_status_commands]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="colab-remote",
        description="SSH into a notebook runtime, keep a reverse tunnel up, mirror a project.",
    )
    parser.add_argument("--version", action="version", version=f"colab-remote {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    for command in sub.choices.values():
        command.set_defaults(usage_of=command)  # a caller mistake shows this command's usage
    return parser


def _say(error: BaseException) -> None:
    """Every failure in one voice: ``colab-remote: ErrorName: message`` (our errors add the log
    tail and the fix)."""
    print(f"colab-remote: {type(error).__name__}: {error}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except (ValueError, TypeError) as e:
        args.usage_of.print_usage(sys.stderr)
        _say(e)
        return 2
    except ColabRemoteError as e:
        _say(e)
        return 1
    except OSError as e:  # a file or folder the command needs (permissions, a full disk)
        _say(e)
        return 1
    except KeyboardInterrupt:
        return 130
