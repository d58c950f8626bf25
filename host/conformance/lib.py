"""Building blocks of the host cases: guest instructions as generators of operations.

Each helper yields the operations of one guest action (an MMIO read of an APIC
register, a WRMSR, a hypercall, enabling the APIC) and returns what came back, so a
case reads like the guest code it imitates::

    welcome = yield from session(ctx, 0)
    lvr = yield from apic_read(ctx, 0, APIC_LVR)

An exit that gets no reply ends the case: the helper records the failed check ("the
host answers the exit") and raises :class:`~vtick.host.conformance.case.Abort`.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from vtick.host.conformance import case as c
from vtick.proto import apicdef as r
from vtick.proto import messages as m
from vtick.proto.abi import Fault
from vtick.proto.pvclock import PvclockInfo, TscModel

__all__ = [
    "APIC_BASE_MSR",
    "Gen",
    "apic_read",
    "apic_write",
    "eoi",
    "enable_apic",
    "enable_x2apic",
    "exit_",
    "hypercall",
    "rdmsr",
    "wrmsr",
    "session",
    "tsc_model",
    "x2_read",
    "x2_write",
]

Gen = Generator[c.Op, Any, Any]
APIC_BASE_MSR = r.MSR_IA32_APICBASE
#: xAPIC page at its reset address (APIC_BASE 0xFEE00000)
APIC_PAGE = r.APIC_DEFAULT_BASE
#: a vector for test interrupts: class 3, below every vector Linux uses
TEST_VECTOR = 0x31


def session(ctx: c.Ctx, vcpu: int, features: int = c.ALL_FEATURES, peer: int = 0) -> Gen:
    """Open a fresh session on ``vcpu``; a case that needs one stops if it is refused."""
    ctx.require_vcpus(vcpu + 1)
    welcome = yield c.Session(vcpu, features, peer=peer)
    if not isinstance(welcome, m.Welcome):
        ctx.check(f"vCPU {vcpu}: a valid hello is welcomed", False, "welcome", welcome or "none")
        raise c.Abort
    return welcome


def exit_(ctx: c.Ctx, vcpu: int, msg: m.Message, what: str = "", peer: int = 0) -> Gen:
    done = yield c.Exit(vcpu, msg, peer=peer)
    assert isinstance(done, c.ExitDone)
    if done.reply is None:
        ctx.check(
            f"{what or c.describe(msg)}: the host answers the exit",
            False,
            "exit-reply",
            "no reply within 2 s",
        )
        raise c.Abort
    return done


def apic_read(ctx: c.Ctx, vcpu: int, offset: int, size: int = 4) -> Gen:
    """xAPIC MMIO read at the reset base; returns the value."""
    done = yield from exit_(ctx, vcpu, m.ExitMmioRead(gpa=APIC_PAGE + offset, size=size))
    return done.value


def apic_write(ctx: c.Ctx, vcpu: int, offset: int, value: int, size: int = 4) -> Gen:
    """xAPIC MMIO write at the reset base; returns the :class:`ExitDone`."""
    done = yield from exit_(
        ctx, vcpu, m.ExitMmioWrite(gpa=APIC_PAGE + offset, size=size, value=value)
    )
    return done


def rdmsr(ctx: c.Ctx, vcpu: int, msr: int) -> Gen:
    """RDMSR; returns the :class:`ExitDone` (``fault`` 13 = #GP)."""
    return (yield from exit_(ctx, vcpu, m.ExitMsrRead(msr=msr)))


def wrmsr(ctx: c.Ctx, vcpu: int, msr: int, value: int) -> Gen:
    return (yield from exit_(ctx, vcpu, m.ExitMsrWrite(msr=msr, value=value)))


def x2_read(ctx: c.Ctx, vcpu: int, offset: int) -> Gen:
    """RDMSR of the x2APIC register at ``offset``; returns the value (checks no #GP)."""
    done = yield from rdmsr(ctx, vcpu, r.x2apic_msr(offset))
    if done.fault:
        ctx.check(f"rdmsr {r.x2apic_msr(offset):#x} succeeds", False, "no fault", done.fault)
        raise c.Abort
    return done.value


def x2_write(ctx: c.Ctx, vcpu: int, offset: int, value: int) -> Gen:
    return (yield from wrmsr(ctx, vcpu, r.x2apic_msr(offset), value))


def hypercall(ctx: c.Ctx, vcpu: int, nr: int, *args: int) -> Gen:
    """A hypercall; returns the :class:`ExitDone` (``value`` is RAX, negative errno)."""
    return (yield from exit_(ctx, vcpu, m.ExitHypercall(nr=nr, args=list(args))))


def enable_apic(ctx: c.Ctx, vcpu: int, svr: int = 0x1FF) -> Gen:
    """Software-enable the xAPIC as Linux's setup_local_APIC does (SVR = 0x1FF)."""
    yield from apic_write(ctx, vcpu, r.APIC_SPIV, svr)


def enable_x2apic(ctx: c.Ctx, vcpu: int) -> Gen:
    """APIC_BASE: EN | EXTD (xAPIC -> x2APIC), then SVR = 0x1FF through MSR 0x80F."""
    base = yield from rdmsr(ctx, vcpu, APIC_BASE_MSR)
    done = yield from wrmsr(ctx, vcpu, APIC_BASE_MSR, base.value | r.APICBASE_EXTD)
    if done.fault:
        ctx.check("x2APIC can be enabled", False, "no fault", f"fault {done.fault}")
        raise c.Abort
    yield from x2_write(ctx, vcpu, r.APIC_SPIV, 0x1FF)


def eoi(ctx: c.Ctx, vcpu: int, x2apic: bool = False) -> Gen:
    if x2apic:
        return (yield from x2_write(ctx, vcpu, r.APIC_EOI, 0))
    return (yield from apic_write(ctx, vcpu, r.APIC_EOI, 0))


def is_gp(done: c.ExitDone) -> bool:
    return done.fault == Fault.GP


def tsc_model(welcome: m.Welcome) -> TscModel:
    """The guest TSC the welcome defines (``docs/protocol.md`` §6.1)."""
    info = PvclockInfo.from_wire(welcome.pvclock)
    # ktime_epoch only seeds host_ns_for_ktime's first guess; derive it from the page
    tsc = TscModel(welcome.tsc_khz, welcome.tsc_epoch, welcome.tsc_epoch)
    epoch = tsc.host_ns_for_tsc(info.tsc_timestamp) - info.system_time
    return TscModel(welcome.tsc_khz, welcome.tsc_epoch, epoch)


def injected(
    arrivals: list[c.Arrival] | tuple[c.Arrival, ...], vector: int | None = None
) -> list[c.Arrival]:
    return [
        a
        for a in arrivals
        if isinstance(a.msg, m.Inject) and (vector is None or a.msg.vector == vector)
    ]


def await_inject(vcpu: int, vector: int, timeout_ms: int = 2000) -> Gen:
    """The next inject of ``vector`` on ``vcpu`` after the cursor (an Arrival or None)."""
    arrival = yield c.Await(
        vcpu,
        (m.Inject,),
        timeout_ms,
        match=lambda a: isinstance(a.msg, m.Inject) and a.msg.vector == vector,
    )
    return arrival
