"""The mirror process: watch a folder and push every change to the server.

Started detached by :func:`colab_remote.mirror` (``python .../_mirror/boot.py --run-dir DIR``:
:mod:`.boot` starts the login before the rest is imported; ``python -m colab_remote._mirror`` runs
the same without that) or in the foreground by ``colab-remote mirror``. One concept per module:

- :mod:`.config` -- what the process needs, written once by the caller (:class:`MirrorConfig`);
- :mod:`.link` -- the ssh ControlMaster to the server and the commands through it;
- :mod:`.channel` -- the two ways to the server behind one interface: the agent (records over the
  link; everything when the server has python3) and the plain shell with rsync (when it has not);
- :mod:`.watch` -- watchfiles' notify, the inotify doorbell, and reading bursts directly;
- :mod:`.plan` -- what a batch of changes means: the ops to send, read from the folder;
- :mod:`.restore` -- writing the server copy back into the runtime;
- :mod:`.report` -- the status file and the first sync's progress;
- :mod:`.control` -- the unix socket that answers ``stats``, ``flush`` and ``stop``;
- :mod:`.worker` -- the loop that ties them together.
"""
