"""Host cases, suites ``pv`` and ``exit``: kvmclock, the PV clock-event device, PV EOI, VMI,
the answers to exits nobody claims, and HLT (``docs/protocol.md`` §4.4, §6, §7)."""

from __future__ import annotations

from collections.abc import Callable

from vtick.host.conformance import case as c
from vtick.host.conformance.lib import (
    TEST_VECTOR,
    Gen,
    apic_read,
    apic_write,
    await_inject,
    enable_apic,
    exit_,
    hypercall,
    injected,
    is_gp,
    rdmsr,
    session,
    tsc_model,
    wrmsr,
)
from vtick.proto import apicdef as r
from vtick.proto import messages as m
from vtick.proto.abi import ETIME, PV_TIMER_FUTURE, Feature, Hypercall, KvmErrno, Msr
from vtick.proto.clockmath import NSEC_PER_SEC, kvm_get_time_scale
from vtick.proto.pvclock import PvclockInfo, TscModel

__all__ = ["CASES"]

CASES = c.Registry()
MUST, SHOULD, MAY = c.Level.MUST, c.Level.SHOULD, c.Level.MAY
TIMER = 0xEC
KTIME_MAX = (1 << 63) - 1
GPA = 0x0010_0000


def _publications(done: c.ExitDone) -> list[PvclockInfo]:
    return [PvclockInfo.from_wire(a.msg.info) for a in done.during if isinstance(a.msg, m.Pvclock)]


# ---------------------------------------------------------------------- kvmclock


@CASES.case(
    "pv.kvmclock.publish",
    "enabling kvmclock publishes new parameters before the "
    "WRMSR's reply: even version, KVM's scale, the host's clock",
    MUST,
    "protocol.md §6.2, §7.7; KVM msr.rst MSR_KVM_SYSTEM_TIME_NEW",
)
def kvmclock_publish(ctx: c.Ctx) -> Gen:
    ctx.require(Feature.PVCLOCK)
    w = yield from session(ctx, 0)
    tsc = tsc_model(w)
    done = yield from wrmsr(ctx, 0, Msr.MSR_KVM_SYSTEM_TIME_NEW, GPA | 1)
    pubs = _publications(done)
    ctx.check(
        "a pvclock message arrives before the exit-reply",
        bool(pubs),
        "pvclock, then reply",
        "reply without a pvclock before it",
    )
    if not pubs:
        return
    info = pubs[-1]
    ctx.check(
        "pvclock.version is even (no update in progress)",
        info.version % 2 == 0,
        "even",
        info.version,
    )
    ctx.check(
        "pvclock.version is newer than the welcome's",
        info.version != w.pvclock["version"],
        f"!= {w.pvclock['version']}",
        info.version,
    )
    shift, mul = kvm_get_time_scale(NSEC_PER_SEC, w.tsc_khz * 1000)
    ctx.equal(
        "(tsc_to_system_mul, tsc_shift) = kvm_get_time_scale(1e9, tsc_khz * 1000)",
        (mul, shift),
        (info.tsc_to_system_mul, info.tsc_shift),
    )
    lo, hi = tsc.tsc(done.sent), tsc.tsc(done.replied or done.sent)
    ctx.check(
        "tsc_timestamp is the guest TSC while the WRMSR was handled",
        lo <= info.tsc_timestamp <= hi,
        f"{lo}..{hi}",
        info.tsc_timestamp,
    )
    expected = tsc.host_ns_for_tsc(info.tsc_timestamp) - tsc.ktime_epoch
    ctx.check(
        "system_time continues the welcome's clock (within 1 us)",
        abs(info.system_time - expected) <= 1000,
        expected,
        info.system_time,
    )


