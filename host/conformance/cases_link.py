"""Host cases, suite ``link``: numbering, acks, duplicates, gaps, retransmission and resume
(``docs/protocol.md`` §5 and §3.6)."""

from __future__ import annotations

from vtick.host.conformance import case as c
from vtick.host.conformance.lib import (
    TEST_VECTOR,
    Gen,
    apic_write,
    await_inject,
    enable_apic,
    eoi,
    exit_,
    injected,
    rdmsr,
    session,
)
from vtick.proto import apicdef as r
from vtick.proto import messages as m
from vtick.proto.errors import ErrorCode

__all__ = ["CASES"]

CASES = c.Registry()
MUST, SHOULD = c.Level.MUST, c.Level.SHOULD
APIC_BASE = r.MSR_IA32_APICBASE


@CASES.case(
    "link.reply", "exit-reply names its exit and acknowledges it", MUST, "protocol.md §4.1, §5.1"
)
def reply_names_exit(ctx: c.Ctx) -> Gen:
    yield from session(ctx, 0)
    for _ in range(3):
        done = yield from rdmsr(ctx, 0, APIC_BASE)
        assert done.reply is not None
        ctx.equal(f"exit {done.seq}: reply.re", done.seq, done.reply.re)
        ctx.check(
            f"exit {done.seq}: the reply's a acknowledges it",
            (done.reply_ack or 0) >= done.seq,
            f">= {done.seq}",
            done.reply_ack,
        )


@CASES.case(
    "link.duplicate", "a duplicate exit frame is not executed again", MUST, "protocol.md §5.3"
)
def duplicate(ctx: c.Ctx) -> Gen:
    yield from session(ctx, 0)
    done = yield from rdmsr(ctx, 0, APIC_BASE)
    yield c.SendRaw(0, done.frame)
    later = yield c.Collect(0, 200, (m.ExitReply,), include_dups=True)
    again = [
        a
        for a in later
        if isinstance(a.msg, m.ExitReply) and a.msg.re == done.seq and a.seq != done.reply_seq
    ]
    ctx.check(
        "no second reply to the same exit",
        not again,
        "none",
        [c.describe(a.msg) for a in again if a.msg],
    )


@CASES.case(
    "link.duplicate.ack", "a duplicate makes the host acknowledge again", SHOULD, "protocol.md §5.3"
)
def duplicate_ack(ctx: c.Ctx) -> Gen:
    yield from session(ctx, 0)
    done = yield from rdmsr(ctx, 0, APIC_BASE)
    yield c.Mark(0)
    yield c.SendRaw(0, done.frame)
    ack = yield c.Await(0, (m.Ack,), 1000, match=lambda a: a.ack >= done.seq)
    ctx.check("a bare ack within 1 s", ack is not None, f"ack {{a >= {done.seq}}}", "none")


@CASES.case("link.replay.icr", "a replayed ICR write sends one IPI", MUST, "protocol.md §5.3")
def replay_icr(ctx: c.Ctx) -> Gen:
    ctx.require_vcpus(2)
    yield from session(ctx, 0)
    yield from session(ctx, 1)
    yield from enable_apic(ctx, 0)
    yield from enable_apic(ctx, 1)
    yield c.Mark(1)
    yield from apic_write(ctx, 0, r.APIC_ICR2, 1 << 24)
    done = yield from apic_write(ctx, 0, r.APIC_ICR, TEST_VECTOR)
    first = yield from await_inject(1, TEST_VECTOR)
    ctx.check("the ICR write sends the IPI", first is not None, f"inject {TEST_VECTOR:#x}", "none")
    yield from eoi(ctx, 1)
    yield c.SendRaw(0, done.frame)  # the same frame, same number: a replay
    later = yield c.Collect(1, 200, (m.Inject,))
    ctx.check(
        "the replay sends no second IPI",
        not injected(later, TEST_VECTOR),
        "no inject",
        [c.describe(a.msg) for a in later if a.msg],
    )


@CASES.case(
    "link.gap",
    "a gap is answered with ack {resend} and nothing runs out of order",
    MUST,
    "protocol.md §5.4",
)
def gap(ctx: c.Ctx) -> Gen:
    yield from session(ctx, 0)
    lost = yield c.Drop(0, m.Trace())
    seq = yield c.Exit(0, m.ExitMsrRead(msr=APIC_BASE), wait=False)
    resend = yield c.Await(
        0, (m.Ack,), 1000, match=lambda a: isinstance(a.msg, m.Ack) and bool(a.msg.resend)
    )
    ctx.check("the host asks for a resend", resend is not None, "ack {resend: true}", "none")
    if resend is not None:
        ctx.equal("ack.a: the last frame delivered before the gap", seq - 2, resend.ack)
    done = yield c.AwaitReply(0, seq)
    ctx.check(
        "after the retransmission the exit is answered",
        done.reply is not None,
        "exit-reply",
        "none",
    )
    if resend is not None and done.replied is not None:
        ctx.check(
            "it was not executed before the missing frame came",
            done.replied > resend.t,
            "reply after the resend request",
            "reply before it",
        )
    ctx.note(f"lost frame: {lost.hex()}")


