"""One guest vCPU process: the link to the host, the exit primitive, interrupt delivery.

The vCPU runs its workload as a loop of "instructions" separated by instruction
boundaries, where pending injected interrupts are delivered.  An exit (hypercall, HLT,
MMIO/MSR/port access) is a synchronous request: the loop sends it and waits for the
host's reply; injected interrupts arriving meanwhile are queued and delivered at the
next boundary.  A HLT is answered by the host only once an interrupt is pending.  The
host's shutdown stops a vCPU running its workload at its next exit, in the middle of
whatever kernel op it is in, as a VMM stops a VM by kicking its vCPUs out of ``KVM_RUN``
(``run_op``).

Exit codes: 0 done, 2 no host reached, 3 refused, 4 protocol error, 5 link lost.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import os
import signal
import struct
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio
from hdrh.histogram import HdrHistogram

from vtick.guest.clocksource import Kvmclock, PvclockPage
from vtick.guest.clocksync import (
    CLOCK_PING_ONE_CLOCK_S,
    CLOCK_PING_S,
    PINGS,
    ClockDiscipline,
    ClockSample,
    DisciplinedTsc,
    Offset,
    Pinger,
    TscSync,
    estimate_offset,
)
from vtick.guest.cpu import (
    KernelOp,
    MemoryWrite,
    PreemptionPoint,
    SpinWait,
    Udelay,
    hlt,
    pause_exit,
)
from vtick.guest.hrtimer import Expiry
from vtick.guest.kernel import GuestKernel
from vtick.guest.recorder import HistoryRecorder, Recorder
from vtick.guest.workload import (
    IpiStormWorkload,
    MixedWorkload,
    TickWorkload,
    TimerStormWorkload,
    Workload,
)
from vtick.proto import messages as m
from vtick.proto.abi import PROTOCOL_VERSION, Feature
from vtick.proto.catalog import PREEMPTION_POINTS, WORKLOAD_PARAMS
from vtick.proto.codec import DEFAULT_MAX_MESSAGE, decode
from vtick.proto.cpumask import decode_mask
from vtick.proto.errors import ErrorCode, LinkError, LocalProtocolError, ProtocolError
from vtick.proto.eventlog import load_plan, record_target
from vtick.proto.faultshim import FaultShim, windows_from_plan
from vtick.proto.lifecycle import PARENT_ENV, watch_parent, watch_signals
from vtick.proto.link import Link
from vtick.proto.pvclock import PvclockInfo, TscModel
from vtick.proto.timerfd import sleep_ns
from vtick.proto.transport import PairEndpoint, link_url, monotonic_ns

__all__ = ["GuestConfig", "GuestFatal", "GuestVcpu", "run_guest", "LATENESS_HIGHEST_NS"]

T = TypeVar("T")
#: exit kind -> its index in trace records (vtick.proto.messages.EXIT_CLASSES order)
EXIT_INDEX = {cls: i for i, cls in enumerate(m.EXIT_CLASSES)}
DEFAULT_MODE = "pv-ktime"
HELLO_RETRY_S = 0.2
#: pipes the host drops before any answer to our hello: nng's Pair0 admits one peer per
#: socket and turns any other away at once, without a message, so this many in a row, over
#: at least TURNED_AWAY_S (a restarted vCPU may meet its predecessor's pipe for a moment),
#: mean another process holds this vCPU's link
TURNED_AWAY_LIMIT = 3
TURNED_AWAY_S = 1.0
PING_TIMEOUT_S = 1.0
#: a spinning vCPU re-checks its interrupts and the clock at least this often
SPIN_SLICE_S = 0.005
TICK_S = 0.02
#: the wait for the host's goodbye grows with the VM's size (at least goodbye_timeout_s)
GOODBYE_S_PER_VCPU = 0.1
#: how long a booted vCPU waits for the others to come online before its workload
#: starts anyway (at least ALL_ONLINE_S; a big VM on a few cores boots slowly)
ALL_ONLINE_S = 2.0
ALL_ONLINE_S_PER_VCPU = 0.02
#: ... or until no other CPU came online for this long
ALL_ONLINE_STALL_S = 0.5
#: issue 13: at most this many timers in flight across a move are kept
MIGRATION_TIMERS_KEPT = 4096
#: HDR histogram range for lateness: 1 ns .. 60 s at 3 significant digits
LATENESS_HIGHEST_NS = 60_000_000_000


class GuestFatal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class VcpuStopped(Exception):
    """The run is over: the vCPU stops at its next exit, in the middle of whatever kernel
    op it was running (see :meth:`GuestVcpu.run_op`)."""


@dataclass
class GuestConfig:
    connect: str
    vcpu: int
    token: bytes
    handshake_timeout_s: float = 10.0
    goodbye_timeout_s: float = 5.0
    features: int = int(
        Feature.PVCLOCK | Feature.PV_TIMER | Feature.VMI | Feature.PV_EOI | Feature.PV_SEND_IPI
    )
    #: preemption points: name -> delay in ns injected every time the vCPU passes it
    preempt_ns: dict[str, int] = field(default_factory=dict)
    #: this process's part of a chaos schedule (host/chaos/): event log path, preemption
    #: windows, link faults; None = read $VTICK_CHAOS_PLAN (vtick.proto.eventlog)
    chaos: dict[str, Any] | None = None
    #: follow the host's clock corrections (issue 12); off: the handshake's estimate only
    clock_tracking: bool = True
    #: the clock is skewed/drifted on purpose on the host's machine (--clock-skew,
    #: --clock-drift-ppm): the true error of the tracking is then known and reported
    synthetic_clock: bool = False


TIMELINE_POINTS = 2048
#: the timeline always keeps this many of its largest samples (stall evidence)
TIMELINE_PEAKS = 32
#: a gap this long in the vCPU's own scheduling, or a non-HLT exit the host took this long
#: to answer, is a stall (the report keeps the longest few; host/lab/metrics.py lists them)
STALL_NS = 250_000_000
STALLS_KEPT = 4
#: the chaos history records every gap of at least this (host/chaos/: lateness explained)
HISTORY_STALL_NS = 30_000_000


class Worst:
    """The ``k`` largest (value, at) pairs seen: a min-heap, so a sample that is not among
    them costs one comparison."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.heap: list[tuple[int, int]] = []

    def add(self, value: int, at: int) -> None:
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, (value, at))
        elif value > self.heap[0][0]:
            heapq.heapreplace(self.heap, (value, at))

    def largest(self) -> list[tuple[int, int]]:
        return sorted(self.heap, reverse=True)


class Timeline:
    """At most ``limit`` (time, value) samples spread over the whole run: every sample is
    kept until the buffer is full, then every other one is dropped and only every 2nd,
    4th, ... new one is kept (stride doubling), so memory stays bounded and recording
    costs a counter increment most of the time.  The ``peaks`` largest samples are kept
    whatever the stride, so a stall (a few very late events) is never decimated away."""

    def __init__(self, limit: int, peaks: int = TIMELINE_PEAKS) -> None:
        self.limit = limit - peaks
        self.stride = 1
        self.seen = 0
        self.points: list[tuple[int, int]] = []
        self.peaks = Worst(peaks)

    def add(self, at: int, value: int) -> None:
        self.peaks.add(value, at)
        self.seen += 1
        if self.seen % self.stride:
            return
        self.points.append((at, value))
        if len(self.points) >= self.limit:
            self.points = self.points[::2]
            self.stride *= 2

    def pack(self) -> bytes:
        merged = sorted(set(self.points) | {(t, v) for v, t in self.peaks.heap})
        return b"".join(struct.pack("<qq", t, v) for t, v in merged)