@CASES.case(
    "pv.kvmclock.version-step",
    "each publication adds 2 to the version",
    SHOULD,
    "protocol.md §6.2; pvclock ABI seqlock",
)
def kvmclock_step(ctx: c.Ctx) -> Gen:
    ctx.require(Feature.PVCLOCK)
    yield from session(ctx, 0)
    first = yield from wrmsr(ctx, 0, Msr.MSR_KVM_SYSTEM_TIME_NEW, GPA | 1)
    second = yield from wrmsr(ctx, 0, Msr.MSR_KVM_SYSTEM_TIME_NEW, GPA | 1)
    a, b = _publications(first), _publications(second)
    ctx.check("both writes publish", bool(a and b), "two pvclock messages", (len(a), len(b)))
    if a and b:
        ctx.equal("version step", 2, (b[-1].version - a[-1].version) & 0xFFFF_FFFF)


@CASES.case(
    "pv.kvmclock.disable", "a write with bit 0 clear publishes nothing", MUST, "protocol.md §7.7"
)
def kvmclock_disable(ctx: c.Ctx) -> Gen:
    ctx.require(Feature.PVCLOCK)
    yield from session(ctx, 0)
    done = yield from wrmsr(ctx, 0, Msr.MSR_KVM_SYSTEM_TIME_NEW, GPA)
    ctx.check("no pvclock message", not _publications(done), "none", _publications(done))
    value = yield from rdmsr(ctx, 0, Msr.MSR_KVM_SYSTEM_TIME_NEW)
    ctx.equal("RDMSR returns the value written", GPA, value.value)


@CASES.case(
    "pv.kvmclock.legacy",
    "MSR 0x12 is an alias of MSR_KVM_SYSTEM_TIME_NEW",
    SHOULD,
    "protocol.md §7.7; KVM msr.rst",
)
def kvmclock_legacy(ctx: c.Ctx) -> Gen:
    ctx.require(Feature.PVCLOCK)
    yield from session(ctx, 0)
    done = yield from wrmsr(ctx, 0, Msr.MSR_KVM_SYSTEM_TIME, GPA | 1)
    ctx.check("it publishes too", bool(_publications(done)), "pvclock", "none")
    value = yield from rdmsr(ctx, 0, Msr.MSR_KVM_SYSTEM_TIME_NEW)
    ctx.equal("and shares the storage", GPA | 1, value.value)


@CASES.case(
    "pv.kvmclock.wallclock",
    "MSR_KVM_WALL_CLOCK_NEW accepts a GPA and reads it back",
    MAY,
    "protocol.md §7.7",
)
def kvmclock_wallclock(ctx: c.Ctx) -> Gen:
    ctx.require(Feature.PVCLOCK)
    yield from session(ctx, 0)
    done = yield from wrmsr(ctx, 0, Msr.MSR_KVM_WALL_CLOCK_NEW, GPA)
    ctx.equal("no fault", 0, done.fault)
    value = yield from rdmsr(ctx, 0, Msr.MSR_KVM_WALL_CLOCK_NEW)
    ctx.equal("read back", GPA, value.value)


# ---------------------------------------------------------------------- PV timer


def _pv_timer(ctx: c.Ctx) -> Gen:
    """A session on vCPU 0 with the PV timer, its APIC enabled; returns (tsc, pvclock)."""
    ctx.require(Feature.PV_TIMER)
    w = yield from session(ctx, 0)
    yield from enable_apic(ctx, 0)
    yield c.Mark(0)
    return tsc_model(w), PvclockInfo.from_wire(w.pvclock)


def _ktime_now(tsc: TscModel, info: PvclockInfo) -> Gen:
    now = yield c.Now()
    return info.ktime(tsc.tsc(now))


