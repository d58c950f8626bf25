"""A link fault shim: drops, duplicates, delays and reorders frames, and closes pipes.

Theory of operation
-------------------
``vtick chaos --faults link`` disturbs the wire under the real link layer
(``proto/link.py``) to prove that the sequence/ack layer absorbs it: nothing sequenced
may be lost or doubled without a ``LinkError`` that says so (``docs/design.md``
invariant 6).  The link layer itself is not touched; :class:`FaultShim` wraps a
:class:`~vtick.proto.transport.PairEndpoint` at the transport edge and offers the same
surface (``send``, ``recv``, ``run_sender``, ``pipe_events``, ``sock``, ``close``), so
a vCPU process that has no link faults in its plan uses the bare endpoint and nothing
changes.

Faults come in windows (:class:`LinkWindow`), times in ns relative to an epoch the
process sets when its workload starts (:meth:`FaultShim.start`); before that, and outside
every window, frames pass untouched.  Inside a window each frame in the window's
direction (``send``: this process to its peer, ``recv``: the other way) is subject to
the window's fault with probability ``per_mille / 1000``, drawn from a seeded
``random.Random`` (the schedule is reproducible, the interleaving is not):

* ``drop``: the frame is discarded;
* ``duplicate``: it is passed twice;
* ``delay``: it, and every frame after it in that direction while the window lasts, is
  held for ``delay_ns`` (first in, first out: the stream is late, not reordered);
* ``reorder``: it is held back for ``delay_ns`` (2 ms if none), so the frames after it
  overtake it;
* ``close``: the current pipe is closed (the dialer reconnects and the link resumes its
  session on the new pipe), at most once per window.

Handshake frames (``hello``, ``welcome``, ``refuse``) are never dropped, delayed or
reordered: the protocol does not retransmit a resume hello (docs/protocol.md, known
gaps), so losing one would be a hang this shim would cause rather than reveal.  Every
fault applied is reported through ``record(fault index, direction index, frame seq)``
(``vtick.proto.eventlog.LINK_FAULTS`` / ``LINK_DIRECTIONS``), so the history says what
the wire did.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import pynng
import trio

from vtick.proto import messages as m
from vtick.proto.codec import decode
from vtick.proto.errors import ProtocolError
from vtick.proto.eventlog import LINK_DIRECTIONS, LINK_FAULTS
from vtick.proto.transport import PairEndpoint, monotonic_ns

__all__ = ["FaultShim", "LinkWindow", "windows_from_plan"]

_HANDSHAKE = (m.Hello, m.Welcome, m.Refuse)
#: how long a reordered frame is held back when its window names no delay
REORDER_NS = 2_000_000


@dataclass(frozen=True, slots=True)
class LinkWindow:
    """One link fault window; ``start_ns``/``end_ns`` relative to the shim's epoch."""

    start_ns: int
    end_ns: int
    fault: str
    direction: str
    per_mille: int = 200
    delay_ns: int = 0

    def __post_init__(self) -> None:
        if self.fault not in LINK_FAULTS:
            raise ValueError(f"unknown link fault {self.fault!r}")
        if self.direction not in LINK_DIRECTIONS:
            raise ValueError(f"unknown direction {self.direction!r}")
        if not 0 <= self.per_mille <= 1000 or self.end_ns < self.start_ns:
            raise ValueError("per_mille in 0..1000 and end >= start")


def windows_from_plan(items: list[dict]) -> list[LinkWindow]:
    """The ``link`` part of a chaos plan (JSON objects) as windows."""
    return [
        LinkWindow(
            int(w["start_ns"]),
            int(w["end_ns"]),
            str(w["fault"]),
            str(w["direction"]),
            int(w.get("per_mille", 200)),
            int(w.get("delay_ns", 0)),
        )
        for w in items
    ]


