"""The host's tracking of one vCPU link's clock offset during the run (pure, integer ns).

Theory of operation
-------------------
A vCPU on another machine reads a clock with another origin and another rate.  At the
handshake it estimates the offset once (guest/clocksync.py); during the run it keeps
pinging the host (every ``CLOCK_PING_S``, guest/clocksync.py), and each ping carries,
besides its own send time ``t``, the ``t`` of the last pong it received (``echo``) and
its clock when that pong arrived (``rx``).  The host, which answered that ping at its
own time ``host``, then holds the whole exchange, NTP's origin, receive and arrival
timestamps:

    sent (vCPU clock) -> host (host clock) -> received (vCPU clock)

The true offset (host - vCPU) at that moment lies in ``[host - received, host - sent]``
(the host answered after the ping left and before the pong arrived; it reads its clock
once, so NTP's server-processing term is 0).  Its midpoint is the estimate and half the
round trip its error, so the exchange with the smallest round trip is the best one, and
queueing delay only ever widens the interval (NTP's clock filter, RFC 5905 section 10).

1. **Filter.**  Exchanges are grouped in windows of ``WINDOW_NS`` of the vCPU's clock (a
   window closes when the first exchange after it arrives); each window keeps only its
   minimum-round-trip exchange, a *point*.
2. **Fit.**  The last ``POINTS`` points get a weighted least-squares line, offset
   against the vCPU's clock, each point weighted by 1/rtt² (its error is up to rtt/2):
   its slope is the drift (ppb), its value at the newest point the offset.  The slope of
   points close together is mostly their noise (two points 5 ms apart whose midpoints
   are each 100 µs off give 4 % of "drift"), so a slope counts only when it is
   *significant*: more than twice what the oldest and newest points' errors alone could
   make of it, ``(rtt_old + rtt_new) / 2 / span``.  Otherwise the drift is taken as 0
   and the line goes through the newest point: over a 1 s window a real clock's tens
   of ppm are tens of µs, below a network round trip, and corrected every window.
3. **Bound.**  At the newest point the true offset is within half that point's round trip
   of its midpoint, so the line's error there is at most ``|line - midpoint| + rtt/2``:
   the bound reported per link, and sent with the correction.
4. **One clock.**  While every exchange so far had ``sent <= host <= received`` on the raw
   clocks, "the clocks are one" explains all of them (one machine, or two whose clocks
   agree within the round trip); the tracker then publishes nothing and the vCPU keeps
   its exact clock.  The first exchange that breaks causality ends that for the session.

Every new point yields a new line (:meth:`ClockTracker.take_correction`); the server sends
it with a kvmclock re-publication (the ``pvclock`` message's ``tsc_sync``), as KVM
re-publishes kvmclock after writing a vCPU's TSC offset.  The vCPU slews to it
(guest/clocksync.py ``ClockDiscipline``).  No clock is read here: times come in as
arguments.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

__all__ = ["Exchange", "ClockTracker", "Line", "WINDOW_NS", "POINTS", "DRIFT_SPAN_NS", "fit"]

#: length of a minimum-round-trip window on the vCPU's clock (a vtick vCPU on another
#: clock pings every 0.125 s: about 4 exchanges per window)
WINDOW_NS = 500_000_000
#: points in the drift fit (the last 16 s)
POINTS = 32
#: no drift is fitted from points spanning less than this much of the vCPU's clock
DRIFT_SPAN_NS = 500_000_000
#: pings the host remembers waiting for their echo (bounded: a hostile vCPU cannot grow it)
PENDING_MAX = 64
NS_PER_S = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Exchange:
    """One ping/pong: sent and received on the vCPU's clock, host on the host's."""

    sent: int
    host: int
    received: int

    @property
    def rtt(self) -> int:
        return self.received - self.sent

    @property
    def midpoint(self) -> int:
        return (self.sent + self.received) // 2

    @property
    def offset(self) -> int:
        """The estimate host - vCPU (NTP's theta with the server's two times equal)."""
        return self.host - self.midpoint

    @property
    def causal(self) -> bool:
        """Consistent with one shared clock: the host answered between send and arrival."""
        return self.sent <= self.host <= self.received


@dataclass(frozen=True, slots=True)
class Line:
    """``host(t) = t + offset + (t - at) * ppb / 10**9``; the wire's ``tsc-sync``."""

    at: int
    offset: int
    ppb: int
    bound: int

    def to_wire(self) -> dict[str, int]:
        return {"at": self.at, "offset": self.offset, "ppb": self.ppb, "bound": self.bound}


