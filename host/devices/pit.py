"""The i8254 programmable interval timer (PIT) and system control port B (port 0x61).

Theory of operation
-------------------
Real hardware decrements each channel's counter on every edge of a free-running
1 193 182 Hz clock (CLK).  Here nothing ticks: the CLK is a pure function of host time,
``clk(t) = t * PIT_HZ // 10**9`` (the index of the last CLK edge at or before host ns
``t``), and every counter value and OUT level is *derived* from how many edges a channel
has counted since it was loaded.  A guest port access is one exit, handled at the
``now`` the host received it, so a guest that polls the PIT pays one round trip per
``inb`` just as a KVM guest pays one trap per PIO, and the calibration error it carries
comes from exactly that (DESIGN.md section 3; reference section 8, calibrate_APIC_clock).

Per channel the model keeps ``load_edge`` (the CLK edge at which the count N was
loaded: the one after the write, as the 8254 loads "on the next CLK pulse"), the
decrements ``credited`` in earlier gate-high stretches, and ``run_from`` (decrements
happen at the edges after it while the gate is high; ``None`` while paused).  So::

    d(now) = credited + max(0, clk(now) - run_from)       # decrements since the load

    mode 0/4  counter = (N - d) mod 2**16   OUT(0) = d >= N,  OUT(4) = d != N
    mode 2    counter = N - d mod N         OUT low only when the counter is 1
    mode 3    counter = N - (2d) mod N      OUT high for the first ceil(N/2) of each N

(N = 0 is written for 65536.)  Mode 3's counter read-out for odd N follows QEMU's
approximation; OUT timing is exact.  Supported:

* control word at 0x43: channel select, access mode (lobyte, hibyte, lo-then-hi),
  modes 0, 2, 3 and 4 (6 and 7 are aliases of 2 and 3), counter-latch command and the
  read-back command (count and/or status latch).  Modes 1 and 5 need a gate *trigger*
  this model does not implement: they are accepted, counted in ``stats.unsupported_mode``
  and never count (OUT stays high).  BCD (bit 0) is stored and shown in the status byte
  but the counter always counts in binary, as KVM's PIT does; counted in
  ``stats.bcd_ignored``.
* data ports 0x40..0x42: count writes (a lo/hi count's first byte stops a mode 0
  counter, the second loads it), counter reads with the lo/hi read flip-flop, latched
  reads.  A new count in mode 2/3 takes effect at once (QEMU and KVM do the same; the
  8254 would wait for the end of the current period).
* gates: channel 2's gate is port 0x61 bit 0, channels 0 and 1 are tied high.  Mode 0/4:
  gate low pauses counting; mode 2/3: gate low stops counting and forces OUT high, a
  rising edge reloads the counter (on the next CLK).
* port 0x61: bit 0 gate 2, bit 1 speaker data (stored, no sound), bits 2-3 stored,
  bit 4 the DRAM refresh toggle (derived from time: flips every 15 085 ns), bit 5 OUT2,
  bits 6-7 read 0.
* channel 0's output is IRQ0 only if the host passes ``irq0``: then every rising edge
  of OUT0 (mode 0: terminal count; mode 4: end of the strobe; mode 2/3: every period)
  calls ``irq0(now)`` from a host hrtimer (named ``"pit0"``, owned by vCPU 0).  Rising
  edges closer together than ``min_irq_period_ns`` (default 200 µs, KVM's
  ``min_timer_period_us`` clamp for the PIT) coalesce; missed edges are counted in
  ``stats.irq0_coalesced``, never replayed.  Without ``irq0`` channel 0 counts but
  raises nothing.

Accesses wider than a byte act on the low byte (reads are zero-extended).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vtick.host.machine import Machine, VcpuState
from vtick.proto.abi import PIT_HZ, PitPort
from vtick.proto.clockmath import NSEC_PER_SEC

__all__ = ["Pit", "PitChannel", "PitStats", "pit_clk", "pit_edge_time"]

TIMER = "pit0"
#: control word access modes (bits 5:4)
RW_LATCH, RW_LSB, RW_MSB, RW_LOHI = 0, 1, 2, 3
#: DRAM refresh request period on PC/AT: port 0x61 bit 4 flips at this rate
REFRESH_NS = 15_085
#: KVM's min_timer_period_us (reference section 3), applied to IRQ0 edges
MIN_IRQ_PERIOD_NS = 200_000


def pit_clk(t: int) -> int:
    """Index of the last PIT CLK edge at or before host ns ``t`` (edge e is at ceil(e*1e9/F))."""
    return t * PIT_HZ // NSEC_PER_SEC


def pit_edge_time(edge: int) -> int:
    """The host ns of CLK edge ``edge``: the smallest t with ``pit_clk(t) >= edge``."""
    return -((-edge * NSEC_PER_SEC) // PIT_HZ)


@dataclass
class PitStats:
    reads: int = 0
    writes: int = 0
    latches: int = 0  # counter-latch commands that latched (a second one is ignored)
    readbacks: int = 0
    bcd_ignored: int = 0  # control words asking for BCD counting (counted in binary)
    unsupported_mode: int = 0  # control words selecting mode 1 or 5
    irq0: int = 0  # IRQ0 edges delivered through the host's callback
    irq0_coalesced: int = 0  # rising edges of OUT0 merged into a later IRQ0


@dataclass
class PitChannel:
    """One counter of the 8254.  All times are PIT CLK edge indices (see :func:`pit_clk`)."""

    index: int
    gate: bool = True
    mode: int = 0
    access: int = RW_LOHI
    bcd: bool = False
    reload: int = 0x10000  # N: the count written (0 means 65536)
    loaded: bool = False  # a complete count was written since the last control word
    load_edge: int = 0
    credited: int = 0
    run_from: int | None = None
    hold: int = 0  # what the counter reads while no count is loaded
    write_msb_next: bool = False  # lo/hi write flip-flop
    write_lsb: int = 0
    read_msb_next: bool = False  # lo/hi read flip-flop (live reads)
    latched: int | None = None
    latched_msb_next: bool = False
    status: int | None = None  # latched status byte (read-back), read before the count

    # -------------------------------------------------------------- derived state

    def elapsed(self, now: int) -> int:
        """Decrements (counted CLK edges) since the count was loaded."""
        d = self.credited
        if self.run_from is not None:
            d += max(0, pit_clk(now) - self.run_from)
        return d

    def counter(self, now: int) -> int:
        """The 16-bit counting element at host ns ``now``."""
        if not self.loaded or self.mode in (1, 5):
            return self.hold & 0xFFFF
        n, d = self.reload, self.elapsed(now)
        if self.mode == 2:
            value = n - d % n
        elif self.mode == 3:
            value = n - (2 * d) % n
        else:  # 0, 4: count down through 0 and wrap
            value = n - d
        return value & 0xFFFF

    def out(self, now: int) -> bool:
        """The OUT pin at host ns ``now``."""
        if not self.loaded:
            return self.mode != 0  # initial state after a control word: low only in mode 0
        n, d = self.reload, self.elapsed(now)
        if self.mode == 0:
            return d >= n
        if self.mode == 4:
            return d != n
        if self.mode in (2, 3) and not self.gate:
            return True
        if self.mode == 2:
            return n < 2 or d % n != n - 1
        if self.mode == 3:
            return d % n < (n + 1) // 2
        return True  # modes 1 and 5: never triggered

    def status_byte(self, now: int) -> int:
        """Read-back status: OUT, NULL COUNT, then the programmed RW/mode/BCD bits."""
        null_count = not self.loaded or pit_clk(now) < self.load_edge
        return (
            (int(self.out(now)) << 7)
            | (int(null_count) << 6)
            | (self.access << 4)
            | (self.mode << 1)
            | int(self.bcd)
        )

    # -------------------------------------------------------------- transitions

    def program(self, access: int, mode: int, bcd: bool, now: int) -> None:
        """A control word for this channel: reset its logic, await a new count."""
        self.hold = self.counter(now)
        self.access = access
        self.mode = mode
        self.bcd = bcd
        self.loaded = False
        self.run_from = None
        self.credited = 0
        self.write_msb_next = self.read_msb_next = self.latched_msb_next = False
        self.latched = None
        self.status = None

    def write_count(self, byte: int, now: int) -> bool:
        """A data-port write; True when it completed a count (the counter was loaded)."""
        if self.access == RW_LSB:
            count = byte
        elif self.access == RW_MSB:
            count = byte << 8
        elif not self.write_msb_next:
            self.write_lsb = byte
            self.write_msb_next = True
            if self.mode == 0:  # the first byte stops a mode-0 count (8254 data sheet)
                self.hold = self.counter(now)
                self.loaded = False
                self.run_from = None
            return False
        else:
            count = self.write_lsb | byte << 8
            self.write_msb_next = False
        self.reload = count or 0x10000
        self.hold = self.reload
        self.loaded = True
        self.load_edge = pit_clk(now) + 1  # loaded on the next CLK pulse
        self.credited = 0
        counts = self.mode not in (1, 5) and self.gate
        self.run_from = self.load_edge if counts else None
        return True

    def set_gate(self, level: bool, now: int) -> None:
        if level == self.gate:
            return
        self.gate = level
        if not self.loaded or self.mode in (1, 5):
            return
        if not level:  # pause (0/4) or stop with OUT high (2/3): freeze the count
            self.credited = self.elapsed(now)
            self.run_from = None
        elif self.mode in (0, 4):  # resume at the next edge (never before the load edge)
            self.run_from = max(pit_clk(now), self.load_edge)
        else:  # 2/3: a rising gate reloads the counter on the next CLK
            self.load_edge = pit_clk(now) + 1
            self.credited = 0
            self.run_from = self.load_edge

    def latch(self, now: int) -> bool:
        """Counter-latch command; a second latch before the first is read is ignored."""
        if self.latched is not None:
            return False
        self.latched = self.counter(now)
        self.latched_msb_next = False
        return True

    def read(self, now: int) -> int:
        """A data-port read: latched status, then latched count, else the live counter."""
        if self.status is not None:
            value, self.status = self.status, None
            return value
        if self.latched is not None:
            latched = self.latched
            if self.access == RW_LOHI and not self.latched_msb_next:
                self.latched_msb_next = True
                return latched & 0xFF
            self.latched = None
            self.latched_msb_next = False
            return (latched >> 8) & 0xFF if self.access in (RW_MSB, RW_LOHI) else latched & 0xFF
        value = self.counter(now)
        if self.access == RW_LSB:
            return value & 0xFF
        if self.access == RW_MSB:
            return value >> 8
        msb, self.read_msb_next = self.read_msb_next, not self.read_msb_next
        return value >> 8 if msb else value & 0xFF

    # -------------------------------------------------------------- migration (issue 13)

    def save(self, base: int) -> dict[str, Any]:
        """This channel's state with every CLK edge index relative to ``base`` (the
        edge of the freeze), so no host time leaves (CDDL ``pit-channel``)."""
        state: dict[str, Any] = {
            "gate": self.gate,
            "mode": self.mode,
            "access": self.access,
            "bcd": self.bcd,
            "reload": self.reload,
            "loaded": self.loaded,
            "load_edge": self.load_edge - base,
            "credited": self.credited,
            "hold": self.hold,
            "write_msb_next": self.write_msb_next,
            "write_lsb": self.write_lsb,
            "read_msb_next": self.read_msb_next,
            "latched_msb_next": self.latched_msb_next,
        }
        if self.run_from is not None:
            state["run_from"] = self.run_from - base
        if self.latched is not None:
            state["latched"] = self.latched
        if self.status is not None:
            state["status"] = self.status
        return state

    def restore(self, state: dict[str, Any], base: int) -> None:
        """Load :meth:`save`'s result with its edges re-based onto ``base``."""
        self.gate = state["gate"]
        self.mode = state["mode"]
        self.access = state["access"]
        self.bcd = state["bcd"]
        self.reload = state["reload"]
        self.loaded = state["loaded"]
        self.load_edge = base + state["load_edge"]
        self.credited = state["credited"]
        self.hold = state["hold"]
        self.write_msb_next = state["write_msb_next"]
        self.write_lsb = state["write_lsb"]
        self.read_msb_next = state["read_msb_next"]
        self.latched_msb_next = state["latched_msb_next"]
        run_from = state.get("run_from")
        self.run_from = None if run_from is None else base + run_from
        self.latched = state.get("latched")
        self.status = state.get("status")

    def next_rising_edge(self, now: int, min_ticks: int) -> int | None:
        """Edge index of OUT's next low-to-high transition after ``now`` (gate held high).

        Periodic edges closer than ``min_ticks`` to ``now`` are skipped (coalesced).
        """
        if not self.loaded or not self.gate or self.run_from is None:
            return None
        n, d = self.reload, self.elapsed(now)
        if self.mode in (0, 4):
            target = n if self.mode == 0 else n + 1
            return self.load_edge + target if d < target else None
        if self.mode in (2, 3):
            k = (d + max(1, min_ticks)) // n + (1 if (d + max(1, min_ticks)) % n else 0)
            return self.load_edge + max(k, 1) * n
        return None


