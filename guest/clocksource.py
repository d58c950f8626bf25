"""Guest clocksource: the TSC and kvmclock (pvclock), as Linux's ``pvclock_clocksource_read``.

The host publishes ``pvclock_vcpu_time_info`` in a per-vCPU page; here the page is a
:class:`PvclockPage` the vCPU process updates when a ``welcome`` or ``pvclock`` message
arrives.  Reading follows the seqlock protocol of the ABI (reference section 7): read the
version (bit 0 masked off, as Linux does, so an odd snapshot never matches), read the
fields, read the version again, and retry if it changed.  Without the TSC-stable flag the
result is clamped to the last value returned, so ktime never goes backwards across a
re-publication.  All scaling goes through ``vtick.proto.clockmath``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vtick.proto.pvclock import PVCLOCK_TSC_STABLE_BIT, PvclockInfo

__all__ = ["PvclockPage", "Kvmclock"]


@dataclass
class PvclockPage:
    """The shared page: a version and the fields, written by the host side of the vCPU."""

    info: PvclockInfo

    def read_version(self) -> int:
        return self.info.version

    def read_fields(self) -> PvclockInfo:
        return self.info

    def publish(self, info: PvclockInfo) -> None:
        self.info = info


class Kvmclock:
    """``kvm_clock_read``: guest CLOCK_MONOTONIC from the TSC and the pvclock page.

    Args:
        page: the published time info.
        rdtsc: the guest's TSC read (no exit).
    """

    def __init__(self, page: PvclockPage, rdtsc: Callable[[], int]) -> None:
        self.page = page
        self.rdtsc = rdtsc
        self.last = 0
        self.retries = 0
        self.clamped = 0

    def read(self) -> int:
        while True:
            version = self.page.read_version() & ~1
            info = self.page.read_fields()
            tsc = self.rdtsc()
            if self.page.read_version() == version:
                break
            self.retries += 1  # odd (update in progress) or changed: read again
        now = info.ktime(tsc)
        if info.flags & PVCLOCK_TSC_STABLE_BIT:
            return now
        # not stable: never return less than what any reader already saw
        if now < self.last:
            self.clamped += 1
            return self.last
        self.last = now
        return now
