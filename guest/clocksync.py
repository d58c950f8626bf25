"""Estimate the offset between this machine's CLOCK_MONOTONIC and the host's.

On one machine host and guest read the same CLOCK_MONOTONIC and the guest TSC is exact by
construction.  Across machines the clocks have unrelated origins (each machine's boot),
so the vCPU pings the host a few times after the welcome and keeps the sample with the
smallest round trip (NTP's rule: its midpoint is the best estimate, off by at most half
that round trip).  An estimate smaller than the round trip itself cannot be told from
zero and means one clock domain, so it is taken as exactly 0: a same-machine run keeps
its exact clock.

That estimate is made once, at the handshake; the host keeps tracking it during the run
and corrects it through kvmclock re-publications (the second half of this module).
"""

from __future__ import annotations

from dataclasses import dataclass

from vtick.proto import messages as m
from vtick.proto.clockmath import ClockSample, Offset, estimate_offset
from vtick.proto.pvclock import TscModel

__all__ = [
    "ClockSample",
    "Offset",
    "estimate_offset",
    "PINGS",
    "TscSync",
    "ClockDiscipline",
    "DisciplinedTsc",
    "Pinger",
    "CLOCK_PING_S",
    "CLOCK_PING_ONE_CLOCK_S",
]

PINGS = 8
#: during the run a vCPU whose clock is not the host's pings the host this often, so the
#: host can track it (issue 12; host/topology/clocktrack.py keeps the best of each 0.5 s)
CLOCK_PING_S = 0.125
#: ... and one that shares the host's clock (the handshake found offset 0) only this
#: often: enough for the host to see the clocks stay one, at no cost to a big VM
CLOCK_PING_ONE_CLOCK_S = 2.0


# ---------------------------------------------------------------------- tracking (issue 12)
#
# The handshake's estimate is a constant; another machine's clock also drifts (a quartz
# oscillator is off by tens of ppm, more as its temperature changes), so a vCPU whose TSC
# followed only that constant would drift away from the host by tens of µs per second
# and its timers with it.  The host therefore keeps tracking the offset during the run
# (the vCPU pings it periodically; host/topology/clocktrack.py filters and fits) and,
# whenever its estimate moves, sends the vCPU a new line "host = t + offset + drift"
# with a kvmclock re-publication (the ``pvclock`` message's ``tsc_sync``).  KVM does
# the same with hardware: it writes a vCPU's TSC offset and multiplier (VMX's
# TSC_OFFSET and TSC_MULTIPLIER) and then re-publishes kvmclock (``kvm_write_tsc``
# resets ``hv_clock.tsc_timestamp`` to force a clock update).  Here the vCPU process
# plays the hardware: :class:`ClockDiscipline` maps this machine's clock onto the host's
# and :class:`DisciplinedTsc` turns that into the guest TSC.
#
# A new line is not applied as a step: a TSC that jumps backwards would make ktime go
# backwards (the host publishes PVCLOCK_TSC_STABLE_BIT, so the guest does not clamp), and
# one that jumps forwards fires timers early in host terms.  The difference is slewed
# away instead, at most MAX_SLEW_PPB, as adjtime(3) and chrony slew a clock, and the
# mapping is kept monotonic whatever integer rounding does at the seams.

#: the fastest the discipline slews (2 %: 1 ms of difference takes 50 ms)
MAX_SLEW_PPB = 20_000_000
#: the shortest slew: smaller differences are spread over this much of the vCPU's clock
MIN_SLEW_NS = 10_000_000
NS_PER_S = 1_000_000_000


@dataclass(frozen=True, slots=True)
class TscSync:
    """The host's estimate of this machine's clock: ``host(t) = t + offset + (t - at) *
    ppb / 10**9`` for ``t`` this machine's clock (the wire's ``tsc-sync``)."""

    at: int
    offset: int
    ppb: int
    bound: int

    def host_ns(self, local: int) -> int:
        return local + self.offset + (local - self.at) * self.ppb // NS_PER_S

    @classmethod
    def from_wire(cls, wire: dict[str, int]) -> TscSync:
        return cls(**wire)

    def to_wire(self) -> dict[str, int]:
        return {"at": self.at, "offset": self.offset, "ppb": self.ppb, "bound": self.bound}