@CASES.case(
    "link.ack.bare",
    "a frame that needs no reply is acknowledged by a bare ack",
    SHOULD,
    "protocol.md §5.2",
)
def bare_ack(ctx: c.Ctx) -> Gen:
    yield from session(ctx, 0)
    yield c.Mark(0)
    seq = yield c.Send(0, m.Trace())
    ack = yield c.Await(0, (m.Ack,), 1000, match=lambda a: a.ack >= seq)
    ctx.check(
        "a bare ack within 1 s (vtick's host acks within 10 ms)",
        ack is not None,
        f"ack {{a >= {seq}}}",
        "none",
    )


@CASES.case(
    "link.retransmit",
    "an unacknowledged host frame is sent again after the RTO",
    SHOULD,
    "protocol.md §5.5",
)
def retransmit(ctx: c.Ctx) -> Gen:
    yield from session(ctx, 0)
    yield c.HoldAcks(0)
    done = yield from rdmsr(ctx, 0, APIC_BASE)
    again = yield c.Await(
        0,
        (m.ExitReply,),
        1500,
        include_dups=True,
        match=lambda a: a.seq == done.reply_seq and a.dup,
    )
    ctx.check(
        "the reply is retransmitted within 1.5 s (RTO 500 ms)",
        again is not None,
        f"exit-reply s={done.reply_seq} again",
        "none",
    )
    if again is not None:
        ctx.equal("with the same content", done.reply, again.msg)
    yield c.HoldAcks(0, hold=False)


@CASES.case(
    "link.resume",
    "a resume hello on a new pipe continues the session and the host "
    "retransmits what was not acknowledged",
    MUST,
    "protocol.md §3.6",
)
def resume(ctx: c.Ctx) -> Gen:
    w = yield from session(ctx, 0)
    yield c.HoldAcks(0)
    done = yield from rdmsr(ctx, 0, APIC_BASE)
    assert done.reply_seq is not None
    yield c.Redial(0)
    # pretend the reply was lost with the old pipe: acknowledge only what came before
    answer = yield c.Hello(0, resume=w.session, ack=done.reply_seq - 1, timeout_ms=3000)
    msg = answer.msg
    ok = isinstance(msg, m.Welcome) and bool(msg.resumed) and msg.session == w.session
    ctx.check(
        "welcome {resumed: true} for the same session",
        ok,
        f"welcome {{resumed: true, session: {w.session:#x}}}",
        msg or "no answer",
    )
    again = yield c.Await(
        0, (m.ExitReply,), 1000, include_dups=True, match=lambda a: a.seq == done.reply_seq
    )
    ctx.check(
        "the unacknowledged reply is sent again on the new pipe",
        again is not None,
        f"exit-reply s={done.reply_seq}",
        "none",
    )
    yield c.HoldAcks(0, hold=False)
    if ok:
        after = yield from exit_(ctx, 0, m.ExitMsrRead(msr=APIC_BASE))
        ctx.equal("exits go on in the resumed session (APIC_BASE)", done.value, after.value)


@CASES.case(
    "link.resume.ack-beyond",
    "a resume acknowledging more than was sent gets an error; a correct resume still works",
    MUST,
    "protocol.md §3.6",
)
def resume_ack_beyond(ctx: c.Ctx) -> Gen:
    w = yield from session(ctx, 0)
    done = yield from rdmsr(ctx, 0, APIC_BASE)
    assert done.reply_seq is not None
    yield c.Redial(0)
    bad = yield c.Hello(0, resume=w.session, ack=done.reply_seq + 5, timeout_ms=3000)
    ctx.check(
        "error UNEXPECTED",
        isinstance(bad.msg, m.Error) and bad.msg.code == ErrorCode.UNEXPECTED,
        "error {code: 9}",
        bad.msg or "none",
    )
    good = yield c.Hello(0, resume=w.session, ack=done.reply_seq, timeout_ms=3000)
    ctx.check(
        "a correct resume is then welcomed",
        isinstance(good.msg, m.Welcome) and bool(good.msg.resumed),
        "welcome {resumed: true}",
        good.msg or "none",
    )