@CASES.case(
    "pv.timer.future",
    "set_next_ktime arms the device for a guest ktime; it fires "
    "once the guest's clock reaches it, never early",
    MUST,
    "protocol.md §6.2, §7.3",
)
def pv_future(ctx: c.Ctx) -> Gen:
    tsc, info = yield from _pv_timer(ctx)
    expiry = (yield from _ktime_now(tsc, info)) + 3_000_000
    done = yield from hypercall(ctx, 0, Hypercall.VTICK_SET_NEXT_KTIME, expiry, 0)
    ctx.equal("RAX", 0, done.value)
    got = yield from await_inject(0, TIMER, 2000)
    ctx.check("inject 0xec (LOCAL_TIMER)", got is not None, "inject 0xec", "none")
    if got is not None:
        assert isinstance(got.msg, m.Inject)
        bound = tsc.host_ns_for_ktime(info, expiry)
        ctx.check(
            "never early: host_time >= the first ns the guest's kvmclock reads the expiry",
            bound is not None and got.msg.host_time >= bound,
            f">= {bound}",
            got.msg.host_time,
        )


@CASES.case(
    "pv.timer.past",
    "a past expiry without the future flag fires within the hypercall: "
    "the inject comes before its reply",
    MUST,
    "protocol.md §4.2, §7.3",
)
def pv_past(ctx: c.Ctx) -> Gen:
    yield from _pv_timer(ctx)
    done = yield from hypercall(ctx, 0, Hypercall.VTICK_SET_NEXT_KTIME, 1, 0)
    ctx.equal("RAX", 0, done.value)
    ctx.check(
        "inject 0xec before the exit-reply",
        bool(injected(done.during, TIMER)),
        "inject, then exit-reply",
        "exit-reply first",
    )


@CASES.case(
    "pv.timer.etime",
    "a past expiry with PV_TIMER_FUTURE returns -ETIME and raises nothing",
    MUST,
    "protocol.md §7.3",
)
def pv_etime(ctx: c.Ctx) -> Gen:
    yield from _pv_timer(ctx)
    done = yield from hypercall(ctx, 0, Hypercall.VTICK_SET_NEXT_KTIME, 1, PV_TIMER_FUTURE)
    ctx.equal("RAX", -ETIME, done.value)
    later = yield c.Collect(0, 30, (m.Inject,))
    ctx.check(
        "no interrupt",
        not injected([*done.during, *later], TIMER),
        "none",
        [c.describe(a.msg) for a in later if a.msg],
    )


@CASES.case(
    "pv.timer.einval",
    "unknown flags or a missing expiry return -KVM_EINVAL",
    MUST,
    "protocol.md §7.2, §7.3",
)
def pv_einval(ctx: c.Ctx) -> Gen:
    yield from _pv_timer(ctx)
    done = yield from hypercall(ctx, 0, Hypercall.VTICK_SET_NEXT_KTIME, 1, 2)
    ctx.equal("flags 2: RAX", -KvmErrno.KVM_EINVAL, done.value)
    done = yield from hypercall(ctx, 0, Hypercall.VTICK_SET_NEXT_KTIME)
    ctx.equal("no arguments: RAX", -KvmErrno.KVM_EINVAL, done.value)


@CASES.case(
    "pv.timer.one-arg", "set_next_ktime with one argument means flags 0", MUST, "protocol.md §7.2"
)
def pv_one_arg(ctx: c.Ctx) -> Gen:
    yield from _pv_timer(ctx)
    done = yield from hypercall(ctx, 0, Hypercall.VTICK_SET_NEXT_KTIME, 1)
    ctx.equal("RAX", 0, done.value)
    ctx.check("a past expiry fires at once", bool(injected(done.during, TIMER)), "inject", "none")


@CASES.case("pv.timer.shutdown", "VTICK_TIMER_SHUTDOWN disarms", MUST, "protocol.md §7.3")
def pv_shutdown(ctx: c.Ctx) -> Gen:
    tsc, info = yield from _pv_timer(ctx)
    expiry = (yield from _ktime_now(tsc, info)) + 30_000_000
    yield from hypercall(ctx, 0, Hypercall.VTICK_SET_NEXT_KTIME, expiry, 0)
    done = yield from hypercall(ctx, 0, Hypercall.VTICK_TIMER_SHUTDOWN, 0)
    ctx.equal("RAX", 0, done.value)
    later = yield c.Collect(0, 60, (m.Inject,))
    ctx.check(
        "nothing fires",
        not injected(later, TIMER),
        "none",
        [c.describe(a.msg) for a in later if a.msg],
    )


