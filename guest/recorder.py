"""A bounded, compact record of the first exits and interrupts of a run (``--trace``).

Recording must not distort what it measures: records go into preallocated-style
``array('q')`` buffers (four signed 64-bit integers each, no per-record objects), stop
when the window is full, and leave the vCPU only at the end, in one ``trace`` message.
``vtick bench recording`` compares a run with it on and off.
"""

from __future__ import annotations

import sys
from array import array

__all__ = ["Recorder", "EXIT_RECORDS", "IRQ_RECORDS", "EVENT_RECORDS", "CALL_RECORDS"]

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