class FaultShim:
    """A :class:`PairEndpoint` whose frames pass through scheduled link faults.

    Args:
        inner: the real endpoint.
        windows: the fault windows.
        seed: the draw of which frames are hit.
        record: told ``(fault index, direction index, frame seq or -1)`` per fault applied.
    """

    def __init__(
        self,
        inner: PairEndpoint,
        windows: list[LinkWindow],
        seed: int,
        record: Callable[[int, int, int], None] | None = None,
    ) -> None:
        self.inner = inner
        self.windows = sorted(windows, key=lambda w: w.start_ns)
        self.rng = random.Random(f"vtick-faultshim-{seed}")
        self.record = record
        self.epoch: int | None = None
        self.applied = {name: 0 for name in LINK_FAULTS}
        self._closed_windows: set[int] = set()
        self._delayed: list[tuple[int, int, str, bytes, pynng.Pipe | None]] = []
        self._delay_tail = {"send": 0, "recv": 0}
        self._order = 0
        self._delayed_ready = trio.Event()
        self._inbox_send, self._inbox = trio.open_memory_channel[tuple[bytes, pynng.Pipe]](math.inf)
        #: a frame wait_recv took from the inbox, handed out first
        self._peeked: tuple[bytes, pynng.Pipe] | None = None

    # ---- what the vCPU uses of a PairEndpoint

    @property
    def sock(self) -> pynng.Pair0:
        return self.inner.sock

    @property
    def pipe_events(self) -> trio.MemoryReceiveChannel:
        return self.inner.pipe_events

    @property
    def current_pipe(self) -> pynng.Pipe | None:
        return self.inner.current_pipe

    def close(self) -> None:
        self.inner.close()

    def redial(self, url: str) -> None:
        self.inner.redial(url)

    def pending(self) -> bool:
        return (
            self._peeked is not None
            or self._inbox.statistics().current_buffer_used > 0
            or self.inner.pending()
        )

    def start(self, epoch_ns: int) -> None:
        """Start the schedule: window times count from ``epoch_ns`` (host ns)."""
        self.epoch = epoch_ns

    # ---- the decision (pure but for the RNG)

    def _window(self, direction: str, now: int) -> tuple[int, LinkWindow] | None:
        if self.epoch is None:
            return None
        rel = now - self.epoch
        for i, w in enumerate(self.windows):
            if w.start_ns > rel:
                break
            if rel < w.end_ns and w.direction == direction:
                return i, w
        return None

    def _note(self, fault: str, direction: str, data: bytes | None) -> None:
        self.applied[fault] += 1
        if self.record is not None:
            seq = -1
            if data is not None:
                try:
                    seq = decode(data).seq
                except ProtocolError:
                    pass
            self.record(LINK_FAULTS.index(fault), LINK_DIRECTIONS.index(direction), seq)

    @staticmethod
    def _handshake(data: bytes) -> bool:
        try:
            return isinstance(decode(data).msg, _HANDSHAKE)
        except ProtocolError:
            return False

    def _hold(self, direction: str, data: bytes, pipe: pynng.Pipe | None, release: int) -> None:
        self._order += 1
        heapq.heappush(self._delayed, (release, self._order, direction, data, pipe))
        self._delayed_ready.set()

    def _route(self, direction: str, data: bytes, pipe: pynng.Pipe | None, now: int) -> list[bytes]:
        """The frames that pass now for one frame (none, it, or it twice); held frames
        go out later through :meth:`_release_delayed`."""
        found = self._window(direction, now)
        tail = self._delay_tail[direction]
        if found is None or found[1].fault != "delay":
            if tail > now:  # a delayed stream stays in order after its window ends
                self._hold(direction, data, pipe, tail)
                return []
            self._delay_tail[direction] = 0
        if found is None:
            return [data]
        index, w = found
        if w.fault == "close":
            if index not in self._closed_windows and self.inner.current_pipe is not None:
                self._closed_windows.add(index)
                self._note("close", direction, None)
                try:
                    self.inner.current_pipe.close()
                except pynng.NNGException:
                    pass
            return [data]
        if w.fault == "delay":
            if not tail and self.rng.randrange(1000) >= w.per_mille:
                return [data]
            if self._handshake(data):
                return [data]
            release = max(now + w.delay_ns, tail)
            self._delay_tail[direction] = release
            self._hold(direction, data, pipe, release)
            self._note("delay", direction, data)
            return []
        if self.rng.randrange(1000) >= w.per_mille or self._handshake(data):
            return [data]
        self._note(w.fault, direction, data)
        if w.fault == "drop":
            return []
        if w.fault == "duplicate":
            return [data, data]
        # reorder: this frame is held back briefly; the frames after it overtake it
        self._hold(direction, data, pipe, now + (w.delay_ns or REORDER_NS))
        return []

    # ---- sending

    def send(self, frames: list[bytes]) -> None:
        """Send ``frames`` through the shim (never waits, like PairEndpoint.send)."""
        now = monotonic_ns()
        for data in frames:
            passed = self._route("send", data, None, now)
            if passed:
                self.inner.send(passed)

    # ---- receiving

    async def recv(self) -> tuple[bytes, pynng.Pipe]:
        """The next frame that made it through the shim, and its pipe."""
        got = self.try_recv()
        if got is not None:
            await trio.lowlevel.checkpoint()
            return got
        return await self._inbox.receive()

    def try_recv(self) -> tuple[bytes, pynng.Pipe] | None:
        """The next frame if one made it through already, else None (never waits)."""
        if self._peeked is not None:
            got, self._peeked = self._peeked, None
            return got
        try:
            return self._inbox.receive_nowait()
        except trio.WouldBlock:
            return None

    def try_recv_bytes(self) -> bytes | None:
        got = self.try_recv()
        return None if got is None else got[0]

    async def wait_recv(self) -> None:
        """Wait until :meth:`try_recv` has a frame (a memory channel cannot be peeked:
        the frame is taken and kept for it; a cancelled wait loses nothing)."""
        if self._peeked is None:
            self._peeked = await self._inbox.receive()

    async def _pump(self) -> None:
        while True:
            try:
                data, pipe = await self.inner.recv()
            except pynng.Closed:
                return
            for passed in self._route("recv", data, pipe, monotonic_ns()):
                self._inbox_send.send_nowait((passed, pipe))

    async def _release_delayed(self) -> None:
        while True:
            await self._delayed_ready.wait()
            self._delayed_ready = trio.Event()
            while self._delayed:
                release = self._delayed[0][0]
                wait = (release - monotonic_ns()) / 1e9
                if wait > 0:
                    with trio.move_on_after(wait):
                        await self._delayed_ready.wait()  # an earlier frame may arrive
                    self._delayed_ready = trio.Event()
                    continue
                _, _, direction, data, pipe = heapq.heappop(self._delayed)
                if direction == "send":
                    self.inner.send([data])
                else:
                    assert pipe is not None
                    self._inbox_send.send_nowait((data, pipe))

    async def run_sender(self) -> None:
        """The endpoint's sender plus the shim's receive pump and delay queue."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump)
            nursery.start_soon(self._release_delayed)
            await self.inner.run_sender()
            nursery.cancel_scope.cancel()
