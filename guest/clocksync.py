"""Estimate the offset between this machine's CLOCK_MONOTONIC and the host's.

On one machine host and guest read the same CLOCK_MONOTONIC and the guest TSC is exact by
construction.  Across machines the clocks have unrelated origins (each machine's boot),
so the vCPU pings the host a few times after the welcome and keeps the sample with the
smallest round trip (NTP's rule: its midpoint is the best estimate, off by at most half
that round trip).  An estimate smaller than the round trip itself cannot be told from
zero and means one clock domain, so it is taken as exactly 0: a same-machine run keeps
its exact clock.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ClockSample", "Offset", "estimate_offset", "PINGS"]

PINGS = 8


@dataclass(frozen=True, slots=True)
class ClockSample:
    sent: int  # local clock when the ping left
    host: int  # host clock when it answered
    received: int  # local clock when the pong arrived

    @property
    def rtt(self) -> int:
        return self.received - self.sent


@dataclass(frozen=True, slots=True)
class Offset:
    ns: int  # host clock - local clock
    rtt: int  # round trip of the sample it came from
    same_domain: bool  # indistinguishable from 0: one machine


def estimate_offset(samples: list[ClockSample]) -> Offset:
    """The offset (host - local) from the minimum-round-trip sample.

    Raises:
        ValueError: no samples.
    """
    if not samples:
        raise ValueError("no clock samples")
    best = min(samples, key=lambda s: s.rtt)
    offset = best.host - (best.sent + best.received) // 2
    if abs(offset) <= best.rtt:
        return Offset(0, best.rtt, True)
    return Offset(offset, best.rtt, False)
