"""Progress bars: tqdm (a widget in notebooks, a line on stderr elsewhere) for one sync at a time.

Drawn by the process the user called: :func:`colab_remote.mirror` from the mirror process's status
file, :func:`colab_remote.push` from rsync's own output, ``colab-remote mirror`` in its own process.
"""

from __future__ import annotations

import time
from typing import Any

# A bar appears only for a sync still running this long (none flashes for an up-to-date tree).
PROGRESS_AFTER = 0.5


class Bar:
    """A tqdm bar (a widget in notebooks, text on stderr elsewhere) for one rsync at a time.

    Drawn by the process the user called; the numbers come from rsync's ``--info=progress2``
    (directly for push(), through the mirror process's status file for mirror()).
    """

    def __init__(self, *, quiet: bool = False) -> None:
        self.quiet = quiet
        self.phase: str | None = None
        self.since = 0.0
        self.bar: Any = None
        self.fraction = 0.0
        self.text = ""

    def show(self, phase: str, fraction: float | None = None, text: str = "") -> None:
        """Progress of the sync ``phase``; a new phase completes the one before."""
        if phase != self.phase:
            self.close(done=True)
            self.phase, self.since, self.fraction, self.text = phase, time.monotonic(), 0.0, ""
        if self.quiet:
            return
        if fraction is not None:
            self.fraction = max(self.fraction, min(fraction, 1.0))
        self.text = text or self.text
        if self.bar is None:
            if time.monotonic() - self.since < PROGRESS_AFTER:
                return
            try:
                from tqdm.auto import tqdm
            except ImportError:
                self.quiet = True
                return
            # miniters=0: redraw on any change (at most every mininterval), not after "enough" of it
            self.bar = tqdm(total=100, desc=phase, leave=True, miniters=0,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}{postfix}]")
        self._draw(self.fraction * 100)

    def _draw(self, percent: float) -> None:
        if self.text:
            self.bar.set_postfix_str(self.text, refresh=False)
        if percent > self.bar.n:
            self.bar.update(percent - self.bar.n)  # tqdm limits how often it redraws

    def close(self, *, done: bool) -> None:
        """End the bar; ``done`` fills it (the sync finished; its last record may not have come)."""
        if self.bar is not None:
            if done:
                self._draw(100.0)
            self.bar.close()
        self.bar, self.phase = None, None
