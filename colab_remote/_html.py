"""Compact HTML cards for the handles in a notebook. Every value goes through ``html.escape``."""

from __future__ import annotations

import html
import json
from collections.abc import Iterable

_COLORS = {"up": "#1e8e3e", "running": "#1e8e3e", "watching": "#1e8e3e", "starting": "#f9ab00",
           "reconnecting": "#f9ab00", "pushing": "#f9ab00", "waiting": "#f9ab00"}


def _copy_button(text: str) -> str:
    # The text goes into a JS string literal inside an HTML attribute: JSON-encode, then escape.
    js = html.escape(f"navigator.clipboard.writeText({json.dumps(text)})", quote=True)
    return (f"<button onclick=\"{js}\" title='copy' "
            "style='font-size:11px;margin-left:6px;cursor:pointer'>copy</button>")


def card(title: str, state: str, rows: Iterable[tuple[str, str]],
         blocks: Iterable[tuple[str, str]] = ()) -> str:
    """A small table with a coloured state, ``rows`` of (label, value) and copyable code ``blocks``."""
    e = html.escape
    color = _COLORS.get(state, "#d93025")
    body = "".join(f"<tr><th style='text-align:left;padding-right:12px'>{e(k)}</th>"
                   f"<td><code>{e(v)}</code></td></tr>" for k, v in rows)
    pre = "<pre style='margin:2px 0;padding:4px;background:rgba(127,127,127,.1)'>"
    extra = "".join(f"<div style='margin-top:4px'><b>{e(label)}</b>{_copy_button(text)}"
                    f"{pre}{e(text)}</pre></div>" for label, text in blocks)
    return (f"<div class='colab-remote' style='border:1px solid rgba(127,127,127,.4);border-radius:6px;"
            f"padding:6px 10px;margin:4px 0;display:inline-block;min-width:28em'>"
            f"<b>{e(title)}</b> <span style='color:{color};font-weight:bold'>● {e(state)}</span>"
            f"<table style='margin-top:4px'>{body}</table>{extra}</div>")
