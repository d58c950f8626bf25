"""Host cases, suite ``ipi``: interprocessor interrupts through the ICR and KVM's PV send-IPI.

vCPU 0 sends, vCPU 1 (and vCPU 0 itself, for shorthands) receives; both have their APIC
software-enabled.  Matching rules are KVM's (``lapic-kvm-linux.md`` section 4).  Last,
``ipi.online-mask``: cpu_online_mask, the page the host holds, whose view decides which
CPUs a call targets and when the ALLBUT shortcut may be taken.
"""

from __future__ import annotations

from collections.abc import Callable

from vtick.host.conformance import case as c
from vtick.host.conformance.lib import (
    TEST_VECTOR,
    Gen,
    apic_write,
    await_inject,
    enable_apic,
    enable_x2apic,
    hypercall,
    injected,
    session,
    x2_write,
)
from vtick.proto import apicdef as r
from vtick.proto import messages as m
from vtick.proto.abi import Feature, Hypercall, KvmErrno

__all__ = ["CASES"]

CASES = c.Registry()
MUST = c.Level.MUST
V = TEST_VECTOR


def _pair(ctx: c.Ctx, x2apic: bool = False, features: int = c.ALL_FEATURES) -> Gen:
    ctx.require_vcpus(2)
    for vcpu in (0, 1):
        yield from session(ctx, vcpu, features)
        if x2apic:
            yield from enable_x2apic(ctx, vcpu)
        else:
            yield from enable_apic(ctx, vcpu)
        yield c.Mark(vcpu)


def _receivers(ctx: c.Ctx, sent: c.ExitDone, expect: set[int], what: str) -> Gen:
    """Check who got vector V: exactly the vCPUs in ``expect`` (of 0 and 1)."""
    for vcpu in (0, 1):
        if vcpu in expect:
            got = yield from await_inject(vcpu, V, 2000)
            ctx.check(
                f"{what}: vCPU {vcpu} gets vector {V:#x}", got is not None, f"inject {V:#x}", "none"
            )
            if vcpu == 0 and got is not None:
                ctx.check(
                    f"{what}: the sender's own interrupt comes before its exit-reply",
                    bool(injected(sent.during, V)),
                    "inject, then exit-reply",
                    "exit-reply first",
                )
        else:
            later = yield c.Collect(vcpu, 60, (m.Inject,))
            early = injected(sent.during, V) if vcpu == 0 else []
            ctx.check(
                f"{what}: vCPU {vcpu} gets nothing",
                not injected(later, V) and not early,
                "no inject",
                [c.describe(a.msg) for a in later if a.msg],
            )


def _xapic_case(
    icr2: int, icr: int, expect: set[int], what: str, setup: Callable[[c.Ctx], Gen] | None = None
) -> Callable[[c.Ctx], Gen]:
    def script(ctx: c.Ctx) -> Gen:
        yield from _pair(ctx)
        if setup is not None:
            yield from setup(ctx)
        yield from apic_write(ctx, 0, r.APIC_ICR2, icr2)
        sent = yield from apic_write(ctx, 0, r.APIC_ICR, icr)
        yield from _receivers(ctx, sent, expect, what)

    return script


def _flat(ctx: c.Ctx) -> Gen:
    for vcpu in (0, 1):
        yield from apic_write(ctx, vcpu, r.APIC_LDR, (1 << vcpu) << 24)


def _cluster(ctx: c.Ctx) -> Gen:
    for vcpu in (0, 1):
        yield from apic_write(ctx, vcpu, r.APIC_DFR, r.APIC_DFR_CLUSTER)
        yield from apic_write(ctx, vcpu, r.APIC_LDR, (0x10 | (1 << vcpu)) << 24)


