"""The host (VMM) process: serves one link per vCPU and drives the Machine model.

Tasks in one trio nursery:
* one receive loop per vCPU link (handshake, exits, acks, goodbye);
* the timer loop: sleeps until the earliest host hrtimer, link retransmission or ack
  deadline, then runs what is due;
* the run clock: after ``duration`` it tells every vCPU to stop and collects reports.

A vCPU that misbehaves (bad token, garbage, protocol violation) gets a ``refuse`` or
``error`` and its pipe is closed; the other vCPUs are served on.  Everything that could
have lost a message is recorded in the results under ``link_errors``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import ipaddress
import os
import secrets
import signal
import socket
import struct
import sys
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

import pynng
import trio

from vtick.host.accounting import ExitAccounting, exit_reason
from vtick.host.devices.kvmclock import KvmClock
from vtick.host.devices.pit import Pit
from vtick.host.devices.pvapic import PvApic
from vtick.host.devices.pvtimer import PvTimer
from vtick.host.devices.vmi_alarm import VmiAlarm
from vtick.host.exitcost import load_profile
from vtick.host.machine import CompleteHlt, ExitResult, InjectIrq, Machine
from vtick.host.mutations import MUTATIONS, Mutations
from vtick.host.onlinemask import OnlineMask, holdoff_for
from vtick.host.results import write_json
from vtick.host.topology.clocktrack import ClockTracker
from vtick.proto import messages as m
from vtick.proto.abi import PROTOCOL_VERSION, Fault, Feature
from vtick.proto.codec import DEFAULT_MAX_MESSAGE, Frame, decode, encode
from vtick.proto.errors import ErrorCode, LinkError, ProtocolError
from vtick.proto.eventlog import (
    H_EXIT,
    H_INJECT,
    H_INJECT_IPI,
    H_LAPIC_BASE,
    H_LINK_ERROR,
    H_RUN_END,
    H_RUN_START,
    H_SESSION,
    H_STALL,
    SESSION_NEW,
    SESSION_RESUMED,
    EventLog,
    load_plan,
    record_target,
)
from vtick.proto.lifecycle import watch_parent, watch_signals
from vtick.proto.link import Link
from vtick.proto.pvclock import TscModel
from vtick.proto.timerfd import BACKEND as TIMER_BACKEND
from vtick.proto.timerfd import Alarm, sleep_ns
from vtick.proto.transport import (
    PairEndpoint,
    link_url,
    monotonic_ns,
    remove_ipc_file,
)

__all__ = ["Host", "HostConfig", "serve", "run_host", "check_exposure"]

SUPPORTED_FEATURES = (
    Feature.PVCLOCK | Feature.PV_TIMER | Feature.VMI | Feature.PV_EOI | Feature.PV_SEND_IPI
)
#: the links' housekeeping (retransmission, dead peers, owed acks) runs at most this
#: often, while any link has something pending: it visits every link, so running it on
#: every timer event made the host's cost per exit grow with the number of vCPUs
#: (issue 9); the link timers it serves are 20 ms (acks) and 500 ms (retransmission)
LINK_TICK_NS = 10_000_000
#: ... and for a big VM one tick per LINK_TICK_VCPUS vCPUs, up to LINK_TICK_MAX_NS, so
#: its cost stays about LINK_TICK_VCPUS link visits per 10 ms whatever the VM's size
#: (64 vCPUs: every 40 ms; the timers it serves are at least 500 ms on the peer's side)
LINK_TICK_VCPUS = 16
LINK_TICK_MAX_NS = 100_000_000


def link_tick_ns(vcpus: int) -> int:
    """How often the links' housekeeping runs for a VM of ``vcpus`` vCPUs."""
    return min(LINK_TICK_MAX_NS, LINK_TICK_NS * max(1, vcpus // LINK_TICK_VCPUS))


#: the wait for the vCPUs' reports grows with their number (at least report_timeout_s)
REPORT_S_PER_VCPU = 0.25
REFUSE_GRACE_S = 0.05
REFUSE_SEND_TIMEOUT_S = 1.0
NEVER = 1 << 63
#: modeled exit costs up to this are busy-waited (a sleep would overshoot them)
SPIN_MAX_NS = 200_000
#: exit kind -> its index in history records (vtick.proto.messages.EXIT_CLASSES order)
EXIT_INDEX = {cls: i for i, cls in enumerate(m.EXIT_CLASSES)}
#: chaos history: the host's watchdog period, and the gap it records
WATCHDOG_S = 0.02
WATCHDOG_GAP_NS = 30_000_000


@dataclass
class HostConfig:
    listen: str
    vcpus: int
    token: bytes
    duration_s: float = 5.0
    workload: str = "timers"
    mode: str = "pv-ktime"
    apic: str | None = None
    hz: int = 1000
    ipi: str | None = None
    seed: int = 1
    params: dict[str, int] = field(default_factory=dict)
    tsc_khz: int = 2_500_000
    max_message: int = DEFAULT_MAX_MESSAGE
    results_path: str | None = None
    report_timeout_s: float = 10.0
    connect_timeout_s: float = 30.0
    #: adaptive LAPIC timer advance for TSC-deadline (KVM's lapic_timer_advance), off
    timer_advance: bool = False
    #: exit-cost profile (a shipped name or a TOML path); None = add nothing
    exit_cost: str | None = None
    #: ask every vCPU for a trace window (exits and interrupts after boot)
    trace: bool = False
    #: print a READY line on stdout once every link is listening (for the launcher)
    announce: bool = True
    #: planted bugs (vtick.host.mutations), a test aid for checkers; none normally
    mutations: tuple[str, ...] = ()
    #: this host's part of a chaos schedule (host/chaos/): where its event log goes;
    #: None = read $VTICK_CHAOS_PLAN (vtick.proto.eventlog)
    chaos: dict[str, Any] | None = None
    #: listen on a non-loopback tcp:// (clear text) address all the same (issue 12)
    allow_insecure_tcp: bool = False
    # ---- live migration (issue 13, host/migration/)
    #: source: this many seconds into the run, move the VM to ``migrate_to``
    migrate_at_s: float | None = None
    #: source: the destination host's --incoming address
    migrate_to: str | None = None
    #: destination: wait for a VM on this address instead of starting one
    incoming: str | None = None
    #: seconds the whole transfer may take before the source gives up and runs on
    migrate_timeout_s: float = 5.0


class LinkState(Enum):
    WAIT_HELLO = "wait-hello"
    OPEN = "open"
    CLOSING = "closing"  # shutdown sent, waiting for report + goodbye
    DONE = "done"


class VcpuLink:
    """Host end of one vCPU's link."""

    def __init__(self, host: Host, vcpu: int, endpoint: PairEndpoint) -> None:
        self.host = host
        self.vcpu = vcpu
        self.ep = endpoint
        self.state = LinkState.WAIT_HELLO
        self.link: Link | None = None
        self.session = 0
        self.guest_pid: int | None = None
        self.features = Feature(0)
        self.version = PROTOCOL_VERSION
        self.report: m.Report | None = None
        self.traces: list[m.Trace] = []
        self.goodbye = trio.Event()
        self.reported = trio.Event()
        self.exits = ExitAccounting()
        self.errors: list[str] = []
        self.refused: Counter[str] = Counter()
        self.bad_messages = 0
        self.stale_frames = 0
        self.relayed = 0
        self.session_pipe: int | None = None
        self.sessions = 0
        self.pipes = Counter[str]()
        #: frames whose handling raised (each ended the session; see run())
        self.host_bugs = 0
        #: pipes nng reported removed: frames still read from them are stale
        self.removed_pipes: set[int] = set()
        #: this link's clock offset, tracked during the run (issue 12)
        self.clock = ClockTracker()
        #: issue 13: when this vCPU's last exit was handled (a source's blackout starts
        #: there) and, on a destination, when it resumed and took its first exit
        self.last_exit_at = 0
        self.resumed_at = 0
        self.first_exit_at = 0
        #: frames that arrived while the VM was frozen for a migration (not taken: the
        #: vCPU retransmits them to wherever the VM runs next)
        self.frozen_frames = 0

    @property
    def name(self) -> str:
        return f"vCPU {self.vcpu}"

    def peer_connected(self) -> bool:
        """Does the session's process still hold its pipe?  (A process that died has
        none: the kernel closes its socket, nng reports the pipe removed.)"""
        return self.session_pipe is not None and self.session_pipe not in self.removed_pipes

    # ------------------------------------------------------------------ output

    def flush(self) -> None:
        # a session restored by a migration has no pipe until its vCPU resumes: what it
        # sends waits in the link, which retransmits it after the resume handshake
        if self.link is not None and self.session_pipe is not None:
            self.ep.send(self.link.data_to_send())

    def send(self, msg: m.Message, now: int | None = None) -> None:
        """Send on this vCPU's session; a link failure ends this link, not the host."""
        if self.link is None:
            return
        try:
            self.link.send(msg, monotonic_ns() if now is None else now)
        except LinkError as exc:
            self.fail(str(exc))
            return
        self.flush()

    def fail(self, reason: str) -> None:
        """The session is lost: record why and wait for a new hello."""
        self.record_error(reason)
        if self.host.history is not None:
            self.host.history.add(H_LINK_ERROR, monotonic_ns(), self.vcpu)
        self.link = None
        self.state = LinkState.WAIT_HELLO
        self.host.machine.vcpus[self.vcpu].halted_exit = None
        self.reported.set()
        self.goodbye.set()

    async def _raw_reply(self, pipe: pynng.Pipe, msg: m.Message) -> None:
        """Send a control message outside any session, then drop the pipe."""
        if pipe.id in self.removed_pipes:
            # Pair0 ignores a message's pipe and would hand this reply to the current
            # peer instead (proto/transport.py: with a receive buffer, frames of a dead
            # pipe can still be read after it is gone): nobody is left to answer.
            return
        with contextlib.suppress(Exception), trio.move_on_after(REFUSE_SEND_TIMEOUT_S):
            # a peer that never reads must not stall this link's receive loop
            await pipe.asend(encode(msg, 0, 0, self.host.cfg.max_message))
        await trio.sleep(REFUSE_GRACE_S)  # nng has no linger: let the reply leave first
        with contextlib.suppress(Exception):
            pipe.close()

    def log(self, text: str) -> None:
        print(f"vtick host: {self.name}: {text}", file=sys.stderr, flush=True)

    def record_error(self, text: str) -> None:
        self.errors.append(text)
        self.log(text)

    # ------------------------------------------------------------------ input

    async def watch_pipes(self) -> None:
        """Count pipe arrivals and departures; a departure may have lost frames, which
        the resume on the next pipe or the retransmission timer recovers.

        A pipe removed that was never added is a second peer nng's Pair0 turned away at
        once (it admits one): another process dialled this vCPU's taken link.  Its hello
        never reaches ``_handshake``, so it is refused here, on the record; the dialler
        sees its pipe dropped unanswered and gives up with that reason (guest/vcpu.py).
        """
        added: set[int] = set()
        async for event in self.ep.pipe_events:
            self.pipes["added" if event.added else "removed"] += 1
            if event.added:
                added.add(event.pipe_id)
            elif event.pipe_id in added:
                added.discard(event.pipe_id)
                self.removed_pipes.add(event.pipe_id)
            else:
                reason = "second peer turned away: the link is taken"
                self.refused[reason] += 1
                if self.refused[reason] == 1:
                    holder = f"pid {self.guest_pid}" if self.guest_pid else "another peer"
                    self.log(f"{reason} by {holder} (nng's Pair0 admits one peer)")

    async def run(self) -> None:
        while True:
            try:
                data, pipe = await self.ep.recv()
            except pynng.Closed:
                return
            self.host.handling += 1
            try:
                await self._on_frame(data, pipe)
            except Exception as exc:
                # The guard: whatever one frame triggers (a model bug, a reply that cannot
                # be encoded, a link-layer surprise) ends this link, never the host.
                await self._contain(exc, pipe)
            finally:
                self.host.handling -= 1

    async def _contain(self, exc: Exception, pipe: pynng.Pipe) -> None:
        """A frame's handling raised: record it, tell the peer, end this session."""
        traceback.print_exc()
        reason = f"host bug handling a frame, link ended: {exc!r}"[:500]
        self.host_bugs += 1
        if self.link is not None:
            self.fail(reason)
        else:
            self.record_error(reason)
        await self._raw_reply(pipe, m.Error(code=ErrorCode.INTERNAL, reason=reason))

    async def _on_frame(self, data: bytes, pipe: pynng.Pipe) -> None:
        """Handle one frame from this link (run() guards it)."""
        now = monotonic_ns()
        if self.host.frozen:
            # issue 13: the VM is stopped for a migration; its state is being copied,
            # so nothing may change it.  The frame is not taken (not even its ack): the
            # vCPU's link retransmits it to the host that runs the VM next.
            self.frozen_frames += 1
            return
        if pipe.id in self.removed_pipes:
            # read ahead by nng before its pipe went away: a dead process's last frames,
            # never a session's (a resume names a live pipe)
            self.stale_frames += 1
            return
        if self.state is LinkState.WAIT_HELLO or self.link is None:
            await self._handshake(data, pipe, now)
            return
        if pipe.id != self.session_pipe:
            # Not the pipe the session lives on (docs/protocol.md §3.4).  A hello is a new
            # process or a resume.  A valid frame may be the session's own process on its
            # new pipe, its resume hello still on the way: ignored.  A frame that does not
            # decode is a stranger's, answered as before any handshake: refused, pipe
            # closed, counted (issue 11, defect a: it was dropped in silence, and the
            # stranger kept the link from a correct vCPU).
            try:
                frame: Frame | None = decode(data, self.host.cfg.max_message)
            except ProtocolError:
                frame = None
            if frame is not None and not isinstance(frame.msg, m.Hello):
                self.stale_frames += 1
                return
            if frame is None:
                self.bad_messages += 1
            await self._handshake(data, pipe, now)
            return
        try:
            duplicates = self.link.stats.duplicates
            msgs = self.link.receive(data, now)
            if self.link.stats.duplicates > duplicates and self.host.mutations.on(
                "replay-executes"
            ):
                msgs = [decode(data, self.host.cfg.max_message).msg]  # a duplicate runs again
        except ProtocolError as exc:
            # Could be a stranger on a replaced pipe, or a fresh guest process whose
            # hello we must still see: only a hello decodes without a session.
            hello = self._try_hello(data)
            if hello is not None:
                await self._handshake(data, pipe, now)
                return
            self.bad_messages += 1
            self.record_error(f"protocol error, dropping pipe: {exc}")
            await self._raw_reply(pipe, m.Error(code=exc.code, reason=str(exc)[:500]))
            return
        for msg in msgs:
            await self._dispatch(msg, data, pipe, now)
        if self.link is not None and self.link.ack_owed():
            self.send(m.Ack(), now)
        self.flush()
        self.host.kick_if_needed(self)

    def _try_hello(self, data: bytes) -> m.Hello | None:
        try:
            frame = decode(data, self.host.cfg.max_message)
        except ProtocolError:
            return None
        return frame.msg if isinstance(frame.msg, m.Hello) else None

    async def _handshake(self, data: bytes, pipe: pynng.Pipe, now: int) -> None:
        cfg = self.host.cfg
        try:
            frame = decode(data, cfg.max_message)
        except ProtocolError as exc:
            self.refused[f"bad message before hello: {exc.code.name}"] += 1
            self.log(f"refusing pipe {pipe.id}: {exc}")
            await self._raw_reply(pipe, m.Refuse(code=exc.code, reason=str(exc)[:500]))
            return
        hello = frame.msg
        if not isinstance(hello, m.Hello):
            if self.state is LinkState.WAIT_HELLO:
                self.refused["message before hello"] += 1
                await self._raw_reply(
                    pipe,
                    m.Refuse(code=ErrorCode.UNEXPECTED, reason=f"expected hello, got {hello.RULE}"),
                )
            return
        problem: tuple[ErrorCode, str] | None = None
        if not hmac.compare_digest(hello.token, cfg.token):
            problem = (ErrorCode.BAD_TOKEN, "wrong token")
        elif hello.version < 1:
            problem = (ErrorCode.BAD_VERSION, f"version {hello.version} unsupported")
        elif hello.vcpu != self.vcpu:
            problem = (ErrorCode.BAD_VCPU, f"this link serves vCPU {self.vcpu}, not {hello.vcpu}")
        if problem is not None:
            self.refused[problem[1]] += 1
            self.log(f"refused pid {hello.pid}: {problem[1]}")
            await self._raw_reply(pipe, m.Refuse(code=problem[0], reason=problem[1]))
            return
        link = self.link
        live = link is not None and self.state is not LinkState.WAIT_HELLO
        if hello.resume is not None:
            if link is None or not live or hello.resume != self.session:
                reason = f"session {hello.resume} is unknown here (ended, or the host restarted)"
                self.refused["unknown session"] += 1
                self.log(f"refused pid {hello.pid}: {reason}")
                await self._raw_reply(pipe, m.Refuse(code=ErrorCode.UNEXPECTED, reason=reason))
                return
            try:
                # checked before anything changes: a buggy vCPU's resume must not end
                # the session (nor the host); it gets an error and loses this pipe
                link.check_peer_ack(frame.ack)
            except ProtocolError as exc:
                self.bad_messages += 1
                self.record_error(f"resume refused, dropping pipe {pipe.id}: {exc}")
                await self._raw_reply(pipe, m.Error(code=exc.code, reason=str(exc)[:500]))
                return
            # Same process, new pipe: continue the session, retransmit what it lacks.
            if self.session_pipe is None:
                # issue 13: the first pipe of a session this host restored from a
                # migration.  Whatever was queued while the vCPU was on its way is
                # unacknowledged, so resume() below sends it again after the welcome.
                link.data_to_send()
                self.resumed_at = now
            self.session_pipe = pipe.id
            link.send(self._welcome(resumed=True), now)
            link.resume(frame.ack, now)
            mask = self.host.online.welcomed(self.vcpu, now)
            if mask is not None:  # cpu_online_mask as it stands (§4.6)
                link.send(m.OnlineMask(mask=mask), now)
            self.host.record_session(self, hello.pid, SESSION_RESUMED, None, now)
            self.log(
                f"session {self.session} resumed on pipe {pipe.id}; retransmitting "
                f"{link.unacked()} message(s)"
            )
            self.flush()
            return
        if live and link is not None and hello.pid == self.guest_pid and link.recv_next == 1:
            # The vCPU repeats its hello until a welcome arrives; this one crossed
            # ours.  Same process, nothing sequenced yet: answer it again.
            self.session_pipe = pipe.id
            link.send(self._welcome(resumed=None), now)
            self.flush()
            return
        if self.host.stopping:
            # refused before anything changes: a late hello must not touch the vCPU or
            # the record of a run that ended cleanly (issue 11, defect c)
            await self._raw_reply(
                pipe, m.Refuse(code=ErrorCode.SHUTTING_DOWN, reason="run is over")
            )
            return
        if live and link is not None and self.state is not LinkState.DONE:
            # (after a clean goodbye nothing was lost: a new session simply follows)
            lost = link.unacked_range()
            self.record_error(
                f"session {self.session} (pid {self.guest_pid}) replaced by a new process "
                f"(pid {hello.pid}); "
                + (
                    f"host messages {lost[0]}..{lost[1]} were never acknowledged and are lost"
                    if lost
                    else "no unacknowledged host messages"
                )
            )
        replaced = link.unacked_range() if live and link is not None else None  # history
        if live or self.sessions:
            # a new process on this vCPU starts from a reset vCPU, not the old one's state
            self.host.machine.reset_vcpu(self.vcpu, now)
        self.session = secrets.randbits(63) or 1
        self.sessions += 1
        self.guest_pid = hello.pid
        self.clock = ClockTracker()  # a new process: its clock is tracked afresh
        self.session_pipe = pipe.id
        self.link = Link(name=self.name, max_message=cfg.max_message)
        self.features = Feature(hello.features) & SUPPORTED_FEATURES
        self.version = min(PROTOCOL_VERSION, hello.version)
        self.host.machine.vcpus[self.vcpu].features = int(self.features)
        self.state = LinkState.OPEN
        self.link.send(self._welcome(resumed=None), now)
        mask = self.host.online.welcomed(self.vcpu, now)
        if mask is not None:  # cpu_online_mask as it stands: what this vCPU reads (§4.6)
            self.link.send(m.OnlineMask(mask=mask), now)
        self.flush()
        self.host.record_session(self, hello.pid, SESSION_NEW, replaced, now)
        self.host.connected(self)

    def _welcome(self, resumed: bool | None) -> m.Welcome:
        cfg = self.host.cfg
        state = self.host.machine.vcpus[self.vcpu]
        return m.Welcome(
            version=self.version,
            features=int(self.features),
            vcpu=self.vcpu,
            vcpus=cfg.vcpus,
            session=self.session,
            max_message=cfg.max_message,
            tsc_khz=cfg.tsc_khz,
            tsc_epoch=self.host.tsc.tsc_epoch,
            pvclock=state.pvclock.to_wire(),
            workload=cfg.workload,
            seed=cfg.seed,
            params=dict(cfg.params),
            resumed=resumed,
            mode=cfg.mode,
            apic=cfg.apic,
            hz=cfg.hz,
            ipi=cfg.ipi,
            trace=True if cfg.trace else None,
        )

    async def _dispatch(self, msg: m.Message, data: bytes, pipe: pynng.Pipe, now: int) -> None:
        assert self.link is not None
        if isinstance(msg, m.ExitMessage):
            seq = self.link.recv_next - 1
            self.last_exit_at = now
            if not self.first_exit_at:
                self.first_exit_at = now
            if self.host.mutations.sometimes("ack-before-exec"):
                return  # mutation: accepted (so acknowledged), never executed nor answered
            unseen = self.link.peer_acked < self.link.send_next - 1
            t0 = time.perf_counter_ns()
            try:
                result = self.host.machine.handle_exit(self.vcpu, seq, msg, now, unseen)
            except Exception as exc:  # a model bug must not take the other vCPUs down
                traceback.print_exc()
                self.record_error(f"host bug handling {exit_reason(msg)}: {exc!r}")
                result = ExitResult(fault=Fault.GP)
            if not -(1 << 63) <= result.value < (1 << 64) or not 0 <= result.fault < 256:
                # the reply could not be encoded (exit-reply.value is i64 / u64): a
                # model bug, answered like any other one
                self.record_error(
                    f"host bug handling {exit_reason(msg)}: reply {result.value:#x} "
                    f"fault {result.fault} not representable"
                )
                result = ExitResult(fault=Fault.GP)
            host_ns = time.perf_counter_ns() - t0
            modeled = self.host.exit_cost.cost_ns(msg) if self.host.exit_cost else 0
            if self.host.history is not None:
                self.host.history.add(H_EXIT, now, self.vcpu, seq, EXIT_INDEX[type(msg)], host_ns)
            if modeled:
                await _model_host_cost(modeled)
            # What the exit caused goes out before its reply (issue 11, defect b): new
            # kvmclock parameters (KVM updates the page before entry) and the interrupts
            # it raised, which KVM has pending on the entry that completes the instruction
            # (kvm-unit-tests' TSC-deadline test); run_actions sends publications first.
            self.host.run_actions()
            if not result.deferred:
                self.send(
                    m.ExitReply(re=seq, value=result.value, fault=result.fault, host_ns=host_ns),
                    now,
                )
            # bookkeeping once the reply is on its way: off the vCPU's critical path
            self.exits.record(msg, host_ns, modeled)
        elif isinstance(msg, m.Csd | m.CsdDone):
            self.host.relay_memory(self, msg)
        elif isinstance(msg, m.CpuOnline):
            self.host.cpu_online(self, msg, now)
        elif isinstance(msg, m.Report):
            self.report = msg
            self.reported.set()
        elif isinstance(msg, m.Trace):
            self.traces.append(msg)
        elif isinstance(msg, m.Goodbye):
            if self.state is not LinkState.DONE:
                self.send(m.Goodbye(), now)
                # the guest's final frame acked our goodbye if it arrives; give it a moment
            self.state = LinkState.DONE
            # the vCPU has stopped for good: its host timers go with it (KVM's vCPU
            # destroy); a periodic LAPIC timer would otherwise fire on until the host ends
            self.host.machine.cancel_vcpu_timers(self.vcpu)
            self.goodbye.set()
        elif isinstance(msg, m.Error):
            self.record_error(f"vCPU reported a protocol error: {msg.reason}")
        elif isinstance(msg, m.Hello):
            await self._handshake(data, pipe, now)
        elif isinstance(msg, m.Ping):
            # answered at once: the vCPU estimates the offset between the clocks
            answered = monotonic_ns()
            self.send(m.Pong(t=msg.t, host=answered), now)
            # issue 12: the exchange this ping completes feeds the link's tracker; a new
            # estimate goes out with a kvmclock re-publication, as KVM re-publishes after
            # writing a vCPU's TSC offset
            if self.clock.on_ping(msg.t, msg.echo, msg.rx, answered):
                self.host.publish_clock(self, now)
        elif isinstance(msg, m.Ack):
            pass
        else:
            self.record_error(f"unexpected {msg.RULE} from the vCPU")


class Host:
    def __init__(self, cfg: HostConfig, tsc: TscModel | None = None) -> None:
        """``tsc``: the guest TSC model of a VM this host takes over (issue 13: a
        migration's destination keeps the guest's TSC and ktime continuous); None for
        a new VM whose TSC starts at 0 now."""
        self.cfg = cfg
        now = monotonic_ns()
        self.tsc = tsc or TscModel(tsc_khz=cfg.tsc_khz, tsc_epoch=now, ktime_epoch=now)
        self.mutations = Mutations(cfg.mutations, cfg.seed)
        self.machine = Machine(
            cfg.vcpus,
            self.tsc,
            now,
            timer_advance=cfg.timer_advance,
            mutations=self.mutations,
        )
        self.exit_cost = load_profile(cfg.exit_cost) if cfg.exit_cost else None
        # ---- chaos (host/chaos/): the host half of the run's history
        target = record_target(cfg.chaos if cfg.chaos is not None else load_plan())
        self.history: EventLog | None = None
        if target is not None:
            header = {"role": "host", "pid": os.getpid(), "vcpus": cfg.vcpus}
            self.history = EventLog(target, header)
            self.machine.record = self.history.add
        # ---- end chaos
        # Devices register themselves in the machine's dispatch tables.  The host reads
        # the real-time clock here, once; device models never read a clock.
        self.kvmclock = KvmClock(
            self.machine,
            realtime_offset_ns=time.clock_gettime_ns(time.CLOCK_REALTIME) - monotonic_ns(),
        )
        self.pvtimer = PvTimer(self.machine)
        self.kvmclock.add_listener(self.pvtimer.on_republish)
        self.vmi_alarm = VmiAlarm(self.machine)
        self.pit = Pit(self.machine)
        self.pvapic = PvApic(self.machine)
        self.links: list[VcpuLink] = []
        #: the timer loop's wake-up: an absolute CLOCK_MONOTONIC timerfd (ns resolution;
        #: trio's own timeouts round up to whole ms), fired at once by kick()
        self._alarm = Alarm()
        self._sleeping_until = -1
        #: when the links are next looked after (NEVER: nothing pending on any link)
        self._housekeeping_at = 0
        self.stopping = False
        self.interrupted: str | None = None
        self.link_tick_ns = link_tick_ns(cfg.vcpus)
        #: guest memory every vCPU reads: cpu_online_mask, one page (host/onlinemask.py)
        self.online = OnlineMask(
            cfg.vcpus, holdoff_for(cfg.vcpus, LINK_TICK_NS), mutations=self.mutations
        )
        self.all_connected = trio.Event()
        self.started_at: int | None = None
        #: this process's CPU time (all threads, nng's included) when the run started
        self.cpu_at_start = 0
        # ---- live migration (issue 13, host/migration/)
        #: the VM is stopped while its state is copied: no frame is taken, no timer runs
        self.frozen = False
        self._thawed = trio.Event()
        #: frames being handled right now (a freeze waits for them to finish)
        self.handling = 0
        #: what the migration did, for the results (source or destination side)
        self.migration: dict[str, Any] | None = None
        #: True on a source once the destination runs the VM: this host's part is over
        self.migrated_out = False
        #: the figures a migration adds to the results once the reports are in
        self.migration_summary: Callable[[], dict[str, Any]] | None = None

    def freeze(self) -> None:
        """Stop the VM at a frame boundary (issue 13).  Exits, stores and acks wait in
        the vCPUs' links; the timer loop parks, so no device state changes."""
        self.frozen = True
        self._thawed = trio.Event()
        self.kick()  # the timer loop notices and parks

    def thaw(self) -> None:
        """The migration failed: run the VM here again.  What the vCPUs sent meanwhile
        was not taken; asking each link for a resend brings it now rather than after
        the retransmission timeout."""
        self.frozen = False
        self._thawed.set()
        self.kick()
        for vl in self.links:
            if vl.link is not None and vl.state is not LinkState.WAIT_HELLO:
                vl.send(m.Ack(resend=True))

    def close(self) -> None:
        """Release the host's own file descriptors (the timer loop's timerfd)."""
        self._alarm.close()
        if self.history is not None:
            self.history.close()

    def kick(self) -> None:
        self._alarm.fire_now()

    def kick_if_needed(self, vl: VcpuLink | None = None) -> None:
        """Wake the timer loop only if it now has an earlier deadline than it sleeps for:
        a host timer the frame armed, or link housekeeping that ``vl`` (the link the frame
        came on) now needs while none is scheduled.  O(1): nothing else changed."""
        deadline = self.machine.next_deadline()
        if deadline is not None and deadline < self._sleeping_until:
            self._alarm.fire_now()
            return
        if self._housekeeping_at != NEVER or vl is None or vl.link is None:
            return
        if vl.link.unacked() or vl.link.ack_owed(force=True):
            self._housekeeping_by(monotonic_ns() + self.link_tick_ns)

    def _housekeeping_by(self, at: int) -> None:
        """Run the link housekeeping at ``at`` at the latest, waking the timer loop if it
        sleeps past that."""
        if at < self._housekeeping_at:
            self._housekeeping_at = at
            if at < self._sleeping_until:
                self._alarm.fire_now()

    def connected(self, link: VcpuLink) -> None:
        if all(vl.state is not LinkState.WAIT_HELLO for vl in self.links):
            if self.started_at is None:
                self.started_at = monotonic_ns()
                self.cpu_at_start = time.process_time_ns()
                if self.history is not None:
                    self.history.add(H_RUN_START, self.started_at)
            self.all_connected.set()

    def relay_memory(self, source: VcpuLink, msg: m.Csd | m.CsdDone) -> None:
        """Carry a guest memory store (a csd or its unlock) to the vCPU that reads it.

        It goes out on the destination's link in order with everything else sent there,
        so a csd always precedes the IPI its sender raises afterwards.  A store for a
        vCPU that is not running is answered here: the sender's wait ends with an error
        at once instead of at its timeout.
        """
        if msg.src != source.vcpu or not 0 <= msg.dst < len(self.links):
            source.record_error(f"{msg.RULE} with src {msg.src} dst {msg.dst} refused")
            return
        target = self.links[msg.dst]
        if target.link is not None and target.state in (LinkState.OPEN, LinkState.CLOSING):
            target.send(msg)
            target.relayed += 1
            return
        if isinstance(msg, m.Csd):
            source.send(
                m.CsdDone(
                    src=msg.dst,
                    dst=msg.src,
                    id=msg.id,
                    ran=0,
                    error=f"vCPU {msg.dst} is not running",
                )
            )

    def cpu_online(self, source: VcpuLink, msg: m.CpuOnline, now: int) -> None:
        """``set_cpu_online``: a vCPU stored its bit in cpu_online_mask, the page this
        host holds (docs/protocol.md §4.6).  The other vCPUs are sent the page by the
        next link housekeeping, coalesced (host/onlinemask.py).  A vCPU may store only
        its own bit: another number is refused like a csd with the wrong src."""
        try:
            changed = self.online.store(source.vcpu, msg.cpu)
        except ValueError as exc:
            source.record_error(str(exc))
            return
        if changed:
            self._housekeeping_by(now + self.link_tick_ns)  # the tick that sends the masks

    def _takes_mask(self, vcpu: int) -> bool:
        vl = self.links[vcpu]
        return vl.link is not None and vl.state is LinkState.OPEN

    def send_publications(self) -> None:
        """Send a ``pvclock`` message for every vCPU whose kvmclock was re-published."""
        for i in self.kvmclock.take_publications():
            vl = self.links[i]
            if vl.link is not None and vl.state is not LinkState.DONE:
                sync = vl.clock.take_correction()  # issue 12: the TSC line goes along
                vl.send(
                    m.Pvclock(
                        info=self.machine.vcpus[i].pvclock.to_wire(),
                        tsc_sync=sync.to_wire() if sync is not None else None,
                    )
                )

    def publish_clock(self, vl: VcpuLink, now: int) -> None:
        """Issue 12: the tracker moved ``vl``'s clock line: publish it to the vCPU in a
        ``pvclock`` message, with the kvmclock page as it stands.

        The page is not re-anchored at ``now``: it describes the host's own line, which
        did not change (the vCPU's TSC did), and a ``tsc_timestamp`` taken now would be
        ahead of the TSC of a vCPU whose clock lags (the correction is what closes that
        gap), so its unsigned ``tsc - tsc_timestamp`` would wrap: the drift test saw
        ktime jump by 2^64 * 0.4 ns.  On KVM the TSC is one counter host and guest share,
        so a fresh anchor is always behind the guest's TSC; across machines it is not.
        """
        sync = vl.clock.take_correction()
        if sync is not None and vl.link is not None and vl.state is not LinkState.DONE:
            state = self.machine.vcpus[vl.vcpu]
            vl.send(m.Pvclock(info=state.pvclock.to_wire(), tsc_sync=sync.to_wire()), now)

    def run_actions(self) -> None:
        self.send_publications()  # an interrupt armed from a new clock must not overtake it
        for action in self.machine.take_actions():
            vl = self.links[action.vcpu]
            if vl.link is None or vl.state is LinkState.DONE:
                continue
            if isinstance(action, InjectIrq):
                if action.not_before is not None:
                    _spin_until(action.not_before)
                vl.send(
                    m.Inject(
                        vector=action.vector,
                        host_time=action.now,
                        pv_eoi=True if action.pv_eoi else None,
                    )
                )
                if self.history is not None and vl.link is not None:
                    self._record_inject(vl.link.send_next - 1, action)
            elif isinstance(action, CompleteHlt):
                vl.send(m.ExitReply(re=action.re, value=0, fault=0, host_ns=0))

    # ------------------------------------------------------------------ chaos history

    def record_session(
        self, vl: VcpuLink, pid: int, kind: int, lost: tuple[int, int] | None, now: int
    ) -> None:
        """A session began (its LAPIC counters at that moment too) or resumed."""
        if self.history is None:
            return
        lo, hi = lost or (0, 0)
        self.history.add(H_SESSION, now, vl.vcpu, vl.session, pid, kind, lo, hi)
        if kind == SESSION_NEW:
            state = self.machine.vcpus[vl.vcpu]
            self.history.add(H_LAPIC_BASE, now, vl.vcpu, state.lapic.stats.eois, state.injected)

    def _record_inject(self, seq: int, action: InjectIrq) -> None:
        """An injection went out as link message ``seq``, with what it carries."""
        assert self.history is not None
        sent = monotonic_ns()
        self.history.add(
            H_INJECT, sent, action.vcpu, seq, action.vector, action.origin, len(action.ipis)
        )
        for src, gen, src_seq in action.ipis:
            self.history.add(H_INJECT_IPI, sent, action.vcpu, seq, src, gen, src_seq)

    async def watchdog(self) -> None:
        """Chaos history: gaps in the host's own scheduling (a timer that fires late while
        the host process was not running is explained by this)."""
        assert self.history is not None
        last = monotonic_ns()
        while True:
            await trio.sleep(WATCHDOG_S)
            now = monotonic_ns()
            gap = now - last - int(WATCHDOG_S * 1e9)
            if gap >= WATCHDOG_GAP_NS:
                self.history.add(H_STALL, now - gap, gap)
            last = now

    # ------------------------------------------------------------------ end chaos history

    async def timer_loop(self) -> None:
        while True:
            now = monotonic_ns()
            if now >= self._housekeeping_at:
                self._housekeeping_at = self._link_housekeeping(now)
            deadline = self.machine.next_deadline()
            wake = (
                self._housekeeping_at if deadline is None else min(deadline, self._housekeeping_at)
            )
            self._sleeping_until = wake
            if wake < NEVER:
                # host time is CLOCK_MONOTONIC here (the host's clock is never skewed)
                self._alarm.arm(wake)
            else:
                self._alarm.disarm()
            # a checkpoint even when the deadline has passed (proto/timerfd.py): a loop
            # that is behind must still let the receive loops and the run clock run
            await self._alarm.wait()
            self._sleeping_until = -1  # awake: nothing needs kicking
            if self.frozen:
                await self._thawed.wait()  # issue 13: nothing runs while it is copied
                continue
            self.machine.on_timer(monotonic_ns())
            self.run_actions()

    def _link_housekeeping(self, now: int) -> int:
        """Retransmit, fail dead links, send owed acks, send stale views of
        cpu_online_mask (at most one per link per tick); returns when to look again."""
        for vcpu, mask in self.online.due(now, self._takes_mask):
            self.links[vcpu].send(m.OnlineMask(mask=mask), now)
        pending = self.online.pending()  # views held off: a later tick sends them
        for vl in self.links:
            if vl.link is None or vl.state is LinkState.WAIT_HELLO:
                continue
            if vl.state is LinkState.DONE and not vl.peer_connected():
                # the session ended with goodbyes and its process has left: a final
                # frame still unacknowledged (the ack of our goodbye, lost as the
                # process exited) is not a lost peer, and nobody is left to resend to
                continue
            try:
                vl.link.poll(now)
            except LinkError as exc:
                if vl.ep.pending() or vl.peer_connected():
                    # its acks wait unread (we are the slow side), or its process still
                    # holds the pipe: a slow or stopped vCPU is not a lost one, as a vCPU
                    # thread descheduled for long is not on a real host
                    vl.link.peer_alive(now)
                else:
                    vl.fail(str(exc))
                    continue
            if vl.link.ack_owed(force=True):
                vl.send(m.Ack(), now)
            vl.flush()
            if vl.link is not None and vl.link.unacked():
                pending = True
        return now + self.link_tick_ns if pending else NEVER

    async def stop_all(self) -> None:
        """Tell every vCPU to stop, collect reports and goodbyes (bounded wait)."""
        self.stopping = True
        if self.history is not None:
            self.history.add(H_RUN_END, monotonic_ns())
        self.machine.shutdown()
        self.run_actions()
        for vl in self.links:
            if vl.link is not None and vl.state is LinkState.OPEN:
                vl.state = LinkState.CLOSING
                vl.send(m.Shutdown(reason="run complete"))
            else:
                vl.reported.set()
                vl.goodbye.set()
        # every report is a few ms of work here; with hundreds of vCPUs on a few cores
        # the last ones come late without anything being wrong (issue 9)
        timeout = max(self.cfg.report_timeout_s, REPORT_S_PER_VCPU * self.cfg.vcpus)
        with trio.move_on_after(timeout) as scope:
            for vl in self.links:
                await vl.goodbye.wait()
        if scope.cancelled_caught:
            for vl in self.links:
                if not vl.goodbye.is_set():
                    vl.record_error(f"no report/goodbye within {timeout:g} s")
        # Let the final acks of our goodbyes arrive before closing.
        with trio.move_on_after(0.5):
            while any(  # noqa: ASYNC110
                vl.link is not None and vl.link.unacked()
                for vl in self.links
                if vl.state is LinkState.DONE
            ):
                # acks arrive on the receive loops; a short poll is simpler than an
                # event per link for this one-off wait of at most 0.5 s
                await trio.sleep(0.01)

    def _trace(self, traces: list[m.Trace]) -> dict[str, Any]:
        """A vCPU's trace window, decoded; injection times moved to guest ktime."""
        names = [m.EXIT_KIND_NAMES[cls] for cls in m.EXIT_CLASSES]

        def records(field: str) -> list[tuple[int, ...]]:
            data = b"".join(getattr(t, field) or b"" for t in traces)
            return list(struct.iter_unpack("<qqqq", data[: len(data) // 32 * 32]))

        epoch = self.tsc.ktime_epoch
        return {
            "exits": [
                [t, rtt, host, names[k] if 0 <= k < len(names) else "?"]
                for t, rtt, host, k in records("exits")
            ],
            "irqs": [[a, h, v, host_time - epoch] for a, h, v, host_time in records("irqs")],
            "events": [list(r) for r in records("events")],
            "calls": [list(r) for r in records("calls")],
        }

    def _device_stats(self, vcpu: int) -> dict[str, Any]:
        """What each device model counted for this vCPU (coalesced interrupts, EOIs, ...)."""
        state = self.machine.vcpus[vcpu]
        return {
            "lapic": asdict(state.lapic.stats)
            | {"timer_advance_ns": state.lapic.timer_advance_ns}
            | _in_service(state.lapic.isr, state.lapic.irr),
            "pv_eois": state.pv_eois,
            "pvtimer": asdict(self.pvtimer.stats[vcpu]),
            "vmi_alarm": asdict(self.vmi_alarm.stats[vcpu]),
            "pvapic": asdict(self.pvapic.stats[vcpu]),
        }

    def results(self, ended_ns: int) -> dict[str, Any]:
        vcpus = []
        for vl in self.links:
            entry: dict[str, Any] = {
                "vcpu": vl.vcpu,
                "guest_pid": vl.guest_pid,
                "sessions": vl.sessions,
                "host_exits": vl.exits.kinds(),
                "host_exit_reasons": vl.exits.reasons(),
                "injected": self.machine.vcpus[vl.vcpu].injected,
                "devices": self._device_stats(vl.vcpu),
                "trace": self._trace(vl.traces) if vl.traces else None,
                "unclaimed_exits": dict(self.machine.vcpus[vl.vcpu].unclaimed),
                "refused": dict(vl.refused),
                "bad_messages": vl.bad_messages,
                "stale_frames": vl.stale_frames,
                "relayed_stores": vl.relayed,
                "pipes": dict(vl.pipes),
                "link_errors": list(vl.errors),
                "host_bugs": vl.host_bugs + len(self.machine.vcpus[vl.vcpu].bugs),
                "link": vl.link.stats.as_dict() if vl.link is not None else None,
                "clock": vl.clock.as_dict(),  # issue 12: offset, drift, error bound
            }
            if self.migration is not None:
                entry["frozen_frames"] = vl.frozen_frames
            if vl.report is not None:
                r = vl.report
                entry["guest"] = {
                    "events": r.events,
                    "early": r.early,
                    "spurious": r.spurious,
                    "exits": r.exits,
                    "exit_rtt_ns_total": r.exit_rtt_ns,
                    "lateness_hdr": _hdr_text(vl, "lateness_hdr", r.lateness_hdr),
                    "lateness_max_ns": r.lateness_max,
                    "duration_ns": r.duration_ns,
                    "mode": r.mode,
                    "counters": r.counters or {},
                    "ipi_hdr": _hdr_text(vl, "ipi_hdr", r.ipi_hdr),
                    "call_hdr": _hdr_text(vl, "call_hdr", r.call_hdr),
                    "timeline": [
                        list(pair) for pair in struct.iter_unpack("<qq", r.timeline or b"")
                    ]
                    if r.timeline and len(r.timeline) % 16 == 0
                    else [],
                }
            else:
                entry["guest"] = None
                if not vl.errors and not self.migrated_out:
                    # (a source's vCPUs report to the destination, issue 13)
                    vl.errors.append("vCPU sent no report")
            # again: reading the report may have recorded a problem with it
            entry["link_errors"] = list(vl.errors)
            vcpus.append(entry)
        return (
            {
                "vtick": 1,
                "config": {
                    "vcpus": self.cfg.vcpus,
                    "listen": self.cfg.listen,
                    "duration_s": self.cfg.duration_s,
                    "workload": self.cfg.workload,
                    "seed": self.cfg.seed,
                    "params": self.cfg.params,
                    "tsc_khz": self.cfg.tsc_khz,
                    "timer_advance": self.cfg.timer_advance,
                    "exit_cost": self.cfg.exit_cost,
                    "mode": self.cfg.mode,
                    "apic": self.cfg.apic,
                    "hz": self.cfg.hz,
                    "ipi": self.cfg.ipi,
                    "mutations": list(self.cfg.mutations),
                },
                "mutations_applied": self.mutations.as_dict() if self.mutations else None,
                "wall_ns": ended_ns - (self.started_at or ended_ns),
                # the host process's CPU time (user + system, every thread) from the
                # start of the run to its results: what the host really spent, where
                # host_ns per exit is the wall time of the model's handling only
                "host_cpu_ns": time.process_time_ns() - self.cpu_at_start
                if self.started_at is not None
                else 0,
                # "timerfd": host timers fire with ns resolution; "trio": on a 1 ms grid
                "timer_backend": TIMER_BACKEND,
                # cpu_online_mask (host/onlinemask.py): stores taken, masks sent
                "online_mask": asdict(self.online.stats),
                "vcpus": vcpus,
                "exit_cost": self.exit_cost.as_dict() if self.exit_cost else None,
                "ok": all(
                    not e["link_errors"]
                    and (e["guest"] is not None or self.migrated_out)
                    and not e["host_bugs"]
                    for e in vcpus
                ),
            }
            | (self.migration or {})
            | (self.migration_summary() if self.migration_summary else {})
        )


def _in_service(isr: int, irr: int) -> dict[str, list[int]]:
    """The vectors in service and pending (chaos: LAPIC consistency at the end)."""
    return {
        "isr_vectors": [v for v in range(256) if isr >> v & 1],
        "irr_vectors": [v for v in range(256) if irr >> v & 1],
    }


def _hdr_text(vl: VcpuLink, field: str, blob: bytes | None) -> str | None:
    """A report's HDR histogram as the base64 text it must be; anything else (the schema
    admits any bytes) is recorded against the vCPU and dropped, so one bad report cannot
    stop the host writing everyone's results (found by ``vtick fuzz``)."""
    if not blob:
        return None
    try:
        text = blob.decode("ascii")
        base64.b64decode(text, validate=True)
    except (UnicodeDecodeError, binascii.Error):
        vl.record_error(f"report.{field} is not a base64 HDR histogram; dropped")
        return None
    return text


async def _model_host_cost(ns: int) -> None:
    """An exit-cost profile's extra handling time: the reply waits for it.  Short costs
    are spun (a host CPU busy emulating), long ones slept."""
    if ns <= SPIN_MAX_NS:
        _spin_until(time.monotonic_ns() + ns)
    else:
        await sleep_ns(ns)


def _spin_until(host_ns: int) -> None:
    """Timer advance: KVM busy-waits in ``__kvm_wait_lapic_expire`` until the guest TSC
    reaches the deadline before entering the guest; the host does the same before it
    sends the injection.  The wait is short: the LAPIC arms at most 5 us early
    (LAPIC_TIMER_ADVANCE_NS_MAX), so this never blocks the event loop for long."""
    while time.monotonic_ns() < host_ns:
        pass


# ---------------------------------------------------------------------- exposure (issue 12)


def check_exposure(url: str, allow_insecure_tcp: bool = False) -> None:
    """Refuse a clear-text tcp:// listen beyond loopback unless asked for explicitly.

    The token authenticates a vCPU, but over tcp:// it travels in clear text, as does
    every exit: anyone on the path can read the token and take a vCPU's place.  Loopback
    never leaves the machine; tls+tcp:// is encrypted; anything else needs
    ``--allow-insecure-tcp`` (a lab network the user trusts, or a test's namespaces).
    An unspecified address (0.0.0.0, ::) listens on every interface and counts as
    beyond loopback.

    Raises:
        OSError: the one-line refusal (the command line exits with status 2).
    """
    if allow_insecure_tcp or not url.startswith("tcp://"):
        return
    host = urlsplit(url).hostname or "127.0.0.1"
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        addresses = {host}  # unresolvable: check_listen or nng will say so; refuse here
    if all(_is_loopback(a) for a in addresses):
        return
    raise OSError(
        f"{url} would carry the token and every exit in clear text beyond loopback: "
        "listen on 127.0.0.1, use tls+tcp:// (certificates: vtick topology certs DIR), "
        "or pass --allow-insecure-tcp on a network you trust"
    )


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------- end of exposure


async def serve(
    cfg: HostConfig, *, task_status: trio.TaskStatus[Host] = trio.TASK_STATUS_IGNORED
) -> dict[str, Any]:
    """Run the host until the run is over; return (and optionally write) the results."""
    if cfg.incoming is not None:
        # issue 13: a migration's destination; it builds its Host from the VM it receives
        from vtick.host.migration.destination import serve_incoming

        return await serve_incoming(cfg, task_status=task_status)
    check_exposure(cfg.listen, cfg.allow_insecure_tcp)  # before anything listens
    return await run_host(Host(cfg), _run_new_vm, task_status=task_status)


async def _run_new_vm(host: Host) -> None:
    """A new VM: wait for every vCPU, run for the duration (moving the VM to another
    host on the way if asked, issue 13)."""
    cfg = host.cfg
    with trio.move_on_after(cfg.connect_timeout_s):
        await host.all_connected.wait()
    if not host.all_connected.is_set():
        for vl in host.links:
            if vl.state is LinkState.WAIT_HELLO:
                vl.record_error(f"never connected within {cfg.connect_timeout_s} s")
        return
    start = trio.current_time()
    at = cfg.migrate_at_s
    if cfg.migrate_to is not None and at is not None and at < cfg.duration_s:
        from vtick.host.migration.source import migrate_out

        await trio.sleep_until(start + at)
        end_ns = monotonic_ns() + int((start + cfg.duration_s - trio.current_time()) * 1e9)
        if await migrate_out(host, cfg.migrate_to, end_ns):
            return  # the destination runs the VM from here on
    await trio.sleep_until(start + cfg.duration_s)


async def run_host(
    host: Host,
    body: Callable[[Host], Awaitable[None]],
    prepare: Callable[[Host], None] | None = None,
    *,
    task_status: trio.TaskStatus[Host] = trio.TASK_STATUS_IGNORED,
) -> dict[str, Any]:
    """Serve ``host``'s links while ``body`` runs the VM, then stop the vCPUs (unless
    the VM moved away), write and return the results.  ``prepare`` runs once the links
    exist, before anything is served (a migration's destination restores them)."""
    cfg = host.cfg
    urls = [link_url(cfg.listen, i) for i in range(cfg.vcpus)]
    endpoints: list[PairEndpoint] = []
    try:
        for url in urls:
            endpoints.append(PairEndpoint.listen(url, cfg.max_message))
        host.links = [VcpuLink(host, i, ep) for i, ep in enumerate(endpoints)]
        if prepare is not None:
            prepare(host)
        async with trio.open_nursery() as nursery:
            for vl in host.links:
                nursery.start_soon(vl.run)
                nursery.start_soon(vl.ep.run_sender)
                nursery.start_soon(vl.watch_pipes)
            nursery.start_soon(host.timer_loop)
            if host.history is not None:
                nursery.start_soon(host.watchdog)  # chaos history (host/chaos/)

            def interrupted(signum: int) -> None:
                host.interrupted = f"interrupted by {signal.Signals(signum).name}"
                print(f"vtick host: {host.interrupted}", file=sys.stderr, flush=True)
                nursery.cancel_scope.cancel()

            # installed before READY, so a signal right after READY still cleans up
            await nursery.start(watch_signals, interrupted)
            nursery.start_soon(watch_parent, nursery.cancel_scope)
            for name in cfg.mutations:
                print(
                    f"vtick host: MUTATION ACTIVE: {name}: {MUTATIONS[name].breaks} "
                    "(a planted bug for testing checkers; this run's figures are wrong on "
                    "purpose)",
                    file=sys.stderr,
                    flush=True,
                )
            if cfg.announce:
                print(f"READY {cfg.listen}", flush=True)
            task_status.started(host)
            await body(host)
            if host.migrated_out:
                host.stopping = True  # a late hello is refused: the VM runs elsewhere
            else:
                await host.stop_all()
            nursery.cancel_scope.cancel()
    finally:
        for ep in endpoints:
            ep.close()
        host.close()
        for url in urls:
            remove_ipc_file(url)
    results = host.results(monotonic_ns())
    if host.interrupted:
        results["ok"] = False
        results["interrupted"] = host.interrupted
    if cfg.results_path:
        write_json(cfg.results_path, results)
    return results
