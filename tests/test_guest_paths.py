"""Exact exit sequences of the guest kernel's timer, EOI, IPI and boot paths.

Every path runs against the real host Machine (all devices, all features) through the
in-process harness (tests/inproc.py), so each exit is the one the host actually handled
and the host's answer (-ETIME, injections, ISR state) is the real one.
"""

from __future__ import annotations

import pytest
from inproc import InProcVm

from vtick.guest.apic import PV_IPI_WINDOW
from vtick.guest.clockevents import PREEMPT_DELTA_TO_DEVICE
from vtick.guest.kernel import KVMCLOCK_GPA, MODES, GuestKernel
from vtick.proto import apicdef as a
from vtick.proto.abi import ETIME, PV_TIMER_FUTURE, Hypercall, Msr, PitPort, Vector

MS = 1_000_000
SVR_ON = a.APIC_SPIV_APIC_ENABLED | a.APIC_SPIV_VECTOR  # 0x1FF
MMIO = a.APIC_DEFAULT_BASE
TMICT_MMIO = MMIO + a.APIC_TMICT  # 0xFEE00380
EOI_MMIO = MMIO + a.APIC_EOI  # 0xFEE000B0
ICR_MMIO = MMIO + a.APIC_ICR  # 0xFEE00300
ICR2_MMIO = MMIO + a.APIC_ICR2
IPI_VECTOR = 0x41
TIMER_BIT = 1 << Vector.LOCAL_TIMER


def booted(mode: str, ncpus: int = 1, **kw) -> tuple[InProcVm, GuestKernel]:
    vm = InProcVm(ncpus, mode, **kw)
    kernels = vm.boot_all()
    return vm, kernels[0]


def noop(now: int, expires: int) -> None:
    return None


def program(vm: InProcVm, kernel: GuestKernel, delta: int, timer: str = "t") -> tuple[int, int]:
    """Arm one hrtimer ``delta`` ns ahead and reprogram; returns (expires, first exit index)."""
    ctx = vm.vcpus[kernel.cpu]
    expires = vm.ktime(kernel.cpu) + delta
    kernel.start_timer(timer, expires, noop)
    start = len(ctx.exits)
    vm.run_op(kernel.cpu, kernel.reprogram())
    return expires, start


# ---------------------------------------------------------------------- timer programming


def test_pv_ktime_program_is_one_hypercall_with_the_absolute_expiry():
    vm, k = booted("pv-ktime")
    expires, start = program(vm, k, MS)
    ctx = vm.vcpus[0]
    assert ctx.exit_keys(start) == [("hypercall", Hypercall.VTICK_SET_NEXT_KTIME, (expires, 0))]
    assert ctx.exits[-1].value == 0
    assert vm.pvtimer.armed == {0: expires}
    # the host armed its hrtimer at the first host ns the guest reads >= expires
    assert vm.machine.next_deadline() == vm.host_ns_for_ktime(0, expires)


def test_pv_delta_program_is_one_hypercall_with_the_ns_delta():
    vm, k = booted("pv-delta")
    _, start = program(vm, k, MS)
    assert vm.vcpus[0].exit_keys(start) == [("hypercall", Hypercall.VTICK_SET_NEXT_DELTA, (MS, 0))]
    # the host adds the delta to the guest ktime *when it handles the exit*
    handled = vm.vcpus[0].exits[-1].now
    assert vm.machine.next_deadline() == handled + MS


def test_pv_future_flags_and_a_past_expiry_comes_back_etime_and_is_retried():
    vm, k = booted("pv-future")
    ctx = vm.vcpus[0]
    now = vm.ktime(0)
    # due before the hypercall reaches the host (one exit costs 20 us)
    soon = now + vm.exit_cost_ns // 2
    later = now + MS
    k.start_timer("soon", soon, noop)
    k.start_timer("later", later, noop)
    start = len(ctx.exits)
    vm.run_op(0, k.reprogram())
    assert ctx.exit_keys(start) == [
        ("hypercall", Hypercall.VTICK_SET_NEXT_KTIME, (soon, PV_TIMER_FUTURE)),
        ("hypercall", Hypercall.VTICK_SET_NEXT_KTIME, (later, PV_TIMER_FUTURE)),
    ]
    assert [r.value for r in ctx.exits[start:]] == [-ETIME, 0]
    assert vm.pvtimer.stats[0].etime == 1
    # the -ETIME made hrtimer_interrupt's loop run the due timer and program the next one
    assert k.timers is not None
    assert k.timers.retries == 1
    assert k.core.etime == 1
    assert [(e.timer, e.expires) for e in ctx.expiries] == [("soon", soon)]
    assert ctx.expiries[0].lateness >= 0
    assert k.timers.programmed == later
    assert vm.pvtimer.armed == {0: later}