LOGICAL = r.APIC_DEST_LOGICAL
for _suffix, _icr2, _icr, _expect, _what, _setup in [
    ("fixed.physical", 1 << 24, V, {1}, "fixed IPI to APIC ID 1", None),
    ("self", 0, r.APIC_DEST_SELF | V, {0}, "self shorthand", None),
    ("shorthand.all-including", 0, r.APIC_DEST_ALLINC | V, {0, 1}, "all-including-self", None),
    ("shorthand.all-excluding", 0, r.APIC_DEST_ALLBUT | V, {1}, "all-excluding-self", None),
    ("physical.broadcast", 0xFF << 24, V, {0, 1}, "physical broadcast 0xff", None),
    ("logical.flat", 0x02 << 24, LOGICAL | V, {1}, "logical flat, mask 0x02", _flat),
    ("logical.flat-multi", 0x03 << 24, LOGICAL | V, {0, 1}, "logical flat, mask 0x03", _flat),
    ("logical.cluster", 0x12 << 24, LOGICAL | V, {1}, "logical cluster 1, member 0x2", _cluster),
    ("logical.cluster-other", 0x22 << 24, LOGICAL | V, set(), "logical cluster 2", _cluster),
]:
    CASES.add(
        f"ipi.{_suffix}",
        f"xAPIC ICR: {_what} reaches exactly the matching vCPUs",
        MUST,
        "protocol.md §7.8; SDM 10.6.2; KVM kvm_apic_match_dest",
        _xapic_case(_icr2, _icr, _expect, _what, _setup),
    )


@CASES.case(
    "ipi.target-disabled",
    "an IPI to a software-disabled APIC is dropped",
    MUST,
    "protocol.md §7.8; KVM __apic_accept_irq",
)
def target_disabled(ctx: c.Ctx) -> Gen:
    ctx.require_vcpus(2)
    yield from session(ctx, 0)
    yield from enable_apic(ctx, 0)
    yield from session(ctx, 1)  # reset: SVR 0xff, software-disabled
    yield c.Mark(1)
    yield from apic_write(ctx, 0, r.APIC_ICR2, 1 << 24)
    yield from apic_write(ctx, 0, r.APIC_ICR, V)
    later = yield c.Collect(1, 60, (m.Inject,))
    ctx.check(
        "vCPU 1 gets nothing",
        not injected(later, V),
        "no inject",
        [c.describe(a.msg) for a in later if a.msg],
    )


@CASES.case(
    "ipi.x2apic.physical",
    "x2APIC ICR (one 64-bit MSR) to x2APIC ID 1",
    MUST,
    "protocol.md §7.8; SDM 10.12.9",
)
def x2apic_physical(ctx: c.Ctx) -> Gen:
    yield from _pair(ctx, x2apic=True)
    sent = yield from x2_write(ctx, 0, r.APIC_ICR, (1 << 32) | V)
    yield from _receivers(ctx, sent, {1}, "x2APIC physical IPI")


@CASES.case(
    "ipi.x2apic.self-ipi",
    "the SELF_IPI MSR interrupts the sender before its reply",
    MUST,
    "protocol.md §4.2, §7.8; SDM 10.12.11",
)
def x2apic_self(ctx: c.Ctx) -> Gen:
    yield from _pair(ctx, x2apic=True)
    sent = yield from x2_write(ctx, 0, r.APIC_SELF_IPI, V)
    yield from _receivers(ctx, sent, {0}, "SELF_IPI")


# ---------------------------------------------------------------------- PV send-IPI


def _pv(ctx: c.Ctx) -> Gen:
    ctx.require(Feature.PV_SEND_IPI)
    yield from _pair(ctx)


@CASES.case(
    "ipi.pv.send",
    "KVM_HC_SEND_IPI delivers to the bitmap and returns the count",
    MUST,
    "protocol.md §7.5; KVM kvm_pv_send_ipi",
)
def pv_send(ctx: c.Ctx) -> Gen:
    yield from _pv(ctx)
    done = yield from hypercall(ctx, 0, Hypercall.KVM_HC_SEND_IPI, 0b10, 0, 0, V)
    ctx.equal("RAX: the number of vCPUs delivered to", 1, done.value)
    yield from _receivers(ctx, done, {1}, "PV send-IPI to APIC ID 1")


@CASES.case("ipi.pv.send-self", "KVM_HC_SEND_IPI may include the sender", MUST, "protocol.md §7.5")
def pv_send_self(ctx: c.Ctx) -> Gen:
    yield from _pv(ctx)
    done = yield from hypercall(ctx, 0, Hypercall.KVM_HC_SEND_IPI, 0b11, 0, 0, V)
    ctx.equal("RAX", 2, done.value)
    yield from _receivers(ctx, done, {0, 1}, "PV send-IPI to APIC IDs 0 and 1")