class ClockDiscipline:
    """This machine's clock mapped onto the host's: continuous, monotonic, slewed.

    Starts as the handshake's constant offset; :meth:`apply` moves it to a new line
    without a step: from the moment it is applied, a slew segment runs at the new line's
    rate plus what closes the difference within the slew's length, after which the new
    line holds exactly.  All arithmetic is integer ns (design.md section 3).
    """

    def __init__(self, offset: int) -> None:
        self.target = TscSync(at=0, offset=offset, ppb=0, bound=0)
        #: the slew segment: (start on this clock, host ns there, length, rate in ppb)
        self._slew: tuple[int, int, int, int] | None = None
        self._last = -(1 << 63)
        self.corrections = 0
        #: the largest difference a correction had to slew away (ns, signed)
        self.largest_step = 0

    def host_ns(self, local: int) -> int:
        """The host's clock when this machine's clock reads ``local``."""
        if self._slew is not None:
            start, host, length, ppb = self._slew
            if local < start + length:
                value = host + (local - start) + (local - start) * ppb // NS_PER_S
                return self._monotonic(value)
            self._slew = None
        return self._monotonic(self.target.host_ns(local))

    def _monotonic(self, value: int) -> int:
        # rounding at a segment's seam may be a ns behind: never return less than before
        if value < self._last:
            return self._last
        self._last = value
        return value

    def apply(self, sync: TscSync, local: int) -> int:
        """Follow ``sync`` from ``local`` on; returns the difference to slew away (ns)."""
        now = self.host_ns(local)
        residual = sync.host_ns(local) - now
        self.target = sync
        self.corrections += 1
        if abs(residual) > abs(self.largest_step):
            self.largest_step = residual
        if residual == 0:
            self._slew = None
            return 0
        length = max(MIN_SLEW_NS, abs(residual) * NS_PER_S // MAX_SLEW_PPB)
        rate = sync.ppb + residual * NS_PER_S // length
        self._slew = (local, now, length, rate)
        return residual


class DisciplinedTsc:
    """The guest TSC of a vCPU on any machine: the host's TSC model read at the host time
    this machine's clock maps to.  On one machine the discipline is the identity and this
    is the host's TSC exactly."""

    def __init__(self, tsc_khz: int, tsc_epoch: int, discipline: ClockDiscipline) -> None:
        self.model = TscModel(tsc_khz, tsc_epoch, 0)
        self.discipline = discipline
        #: the newest kvmclock tsc_timestamp: never read below it (see published())
        self.floor = 0
        self.floored = 0

    @property
    def tsc_khz(self) -> int:
        return self.model.tsc_khz

    def published(self, tsc_timestamp: int) -> None:
        """The host published kvmclock anchored at ``tsc_timestamp``.  On KVM that is a
        TSC value host and guest have both passed (one shared counter); here a vCPU whose
        clock lags the host's by the tracking's error could still read below it, and
        pvclock's unsigned ``tsc - tsc_timestamp`` would wrap (ktime 2^64-ish ns ahead).
        So the TSC holds at the anchor until it gets there, as a clamped kvmclock read
        holds (``pvclock_clocksource_read``'s last_value)."""
        self.floor = max(self.floor, tsc_timestamp)

    def tsc(self, local_ns: int) -> int:
        value = self.model.tsc(self.discipline.host_ns(local_ns))
        if value < self.floor:
            self.floored += 1
            return self.floor
        return value


class Pinger:
    """The vCPU's side of the exchanges: each ping carries the previous exchange's
    ``echo`` (the t of the last pong received) and ``rx`` (when it arrived), so the host
    holds every exchange whole (host/topology/clocktrack.py)."""

    def __init__(self) -> None:
        self.last: tuple[int, int] | None = None  # (pong's t, local arrival)
        self.pongs = 0

    def ping(self, now: int) -> m.Ping:
        if self.last is None:
            return m.Ping(t=now)
        return m.Ping(t=now, echo=self.last[0], rx=self.last[1])

    def on_pong(self, pong: m.Pong, now: int) -> ClockSample:
        """A pong arrived at ``now``: the sample it completes (for the handshake)."""
        self.last = (pong.t, now)
        self.pongs += 1
        return ClockSample(pong.t, pong.host, now)
