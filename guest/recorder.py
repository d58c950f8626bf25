"""A bounded, compact record of the first exits and interrupts of a run (``--trace``),
and the unbounded one of a chaos run (:class:`HistoryRecorder`).

Recording must not distort what it measures: records go into preallocated-style
``array('q')`` buffers (four signed 64-bit integers each, no per-record objects), stop
when the window is full, and leave the vCPU only at the end, in one ``trace`` message.
``vtick bench recording`` compares a run with it on and off.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Callable

from vtick.proto.eventlog import (
    G_ARM,
    G_CANCEL,
    G_CLOCK,
    G_END,
    G_EXIT,
    G_FIRE,
    G_IRQ,
    G_LINK,
    G_SESSION,
    G_STALL,
    G_START,
    G_WINDOW,
    EventLog,
)
from vtick.proto.pvclock import PvclockInfo

__all__ = [
    "Recorder",
    "HistoryRecorder",
    "EXIT_RECORDS",
    "IRQ_RECORDS",
    "EVENT_RECORDS",
    "CALL_RECORDS",
]

#: the window: at most this many exits and interrupts (fits one trace message)
EXIT_RECORDS = 1280
IRQ_RECORDS = 1280
EVENT_RECORDS = 1280
CALL_RECORDS = 1280


class Recorder:
    def __init__(
        self,
        exits: int = EXIT_RECORDS,
        irqs: int = IRQ_RECORDS,
        events: int = EVENT_RECORDS,
        calls: int = CALL_RECORDS,
    ) -> None:
        self.max_exits = exits
        self.max_irqs = irqs
        self.max_events = events
        self.max_calls = calls
        self.exits = array("q")
        self.irqs = array("q")
        self.events = array("q")
        self.calls = array("q")
        self.dropped = 0

    def event(self, expires: int, programmed_at: int, irq_at: int, ran_at: int) -> None:
        """A timer callback: its expiry, when the device was programmed for it, when the
        interrupt arrived (0 when it ran without one), when it ran."""
        if len(self.events) >= 4 * self.max_events:
            self.dropped += 1
            return
        self.events.extend((expires, programmed_at, irq_at, ran_at))

    def call(self, queued: int, target: int, ran: int, returned: int) -> None:
        """One csd of an smp_call_function: queued, target, when the target ran it,
        when the sender's wait returned."""
        if len(self.calls) >= 4 * self.max_calls:
            self.dropped += 1
            return
        self.calls.extend((queued, target, ran, returned))

    def exit(self, sent: int, rtt: int, host_ns: int, kind: int) -> None:
        if len(self.exits) >= 4 * self.max_exits:
            self.dropped += 1
            return
        self.exits.extend((sent, rtt, host_ns, kind))

    def irq_arrived(self, at: int, vector: int, host_time: int) -> int:
        """Record an injection's arrival; returns its index (-1 when the window is full)."""
        if len(self.irqs) >= 4 * self.max_irqs:
            self.dropped += 1
            return -1
        self.irqs.extend((at, 0, vector, host_time))
        return len(self.irqs) // 4 - 1

    def irq_handled(self, index: int, at: int) -> None:
        if index >= 0:
            self.irqs[4 * index + 1] = at

    def pack(self) -> dict[str, bytes]:
        """Each kind of record as little-endian s64 bytes (one ``trace`` message each)."""
        out = {}
        for name in ("exits", "irqs", "events", "calls"):
            records = array("q", getattr(self, name))
            if sys.byteorder != "little":  # pragma: no cover - x86 and arm64 are little
                records.byteswap()
            out[name] = records.tobytes()
        return out


class HistoryRecorder:
    """The guest half of a chaos run's history: every event of the whole run, not a window.

    Where :class:`Recorder` keeps a bounded window in memory and ships it at the end,
    this writes each event at once into an event log file in the run directory
    (``vtick.proto.eventlog``): an mmap-ed file, so recording costs one ``pack_into``
    per event and a vCPU process killed with SIGKILL keeps every record it wrote.  Times
    are guest ktime, read through ``clock``; ids are this process's (arm ids from the
    hrtimer queue, IPI and csd ids from ``Smp``, exit and injection numbers from the
    link).  Record layouts: ``vtick.proto.eventlog``.
    """

    def __init__(
        self, target: str | int, header: dict[str, object], clock: Callable[[], int]
    ) -> None:
        self.log = EventLog(target, header)
        self.clock = clock
        self.irqs_handled = 0

    def session(
        self, session: int, tsc_khz: int, tsc_epoch: int, offset: int, vcpu: int, pid: int
    ) -> None:
        self.log.add(G_SESSION, 0, session, tsc_khz, tsc_epoch, offset, vcpu, pid)

    def clock_info(self, info: PvclockInfo) -> None:
        """The kvmclock parameters ktime is read through from now on."""
        self.log.add(
            G_CLOCK, 0, info.version, info.tsc_timestamp, info.system_time,
            info.tsc_to_system_mul, info.tsc_shift, info.flags,
        )  # fmt: skip

    def timer(self, event: int, arm: int, value: int) -> None:
        """The hrtimer queue's listener: (G_ARM, arm, expires) or (G_CANCEL, arm, why)."""
        if event == G_ARM:
            self.log.add(G_ARM, self.clock(), arm, value)
        else:
            self.log.add(G_CANCEL, self.clock(), arm, 0, value)

    def smp(self, event: int, a: int, b: int, c: int) -> None:
        """Smp's listener: IPI sends, csd queue/run/wait."""
        self.log.add(event, self.clock(), a, b, c)

    def fire(self, arm: int, expires: int, ran_at: int, programmed_at: int, irq: int) -> None:
        self.log.add(G_FIRE, ran_at, arm, expires, programmed_at, irq)

    def exit_sent(self, sent: int, seq: int, kind: int, arm: int, ipi: int) -> int:
        return self.log.add(G_EXIT, sent, seq, kind, 0, 0, arm, ipi)

    def exit_done(self, slot: int, rtt: int, host_ns: int) -> None:
        self.log.patch(slot, 5, host_ns)
        self.log.patch(slot, 4, max(rtt, 1))

    def irq_arrived(self, seq: int, vector: int, host_time: int, pv_eoi: bool) -> int:
        return self.log.add(G_IRQ, self.clock(), seq, vector, 0, host_time, int(pv_eoi))

    def irq_handled(self, slot: int) -> None:
        self.irqs_handled += 1
        if slot >= 0:
            self.log.patch(slot, 4, self.clock())

    def stall(self, at: int, gap: int) -> None:
        self.log.add(G_STALL, at, gap)

    def window(self, start: int, end: int, point: int) -> None:
        self.log.add(G_WINDOW, start, end, point)

    def link(self, fault: int, direction: int, seq: int) -> None:
        self.log.add(G_LINK, self.clock(), fault, direction, seq)

    def start(self, at: int) -> None:
        self.log.add(G_START, at)

    def end(self, at: int, eois: int, pv_unreported: int) -> None:
        self.log.add(G_END, at, eois, pv_unreported, self.irqs_handled)

    def close(self) -> None:
        self.log.close()