@dataclass
class GuestStats:
    exits: Counter[str] = field(default_factory=Counter)
    exit_rtt_ns: Counter[str] = field(default_factory=Counter)
    spurious: int = 0
    lateness: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, LATENESS_HIGHEST_NS, 3))
    lateness_max: int = 0
    lateness_overflow: int = 0
    preemptions: Counter[str] = field(default_factory=Counter)
    timeline: Timeline = field(default_factory=lambda: Timeline(TIMELINE_POINTS))
    #: the longest gaps in this process's own scheduling (SIGSTOP, a starved CPU):
    #: (ns, guest ktime when it stopped running)
    stalls: Worst = field(default_factory=lambda: Worst(STALLS_KEPT))
    #: the longest non-HLT exits the host took to answer: (ns, guest ktime sent)
    host_waits: Worst = field(default_factory=lambda: Worst(STALLS_KEPT))

    def record_call(self, at: int, ns: int) -> None:
        """An smp_call_function call returned (the IPI storm's timeline)."""
        self.timeline.add(at, ns)

    def record_lateness(self, ns: int, at: int = 0) -> None:
        self.timeline.add(at, ns)
        self.lateness_max = max(self.lateness_max, ns)
        if not self.lateness.record_value(min(max(ns, 0), LATENESS_HIGHEST_NS)):
            self.lateness_overflow += 1


