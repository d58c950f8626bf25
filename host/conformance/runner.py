"""The edge of ``vtick conformance host``: guest peers on real Pair0 sockets run the cases.

Theory of operation
-------------------
The runner plays one or more guest processes against a host that speaks the protocol,
built only on ``vtick.proto`` (codec, link, transport), as a second implementation
written from ``docs/protocol.md`` would be.  A :class:`Peer` is one such process on one
vCPU link: a dialled Pair0 socket, the real sans-I/O :class:`~vtick.proto.link.Link`
when a session is open, and an inbox of every frame the host sent, stamped on arrival.
Its background tasks receive, acknowledge (every 10 ms when acks are owed, unless a case
holds them) and retransmit on the link's timer, so a peer behaves like a well-behaved
vCPU between a case's operations.

Each case (``vtick.host.conformance.case``) is a generator of operations; the runner
performs one operation at a time on the peers and sends the result back in.  Every
frame any peer sends or receives goes into one wire log, and the part a case produced
becomes its evidence, with the host's stderr lines of that time when the runner started
the host.  Before each case the peers are clean: after it every open session is ended
with a goodbye (a new session starts from a reset vCPU, ``docs/protocol.md`` §3.5), and
a peer whose goodbye is not answered leaves and dials again from a new socket.

Time: the runner reads CLOCK_MONOTONIC and converts to the host's clock domain with the
offset estimated from ``ping``/``pong`` at the start (exactly 0 on one machine, as the
guest does it); cases receive host-domain times only.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pynng
import trio

from vtick.host.conformance import case as c
from vtick.host.conformance.target import LONG_RUN_S, HostProcess, HostSpec, TargetError
from vtick.proto import messages as m
from vtick.proto.codec import DEFAULT_MAX_MESSAGE, decode, encode
from vtick.proto.errors import LinkError, ProtocolError
from vtick.proto.link import Link
from vtick.proto.transport import PairEndpoint, link_url, monotonic_ns

__all__ = ["Runner", "RunnerConfig", "HarnessError"]

HELLO_RETRY_NS = 200_000_000
SESSION_TIMEOUT_NS = 5_000_000_000
GOODBYE_TIMEOUT_NS = 1_000_000_000
TICK_S = 0.01
CASE_TIMEOUT_S = 20.0
PINGS = 8
#: the wire log keeps at most this many bytes of each frame as hex
HEX_BYTES = 48


class HarnessError(Exception):
    """The runner could not perform an operation (not the implementation's fault)."""


@dataclass
class RunnerConfig:
    spec: HostSpec
    vcpus: int = 4
    strict: bool = False


class WireLog:
    """Every frame any peer sent or received, in order (the evidence of the cases)."""

    def __init__(self, clock: Callable[[], int]) -> None:
        self.records: list[dict[str, Any]] = []
        self.clock = clock

    def add(self, peer: str, direction: str, data: bytes) -> None:
        try:
            frame = decode(data, 1 << 30)
            shown = c.describe(frame.msg)
            env = {"s": frame.seq, "a": frame.ack}
        except ProtocolError as exc:
            shown = f"(does not decode: {exc})"
            env = {}
        self.records.append(
            {
                "t": self.clock(),
                "peer": peer,
                "dir": direction,
                "frame": shown,
                **env,
                "bytes": len(data),
                "hex": data[:HEX_BYTES].hex() + ("..." if len(data) > HEX_BYTES else ""),
            }
        )


class Peer:
    """One emulated guest process on link ``vcpu`` (``slot`` > 0: a second process)."""

    def __init__(self, runner: Runner, vcpu: int, slot: int) -> None:
        self.runner = runner
        self.vcpu = vcpu
        self.slot = slot
        self.name = f"vCPU {vcpu}" + (f"/{chr(ord('a') + slot)}" if slot else "")
        self.url = link_url(runner.url, vcpu)
        self.ep: PairEndpoint | None = None
        self.scope: trio.CancelScope | None = None
        self.link: Link | None = None
        self.session = 0
        self.session_open = False
        self.session_pipe: int | None = None
        self.welcome: m.Welcome | None = None
        self.inbox: list[c.Arrival] = []
        self.cursor = 0
        self.arrived = trio.Event()
        self.removed: set[int] = set()
        self.last_pipe: int | None = None
        #: pipe removals seen, and how many there were when a frame was last sent
        self.removals = 0
        self.removals_at_send = 0
        self.pipe_changed = trio.Event()
        self.hold_acks = False
        #: an exit sent without waiting: (seq, inbox index at send, send time, frame)
        self.pending_exit: tuple[int, int, int, bytes] | None = None
        self.last_hello: bytes | None = None
        #: a fresh hello is out and no welcome came yet
        self.awaiting_welcome = False

    # ------------------------------------------------------------------ socket

    async def ensure_socket(self) -> PairEndpoint:
        if self.ep is None:
            ep = PairEndpoint.dial(self.url, DEFAULT_MAX_MESSAGE)
            self.ep = ep
            self.scope = await self.runner.nursery.start(self._serve, ep)
        return self.ep

    async def _serve(
        self, ep: PairEndpoint, task_status: trio.TaskStatus[trio.CancelScope]
    ) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ep.run_sender)
                nursery.start_soon(self._receive, ep)
                nursery.start_soon(self._pipes, ep)
                nursery.start_soon(self._tick)

    async def leave(self) -> None:
        """Close the socket without a goodbye (the process is gone)."""
        await self.redial(dial=False)
        self.link = None
        self.session_open = False
        self.hold_acks = False

    async def redial(self, dial: bool = True) -> None:
        """Close the socket; with ``dial`` open a new one at once (a replaced pipe)."""
        if self.scope is not None:
            self.scope.cancel()
            self.scope = None
        if self.ep is not None:
            self.ep.close()
            self.ep = None
        if dial:
            await self.ensure_socket()

    async def _pipes(self, ep: PairEndpoint) -> None:
        async for event in ep.pipe_events:
            if event.added:
                self.last_pipe = event.pipe_id
            else:
                self.removed.add(event.pipe_id)
                self.removals += 1
                if event.pipe_id == self.session_pipe:
                    self.session_open = False  # its session cannot say goodbye any more
            self.pipe_changed.set()
            self.pipe_changed = trio.Event()

    async def _receive(self, ep: PairEndpoint) -> None:
        while True:
            try:
                data, pipe = await ep.recv()
            except (pynng.Closed, TypeError):
                # TypeError: proto/transport.py raises pynng.Closed without the arguments
                # pynng 0.9 requires when the socket closes under a waiting recv
                return
            self.last_pipe = pipe.id
            self.runner.wire.add(self.name, "recv", data)
            t = self.runner.now()
            try:
                frame = decode(data, DEFAULT_MAX_MESSAGE)
            except ProtocolError as exc:
                self._arrive(c.Arrival(len(self.inbox), t, None, 0, 0, data, problem=str(exc)))
                continue
            link = self.link
            dup = bool(frame.msg.SEQUENCED and link is not None and frame.seq < link.recv_next)
            problem = None
            if self.awaiting_welcome and not isinstance(frame.msg, m.Welcome | m.Refuse | m.Error):
                # sent for an earlier session and delivered to this pipe: a new process
                # has no session yet and ignores it (docs/protocol.md §3.4)
                link, problem = None, "frame of an earlier session (ignored)"
            elif self.awaiting_welcome and isinstance(frame.msg, m.Welcome):
                # the session starts here: what follows on this pipe is its own (the
                # host's online-mask comes right behind the welcome, §3.1), even before
                # the case has read the welcome
                self.awaiting_welcome = False
            if link is not None:
                try:
                    link.receive(data, monotonic_ns())
                except ProtocolError as exc:
                    problem = f"link: {exc}"
                if link.ack_owed() and not self.hold_acks:
                    link.send(m.Ack(), monotonic_ns())
                self.flush()
            self._arrive(
                c.Arrival(len(self.inbox), t, frame.msg, frame.seq, frame.ack, data, dup, problem)
            )

    def _arrive(self, arrival: c.Arrival) -> None:
        self.inbox.append(arrival)
        self.arrived.set()
        self.arrived = trio.Event()

    async def _tick(self) -> None:
        while True:
            await trio.sleep(TICK_S)
            link = self.link
            if link is None:
                continue
            now = monotonic_ns()
            try:
                link.poll(now)
            except LinkError:
                continue  # the case sees the silence; the session is torn down after it
            if link.ack_owed(force=True) and not self.hold_acks:
                link.send(m.Ack(), now)
            self.flush()

    def flush(self) -> None:
        if self.link is not None:
            self.send_frames(self.link.data_to_send())

    def send_frames(self, frames: list[bytes]) -> None:
        if self.ep is None or not frames:
            return
        for data in frames:
            self.runner.wire.add(self.name, "send", data)
        self.removals_at_send = self.removals
        self.ep.send(frames)

    async def send_raw(self, data: bytes) -> None:
        ep = await self.ensure_socket()
        self.runner.wire.add(self.name, "send", data)
        self.removals_at_send = self.removals
        if len(data) > ep.max_message:
            # beyond our own limit on purpose (an oversize case): straight into nng
            with trio.move_on_after(1):
                await ep.sock.asend(data)
            return
        ep.send([data])

    # ------------------------------------------------------------------ waiting

    async def wait_for(
        self, pred: Callable[[c.Arrival], bool], start: int, deadline_ns: int
    ) -> c.Arrival | None:
        """The first arrival at or after index ``start`` that satisfies ``pred``."""
        i = start
        while True:
            while i < len(self.inbox):
                if pred(self.inbox[i]):
                    return self.inbox[i]
                i += 1
            remaining = deadline_ns - monotonic_ns()
            if remaining <= 0:
                return None
            event = self.arrived
            with trio.move_on_after(remaining / 1e9):
                await event.wait()

    async def wait_closed(self, deadline_ns: int) -> bool:
        """Wait until the pipe this peer last sent on is removed (Pair0 has one pipe at a
        time, so the first removal after that send is its removal)."""
        while True:
            if self.removals > self.removals_at_send:
                return True
            remaining = deadline_ns - monotonic_ns()
            if remaining <= 0:
                return False
            event = self.pipe_changed
            with trio.move_on_after(remaining / 1e9):
                await event.wait()


