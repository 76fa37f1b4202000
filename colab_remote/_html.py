"""Compact HTML cards for the handles in a notebook. Every value goes through ``html.escape``."""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from typing import Any

from ._daemon import State

GREEN, AMBER, RED, GREY = "#1e8e3e", "#f9ab00", "#d93025", "#80868b"


def _copy_button(text: str) -> str:
    # The text goes into a JS string literal inside an HTML attribute: JSON-encode, then escape.
    js = html.escape(f"navigator.clipboard.writeText({json.dumps(text)})", quote=True)
    return (f"<button onclick=\"{js}\" title='copy' "
            "style='font-size:11px;margin-left:6px;cursor:pointer'>copy</button>")


def color(state: State) -> str:
    """Green when up, amber on its way (starting, reconnecting, ...), red when failed, grey when
    stopped: one colour per :class:`State` for every card."""
    if state is State.UP:
        return GREEN
    if state is State.FAILED:
        return RED
    return AMBER if state.busy else GREY


def card(title: str, state: State, rows: Iterable[tuple[str, str]],
         blocks: Iterable[tuple[str, str]] = ()) -> str:
    """A small table with a coloured state, ``rows`` of (label, value) and copyable code ``blocks``."""
    e = html.escape
    body = "".join(f"<tr><th style='text-align:left;padding-right:12px'>{e(k)}</th>"
                   f"<td><code>{e(v)}</code></td></tr>" for k, v in rows)
    pre = "<pre style='margin:2px 0;padding:4px;background:rgba(127,127,127,.1)'>"
    extra = "".join(f"<div style='margin-top:4px'><b>{e(label)}</b>{_copy_button(text)}"
                    f"{pre}{e(text)}</pre></div>" for label, text in blocks)
    return (f"<div class='colab-remote' style='border:1px solid rgba(127,127,127,.4);border-radius:6px;"
            f"padding:6px 10px;margin:4px 0;display:inline-block;min-width:28em'>"
            f"<b>{e(title)}</b> <span style='color:{color(state)};font-weight:bold'>● {e(state.value)}</span>"
            f"<table style='margin-top:4px'>{body}</table>{extra}</div>")


class Announcement:
    """What a call shows once: ``text`` in a terminal, ``html`` in a notebook."""

    def __init__(self, text: str, html: str) -> None:
        self.text, self.html = text, html

    def __repr__(self) -> str:
        return self.text

    def _repr_html_(self) -> str:
        return self.html


def announce(obj: Any) -> None:
    """Print ``obj`` in a terminal; display it (HTML and text) in a notebook."""
    from . import _proc

    shell = _proc.in_ipython()
    # A notebook kernel's shell (ipykernel's, or Colab's subclass of it) has a kernel attached.
    if shell is not None and getattr(shell, "kernel", None) is not None:
        from IPython.display import display

        display(obj)
    else:
        print(repr(obj), flush=True)