class GuestVcpu:
    def __init__(self, cfg: GuestConfig) -> None:
        self.cfg = cfg
        self.name = f"vCPU {cfg.vcpu}"
        self.link = Link(name=f"{self.name} (guest)", max_message=DEFAULT_MAX_MESSAGE)
        self.ep: PairEndpoint | FaultShim | None = None
        self.welcome: m.Welcome | None = None
        self.welcomed = trio.Event()
        self.tsc: TscModel | DisciplinedTsc | None = None
        #: injected, not yet taken: (vector, PV EOI flag, trace record index, history
        #: slot, link number of the inject)
        self.pending: deque[tuple[int, bool, int, int, int]] = deque()
        self.recorder: Recorder | None = None
        # ---- chaos (host/chaos/): the whole run's history and the scheduled faults
        self.chaos = cfg.chaos if cfg.chaos is not None else load_plan()
        self.history: HistoryRecorder | None = None
        self._irq_seq = 0  # link number of the injection being handled (history)
        #: preemption windows not yet taken: point -> (ns after the workload started, ns)
        self._windows = _chaos_windows(self.chaos)
        # ---- end chaos
        self.shutdown_requested = False
        #: the shutdown arrived while the workload ran: stop at the next exit (run_op)
        self.stop_at_next_exit = False
        #: ... and it stopped the vCPU in the middle of a kernel op
        self.stopped_mid_op = False
        self.host_goodbye = trio.Event()
        self._reply: m.ExitReply | None = None
        #: the vCPU's task receives (in and between its exits), not the receive loop
        self._exit_rx = False
        self._rx_given_back = trio.Event()
        self._rx_busy = False
        self._rx_scope: trio.CancelScope | None = None
        self._rx_left = trio.Event()
        self._outstanding: int | None = None
        self.stats = GuestStats()
        self.pipes_seen = 0
        #: pipes to the host that are up now (nng's add/remove events)
        self.pipes_up = 0
        self.stale_frames = 0
        self.duration_ns = 0
        #: the pvclock page: the one copy of the host's latest PvclockInfo
        self.page: PvclockPage | None = None
        self.clock: Kvmclock | None = None
        self.kernel: GuestKernel | None = None
        self.workload: Workload | None = None
        self._pv_eois_reported = 0
        self._irq_at = 0  # arrival of the interrupt being handled (trace records)
        self._pong = trio.Event()
        self._pong_msg: m.Pong | None = None
        self.clock_offset: Offset | None = None
        # issue 12: this machine's clock mapped onto the host's, corrected during the run
        self.pinger = Pinger()
        self._pong_sample: ClockSample | None = None
        #: while the handshake's clock sync runs: every exchange completed so far
        self._clock_samples: list[ClockSample] | None = None
        self.discipline: ClockDiscipline | None = None
        self._early_sync: TscSync | None = None
        self.true_error_max = 0
        self.true_error_last = 0
        self.boot_exits: dict[str, int] = {}
        self._memory_event = trio.Event()
        self._early_csds: list[m.Csd] = []
        self._early_mask: bytes | None = None  # cpu_online_mask sent before the boot
        self.turned_away = 0
        self._first_turned_away = 0
        self.workload_started = 0
        #: how long the booted vCPU waited for the others to come online
        self.all_online_wait_ns = 0
        # ---- live migration (issue 13): the destination this vCPU was told to move to,
        # the guest ktime the source froze the VM at, and when the vCPU resumed there
        self.migrating_to: str | None = None
        self.migrations = 0
        self.migration_frozen = 0
        self.migration_told = 0
        self.migration_resumed = 0
        #: lateness of the timers in flight across the move (programmed before the
        #: resume, run after it), bounded
        self.migration_lateness: list[int] = []
        self._migration_programmings: set[int] = set()
        #: those of them due after the resume (they spanned the blackout)
        self.migration_spanning: list[int] = []
        #: destination clock - source clock, summed over moves (see _migrated)
        self.clock_domain_shift = 0

    # ------------------------------------------------------------------ clock

    def ktime(self) -> int:
        """Guest CLOCK_MONOTONIC through kvmclock: TSC read, then pvclock scaling."""
        assert self.tsc is not None
        assert self.page is not None
        return self.page.info.ktime(self.tsc.tsc(monotonic_ns()))

    # ------------------------------------------------------------------ link I/O

    def _send(self, msg: m.Message, now: int) -> None:
        try:
            self.link.send(msg, now)
        except LinkError as exc:  # the send window is full: the host stopped acking
            raise GuestFatal(5, str(exc)) from None

    def flush(self) -> None:
        assert self.ep is not None
        self.ep.send(self.link.data_to_send())

    def _hello(self, resume: int | None) -> m.Hello:
        return m.Hello(
            version=PROTOCOL_VERSION,
            features=self.cfg.features,
            vcpu=self.cfg.vcpu,
            token=self.cfg.token,
            pid=os.getpid(),
            resume=resume,
        )

    # Who receives.  The receive loop below is a task of its own, but a vCPU waiting
    # for an exit's reply has nothing else to do (a vCPU thread in KVM_RUN does not
    # either): waking a second task for every reply would cost a scheduler pass, an
    # epoll_wait and an Event per exit (issue 9).  So the vCPU's own task takes the
    # receiving over at its first exit and reads its replies itself (_await_reply),
    # handling every frame on the way exactly as the loop would; it hands the
    # receiving back before any other wait (a sleep, a csd spin, the end of the run),
    # so frames that arrive meanwhile are still taken at once.  One task at a time
    # waits on the endpoint, as trio requires of a file descriptor.

    async def receive_loop(self) -> None:
        assert self.ep is not None
        while True:
            while self._exit_rx:
                await self._rx_given_back.wait()
            self._rx_busy = True
            with trio.CancelScope() as scope:
                self._rx_scope = scope
                try:
                    data, _pipe = await self.ep.recv()
                finally:
                    self._rx_scope = None
                    self._rx_busy = False
                    self._rx_left.set()
            if scope.cancelled_caught:
                continue  # the vCPU's task took the receiving over
            self._on_frame(data)

    def _on_frame(self, data: bytes) -> None:
        """Handle one frame from the host, whichever task received it."""
        if self.welcome is None and not self._handshake_reply(data):
            # A fresh process has no session yet: whatever else arrives is left over
            # from the previous process on this vCPU (the host drops it on its side).
            self.stale_frames += 1
            return
        try:
            msgs = self.link.receive(data, monotonic_ns())
        except ProtocolError as exc:
            raise GuestFatal(4, f"{self.name}: bad message from host: {exc}") from None
        for msg in msgs:
            self._on_message(msg)
        if self.link.ack_owed():
            self._send(m.Ack(), monotonic_ns())
        self.flush()

    async def _take_rx(self) -> None:
        """The vCPU's task takes the receiving over from the receive loop."""
        self._exit_rx = True
        while self._rx_busy:
            # cancelling a wait on the fd is immediate; a receive loop that was already
            # woken finishes its frame first (nothing is lost either way)
            self._rx_left = trio.Event()
            if self._rx_scope is not None:
                self._rx_scope.cancel()
            await self._rx_left.wait()

    def give_rx(self) -> None:
        """Hand the receiving back to the receive loop (before any wait but a reply's)."""
        if self._exit_rx:
            self._exit_rx = False
            given, self._rx_given_back = self._rx_given_back, trio.Event()
            given.set()

    def _drain_rx(self) -> None:
        """Handle every frame already queued, without waiting (the vCPU's task owns the
        receiving and is about to yield to the other tasks)."""
        if self._exit_rx and self.ep is not None:
            while (data := self.ep.try_recv_bytes()) is not None:
                self._on_frame(data)

    async def _await_reply(self) -> None:
        """Receive until the outstanding exit's reply arrived (see receive_loop)."""
        if not self._exit_rx:
            await self._take_rx()
        ep = self.ep
        assert ep is not None
        # frames that arrived while the vCPU ran (an injection) are read first, without
        # a scheduler pass; then it waits for the reply
        while self._outstanding is not None:
            data = ep.try_recv_bytes()
            if data is None:
                await ep.wait_recv()
            else:
                self._on_frame(data)

    def _handshake_reply(self, data: bytes) -> bool:
        """Is this frame an answer to our hello (welcome, refuse or error)?"""
        try:
            frame = decode(data, self.link.max_message)
        except ProtocolError:
            return True  # let the link report it
        return isinstance(frame.msg, m.Welcome | m.Refuse | m.Error)

    def _on_message(self, msg: m.Message) -> None:
        if isinstance(msg, m.ExitReply):
            if msg.re != self._outstanding:
                raise GuestFatal(
                    4, f"{self.name}: reply to exit {msg.re}, expected {self._outstanding}"
                )
            self._outstanding = None
            self._reply = msg
        elif isinstance(msg, m.Inject):
            rec = -1
            if self.recorder is not None and self.page is not None:
                rec = self.recorder.irq_arrived(self.ktime(), msg.vector, msg.host_time)
            seq = self.link.recv_next - 1
            slot = -1
            if self.history is not None:
                slot = self.history.irq_arrived(seq, msg.vector, msg.host_time, bool(msg.pv_eoi))
            self.pending.append((msg.vector, bool(msg.pv_eoi), rec, slot, seq))
            self._wake()
        elif isinstance(msg, m.Welcome):
            self._on_welcome(msg)
        elif isinstance(msg, m.Pvclock):
            if self.page is not None:  # before Welcome, Welcome's copy is the newer one
                self.page.publish(PvclockInfo.from_wire(msg.info))
                if self.history is not None:
                    self.history.clock_info(self.page.info)
            if isinstance(self.tsc, DisciplinedTsc):
                self.tsc.published(msg.info["tsc_timestamp"])
            if msg.tsc_sync is not None and self.cfg.clock_tracking:
                # the host's new line for this machine's clock (issue 12): the TSC slews
                sync = TscSync.from_wire(msg.tsc_sync)
                if self.clock_domain_shift:
                    sync = dataclasses.replace(sync, offset=sync.offset - self.clock_domain_shift)
                if self.discipline is None:
                    self._early_sync = sync  # still at the handshake: applied after it
                else:
                    self.discipline.apply(sync, monotonic_ns())
        elif isinstance(msg, m.Csd):
            if msg.dst != self.cfg.vcpu:
                raise GuestFatal(4, f"{self.name}: host relayed a csd for vCPU {msg.dst}")
            if self.kernel is None:
                self._early_csds.append(msg)
            else:
                self.kernel.smp.on_csd(msg)
        elif isinstance(msg, m.CsdDone):
            if self.kernel is not None:
                self.kernel.smp.on_done(msg)
            self._memory_event.set()
        elif isinstance(msg, m.OnlineMask):  # cpu_online_mask, the host's page (§4.6)
            try:
                if self.kernel is None:
                    assert self.welcome is not None
                    decode_mask(msg.mask, self.welcome.vcpus)  # checked on arrival
                    self._early_mask = msg.mask
                else:
                    self.kernel.smp.on_online_mask(msg.mask)
            except ValueError as exc:
                raise GuestFatal(4, f"{self.name}: bad online-mask from host: {exc}") from None
        elif isinstance(msg, m.Shutdown):
            self.shutdown_requested = True
            # a vCPU running its workload stops at its next exit (run_op)
            self.stop_at_next_exit = bool(self.workload_started)
            if self.kernel is not None:
                self.kernel.smp.end_of_run()  # open csd waits are cut off, not failed
            self._wake()
        elif isinstance(msg, m.Goodbye):
            self.host_goodbye.set()
        elif isinstance(msg, m.Refuse):
            raise GuestFatal(3, f"{self.name}: host refused: {msg.reason}")
        elif isinstance(msg, m.Error):
            raise GuestFatal(4, f"{self.name}: host reported a protocol error: {msg.reason}")
        elif isinstance(msg, m.Migrate):
            self._migrate(msg)
        elif isinstance(msg, m.Pong):
            self._pong_msg = msg
            self._pong_sample = self.pinger.on_pong(msg, monotonic_ns())
            if self._clock_samples is not None:
                # any pong completes an exchange (it echoes its ping's t), a late one too
                self._clock_samples.append(self._pong_sample)
            self._pong.set()
        elif isinstance(msg, m.Ack):
            pass
        else:
            raise GuestFatal(4, f"{self.name}: unexpected {msg.RULE} from host")

    def _wake(self) -> None:
        """An interrupt or a shutdown arrived: a vCPU spinning in csd_lock_wait looks at
        it now (a halted vCPU is woken by the host, which answers its HLT)."""
        self._memory_event.set()

    def _migrate(self, msg: m.Migrate) -> None:
        """Issue 13: the VM moved; resume this session on the destination host.

        The source repeats the message until our pipe goes, so only the first one acts.
        Our socket dials the destination instead of the source (the pipe to the source
        closes, which tells it we left); ``pipe_loop`` says the resume hello on the new
        pipe, as after any replaced pipe, and the link layer retransmits whatever each
        side lacks once the destination welcomes the session back.
        """
        if self.migrating_to == msg.to or self.ep is None or self.welcome is None:
            return
        self.migrating_to = msg.to
        self.migration_frozen = msg.frozen
        self.migration_told = self.ktime() if self.page is not None else 0
        try:
            self.ep.redial(link_url(msg.to, self.cfg.vcpu))
        except (OSError, ValueError) as exc:
            raise GuestFatal(2, f"{self.name}: cannot move to {msg.to}: {exc}") from None

    def _migrated(self, msg: m.Welcome) -> None:
        """The destination welcomed the session back: adopt its clock before running.

        As KVM after a migration, the destination publishes new kvmclock parameters
        (new version) before the vCPU runs; the guest TSC is continuous because the
        destination's TSC epoch is the source's moved into its own clock domain.  Our
        discipline maps this machine's clock onto the *host's* clock, so when the
        epoch moved by d (another machine: its CLOCK_MONOTONIC differs by d) the lines
        the destination sends are moved back by d, and the TSC reads on without a step.
        """
        assert self.welcome is not None
        # The vCPU keeps the source's clock domain: the TSC stays the same function of
        # this machine's clock, so it cannot step.  The destination's later clock lines
        # (pvclock.tsc_sync) are in its own domain, d ns from the source's: they are
        # moved back by d before the discipline follows them.
        self.clock_domain_shift += msg.tsc_epoch - self.welcome.tsc_epoch
        self.welcome = dataclasses.replace(self.welcome, tsc_epoch=msg.tsc_epoch)
        if self.page is not None:
            self.page.publish(PvclockInfo.from_wire(msg.pvclock))
            if self.history is not None:
                self.history.clock_info(self.page.info)
            self.migration_resumed = self.ktime()
            self._migration_programmings.clear()
        if isinstance(self.tsc, DisciplinedTsc):
            self.tsc.published(msg.pvclock["tsc_timestamp"])
        self.migrations += 1
        self.migrating_to = None

    def _on_welcome(self, msg: m.Welcome) -> None:
        if msg.resumed:
            if self.welcome is None or msg.session != self.welcome.session:
                raise GuestFatal(4, f"{self.name}: host resumed an unknown session")
            if self.migrating_to is not None:
                self._migrated(msg)
            # Our unacked frames were lost with the old pipe: send them again.
            self.link.resume(self.link.peer_acked, monotonic_ns())
            return
        if self.welcome is not None:
            if msg.session == self.welcome.session:
                return  # the answer to a repeated hello: already welcomed
            raise GuestFatal(4, f"{self.name}: second welcome for a fresh session")
        if msg.vcpu != self.cfg.vcpu:
            raise GuestFatal(4, f"{self.name}: host welcomed vCPU {msg.vcpu}")
        if not 1 <= msg.version <= PROTOCOL_VERSION:
            raise GuestFatal(4, f"{self.name}: host chose protocol version {msg.version}")
        if not msg.features & Feature.PV_TIMER:
            raise GuestFatal(4, f"{self.name}: host does not offer the PV timer device")
        self.welcome = msg
        self.link.max_message = msg.max_message
        if self.ep is not None:  # receive no more than the host's limit either
            self.ep.sock.recv_max_size = msg.max_message
        self.tsc = TscModel(msg.tsc_khz, msg.tsc_epoch, 0)
        self.page = PvclockPage(PvclockInfo.from_wire(msg.pvclock))
        self.welcomed.set()

    async def pipe_loop(self) -> None:
        """Say hello on the first pipe and resume the session on every later one."""
        assert self.ep is not None
        async for event in self.ep.pipe_events:
            if not event.added:
                self.pipes_up = max(0, self.pipes_up - 1)
                if self.welcome is None:
                    self._turned_away()
                continue
            self.pipes_up += 1
            self.pipes_seen += 1
            if self.pipes_seen > 1 and self.welcome is not None:
                self._send(self._hello(resume=self.welcome.session), monotonic_ns())
                self.flush()

    def _turned_away(self) -> None:
        """The host dropped our pipe before answering the hello (no refuse, no welcome)."""
        self.turned_away += 1
        now = monotonic_ns()
        if self.turned_away == 1:
            self._first_turned_away = now
        if (
            self.turned_away >= TURNED_AWAY_LIMIT
            and now - self._first_turned_away >= TURNED_AWAY_S * 1e9
        ):
            raise GuestFatal(
                3,
                f"{self.name}: {link_url(self.cfg.connect, self.cfg.vcpu)} turned this "
                f"connection away {self.turned_away} times without a word: another process "
                f"holds vCPU {self.cfg.vcpu}'s link (nng's Pair0 admits one peer)",
            )

    async def connect(self, nursery: trio.Nursery) -> None:
        """Start the link's tasks in ``nursery`` and complete the handshake.

        Dials ``link_url(cfg.connect, cfg.vcpu)`` unless an endpoint is already set.

        Raises:
            GuestFatal: refused, or no welcome within the handshake timeout.
        """
        if self.ep is None:
            self.ep = PairEndpoint.dial(
                link_url(self.cfg.connect, self.cfg.vcpu), DEFAULT_MAX_MESSAGE
            )
        nursery.start_soon(self.ep.run_sender)
        nursery.start_soon(self.receive_loop)
        nursery.start_soon(self.pipe_loop)
        nursery.start_soon(self.tick_loop)
        await self.hello_loop()
        await self.sync_clock()
        self._start_history()
        nursery.start_soon(self.clock_loop)

    async def sync_clock(self) -> None:
        """Ping the host and derive the guest TSC from the host's clock domain."""
        assert self.welcome is not None
        # On a machine that runs far more processes than it has cores (64 vCPU processes
        # booting on 2), a pong can take longer than PING_TIMEOUT_S: late pongs still
        # count, and pinging goes on until one arrives or the handshake's time is up.
        samples: list[ClockSample] = []
        self._clock_samples = samples
        budget = max(self.cfg.handshake_timeout_s, PINGS * PING_TIMEOUT_S)
        deadline = trio.current_time() + budget
        pings = 0
        try:
            while len(samples) < PINGS and trio.current_time() < deadline:
                if pings >= PINGS and samples:
                    break
                self._pong = trio.Event()
                sent = monotonic_ns()
                self._send(self.pinger.ping(sent), sent)
                self.flush()
                pings += 1
                with trio.move_on_at(min(deadline, trio.current_time() + PING_TIMEOUT_S)):
                    await self._pong.wait()
        finally:
            self._clock_samples = None
        if not samples:
            raise GuestFatal(
                2, f"{self.name}: the host answered none of {pings} clock pings in {budget:g} s"
            )
        self.clock_offset = estimate_offset(samples)
        # local CLOCK_MONOTONIC + offset = host CLOCK_MONOTONIC: the guest TSC is the
        # host's, read through that mapping (which the host corrects later, issue 12)
        self.discipline = ClockDiscipline(self.clock_offset.ns)
        self.tsc = DisciplinedTsc(self.welcome.tsc_khz, self.welcome.tsc_epoch, self.discipline)
        if self.page is not None:
            self.tsc.published(self.page.info.tsc_timestamp)
        if self._early_sync is not None:
            self.discipline.apply(self._early_sync, monotonic_ns())

    async def clock_loop(self) -> None:
        """Keep pinging the host so it can track this machine's clock (issue 12)."""
        one_clock = self.clock_offset is not None and self.clock_offset.same_domain
        while not self.shutdown_requested:
            await trio.sleep(CLOCK_PING_ONE_CLOCK_S if one_clock else CLOCK_PING_S)
            now = monotonic_ns()
            if self.cfg.clock_tracking:
                self._send(self.pinger.ping(now), now)
                self.flush()
            if self.cfg.synthetic_clock and self.discipline is not None:
                # skewed on purpose on the host's machine: the truth is CLOCK_MONOTONIC
                self.true_error_last = self.discipline.host_ns(now) - time.monotonic_ns()
                self.true_error_max = max(self.true_error_max, abs(self.true_error_last))

    async def hello_loop(self) -> None:
        with trio.move_on_after(self.cfg.handshake_timeout_s):
            while not self.welcomed.is_set():
                self._send(self._hello(resume=None), monotonic_ns())
                self.flush()
                with trio.move_on_after(HELLO_RETRY_S):
                    await self.welcomed.wait()
            return
        raise GuestFatal(
            2,
            f"{self.name}: no welcome from {link_url(self.cfg.connect, self.cfg.vcpu)} "
            f"within {self.cfg.handshake_timeout_s} s",
        )

    async def tick_loop(self) -> None:
        last = monotonic_ns()
        while True:
            await trio.sleep(TICK_S)
            now = monotonic_ns()
            self._watchdog(last, now)
            last = now
            try:
                self.link.poll(now)
            except LinkError as exc:
                if self.ep is None or not (self.ep.pending() or self.pipes_up > 0):
                    raise GuestFatal(5, str(exc)) from None
                # the host's frames wait unread (we are slow), or the host process still
                # holds our pipe: a slow or stopped host is not a lost one
                self.link.peer_alive(now)
            if self.link.ack_owed(force=True):
                self._send(m.Ack(), now)
            self.flush()

    def _watchdog(self, last: int, now: int) -> None:
        """The tick loop wakes every TICK_S; a much later wake-up means this process was
        not running at all (stopped, or starved of a CPU): a stall, like the soft-lockup
        watchdog's missed hrtimer, timed in guest ktime."""
        gap = now - last - int(TICK_S * 1e9)
        if gap >= STALL_NS and self.page is not None and self.tsc is not None:
            self.stats.stalls.add(gap, self.page.info.ktime(self.tsc.tsc(now)) - gap)
        if gap >= HISTORY_STALL_NS and self.history is not None and self.page is not None:
            # the chaos history keeps shorter ones too: what explains a late timer
            self.history.stall(self.ktime() - gap, gap)

    # ------------------------------------------------------------------ exits

    # ------------------------------------------------------------------ chaos (host/chaos/)

    def wrap_endpoint(self, ep: PairEndpoint) -> PairEndpoint | FaultShim:
        """``ep``, or ``ep`` behind the link fault shim when the chaos plan has link
        faults (proto/faultshim.py: drop, duplicate, delay, reorder, pipe close)."""
        plan = self.chaos or {}
        if not plan.get("link"):
            return ep
        windows = windows_from_plan(plan["link"])
        return FaultShim(ep, windows, int(plan.get("seed", 0)), self._link_fault)

    def _link_fault(self, fault: int, direction: int, seq: int) -> None:
        if self.history is not None:
            self.history.link(fault, direction, seq)

    def _start_history(self) -> None:
        """Open this process's event log once the clock is known (after the handshake)."""
        plan = self.chaos or {}
        target = record_target(plan, self.cfg.vcpu)
        if target is None or self.history is not None:
            return
        if self.welcome is None or self.page is None:
            return
        header = {
            "role": "guest",
            "vcpu": self.cfg.vcpu,
            "pid": os.getpid(),
            "incarnation": int(plan.get("incarnation", 0)),
        }
        self.history = HistoryRecorder(target, header, self.ktime)
        offset = self.clock_offset.ns if self.clock_offset is not None else 0
        self.history.session(
            self.welcome.session, self.welcome.tsc_khz, self.welcome.tsc_epoch, offset,
            self.cfg.vcpu, os.getpid(),
        )  # fmt: skip
        self.history.clock_info(self.page.info)

    def _attach_history(self, kernel: GuestKernel) -> None:
        """Listen to the hrtimer queue and smp_call_function (after boot)."""
        if self.history is None or kernel.timers is None:
            return
        kernel.timers.queue.listener = self.history.timer
        kernel.smp.listener = self.history.smp
        base = int((self.chaos or {}).get("id_base", 0))
        if base:  # a restarted process: its ids must not repeat its predecessor's
            kernel.timers.queue._order = itertools.count(base + 1)
            kernel.smp._next_id += base
            kernel.smp._next_ipi += base

    def _chaos_start(self, started: int) -> None:
        """The workload started: scheduled windows and link faults count from now."""
        if self.history is not None:
            self.history.start(started)
        if isinstance(self.ep, FaultShim):
            self.ep.start(monotonic_ns())

    def _history_exit(self, msg: m.Message, seq: int) -> int:
        """Record an exit as it leaves (its slot; -1 when not recording)."""
        if self.history is None:
            return -1
        arm = ipi = 0
        if self.kernel is not None:
            arm = self.kernel.timers.programming if self.kernel.timers is not None else 0
            ipi = self.kernel.smp.sending
        return self.history.exit_sent(self.ktime(), seq, EXIT_INDEX[type(msg)], arm, ipi)

    async def _chaos_window(self, point: str) -> None:
        """A scheduled preemption window at ``point``: the first pass after its time
        sleeps its length (ns resolution: proto/timerfd.py)."""
        queue = self._windows.get(point)
        if not queue or not self.workload_started:
            return
        if queue[0][0] > self.ktime() - self.workload_started:
            return
        _, length = queue.popleft()
        start = self.ktime()
        self.stats.preemptions[point] += 1
        self.give_rx()
        await sleep_ns(length)
        if self.history is not None:
            self.history.window(start, self.ktime(), PREEMPTION_POINTS.index(point))

    # ------------------------------------------------------------------ end chaos

    async def exit(self, msg: m.Message) -> m.ExitReply:
        """Take one exit and wait for the host's answer."""
        assert self._outstanding is None, "one exit at a time"
        kind = m.EXIT_KIND_NAMES[type(msg)]
        sent = self.ktime() if self.recorder is not None else 0
        t0 = time.perf_counter_ns()
        self._reply = None
        self._send(msg, monotonic_ns())
        self._outstanding = self.link.send_next - 1
        slot = self._history_exit(msg, self._outstanding)
        self.flush()
        await self._await_reply()
        rtt = time.perf_counter_ns() - t0
        self.stats.exits[kind] += 1
        self.stats.exit_rtt_ns[kind] += rtt
        if rtt >= STALL_NS and kind != "hlt" and self.page is not None:
            self.stats.host_waits.add(rtt, self.ktime() - rtt)  # a HLT waits by design
        assert self._reply is not None
        if slot >= 0 and self.history is not None:
            self.history.exit_done(slot, rtt, self._reply.host_ns)
        if self.recorder is not None:
            self.recorder.exit(sent, rtt, self._reply.host_ns, EXIT_INDEX[type(msg)])
        return self._reply

    # ------------------------------------------------------------------ workload

    def rdtsc(self) -> int:
        """The guest TSC: derived from this machine's CLOCK_MONOTONIC (no exit)."""
        assert self.tsc is not None
        return self.tsc.tsc(monotonic_ns())

    async def run_op(self, op: KernelOp[T]) -> T:
        """Drive a guest kernel op: its exits go over the link, its preemption points
        sleep for the configured delay (and cost one generator step otherwise).

        Once the host's shutdown has arrived, a vCPU running its workload stops at the
        op's next step (an exit, a store, a wait), mid-op: :class:`VcpuStopped`.  A VMM
        stops a VM that way: it kicks every vCPU thread out of ``KVM_RUN`` (a signal;
        KVM returns -EINTR / ``KVM_EXIT_INTR``) and does not enter the guest again,
        whatever the guest kernel was in the middle of.  Waiting for the op to end
        instead made a 256-vCPU ``xapic-mask`` run finish each vCPU's mask IPI first, up
        to 765 trapped APIC accesses (3 per target, Linux's
        ``default_send_IPI_mask_sequence_phys``) times 256 vCPUs on a host that handles
        a few thousand exits a second: the reports came after the host's 64 s wait
        (issue 9).  A shutdown that arrives before the workload started is taken at the
        workload's first boundary, as before: the boot (setup, calibration) is bounded,
        and the guest conformance cases expect a guest told to stop while booting to
        finish its boot and program its first timer (``host/conformance/guestside.py``
        stops the guest 0.6 s after the welcome, before a lapic-xapic guest has booted).
        """
        value: Any = None
        try:
            while True:
                item = op.send(value)
                if self.stop_at_next_exit:
                    op.close()
                    self.stopped_mid_op = True
                    raise VcpuStopped
                if isinstance(item, MemoryWrite):
                    # a store another vCPU reads: relayed by the host, not an exit
                    self._send(item.msg, monotonic_ns())
                    self.flush()
                    value = None
                    continue
                if isinstance(item, SpinWait):
                    await self._spin_wait(item.deadline)
                    value = None
                    continue
                if isinstance(item, Udelay):
                    self.give_rx()
                    await sleep_ns(item.ns)  # udelay: guest time passes, no exit
                    value = None
                    continue
                if isinstance(item, PreemptionPoint):
                    delay = self.cfg.preempt_ns.get(item.name, 0)
                    if delay:
                        self.stats.preemptions[item.name] += 1
                        began = self.ktime() if self.history is not None else 0
                        self.give_rx()
                        await sleep_ns(delay)  # ns resolution: a 100 us window is 100 us
                        if self.history is not None:  # the history names it (issue 15)
                            point = PREEMPTION_POINTS.index(item.name)
                            self.history.window(began, self.ktime(), point)
                    if self._windows:
                        await self._chaos_window(item.name)
                    value = None
                    continue
                if self.kernel is not None and self.kernel.ops.pv_eois != self._pv_eois_reported:
                    # the vCPU cleared its PV EOI flag: say so on this exit (reference §7)
                    self._pv_eois_reported = self.kernel.ops.pv_eois
                    item = dataclasses.replace(item, pv_eoi=True)
                value = await self.exit(item)
        except StopIteration as done:
            return done.value

    async def _take_interrupt(self) -> None:
        """Deliver the next pending interrupt (an instruction boundary)."""
        assert self.kernel is not None
        vector, pv_eoi = self._next_interrupt()
        try:
            await self.run_op(self.kernel.handle_interrupt(vector, pv_eoi))
        finally:
            self._irq_at = 0
            self._irq_seq = 0

    def _on_expiry(self, expiry: Expiry) -> None:
        self.stats.record_lateness(expiry.lateness, expiry.ran_at)
        if self.migration_resumed and expiry.ran_at >= self.migration_resumed:
            self._migration_expiry(expiry)
        if self.recorder is not None:
            self.recorder.event(expiry.expires, expiry.programmed_at, self._irq_at, expiry.ran_at)
        if self.history is not None:
            self.history.fire(
                expiry.arm, expiry.expires, expiry.ran_at, expiry.programmed_at, self._irq_seq
            )

    def _migration_expiry(self, expiry: Expiry) -> None:
        """Issue 13: is this callback one the move delayed?  Yes if it was due while the
        VM was stopped, or if it is the first callback of a device programming made
        before the resume (a LAPIC count that paused through the blackout fires late
        even when its expiry lies after the resume; a periodic tick programmed at boot
        counts once, not for every tick since)."""
        due_while_stopped = self.migration_frozen <= expiry.expires <= self.migration_resumed
        first_of_old_programming = (
            expiry.programmed_at < self.migration_resumed
            and expiry.programmed_at not in self._migration_programmings
        )
        self._migration_programmings.add(expiry.programmed_at)
        if (due_while_stopped or first_of_old_programming) and len(
            self.migration_lateness
        ) < MIGRATION_TIMERS_KEPT:
            self.migration_lateness.append(expiry.lateness)
            if expiry.expires > self.migration_resumed:
                # due after the resume: an absolute expiry runs on time, a paused LAPIC
                # count late by the blackout: the difference the 2011 debate was about
                self.migration_spanning.append(expiry.lateness)

    def _next_interrupt(self) -> tuple[int, bool]:
        """The pending interrupt the CPU takes first: the highest vector (its priority
        class is vector >> 4; the host's LAPIC already orders injection by PPR, this
        orders what arrived together)."""
        best = max(range(len(self.pending)), key=lambda i: self.pending[i][0])
        vector, pv_eoi, rec, slot, seq = self.pending[best]
        del self.pending[best]
        if self.history is not None:
            self.history.irq_handled(slot)
            self._irq_seq = seq
        if self.recorder is not None:
            self.recorder.irq_handled(rec, self.ktime())
            self._irq_at = self.recorder.irqs[4 * rec] if rec >= 0 else 0
        return vector, pv_eoi

    async def _spin_wait(self, deadline: int) -> None:
        """Spin with interrupts enabled until a relayed store arrives or ``deadline``
        (guest ktime): pending interrupts are handled right away, as a CPU spinning in
        csd_lock_wait with IRQs on would (two CPUs waiting on each other must not
        deadlock)."""
        assert self.kernel is not None
        assert self.clock is not None
        while self.pending and not self.shutdown_requested:
            await self._take_interrupt()
        if self.kernel.ops.pv_eois != self._pv_eois_reported:
            # A PV EOI done while spinning reaches the host only with an exit; without
            # one the vector stays in service there and the next IPI of its class can
            # never be injected: two vCPUs spinning on each other's csd would wait out
            # the csd timeout.  On hardware the spin itself ends in a PAUSE-loop exit
            # within microseconds (PLE), and KVM syncs the PV EOI flag on every exit.
            await self.run_op(pause_exit())
        if self._memory_event.is_set():
            self._memory_event = trio.Event()
            return
        wait_s = max(0.0, (deadline - self.clock.read()) / 1e9)
        self.give_rx()
        with trio.move_on_after(min(wait_s, SPIN_SLICE_S)):
            await self._memory_event.wait()
        self._memory_event = trio.Event()

    async def run_kernel(self) -> None:
        """Boot the guest kernel in the run's timer mode and run the workload."""
        welcome = self.welcome
        assert welcome is not None
        assert self.page is not None
        clock = Kvmclock(self.page, self.rdtsc)
        self.clock = clock
        kernel = GuestKernel(
            self.cfg.vcpu,
            welcome.vcpus,
            welcome.mode or DEFAULT_MODE,
            clock.read,
            self.rdtsc,
            welcome.tsc_khz,
            hz=welcome.hz or 1000,
            apic=welcome.apic,
            on_expiry=self._on_expiry,
            ipi=welcome.ipi,
        )
        self.kernel = kernel
        for csd in self._early_csds:  # stores that arrived while this vCPU was booting
            kernel.smp.on_csd(csd)
        self._early_csds.clear()
        if self._early_mask is not None:  # the mask as it stood while this vCPU booted
            kernel.smp.on_online_mask(self._early_mask)
        try:
            await self._boot_and_run(welcome, kernel, clock)
        except VcpuStopped:
            pass  # the run ended in the middle of a kernel op (run_op)
        self.give_rx()  # from here on the vCPU waits for the host's goodbye
        self.duration_ns = clock.read() - self.workload_started if self.workload_started else 0
        if self.history is not None:
            unreported = kernel.ops.pv_eois - self._pv_eois_reported
            self.history.end(clock.read(), kernel.eois, unreported)

    async def _boot_and_run(self, welcome: m.Welcome, kernel: GuestKernel, clock: Kvmclock) -> None:
        """Boot ``kernel`` and run the workload until the host's shutdown."""
        await self.run_op(kernel.boot())
        self.boot_exits = dict(self.stats.exits)  # boot and calibration, not per event
        self._attach_history(kernel)
        if welcome.trace:
            self.recorder = Recorder()  # the window starts after boot
            kernel.smp.call_records = []
        if welcome.workload == "ipi":
            kernel.smp.on_call = self.stats.record_call  # no timers: calls are the timeline
        params = {k: p.default for k, p in WORKLOAD_PARAMS.items()} | welcome.params
        kernel.smp.timeout_ns = params["csd_lock_timeout_ms"] * 1_000_000
        seed = welcome.seed * 1_000_003 + self.cfg.vcpu
        workload: Workload
        storm = TimerStormWorkload(
            kernel,
            seed,
            timers=params["timers"],
            min_ns=params["min_ns"],
            max_ns=params["max_ns"],
            churn_pct=params["churn_pct"],
        )
        if welcome.workload == "timers":
            workload = storm
        elif welcome.workload == "tick":
            workload = TickWorkload(kernel)
        elif welcome.workload == "ipi":
            workload = IpiStormWorkload(kernel, pause_ns=params["pause_ns"])
        elif welcome.workload == "mixed":
            workload = MixedWorkload(kernel, storm, params["ipi_every_ns"])
        else:
            raise GuestFatal(4, f"{self.name}: unknown workload {welcome.workload!r}")
        self.workload = workload
        if welcome.workload in ("ipi", "mixed"):
            await self._wait_for_all_cpus(kernel)  # its calls go to the other CPUs
        started = clock.read()
        self.workload_started = started
        workload.start(started)
        self._chaos_start(started)
        await self.run_op(kernel.reprogram())
        while True:
            # instruction boundary: deliver pending interrupts
            # (a vCPU whose timers are due faster than it can program them would stay in
            # this loop forever: the shutdown request is checked between interrupts too)
            while self.pending and not self.shutdown_requested:
                await self._take_interrupt()
            if self.shutdown_requested:
                break
            workload.between_interrupts(clock.read())
            await self.run_op(workload.task(clock.read()))
            await self.run_op(kernel.reprogram())
            if self.pending or self.shutdown_requested or workload.wants_cpu(clock.read()):
                self._drain_rx()  # what arrived since the last exit
                await trio.lowlevel.checkpoint()  # let the other tasks run between calls
                continue
            await self.run_op(hlt())

    async def _wait_for_all_cpus(self, kernel: GuestKernel) -> None:
        """Start the workload once every CPU is online, as Linux starts user space only
        after ``smp_init`` brought every CPU up.  A workload started early sends its
        calls to the CPUs online so far, one IPI each (the ALLBUT shortcut needs them
        all), which at 256 vCPUs was most of a boot's exits.  Bounded: a vCPU that
        never comes up (its process died) delays the start by ALL_ONLINE_STALL_S after
        the last CPU that did, and by ALL_ONLINE_S at most (more for a big VM); the wait
        is reported (``all_online_wait_ns``).  Only the IPI workloads wait: a timer
        workload has no business with the other CPUs."""
        smp = kernel.smp
        if len(smp.online) >= smp.ncpus:
            return
        began = progress = monotonic_ns()
        deadline = began + int(max(ALL_ONLINE_S, ALL_ONLINE_S_PER_VCPU * smp.ncpus) * 1e9)
        seen = len(smp.online)
        while len(smp.online) < smp.ncpus and not self.shutdown_requested:
            while self.pending and not self.shutdown_requested:
                await self._take_interrupt()  # idle with interrupts on
            now = monotonic_ns()
            if len(smp.online) > seen:
                seen, progress = len(smp.online), now
            if now >= deadline or now - progress >= int(ALL_ONLINE_STALL_S * 1e9):
                break  # a CPU that does not come up (as smp_init gives up on one)
            self.give_rx()  # the mask arrives through the receive loop meanwhile
            await trio.sleep(0.005)
        self.all_online_wait_ns = monotonic_ns() - began

    def _migration_counters(self) -> dict[str, int]:
        """Issue 13: the move as this vCPU saw it (guest ktime ns), for ``blackout_*``."""
        late = sorted(self.migration_lateness)
        spanning = sorted(self.migration_spanning)

        def pct(q: float, values: list[int] = late) -> int:
            return values[min(len(values) - 1, int(q * len(values)))] if values else 0

        return {
            "migration_spanning_timers": len(spanning),
            "migration_spanning_late_p50_ns": pct(0.5, spanning),
            "migration_spanning_late_max_ns": spanning[-1] if spanning else 0,
            "migrations": self.migrations,
            "migration_frozen_ns": self.migration_frozen,
            "migration_told_ns": self.migration_told,
            "migration_resumed_ns": self.migration_resumed,
            "migration_timers": len(late),
            "migration_late_p50_ns": pct(0.5),
            "migration_late_p99_ns": pct(0.99),
            "migration_late_max_ns": late[-1] if late else 0,
        }

    async def finish(self) -> None:
        self.give_rx()
        stats = self.stats
        kernel = self.kernel
        timers = kernel.timers if kernel is not None else None
        counters: dict[str, int] = {}
        if kernel is not None:
            counters |= kernel.counters()
        if self.workload is not None:
            counters |= self.workload.counters()
        counters |= {f"preempted {k}": v for k, v in stats.preemptions.items()}
        if self.clock is not None:
            counters["kvmclock_retries"] = self.clock.retries
        counters |= {f"boot_exits {k}": v for k, v in self.boot_exits.items()}
        if kernel is not None:
            counters["smp_cut_off_calls"] = kernel.smp.stats.cut_off
        counters["workload_started_ns"] = self.workload_started
        counters["stopped_mid_op"] = int(self.stopped_mid_op)
        counters["all_online_wait_ns"] = self.all_online_wait_ns
        counters |= process_memory_kb()
        if self.migrations:
            counters |= self._migration_counters()
        for name, worst in (("stall", stats.stalls), ("host_wait", stats.host_waits)):
            for i, (ns, at) in enumerate(worst.largest()):
                counters[f"{name} {i} ns"] = ns
                counters[f"{name} {i} at_ns"] = at
        if self.clock_offset is not None:
            counters["clock_offset_ns"] = self.clock_offset.ns
            counters["clock_sync_rtt_ns"] = self.clock_offset.rtt
        if self.discipline is not None:
            counters["clock_corrections"] = self.discipline.corrections
            counters["clock_largest_slew_ns"] = self.discipline.largest_step
            if isinstance(self.tsc, DisciplinedTsc):
                counters["clock_tsc_held"] = self.tsc.floored
            if self.cfg.synthetic_clock:
                counters["clock_true_error_max_ns"] = self.true_error_max
                counters["clock_true_error_last_ns"] = self.true_error_last
        report = m.Report(
            events=timers.ran if timers else 0,
            early=timers.early if timers else 0,
            spurious=kernel.spurious if kernel else 0,
            exits=dict(stats.exits),
            exit_rtt_ns=dict(stats.exit_rtt_ns),
            lateness_hdr=stats.lateness.encode(),
            lateness_max=stats.lateness_max,
            duration_ns=self.duration_ns,
            mode=kernel.mode if kernel else None,
            counters=counters,
            ipi_hdr=_hdr(kernel.smp.stats.ipi_latency_ns) if kernel else None,
            call_hdr=_hdr(kernel.smp.stats.call_latency_ns) if kernel else None,
            timeline=stats.timeline.pack() or None,
        )
        # The report must fit one message: if it does not, shed the bulkiest optional
        # parts (the timeline, then the IPI histograms) and say so in the counters.
        sheds: tuple[tuple[str, ...], ...] = (
            (),
            ("timeline",),
            ("timeline", "ipi_hdr", "call_hdr"),
        )
        for attempt, shed in enumerate(sheds):
            candidate = dataclasses.replace(
                report,
                counters=counters | ({"report_shed": len(shed)} if shed else {}),
                **dict.fromkeys(shed),
            )
            try:
                self._send(candidate, monotonic_ns())
                break
            except LocalProtocolError as exc:
                if exc.code != ErrorCode.OVERSIZE or attempt == len(sheds) - 1:
                    raise GuestFatal(4, f"{self.name}: cannot send the report: {exc}") from None
        if self.recorder is not None:
            if kernel is not None and kernel.smp.call_records:
                for record in kernel.smp.call_records:
                    self.recorder.call(*record)
            for name, data in self.recorder.pack().items():
                if data:  # one kind of record per message: each fits the size limit
                    self._send(m.Trace(**{name: data}), monotonic_ns())
        self._send(m.Goodbye(), monotonic_ns())
        self.flush()
        # the host answers every vCPU's goodbye after its report: with hundreds of vCPUs
        # on a few cores, later than a small VM's would be (issue 9)
        vcpus = self.welcome.vcpus if self.welcome is not None else 1
        goodbye_s = max(self.cfg.goodbye_timeout_s, GOODBYE_S_PER_VCPU * vcpus)
        with trio.move_on_after(goodbye_s):
            await self.host_goodbye.wait()
        if not self.host_goodbye.is_set():
            raise GuestFatal(5, f"{self.name}: host did not answer goodbye within {goodbye_s:g} s")
        # acknowledge the host's goodbye so it knows nothing is outstanding
        self._send(m.Ack(), monotonic_ns())
        self.flush()
        await trio.sleep(0.02)  # no linger in nng: give the ack a moment to leave