@CASES.case("pv.timer.replace", "a new expiry replaces the armed one", MUST, "protocol.md §7.3")
def pv_replace(ctx: c.Ctx) -> Gen:
    tsc, info = yield from _pv_timer(ctx)
    now = yield from _ktime_now(tsc, info)
    far, near = now + 400_000_000, now + 5_000_000
    yield from hypercall(ctx, 0, Hypercall.VTICK_SET_NEXT_KTIME, far, 0)
    yield from hypercall(ctx, 0, Hypercall.VTICK_SET_NEXT_KTIME, near, 0)
    got = yield from await_inject(0, TIMER, 2000)
    ctx.check("the new expiry fires", got is not None, "inject 0xec", "none")
    if got is not None:
        assert isinstance(got.msg, m.Inject)
        lo, hi = tsc.host_ns_for_ktime(info, near), tsc.host_ns_for_ktime(info, far)
        assert lo is not None
        assert hi is not None
        ctx.check(
            "at the new expiry, not the old",
            lo <= got.msg.host_time < hi,
            f"{lo}..{hi}",
            got.msg.host_time,
        )
    yield from hypercall(ctx, 0, Hypercall.VTICK_TIMER_SHUTDOWN, 0)


@CASES.case(
    "pv.timer.never", "KTIME_MAX means never: it disarms and returns 0", MUST, "protocol.md §7.3"
)
def pv_never(ctx: c.Ctx) -> Gen:
    tsc, info = yield from _pv_timer(ctx)
    expiry = (yield from _ktime_now(tsc, info)) + 20_000_000
    yield from hypercall(ctx, 0, Hypercall.VTICK_SET_NEXT_KTIME, expiry, 0)
    done = yield from hypercall(ctx, 0, Hypercall.VTICK_SET_NEXT_KTIME, KTIME_MAX, 0)
    ctx.equal("RAX", 0, done.value)
    later = yield c.Collect(0, 50, (m.Inject,))
    ctx.check(
        "nothing fires",
        not injected(later, TIMER),
        "none",
        [c.describe(a.msg) for a in later if a.msg],
    )


@CASES.case(
    "pv.timer.delta",
    "set_next_delta arms the device that many ns after the host handles the call",
    MUST,
    "protocol.md §7.3",
)
def pv_delta(ctx: c.Ctx) -> Gen:
    yield from _pv_timer(ctx)
    done = yield from hypercall(ctx, 0, Hypercall.VTICK_SET_NEXT_DELTA, 3_000_000, 0)
    ctx.equal("RAX", 0, done.value)
    got = yield from await_inject(0, TIMER, 2000)
    ctx.check("inject 0xec", got is not None, "inject", "none")
    if got is not None:
        assert isinstance(got.msg, m.Inject)
        ctx.check(
            "not before the call + 3 ms",
            got.msg.host_time >= done.sent + 3_000_000,
            f">= {done.sent + 3_000_000}",
            got.msg.host_time,
        )


@CASES.case(
    "pv.timer.delta-negative", "a negative delta (s64) is due at once", MUST, "protocol.md §7.3"
)
def pv_delta_negative(ctx: c.Ctx) -> Gen:
    yield from _pv_timer(ctx)
    done = yield from hypercall(ctx, 0, Hypercall.VTICK_SET_NEXT_DELTA, (1 << 64) - 1, 0)
    ctx.equal("RAX", 0, done.value)
    ctx.check(
        "inject 0xec before the exit-reply",
        bool(injected(done.during, TIMER)),
        "inject, then exit-reply",
        "exit-reply first",
    )


