"""A bounded, compact record of the first exits and interrupts of a run (``--trace``).

Recording must not distort what it measures: records go into preallocated-style
``array('q')`` buffers (four signed 64-bit integers each, no per-record objects), stop
when the window is full, and leave the vCPU only at the end, in one ``trace`` message.
``vtick bench recording`` compares a run with it on and off.
"""

from __future__ import annotations

from array import array

__all__ = ["Recorder", "EXIT_RECORDS", "IRQ_RECORDS"]

#: the window: at most this many exits and interrupts (fits one trace message)
EXIT_RECORDS = 1280
IRQ_RECORDS = 640


class Recorder:
    def __init__(self, exits: int = EXIT_RECORDS, irqs: int = IRQ_RECORDS) -> None:
        self.max_exits = exits
        self.max_irqs = irqs
        self.exits = array("q")
        self.irqs = array("q")
        self.dropped = 0

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

    def pack(self) -> tuple[bytes, bytes]:
        """The records as little-endian s64 bytes (the ``trace`` message's fields)."""
        exits, irqs = array("q", self.exits), array("q", self.irqs)
        import sys

        if sys.byteorder != "little":  # pragma: no cover - x86 and arm64 are little
            exits.byteswap()
            irqs.byteswap()
        return exits.tobytes(), irqs.tobytes()