def process_memory_kb() -> dict[str, int]:
    """This process's memory (``/proc/self/smaps_rollup``; empty where there is none):
    ``rss`` counts the shared libraries' pages in every process that maps them, ``pss``
    shares them out, ``private`` is what this process alone holds (issue 9: the memory a
    vCPU process costs is its private memory plus its share of the libraries)."""
    wanted = {"Rss": "process_rss_kb", "Pss": "process_pss_kb"}
    out: dict[str, int] = {}
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in wanted:
                    out[wanted[key]] = int(rest.split()[0])
                elif key in ("Private_Clean", "Private_Dirty"):
                    out["process_private_kb"] = out.get("process_private_kb", 0) + int(
                        rest.split()[0]
                    )
    except (OSError, ValueError, IndexError):
        return {}
    return out


def _chaos_windows(plan: dict[str, Any] | None) -> dict[str, deque[tuple[int, int]]]:
    """The plan's preemption windows by point, in time order."""
    out: dict[str, deque[tuple[int, int]]] = {}
    for w in sorted((plan or {}).get("windows") or [], key=lambda w: int(w["at_ns"])):
        if w["point"] not in PREEMPTION_POINTS:
            raise ValueError(f"chaos plan: unknown preemption point {w['point']!r}")
        out.setdefault(w["point"], deque()).append((int(w["at_ns"]), int(w["length_ns"])))
    return out


