"""``colab-remote`` / ``python -m colab_remote``: the same functions from a shell.

Passwords are never options (argv is visible to every user in ``ps``): ``--password-stdin``
reads one line from standard input, and a prompt asks when a terminal is attached.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .errors import ColabRemoteError

Command = Callable[[argparse.Namespace], int]


def read_password(args: argparse.Namespace, prompt: str = "password: ") -> str | None:
    """The password from stdin (``--password-stdin``) or None."""
    if getattr(args, "password_stdin", False):
        if sys.stdin.isatty():
            return getpass.getpass(prompt)
        return sys.stdin.readline().rstrip("\n")
    return None


def _cmd_sshd(args: argparse.Namespace) -> int:
    from .server import load_sshd, start_sshd

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
    p.add_argument("--host-keys", metavar="DIR", help="folder to load and save host keys")
    p.add_argument("--listen-address", help="address to listen on (default: all)")
    p.add_argument("--gateway-ports", action="store_true", help="sshd GatewayPorts yes")
    p.add_argument("--no-install", dest="install", action="store_false",
                   help="fail instead of installing openssh-server")
    p.add_argument("--stop", action="store_true", help="stop the sshd of the state folder")
    p.set_defaults(func=_cmd_sshd)


# Each later feature adds its sub-command builder here.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_sshd]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="colab-remote",
        description="SSH into a notebook runtime, keep a reverse tunnel up, mirror a project.",
    )
    parser.add_argument("--version", action="version", version=f"colab-remote {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    except ColabRemoteError as e:
        print(f"colab-remote: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
