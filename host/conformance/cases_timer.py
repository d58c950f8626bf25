"""Host cases, suite ``lapic.timer`` / ``lapic.tscdeadline``: the LAPIC timer.

Timing without sleeping on guesses: every expiry check compares the host's own
``inject.host_time`` with a bound the runner knows for sure (the host handled the
programming exit after the runner sent it, so ``host_time >= sent + period`` is the
never-early rule), and the divisor is measured from two TMCCT reads, each bracketed by
its send and reply times.  Rates and bounds are KVM's: the bus runs at 1 GHz divided by
the TDCR divisor (``docs/protocol.md`` §6.3), a periodic period is at least 200 us.
"""

from __future__ import annotations

from collections.abc import Callable

from vtick.host.conformance import case as c
from vtick.host.conformance.lib import (
    Gen,
    apic_read,
    apic_write,
    await_inject,
    enable_apic,
    eoi,
    exit_,
    injected,
    rdmsr,
    session,
    tsc_model,
    wrmsr,
)
from vtick.proto import apicdef as r
from vtick.proto import messages as m
from vtick.proto.clockmath import tdcr_divisor

__all__ = ["CASES", "TDCR_VALUES"]

CASES = c.Registry()
MUST = c.Level.MUST
TIMER = 0xEC
ONESHOT, PERIODIC, DEADLINE = (
    r.APIC_LVT_TIMER_ONESHOT,
    r.APIC_LVT_TIMER_PERIODIC,
    r.APIC_LVT_TIMER_TSCDEADLINE,
)
MASKED = r.APIC_LVT_MASKED
TSC_DEADLINE = r.MSR_IA32_TSC_DEADLINE
TDCR_VALUES = (0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA, 0xB)
#: one-shot period of the TDCR cases
PERIOD_NS = 80_000_000


def _vcpu(ctx: c.Ctx) -> int:
    return 1 if ctx.vcpus >= 2 else 0


def _tmcct(ctx: c.Ctx, vcpu: int) -> Gen:
    done = yield from exit_(
        ctx, vcpu, m.ExitMmioRead(gpa=r.APIC_DEFAULT_BASE + r.APIC_TMCCT, size=4)
    )
    return done