# ---------------------------------------------------------------------- PV EOI


@CASES.case(
    "pv.eoi",
    "with PV EOI enabled a lone interrupt carries pv_eoi; the vCPU reports "
    "clearing it on its next exit and the host performs the EOI",
    MUST,
    "protocol.md §7.6; KVM msr.rst MSR_KVM_PV_EOI_EN",
)
def pv_eoi(ctx: c.Ctx) -> Gen:
    ctx.require(Feature.PV_EOI)
    yield from session(ctx, 0)
    yield from enable_apic(ctx, 0)
    done = yield from wrmsr(ctx, 0, Msr.MSR_KVM_PV_EOI_EN, GPA | 1)
    ctx.equal("enabling PV EOI: no fault", 0, done.fault)
    done = yield from apic_write(ctx, 0, r.APIC_ICR, r.APIC_DEST_SELF | TEST_VECTOR)
    got = injected(done.during, TEST_VECTOR)
    ctx.check(
        "the interrupt carries pv_eoi: true",
        bool(got) and isinstance(got[0].msg, m.Inject) and bool(got[0].msg.pv_eoi),
        "inject {pv_eoi: true}",
        [c.describe(a.msg) for a in got if a.msg],
    )
    isr = yield from apic_read(ctx, 0, r.APIC_ISR + 0x10)
    ctx.equal("vector 0x31 in service (ISR word 1, bit 17)", 1 << 17, isr)
    gpa = r.APIC_DEFAULT_BASE + r.APIC_ISR + 0x10
    done = yield from exit_(ctx, 0, m.ExitMmioRead(gpa=gpa, size=4, pv_eoi=True))
    ctx.equal("the exit reporting pv_eoi sees the EOI done (ISR word 1)", 0, done.value)


@CASES.case(
    "pv.eoi.reserved", "MSR_KVM_PV_EOI_EN bit 1 is reserved (#GP)", MUST, "protocol.md §7.6"
)
def pv_eoi_reserved(ctx: c.Ctx) -> Gen:
    ctx.require(Feature.PV_EOI)
    yield from session(ctx, 0)
    done = yield from wrmsr(ctx, 0, Msr.MSR_KVM_PV_EOI_EN, GPA | 2)
    ctx.check("#GP", is_gp(done), "fault 13", f"fault {done.fault}")


# ---------------------------------------------------------------------- VMI


def _vmi(ctx: c.Ctx) -> Gen:
    ctx.require(Feature.VMI)
    w = yield from session(ctx, 0)
    yield from enable_apic(ctx, 0)
    yield c.Mark(0)
    return tsc_model(w)


@CASES.case(
    "pv.vmi.apic",
    "VMI apic_read and apic_write reach the LAPIC registers; a bad offset is -KVM_EINVAL",
    MUST,
    "protocol.md §7.4",
)
def vmi_apic(ctx: c.Ctx) -> Gen:
    yield from _vmi(ctx)
    done = yield from hypercall(ctx, 0, Hypercall.VTICK_VMI_APIC_READ, r.APIC_LVR)
    ctx.equal("apic_read(LVR)", r.lvr_value(False, False), done.value)
    done = yield from hypercall(ctx, 0, Hypercall.VTICK_VMI_APIC_WRITE, r.APIC_TASKPRI, 0x20)
    ctx.equal("apic_write(TPR, 0x20) returns 0", 0, done.value)
    tpr = yield from apic_read(ctx, 0, r.APIC_TASKPRI)
    ctx.equal("TPR seen through MMIO", 0x20, tpr)
    done = yield from hypercall(ctx, 0, Hypercall.VTICK_VMI_APIC_READ, 0x040)
    ctx.equal("apic_read(0x40, reserved)", -KvmErrno.KVM_EINVAL, done.value)
    done = yield from hypercall(ctx, 0, Hypercall.VTICK_VMI_APIC_WRITE, r.APIC_LVR)
    ctx.equal("apic_write with one argument", -KvmErrno.KVM_EINVAL, done.value)


