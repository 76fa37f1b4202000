"""The two-way sync between a laptop folder and a runtime folder (:func:`colab_remote.sync`).

The laptop coordinates: it holds the last common state, watches its folder, decides per path and
applies the runtime's changes through a confined writer; the runtime runs a small standard-library
peer shipped over ssh. One module per concept:

- ``rules``: what is skipped, what the runtime may never write on the laptop, git's write order
  (runs on both sides)
- ``fs``: looking, reading, big files in resumable parts, the trash's upkeep (both sides)
- ``peer``: the runtime's half and the wire protocol (both sides import its constants)
- ``base``: the last common state (sqlite) and the three-way decision per path
- ``link``: the laptop's ssh ControlMaster to the runtime's alias, the peer started through it
- ``local``: the laptop's folder: scan, read, apply through ``_agent.Tree``
- ``engine``: events in, decisions, the actions on either side, conflicts, mass deletes
- ``lane``: big files' own channel (a second peer) and the thread that feeds it
- ``worker``: the detached process (config, status, control socket, waiting for the runtime)
"""