class Runner:
    """Runs cases against one host.  Use :meth:`run` inside ``trio.run``."""

    def __init__(self, cfg: RunnerConfig) -> None:
        self.cfg = cfg
        self.url = cfg.spec.connect or ""
        self.offset_ns = 0
        self.rtt_ns = 0
        self.wire = WireLog(self.now)
        self.peers: dict[tuple[int, int], Peer] = {}
        self.host: HostProcess | None = None
        self.vcpus = cfg.vcpus
        self.features = c.ALL_FEATURES
        self._pid_counter = 0
        self.nursery: trio.Nursery
        self.target_info: dict[str, Any] = {}

    # ------------------------------------------------------------------ clock and pids

    def now(self) -> int:
        return monotonic_ns() + self.offset_ns

    def next_pid(self) -> int:
        """A pid value per emulated guest process: this process's pid and a counter
        (each case plays new guest processes; the host tells processes apart by pid)."""
        self._pid_counter += 1
        return ((os.getpid() << 10) | (self._pid_counter & 0x3FF)) & 0xFFFF_FFFF

    def peer(self, vcpu: int, slot: int = 0) -> Peer:
        if not 0 <= vcpu < max(self.vcpus, 1):
            raise HarnessError(f"the host serves {self.vcpus} vCPUs, not vCPU {vcpu}")
        key = (vcpu, slot)
        if key not in self.peers:
            self.peers[key] = Peer(self, vcpu, slot)
        return self.peers[key]

    # ------------------------------------------------------------------ the run

    async def run(
        self,
        cases: Sequence[c.Case],
        on_result: Callable[[c.CaseResult], None] | None = None,
    ) -> list[c.CaseResult]:
        """Run ``cases`` in order; ``on_result`` sees each result as it is decided.

        Raises:
            TargetError: the host could not be started or did not welcome vCPU 0.
        """
        results: list[c.CaseResult] = []
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            try:
                await self._open_target(nursery)
                for case in cases:
                    if case.fixture == "own-host":
                        result = await self._run_on_fresh_host(case)
                    else:
                        result = await self.run_case(case)
                    results.append(result)
                    if on_result is not None:
                        on_result(result)
            finally:
                await self._close_target()
                nursery.cancel_scope.cancel()
        return results

    async def _open_target(self, nursery: trio.Nursery) -> None:
        spec = self.cfg.spec
        if spec.started_by_us:
            self.host = HostProcess(spec, self.cfg.vcpus, LONG_RUN_S)
            await self.host.start(nursery)
            self.url = self.host.url
            self.target_info = {"command": self.host.argv, "url": self.url}
        else:
            self.target_info = {"url": self.url}
        await self._probe()

    async def _probe(self) -> None:
        """First session on vCPU 0: learn the vCPU count and features, estimate the
        clock offset (8 pings, the smallest round trip wins, as vCPUs do)."""
        peer = self.peer(0)
        welcome = await self.session(peer, c.ALL_FEATURES, 1)
        if not isinstance(welcome, m.Welcome):
            shown = c.describe(welcome) if welcome is not None else "no answer"
            raise TargetError(f"the host did not welcome vCPU 0 ({shown})")
        self.vcpus = welcome.vcpus
        self.features = welcome.features
        best: tuple[int, int] | None = None
        for _ in range(PINGS):
            sent = monotonic_ns()
            assert peer.link is not None
            peer.link.send(m.Ping(t=sent), sent)
            start = len(peer.inbox)
            peer.flush()
            pong = await peer.wait_for(_pong_for(sent), start, sent + 1_000_000_000)
            if pong is not None:
                assert isinstance(pong.msg, m.Pong)
                rtt = monotonic_ns() - sent
                if best is None or rtt < best[0]:
                    best = (rtt, pong.msg.host - (sent + rtt // 2))
        if best is not None:
            self.rtt_ns, offset = best
            # within the round trip the clocks cannot be told apart: one machine
            self.offset_ns = 0 if abs(offset) <= self.rtt_ns else offset
        self.target_info |= {
            "vcpus": self.vcpus,
            "features": self.features,
            "clock_offset_ns": self.offset_ns,
            "ping_rtt_ns": self.rtt_ns,
            "welcome": c.describe(welcome),
        }
        await self.goodbye(peer)

    async def _close_target(self) -> None:
        for peer in list(self.peers.values()):
            await peer.leave()
        self.peers.clear()
        if self.host is not None:
            await self.host.stop()
            self.target_info["exit_status"] = self.host.status

    async def _run_on_fresh_host(self, case: c.Case) -> c.CaseResult:
        """A case whose host run must end while it watches: a short host of its own."""
        spec = self.cfg.spec
        if not spec.started_by_us:
            return await self.run_case(case, capabilities=frozenset())
        saved = (self.url, self.peers, self.host, self.vcpus)
        for peer in list(self.peers.values()):
            await peer.leave()
        host = HostProcess(spec, 1, 0.5)
        self.peers = {}
        try:
            await host.start(self.nursery)
            self.url, self.host, self.vcpus = host.url, host, 1
            return await self.run_case(case, capabilities=frozenset({"exit-status", "run-ends"}))
        except TargetError as exc:
            return c.CaseResult(case, c.Outcome.ERROR, str(exc), [], [], [], 0)
        finally:
            for peer in list(self.peers.values()):
                await peer.leave()
            await host.stop()
            self.url, self.peers, self.host, self.vcpus = saved

    # ------------------------------------------------------------------ one case

    async def run_case(
        self, case: c.Case, capabilities: frozenset[str] | None = None
    ) -> c.CaseResult:
        caps = capabilities
        if caps is None:
            caps = frozenset({"host-log"}) if self.host is not None else frozenset()
        ctx = c.Ctx(vcpus=self.vcpus, features=self.features, capabilities=caps)
        first_frame = len(self.wire.records)
        first_log = len(self.host.log) if self.host is not None else 0
        t0 = monotonic_ns()
        outcome: c.Outcome | None = None
        reason = ""
        with trio.move_on_after(CASE_TIMEOUT_S) as scope:
            try:
                await self._drive(case.script(ctx))
            except c.Unsupported as exc:
                outcome, reason = c.Outcome.UNSUPPORTED, str(exc)
            except c.Abort:
                pass
            except (HarnessError, TargetError) as exc:
                outcome, reason = c.Outcome.ERROR, f"harness: {exc}"
            except Exception as exc:  # a bug in the case itself: a harness error
                outcome, reason = c.Outcome.ERROR, f"case raised {exc!r}"
                ctx.note(traceback.format_exc())
        if scope.cancelled_caught:
            outcome, reason = c.Outcome.ERROR, f"case did not finish within {CASE_TIMEOUT_S:g} s"
        if outcome is None:
            outcome, reason = c.judge(case.level, ctx.checks, self.cfg.strict)
        await self._clean_peers()
        t1 = monotonic_ns()
        frames = [dict(r, t=r["t"] - t0 - self.offset_ns) for r in self.wire.records[first_frame:]]
        if self.host is not None:
            frames += [
                {"t": t - t0, "peer": "host", "dir": "log", "frame": line}
                for t, line in self.host.log[first_log:]
            ]
            frames.sort(key=lambda r: r["t"])
        return c.CaseResult(case, outcome, reason, ctx.checks, ctx.notes, frames, t1 - t0)

    async def _drive(self, script: c.Script) -> None:
        value: Any = None
        while True:
            try:
                op = script.send(value)
            except StopIteration:
                return
            value = await self.perform(op)

    async def _clean_peers(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            for peer in list(self.peers.values()):
                if peer.session_open and peer.link is not None and not await self.goodbye(peer):
                    await peer.leave()
                if peer.slot:
                    await peer.leave()  # a second process never outlives its case
                peer.hold_acks = False
                peer.cursor = len(peer.inbox)

    # ------------------------------------------------------------------ operations

    async def perform(self, op: c.Op) -> Any:  # noqa: C901 - one dispatch over the op types
        if isinstance(op, c.Now):
            return self.now()
        if isinstance(op, c.Pause):
            await trio.sleep(op.ms / 1000)
            return None
        if isinstance(op, c.HostEnd):
            return await self._host_end(op)
        peer = self.peer(op.vcpu, op.peer)
        if isinstance(op, c.Session):
            return await self.session(peer, op.features, op.version)
        if isinstance(op, c.Hello):
            return await self.hello(peer, op)
        if isinstance(op, c.Exit):
            return await self.exit(peer, op.msg, op.wait, op.timeout_ms)
        if isinstance(op, c.AwaitReply):
            return await self.await_reply(peer, op.seq, op)
        if isinstance(op, c.Send):
            link = self._link(peer)
            seq = link.send_next if op.msg.SEQUENCED else 0
            link.send(op.msg, monotonic_ns())
            peer.flush()
            return seq
        if isinstance(op, c.Drop):
            link = self._link(peer)
            link.send(op.msg, monotonic_ns())
            frames = link.data_to_send()
            return frames[-1]
        if isinstance(op, c.SendRaw):
            await peer.send_raw(op.data)
            return None
        if isinstance(op, c.Await):
            await peer.ensure_socket()
            deadline = monotonic_ns() + op.timeout_ms * 1_000_000
            kinds, match = op.kinds, op.match

            def wanted(a: c.Arrival) -> bool:
                return (
                    a.msg is not None
                    and isinstance(a.msg, kinds)
                    and (op.include_dups or not a.dup)
                    and (match is None or match(a))
                )

            found = await peer.wait_for(wanted, peer.cursor, deadline)
            if found is not None:
                peer.cursor = found.index + 1
            return found
        if isinstance(op, c.Collect):
            await peer.ensure_socket()
            start = len(peer.inbox)
            await trio.sleep(op.ms / 1000)
            return [
                a
                for a in peer.inbox[start:]
                if (not op.kinds or (a.msg is not None and isinstance(a.msg, op.kinds)))
                and (op.include_dups or not a.dup)
            ]
        if isinstance(op, c.Mark):
            peer.cursor = len(peer.inbox)
            return peer.cursor
        if isinstance(op, c.Closed):
            return await peer.wait_closed(monotonic_ns() + op.timeout_ms * 1_000_000)
        if isinstance(op, c.Leave):
            await peer.leave()
            return None
        if isinstance(op, c.Redial):
            await peer.redial()
            return None
        if isinstance(op, c.Goodbye):
            return await self.goodbye(peer)
        if isinstance(op, c.HoldAcks):
            peer.hold_acks = op.hold
            return None
        raise HarnessError(f"unknown operation {op!r}")

    def _link(self, peer: Peer) -> Link:
        if peer.link is None:
            raise HarnessError(f"{peer.name} has no session (the case must open one)")
        return peer.link

    def _hello_frame(self, peer: Peer, op: c.Hello, pid: int) -> bytes:
        hello = m.Hello(
            version=op.version,
            features=op.features,
            vcpu=peer.vcpu if op.vcpu_field is None else op.vcpu_field,
            token=self.cfg.spec.token if op.token is None else op.token,
            pid=pid,
            resume=op.resume,
        )
        seq = peer.link.send_next - 1 if op.resume is not None and peer.link else 0
        try:
            return encode(hello, seq, op.ack)
        except ProtocolError:
            # a hello the schema forbids (a token of the wrong length): the bytes a
            # careless client would send, encoded without the codec's check
            import cbor2

            wire = {
                "k": 1,
                "s": seq,
                "a": op.ack,
                "version": hello.version,
                "features": hello.features,
                "vcpu": hello.vcpu,
                "token": hello.token,
                "pid": hello.pid,
            }
            if hello.resume is not None:
                wire["resume"] = hello.resume
            return cbor2.dumps(wire)

    async def hello(self, peer: Peer, op: c.Hello) -> c.HelloAnswer:
        await peer.ensure_socket()
        if op.repeat and peer.last_hello is not None:
            data = peer.last_hello
        else:
            pid = self.next_pid()
            if op.resume is None:
                # a new process: a new link (its welcome and anything after go through it)
                peer.link = Link(name=f"{peer.name} (conformance)")
                peer.session_open = False
            data = self._hello_frame(peer, op, pid)
            peer.last_hello = data
            peer.awaiting_welcome = op.resume is None
        start = len(peer.inbox)
        deadline = monotonic_ns() + max(op.timeout_ms, 1) * 1_000_000
        answer: c.Arrival | None = None
        while answer is None and monotonic_ns() < deadline:
            await peer.send_raw(data)
            answer = await peer.wait_for(
                lambda a: isinstance(a.msg, m.Welcome | m.Refuse | m.Error),
                start,
                min(deadline, monotonic_ns() + HELLO_RETRY_NS),
            )
        peer.awaiting_welcome = False
        if answer is None:
            return c.HelloAnswer(None, None, False)
        peer.cursor = answer.index + 1
        msg = answer.msg
        if isinstance(msg, m.Welcome):
            self._adopt(peer, msg, answer)
            return c.HelloAnswer(msg, answer.t, False)
        closed = await peer.wait_closed(monotonic_ns() + 500_000_000)
        return c.HelloAnswer(msg, answer.t, closed)

    def _adopt(self, peer: Peer, welcome: m.Welcome, answer: c.Arrival) -> None:
        assert peer.link is not None
        if welcome.resumed:
            peer.link.resume(peer.link.peer_acked, monotonic_ns())
            peer.flush()
        peer.link.max_message = welcome.max_message
        peer.welcome = welcome
        peer.session = welcome.session
        peer.session_open = True
        peer.session_pipe = peer.last_pipe

    async def session(self, peer: Peer, features: int, version: int) -> m.Message | None:
        """A fresh session: the previous one (if any) ends with a goodbye first."""
        if peer.session_open and peer.link is not None and not await self.goodbye(peer):
            await peer.leave()
        answer = await self.hello(
            peer, c.Hello(peer.vcpu, features, version, timeout_ms=SESSION_TIMEOUT_NS // 10**6)
        )
        return answer.msg

    async def goodbye(self, peer: Peer) -> bool:
        link = peer.link
        if link is None or not peer.session_open:
            return False
        start = len(peer.inbox)
        link.send(m.Goodbye(), monotonic_ns())
        peer.flush()
        bye = await peer.wait_for(
            lambda a: isinstance(a.msg, m.Goodbye), start, monotonic_ns() + GOODBYE_TIMEOUT_NS
        )
        peer.session_open = False
        if bye is None:
            return False
        link.send(m.Ack(), monotonic_ns())  # acknowledge the host's goodbye
        peer.flush()
        peer.link = None
        return True

    async def exit(self, peer: Peer, msg: m.Message, wait: bool, timeout_ms: int) -> Any:
        link = self._link(peer)
        seq = link.send_next
        start = len(peer.inbox)
        sent = self.now()
        link.send(msg, monotonic_ns())
        frames = link.data_to_send()
        frame = frames[-1]
        peer.send_frames(frames)
        peer.pending_exit = (seq, start, sent, frame)
        if not wait:
            return seq
        return await self.await_reply(peer, seq, c.AwaitReply(peer.vcpu, seq, timeout_ms))

    async def await_reply(self, peer: Peer, seq: int, op: c.AwaitReply) -> c.ExitDone:
        start, sent, frame = len(peer.inbox), self.now(), b""
        pending = peer.pending_exit
        if pending is not None and pending[0] == seq:
            _, start, sent, frame = pending
            peer.pending_exit = None
        reply = await peer.wait_for(
            lambda a: isinstance(a.msg, m.ExitReply) and a.msg.re == seq and not a.dup,
            start,
            monotonic_ns() + op.timeout_ms * 1_000_000,
        )
        end = reply.index if reply is not None else len(peer.inbox)
        during = tuple(
            a
            for a in peer.inbox[start:end]
            if a.msg is not None and not isinstance(a.msg, m.Ack) and not a.dup
        )
        if reply is None:
            return c.ExitDone(seq, sent, None, None, during, frame)
        assert isinstance(reply.msg, m.ExitReply)
        return c.ExitDone(seq, sent, reply.msg, reply.t, during, frame, reply.seq, reply.ack)

    async def _host_end(self, op: c.HostEnd) -> tuple[int | None, bool | None]:
        if self.host is None:
            return None, None
        status = await self.host.wait(op.timeout_ms / 1000)
        if status is None:
            return None, None
        await self.host.stop()  # reads the results and removes the directory
        ok = self.host.results.get("ok") if self.host.results else None
        return status, ok


def _pong_for(sent: int) -> Callable[[c.Arrival], bool]:
    return lambda a: isinstance(a.msg, m.Pong) and a.msg.t == sent
