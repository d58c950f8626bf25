"""kvmclock MSRs, the PV timer's delta variant and statistics, and the VMI alarm, with
integer time.  (The absolute set_next_ktime path is covered by test_machine.py.)"""

from __future__ import annotations

import pytest
from guestlike import GuestLikeMachine
from hypothesis import given, settings
from hypothesis import strategies as st

from vtick.host.devices.kvmclock import KvmClock, WallClock
from vtick.host.devices.pvtimer import PvTimer, s64
from vtick.host.devices.vmi_alarm import VmiAlarm, host_ns_for_tsc
from vtick.host.machine import ExitResult, InjectIrq
from vtick.proto import messages as m
from vtick.proto.abi import (
    ETIME,
    PV_TIMER_FUTURE,
    VMI_ALARM_PERIODIC,
    Fault,
    Feature,
    Hypercall,
    KvmErrno,
    Msr,
)
from vtick.proto.pvclock import TscModel

T0 = 1_000_000_000
ALL = Feature.PVCLOCK | Feature.PV_TIMER | Feature.VMI
DELTA = Hypercall.VTICK_SET_NEXT_DELTA
KTIME = Hypercall.VTICK_SET_NEXT_KTIME
STOP = Hypercall.VTICK_TIMER_SHUTDOWN
ALARM = Hypercall.VTICK_VMI_SET_ALARM
CANCEL = Hypercall.VTICK_VMI_CANCEL_ALARM
SYSTEM_TIME = Msr.MSR_KVM_SYSTEM_TIME_NEW
WALL_CLOCK = Msr.MSR_KVM_WALL_CLOCK_NEW
REALTIME_OFFSET = 1_700_000_000_123_456_789  # CLOCK_REALTIME - CLOCK_MONOTONIC