def _tdcr_case(tdcr: int) -> Callable[[c.Ctx], Gen]:
    divisor = tdcr_divisor(tdcr)
    count = PERIOD_NS // divisor

    def measure(ctx: c.Ctx, vcpu: int) -> Gen:
        """Start the one-shot and read TMCCT twice; None if the host answered so slowly
        that the timer may have expired between the reads (a loaded machine)."""
        yield c.Mark(vcpu)
        start = yield from apic_write(ctx, vcpu, r.APIC_TMICT, count)
        first = yield from _tmcct(ctx, vcpu)
        yield c.Pause(4)
        second = yield from _tmcct(ctx, vcpu)
        if second.replied >= start.sent + PERIOD_NS:
            ctx.note(f"TMCCT answered {(second.replied - start.sent) // 10**6} ms after TMICT")
            yield from apic_write(ctx, vcpu, r.APIC_TMICT, 0)
            return None
        return start, first, second

    def script(ctx: c.Ctx) -> Gen:
        vcpu = _vcpu(ctx)
        yield from session(ctx, vcpu)
        yield from enable_apic(ctx, vcpu)
        yield from apic_write(ctx, vcpu, r.APIC_TDCR, tdcr)
        yield from apic_write(ctx, vcpu, r.APIC_LVTT, ONESHOT | TIMER)
        measured = None
        for _ in range(3):
            measured = yield from measure(ctx, vcpu)
            if measured is not None:
                break
        ctx.check(
            "TMCCT was read while the timer ran (3 tries)",
            measured is not None,
            f"two reads within {PERIOD_NS // 10**6} ms",
            "the host answered too slowly",
        )
        if measured is None:
            return
        start, first, second = measured
        c1, c2 = first.value, second.value
        early = count - (first.replied - start.sent) // divisor - 1
        ctx.check(
            f"TMCCT starts from TMICT={count} and counts down",
            early <= c1 <= count,
            f"{early}..{count}",
            c1,
        )
        lo = (second.sent - first.replied) // divisor - 1
        hi = (second.replied - first.sent) // divisor + 1
        ctx.check(
            f"TMCCT falls at 1 GHz / {divisor} between two reads",
            lo <= c1 - c2 <= hi,
            f"{lo}..{hi} ticks",
            c1 - c2,
        )
        got = yield from await_inject(vcpu, TIMER, PERIOD_NS // 10**6 + 2000)
        ctx.check("the one-shot fires (inject 0xec)", got is not None, "inject 0xec", "none")
        if got is not None:
            assert isinstance(got.msg, m.Inject)
            bound = start.sent + count * divisor
            ctx.check(
                "never early: inject.host_time >= TMICT write + TMICT x divisor ns",
                got.msg.host_time >= bound,
                f">= {bound}",
                got.msg.host_time,
            )
            after = yield from _tmcct(ctx, vcpu)
            ctx.equal("TMCCT reads 0 once the one-shot fired", 0, after.value)

    return script


for _tdcr in TDCR_VALUES:
    CASES.add(
        f"lapic.timer.tdcr.{_tdcr:x}",
        f"one-shot with TDCR {_tdcr:#x} (divide by {tdcr_divisor(_tdcr)}): rate, expiry, "
        "never early",
        MUST,
        "protocol.md §6.3, §7.8; SDM 10.5.4; KVM apic_get_tmcct",
        _tdcr_case(_tdcr),
    )


@CASES.case(
    "lapic.timer.tmict-zero", "TMICT = 0 stops the timer", MUST, "protocol.md §7.8; SDM 10.5.4"
)
def tmict_zero(ctx: c.Ctx) -> Gen:
    vcpu = _vcpu(ctx)
    yield from session(ctx, vcpu)
    yield from enable_apic(ctx, vcpu)
    yield from apic_write(ctx, vcpu, r.APIC_TDCR, 0xB)
    yield from apic_write(ctx, vcpu, r.APIC_LVTT, ONESHOT | TIMER)
    yield c.Mark(vcpu)
    yield from apic_write(ctx, vcpu, r.APIC_TMICT, 20_000_000)
    yield from apic_write(ctx, vcpu, r.APIC_TMICT, 0)
    value = yield from apic_read(ctx, vcpu, r.APIC_TMCCT)
    ctx.equal("TMCCT after TMICT = 0", 0, value)
    later = yield c.Collect(vcpu, 40, (m.Inject,))
    ctx.check(
        "the stopped timer does not fire",
        not injected(later, TIMER),
        "no inject",
        [c.describe(a.msg) for a in later if a.msg],
    )


@CASES.case(
    "lapic.timer.masked",
    "a masked LVTT drops the tick while the timer counts",
    MUST,
    "protocol.md §7.8; SDM 10.5.1",
)
def masked(ctx: c.Ctx) -> Gen:
    vcpu = _vcpu(ctx)
    yield from session(ctx, vcpu)
    yield from enable_apic(ctx, vcpu)
    yield from apic_write(ctx, vcpu, r.APIC_TDCR, 0xB)
    yield from apic_write(ctx, vcpu, r.APIC_LVTT, MASKED | ONESHOT | TIMER)
    yield c.Mark(vcpu)
    yield from apic_write(ctx, vcpu, r.APIC_TMICT, 10_000_000)
    value = yield from apic_read(ctx, vcpu, r.APIC_TMCCT)
    ctx.check("TMCCT counts while masked", 0 < value <= 10_000_000, "0 < TMCCT <= TMICT", value)
    later = yield c.Collect(vcpu, 30, (m.Inject,))
    ctx.check(
        "no interrupt from a masked LVTT",
        not injected(later, TIMER),
        "no inject",
        [c.describe(a.msg) for a in later if a.msg],
    )
    value = yield from apic_read(ctx, vcpu, r.APIC_TMCCT)
    ctx.equal("TMCCT reads 0 after the masked one-shot expired", 0, value)


@CASES.case(
    "lapic.timer.periodic.min-period",
    "a periodic period below 200 us is raised to 200 us (KVM's min_timer_period_us)",
    MUST,
    "protocol.md §7.8; KVM limit_periodic_timer_frequency",
)
def periodic_min_period(ctx: c.Ctx) -> Gen:
    vcpu = _vcpu(ctx)
    yield from session(ctx, vcpu)
    yield from enable_apic(ctx, vcpu)
    yield from apic_write(ctx, vcpu, r.APIC_LVTT, MASKED | PERIODIC | TIMER)
    # TDCR at its reset value (divide by 2), so this case does not depend on TDCR:
    # TMICT 50000 is a 100 us period.  Not clamped, TMCCT never exceeds TMICT, whatever
    # the timing (and a host without the clamp still copes with 10000 expiries a second,
    # where 1 us would stall it).  Clamped to 200 us, TMCCT runs through 100000 ticks; it
    # reads above 50000 in the first half of a period after an expiry, which a host whose
    # timers fire late still shows now and then: a host that re-arms a period late by L
    # shows at most 100000 - L/2 ns worth of ticks right after, so on a loaded machine
    # whose wake-ups take about 100 us only the fast ones count.  Up to 2000 reads
    # (under a second), stopping at the first.
    yield from apic_write(ctx, vcpu, r.APIC_TMICT, 50_000)
    values = []
    for _ in range(2000):
        value = yield from apic_read(ctx, vcpu, r.APIC_TMCCT)
        values.append(value)
        if value > 50_000:
            break
    yield from apic_write(ctx, vcpu, r.APIC_TMICT, 0)
    ctx.check(
        "TMCCT counts through a 200 us period (some read above TMICT = 50000)",
        max(values) > 50_000,
        "some read > 50000",
        f"{len(values)} reads, the largest {max(values)}",
    )
    ctx.check("and never beyond 200 us of ticks", max(values) <= 100_000, "<= 100000", values)


@CASES.case(
    "lapic.timer.periodic",
    "a periodic timer fires every period from the previous target, never early",
    MUST,
    "protocol.md §7.8; SDM 10.5.4",
)
def periodic(ctx: c.Ctx) -> Gen:
    vcpu = _vcpu(ctx)
    period = 3_000_000
    yield from session(ctx, vcpu)
    yield from enable_apic(ctx, vcpu)
    yield from apic_write(ctx, vcpu, r.APIC_TDCR, 0xB)
    yield from apic_write(ctx, vcpu, r.APIC_LVTT, PERIODIC | TIMER)
    yield c.Mark(vcpu)
    start = yield from apic_write(ctx, vcpu, r.APIC_TMICT, period)
    for k in (1, 2, 3):
        got = yield from await_inject(vcpu, TIMER, 2000)
        ctx.check(f"tick {k} fires", got is not None, "inject 0xec", "none")
        if got is None:
            break
        assert isinstance(got.msg, m.Inject)
        ctx.check(
            f"tick {k} not before start + {k} periods",
            got.msg.host_time >= start.sent + k * period,
            f">= {start.sent + k * period}",
            got.msg.host_time,
        )
        yield from eoi(ctx, vcpu)
    yield from apic_write(ctx, vcpu, r.APIC_TMICT, 0)


@CASES.case(
    "lapic.timer.mode-switch.periodic",
    "switching one-shot to periodic keeps TMICT and the running count",
    MUST,
    "protocol.md §7.8; KVM apic_update_lvtt",
)
def mode_switch_periodic(ctx: c.Ctx) -> Gen:
    vcpu = _vcpu(ctx)
    yield from session(ctx, vcpu)
    yield from enable_apic(ctx, vcpu)
    yield from apic_write(ctx, vcpu, r.APIC_TDCR, 0xB)
    yield from apic_write(ctx, vcpu, r.APIC_LVTT, MASKED | ONESHOT | TIMER)
    yield from apic_write(ctx, vcpu, r.APIC_TMICT, 1_000_000_000)
    before = yield from apic_read(ctx, vcpu, r.APIC_TMCCT)
    yield from apic_write(ctx, vcpu, r.APIC_LVTT, MASKED | PERIODIC | TIMER)
    tmict = yield from apic_read(ctx, vcpu, r.APIC_TMICT)
    after = yield from apic_read(ctx, vcpu, r.APIC_TMCCT)
    yield from apic_write(ctx, vcpu, r.APIC_TMICT, 0)
    ctx.equal("TMICT kept", 1_000_000_000, tmict)
    ctx.check("TMCCT keeps counting down", 0 < after < before, f"0 < TMCCT < {before}", after)


@CASES.case(
    "lapic.timer.mode-switch.tscdeadline",
    "switching into TSC-deadline mode stops the count and clears TMICT",
    MUST,
    "protocol.md §7.8; KVM apic_update_lvtt",
)
def mode_switch_deadline(ctx: c.Ctx) -> Gen:
    vcpu = _vcpu(ctx)
    yield from session(ctx, vcpu)
    yield from enable_apic(ctx, vcpu)
    yield from apic_write(ctx, vcpu, r.APIC_LVTT, MASKED | ONESHOT | TIMER)
    yield from apic_write(ctx, vcpu, r.APIC_TMICT, 1_000_000_000)
    yield from apic_write(ctx, vcpu, r.APIC_LVTT, MASKED | DEADLINE | TIMER)
    tmict = yield from apic_read(ctx, vcpu, r.APIC_TMICT)
    tmcct = yield from apic_read(ctx, vcpu, r.APIC_TMCCT)
    ctx.equal("TMICT cleared", 0, tmict)
    ctx.equal("TMCCT reads 0 in TSC-deadline mode", 0, tmcct)


# ---------------------------------------------------------------------- TSC-deadline


def _deadline_mode(ctx: c.Ctx, vcpu: int) -> Gen:
    welcome = yield from session(ctx, vcpu)
    yield from enable_apic(ctx, vcpu)
    yield from apic_write(ctx, vcpu, r.APIC_LVTT, DEADLINE | TIMER)
    yield c.Mark(vcpu)
    return tsc_model(welcome)


@CASES.case(
    "lapic.tscdeadline.past",
    "a deadline already reached fires within the WRMSR: the inject comes before its reply",
    MUST,
    "protocol.md §4.2; KVM kvm_set_lapic_tscdeadline_msr; kvm-unit-tests tscdeadline",
)
def deadline_past(ctx: c.Ctx) -> Gen:
    vcpu = _vcpu(ctx)
    yield from _deadline_mode(ctx, vcpu)
    done = yield from wrmsr(ctx, vcpu, TSC_DEADLINE, 1)
    ctx.check(
        "inject 0xec before the WRMSR's exit-reply",
        bool(injected(done.during, TIMER)),
        "inject, then exit-reply",
        "exit-reply first",
    )
    value = yield from rdmsr(ctx, vcpu, TSC_DEADLINE)
    ctx.equal("TSC_DEADLINE reads 0 after firing", 0, value.value)


@CASES.case(
    "lapic.tscdeadline.future",
    "a future deadline fires once the guest TSC reaches it, never early",
    MUST,
    "protocol.md §6.1, §7.8",
)
def deadline_future(ctx: c.Ctx) -> Gen:
    vcpu = _vcpu(ctx)
    tsc = yield from _deadline_mode(ctx, vcpu)
    now = yield c.Now()
    deadline = tsc.tsc(now) + tsc.tsc_khz * 5  # 5 ms of cycles
    done = yield from wrmsr(ctx, vcpu, TSC_DEADLINE, deadline)
    ctx.check("no inject within the WRMSR", not injected(done.during), "none", done.during)
    got = yield from await_inject(vcpu, TIMER, 2000)
    ctx.check("the deadline fires", got is not None, "inject 0xec", "none")
    if got is not None:
        assert isinstance(got.msg, m.Inject)
        bound = tsc.host_ns_for_tsc(deadline)
        ctx.check(
            "never early: host_time >= the first ns the guest TSC reads the deadline",
            got.msg.host_time >= bound,
            f">= {bound}",
            got.msg.host_time,
        )
    value = yield from rdmsr(ctx, vcpu, TSC_DEADLINE)
    ctx.equal("TSC_DEADLINE reads 0 after firing", 0, value.value)


@CASES.case(
    "lapic.tscdeadline.zero",
    "writing 0 disarms the deadline",
    MUST,
    "protocol.md §7.8; SDM 10.5.4.1",
)
def deadline_zero(ctx: c.Ctx) -> Gen:
    vcpu = _vcpu(ctx)
    tsc = yield from _deadline_mode(ctx, vcpu)
    now = yield c.Now()
    yield from wrmsr(ctx, vcpu, TSC_DEADLINE, tsc.tsc(now) + tsc.tsc_khz * 20)
    yield from wrmsr(ctx, vcpu, TSC_DEADLINE, 0)
    value = yield from rdmsr(ctx, vcpu, TSC_DEADLINE)
    ctx.equal("TSC_DEADLINE reads 0", 0, value.value)
    later = yield c.Collect(vcpu, 50, (m.Inject,))
    ctx.check(
        "the disarmed deadline does not fire",
        not injected(later, TIMER),
        "no inject",
        [c.describe(a.msg) for a in later if a.msg],
    )


@CASES.case(
    "lapic.tscdeadline.rearm",
    "a new deadline replaces the armed one",
    MUST,
    "protocol.md §7.8; SDM 10.5.4.1",
)
def deadline_rearm(ctx: c.Ctx) -> Gen:
    vcpu = _vcpu(ctx)
    tsc = yield from _deadline_mode(ctx, vcpu)
    now = yield c.Now()
    far = tsc.tsc(now) + tsc.tsc_khz * 400
    near = tsc.tsc(now) + tsc.tsc_khz * 5
    yield from wrmsr(ctx, vcpu, TSC_DEADLINE, far)
    value = yield from rdmsr(ctx, vcpu, TSC_DEADLINE)
    ctx.equal("RDMSR returns the armed deadline", far, value.value)
    yield from wrmsr(ctx, vcpu, TSC_DEADLINE, near)
    got = yield from await_inject(vcpu, TIMER, 2000)
    ctx.check("the new (earlier) deadline fires", got is not None, "inject 0xec", "none")
    if got is not None:
        assert isinstance(got.msg, m.Inject)
        lo, hi = tsc.host_ns_for_tsc(near), tsc.host_ns_for_tsc(far)
        ctx.check(
            "at the new deadline, not the old",
            lo <= got.msg.host_time < hi,
            f"{lo}..{hi}",
            got.msg.host_time,
        )
    value = yield from rdmsr(ctx, vcpu, TSC_DEADLINE)
    ctx.equal("nothing stays armed (RDMSR 0)", 0, value.value)


@CASES.case(
    "lapic.tscdeadline.other-mode",
    "TSC_DEADLINE is ignored outside TSC-deadline mode",
    MUST,
    "protocol.md §7.8; KVM kvm_set_lapic_tscdeadline_msr",
)
def deadline_other_mode(ctx: c.Ctx) -> Gen:
    vcpu = _vcpu(ctx)
    welcome = yield from session(ctx, vcpu)
    tsc = tsc_model(welcome)
    yield from enable_apic(ctx, vcpu)
    yield from apic_write(ctx, vcpu, r.APIC_LVTT, ONESHOT | TIMER)
    yield c.Mark(vcpu)
    now = yield c.Now()
    yield from wrmsr(ctx, vcpu, TSC_DEADLINE, tsc.tsc(now) + tsc.tsc_khz)
    value = yield from rdmsr(ctx, vcpu, TSC_DEADLINE)
    ctx.equal("TSC_DEADLINE reads 0 in one-shot mode", 0, value.value)
    later = yield c.Collect(vcpu, 30, (m.Inject,))
    ctx.check(
        "nothing fires",
        not injected(later, TIMER),
        "no inject",
        [c.describe(a.msg) for a in later if a.msg],
    )
