"""The link fault shim: untouched when off, each fault does what it says, and the real
link layer absorbs all of them (every message delivered once, in order)."""

from __future__ import annotations

import heapq
import random

import pynng
import trio

from vtick.proto import messages as m
from vtick.proto.codec import decode, encode
from vtick.proto.faultshim import FaultShim, LinkWindow
from vtick.proto.link import Link
from vtick.proto.transport import monotonic_ns

MS = 1_000_000


class FakeEndpoint:
    """What the shim needs of a PairEndpoint, without nng."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.current_pipe = None
        self.sock = None
        self.pipe_events = None
        self._send, self._recv = trio.open_memory_channel[tuple[bytes, object]](100)

    def send(self, frames: list[bytes]) -> None:
        self.sent += frames

    async def recv(self) -> tuple[bytes, object]:
        try:
            return await self._recv.receive()
        except trio.EndOfChannel:
            raise pynng.Closed from None

    async def run_sender(self) -> None:
        await trio.sleep_forever()

    def close(self) -> None:
        pass


def frame(n: int) -> bytes:
    return encode(m.ExitHlt(), n, 0)


def shim(*windows: LinkWindow, seed: int = 1) -> tuple[FaultShim, FakeEndpoint, list]:
    inner = FakeEndpoint()
    applied: list[tuple[int, int, int]] = []
    s = FaultShim(inner, list(windows), seed, lambda *a: applied.append(a))  # type: ignore[arg-type]
    return s, inner, applied


def test_without_faults_or_before_the_start_frames_pass_untouched() -> None:
    s, inner, applied = shim(LinkWindow(0, 10**12, "drop", "send", 1000))
    s.send([frame(i) for i in range(1, 6)])  # not started: the handshake and boot are spared
    assert inner.sent == [frame(i) for i in range(1, 6)]
    assert applied == []


def test_drop_spares_the_handshake() -> None:
    s, inner, applied = shim(LinkWindow(0, 100 * MS, "drop", "send", 1000))
    s.start(0)
    hello = encode(m.Hello(version=1, features=0, vcpu=0, token=b"x" * 32, pid=1), 0, 0)
    assert s._route("send", frame(1), None, 5 * MS) == []
    assert s._route("send", hello, None, 6 * MS) == [hello]
    assert s._route("send", frame(2), None, 200 * MS) == [frame(2)]  # after the window
    assert applied == [(0, 0, 1)]  # drop, send, frame 1


def test_duplicate_sends_twice_and_only_in_its_direction() -> None:
    s, _, applied = shim(LinkWindow(0, 100 * MS, "duplicate", "recv", 1000))
    s.start(0)
    assert s._route("recv", frame(3), None, 1 * MS) == [frame(3), frame(3)]
    assert s._route("send", frame(4), None, 1 * MS) == [frame(4)]
    assert applied == [(1, 1, 3)]


def test_delay_holds_the_stream_in_order_and_reorder_lets_others_overtake() -> None:
    s, _, _ = shim(LinkWindow(0, 3 * MS, "delay", "send", 1000, delay_ns=5 * MS))
    s.start(0)
    assert s._route("send", frame(1), None, 1 * MS) == []
    assert s._route("send", frame(2), None, 2 * MS) == []
    assert s._route("send", frame(3), None, 4 * MS) == []  # after the window: stays behind
    assert s._route("send", frame(4), None, 8 * MS) == [frame(4)]  # the stream caught up
    held = [heapq.heappop(s._delayed) for _ in range(3)]
    assert [decode(h[3]).seq for h in held] == [1, 2, 3]
    assert [h[0] for h in held] == [6 * MS, 7 * MS, 7 * MS]
    r, _, _ = shim(LinkWindow(0, 10 * MS, "reorder", "send", 1000, delay_ns=3 * MS))
    r.start(0)
    assert r._route("send", frame(1), None, 1 * MS) == []
    assert r._route("send", frame(2), None, 50 * MS) == [frame(2)]  # overtakes frame 1
    assert heapq.heappop(r._delayed)[3] == frame(1)


async def test_the_shim_tasks_release_held_frames_and_pump_received_ones() -> None:
    s, inner, _ = shim(LinkWindow(0, 10**12, "delay", "recv", 1000, delay_ns=20 * MS))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(s.run_sender)
        s.start(monotonic_ns())
        await inner._send.send((frame(1), "pipe"))
        await inner._send.send((frame(2), "pipe"))
        with trio.fail_after(5):
            got = [await s.recv(), await s.recv()]
        assert [decode(d).seq for d, _ in got] == [1, 2]
        nursery.cancel_scope.cancel()


def test_the_link_layer_absorbs_every_fault() -> None:
    """Two real Link ends exchanging 300 messages each way through shims that drop,
    duplicate, delay and reorder a third of the frames: each message is delivered exactly
    once, in order, by retransmission (invariant 6)."""
    rng = random.Random(5)
    windows = [
        LinkWindow(0, 40 * MS, "drop", "send", 300),
        LinkWindow(40 * MS, 80 * MS, "duplicate", "send", 300),
        LinkWindow(80 * MS, 120 * MS, "reorder", "send", 300, delay_ns=2 * MS),
        LinkWindow(120 * MS, 160 * MS, "delay", "send", 300, delay_ns=3 * MS),
        LinkWindow(0, 80 * MS, "drop", "recv", 300),
        LinkWindow(80 * MS, 160 * MS, "duplicate", "recv", 300),
    ]
    ends = [Link("a", rto_ns=5 * MS), Link("b", rto_ns=5 * MS)]
    shims = [shim(*windows, seed=s)[0] for s in (1, 2)]
    for x in shims:
        x.start(0)
    got: list[list[int]] = [[], []]
    flight: list[tuple[int, int, int, bytes]] = []  # (arrival, order, to, data)
    order = 0
    now = 0
    sent = [0, 0]
    while now < 400 * MS and (len(got[0]) < 300 or len(got[1]) < 300):
        now += 100_000
        for i in (0, 1):
            if sent[i] < 300 and now < 150 * MS and rng.random() < 0.5:
                sent[i] += 1
                ends[i].send(m.Inject(vector=sent[i] % 256, host_time=sent[i]), now)
            ends[i].poll(now)
            if ends[i].ack_owed(force=True):
                ends[i].send(m.Ack(), now)
            for data in ends[i].data_to_send():
                for out in shims[i]._route("send", data, None, now):
                    order += 1
                    heapq.heappush(flight, (now + 200_000, order, 1 - i, out))
            for x in shims[i]._delayed[:]:
                if x[0] <= now:
                    shims[i]._delayed.remove(x)
                    order += 1
                    heapq.heappush(flight, (now + 200_000, order, 1 - i, x[3]))
        while flight and flight[0][0] <= now:
            _, _, to, data = heapq.heappop(flight)
            for passed in shims[to]._route("recv", data, None, now):
                for msg in ends[to].receive(passed, now):
                    if isinstance(msg, m.Inject):
                        got[to].append(msg.host_time)
            for x in shims[to]._delayed[:]:
                if x[0] <= now:
                    shims[to]._delayed.remove(x)
                    for msg in ends[to].receive(x[3], now):
                        if isinstance(msg, m.Inject):
                            got[to].append(msg.host_time)
    assert got[0] == list(range(1, 301))
    assert got[1] == list(range(1, 301))
    assert sum(sum(s.applied.values()) for s in shims) > 50  # the faults really happened
    assert ends[0].stats.retransmitted > 0
    assert ends[1].stats.duplicates > 0
