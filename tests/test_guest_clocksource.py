"""Guest kvmclock: the version seqlock, the monotonic clamp, the pvclock scaling."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st
from inproc import T0, InProcVm

from vtick.guest.clocksource import Kvmclock, PvclockPage
from vtick.proto.pvclock import PVCLOCK_TSC_STABLE_BIT, PvclockInfo, TscModel

TSC = TscModel(tsc_khz=2_500_000, tsc_epoch=0, ktime_epoch=0)


def unstable(info: PvclockInfo) -> PvclockInfo:
    return dataclasses.replace(info, flags=info.flags & ~PVCLOCK_TSC_STABLE_BIT)


class ScriptedPage(PvclockPage):
    """A page whose version reads follow a script (what a concurrent host update looks
    like from the reader); ``updates[i]`` is published right after the i-th version read."""

    def __init__(self, info: PvclockInfo, versions: list[int], updates=None) -> None:
        super().__init__(info)
        self.versions = list(versions)
        self.updates = dict(updates or {})
        self.version_reads = 0
        self.field_reads = 0

    def read_version(self) -> int:
        self.version_reads += 1
        v = self.versions.pop(0) if self.versions else self.info.version
        if self.version_reads in self.updates:
            self.info = self.updates[self.version_reads]
        return v

    def read_fields(self) -> PvclockInfo:
        self.field_reads += 1
        return self.info


class Tsc:
    def __init__(self, value: int) -> None:
        self.value = value

    def __call__(self) -> int:
        return self.value


def test_odd_version_forces_a_retry():
    info = TSC.publish(1_000_000, version=4)
    # update in progress: 5 (odd) then 5 again -> masked 4 != 5: retry; then 6, 6
    page = ScriptedPage(info, [5, 5, 6, 6])
    clock = Kvmclock(page, Tsc(5_000_000))
    assert clock.read() == info.ktime(5_000_000)
    assert clock.retries == 1
    assert page.version_reads == 4
    assert page.field_reads == 2


def test_version_that_stays_odd_keeps_retrying():
    info = TSC.publish(1_000_000, version=4)
    page = ScriptedPage(info, [7, 7, 7, 7, 7, 7, 8, 8])
    clock = Kvmclock(page, Tsc(5_000_000))
    clock.read()
    assert clock.retries == 3


def test_version_change_between_the_two_reads_forces_a_retry_and_uses_the_new_fields():
    old = TSC.publish(1_000_000, version=2)
    new = dataclasses.replace(TSC.publish(2_000_000, version=4), system_time=2_000_500)
    # the host re-publishes between the reader's field read and its second version read
    page = ScriptedPage(old, [2, 4, 4, 4], updates={1: new})
    clock = Kvmclock(page, Tsc(10_000_000))
    assert clock.read() == new.ktime(10_000_000)
    assert clock.retries == 1


def test_stable_pages_never_retry():
    page = PvclockPage(TSC.publish(0, version=2))
    clock = Kvmclock(page, Tsc(0))
    for tsc in range(0, 10**7, 999_983):
        clock.rdtsc = Tsc(tsc)
        assert clock.read() == page.info.ktime(tsc)
    assert clock.retries == 0


def test_monotonic_clamp_without_tsc_stable():
    first = unstable(TSC.publish(1_000_000, version=2))
    page = PvclockPage(first)
    tsc = Tsc(TSC.tsc(2_000_000))
    clock = Kvmclock(page, tsc)
    seen = clock.read()
    assert seen == first.ktime(tsc.value)
    # a re-publication whose system_time is 3 us behind: the same TSC reads earlier
    back = dataclasses.replace(first, version=4, system_time=first.system_time - 3_000)
    page.publish(back)
    assert back.ktime(tsc.value) < seen
    assert clock.read() == seen  # clamped to the last value returned
    assert clock.clamped == 1
    # once the new clock has passed the old value, it is returned as is
    tsc.value += 2_500 * 4  # 4 us later
    assert clock.read() == back.ktime(tsc.value) > seen
    assert clock.clamped == 1


def test_tsc_stable_pages_are_not_clamped():
    """With TSC_STABLE the guest trusts the page (Linux skips the last_value cmpxchg)."""
    first = TSC.publish(1_000_000, version=2)
    page = PvclockPage(first)
    tsc = Tsc(TSC.tsc(2_000_000))
    clock = Kvmclock(page, tsc)
    seen = clock.read()
    back = dataclasses.replace(first, version=4, system_time=first.system_time - 3_000)
    page.publish(back)
    assert clock.read() == back.ktime(tsc.value) < seen
    assert clock.clamped == 0


@settings(max_examples=300)
@given(
    khz=st.integers(1_000, 5_000_000),
    epoch=st.integers(0, 10**15),
    published=st.integers(0, 10**12),
    later=st.lists(st.integers(0, 10**11), min_size=1, max_size=10),
    stable=st.booleans(),
)
def test_read_equals_pvclock_ktime(khz, epoch, published, later, stable):
    """Without concurrent updates kvmclock is exactly PvclockInfo.ktime of the TSC, and
    successive reads never go backwards."""
    model = TscModel(tsc_khz=khz, tsc_epoch=epoch, ktime_epoch=epoch)
    info = model.publish(epoch + published, version=2)
    if not stable:
        info = unstable(info)
    tsc = Tsc(0)
    clock = Kvmclock(PvclockPage(info), tsc)
    last = None
    for dt in sorted(later):
        tsc.value = model.tsc(epoch + published + dt)
        now = clock.read()
        assert now == info.ktime(tsc.value)
        assert last is None or now >= last
        last = now
    assert clock.retries == clock.clamped == 0


def test_harness_guest_clock_follows_host_time():
    """In the in-process VM, guest ktime is host time since VM start (same machine)."""
    vm = InProcVm(2, "pv-ktime")
    vm.boot_all()
    for step in (0, 1, 7_777, 1_000_000, 123_456_789):
        vm.advance(step)
        for cpu in (0, 1):
            assert abs(vm.ktime(cpu) - (vm.now - T0)) <= 1
    # the kvmclock MSR write re-published each vCPU's page (version bumped by 2)
    assert [ctx.page.info.version for ctx in vm.vcpus] == [4, 4]
