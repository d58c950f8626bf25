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

from vtick.proto.clockmath import NSEC_PER_SEC, U64_MASK, kvm_get_time_scale, pvclock_scale_delta

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

    def host_ns_for_ktime(self, info: PvclockInfo, ktime: int) -> int | None:
        """The earliest host time at which the guest reads ktime >= ``ktime`` through
        ``info``, or None when no such time exists.

        Only host times whose TSC is at or after ``tsc_timestamp`` count: before it the
        guest's unsigned delta would wrap.  A target at or before ``system_time`` is
        therefore answered with the first host ns of the publication's TSC tick.

        The guest's reading is monotonic only while the 64-bit TSC has not wrapped and
        ``pvclock_scale_delta``'s left shift has not overflowed (:meth:`max_tsc`); a
        target beyond the last reading of that range is never reached (at 2.5 GHz the
        TSC wraps after 7.38e18 ns, so KTIME_MAX is unreachable) and the answer is None,
        which callers treat as "never", as Linux and KVM treat KTIME_MAX.  Every search
        below is confined to that range, so no value from the wire can make it loop.

        Guest ktime runs at 1 ns/ns up to mul/shift rounding, so the exact answer for a
        perfect clock is nearly always right or one correction away; it is accepted only
        once verified (reaches the target, the previous ns does not), else a binary
        search over the monotonic function settles it (slow TSCs, where one tick spans
        many ns).
        """
        start = self.host_ns_for_tsc(info.tsc_timestamp)
        if ktime <= info.system_time:
            return start
        last_tsc = self.max_tsc(info)
        if info.ktime(last_tsc) < ktime:
            return None
        # the last host ns whose TSC still reads at most last_tsc
        cap = self.host_ns_for_tsc(last_tsc + 1) - 1

        def reached(t: int) -> bool:
            return t >= start and info.ktime(self.tsc(min(t, cap))) >= ktime

        t = ktime + self.ktime_epoch
        for _ in range(2):
            probe = min(max(t, start), cap)
            t = max(t + ktime - info.ktime(self.tsc(probe)), start)
        t = min(t, cap)
        if reached(t) and not reached(t - 1):
            return t
        lo, hi = start, cap  # reached(cap) holds: the smallest t in [lo, hi] with it
        while lo < hi:
            mid = (lo + hi) // 2
            if reached(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo

    @staticmethod
    def max_tsc(info: PvclockInfo) -> int:
        """The last guest TSC value whose ktime reading through ``info`` is monotonic:
        the 64-bit TSC's last value, or earlier if ``delta << tsc_shift`` would overflow
        64 bits (``pvclock_scale_delta`` shifts left when the TSC is slower than 1 GHz)."""
        last = U64_MASK
        if info.tsc_shift > 0:
            last = min(last, info.tsc_timestamp + (1 << (64 - info.tsc_shift)) - 1)
        return max(last, info.tsc_timestamp)

    def host_ns_for_tsc(self, tsc: int) -> int:
        """The earliest host ns t at which the guest TSC reads ``>= tsc`` (never early)."""
        # tsc(t) = floor((t - epoch) * khz / 1e6) >= tsc  <=>  (t - epoch) * khz >= tsc * 1e6
        return self.tsc_epoch + -((-tsc * 1_000_000) // self.tsc_khz)