def test_pv_ktime_past_expiry_fires_in_the_same_exit():
    """Without the future flag a past expiry is accepted and raised at once (Linux today)."""
    vm, k = booted("pv-ktime")
    _, start = program(vm, k, vm.exit_cost_ns // 2)
    assert [r.value for r in vm.vcpus[0].exits[start:]] == [0]
    assert list(vm.vcpus[0].pending) == [(Vector.LOCAL_TIMER, False)]


@pytest.mark.parametrize(
    ("mode", "key"),
    [
        ("lapic-xapic", lambda ticks: ("mmio-write", TMICT_MMIO, ticks)),
        ("lapic-x2apic", lambda ticks: ("msr-write", a.x2apic_msr(a.APIC_TMICT), ticks)),
    ],
)
def test_lapic_oneshot_is_one_tmict_write(mode, key):
    vm, k = booted(mode)
    assert k.calibration is not None
    assert k.calibration.lapic_timer_period == 1_000_000  # 1 GHz bus, HZ 1000
    assert k.dev is not None
    assert (k.dev.mult, k.dev.shift) == (268435456, 32)
    _, start = program(vm, k, MS)
    # 1 ms at 62.5 MHz (bus / 16) = 62 500 ticks
    assert vm.vcpus[0].exit_keys(start) == [key(62_500)]
    assert a.x2apic_msr(a.APIC_TMICT) == 0x838


def test_tsc_deadline_is_one_wrmsr_of_rdtsc_plus_delta_times_8():
    vm, k = booted("tsc-deadline")
    assert k.dev is not None
    ticks = (MS * k.dev.mult) >> k.dev.shift
    assert ticks == 312_500  # 312.5 MHz = 2.5 GHz / 8
    tsc = vm.rdtsc()
    _, start = program(vm, k, MS)
    assert vm.vcpus[0].exit_keys(start) == [("msr-write", 0x6E0, tsc + ticks * 8)]
    assert tsc + ticks * 8 == tsc + 2_500_000


def test_vmi_alarm_is_one_set_alarm_hypercall_in_cycles():
    vm, k = booted("vmi")
    tsc = vm.rdtsc()
    _, start = program(vm, k, MS)
    assert vm.vcpus[0].exit_keys(start) == [
        ("hypercall", Hypercall.VTICK_VMI_SET_ALARM, (tsc + 2_500_000, 0))
    ]
    assert vm.vmi_alarm.deadline(0) == tsc + 2_500_000


def test_reprogram_for_the_same_expiry_takes_no_exit():
    vm, k = booted("pv-ktime")
    _, start = program(vm, k, MS)
    vm.run_op(0, k.reprogram())
    assert len(vm.vcpus[0].exits) == start + 1


# ---------------------------------------------------------------------- EOI


def fire_and_deliver(vm: InProcVm, k: GuestKernel) -> int:
    """Program a timer, halt until its interrupt, deliver it; returns the first exit after
    the HLT."""
    program(vm, k, MS)
    assert vm.hlt(k.cpu)
    start = len(vm.vcpus[k.cpu].exits)
    assert vm.deliver(k.cpu) == 1
    return start


@pytest.mark.parametrize(
    ("mode", "apic", "eoi"),
    [
        ("lapic-xapic", None, ("mmio-write", EOI_MMIO, 0)),
        ("pv-ktime", "xapic", ("mmio-write", EOI_MMIO, 0)),
        ("lapic-x2apic", None, ("msr-write", 0x80B, 0)),
        ("pv-ktime", "x2apic", ("msr-write", 0x80B, 0)),
        ("vmi", None, ("hypercall", Hypercall.VTICK_VMI_APIC_WRITE, (0xB0, 0))),
    ],
)
def test_eoi_exit_per_apic_variant(mode, apic, eoi):
    vm, k = booted(mode, apic=apic)
    start = fire_and_deliver(vm, k)
    # EOI, then nothing left to program
    assert vm.vcpus[0].exit_keys(start) == [eoi]
    assert vm.machine.vcpus[0].lapic.isr == 0
    assert [e.timer for e in vm.vcpus[0].expiries] == ["t"]


def test_kvm_pv_eoi_takes_no_exit_and_the_next_exit_reports_it():
    vm, k = booted("pv-ktime", apic="kvm-pv")
    ctx = vm.vcpus[0]
    program(vm, k, MS)
    assert vm.hlt(0)
    assert list(ctx.pending) == [(Vector.LOCAL_TIMER, True)]  # the host set the flag
    start = len(ctx.exits)
    vm.deliver(0)
    assert ctx.exit_keys(start) == []  # the EOI cleared the flag: no exit
    assert k.ops.pv_eois == 1
    lapic = vm.machine.vcpus[0].lapic
    assert lapic.isr == TIMER_BIT  # the host has not been told yet
    program(vm, k, MS, timer="u")
    assert ctx.exit_keys(start) == [
        ("hypercall", Hypercall.VTICK_SET_NEXT_KTIME, (k.timers.programmed, 0))
    ]
    assert ctx.exits[start].pv_eoi is True
    assert lapic.isr == 0
    assert vm.machine.vcpus[0].pv_eois == 1
    assert not vm.machine.faults
    # only the first exit after the EOI carries the report
    vm.run_op(0, k.ops.read(a.APIC_SPIV))
    assert ctx.exits[-1].pv_eoi is False


# ---------------------------------------------------------------------- IPIs


def test_xapic_send_ipi_allbutself_is_one_icr_read_and_one_icr_write():
    vm, k = booted("pv-ktime", ncpus=3, apic="xapic")
    start = len(vm.vcpus[0].exits)
    vm.run_op(0, k.ops.send_IPI_allbutself(IPI_VECTOR))
    assert vm.vcpus[0].exit_keys(start) == [
        ("mmio-read", ICR_MMIO),
        ("mmio-write", ICR_MMIO, 0xC0000 | IPI_VECTOR),
    ]
    assert a.APIC_DEST_ALLBUT == 0xC0000
    assert [list(c.pending) for c in vm.vcpus] == [[], [(IPI_VECTOR, False)], [(IPI_VECTOR, False)]]


def test_xapic_mask_send_is_icr_read_icr2_icr_per_destination():
    vm, k = booted("pv-ktime", ncpus=3, apic="xapic")
    start = len(vm.vcpus[0].exits)
    vm.run_op(0, k.ops.send_IPI_mask([1, 2], IPI_VECTOR))
    assert vm.vcpus[0].exit_keys(start) == [
        ("mmio-read", ICR_MMIO),
        ("mmio-write", ICR2_MMIO, 1 << 24),
        ("mmio-write", ICR_MMIO, IPI_VECTOR),
        ("mmio-read", ICR_MMIO),
        ("mmio-write", ICR2_MMIO, 2 << 24),
        ("mmio-write", ICR_MMIO, IPI_VECTOR),
    ]
    assert [list(c.pending) for c in vm.vcpus[1:]] == [[(IPI_VECTOR, False)]] * 2


def test_x2apic_mask_send_is_one_icr_msr_write_per_destination_and_no_read():
    vm, k = booted("pv-ktime", ncpus=3, apic="x2apic")
    start = len(vm.vcpus[0].exits)
    vm.run_op(0, k.ops.send_IPI_mask([1, 2], IPI_VECTOR))
    assert vm.vcpus[0].exit_keys(start) == [
        ("msr-write", 0x830, (1 << 32) | IPI_VECTOR),
        ("msr-write", 0x830, (2 << 32) | IPI_VECTOR),
    ]
    assert [list(c.pending) for c in vm.vcpus[1:]] == [[(IPI_VECTOR, False)]] * 2


def test_kvm_pv_mask_send_is_one_hypercall_within_a_128_id_window():
    vm, k = booted("pv-ktime", ncpus=3, apic="kvm-pv")
    start = len(vm.vcpus[0].exits)
    vm.run_op(0, k.ops.send_IPI_mask([2, 1], IPI_VECTOR))
    assert vm.vcpus[0].exit_keys(start) == [
        ("hypercall", Hypercall.KVM_HC_SEND_IPI, (0b11, 0, 1, IPI_VECTOR)),
    ]
    assert vm.vcpus[0].exits[-1].value == 2  # delivered to two vCPUs
    # (the targets enabled PV EOI, so the host sets the flag for each injection)
    assert [[v for v, _ in c.pending] for c in vm.vcpus[1:]] == [[IPI_VECTOR]] * 2
    # the window's far edge: IDs 0 and 127 share one bitmap (bit 127 = a1 bit 63)
    start = len(vm.vcpus[0].exits)
    vm.run_op(0, k.ops.send_IPI_mask([0, PV_IPI_WINDOW - 1], IPI_VECTOR))
    assert vm.vcpus[0].exit_keys(start) == [
        ("hypercall", Hypercall.KVM_HC_SEND_IPI, (1, 1 << 63, 0, IPI_VECTOR)),
    ]


@pytest.mark.parametrize("far", [PV_IPI_WINDOW, 200])
def test_kvm_pv_mask_send_splits_ids_outside_one_window(far):
    vm, k = booted("pv-ktime", ncpus=3, apic="kvm-pv")
    start = len(vm.vcpus[0].exits)
    vm.run_op(0, k.ops.send_IPI_mask([0, far], IPI_VECTOR))
    assert vm.vcpus[0].exit_keys(start) == [
        ("hypercall", Hypercall.KVM_HC_SEND_IPI, (1, 0, 0, IPI_VECTOR)),
        ("hypercall", Hypercall.KVM_HC_SEND_IPI, (1, 0, far, IPI_VECTOR)),
    ]
    # ID 0 is the sender itself (a self-IPI through the hypercall); ID ``far`` does not exist
    assert [r.value for r in vm.vcpus[0].exits[start:]] == [1, 0]


# ---------------------------------------------------------------------- boot


def boot_exits(mode: str, apic: str | None = None) -> list[list[tuple]]:
    vm = InProcVm(2, mode, apic=apic)
    vm.boot_all()
    for ctx in vm.vcpus:
        assert all(r.fault == 0 for r in ctx.exits), ctx.exits
        assert not vm.machine.vcpus[ctx.cpu].unclaimed
    assert not vm.machine.faults
    return [ctx.exit_keys() for ctx in vm.vcpus]


KVMCLOCK_ON = ("msr-write", Msr.MSR_KVM_SYSTEM_TIME_NEW, KVMCLOCK_GPA | 1)


def x2apic_switch(cpu: int) -> list[tuple]:
    """rdmsr APIC_BASE, then the same value with EXTD (the BSP flag stays as read)."""
    base = a.APIC_DEFAULT_BASE | a.APICBASE_EN | (a.APICBASE_BSP if cpu == 0 else 0)
    return [
        ("msr-read", a.MSR_IA32_APICBASE),
        ("msr-write", a.MSR_IA32_APICBASE, base | a.APICBASE_EXTD),
    ]


LVTT_ONESHOT = Vector.LOCAL_TIMER


def _x2(reg: int, value: int) -> tuple:
    return ("msr-write", a.x2apic_msr(reg), value)


def _mm(reg: int, value: int) -> tuple:
    return ("mmio-write", MMIO + reg, value)


def _vmi(reg: int, value: int) -> tuple:
    return ("hypercall", Hypercall.VTICK_VMI_APIC_WRITE, (reg, value))


def exact_boot(mode: str, cpu: int) -> list[tuple]:
    """The exact boot sequence of the modes that do not calibrate."""
    if mode == "vmi":
        return [KVMCLOCK_ON, _vmi(a.APIC_SPIV, SVR_ON)]
    if mode == "tsc-deadline":
        return [
            KVMCLOCK_ON,
            *x2apic_switch(cpu),
            _x2(a.APIC_SPIV, SVR_ON),
            _x2(a.APIC_LVTT, Vector.LOCAL_TIMER | a.APIC_LVT_TIMER_TSCDEADLINE),
        ]
    assert mode.startswith("pv-")
    return [KVMCLOCK_ON, _mm(a.APIC_SPIV, SVR_ON)]


@pytest.mark.parametrize("mode", ["pv-ktime", "pv-delta", "pv-future", "vmi", "tsc-deadline"])
def test_boot_sequence_without_calibration(mode):
    assert boot_exits(mode) == [exact_boot(mode, 0), exact_boot(mode, 1)]


def test_boot_kvm_pv_enables_pv_eoi_after_x2apic():
    keys = boot_exits("pv-ktime", apic="kvm-pv")
    for cpu in (0, 1):
        assert keys[cpu] == [
            KVMCLOCK_ON,
            *x2apic_switch(cpu),
            _x2(a.APIC_SPIV, SVR_ON),
            ("msr-write", Msr.MSR_KVM_PV_EOI_EN, 0x1000 | 1),
        ]


@pytest.mark.parametrize("mode", ["lapic-xapic", "lapic-x2apic", "lapic-periodic"])
def test_boot_sequence_with_calibration(mode):
    bsp, ap = boot_exits(mode)
    x2 = MODES[mode].apic == "x2apic"
    w = _x2 if x2 else _mm
    read_tmcct = (
        ("msr-read", a.x2apic_msr(a.APIC_TMCCT)) if x2 else ("mmio-read", MMIO + a.APIC_TMCCT)
    )
    cal_setup = [
        w(a.APIC_LVTT, a.APIC_LVT_MASKED | a.APIC_LVT_TIMER_PERIODIC | Vector.LOCAL_TIMER),
        w(a.APIC_TDCR, 0x3),
        w(a.APIC_TMICT, 0xFFFF_FFFF // 16),
    ]
    cal_stop = [w(a.APIC_TMICT, 0), w(a.APIC_LVTT, a.APIC_LVT_MASKED | Vector.LOCAL_TIMER)]
    # __setup_APIC_LVTT reads TDCR before writing the divide field (read-modify-write)
    read_tdcr = ("msr-read", a.x2apic_msr(a.APIC_TDCR)) if x2 else ("mmio-read", MMIO + a.APIC_TDCR)
    if MODES[mode].periodic:
        state = [
            w(a.APIC_LVTT, Vector.LOCAL_TIMER | a.APIC_LVT_TIMER_PERIODIC),
            read_tdcr,
            w(a.APIC_TDCR, 0x3),
            w(a.APIC_TMICT, 1_000_000 // 16),
        ]
    else:
        state = [w(a.APIC_LVTT, Vector.LOCAL_TIMER), read_tdcr, w(a.APIC_TDCR, 0x3)]
    for cpu, keys in enumerate((bsp, ap)):
        head = [KVMCLOCK_ON, *(x2apic_switch(cpu) if x2 else []), w(a.APIC_SPIV, SVR_ON)]
        assert keys[: len(head + cal_setup)] == head + cal_setup
    n = len(head + cal_setup)
    # BSP: PIT channel 2 as a 10 ms square wave, then polling port 0x61
    count = (1_193_182 + 50) // 100
    pit_setup = [
        ("pio-in", PitPort.PORT_B),
        ("pio-out", PitPort.MODE, 0xB6),
        ("pio-out", PitPort.CHANNEL2, count & 0xFF),
        ("pio-out", PitPort.CHANNEL2, count >> 8),
    ]
    assert bsp[n : n + 4] == pit_setup
    assert bsp[n + 4][:2] == ("pio-out", PitPort.PORT_B)
    middle = bsp[n + 5 : -len(cal_stop + state)]
    assert middle.count(read_tmcct) == 2
    assert {key for key in middle if key != read_tmcct} == {("pio-in", PitPort.PORT_B)}
    assert bsp[-len(cal_stop + state) :] == cal_stop + state
    # APs calibrate against the TSC: no port access at all
    assert ap[n:] == [read_tmcct, read_tmcct, *cal_stop, *state]
    assert not any(key[0].startswith("pio") for key in ap)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_boot_starts_with_kvmclock_and_enables_the_apic(mode):
    bsp, ap = boot_exits(mode)
    spec = MODES[mode]
    svr = {"xapic": _mm, "x2apic": _x2, "vmi": _vmi}[spec.apic](a.APIC_SPIV, SVR_ON)
    for cpu, keys in enumerate((bsp, ap)):
        assert keys[0] == KVMCLOCK_ON
        assert svr in keys
        assert (keys[1:3] == x2apic_switch(cpu)) == (spec.apic == "x2apic")
        assert ("msr-write", Msr.MSR_KVM_PV_EOI_EN, 0x1001) not in keys
    assert any(key[0].startswith("pio") for key in bsp) == spec.calibrate
    assert not any(key[0].startswith("pio") for key in ap)


# ---------------------------------------------------------------------- preemption


RELATIVE = ["lapic-xapic", "lapic-x2apic", "tsc-deadline", "vmi", "pv-delta"]
ABSOLUTE = ["pv-ktime", "pv-future"]
DEVICE_WRITE_KIND = {
    "lapic-xapic": "mmio-write",
    "lapic-x2apic": "msr-write",
    "tsc-deadline": "msr-write",
    "vmi": "hypercall",
    "pv-delta": "hypercall",
    "pv-ktime": "hypercall",
    "pv-future": "hypercall",
}


@pytest.mark.parametrize("mode", RELATIVE + ABSOLUTE)
def test_preemption_point_sits_between_delta_and_device_write(mode):
    vm, k = booted(mode)
    ctx = vm.vcpus[0]
    mark = len(ctx.trace)
    program(vm, k, MS)
    trace = ctx.trace[mark:]
    if mode in RELATIVE:
        assert trace[0] == ("preempt", PREEMPT_DELTA_TO_DEVICE)
        assert len(trace) == 2
        assert trace[1][0] == DEVICE_WRITE_KIND[mode]
    else:
        assert ("preempt", PREEMPT_DELTA_TO_DEVICE) not in trace
        assert len(trace) == 1
        assert trace[0][0] == "hypercall"


def measure(mode: str, preempt: int) -> tuple[int, int, tuple]:
    """Program a 1 ms timer with a preemption of ``preempt`` ns at the delta-to-device
    point; returns (host lateness of the device interrupt, handler lateness, the write)."""
    vm, k = booted(mode)
    vm.preempt_ns[PREEMPT_DELTA_TO_DEVICE] = preempt
    expires, start = program(vm, k, MS)
    vm.preempt_ns.clear()
    write = vm.vcpus[0].exit_keys(start)[0]
    assert vm.hlt(0)
    injected_at, vector, _ = vm.vcpus[0].injections[-1]
    assert vector == Vector.LOCAL_TIMER
    vm.deliver(0)
    (expiry,) = vm.vcpus[0].expiries
    assert expiry.expires == expires
    return injected_at - vm.host_ns_for_ktime(0, expires), expiry.lateness, write


P = 500_000


@pytest.mark.parametrize("mode", RELATIVE)
def test_relative_timer_fires_late_by_the_preemption(mode):
    host0, guest0, write0 = measure(mode, 0)
    host_p, guest_p, write_p = measure(mode, P)
    # without preemption: late by the one exit that carried the delta (plus tick rounding)
    assert 0 <= host0 <= 20_000 + 16
    # the same delta was written (it was computed before the preemption) ...
    if mode in ("lapic-xapic", "lapic-x2apic", "pv-delta"):
        assert write_p == write0
    # ... so the interrupt, and the callback, are exactly P later
    assert host_p - host0 == P
    assert guest_p - guest0 == P


@pytest.mark.parametrize("mode", ABSOLUTE)
def test_absolute_timer_does_not_move_with_the_preemption(mode):
    host0, guest0, write0 = measure(mode, 0)
    host_p, guest_p, write_p = measure(mode, P)
    assert host0 == host_p == 0  # raised at the first host ns the guest reads >= expiry
    assert guest0 == guest_p
    assert write0 == write_p