@CASES.case(
    "pv.vmi.alarm.past",
    "a VMI alarm already due fires within the hypercall",
    MUST,
    "protocol.md §4.2, §7.4",
)
def vmi_past(ctx: c.Ctx) -> Gen:
    yield from _vmi(ctx)
    done = yield from hypercall(ctx, 0, Hypercall.VTICK_VMI_SET_ALARM, 1, 0, 0)
    ctx.equal("RAX", 0, done.value)
    ctx.check(
        "inject 0xec before the exit-reply",
        bool(injected(done.during, TIMER)),
        "inject, then exit-reply",
        "exit-reply first",
    )


@CASES.case(
    "pv.vmi.alarm.future",
    "a VMI alarm fires when the guest TSC reaches it, never early",
    MUST,
    "protocol.md §6.1, §7.4",
)
def vmi_future(ctx: c.Ctx) -> Gen:
    tsc = yield from _vmi(ctx)
    now = yield c.Now()
    deadline = tsc.tsc(now) + tsc.tsc_khz * 3
    done = yield from hypercall(ctx, 0, Hypercall.VTICK_VMI_SET_ALARM, deadline, 0, 0)
    ctx.equal("RAX", 0, done.value)
    got = yield from await_inject(0, TIMER, 2000)
    ctx.check("inject 0xec", got is not None, "inject", "none")
    if got is not None:
        assert isinstance(got.msg, m.Inject)
        bound = tsc.host_ns_for_tsc(deadline)
        ctx.check("never early", got.msg.host_time >= bound, f">= {bound}", got.msg.host_time)


@CASES.case(
    "pv.vmi.alarm.cancel",
    "CancelAlarm returns 1 when it cancelled an alarm, else 0",
    MUST,
    "protocol.md §7.4",
)
def vmi_cancel(ctx: c.Ctx) -> Gen:
    tsc = yield from _vmi(ctx)
    now = yield c.Now()
    yield from hypercall(ctx, 0, Hypercall.VTICK_VMI_SET_ALARM, tsc.tsc(now) + tsc.tsc_khz * 1000)
    done = yield from hypercall(ctx, 0, Hypercall.VTICK_VMI_CANCEL_ALARM)
    ctx.equal("first cancel", 1, done.value)
    done = yield from hypercall(ctx, 0, Hypercall.VTICK_VMI_CANCEL_ALARM)
    ctx.equal("second cancel", 0, done.value)


@CASES.case(
    "pv.vmi.alarm.einval",
    "bad alarm flags or a periodic alarm without a period are -KVM_EINVAL",
    MUST,
    "protocol.md §7.4",
)
def vmi_einval(ctx: c.Ctx) -> Gen:
    yield from _vmi(ctx)
    done = yield from hypercall(ctx, 0, Hypercall.VTICK_VMI_SET_ALARM, 1, 2, 0)
    ctx.equal("flags 2", -KvmErrno.KVM_EINVAL, done.value)
    done = yield from hypercall(ctx, 0, Hypercall.VTICK_VMI_SET_ALARM, 1, 1, 0)
    ctx.equal("periodic with period 0", -KvmErrno.KVM_EINVAL, done.value)


# ---------------------------------------------------------------------- exits nobody claims


def _hypercall_absent(nr: int, name: str) -> Callable[[c.Ctx], Gen]:
    def script(ctx: c.Ctx) -> Gen:
        yield from session(ctx, 0)
        done = yield from hypercall(ctx, 0, nr, 0, 0, 0, 0)
        ctx.equal(f"hypercall {name}: RAX", -KvmErrno.KVM_ENOSYS, done.value)

    return script