def _hdr(values: list[int]) -> bytes | None:
    """An HDR histogram (V2, compressed) of ``values``, or None when there are none."""
    if not values:
        return None
    hist = HdrHistogram(1, LATENESS_HIGHEST_NS, 3)
    for v in values:
        hist.record_value(min(max(v, 1), LATENESS_HIGHEST_NS))
    return hist.encode()


async def _orphan_guard(name: str) -> None:
    await watch_parent()
    if os.environ.get(PARENT_ENV):
        raise GuestFatal(1, f"{name}: the launcher is gone")


async def run_guests(cfgs: list[GuestConfig]) -> int:
    """Run several vCPUs in this one process (``vtick guest --vcpu 0-7``).

    Each keeps its own link, endpoint and kernel model, exactly as in a process of its
    own; they share the interpreter, so a machine runs many more vCPUs than it could
    afford interpreters (each costs tens of MB).  One vCPU's fatal error ends that vCPU
    only; the process exits with the first such status, after the others finish.
    """
    if len(cfgs) == 1:
        return await run_guest(cfgs[0])
    statuses: list[int] = []

    async def one(cfg: GuestConfig) -> None:
        statuses.append(await run_guest(cfg, signals=False))

    try:
        async with trio.open_nursery() as nursery:

            def stopped(signum: int) -> None:
                statuses.append(128 + signum)
                print(
                    f"vtick guest: vCPUs {cfgs[0].vcpu}..{cfgs[-1].vcpu}: stopped by "
                    f"{signal.Signals(signum).name}",
                    file=sys.stderr,
                    flush=True,
                )
                nursery.cancel_scope.cancel()

            await nursery.start(watch_signals, stopped)
            async with trio.open_nursery() as vcpus:
                for cfg in cfgs:
                    vcpus.start_soon(one, cfg)
            nursery.cancel_scope.cancel()
    except* GuestFatal as group:  # the orphan guard of one of them
        first = group.exceptions[0]
        assert isinstance(first, GuestFatal)
        print(f"vtick guest: {first}", file=sys.stderr, flush=True)
        statuses.append(first.status)
    return next((s for s in statuses if s != 0), 0)


