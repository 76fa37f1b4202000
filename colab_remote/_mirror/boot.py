"""The detached mirror process's first lines: ``python -S .../colab_remote/_mirror/boot.py --run-dir DIR``.

Run by path, not as ``-m colab_remote._mirror``: importing the package and the mirror takes about
0.1 s of Python, and the login to the server (ssh's handshake, about as long) runs meanwhile. The
login's argv is in the config (``early_login``, written by :func:`colab_remote.mirror` for a key
login: a password is typed at ssh's prompt by the mirror itself); ssh is started here exactly as
:func:`colab_remote._proc.spawn_pty` starts it, and :class:`colab_remote._master.Master` takes it
over. ``-S``: the site-packages (their ``.pth`` files: an editable install's finder, namespace
packages) are set up after ssh has started, not before (``site.main()``, as Python does at start
without ``-S``; about 25 ms here); pexpect is found meanwhile where the config says
(``early_path``). Anything unexpected here just leaves the login to the mirror, as without this file.
"""

import os
import sys

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # run by path: this folder's modules must not shadow others of the same name

import contextlib  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402


def early_login(run_dir: str) -> object:
    """ssh for the mirror's first login, started now (a ``pexpect.spawn``), or None."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            cfg = json.load(f)
        argv = cfg.get("early_login") or []
        if not argv or cfg.get("has_secret"):
            return None
        sys.path += [p for p in cfg.get("early_path") or [] if p not in sys.path]
        import pexpect

        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as the mirror process does (ssh inherits it)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(cfg["sock_dir"], "cm"))  # as Master.start does
        child = pexpect.spawn(argv[0], list(argv[1:]), env=dict(os.environ, LC_ALL="C"),
                              echo=False, encoding="utf-8", codec_errors="replace", timeout=None)
        for obj in (child, child.ptyproc):
            obj.delayafterclose = 0
            obj.delayafterterminate = 0
        return child
    except Exception:  # noqa: BLE001 - the mirror logs in itself, and says why when it cannot
        return None


def main() -> int:
    args = sys.argv[1:]
    early = early_login(args[args.index("--run-dir") + 1]) if "--run-dir" in args[:-1] else None
    if sys.flags.no_site:
        import site

        site.main()
    from colab_remote._mirror.main import main as run

    return run(args, early=early)


if __name__ == "__main__":
    sys.exit(main())
