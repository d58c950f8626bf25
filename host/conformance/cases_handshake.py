"""Host cases, suite ``handshake``: hello, welcome, refuse (``docs/protocol.md`` §3)."""

from __future__ import annotations

from vtick.host.conformance import case as c
from vtick.host.conformance.lib import Gen, apic_read, apic_write, enable_apic, hypercall, session
from vtick.proto import apicdef as r
from vtick.proto import messages as m
from vtick.proto.abi import Feature, Hypercall, KvmErrno, Msr
from vtick.proto.codec import encode
from vtick.proto.errors import ErrorCode

__all__ = ["CASES"]

CASES = c.Registry()
MUST, SHOULD = c.Level.MUST, c.Level.SHOULD
LVR = 0x0005_0014


def refused(ctx: c.Ctx, answer: c.HelloAnswer, code: ErrorCode, what: str) -> None:
    msg = answer.msg
    ctx.check(
        f"{what}: refused with {code.name} ({int(code)})",
        isinstance(msg, m.Refuse) and msg.code == code,
        f"refuse {{code: {int(code)}}}",
        msg if msg is not None else "no answer",
    )
    ctx.check(f"{what}: the host closes that pipe", answer.closed, "pipe closed", "pipe open")


@CASES.case("handshake.welcome", "a valid hello gets a welcome", MUST, "protocol.md §3.1")
def welcome_fields(ctx: c.Ctx) -> Gen:
    w = yield from session(ctx, 0)
    ctx.equal("welcome.vcpu", 0, w.vcpu)
    ctx.equal("welcome.version", 1, w.version)
    ctx.check(
        "welcome.features within hello.features",
        not w.features & ~c.ALL_FEATURES,
        f"subset of {c.ALL_FEATURES:#x}",
        w.features,
    )
    ctx.check("welcome.session is not 0", w.session != 0, "non-zero", w.session)
    ctx.check("welcome.vcpus counts this vCPU", w.vcpus >= 1, ">= 1", w.vcpus)
    ctx.check("welcome.tsc_khz", w.tsc_khz > 0, "> 0", w.tsc_khz)
    ctx.check("welcome.max_message", w.max_message >= 4096, ">= 4096", w.max_message)
    version = w.pvclock["version"]
    ctx.check("welcome.pvclock.version is even", version % 2 == 0, "even", version)


@CASES.case(
    "handshake.version.higher",
    "a newer vCPU version is answered with version 1",
    MUST,
    "protocol.md §3.1, §7.1",
)
def version_higher(ctx: c.Ctx) -> Gen:
    answer = yield c.Hello(0, version=9)
    ctx.check(
        "welcome.version = min(1, hello.version)",
        isinstance(answer.msg, m.Welcome) and answer.msg.version == 1,
        "welcome {version: 1}",
        answer.msg or "no answer",
    )


@CASES.case("handshake.version.zero", "version 0 is refused", MUST, "protocol.md §3.2")
def version_zero(ctx: c.Ctx) -> Gen:
    answer = yield c.Hello(0, version=0)
    refused(ctx, answer, ErrorCode.BAD_VERSION, "hello {version: 0}")


@CASES.case(
    "handshake.features.subset",
    "welcome.features is hello.features AND supported",
    MUST,
    "protocol.md §7.1",
)
def features_subset(ctx: c.Ctx) -> Gen:
    asked = int(Feature.PV_TIMER | Feature.PVCLOCK)
    answer = yield c.Hello(0, features=asked)
    msg = answer.msg
    ctx.check("the hello is welcomed", isinstance(msg, m.Welcome), "welcome", msg or "none")
    if isinstance(msg, m.Welcome):
        ctx.check(
            "no feature beyond those asked for",
            not msg.features & ~asked,
            f"subset of {asked:#x}",
            msg.features,
        )


@CASES.case(
    "handshake.features.gated",
    "devices of features not negotiated answer as absent",
    MUST,
    "protocol.md §7.1",
)
def features_gated(ctx: c.Ctx) -> Gen:
    yield from session(ctx, 0, features=0)
    done = yield c.Exit(0, m.ExitMsrRead(msr=Msr.MSR_KVM_SYSTEM_TIME_NEW))
    ctx.equal("kvmclock MSR without PVCLOCK: #GP", 13, done.fault)
    done = yield c.Exit(0, m.ExitMsrRead(msr=Msr.MSR_KVM_PV_EOI_EN))
    ctx.equal("PV EOI MSR without PV_EOI: #GP", 13, done.fault)
    for nr, name in [
        (Hypercall.VTICK_SET_NEXT_KTIME, "set_next_ktime without PV_TIMER"),
        (Hypercall.VTICK_VMI_SET_ALARM, "VMI SetAlarm without VMI"),
        (Hypercall.VTICK_VMI_APIC_READ, "VMI apic_read without VMI"),
        (Hypercall.KVM_HC_SEND_IPI, "KVM_HC_SEND_IPI without PV_SEND_IPI"),
    ]:
        done = yield from hypercall(ctx, 0, nr, 0, 0, 0, 0)
        ctx.equal(f"{name}: -KVM_ENOSYS", -KvmErrno.KVM_ENOSYS, done.value)