@dataclass
class _PortB:
    bits: int = 0  # bits 0-3 as last written


class Pit:
    """The PIT (channels 0-2) and port 0x61, registered on ``machine``.

    Args:
        machine: registers ports 0x40-0x43 and 0x61.
        irq0: called with ``now`` at each rising edge of channel 0's OUT; the host
            routes it (PIC/IOAPIC are not modelled).  ``None``: channel 0 raises nothing.
        min_irq_period_ns: IRQ0 edges closer than this coalesce.
    """

    def __init__(
        self,
        machine: Machine,
        irq0: Callable[[int], None] | None = None,
        min_irq_period_ns: int = MIN_IRQ_PERIOD_NS,
    ) -> None:
        self.machine = machine
        self.irq0 = irq0
        self.min_irq_ticks = -((-min_irq_period_ns * PIT_HZ) // NSEC_PER_SEC)
        # port 0x61 resets to 0, so gate 2 starts low; gates 0 and 1 are tied high
        self.channels = [PitChannel(0), PitChannel(1), PitChannel(2, gate=False)]
        self.port_b = _PortB()
        self.stats = PitStats()
        self._irq0_edge: int | None = None  # the rising edge the armed timer is for
        self._irq0_last = 0  # the last rising edge delivered (or the load edge)
        machine.devices["pit"] = self
        machine.register_pio(PitPort.CHANNEL0, PitPort.MODE, self.pit_in, self.pit_out, "i8254")
        machine.register_pio(
            PitPort.PORT_B, PitPort.PORT_B, self.port_b_in, self.port_b_out, "port-b"
        )

    # ------------------------------------------------------------------ ports 0x40-0x43

    def pit_in(self, vcpu: VcpuState, port: int, size: int, now: int) -> int:
        self.stats.reads += 1
        if port == PitPort.MODE:
            return 0xFF  # the control register is write-only: the bus floats
        return self.channels[port - PitPort.CHANNEL0].read(now)

    def pit_out(self, vcpu: VcpuState, port: int, size: int, value: int, now: int) -> None:
        self.stats.writes += 1
        byte = value & 0xFF
        if port != PitPort.MODE:
            ch = self.channels[port - PitPort.CHANNEL0]
            ch.write_count(byte, now)
            if ch.index == 0:
                self._rearm_irq0(now)
            return
        select, access, mode, bcd = byte >> 6, (byte >> 4) & 3, (byte >> 1) & 7, bool(byte & 1)
        if select == 3:
            self._read_back(byte, now)
            return
        ch = self.channels[select]
        if access == RW_LATCH:
            self.stats.latches += ch.latch(now)
            return
        if mode > 5:
            mode -= 4  # 6 and 7 decode as 2 and 3 (bit 3 is a don't-care for them)
        self.stats.bcd_ignored += bcd
        self.stats.unsupported_mode += mode in (1, 5)
        ch.program(access, mode, bcd, now)
        if select == 0:
            self._rearm_irq0(now)

    def _read_back(self, byte: int, now: int) -> None:
        """Read-back command: bit 5 clear latches counts, bit 4 clear latches status."""
        self.stats.readbacks += 1
        for ch in self.channels:
            if not byte & (2 << ch.index):
                continue
            if not byte & 0x20:
                ch.latch(now)
            if not byte & 0x10 and ch.status is None:
                ch.status = ch.status_byte(now)

    # ------------------------------------------------------------------ port 0x61

    def port_b_in(self, vcpu: VcpuState, port: int, size: int, now: int) -> int:
        self.stats.reads += 1
        refresh = (now // REFRESH_NS) & 1
        out2 = self.channels[2].out(now)
        return (self.port_b.bits & 0x0F) | (refresh << 4) | (int(out2) << 5)

    def port_b_out(self, vcpu: VcpuState, port: int, size: int, value: int, now: int) -> None:
        self.stats.writes += 1
        self.port_b.bits = value & 0x0F  # gate 2, speaker data, parity/IO-check enables
        self.channels[2].set_gate(bool(value & 1), now)

    # ------------------------------------------------------------------ IRQ0

    def _rearm_irq0(self, now: int) -> None:
        if self.irq0 is None:
            return
        ch = self.channels[0]
        self._irq0_last = ch.load_edge
        self._arm_edge(ch.next_rising_edge(now, 0))

    def _arm_edge(self, edge: int | None) -> None:
        bsp = self.machine.vcpus[0]
        self._irq0_edge = edge
        if edge is None:
            self.machine.cancel_timer(TIMER, bsp)
        else:
            self.machine.arm_timer(TIMER, bsp, pit_edge_time(edge), self._irq0_fire)

    def _irq0_fire(self, vcpu: VcpuState, now: int) -> None:
        assert self.irq0 is not None
        ch = self.channels[0]
        self.stats.irq0 += 1
        if ch.mode in (2, 3):
            # every rising edge since the last one delivered, but this IRQ, coalesced
            # (skipped by the minimum period, or passed while the host ran late)
            latest = ch.load_edge + ch.elapsed(now) // ch.reload * ch.reload
            self.stats.irq0_coalesced += max(0, (latest - self._irq0_last) // ch.reload - 1)
            self._irq0_last = latest
        self.irq0(now)
        self._arm_edge(ch.next_rising_edge(now, self.min_irq_ticks))

    # ------------------------------------------------------------------ migration (issue 13)

    def save(self, now: int) -> dict[str, Any]:
        """The PIT (one per VM) at host time ``now`` (CDDL ``pit-state``).

        The CLK is a function of host time, so edge indices are saved relative to the
        freeze edge ``pit_clk(now)`` and re-based on restore: the counters resume from
        the count they had, as the LAPIC timer does (KVM_GET_PIT2 / KVM_SET_PIT2 carry
        ``count_load_time``, which QEMU re-bases onto its virtual clock, stopped while
        the VM is stopped).  Port 0x61's refresh bit is derived from time, not state;
        ``stats`` are counters.  ``irq0`` is the destination host's own wiring.
        """
        base = pit_clk(now)
        state: dict[str, Any] = {
            "channels": [ch.save(base) for ch in self.channels],
            "port_b": self.port_b.bits,
            "irq0_last": self._irq0_last - base,
        }
        if self._irq0_edge is not None:
            state["irq0_edge"] = self._irq0_edge - base
        return state

    def restore(self, state: dict[str, Any], now: int) -> None:
        """Load :meth:`save`'s result at host time ``now``; re-arm IRQ0 if wired."""
        base = pit_clk(now)
        for ch, saved in zip(self.channels, state["channels"], strict=True):
            ch.restore(saved, base)
        self.port_b.bits = state["port_b"]
        self._irq0_last = base + state["irq0_last"]
        edge = state.get("irq0_edge")
        if self.irq0 is not None and edge is not None:
            self._arm_edge(base + edge)