for _suffix, _nr, _name in [
    ("unknown", 0x5654_FFFF, "0x5654ffff (unknown)"),
    ("kick-cpu", Hypercall.KVM_HC_KICK_CPU, "KVM_HC_KICK_CPU (5)"),
    ("sched-yield", Hypercall.KVM_HC_SCHED_YIELD, "KVM_HC_SCHED_YIELD (11)"),
]:
    CASES.add(
        f"exit.hypercall.{_suffix}",
        f"hypercall {_name} is -KVM_ENOSYS",
        MUST,
        "protocol.md §7.2",
        _hypercall_absent(_nr, _name),
    )


@CASES.case("exit.msr.unknown", "an MSR nobody models raises #GP", MUST, "protocol.md §7.9")
def msr_unknown(ctx: c.Ctx) -> Gen:
    yield from session(ctx, 0)
    done = yield from rdmsr(ctx, 0, 0xDEAD)
    ctx.check("rdmsr 0xdead", is_gp(done), "#GP", f"fault {done.fault}")
    done = yield from wrmsr(ctx, 0, 0xDEAD, 1)
    ctx.check("wrmsr 0xdead", is_gp(done), "#GP", f"fault {done.fault}")


@CASES.case(
    "exit.mmio.unclaimed",
    "unclaimed MMIO reads all ones of its size; writes are ignored",
    MUST,
    "protocol.md §7.9",
)
def mmio_unclaimed(ctx: c.Ctx) -> Gen:
    yield from session(ctx, 0)
    for size in (1, 2, 4, 8):
        done = yield from exit_(ctx, 0, m.ExitMmioRead(gpa=0x1000, size=size))
        ctx.equal(f"{size}-byte read", ((1 << (8 * size)) - 1, 0), (done.value, done.fault))
    done = yield from exit_(ctx, 0, m.ExitMmioWrite(gpa=0x1000, size=4, value=1))
    ctx.equal("write: no fault", 0, done.fault)


@CASES.case(
    "exit.pio.unclaimed",
    "an unclaimed port reads all ones; OUT is ignored",
    MUST,
    "protocol.md §7.9",
)
def pio_unclaimed(ctx: c.Ctx) -> Gen:
    yield from session(ctx, 0)
    for size in (1, 2, 4):
        done = yield from exit_(ctx, 0, m.ExitPioIn(port=0x80, size=size))
        ctx.equal(
            f"in {size} bytes from 0x80", ((1 << (8 * size)) - 1, 0), (done.value, done.fault)
        )
    done = yield from exit_(ctx, 0, m.ExitPioOut(port=0x80, size=1, value=1))
    ctx.equal("out: no fault", 0, done.fault)


@CASES.case(
    "exit.hlt",
    "HLT blocks until an interrupt is injected; the inject comes before the HLT's reply",
    MUST,
    "protocol.md §4.4",
)
def hlt(ctx: c.Ctx) -> Gen:
    ctx.require_vcpus(2)
    for vcpu in (0, 1):
        yield from session(ctx, vcpu)
        yield from enable_apic(ctx, vcpu)
    yield c.Mark(1)
    seq = yield c.Exit(1, m.ExitHlt(), wait=False)
    early = yield c.Collect(1, 100, (m.ExitReply,))
    ctx.check(
        "no reply while nothing is pending (100 ms)",
        not [a for a in early if isinstance(a.msg, m.ExitReply) and a.msg.re == seq],
        "the HLT stays blocked",
        "answered at once",
    )
    yield from apic_write(ctx, 0, r.APIC_ICR2, 1 << 24)
    yield from apic_write(ctx, 0, r.APIC_ICR, TEST_VECTOR)
    done = yield c.AwaitReply(1, seq, 1000)
    ctx.check("an IPI wakes it: the HLT is answered", done.reply is not None, "exit-reply", "none")
    ctx.check(
        "the interrupt comes before the HLT's reply",
        bool(injected(done.during, TEST_VECTOR)),
        "inject, then exit-reply",
        [c.describe(a.msg) for a in done.during if a.msg],
    )