@CASES.case("handshake.token.wrong", "a wrong token is refused", MUST, "protocol.md §3.2")
def token_wrong(ctx: c.Ctx) -> Gen:
    answer = yield c.Hello(0, token=bytes(32))
    refused(ctx, answer, ErrorCode.BAD_TOKEN, "hello with a wrong token")


@CASES.case(
    "handshake.token.short", "a 16-byte token fails the schema", MUST, "protocol.md §3.2, §9"
)
def token_short(ctx: c.Ctx) -> Gen:
    answer = yield c.Hello(0, token=bytes(16))
    refused(ctx, answer, ErrorCode.BAD_FIELD, "hello with a 16-byte token")


@CASES.case(
    "handshake.vcpu.mismatch", "a hello for another vCPU is refused", MUST, "protocol.md §3.2"
)
def vcpu_mismatch(ctx: c.Ctx) -> Gen:
    ctx.require_vcpus(2)
    answer = yield c.Hello(0, vcpu_field=1)
    refused(ctx, answer, ErrorCode.BAD_VCPU, "hello {vcpu: 1} on link 0")


@CASES.case(
    "handshake.hello-retry",
    "a repeated hello is answered with the same session",
    MUST,
    "protocol.md §3.3",
)
def hello_retry(ctx: c.Ctx) -> Gen:
    first = yield c.Hello(0)
    again = yield c.Hello(0, repeat=True)
    ok = isinstance(first.msg, m.Welcome) and isinstance(again.msg, m.Welcome)
    ctx.check("both hellos are welcomed", ok, "two welcomes", (first.msg, again.msg))
    if ok:
        assert isinstance(first.msg, m.Welcome)
        assert isinstance(again.msg, m.Welcome)
        ctx.equal("the same session", first.msg.session, again.msg.session)
    lvr = yield from apic_read(ctx, 0, r.APIC_LVR)
    ctx.equal("the session works (LVR)", LVR, lvr)


@CASES.case(
    "handshake.resume.unknown",
    "a resume of an unknown session is refused",
    MUST,
    "protocol.md §3.6",
)
def resume_unknown(ctx: c.Ctx) -> Gen:
    answer = yield c.Hello(0, resume=0x5EED_F00D)
    refused(ctx, answer, ErrorCode.UNEXPECTED, "hello {resume: unknown}")


@CASES.case(
    "handshake.not-hello",
    "a valid frame that is not a hello, from a new process, is not executed, and its hello "
    "is welcomed next",
    MUST,
    "protocol.md §3.2, §3.4",
)
def not_hello(ctx: c.Ctx) -> Gen:
    yield c.Leave(0)
    yield c.Mark(0)
    early = encode(m.ExitMsrRead(msr=0x1B), 1, 0)
    answers = []
    for _ in range(3):  # as a client retries: Pair0 may still be rejecting the new pipe
        yield c.SendRaw(0, early)
        answers += yield c.Collect(0, 100, (m.ExitReply, m.Refuse, m.Error))
    replies = [a for a in answers if isinstance(a.msg, m.ExitReply)]
    ctx.check(
        "the exit sent before any hello is not executed",
        not replies,
        "no exit-reply",
        [c.describe(a.msg) for a in replies if a.msg],
    )
    others = [a.msg for a in answers if isinstance(a.msg, m.Refuse | m.Error)]
    ctx.check(
        "if it is answered at all, the answer is refuse UNEXPECTED",
        all(isinstance(x, m.Refuse) and x.code == ErrorCode.UNEXPECTED for x in others),
        "nothing (ignored, §3.4) or refuse {code: 9} (§3.2)",
        others,
    )
    welcome = yield c.Session(0)
    ctx.check(
        "the new process's hello is then welcomed",
        isinstance(welcome, m.Welcome),
        "welcome",
        welcome or "no answer",
    )