class Rig:
    """A machine with every device of this module plugged in."""

    def __init__(self, vcpus: int = 2, tsc_khz: int = 2_500_000, features: int = ALL) -> None:
        self.tsc = TscModel(tsc_khz=tsc_khz, tsc_epoch=T0 // 2, ktime_epoch=T0 // 4)
        self.machine = GuestLikeMachine(vcpus, self.tsc, now=T0)
        for state in self.machine.vcpus:
            state.features = int(features)
        self.kvmclock = KvmClock(self.machine, realtime_offset_ns=REALTIME_OFFSET)
        self.pv = PvTimer(self.machine)
        self.kvmclock.add_listener(self.pv.on_republish)
        self.vmi = VmiAlarm(self.machine)
        self.seq = 0

    def exit(self, msg: m.Message, now: int, vcpu: int = 0) -> ExitResult:
        self.seq += 1
        return self.machine.handle_exit(vcpu, self.seq, msg, now, False)

    def call(self, nr: int, args: list[int], now: int, vcpu: int = 0) -> int:
        return self.exit(m.ExitHypercall(nr=nr, args=list(args)), now, vcpu).value

    def wrmsr(self, msr: int, value: int, now: int, vcpu: int = 0) -> ExitResult:
        return self.exit(m.ExitMsrWrite(msr=msr, value=value), now, vcpu)

    def rdmsr(self, msr: int, now: int, vcpu: int = 0) -> ExitResult:
        return self.exit(m.ExitMsrRead(msr=msr), now, vcpu)

    def ktime(self, host_ns: int, vcpu: int = 0) -> int:
        """Guest ktime at ``host_ns`` as the guest reads it through its current pvclock."""
        return self.machine.vcpus[vcpu].pvclock.ktime(self.tsc.tsc(host_ns))

    def armed(self, name: str, vcpu: int = 0) -> int | None:
        return self.machine.hrtimers.expiry((name, vcpu))


# ====================================================================== kvmclock


@pytest.mark.parametrize(
    "msr",
    [Msr.MSR_KVM_SYSTEM_TIME_NEW, Msr.MSR_KVM_WALL_CLOCK_NEW, 0x12, 0x11],
)
def test_kvmclock_msrs_gp_without_pvclock(msr):
    """Without Feature.PVCLOCK every kvmclock MSR raises #GP and changes nothing."""
    rig = Rig(features=Feature.PV_TIMER)
    before = rig.machine.vcpus[0].pvclock
    assert rig.wrmsr(msr, 0x1000 | 1, T0).fault == Fault.GP
    assert rig.rdmsr(msr, T0).fault == Fault.GP
    assert rig.machine.vcpus[0].pvclock == before
    assert rig.kvmclock.pending_publications == []
    assert rig.kvmclock.wall_clock is None
    assert sum(rig.machine.faults.values()) == 2


def test_enable_publishes_even_version_bumped_by_two():
    """Writing SYSTEM_TIME_NEW with bit 0 publishes machine.tsc.publish(now, version + 2)."""
    rig = Rig()
    now = T0 + 123_456
    old = rig.machine.vcpus[0].pvclock
    assert rig.wrmsr(SYSTEM_TIME, 0x7000 | 1, now) == ExitResult()
    new = rig.machine.vcpus[0].pvclock
    assert new == rig.tsc.publish(now, old.version + 2)
    assert new.version % 2 == 0
    assert new.tsc_timestamp == rig.tsc.tsc(now)
    assert new.system_time == now - rig.tsc.ktime_epoch
    assert rig.kvmclock.take_publications() == [0]
    assert rig.kvmclock.take_publications() == []
    assert rig.machine.vcpus[1].pvclock == old  # per vCPU
    assert rig.rdmsr(SYSTEM_TIME, now).value == 0x7001
    assert rig.rdmsr(SYSTEM_TIME, now, vcpu=1).value == 0


def test_republish_only_while_enabled_and_versions_stay_even():
    rig = Rig()
    vcpu = rig.machine.vcpus[0]
    assert not rig.kvmclock.republish(vcpu, T0 + 1)  # never enabled
    assert vcpu.pvclock.version == 2
    rig.wrmsr(SYSTEM_TIME, 0x1001, T0 + 10)
    versions = [vcpu.pvclock.version]
    for i in range(5):
        assert rig.kvmclock.republish(vcpu, T0 + 100 * (i + 1))
        versions.append(vcpu.pvclock.version)
    assert versions == [4, 6, 8, 10, 12, 14]
    assert rig.kvmclock.take_publications() == [0]  # queued once until drained
    assert rig.kvmclock.publications[0] == 6
    rig.wrmsr(SYSTEM_TIME, 0x1000, T0 + 1_000)  # bit 0 clear: stop updates
    frozen = vcpu.pvclock
    assert not rig.kvmclock.republish(vcpu, T0 + 2_000)
    assert vcpu.pvclock == frozen
    assert rig.kvmclock.take_publications() == []
    assert rig.rdmsr(SYSTEM_TIME, T0).value == 0x1000  # reads return the last write


def test_version_wraps_as_u32_and_stays_even():
    rig = Rig()
    vcpu = rig.machine.vcpus[0]
    vcpu.pvclock = rig.tsc.publish(T0, 2**32 - 2)
    rig.wrmsr(SYSTEM_TIME, 1, T0 + 5)
    assert vcpu.pvclock.version == 0


def test_legacy_aliases_share_storage():
    """MSR 0x12 and 0x4B564D01 (and 0x11 / 0x4B564D00) are one register each."""
    rig = Rig()
    rig.wrmsr(Msr.MSR_KVM_SYSTEM_TIME, 0x2001, T0 + 1)
    assert rig.rdmsr(SYSTEM_TIME, T0 + 2).value == 0x2001
    assert rig.kvmclock.take_publications() == [0]
    rig.wrmsr(Msr.MSR_KVM_WALL_CLOCK, 0x3000, T0 + 3)
    assert rig.rdmsr(WALL_CLOCK, T0 + 4).value == 0x3000


def test_republish_all_skips_disabled_vcpus():
    rig = Rig(vcpus=3)
    rig.wrmsr(SYSTEM_TIME, 1, T0 + 1, vcpu=2)
    rig.wrmsr(SYSTEM_TIME, 1, T0 + 1, vcpu=0)
    rig.kvmclock.take_publications()
    assert rig.kvmclock.republish_all(T0 + 50) == [0, 2]
    assert rig.kvmclock.take_publications() == [0, 2]
    assert rig.machine.vcpus[1].pvclock.version == 2


def test_wall_clock_is_boot_time_recorded_at_write():
    """Each WALL_CLOCK write records realtime at guest ktime 0, version +2 per write."""
    rig = Rig()
    now = T0 + 777
    assert rig.wrmsr(WALL_CLOCK, 0x9000, now) == ExitResult()
    boot = REALTIME_OFFSET + rig.tsc.ktime_epoch
    expect = WallClock(version=2, sec=boot // 10**9, nsec=boot % 10**9)
    assert rig.kvmclock.wall_clock == expect
    rig.wrmsr(WALL_CLOCK, 0x9000, now + 10**9)
    assert rig.kvmclock.wall_clock == WallClock(4, expect.sec, expect.nsec)
    assert rig.rdmsr(WALL_CLOCK, now).value == 0x9000
    assert rig.kvmclock.pending_publications == []  # not a pvclock publication


@settings(max_examples=80, deadline=None)
@given(
    tsc_khz=st.integers(1_000, 5_000_000),
    t1=st.integers(0, 10**9),
    t2=st.integers(0, 10**10),
    delta=st.integers(1, 10**9),
)
def test_republish_rearms_pv_timer_never_early(tsc_khz, t1, t2, delta):
    """A PV timer armed through one publication is re-derived through the next one, so it
    never fires before the guest's reading of the *new* pvclock reaches the expiry."""
    rig = Rig(vcpus=1, tsc_khz=tsc_khz)
    rig.wrmsr(SYSTEM_TIME, 1, T0)
    armed_at = T0 + t1
    expiry = rig.ktime(armed_at) + delta
    assert rig.call(KTIME, [expiry], armed_at) == 0
    h_old = rig.armed("pvtimer")
    assert h_old is not None
    republish_at = armed_at + t2 % (h_old - armed_at)  # while it is still armed
    rig.kvmclock.republish(rig.machine.vcpus[0], republish_at)
    h = rig.armed("pvtimer")
    if h is None:  # re-derived as already due: fired at the republish
        assert rig.machine.take_actions() == [InjectIrq(0, 0xEC, republish_at)]
        assert rig.ktime(republish_at) >= expiry
        return
    assert rig.ktime(h) >= expiry > rig.ktime(h - 1)
    assert rig.pv.stats[0].rearmed == 1


# ====================================================================== PV timer: delta


def test_delta_arms_relative_to_host_now_in_guest_ktime():
    rig = Rig()
    now = T0 + 5_000
    assert rig.call(DELTA, [250_000, 0], now) == 0
    h = rig.armed("pvtimer")
    expiry = rig.ktime(now) + 250_000
    assert h == rig.tsc.host_ns_for_ktime(rig.machine.vcpus[0].pvclock, expiry)
    assert rig.ktime(h) >= expiry > rig.ktime(h - 1)
    rig.machine.on_timer(h)
    assert rig.machine.take_actions() == [InjectIrq(0, 0xEC, h)]
    stats = rig.pv.stats[0]
    assert (stats.programs, stats.delta_programs, stats.fires) == (1, 1, 1)


def test_delta_is_late_by_the_preemption_but_absolute_is_not():
    """DESIGN.md section 1: a delta computed at t and delivered at t+P fires P late."""
    rig = Rig()
    t, preempted = T0 + 1_000, 300_000
    want = rig.ktime(t) + 1_000_000  # the guest wants an event 1 ms after t
    rig.call(DELTA, [1_000_000], t + preempted, vcpu=0)
    rig.call(KTIME, [want], t + preempted, vcpu=1)
    late = rig.ktime(rig.armed("pvtimer", 0)) - want
    on_time = rig.ktime(rig.armed("pvtimer", 1), vcpu=1) - want
    assert preempted - 2 <= late <= preempted + 2
    assert 0 <= on_time <= 2


@pytest.mark.parametrize("delta", [0, -1, -(10**9), 2**63])
def test_delta_not_positive_fires_at_once_or_etime(delta):
    """delta <= 0 (u64 read as s64) is "already due": fire in the exit, or -ETIME with the flag."""
    rig = Rig()
    now = T0 + 9_000
    arg = delta & (2**64 - 1)
    assert s64(arg) == (delta if delta < 2**63 else delta - 2**64)
    assert rig.call(DELTA, [arg, PV_TIMER_FUTURE], now) == -ETIME
    assert rig.machine.take_actions() == []
    assert rig.pv.stats[0].etime == 1
    assert rig.call(DELTA, [arg, 0], now) == 0
    assert rig.machine.take_actions() == [InjectIrq(0, 0xEC, now)]
    assert rig.armed("pvtimer") is None
    assert rig.pv.stats[0].immediate == 1


def test_etime_keeps_the_previous_expiry_armed():
    """A refused (-ETIME) program changes nothing: the old expiry still fires."""
    rig = Rig()
    rig.call(DELTA, [1_000_000], T0)
    h = rig.armed("pvtimer")
    assert rig.call(KTIME, [0, PV_TIMER_FUTURE], T0 + 10) == -ETIME
    assert rig.armed("pvtimer") == h


def test_reprogramming_replaces_and_is_counted():
    rig = Rig()
    rig.call(DELTA, [5_000_000], T0)
    rig.call(DELTA, [1_000_000], T0)  # replaces
    rig.call(KTIME, [rig.ktime(T0) + 2_000_000], T0)  # replaces
    h = rig.armed("pvtimer")
    assert rig.ktime(h) >= rig.ktime(T0) + 2_000_000
    rig.machine.on_timer(T0 + 10**9)
    assert rig.machine.take_actions() == [InjectIrq(0, 0xEC, T0 + 10**9)]
    s = rig.pv.stats[0]
    assert (s.programs, s.replaced, s.fires, s.delta_programs) == (3, 2, 1, 2)
    assert rig.pv.fired == 1


def test_shutdown_cancels_delta_timer_and_counts():
    rig = Rig()
    rig.call(DELTA, [1_000], T0)
    assert rig.call(STOP, [0], T0) == 0
    assert rig.call(STOP, [0], T0) == 0
    rig.machine.on_timer(T0 + 10**9)
    assert rig.machine.take_actions() == []
    s = rig.pv.stats[0]
    assert (s.shutdowns, s.cancelled, s.fires) == (2, 1, 0)


@pytest.mark.parametrize("args", [[], [100, 2], [100, 1 << 63]])
def test_delta_bad_args_einval(args):
    rig = Rig()
    assert rig.call(DELTA, args, T0) == -KvmErrno.KVM_EINVAL
    assert rig.armed("pvtimer") is None
    assert rig.pv.stats[0].einval == 1


def test_delta_needs_pv_timer():
    rig = Rig(features=Feature.PVCLOCK | Feature.VMI)
    assert rig.call(DELTA, [1_000], T0) == -KvmErrno.KVM_ENOSYS
    assert rig.call(DELTA, [0], T0) == -KvmErrno.KVM_ENOSYS
    assert rig.machine.take_actions() == []


def test_pv_timer_stats_are_per_vcpu():
    rig = Rig()
    rig.call(DELTA, [1_000], T0, vcpu=1)
    assert rig.pv.stats[0].programs == 0
    assert rig.pv.stats[1].programs == 1


@settings(max_examples=150, deadline=None)
@given(
    tsc_khz=st.integers(1_000, 5_000_000),
    after=st.integers(0, 10**10),
    delta=st.integers(1, 10**10),
    republished=st.booleans(),
)
def test_delta_never_fires_early(tsc_khz, after, delta, republished):
    """The host timer for a delta runs only once the guest reads ktime >= ktime(now) + delta,
    and not a nanosecond later than the first such host ns."""
    rig = Rig(vcpus=1, tsc_khz=tsc_khz)
    now = T0 + after
    if republished:
        rig.wrmsr(SYSTEM_TIME, 1, now - after // 3)
    expiry = rig.ktime(now) + delta
    assert rig.call(DELTA, [delta], now) == 0
    h = rig.armed("pvtimer")
    assert h is not None
    assert h > now
    assert rig.ktime(h) >= expiry > rig.ktime(h - 1)


# ====================================================================== VMI alarm


def test_vmi_needs_the_feature():
    rig = Rig(features=Feature.PVCLOCK | Feature.PV_TIMER)
    deadline = rig.tsc.tsc(T0) + 1_000
    assert rig.call(ALARM, [deadline, 0, 0], T0) == -KvmErrno.KVM_ENOSYS
    assert rig.call(ALARM, [0, 0, 0], T0) == -KvmErrno.KVM_ENOSYS
    assert rig.call(CANCEL, [], T0) == -KvmErrno.KVM_ENOSYS
    assert rig.machine.next_deadline() is None
    assert rig.machine.take_actions() == []


def test_oneshot_alarm_fires_once_at_the_first_ns_of_the_deadline():
    rig = Rig()
    deadline = rig.tsc.tsc(T0) + 2_500_000  # 1 ms at 2.5 GHz
    assert rig.call(ALARM, [deadline, 0], T0) == 0
    h = rig.armed("vmi-alarm")
    assert h == host_ns_for_tsc(rig.tsc, deadline)
    assert rig.tsc.tsc(h) >= deadline > rig.tsc.tsc(h - 1)
    assert rig.vmi.deadline(0) == deadline
    rig.machine.on_timer(h - 1)
    assert rig.machine.take_actions() == []
    rig.machine.on_timer(h)
    assert rig.machine.take_actions() == [InjectIrq(0, 0xEC, h)]
    rig.machine.on_timer(h + 10**12)
    assert rig.machine.take_actions() == []
    assert rig.vmi.deadline(0) is None
    assert rig.vmi.stats[0].fires == 1


def test_past_deadline_fires_in_the_exit():
    rig = Rig()
    now = T0 + 10_000
    for deadline in (rig.tsc.tsc(now), rig.tsc.tsc(now) - 1, 0):
        assert rig.call(ALARM, [deadline], now) == 0
        assert rig.machine.take_actions() == [InjectIrq(0, 0xEC, now)]
        assert rig.armed("vmi-alarm") is None
    assert rig.vmi.stats[0].immediate == 3


def test_alarm_reprogram_replaces_and_cancel_reports_pending():
    rig = Rig()
    base = rig.tsc.tsc(T0)
    rig.call(ALARM, [base + 10_000_000], T0)
    rig.call(ALARM, [base + 1_000_000], T0)
    assert rig.vmi.deadline(0) == base + 1_000_000
    rig.machine.on_timer(T0 + 10**9)
    assert rig.machine.take_actions() == [InjectIrq(0, 0xEC, T0 + 10**9)]
    assert rig.vmi.stats[0].replaced == 1
    assert rig.call(CANCEL, [], T0 + 10**9) == 0  # nothing pending
    rig.call(ALARM, [base + 10**12], T0 + 10**9)
    assert rig.call(CANCEL, [], T0 + 10**9) == 1
    assert rig.machine.next_deadline() is None
    rig.machine.on_timer(T0 + 10**13)
    assert rig.machine.take_actions() == []
    s = rig.vmi.stats[0]
    assert (s.cancels, s.cancelled, s.fires) == (2, 1, 1)


def test_periodic_alarm_is_drift_free():
    rig = Rig()
    d0, period = rig.tsc.tsc(T0) + 1_000, 2_500_000  # 1 ms
    assert rig.call(ALARM, [d0, VMI_ALARM_PERIODIC, period], T0) == 0
    fired = []
    injected = 0
    for _ in range(10):
        h = rig.machine.next_deadline()
        rig.machine.on_timer(h)
        fired.append(h)
        injected += len(rig.machine.take_actions())  # the guest handles and EOIs each
    assert fired == [host_ns_for_tsc(rig.tsc, d0 + k * period) for k in range(10)]
    assert injected == 10
    assert rig.vmi.deadline(0) == d0 + 10 * period
    assert rig.vmi.stats[0].overruns == 0


def test_periodic_alarm_late_host_coalesces_and_keeps_phase():
    rig = Rig()
    d0, period = rig.tsc.tsc(T0) + 1_000, 2_500_000
    rig.call(ALARM, [d0, VMI_ALARM_PERIODIC, period], T0)
    late = host_ns_for_tsc(rig.tsc, d0 + 3 * period + period // 2)
    rig.machine.on_timer(late)
    assert rig.machine.take_actions() == [InjectIrq(0, 0xEC, late)]
    assert rig.vmi.stats[0].overruns == 3
    assert rig.vmi.deadline(0) == d0 + 4 * period
    assert rig.call(CANCEL, [], late) == 1
    assert rig.machine.next_deadline() is None


def test_periodic_alarm_period_is_clamped_to_200us():
    rig = Rig(tsc_khz=2_500_000)
    d0 = rig.tsc.tsc(T0) + 1
    rig.call(ALARM, [d0, VMI_ALARM_PERIODIC, 1_000], T0)
    rig.machine.on_timer(rig.machine.next_deadline())
    assert rig.vmi.deadline(0) == d0 + 500_000  # 200 µs at 2.5 GHz
    assert rig.vmi.stats[0].clamped == 1


@pytest.mark.parametrize(
    "args", [[], [1_000, 2], [1_000, 1 << 40], [1_000, VMI_ALARM_PERIODIC, 0], [1_000, 1]]
)
def test_alarm_bad_args_einval(args):
    """Unknown flags, or periodic without a period, are -EINVAL and leave nothing armed."""
    rig = Rig()
    assert rig.call(ALARM, args, T0) == -KvmErrno.KVM_EINVAL
    assert rig.armed("vmi-alarm") is None
    assert rig.vmi.stats[0].einval == 1


def test_alarm_and_pv_timer_are_independent_timers():
    rig = Rig()
    rig.call(ALARM, [rig.tsc.tsc(T0) + 5_000], T0)
    rig.call(DELTA, [3_000], T0)
    rig.call(ALARM, [rig.tsc.tsc(T0) + 5_000], T0, vcpu=1)
    rig.machine.on_timer(T0 + 10**6)
    actions = rig.machine.take_actions()
    assert sorted((a.vcpu, a.vector) for a in actions if isinstance(a, InjectIrq)) == [
        (0, 0xEC),
        (0, 0xEC),
        (1, 0xEC),
    ]


@settings(max_examples=200, deadline=None)
@given(
    tsc_khz=st.integers(1, 6_000_000),
    epoch=st.integers(-(10**12), 10**12),
    deadline=st.integers(0, 2**64 - 1),
)
def test_host_ns_for_tsc_is_the_earliest_ns(tsc_khz, epoch, deadline):
    """host_ns_for_tsc(D) is exactly the first host ns at which the guest TSC reads >= D."""
    model = TscModel(tsc_khz=tsc_khz, tsc_epoch=epoch, ktime_epoch=0)
    t = host_ns_for_tsc(model, deadline)
    assert model.tsc(t) >= deadline > model.tsc(t - 1)


@settings(max_examples=150, deadline=None)
@given(
    tsc_khz=st.integers(1_000, 6_000_000),
    after=st.integers(0, 10**10),
    ahead=st.integers(1, 10**10),
    period=st.integers(0, 10**8),
    late=st.integers(0, 10**7),
)
def test_vmi_alarm_never_fires_early(tsc_khz, after, ahead, period, late):
    """Every interrupt of a one-shot or periodic alarm is raised at a host time whose guest
    TSC has reached that firing's deadline."""
    rig = Rig(vcpus=1, tsc_khz=tsc_khz)
    now = T0 + after
    d0 = rig.tsc.tsc(now) + ahead
    flags = VMI_ALARM_PERIODIC if period else 0
    assert rig.call(ALARM, [d0, flags, period], now) == 0
    for _ in range(4):
        deadline = rig.vmi.deadline(0)
        h = rig.machine.next_deadline()
        if deadline is None:
            assert h is None
            break
        assert h is not None
        assert rig.tsc.tsc(h) >= deadline > rig.tsc.tsc(h - 1)
        rig.machine.on_timer(h - 1)
        assert rig.machine.take_actions() == []
        rig.machine.on_timer(h + late)
        assert rig.machine.take_actions() == [InjectIrq(0, 0xEC, h + late)]
