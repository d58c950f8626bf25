"""``vtick conformance guest``: a guest program against a scripted host, and what it owes.

Theory of operation
-------------------
:class:`ScriptedHost` is a small host of one vCPU built on the pure models (the
``Machine`` with every device, the real :class:`~vtick.proto.link.Link`): it listens on
one Pair0 socket, welcomes the guest in a chosen timer mode, answers its exits, injects
its interrupts (before the reply of the exit that caused them, ``docs/protocol.md``
§4.2), and after a short run asks it to shut down.  It is *scripted* in two ways: every
frame in either direction is recorded with its time, and one exit's reply is lost on
purpose (the host sends nothing to the guest until the guest retransmits that exit), so
the guest's retransmission can be seen.

The guest program (``--guest-cmd``; vtick's own ``python -m vtick.guest`` by default)
runs as a separate process with the run's token in ``$VTICK_TOKEN``.  When it is done,
the cases below judge the recorded :class:`GuestTrace` without any I/O: a correct hello,
numbering and acknowledgements, the retransmission, at most one exit outstanding, an EOI
for every interrupt taken, the boot sequence of the mode, a clean goodbye and exit
status 0.  Each case id names the mode it ran in (``guest.boot.pv-ktime``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pynng
import trio

from vtick.host.conformance import case as c
from vtick.host.conformance import report as rep
from vtick.host.devices.kvmclock import KvmClock
from vtick.host.devices.pit import Pit
from vtick.host.devices.pvapic import PvApic
from vtick.host.devices.pvtimer import PvTimer
from vtick.host.devices.vmi_alarm import VmiAlarm
from vtick.host.machine import CompleteHlt, InjectIrq, Machine
from vtick.proto import apicdef as r
from vtick.proto import messages as m
from vtick.proto.abi import Feature, Hypercall, Msr
from vtick.proto.codec import DEFAULT_MAX_MESSAGE, decode
from vtick.proto.errors import ErrorCode, LinkError, ProtocolError
from vtick.proto.link import Link
from vtick.proto.pvclock import TscModel
from vtick.proto.transport import PairEndpoint, link_url, monotonic_ns, trio_deadline

__all__ = ["GuestTrace", "ScriptedHost", "GUEST_CHECKS", "conformance_guest_main", "guest_cases"]

DEFAULT_MODES = ("pv-ktime", "lapic-xapic", "tsc-deadline")
RUN_S = 0.6
#: the exit (counted from the first after the welcome) whose reply is lost on purpose
DROP_EXIT = 25
#: how long the host stays silent waiting for the guest to retransmit that exit
DROP_WAIT_NS = 2_000_000_000
GUEST_TIMEOUT_S = 30.0
SUPPORTED = int(
    Feature.PVCLOCK | Feature.PV_TIMER | Feature.VMI | Feature.PV_EOI | Feature.PV_SEND_IPI
)


@dataclass(frozen=True, slots=True)
class Record:
    t: int
    dir: str  # "recv" (from the guest) or "send" (to it)
    data: bytes
    msg: m.Message | None
    seq: int
    ack: int


@dataclass
class GuestTrace:
    """Everything the scripted host saw of one guest run (what the cases judge)."""

    mode: str
    vcpu: int
    token: bytes
    records: list[Record] = field(default_factory=list)
    #: (seq of the exit whose reply was lost, when, when its retransmission came or None)
    dropped: tuple[int, int, int | None] | None = None
    injected: int = 0
    eois: int = 0
    pv_eois: int = 0
    eoi_noop: int = 0
    status: int | None = None
    stderr: str = ""
    #: shutdown sent (ns), the guest's goodbye (ns)
    shutdown_at: int | None = None
    problems: list[str] = field(default_factory=list)

    def from_guest(self) -> list[Record]:
        return [x for x in self.records if x.dir == "recv" and x.msg is not None]

    def to_guest(self) -> list[Record]:
        return [x for x in self.records if x.dir == "send" and x.msg is not None]


class ScriptedHost:
    """One-vCPU host on the pure models; records every frame (the I/O edge)."""

    def __init__(self, trace: GuestTrace, url: str) -> None:
        self.trace = trace
        self.url = url
        now = monotonic_ns()
        self.tsc = TscModel(tsc_khz=2_500_000, tsc_epoch=now, ktime_epoch=now)
        self.machine = Machine(1, self.tsc, now)
        self.kvmclock = KvmClock(self.machine)
        self.pvtimer = PvTimer(self.machine)
        self.kvmclock.add_listener(self.pvtimer.on_republish)
        VmiAlarm(self.machine)
        Pit(self.machine)
        PvApic(self.machine)
        # a long RTO: the guest's own retransmission must come first
        self.link = Link(name="scripted host", rto_ns=4 * DROP_WAIT_NS)
        self.session = 0
        self.exits = 0
        self.holding: list[bytes] = []
        self.hold = False
        self.dropped_frame: bytes | None = None
        self.done = trio.Event()
        self.welcomed = trio.Event()
        self.wake = trio.Event()
        self.ep: PairEndpoint | None = None

    # ------------------------------------------------------------------ output

    def _record(self, direction: str, data: bytes) -> None:
        try:
            frame = decode(data, 1 << 30)
            msg, seq, ack = frame.msg, frame.seq, frame.ack
        except ProtocolError:
            msg, seq, ack = None, 0, 0
        self.trace.records.append(Record(monotonic_ns(), direction, data, msg, seq, ack))

    def flush(self) -> None:
        frames = self.link.data_to_send()
        if self.hold:
            self.holding += frames
            return
        for data in frames:
            self._record("send", data)
        if self.ep is not None and frames:
            self.ep.send(frames)

    def send(self, msg: m.Message) -> None:
        self.link.send(msg, monotonic_ns())
        self.flush()

    def _raw(self, msg: m.Message) -> None:
        from vtick.proto.codec import encode

        data = encode(msg, 0, 0)
        self._record("send", data)
        assert self.ep is not None
        self.ep.send([data])

    # ------------------------------------------------------------------ input

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.ep = PairEndpoint.listen(self.url, DEFAULT_MAX_MESSAGE)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.ep.run_sender)
                nursery.start_soon(self._timers)
                task_status.started()
                while True:
                    try:
                        data, _pipe = await self.ep.recv()
                    except (pynng.Closed, TypeError):
                        return
                    self._record("recv", data)
                    self._on_frame(data)
        finally:
            self.ep.close()

    def _on_frame(self, data: bytes) -> None:
        now = monotonic_ns()
        if not self.welcomed.is_set():
            try:
                hello = decode(data, DEFAULT_MAX_MESSAGE).msg
            except ProtocolError as exc:
                self.trace.problems.append(f"before the welcome: {exc}")
                self._raw(m.Refuse(code=exc.code, reason=str(exc)[:200]))
                return
            if not isinstance(hello, m.Hello) or hello.token != self.trace.token:
                self.trace.problems.append(f"before the welcome: {c.describe(hello)}")
                self._raw(m.Refuse(code=ErrorCode.UNEXPECTED, reason="expected a valid hello"))
                return
            self._welcome(hello)
            return
        dropped = self.trace.dropped
        try:
            frame = decode(data, DEFAULT_MAX_MESSAGE)
            if (
                dropped is not None
                and dropped[2] is None
                and frame.msg.SEQUENCED
                and frame.seq == dropped[0]
            ):
                # the lost reply's exit came again: the guest retransmitted; stop holding
                self.trace.dropped = (dropped[0], dropped[1], now)
                self._release()
            msgs = self.link.receive(data, now)
        except ProtocolError as exc:
            self.trace.problems.append(f"protocol error: {exc}")
            return
        for msg in msgs:
            self._dispatch(msg, now)
        if self.link.ack_owed():
            self.send(m.Ack())
        self.flush()
        self.wake.set()

    def _welcome(self, hello: m.Hello) -> None:
        self.session = secrets.randbits(63) or 1
        features = hello.features & SUPPORTED
        self.machine.vcpus[0].features = features
        self.link.send(
            m.Welcome(
                version=1,
                features=features,
                vcpu=0,
                vcpus=1,
                session=self.session,
                max_message=DEFAULT_MAX_MESSAGE,
                tsc_khz=self.tsc.tsc_khz,
                tsc_epoch=self.tsc.tsc_epoch,
                pvclock=self.machine.vcpus[0].pvclock.to_wire(),
                workload="timers",
                seed=1,
                params={},
                mode=self.trace.mode,
                hz=1000,
            ),
            monotonic_ns(),
        )
        self.flush()
        self.welcomed.set()

    def _dispatch(self, msg: m.Message, now: int) -> None:
        if isinstance(msg, m.ExitMessage):
            seq = self.link.recv_next - 1
            unseen = self.link.peer_acked < self.link.send_next - 1
            result = self.machine.handle_exit(0, seq, msg, now, unseen)
            self.exits += 1
            drop = not result.deferred and self.exits == DROP_EXIT and self.trace.dropped is None
            if drop:
                # every frame acknowledges the exit, so from here nothing goes out
                self.flush()
                self.hold = True
            self._actions()
            if result.deferred:
                return
            reply = m.ExitReply(re=seq, value=result.value, fault=result.fault, host_ns=0)
            if drop:
                self._drop(reply, seq, now)
            else:
                self.send(reply)
        elif isinstance(msg, m.Ping):
            self.send(m.Pong(t=msg.t, host=monotonic_ns()))
        elif isinstance(msg, m.Goodbye):
            self.send(m.Goodbye())
            self.done.set()
        elif isinstance(msg, m.Csd):
            # one vCPU: a store for a vCPU that does not run is answered at once (the
            # guest's cpu-online needs no answer: one vCPU reads its own bit back)
            error = f"vCPU {msg.dst} is not running"
            self.send(m.CsdDone(src=msg.dst, dst=msg.src, id=msg.id, ran=0, error=error))

    def _drop(self, reply: m.ExitReply, seq: int, now: int) -> None:
        """Lose ``reply``: hold everything for the guest until it sends exit ``seq``
        again (or DROP_WAIT_NS passes), so nothing acknowledges that exit meanwhile."""
        self.link.send(reply, now)
        (self.dropped_frame,) = self.link.data_to_send()
        self.trace.dropped = (seq, now, None)

    def _release(self) -> None:
        self.hold = False
        held, self.holding = self.holding, []
        if self.dropped_frame is not None:
            held.append(self.dropped_frame)  # the retransmission of the lost reply
            self.dropped_frame = None
        for data in held:
            self._record("send", data)
        if self.ep is not None and held:
            self.ep.send(held)

    def _actions(self) -> None:
        for vcpu in self.kvmclock.take_publications():
            self.send(m.Pvclock(info=self.machine.vcpus[vcpu].pvclock.to_wire()))
        for action in self.machine.take_actions():
            if isinstance(action, InjectIrq):
                self.send(
                    m.Inject(
                        vector=action.vector,
                        host_time=action.now,
                        pv_eoi=True if action.pv_eoi else None,
                    )
                )
            elif isinstance(action, CompleteHlt):
                self.send(m.ExitReply(re=action.re, value=0, fault=0, host_ns=0))

    async def _timers(self) -> None:
        while True:
            deadlines = [
                d
                for d in (self.machine.next_deadline(), self.link.next_deadline())
                if d is not None
            ]
            if self.hold and self.trace.dropped is not None:
                deadlines.append(self.trace.dropped[1] + DROP_WAIT_NS)
            if self.link.ack_owed(force=True):
                deadlines.append(monotonic_ns() + 20_000_000)
            self.wake = trio.Event()
            with trio.move_on_at(trio_deadline(min(deadlines)) if deadlines else float("inf")):
                await self.wake.wait()
            now = monotonic_ns()
            dropped = self.trace.dropped
            if self.hold and dropped is not None and now >= dropped[1] + DROP_WAIT_NS:
                self._release()  # the guest never retransmitted: the case will say so
            self.machine.on_timer(now)
            self._actions()
            with contextlib.suppress(LinkError):
                self.link.poll(now)
            if self.link.ack_owed(force=True):
                self.link.send(m.Ack(), now)
            self.flush()

    def shutdown(self) -> None:
        self.trace.shutdown_at = monotonic_ns()
        self.machine.shutdown()
        self._actions()
        self.send(m.Shutdown(reason="run complete"))
        self.wake.set()

    def collect(self) -> None:
        state = self.machine.vcpus[0]
        self.trace.injected = state.injected
        self.trace.eois = state.lapic.stats.eois
        self.trace.pv_eois = state.pv_eois
        self.trace.eoi_noop = state.lapic.stats.eoi_noop


# ---------------------------------------------------------------------- running a guest


def guest_command(template: str | None, url: str, vcpu: int) -> list[str]:
    if template is None:
        return [sys.executable, "-m", "vtick.guest", "--connect", url, "--vcpu", str(vcpu)]
    return shlex.split(template.format(url=url, vcpu=vcpu))


async def run_guest(mode: str, template: str | None) -> GuestTrace:
    """Run one guest program against a scripted host in ``mode``; return the trace."""
    token = secrets.token_bytes(32)
    trace = GuestTrace(mode=mode, vcpu=0, token=token)
    folder = tempfile.mkdtemp(prefix="vtick-conformance-guest-")  # 0700
    base = f"ipc://{folder}/link"
    host = ScriptedHost(trace, link_url(base, 0))
    proc: trio.Process | None = None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(host.serve)
            proc = await trio.lowlevel.open_process(
                guest_command(template, base, 0),
                env=dict(os.environ, VTICK_TOKEN=token.hex()),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            nursery.start_soon(_read_stderr, proc, trace)
            with trio.move_on_after(GUEST_TIMEOUT_S):
                await host.welcomed.wait()
                await trio.sleep(RUN_S)
                host.shutdown()
                await host.done.wait()
                with trio.move_on_after(3):
                    trace.status = await proc.wait()
                await trio.sleep(0.05)  # the final ack may still be on its way
            if trace.status is None:
                trace.problems.append(f"the guest did not finish within {GUEST_TIMEOUT_S:g} s")
            host.collect()
            nursery.cancel_scope.cancel()
    finally:
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with trio.CancelScope(shield=True):
                await proc.wait()
        shutil.rmtree(folder, ignore_errors=True)
    return trace


async def _read_stderr(proc: trio.Process, trace: GuestTrace) -> None:
    assert proc.stderr is not None
    with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
        while chunk := await proc.stderr.receive_some(65536):
            trace.stderr = (trace.stderr + chunk.decode(errors="replace"))[-4000:]


# ---------------------------------------------------------------------- the cases (pure)


GuestCheck = Callable[[c.Ctx, GuestTrace], None]
GUEST_CHECKS: list[tuple[str, str, c.Level, str, GuestCheck]] = []


def guest_check(
    id: str, title: str, level: c.Level, rule: str
) -> Callable[[GuestCheck], GuestCheck]:
    def register(fn: GuestCheck) -> GuestCheck:
        GUEST_CHECKS.append((id, title, level, rule, fn))
        return fn

    return register


@guest_check(
    "guest.hello",
    "the first frame is a hello for this vCPU with the run's token",
    c.Level.MUST,
    "protocol.md §3.1",
)
def _hello(ctx: c.Ctx, t: GuestTrace) -> None:
    frames = t.from_guest()
    first = frames[0].msg if frames else None
    ctx.check("first frame is a hello", isinstance(first, m.Hello), "hello", first or "nothing")
    if isinstance(first, m.Hello):
        ctx.equal("hello.vcpu", t.vcpu, first.vcpu)
        ctx.check(
            "hello.token is the run's token", first.token == t.token, "the token", "another token"
        )
        ctx.check("hello.version >= 1", first.version >= 1, ">= 1", first.version)
        ctx.equal("hello envelope (s, a)", (0, 0), (frames[0].seq, frames[0].ack))


@guest_check(
    "guest.seq",
    "sequenced frames are numbered 1, 2, 3 ... and a repeat carries the same content",
    c.Level.MUST,
    "protocol.md §5.1",
)
def _seq(ctx: c.Ctx, t: GuestTrace) -> None:
    seen: dict[int, bytes] = {}
    bad: list[str] = []
    highest = 0
    for x in t.from_guest():
        assert x.msg is not None
        if not x.msg.SEQUENCED:
            continue
        if x.seq in seen:
            same = decode(seen[x.seq]).msg == x.msg
            if not same:
                bad.append(f"s={x.seq} repeated with other content")
            continue
        if x.seq != highest + 1:
            bad.append(f"s={x.seq} after {highest}")
        seen[x.seq] = x.data
        highest = max(highest, x.seq)
    ctx.check("consecutive numbers, faithful repeats", not bad, "none out of order", bad[:5])
    ctx.check("the guest sent sequenced frames", highest > 0, "> 0", highest)


@guest_check(
    "guest.ack",
    "acks never exceed what the host sent and reach its last frame",
    c.Level.MUST,
    "protocol.md §5.2",
)
def _ack(ctx: c.Ctx, t: GuestTrace) -> None:
    sent_seq = 0
    beyond: list[str] = []
    last_ack = 0
    for x in t.records:
        if x.msg is None:
            continue
        if x.dir == "send" and x.msg.SEQUENCED:
            sent_seq = max(sent_seq, x.seq)
        elif x.dir == "recv":
            if x.ack > sent_seq:
                beyond.append(f"a={x.ack} when {sent_seq} were sent")
            last_ack = max(last_ack, x.ack)
    ctx.check("no ack beyond what was sent", not beyond, "none", beyond[:5])
    ctx.equal(
        "the last ack covers every host frame (the host's goodbye included)", sent_seq, last_ack
    )


@guest_check(
    "guest.retransmit",
    "an exit whose reply is lost is sent again after the RTO",
    c.Level.MUST,
    "protocol.md §5.5",
)
def _retransmit(ctx: c.Ctx, t: GuestTrace) -> None:
    if t.dropped is None:
        ctx.check(
            "the scripted host lost one reply",
            False,
            f"exit {DROP_EXIT} answered",
            "the guest took fewer exits",
        )
        return
    seq, at, again = t.dropped
    ctx.check(
        f"exit s={seq} retransmitted within 1.5 s (RTO 500 ms)",
        again is not None and again - at <= 1_500_000_000,
        "a retransmission",
        "none" if again is None else f"after {(again - at) / 1e6:.0f} ms",
    )


@guest_check(
    "guest.one-exit", "no new exit while one is outstanding", c.Level.MUST, "protocol.md §4.1"
)
def _one_exit(ctx: c.Ctx, t: GuestTrace) -> None:
    outstanding: int | None = None
    bad: list[str] = []
    for x in t.records:
        if x.msg is None:
            continue
        if x.dir == "recv" and isinstance(x.msg, m.ExitMessage):
            if outstanding is not None and x.seq != outstanding:
                bad.append(f"exit s={x.seq} while s={outstanding} was outstanding")
            outstanding = x.seq
        elif x.dir == "send" and isinstance(x.msg, m.ExitReply) and x.msg.re == outstanding:
            outstanding = None
    ctx.check("one exit at a time", not bad, "none", bad[:5])


@guest_check(
    "guest.eoi",
    "every interrupt taken is EOI'd (or PV-EOI'd)",
    c.Level.MUST,
    "protocol.md §7.6, §7.8",
)
def _eoi(ctx: c.Ctx, t: GuestTrace) -> None:
    done = t.eois + t.pv_eois
    ctx.check(
        "EOIs + PV EOIs cover the injected interrupts (one may be in flight at the end)",
        t.injected - 1 <= done <= t.injected,
        f"{t.injected - 1}..{t.injected}",
        f"{t.eois} EOIs + {t.pv_eois} PV EOIs",
    )
    ctx.check("some interrupts were taken", t.injected > 0, "> 0", t.injected)
    ctx.equal("no EOI with nothing in service", 0, t.eoi_noop)


#: mode -> (what must come first, predicate on a guest exit, what it protects, predicate)
def _is_kvmclock_enable(msg: m.Message) -> bool:
    return (
        isinstance(msg, m.ExitMsrWrite)
        and msg.msr in (Msr.MSR_KVM_SYSTEM_TIME_NEW, Msr.MSR_KVM_SYSTEM_TIME)
        and bool(msg.value & 1)
    )


def _is_pv_timer(msg: m.Message) -> bool:
    return isinstance(msg, m.ExitHypercall) and msg.nr in (
        Hypercall.VTICK_SET_NEXT_KTIME,
        Hypercall.VTICK_SET_NEXT_DELTA,
    )


def _is_svr_enable(msg: m.Message) -> bool:
    if isinstance(msg, m.ExitHypercall) and msg.nr == Hypercall.VTICK_VMI_APIC_WRITE:
        return len(msg.args) >= 2 and msg.args[0] == r.APIC_SPIV and bool(msg.args[1] & 0x100)
    if isinstance(msg, m.ExitMmioWrite):
        return msg.gpa == r.APIC_DEFAULT_BASE + r.APIC_SPIV and bool(
            msg.value & r.APIC_SPIV_APIC_ENABLED
        )
    if isinstance(msg, m.ExitMsrWrite):
        return msg.msr == r.x2apic_msr(r.APIC_SPIV) and bool(msg.value & r.APIC_SPIV_APIC_ENABLED)
    return False


def _is_tmict(msg: m.Message) -> bool:
    return (
        isinstance(msg, m.ExitMmioWrite)
        and msg.gpa == r.APIC_DEFAULT_BASE + r.APIC_TMICT
        and msg.value != 0
    ) or (
        isinstance(msg, m.ExitMsrWrite) and msg.msr == r.x2apic_msr(r.APIC_TMICT) and msg.value != 0
    )


def _is_deadline_mode(msg: m.Message) -> bool:
    lvtt = None
    if isinstance(msg, m.ExitMmioWrite) and msg.gpa == r.APIC_DEFAULT_BASE + r.APIC_LVTT:
        lvtt = msg.value
    if isinstance(msg, m.ExitMsrWrite) and msg.msr == r.x2apic_msr(r.APIC_LVTT):
        lvtt = msg.value
    return lvtt is not None and lvtt & r.APIC_LVT_TIMER_MASK == r.APIC_LVT_TIMER_TSCDEADLINE


def _is_vmi_alarm(msg: m.Message) -> bool:
    return isinstance(msg, m.ExitHypercall) and msg.nr == Hypercall.VTICK_VMI_SET_ALARM


def _is_deadline_write(msg: m.Message) -> bool:
    return isinstance(msg, m.ExitMsrWrite) and msg.msr == r.MSR_IA32_TSC_DEADLINE and msg.value != 0


BOOT_RULES: dict[
    str, list[tuple[str, Callable[[m.Message], bool], str, Callable[[m.Message], bool]]]
] = {
    "pv-ktime": [
        ("kvmclock enabled", _is_kvmclock_enable, "the first set_next_ktime", _is_pv_timer)
    ],
    "pv-delta": [
        ("kvmclock enabled", _is_kvmclock_enable, "the first set_next_delta", _is_pv_timer)
    ],
    "pv-future": [
        ("kvmclock enabled", _is_kvmclock_enable, "the first set_next_ktime", _is_pv_timer)
    ],
    "lapic-xapic": [
        ("the APIC software-enabled (SVR)", _is_svr_enable, "the first TMICT", _is_tmict)
    ],
    "lapic-x2apic": [
        ("the APIC software-enabled (SVR)", _is_svr_enable, "the first TMICT", _is_tmict)
    ],
    "lapic-periodic": [
        ("the APIC software-enabled (SVR)", _is_svr_enable, "the first TMICT", _is_tmict)
    ],
    "vmi": [
        ("the APIC software-enabled (SVR)", _is_svr_enable, "the first SetAlarm", _is_vmi_alarm)
    ],
    "tsc-deadline": [
        (
            "LVTT in TSC-deadline mode",
            _is_deadline_mode,
            "the first TSC_DEADLINE write",
            _is_deadline_write,
        ),
        (
            "the APIC software-enabled (SVR)",
            _is_svr_enable,
            "the first TSC_DEADLINE write",
            _is_deadline_write,
        ),
    ],
}


@guest_check(
    "guest.boot",
    "the boot sequence of the mode: what must come first does",
    c.Level.MUST,
    "protocol.md §6.2, §7.3, §7.8; docs/guest.md",
)
def _boot(ctx: c.Ctx, t: GuestTrace) -> None:
    exits = [x.msg for x in t.from_guest() if isinstance(x.msg, m.ExitMessage)]
    rules = BOOT_RULES.get(t.mode)
    if rules is None:
        raise c.Unsupported(f"no boot rule for mode {t.mode}")
    for first_name, first, then_name, then in rules:
        i_first = next((i for i, e in enumerate(exits) if first(e)), None)
        i_then = next((i for i, e in enumerate(exits) if then(e)), None)
        ctx.check(
            f"{first_name} before {then_name}",
            i_first is not None and i_then is not None and i_first < i_then,
            f"{first_name} first",
            f"{first_name} at exit {i_first}, {then_name} at exit {i_then}",
        )


@guest_check(
    "guest.goodbye",
    "after shutdown: report, goodbye, an ack of the host's goodbye, exit status 0",
    c.Level.MUST,
    "protocol.md §3.7, §8.3",
)
def _goodbye(ctx: c.Ctx, t: GuestTrace) -> None:
    after = [x for x in t.from_guest() if t.shutdown_at is not None and x.t >= t.shutdown_at]
    kinds = [x.msg.RULE for x in after if x.msg is not None and x.msg.SEQUENCED]
    ctx.check("a report after the shutdown", "report" in kinds, "report", kinds[-6:])
    ctx.check(
        "then a goodbye",
        bool(kinds)
        and kinds[-1] == "goodbye"
        and "report" in kinds
        and kinds.index("report") < len(kinds) - 1,
        "... report ... goodbye",
        kinds[-6:],
    )
    ctx.equal("the guest exits with status 0", 0, t.status)
    ctx.check("nothing the host could not accept", not t.problems, "none", t.problems[:3])


def guest_cases(trace: GuestTrace) -> list[c.Case]:
    """The cases of one guest run, bound to its trace."""

    def bind(fn: GuestCheck) -> Callable[[c.Ctx], c.Script]:
        def script(ctx: c.Ctx) -> c.Script:
            fn(ctx, trace)
            yield from ()

        return script

    return [
        c.Case(f"{id}.{trace.mode}", title, level, rule, bind(fn))
        for id, title, level, rule, fn in GUEST_CHECKS
    ]


def judge_cases(cases: Sequence[c.Case], strict: bool, trace: GuestTrace) -> list[c.CaseResult]:
    results = []
    frames = [
        {
            "t": x.t - trace.records[0].t if trace.records else 0,
            "peer": "guest",
            "dir": x.dir,
            "frame": c.describe(x.msg) if x.msg else x.data[:48].hex(),
        }
        for x in trace.records[:60]
    ]
    for case in cases:
        ctx = c.Ctx(vcpus=1)
        t0 = time.monotonic_ns()
        try:
            for _ in case.script(ctx):
                pass
            outcome, reason = c.judge(case.level, ctx.checks, strict)
        except c.Unsupported as exc:
            outcome, reason = c.Outcome.UNSUPPORTED, str(exc)
        if trace.stderr:
            ctx.note(f"guest stderr: {trace.stderr[-600:]}")
        results.append(
            c.CaseResult(
                case, outcome, reason, ctx.checks, ctx.notes, frames, time.monotonic_ns() - t0
            )
        )
    return results


# ---------------------------------------------------------------------- main


def conformance_guest_main(args: argparse.Namespace, out: Any = None) -> int:
    from vtick.host.conformance.main import check_outputs, write_reports

    out = out or sys.stdout
    modes = list(args.modes or DEFAULT_MODES)
    ids = [f"{cid}.{mode}" for mode in modes for cid, *_ in GUEST_CHECKS]
    wanted: set[str] | None = None
    if args.cases:
        probe = [c.Case(i, "", c.Level.MUST, "", lambda ctx: iter(())) for i in ids]
        try:
            wanted = {x.id for x in c.select(probe, args.cases)}
        except ValueError as exc:
            print(f"vtick conformance: {exc}", file=sys.stderr)
            return 2
    if args.guest_cmd is not None and "{url}" not in args.guest_cmd:
        print("vtick conformance: --guest-cmd must contain {url}", file=sys.stderr)
        return 2
    if args.list:
        for cid, title, level, rule, _ in GUEST_CHECKS:
            for mode in modes:
                print(f"{cid}.{mode}\t{level.value}\t{rule}\t{title}", file=out)
        return 0
    problem = check_outputs([args.json, args.junit, args.html])
    if problem:
        print(f"vtick conformance: {problem}", file=sys.stderr)
        return 2
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.monotonic_ns()
    results: list[c.CaseResult] = []
    total = len(wanted) if wanted is not None else len(ids)
    print(rep.tap_header(total), file=out, flush=True)
    number = 0
    for mode in modes:
        chosen = [x for x in ids if x.endswith(f".{mode}") and (wanted is None or x in wanted)]
        if not chosen:
            continue
        try:
            trace = trio.run(run_guest, mode, args.guest_cmd)
        except KeyboardInterrupt:
            return 130
        cases = [x for x in guest_cases(trace) if x.id in chosen]
        for result in judge_cases(cases, args.strict, trace):
            number += 1
            print(rep.tap_line(number, result), file=out, flush=True)
            results.append(result)
    report = rep.Report(
        side="guest",
        target={"command": args.guest_cmd or "python -m vtick.guest", "modes": modes},
        results=results,
        strict=args.strict,
        started=started,
        duration_ns=time.monotonic_ns() - t0,
    )
    print(rep.tap_footer(report), file=out, flush=True)
    write_reports(report, args)
    return 0 if report.ok else 1