def send_until_answered(vcpu: int, data: bytes, timeout_ms: int = 2000) -> Gen:
    """Send ``data`` every 200 ms until the host answers with refuse or error, as a
    client retries its first frame (Pair0 may still be rejecting the new pipe)."""
    yield c.Mark(vcpu)
    for _ in range(max(1, timeout_ms // 200)):
        yield c.SendRaw(vcpu, data)
        got = yield c.Await(vcpu, (m.Refuse, m.Error), 200)
        if got is not None:
            closed = yield c.Closed(vcpu, 1000)
            return c.HelloAnswer(got.msg, got.t, closed)
    return c.HelloAnswer(None, None, False)


@CASES.case(
    "handshake.stranger.bad-cbor",
    "after a vCPU's process left, a stranger's invalid CBOR is refused and its pipe closed",
    MUST,
    "protocol.md §3.4",
)
def stranger_bad_cbor(ctx: c.Ctx) -> Gen:
    ctx.require_vcpus(2)
    yield from session(ctx, 1)
    yield c.Leave(1)
    answer = yield from send_until_answered(1, b"\xff\xfe\xfd")
    refused(ctx, answer, ErrorCode.BAD_CBOR, "invalid CBOR on a link whose process left")
    welcome = yield c.Session(1)
    ctx.check(
        "a correct hello is welcomed next",
        isinstance(welcome, m.Welcome),
        "welcome",
        welcome or "no answer",
    )


@CASES.case(
    "handshake.stranger.short-token",
    "after a vCPU's process left, a hello with a 16-byte token is refused",
    MUST,
    "protocol.md §3.4",
)
def stranger_short_token(ctx: c.Ctx) -> Gen:
    ctx.require_vcpus(2)
    yield from session(ctx, 1)
    yield c.Leave(1)
    yield c.Mark(1)
    answer = yield c.Hello(1, token=bytes(16))
    refused(ctx, answer, ErrorCode.BAD_FIELD, "hello with a 16-byte token after the process left")


@CASES.case(
    "handshake.second-peer",
    "a second process for a vCPU gets no session while the "
    "first is connected, and the first keeps being served",
    MUST,
    "protocol.md §1.1, §3.4",
)
def second_peer(ctx: c.Ctx) -> Gen:
    ctx.require_vcpus(2)
    yield from session(ctx, 1)
    other = yield c.Hello(1, timeout_ms=600, peer=1)
    ctx.check(
        "the second process is not welcomed",
        not isinstance(other.msg, m.Welcome),
        "no answer (Pair0 keeps one peer) or refuse",
        other.msg or "no answer",
    )
    lvr = yield from apic_read(ctx, 1, r.APIC_LVR)
    ctx.equal("the first process is still served (LVR)", LVR, lvr)
    yield c.Goodbye(1)
    yield c.Leave(1)
    later = yield c.Hello(1, timeout_ms=3000, peer=1)
    ctx.check(
        "once the first left, the second is welcomed",
        isinstance(later.msg, m.Welcome),
        "welcome",
        later.msg or "no answer",
    )


@CASES.case(
    "handshake.new-session.reset",
    "a new session after a goodbye starts from a reset vCPU",
    MUST,
    "protocol.md §3.5",
)
def new_session_reset(ctx: c.Ctx) -> Gen:
    ctx.require_vcpus(2)
    yield from session(ctx, 1)
    yield from enable_apic(ctx, 1)
    yield from apic_write(ctx, 1, r.APIC_TASKPRI, 0x20)
    yield c.Goodbye(1)
    yield from session(ctx, 1)
    tpr = yield from apic_read(ctx, 1, r.APIC_TASKPRI)
    svr = yield from apic_read(ctx, 1, r.APIC_SPIV)
    ctx.equal("TPR after the new session", 0, tpr)
    ctx.equal("SVR after the new session (software-disabled)", r.APIC_SPIV_RESET, svr)


@CASES.case(
    "handshake.ping",
    "a ping is answered with a pong carrying its t and the host's clock",
    MUST,
    "protocol.md §6.4",
)
def ping(ctx: c.Ctx) -> Gen:
    yield from session(ctx, 0)
    before = yield c.Now()
    yield c.Send(0, m.Ping(t=123_456_789))
    got = yield c.Await(0, (m.Pong,), 2000)
    after = yield c.Now()
    ctx.check("a pong comes", got is not None, "pong", "no answer")
    if got is not None:
        assert isinstance(got.msg, m.Pong)
        ctx.equal("pong.t echoes ping.t", 123_456_789, got.msg.t)
        ctx.check(
            "pong.host is the host's CLOCK_MONOTONIC at the answer",
            before - 1_000_000 <= got.msg.host <= after + 1_000_000,
            f"within [{before}, {after}] (+-1 ms)",
            got.msg.host,
        )
