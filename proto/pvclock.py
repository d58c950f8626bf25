"""kvmclock (pvclock) ABI: how the host publishes guest time and the guest reads it.

The host is the only authority on time.  It defines the guest TSC as a counter at
``tsc_khz`` that was 0 at host CLOCK_MONOTONIC ``tsc_epoch`` and publishes
``pvclock_vcpu_time_info`` (reference section 7): at TSC value ``tsc_timestamp`` the
guest's CLOCK_MONOTONIC was ``system_time``; between publications the guest
extrapolates with ``pvclock_scale_delta``.  Host and guest run these same functions, so
a host timer armed for guest ktime ``x`` fires when the guest's own reading of ktime is
at least ``x``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from vtick.proto.clockmath import NSEC_PER_SEC, kvm_get_time_scale, pvclock_scale_delta

__all__ = [
    "PVCLOCK_TSC_STABLE_BIT",
    "PVCLOCK_COUNTS_FROM_ZERO",
    "PvclockInfo",
    "TscModel",
]

PVCLOCK_TSC_STABLE_BIT = 1 << 0
PVCLOCK_GUEST_STOPPED = 1 << 1
PVCLOCK_COUNTS_FROM_ZERO = 1 << 2


@dataclass(frozen=True, slots=True)
class PvclockInfo:
    """``pvclock_vcpu_time_info`` without padding.  An odd version means "being updated"."""

    version: int
    tsc_timestamp: int
    system_time: int
    tsc_to_system_mul: int
    tsc_shift: int
    flags: int

    def to_wire(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_wire(cls, wire: dict[str, int]) -> PvclockInfo:
        return cls(**wire)

    def ktime(self, tsc: int) -> int:
        """Guest CLOCK_MONOTONIC (ns) at guest TSC value ``tsc``, as the guest computes it."""
        return self.system_time + pvclock_scale_delta(
            tsc - self.tsc_timestamp, self.tsc_to_system_mul, self.tsc_shift
        )


@dataclass(frozen=True, slots=True)
class TscModel:
    """The guest TSC as a function of host CLOCK_MONOTONIC ns.

    ``tsc(t) = (t - tsc_epoch) * tsc_khz / 10**6``, rounded down.  ``ktime_epoch`` is the
    host time at which guest ktime was 0 (kvmclock counts from VM start).
    """

    tsc_khz: int
    tsc_epoch: int
    ktime_epoch: int

    def tsc(self, host_ns: int) -> int:
        return (host_ns - self.tsc_epoch) * self.tsc_khz // 1_000_000

    def publish(self, host_ns: int, version: int) -> PvclockInfo:
        """The time info the host publishes at ``host_ns`` (``version`` must be even)."""
        shift, mul = kvm_get_time_scale(NSEC_PER_SEC, self.tsc_khz * 1000)
        return PvclockInfo(
            version=version,
            tsc_timestamp=self.tsc(host_ns),
            system_time=host_ns - self.ktime_epoch,
            tsc_to_system_mul=mul,
            tsc_shift=shift,
            flags=PVCLOCK_TSC_STABLE_BIT | PVCLOCK_COUNTS_FROM_ZERO,
        )

    def host_ns_for_ktime(self, info: PvclockInfo, ktime: int) -> int:
        """The earliest host time at which the guest reads ktime >= ``ktime`` through ``info``.

        Guest ktime runs at 1 ns/ns up to mul/shift rounding, so start from the exact
        answer for a perfect clock and correct by the observed error until the first
        host nanosecond that reaches ``ktime`` is found.
        """
        t = ktime + self.ktime_epoch
        for _ in range(64):
            err = ktime - info.ktime(self.tsc(t))
            if err > 0:
                t += err
                continue
            # reached: step back while the previous nanosecond also reaches it
            back = max(1, -err)
            if info.ktime(self.tsc(t - back)) >= ktime:
                t -= back
                continue
            if back > 1 and info.ktime(self.tsc(t - 1)) >= ktime:
                t -= 1
                continue
            return t
        return t
