"""Compression where it pays: records travel zlib-packed (``OP_ZIP``) on a slow link when they shrink.

What it costs and gains, measured on this project's 2-core VM (docs/measured.md): zlib -1 packs
source-like text about 3:1 at ~130 MB/s of one core and -6 about 3.5:1 at ~40 MB/s; random or
already compressed data does not shrink at all and still costs ~60 MB/s; unpacking is 300 MB/s
and more. So a record (a batch of small files, or a chunk of a big one) is packed only

- when a sample of it shrinks: three 2 KiB slices (start, middle, end) at -1, about 50 µs per
  256 KiB; random data pays that and nothing more;
- on a link slower than packing: the delivery rate measured from the agent's answers below
  60 MB/s (-1), below 8 MB/s -6 (P1's 6 MB/s and P2's 2.5 MB/s: packing 1 byte at -6 costs
  ~25 ns, sending it 160-400 ns); before a rate is known, -1 when the round trip is over 2 ms,
  nothing on this machine's loopback (a small edit must not wait for zlib there).

Why not ``ssh -C``: it packs everything at -6, random data too, and one ControlMaster carries both
lanes (it cannot be set per channel). Why not zstd: the agent is the standard library only
(Python >= 3.6).
"""

from __future__ import annotations

import zlib

from .. import _agent

SAMPLE = 2048
MIN_SIZE = 512
PAYS_BELOW = 60e6      # bytes/s: a link slower than this gets -1
STRONG_BELOW = 8e6     # ... and slower than this -6
WAN_RTT = 0.002        # a round trip longer than this is not loopback or a LAN


class Squeeze:
    """The mirror's compression policy (one per mirror process, shared by both lanes).

    ``note_rtt`` and ``note_rate`` feed it what the channels measure; ``pack(records)`` returns
    the bytes to send (one ``OP_ZIP`` record, or the records unchanged). ``raw`` and ``wire``
    count what went through it and what it sent.
    """

    def __init__(self) -> None:
        self.rtt: float | None = None
        self.rate: float | None = None
        self.raw = 0
        self.wire = 0

    def note_rtt(self, seconds: float) -> None:
        self.rtt = seconds if self.rtt is None else min(self.rtt, seconds)

    def note_rate(self, per_second: float) -> None:
        """A delivery rate seen on the link (bytes/s), smoothed."""
        self.rate = per_second if self.rate is None else 0.7 * self.rate + 0.3 * per_second

    def level(self) -> int:
        """zlib's level for the link as measured so far; 0: do not pack."""
        if self.rate is not None:
            return 6 if self.rate < STRONG_BELOW else 1 if self.rate < PAYS_BELOW else 0
        return 1 if self.rtt is not None and self.rtt > WAN_RTT else 0

    def pack(self, records: bytes) -> bytes:
        self.raw += len(records)
        level = self.level()
        if level and len(records) >= MIN_SIZE and shrinks(records):
            packed = zlib.compress(records, level)
            if len(packed) + _agent.HEADER.size < 0.9 * len(records):
                out = _agent.pack(_agent.OP_ZIP, data=packed)
                self.wire += len(out)
                return out
        self.wire += len(records)
        return records

    def report(self) -> dict[str, object]:
        return {"level": self.level(), "raw_bytes": self.raw, "wire_bytes": self.wire,
                "rate": None if self.rate is None else round(self.rate),
                "rtt": None if self.rtt is None else round(self.rtt, 4)}


def shrinks(data: bytes) -> bool:
    """A sample of ``data`` packs to less than 90 %."""
    if len(data) <= 3 * SAMPLE:
        sample = data
    else:
        mid = len(data) // 2
        sample = data[:SAMPLE] + data[mid:mid + SAMPLE] + data[-SAMPLE:]
    return len(zlib.compress(sample, 1)) < 0.9 * len(sample)