class ClockTracker:
    """One link's exchanges, filter, fit and bound (see the module's theory)."""

    def __init__(self, window_ns: int = WINDOW_NS, points: int = POINTS) -> None:
        self.window_ns = window_ns
        #: ping t -> host time it was answered, waiting for its echo
        self._pending: OrderedDict[int, int] = OrderedDict()
        self._window: list[Exchange] = []
        self.points: deque[Exchange] = deque(maxlen=points)
        self.exchanges = 0
        self.rejected = 0
        self.one_clock = True
        self.line: Line | None = None
        self._unsent: Line | None = None
        self.corrections = 0
        self.min_rtt: int | None = None

    def on_ping(self, t: int, echo: int | None, rx: int | None, host_now: int) -> bool:
        """A ping arrived at ``host_now`` and is answered with that time.  Returns True
        when it completed an exchange that produced a new line."""
        self._pending[t] = host_now
        while len(self._pending) > PENDING_MAX:
            self._pending.popitem(last=False)
        if echo is None or rx is None:
            return False
        host = self._pending.pop(echo, None)
        if host is None or rx < echo:
            self.rejected += 1  # not a ping of ours, or time ran backwards: not evidence
            return False
        return self.add(Exchange(echo, host, rx))

    def add(self, ex: Exchange) -> bool:
        """Take one complete exchange; True when it closed a window and moved the line."""
        self.exchanges += 1
        self.one_clock = self.one_clock and ex.causal
        self.min_rtt = ex.rtt if self.min_rtt is None else min(self.min_rtt, ex.rtt)
        if not self._window or ex.sent < self._window[0].sent + self.window_ns:
            self._window.append(ex)
            return False
        # this exchange is past the window: the window is complete, and it opens the next
        self.points.append(min(self._window, key=lambda e: e.rtt))
        self._window = [ex]
        if self.one_clock:
            return False
        self.line = fit(list(self.points))
        self._unsent = self.line
        return True

    def take_correction(self) -> Line | None:
        """The line to publish, once; None when nothing new (or the clocks are one)."""
        line, self._unsent = self._unsent, None
        if line is not None:
            self.corrections += 1
        return line

    def as_dict(self) -> dict[str, Any]:
        """What the results say about this link's clock."""
        line = self.line
        return {
            "one_clock": self.one_clock,
            "exchanges": self.exchanges,
            "rejected": self.rejected,
            "points": len(self.points),
            "min_rtt_ns": self.min_rtt,
            "corrections": self.corrections,
            "offset_ns": line.offset if line else 0,
            "drift_ppb": line.ppb if line else 0,
            # one clock: the identity explains every exchange; its error is below the
            # tightest round trip, half of which is the honest bound
            "bound_ns": line.bound
            if line
            else (-(-self.min_rtt // 2) if self.min_rtt is not None else None),
        }


def fit(points: list[Exchange]) -> Line:
    """Weighted least squares (1/rtt²) of offset against the vCPU's clock, anchored at
    the newest point; a slope that is not significant (see the module's theory) is
    taken as no drift, and the line then goes through the newest point.

    Exact rational arithmetic (no floating point for time, design.md section 3); the
    result is rounded to whole ns and ppb.
    """
    newest, oldest = points[-1], points[0]
    at = newest.midpoint
    span = newest.midpoint - oldest.midpoint
    through_newest = Line(at=at, offset=newest.offset, ppb=0, bound=-(-newest.rtt // 2))
    if span < DRIFT_SPAN_NS:
        return through_newest
    ws = [Fraction(1, max(p.rtt, 1) ** 2) for p in points]
    xs = [p.midpoint - at for p in points]  # relative to the anchor: small numbers
    ys = [p.offset for p in points]
    sw = sum(ws)
    mx = sum(w * x for w, x in zip(ws, xs, strict=True)) / sw
    my = sum(w * y for w, y in zip(ws, ys, strict=True)) / sw
    sxx = sum(w * (x - mx) ** 2 for w, x in zip(ws, xs, strict=True))
    sxy = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys, strict=True))
    if not sxx:
        return through_newest
    slope = sxy / sxx
    noise = Fraction(oldest.rtt + newest.rtt, 2 * span)
    if abs(slope) <= 2 * noise:
        return through_newest
    offset_ns = round(my + slope * (0 - mx))
    # the true offset at the newest point is within rtt/2 of its midpoint estimate
    bound = abs(offset_ns - newest.offset) + -(-newest.rtt // 2)
    return Line(at=at, offset=offset_ns, ppb=round(slope * NS_PER_S), bound=bound)