async def run_guest(cfg: GuestConfig, *, signals: bool = True) -> int:
    """Run one vCPU until the host ends the run; return the process exit status.

    ``signals``: install the SIGTERM/SIGINT handlers (False when :func:`run_guests`
    owns them for several vCPUs in one process).
    """
    vcpu = GuestVcpu(cfg)
    try:
        url = link_url(cfg.connect, cfg.vcpu)
    except ValueError as exc:
        print(f"vtick guest: {exc}", file=sys.stderr)
        return 2
    try:
        vcpu.ep = vcpu.wrap_endpoint(PairEndpoint.dial(url, DEFAULT_MAX_MESSAGE))
    except OSError as exc:  # tls+tcp:// without its certificate (issue 12)
        print(f"vtick guest: {exc}", file=sys.stderr)
        return 2
    fatal: GuestFatal | None = None
    try:
        async with trio.open_nursery() as nursery:

            def stopped(signum: int) -> None:
                raise GuestFatal(
                    128 + signum, f"{vcpu.name}: stopped by {signal.Signals(signum).name}"
                )

            if signals:
                await nursery.start(watch_signals, stopped)
            nursery.start_soon(_orphan_guard, vcpu.name)
            await vcpu.connect(nursery)
            await vcpu.run_kernel()
            await vcpu.finish()
            nursery.cancel_scope.cancel()
    except* GuestFatal as group:
        first = group.exceptions[0]
        assert isinstance(first, GuestFatal)
        fatal = first
    finally:
        vcpu.ep.close()
        if vcpu.history is not None:
            vcpu.history.close()
    if fatal is not None:
        print(f"vtick guest: {fatal}", file=sys.stderr, flush=True)
        return fatal.status
    return 0
