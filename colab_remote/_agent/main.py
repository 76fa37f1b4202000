"""The agent's entry point: what a restricted key's forced command runs, and the set-up."""

import json
import os
import sys
from typing import List

from .home import home, ok_id, own_archive, own_sha, runtime_of
from .protocol import HOME_DIR, TRASH_MAX_GB, TRASH_SHARE, VERSION, refuse

# Each request imports only what it runs (the sync's peer and the set-up are not on the mirror's
# path): a zip as sent is compiled on every start, and every import costs a start from source.


def main(argv: List[str]) -> int:
    """``--forced mirror ID`` / ``--forced sync ID`` / ``--forced tunnel ID PORT`` (what restricted
    keys run: the request is in SSH_ORIGINAL_COMMAND); ``mirror --root PATH --keep-days N [...]`` (see
    :func:`direct_mirror`), ``setup`` (request on stdin) and ``revoke [--all | RUNTIME]`` (run
    directly by the account)."""
    if argv[:1] == ["--forced"]:
        words = (os.environ.get("SSH_ORIGINAL_COMMAND") or "").split()
        args = argv[1:]
        if args[:1] == ["tunnel"] and len(args) == 3 and args[2].isdigit():
            from .tunnel import run_tunnel

            return run_tunnel(ok_id(args[1]), int(args[2]), words)
        if args[:1] == ["mirror"] and len(args) == 2:
            kid = ok_id(args[1])
            if words == ["hello"]:
                print("colab-remote-agent %s %s mirror" % (VERSION, own_sha()))
                return 0
            if words == ["revoke"]:
                return _revoke(runtime=runtime_of(kid))
            if words not in (["colab-remote", "agent"], ["colab-remote", "lane"]):
                return refuse("this key only runs the colab-remote mirror agent")
            from .serve import mirror_config, run_mirror

            cfg = mirror_config(kid)
            if words[1] == "lane":
                from .lane import run_lane

                return run_lane(cfg["root"].encode(), key_id=kid,
                                share=cfg.get("trash_share", TRASH_SHARE),
                                max_gb=cfg.get("trash_max_gb", TRASH_MAX_GB))
            return run_mirror(cfg["root"].encode(), keep_days=float(cfg["keep_days"]),
                              backup=bool(cfg.get("backup", True)),
                              share=cfg.get("trash_share", TRASH_SHARE),
                              max_gb=cfg.get("trash_max_gb", TRASH_MAX_GB), key_id=kid)
        if args[:1] == ["sync"] and len(args) == 2:
            return _forced_sync(ok_id(args[1]), words)
        return refuse("unknown request")
    if argv[:1] == ["setup"]:
        return _setup(argv[2:] if argv[1:2] == ["--then"] else [])
    if argv[:1] == ["mirror"]:
        from .serve import direct_mirror

        return direct_mirror(argv[1:])
    if argv in (["revoke"], ["revoke", "--all"]):
        return _revoke()
    if argv[:2] == ["revoke", "--runtime"] and len(argv) == 3:
        return _revoke(runtime=ok_id(argv[2]))
    if argv[:2] == ["revoke", "--id"] and len(argv) == 3:
        return _revoke(key_id=ok_id(argv[2]))
    return refuse("unknown request")


def _setup(then: List[str]) -> int:
    """The set-up: the request on stdin (to its end; one line with ``then``), the reply on stdout.
    ``then``: ``mirror ARGS`` (see :func:`direct_mirror`), run next in the same session by the agent
    just installed, so that a runtime's first start runs one command on the server, not two (the
    client sends nothing more before this reply, so nothing it sends is left in this process)."""
    from .setup import setup

    try:
        if then[:1] not in ([], ["mirror"]):
            raise ValueError("a set-up runs only the mirror's agent next")
        reply = setup(json.loads((sys.stdin.buffer.readline() if then else
                                  sys.stdin.buffer.read()).decode()))
    except Exception as e:  # noqa: BLE001 - the client shows it
        reply = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
    sys.stdout.write("CRA-SETUP %s\n" % json.dumps(reply))
    sys.stdout.flush()
    if then and reply["ok"]:
        if own_archive() != reply["agent"]:  # the set-up's temporary copy (exec runs no atexit)
            os.unlink(own_archive())
        os.execv(reply["python"], [reply["python"], "-I", "-B", "-S", reply["agent"], *then])
    return 0


def _revoke(**which: str) -> int:
    from .setup import print_revoked, revoke

    return print_revoked(revoke(**which))


def _forced_sync(kid: str, words: List[str]) -> int:
    """A runtime's key for a two-way sync started there: the sync's peer, in the folder (and
    with the trash and the protected paths) the set-up recorded for that key, and nothing else."""
    if words == ["hello"]:
        print("colab-remote-agent %s %s sync" % (VERSION, own_sha()))
        return 0
    if words == ["revoke"]:
        return _revoke(runtime=runtime_of(kid))
    if words != ["colab-remote", "peer"]:
        return refuse("this key only runs the colab-remote sync peer")
    with open(os.path.join(home(), HOME_DIR, "syncs", kid + ".json")) as f:
        fixed = dict(json.load(f))
    from . import peer

    return peer.main(fixed)
