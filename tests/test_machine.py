"""Machine exit dispatch, HLT blocking and wake-ups, and the PV timer device, with integer time."""

from __future__ import annotations

import pytest
from guestlike import GuestLikeMachine
from hypothesis import given, settings
from hypothesis import strategies as st

from vtick.host.devices.pvtimer import PvTimer
from vtick.host.machine import CompleteHlt, ExitResult, InjectIrq, Machine
from vtick.proto import messages as m
from vtick.proto.abi import ETIME, PV_TIMER_FUTURE, Fault, Feature, Hypercall, KvmErrno, Vector
from vtick.proto.pvclock import TscModel

T0 = 1_000_000_000  # host ns when the machine is created
SET = Hypercall.VTICK_SET_NEXT_KTIME
STOP = Hypercall.VTICK_TIMER_SHUTDOWN


def make(vcpus: int = 2, tsc_khz: int = 2_500_000, features: int = Feature.PV_TIMER):
    """A machine whose vCPUs negotiated ``features``, with the PV timer device plugged in."""
    tsc = TscModel(tsc_khz=tsc_khz, tsc_epoch=T0 // 2, ktime_epoch=T0 // 4)
    machine = GuestLikeMachine(vcpus, tsc, now=T0)
    for state in machine.vcpus:
        state.features = int(features)
    return machine, PvTimer(machine)


def ktime_at(machine: Machine, vcpu: int, host_ns: int) -> int:
    """Guest ktime of ``vcpu`` at host time ``host_ns``, as the guest reads it."""
    return machine.vcpus[vcpu].pvclock.ktime(machine.tsc.tsc(host_ns))


def hypercall(machine, nr, args, now, vcpu=0, seq=1) -> ExitResult:
    return machine.handle_exit(vcpu, seq, m.ExitHypercall(nr=nr, args=list(args)), now, False)


def armed(machine, vcpu=0):
    return machine.hrtimers.expiry(("pvtimer", vcpu))


# ---------------------------------------------------------------- PV timer


def test_set_next_ktime_arms_host_timer_at_the_right_time():
    """The host timer is armed at the earliest host ns at which the guest reads >= expiry."""
    machine, _ = make()
    now = T0 + 1_000
    expiry = ktime_at(machine, 0, now) + 250_000
    assert hypercall(machine, SET, [expiry], now) == ExitResult(value=0)
    h = armed(machine)
    assert h == machine.tsc.host_ns_for_ktime(machine.vcpus[0].pvclock, expiry)
    assert ktime_at(machine, 0, h) >= expiry > ktime_at(machine, 0, h - 1)
    assert now + 249_990 <= h <= now + 250_010
    assert machine.next_deadline() == h
    assert machine.take_actions() == []


def test_on_timer_injects_local_timer_vector_once():
    """Expiry injects vector 0xEC exactly once, not a nanosecond early, not again later."""
    machine, pv = make()
    expiry = ktime_at(machine, 0, T0) + 1_000_000
    hypercall(machine, SET, [expiry], T0)
    h = armed(machine)
    machine.on_timer(h - 1)
    assert machine.take_actions() == []
    machine.on_timer(h)
    assert machine.take_actions() == [InjectIrq(0, Vector.LOCAL_TIMER, h)]
    assert Vector.LOCAL_TIMER == 0xEC
    assert pv.fired == 1
    assert machine.vcpus[0].injected == 1
    machine.on_timer(h + 10**12)
    assert machine.take_actions() == []
    assert machine.next_deadline() is None


def test_reprogram_replaces_previous_expiry():
    """A second set_next_ktime replaces the first: one interrupt, at the new time."""
    machine, pv = make()
    base = ktime_at(machine, 0, T0)
    hypercall(machine, SET, [base + 5_000_000], T0)
    hypercall(machine, SET, [base + 2_000_000], T0)
    h = armed(machine)
    machine.on_timer(h + 10_000_000)
    assert machine.take_actions() == [InjectIrq(0, 0xEC, h + 10_000_000)]
    assert pv.fired == 1


def test_timers_are_per_vcpu():
    """Each vCPU has its own one-shot timer; expiry injects into the vCPU that armed it."""
    machine, _ = make()
    base = ktime_at(machine, 0, T0)
    hypercall(machine, SET, [base + 3_000], T0, vcpu=1)
    hypercall(machine, SET, [base + 2_000], T0, vcpu=0)
    h0, h1 = armed(machine, 0), armed(machine, 1)
    assert h0 < h1
    machine.on_timer(h1)
    assert machine.take_actions() == [InjectIrq(0, 0xEC, h1), InjectIrq(1, 0xEC, h1)]


def test_past_expiry_fires_at_once():
    """Without PV_TIMER_FUTURE a reached expiry fires in the same exit; the old one is cancelled."""
    machine, pv = make()
    now = T0 + 5_000_000
    hypercall(machine, SET, [ktime_at(machine, 0, now) + 10**9], T0)
    for expiry in (ktime_at(machine, 0, now), ktime_at(machine, 0, now) - 1_000, 0):
        assert hypercall(machine, SET, [expiry, 0], now).value == 0
        assert machine.take_actions() == [InjectIrq(0, 0xEC, now)]
        assert armed(machine) is None
    assert pv.fired == 3
    machine.on_timer(now + 2 * 10**9)
    assert machine.take_actions() == []


def test_past_expiry_with_future_flag_is_etime():
    """With PV_TIMER_FUTURE a past expiry returns -ETIME (-62) and injects nothing."""
    machine, pv = make()
    now = T0 + 5_000_000
    for expiry in (ktime_at(machine, 0, now), ktime_at(machine, 0, now) - 1, 0):
        assert hypercall(machine, SET, [expiry, PV_TIMER_FUTURE], now).value == -ETIME == -62
    assert machine.take_actions() == []
    assert armed(machine) is None
    assert pv.fired == 0
    future = ktime_at(machine, 0, now) + 1_000
    assert hypercall(machine, SET, [future, PV_TIMER_FUTURE], now).value == 0
    assert armed(machine) is not None


@pytest.mark.parametrize("args", [[], [123, 2], [123, 1 << 63], [123, 3]])
def test_bad_args_are_einval(args):
    """No expiry, or unknown flag bits, is -EINVAL (-22) and arms nothing."""
    machine, _ = make()
    now = T0 + 1
    args = [ktime_at(machine, 0, now) + 10**6 if a == 123 else a for a in args]
    assert hypercall(machine, SET, args, now).value == -KvmErrno.KVM_EINVAL == -22
    assert armed(machine) is None
    assert machine.take_actions() == []


def test_pv_timer_needs_the_feature():
    """Without Feature.PV_TIMER negotiated both hypercalls answer -KVM_ENOSYS and arm nothing."""
    machine, pv = make(features=Feature.PVCLOCK)
    expiry = ktime_at(machine, 0, T0) + 10**6
    assert hypercall(machine, SET, [expiry], T0).value == -KvmErrno.KVM_ENOSYS
    assert hypercall(machine, SET, [0], T0).value == -KvmErrno.KVM_ENOSYS  # even a past one
    assert hypercall(machine, STOP, [0], T0).value == -KvmErrno.KVM_ENOSYS
    assert machine.next_deadline() is None
    assert machine.take_actions() == []
    assert pv.fired == 0


def test_timer_shutdown_disarms():
    """VTICK_TIMER_SHUTDOWN cancels the pending expiry."""
    machine, pv = make()
    hypercall(machine, SET, [ktime_at(machine, 0, T0) + 10**6], T0)
    assert hypercall(machine, STOP, [0], T0).value == 0
    assert machine.next_deadline() is None
    machine.on_timer(T0 + 10**10)
    assert machine.take_actions() == []
    assert pv.fired == 0


@settings(max_examples=100, deadline=None)
@given(
    tsc_khz=st.integers(1_000, 5_000_000),
    after=st.integers(0, 10**9),
    delta=st.integers(1, 10**9),
)
def test_pvtimer_never_fires_before_guest_expiry(tsc_khz, after, delta):
    """When the host timer runs, the guest's own ktime has reached the expiry it asked for."""
    machine, _ = make(vcpus=1, tsc_khz=tsc_khz)
    now = T0 + after
    expiry = ktime_at(machine, 0, now) + delta
    hypercall(machine, SET, [expiry], now)
    h = armed(machine)
    if h is None:  # fired at once: must really be due
        assert ktime_at(machine, 0, now) >= expiry
        return
    assert ktime_at(machine, 0, h) >= expiry, f"host timer at {h} fires before guest expiry"


# ---------------------------------------------------------------- default exit handling


def test_unknown_hypercall_is_enosys():
    """A hypercall nobody registered returns -KVM_ENOSYS (-1000) and is counted."""
    machine, _ = make()
    assert hypercall(machine, 0x1234, [1, 2], T0) == ExitResult(value=-1000)
    assert machine.vcpus[0].unclaimed["hypercall 0x1234"] == 1


def test_register_hypercall_twice_is_refused():
    """Two devices cannot claim the same hypercall number."""
    machine, _ = make()
    with pytest.raises(ValueError, match="twice"):
        PvTimer(machine)


def test_unknown_msr_is_gp():
    """RDMSR/WRMSR of an MSR nobody claims raise #GP (fault 13)."""
    machine, _ = make()
    read = machine.handle_exit(0, 1, m.ExitMsrRead(msr=0x1234), T0, False)
    write = machine.handle_exit(0, 2, m.ExitMsrWrite(msr=0x4B564D01, value=1), T0, False)
    assert read.fault == write.fault == Fault.GP == 13
    assert machine.vcpus[0].unclaimed["rdmsr 0x1234"] == 1
    assert machine.vcpus[0].unclaimed["wrmsr 0x4b564d01"] == 1


@pytest.mark.parametrize(
    ("size", "ones"), [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFF_FFFF), (8, 2**64 - 1)]
)
def test_unclaimed_mmio_read_is_all_ones(size, ones):
    """An unclaimed MMIO read returns all ones of the access size, with no fault."""
    machine, _ = make()
    result = machine.handle_exit(0, 1, m.ExitMmioRead(gpa=0xFED00000, size=size), T0, False)
    assert result == ExitResult(value=ones, fault=0)


