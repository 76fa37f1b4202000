"""The big-file lane's pacing and the compression policy, as values (pure: no server)."""

from __future__ import annotations

import io
import os

from colab_remote import _agent
from colab_remote._mirror import lane
from colab_remote._mirror.squeeze import Squeeze


def test_the_lane_keeps_the_links_queue_short() -> None:
    """LEDBAT: the window grows while answers come back at the base round trip, and shrinks (to
    no less than two chunks) while they come back a queue later."""
    pacer = lane.Pacer()
    now = 0.0
    for _ in range(200):  # 100 ms round trips, no queue
        now += 0.01
        pacer.answered(lane.CHUNK, 0.1, now)
    grown = pacer.window
    assert grown > lane.START_WINDOW * 4
    for _ in range(2000):  # 300 ms: 200 ms of queue, twice the target
        now += 0.01
        pacer.answered(lane.CHUNK, 0.3, now)
    assert pacer.window == lane.MIN_WINDOW < grown
    for _ in range(200):  # the queue drained: it grows again
        now += 0.01
        pacer.answered(lane.CHUNK, 0.12, now)
    assert pacer.window > lane.MIN_WINDOW
    assert pacer.rate() is not None and pacer.rate() > 0


def unpacked(data: bytes) -> list[tuple[bytes, bytes, int, int, int, bytes]]:
    return list(_agent.records(io.BytesIO(data).read))


def test_records_go_compressed_where_it_pays() -> None:
    text = b"".join(b"def f%d(x):\n    return x + %d\n" % (i, i) for i in range(4000))
    noise = os.urandom(len(text))
    records = _agent.pack(_agent.OP_PUT, b"a.py", data=text) + _agent.pack(_agent.OP_PUT, b"b", data=b"x")
    here = Squeeze()
    here.note_rtt(0.0003)  # loopback: never (a small edit must not wait for zlib)
    assert here.pack(records) == records
    far = Squeeze()
    far.note_rtt(0.05)  # a WAN, its rate not known yet: -1
    packed = far.pack(records)
    assert packed[:1] == _agent.OP_ZIP and len(packed) < len(records) / 3
    assert [r[:2] for r in unpacked(packed)] == [(_agent.OP_PUT, b"a.py"), (_agent.OP_PUT, b"b")]
    assert unpacked(packed)[0][5] == text
    chunk = _agent.pack(_agent.OP_CHUNK, b"big", data=noise)
    assert far.pack(chunk) == chunk  # random data: a sample says it does not pay
    far.note_rate(2.5e6)
    assert far.level() == 6
    fast = Squeeze()
    fast.note_rtt(0.05)
    fast.note_rate(500e6)  # faster than zlib: sent as it is
    assert fast.level() == 0 and fast.pack(records) == records
    assert far.report()["wire_bytes"] < far.report()["raw_bytes"]


def test_a_record_that_does_not_unpack_ends_the_stream() -> None:
    bomb = _agent.pack(_agent.OP_ZIP, data=b"not zlib")
    ok = _agent.pack(_agent.OP_MKDIR, b"d")
    assert unpacked(ok + bomb + ok) == [(_agent.OP_MKDIR, b"d", 0, 0, 0, b"")]