for _suffix, _args, _expected, _what in [
    ("logical", (0b10, 0, 0, LOGICAL | V), -KvmErrno.KVM_EINVAL, "a logical ICR"),
    ("shorthand", (0b10, 0, 0, r.APIC_DEST_ALLBUT | V), -KvmErrno.KVM_EINVAL, "a shorthand ICR"),
    ("few-args", (0b10, 0, 0), -KvmErrno.KVM_EINVAL, "three arguments"),
    ("min-beyond", (0b1, 0, 4096, V), 0, "min beyond every APIC ID"),
]:

    def _pv_error(
        ctx: c.Ctx, args: tuple[int, ...] = _args, expected: int = _expected, what: str = _what
    ) -> Gen:
        yield from _pv(ctx)
        done = yield from hypercall(ctx, 0, Hypercall.KVM_HC_SEND_IPI, *args)
        ctx.equal(f"KVM_HC_SEND_IPI with {what}: RAX", expected, done.value)
        later = yield c.Collect(1, 40, (m.Inject,))
        ctx.check(
            "nobody is interrupted",
            not injected(later, V),
            "no inject",
            [c.describe(a.msg) for a in later if a.msg],
        )

    CASES.add(
        f"ipi.pv.{_suffix}",
        f"KVM_HC_SEND_IPI with {_what} returns {_expected}",
        MUST,
        "protocol.md §7.2, §7.5",
        _pv_error,
    )


@CASES.case(
    "ipi.pv.not-negotiated",
    "KVM_HC_SEND_IPI without PV_SEND_IPI is -KVM_ENOSYS",
    MUST,
    "protocol.md §7.1",
)
def pv_not_negotiated(ctx: c.Ctx) -> Gen:
    yield from _pair(ctx, features=c.ALL_FEATURES & ~Feature.PV_SEND_IPI)
    done = yield from hypercall(ctx, 0, Hypercall.KVM_HC_SEND_IPI, 0b10, 0, 0, V)
    ctx.equal("RAX", -KvmErrno.KVM_ENOSYS, done.value)


# ---------------------------------------------------------------------- cpu_online_mask


def _mask_bit(arrival: c.Arrival | None, vcpu: int) -> bool:
    msg = arrival.msg if arrival is not None else None
    return (
        isinstance(msg, m.OnlineMask)
        and len(msg.mask) > vcpu // 8
        and bool(msg.mask[vcpu // 8] >> (vcpu % 8) & 1)
    )


@CASES.case(
    "ipi.online-mask",
    "cpu_online_mask is one page: a cpu-online store reaches the online vCPUs in "
    "online-mask, a forged one is refused, a new session reads the page after its welcome",
    MUST,
    "protocol.md §4.6",
)
def online_mask(ctx: c.Ctx) -> Gen:
    ctx.require_vcpus(3)
    welcome = None
    for vcpu in (0, 1):
        welcome = yield from session(ctx, vcpu)
    assert welcome is not None
    size = (welcome.vcpus + 7) // 8
    # set_cpu_online: a store, no reply (vCPU 1 is online: a booting CPU reads no mask)
    yield c.Send(1, m.CpuOnline(cpu=1))
    yield c.Mark(1)
    yield c.Send(0, m.CpuOnline(cpu=0))
    got = yield c.Await(1, (m.OnlineMask,), 1000, match=lambda a: _mask_bit(a, 0))
    ctx.check(
        "vCPU 1 reads vCPU 0 online: an online-mask with bit 0 (at most a tick later)",
        _mask_bit(got, 0) and _mask_bit(got, 1),
        "online-mask with bits 0 and 1",
        c.describe(got.msg) if got is not None and got.msg else "none within 1 s",
    )
    if got is not None and isinstance(got.msg, m.OnlineMask):
        ctx.equal("the mask's size: ceil(vcpus / 8) bytes", size, len(got.msg.mask))
    yield c.Send(0, m.CpuOnline(cpu=2))  # vCPU 0 claims vCPU 2's bit: refused
    later = yield c.Collect(1, 100, (m.OnlineMask,))
    ctx.check(
        "a cpu-online for another vCPU changes nothing",
        not any(_mask_bit(a, 2) for a in later),
        "no online-mask with bit 2",
        [c.describe(a.msg) for a in later if a.msg],
    )
    yield from session(ctx, 2)  # vCPU 2, still booting, reads the page at its welcome
    got = yield c.Await(2, (m.OnlineMask,), 500)
    ctx.check(
        "a new session reads the page right after its welcome",
        _mask_bit(got, 0) and _mask_bit(got, 1) and not _mask_bit(got, 2),
        "online-mask with bits 0 and 1, not 2",
        c.describe(got.msg) if got is not None and got.msg else "none within 500 ms",
    )