@pytest.mark.parametrize(("size", "ones"), [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFF_FFFF)])
def test_unclaimed_port_in_is_all_ones(size, ones):
    """An unclaimed IN returns all ones of the access size."""
    machine, _ = make()
    assert machine.handle_exit(0, 1, m.ExitPioIn(port=0x61, size=size), T0, False).value == ones


def test_unclaimed_writes_are_ignored():
    """Unclaimed MMIO and port writes complete without a fault and are counted."""
    machine, _ = make()
    w = machine.handle_exit(0, 1, m.ExitMmioWrite(gpa=0x1000, size=4, value=5), T0, False)
    o = machine.handle_exit(0, 2, m.ExitPioOut(port=0x80, size=1, value=1), T0, False)
    assert w == o == ExitResult()
    assert sum(machine.vcpus[0].unclaimed.values()) == 2


def test_non_exit_message_is_a_type_error():
    """Only exits are dispatched."""
    machine, _ = make()
    with pytest.raises(TypeError):
        machine.handle_exit(0, 1, m.Goodbye(), T0, False)


# ---------------------------------------------------------------- HLT


def test_hlt_blocks_until_the_next_injection():
    """HLT with nothing pending is deferred; the next interrupt answers it (re = HLT seq)."""
    machine, _ = make()
    hypercall(machine, SET, [ktime_at(machine, 0, T0) + 50_000], T0)
    result = machine.handle_exit(0, 17, m.ExitHlt(), T0 + 10, False)
    assert result == ExitResult(deferred=True)
    assert machine.vcpus[0].halted_exit == 17
    assert machine.take_actions() == []
    h = armed(machine)
    machine.on_timer(h)
    assert machine.take_actions() == [InjectIrq(0, 0xEC, h), CompleteHlt(0, 17)]
    assert machine.vcpus[0].halted_exit is None
    machine.vcpus[0].raise_irq(0xEC, h + 1)  # a later interrupt does not complete it again
    assert machine.take_actions() == [InjectIrq(0, 0xEC, h + 1)]


def test_interrupt_for_another_vcpu_does_not_wake():
    """Only the halted vCPU's own interrupt completes its HLT."""
    machine, _ = make()
    assert machine.handle_exit(0, 3, m.ExitHlt(), T0, False).deferred
    machine.vcpus[1].raise_irq(0xEC, T0)
    assert machine.take_actions() == [InjectIrq(1, 0xEC, T0)]
    assert machine.vcpus[0].halted_exit == 3


def test_hlt_with_unseen_returns_at_once():
    """Regression (lost wake-up): an injection sent but not yet seen keeps the vCPU runnable."""
    machine, _ = make()
    assert machine.handle_exit(0, 5, m.ExitHlt(), T0, True) == ExitResult()
    assert machine.vcpus[0].halted_exit is None


def test_hlt_with_injection_still_queued_returns_at_once():
    """Regression (lost wake-up): an InjectIrq still in the action queue keeps the vCPU runnable."""
    machine, _ = make()
    hypercall(machine, SET, [ktime_at(machine, 0, T0) + 1_000], T0)
    machine.on_timer(armed(machine))  # fires; the server has not drained the actions yet
    assert machine.handle_exit(0, 9, m.ExitHlt(), T0 + 2_000, False) == ExitResult()
    assert machine.vcpus[0].halted_exit is None
    actions = machine.take_actions()
    assert [type(a) for a in actions] == [InjectIrq]
    # once drained, a HLT blocks again
    assert machine.handle_exit(0, 10, m.ExitHlt(), T0 + 3_000, False).deferred


def test_queued_injection_for_other_vcpu_does_not_prevent_blocking():
    """An InjectIrq queued for a different vCPU does not make this one runnable."""
    machine, _ = make()
    machine.vcpus[1].raise_irq(0xEC, T0)
    assert machine.handle_exit(0, 4, m.ExitHlt(), T0, False).deferred


def test_shutdown_wakes_halted_vcpus():
    """shutdown() answers every pending HLT exactly once; running vCPUs get nothing."""
    machine, _ = make(vcpus=3)
    machine.handle_exit(0, 3, m.ExitHlt(), T0, False)
    machine.handle_exit(2, 8, m.ExitHlt(), T0, False)
    machine.shutdown()
    assert machine.take_actions() == [CompleteHlt(0, 3), CompleteHlt(2, 8)]
    machine.shutdown()
    assert machine.take_actions() == []
