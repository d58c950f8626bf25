"""``vtick fuzz``: messages generated from the CDDL schema, and byte-level mutations of valid
frames, against a running host while a well-behaved vCPU keeps working.

Theory of operation
-------------------
:class:`FrameGenerator` is pure and seeded: it walks the compiled schema
(``vtick.proto.codec.SCHEMA``, itself compiled from ``proto/vtick.cddl``) and builds a
value for every member of a message rule, preferring the values that matter (real MSR
numbers, APIC register addresses, hypercall numbers, the edges of every integer range),
so most frames are valid and reach the device models.  A few frames are broken on
purpose: schema-breaking variants (a field missing, mistyped, out of range, unknown; an
unknown kind) and byte-level mutations of a valid frame (bit flips, truncation,
insertion, duplication).  The same seed gives the same frames.

The edge runs one fuzzing peer per vCPU link but the first, each in sessions of its own:
valid frames are numbered by a real :class:`~vtick.proto.link.Link` and pipelined (at
most 64 unacknowledged); a broken frame ends its session (the host answers ``error``
and drops the pipe, or accepts the frame and the peer starts over with a fresh hello).
vCPU 0 is a well-behaved vCPU that reads its APIC version register in a loop and checks
every answer; its exit round trip is recorded before the fuzzing starts and while it
runs.

A failure is a host that dies (a started host's process exits), hangs (the well-behaved
vCPU's exit or a fuzzing session's acks stall for 2 s), answers ``error`` INTERNAL (a
model bug the guard caught), reports ``host_bugs`` in its results, or gives the
well-behaved vCPU a wrong answer.  The last 64 frames of every fuzzing link are then
saved as JSON in ``--save DIR`` and ``vtick fuzz --replay FILE`` sends them again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cbor2
import pynng
import trio

from vtick.proto import apicdef as r
from vtick.proto import messages as m
from vtick.proto.abi import Hypercall, Msr
from vtick.proto.codec import DEFAULT_MAX_MESSAGE, SCHEMA, decode, encode, kind_of
from vtick.proto.errors import ErrorCode, LinkError, ProtocolError
from vtick.proto.link import Link
from vtick.proto.schema import (
    ArrayRule,
    BoolType,
    Choice,
    IntRange,
    MapRule,
    Ref,
    StrType,
    Validator,
)
from vtick.proto.transport import PairEndpoint, link_url, monotonic_ns

__all__ = ["FrameGenerator", "Item", "fuzz_main", "percentile"]

WINDOW = 64
STALL_NS = 2_000_000_000
#: frames kept per fuzzing link for a saved failure (a few sessions' worth)
RING = 1000
BEFORE_S = 1.0
#: relative weights of the vCPU -> host kinds (exits dominate, as in a real guest)
KIND_WEIGHTS = {
    "exit-mmio-read": 14,
    "exit-mmio-write": 14,
    "exit-msr-read": 12,
    "exit-msr-write": 14,
    "exit-pio-in": 5,
    "exit-pio-out": 5,
    "exit-hypercall": 14,
    "exit-hlt": 2,
    "ack": 4,
    "ping": 3,
    "csd": 2,
    "csd-done": 2,
    "cpu-online": 1,
    "trace": 1,
    "report": 1,
    "error": 1,
    # host -> vCPU kinds sent the wrong way (docs/protocol.md §4.5)
    "exit-reply": 1,
    "inject": 1,
    "pvclock": 1,
    "shutdown": 1,
    "online-mask": 1,
}
#: out of 1000 frames: schema-breaking ones, byte mutations; the rest are valid.  Each
#: broken frame costs a session (the host answers error, waits 50 ms, drops the pipe)
BROKEN_PER_MILLE = 2
MUTATED_PER_MILLE = 2

_MSRS = [
    r.MSR_IA32_APICBASE,
    r.MSR_IA32_TSC_DEADLINE,
    *range(0x800, 0x840),
    0x8FF,
    *[int(x) for x in Msr],
    0x10,
    0xDEAD,
]
_GPAS = [r.APIC_DEFAULT_BASE + off for off in range(0, 0x400, 0x10)] + [0, 0x1000, 0xFEE00FFC]
_PORTS = [0x40, 0x41, 0x42, 0x43, 0x61, 0x80, 0xFFFF]
_NRS = [int(h) for h in Hypercall] + [0, 1, 9, 12, 0x5654_00FF]
_HINTS: dict[str, list[int]] = {"msr": _MSRS, "gpa": _GPAS, "port": _PORTS, "nr": _NRS}


@dataclass(frozen=True, slots=True)
class Item:
    """One generated frame: a valid message (numbered by the link when sent) or bytes."""

    kind: str  # "valid", "broken" or "mutated"
    rule: str
    msg: m.Message | None = None
    data: bytes | None = None


class FrameGenerator:
    """Seeded frames for one vCPU link (pure: no clock, no I/O)."""

    def __init__(self, seed: int, vcpu: int, vcpus: int) -> None:
        self.rng = random.Random(f"vtick-fuzz-{seed}-{vcpu}")
        self.vcpu = vcpu
        self.vcpus = vcpus
        self.rules = SCHEMA.message_rules()
        self.kind_number = {cls.RULE: kind_of(cls) for cls in m.MESSAGE_CLASSES}
        self.names = list(KIND_WEIGHTS)
        self.weights = [KIND_WEIGHTS[n] for n in self.names]

    # ------------------------------------------------------------------ values

    def _int(self, lo: int, hi: int, name: str) -> int:
        rng = self.rng
        hint = _HINTS.get(name)
        if hint is not None and rng.random() < 0.8:
            candidates = [h for h in hint if lo <= h <= hi]
            if candidates:
                return rng.choice(candidates)
        if rng.random() < 0.3:
            edges = [lo, hi, lo + 1, hi - 1, 0, 1, (1 << 31), (1 << 32) - 1, (1 << 63) - 1]
            return rng.choice([e for e in edges if lo <= e <= hi] or [lo])
        bits = rng.randint(0, max(hi - lo, 1).bit_length())
        return lo + rng.randrange(0, min(1 << bits, hi - lo + 1))

    def value(self, v: Validator, name: str = "", depth: int = 0) -> Any:
        """A value ``v`` accepts (for maps: required members plus some optional ones)."""
        rng = self.rng
        if isinstance(v, Ref):
            return self.value(SCHEMA.resolve(v.name), name, depth)
        if isinstance(v, IntRange):
            return self._int(v.lo, v.hi, name)
        if isinstance(v, BoolType):
            return rng.random() < 0.5
        if isinstance(v, StrType):
            # short strings: a fuzzed report or trace must not grow the host's memory
            lo = v.min_size
            hi = max(lo, min(v.max_size if v.max_size is not None else 32, 32))
            n = rng.randint(lo, hi)
            if v.kind is bytes:
                return rng.randbytes(n)
            return "".join(rng.choice("abcdefghij_-.") for _ in range(n))
        if isinstance(v, Choice):
            return self.value(rng.choice(v.options), name, depth)
        if isinstance(v, ArrayRule):
            top = v.max_items if v.max_items is not None else 4
            return [
                self.value(v.item, name, depth + 1) for _ in range(rng.randint(v.min_items, top))
            ]
        if isinstance(v, MapRule):
            if v.generic is not None:
                kv, vv = v.generic
                return {
                    self.value(kv, name, depth + 1): self.value(vv, name, depth + 1)
                    for _ in range(rng.randint(0, 3))
                }
            out = {}
            for key, (member, optional) in v.members.items():
                if optional and rng.random() < 0.5:
                    continue
                out[key] = self.value(member, key, depth + 1)
            return out
        raise TypeError(f"no generator for {type(v).__name__}")  # pragma: no cover

    # ------------------------------------------------------------------ frames

    def message(self, rule: str) -> m.Message:
        """A valid message of ``rule`` (its envelope is the link's business)."""
        wire = self.value(self.rules[rule])
        wire["k"] = self.kind_number[rule]
        wire.setdefault("s", 0)
        wire.setdefault("a", 0)
        if rule in ("csd", "csd-done") and self.rng.random() < 0.8:
            wire["src"] = self.vcpu  # mostly stores this vCPU may make
            wire["dst"] = self.rng.randrange(self.vcpus)
        if rule == "cpu-online" and self.rng.random() < 0.8:
            wire["cpu"] = self.vcpu  # mostly the store this vCPU may make
        return decode(cbor2.dumps(wire), 1 << 30).msg

    def broken(self, rule: str, seq: int, ack: int) -> bytes:
        """A frame that breaks the schema one way, in-sequence."""
        rng = self.rng
        wire = self.value(self.rules[rule])
        wire |= {"k": self.kind_number[rule], "s": seq, "a": ack}
        required = [
            k
            for k, (_, opt) in self.rules[rule].members.items()
            if not opt and k not in ("k", "s", "a")
        ]
        how = rng.randrange(5)
        if how == 0 and required:
            del wire[rng.choice(required)]
        elif how == 1 and required:
            wire[rng.choice(required)] = rng.choice(["text", b"\x00", [1], {"x": 1}, 1.5, None])
        elif how == 2 and required:
            wire[rng.choice(required)] = rng.choice([-1, 1 << 64, -(1 << 64), 1 << 70])
        elif how == 3:
            wire["zz"] = 1
        else:
            wire["k"] = rng.choice([0, 8, 15, 99, 1 << 40, -1])
        return cbor2.dumps(wire)

    def mutated(self, data: bytes) -> bytes:
        """A byte-level mutation of a valid frame."""
        rng = self.rng
        buf = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            how = rng.randrange(5)
            pos = rng.randrange(len(buf)) if buf else 0
            if how == 0 and buf:
                buf[pos] ^= 1 << rng.randrange(8)
            elif how == 1 and buf:
                buf[pos] = rng.choice([0x00, 0xFF, 0x7F, 0x80, 0x9F, 0xBF, 0xC2, 0xF9, 0x1B])
            elif how == 2:
                buf[pos:pos] = rng.randbytes(rng.randint(1, 4))
            elif how == 3 and len(buf) > 1:
                del buf[pos : pos + rng.randint(1, 4)]
            else:
                buf += buf[pos : pos + rng.randint(1, 8)]
        return bytes(buf)

    def next(self, seq: int, ack: int) -> Item:
        """The next frame; ``seq``/``ack`` are the envelope a broken frame should carry."""
        rule = self.rng.choices(self.names, self.weights)[0]
        roll = self.rng.randrange(1000)
        if roll < BROKEN_PER_MILLE:
            return Item("broken", rule, data=self.broken(rule, seq, ack))
        msg = self.message(rule)
        if roll < BROKEN_PER_MILLE + MUTATED_PER_MILLE:
            return Item("mutated", rule, data=self.mutated(encode(msg, seq, ack, 1 << 30)))
        return Item("valid", rule, msg=msg)


def percentile(values: list[int], q: float) -> int | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


# ---------------------------------------------------------------------- the edge


@dataclass
class FuzzStats:
    sent: Counter[str] = field(default_factory=Counter)
    answers: Counter[str] = field(default_factory=Counter)
    sessions: int = 0
    failures: list[str] = field(default_factory=list)


class _Conn:
    """A Pair0 dialer with a receive task: frames are handed to ``on_frame``."""

    def __init__(self, url: str, on_frame: Callable[[bytes], None]) -> None:
        self.url = url
        self.on_frame = on_frame
        self.ep: PairEndpoint | None = None
        self.removals = 0
        self.scope: trio.CancelScope | None = None

    async def open(self, nursery: trio.Nursery) -> None:
        self.ep = PairEndpoint.dial(self.url, DEFAULT_MAX_MESSAGE)
        self.scope = await nursery.start(self._serve, self.ep)

    async def _serve(
        self, ep: PairEndpoint, task_status: trio.TaskStatus[trio.CancelScope]
    ) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ep.run_sender)
                nursery.start_soon(self._pipes, ep)
                while True:
                    try:
                        data, _ = await ep.recv()
                    except (pynng.Closed, TypeError):  # TypeError: see runner._receive
                        return
                    self.on_frame(data)

    async def _pipes(self, ep: PairEndpoint) -> None:
        async for event in ep.pipe_events:
            if not event.added:
                self.removals += 1

    def send(self, frames: list[bytes]) -> None:
        if self.ep is not None:
            self.ep.send(frames)

    def close(self) -> None:
        if self.scope is not None:
            self.scope.cancel()
        if self.ep is not None:
            self.ep.close()


class FuzzLink:
    """One fuzzing peer: sessions of valid frames, each ended by a broken one.

    Every session dials from a new socket, as a new process would: frames still in
    flight for the previous session die with its socket instead of reaching the new one.
    """

    def __init__(self, fuzz: Fuzzer, vcpu: int, quota: int) -> None:
        self.fuzz = fuzz
        self.vcpu = vcpu
        self.quota = quota
        self.gen = FrameGenerator(fuzz.seed, vcpu, fuzz.vcpus)
        self.link: Link | None = None
        self.welcomed = trio.Event()
        self.answered = trio.Event()
        self.progress = trio.Event()
        self.ring: deque[str] = deque(maxlen=RING)
        self.sent = 0
        self.url = link_url(fuzz.url, vcpu)
        self.conn: _Conn | None = None

    def _on_frame(self, data: bytes) -> None:
        stats = self.fuzz.stats
        try:
            frame = decode(data, DEFAULT_MAX_MESSAGE)
        except ProtocolError:
            stats.answers["undecodable"] += 1
            return
        msg = frame.msg
        name = msg.RULE
        if isinstance(msg, m.Error | m.Refuse):
            try:
                name = f"{msg.RULE} {ErrorCode(msg.code).name}"
            except ValueError:
                name = f"{msg.RULE} {msg.code}"
            if msg.code == ErrorCode.INTERNAL:
                self.fuzz.fail(
                    f"vCPU {self.vcpu}: host answered error INTERNAL: {msg.reason}", self
                )
            self.answered.set()
        elif isinstance(msg, m.ExitReply) and msg.fault:
            name = f"exit-reply fault {msg.fault}"
        if isinstance(msg, m.Welcome):
            self.welcomed.set()
        elif not self.welcomed.is_set() and not isinstance(msg, m.Error | m.Refuse):
            # sent for a previous session and delivered to this new pipe (a socket sends
            # to whichever pipe it has): a new process ignores it, as vtick's guest does
            stats.answers["frames of a previous session"] += 1
            return
        stats.answers[name] += 1
        if self.link is not None:
            try:
                self.link.receive(data, monotonic_ns())
            except ProtocolError as exc:
                stats.answers["host frame our link refused"] += 1
                self.fuzz.note(f"vCPU {self.vcpu}: {exc}")
            self.progress.set()
            self.progress = trio.Event()

    def _send(self, frames: list[bytes]) -> None:
        for data in frames:
            self.ring.append(data.hex())
        if self.conn is not None:
            self.conn.send(frames)

    async def _hello(self, nursery: trio.Nursery) -> bool:
        if self.conn is not None:
            self.conn.close()
        self.conn = _Conn(self.url, self._on_frame)
        await self.conn.open(nursery)
        self.link = Link(name=f"fuzz vCPU {self.vcpu}")
        self.welcomed = trio.Event()
        hello = m.Hello(
            version=1,
            features=0x1F,
            vcpu=self.vcpu,
            token=self.fuzz.token,
            pid=(os.getpid() << 8 | self.fuzz.stats.sessions & 0xFF) & 0xFFFF_FFFF,
        )
        self.fuzz.stats.sessions += 1
        with trio.move_on_after(5):
            while not self.welcomed.is_set():
                self._send([encode(hello, 0, 0)])
                self.fuzz.stats.sent["hello"] += 1
                with trio.move_on_after(0.2):
                    await self.welcomed.wait()
            return True
        self.fuzz.fail(f"vCPU {self.vcpu}: no welcome within 5 s", self)
        return False

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while self.sent < self.quota and not self.fuzz.failed:
                if not await self._hello(nursery):
                    break
                await self._session()
            if self.conn is not None:
                self.conn.close()
            nursery.cancel_scope.cancel()

    async def _session(self) -> None:
        link = self.link
        assert link is not None
        self.answered = trio.Event()
        while self.sent < self.quota and not self.fuzz.failed:
            item = self.gen.next(link.send_next, link.recv_next - 1)
            self.sent += 1
            self.fuzz.stats.sent[item.kind] += 1
            if item.kind == "valid":
                assert item.msg is not None
                try:
                    link.send(item.msg, monotonic_ns())
                except (ProtocolError, LinkError) as exc:  # pragma: no cover - generator bug
                    self.fuzz.note(f"generator: {exc}")
                    continue
                self._send(link.data_to_send())
                if link.unacked() >= WINDOW and not await self._drain(link):
                    return
                continue
            assert item.data is not None
            self._send([item.data])
            # numbered outside the link: the host may have taken it as a frame of ours,
            # so this link's bookkeeping ends here
            self.link = None
            with trio.move_on_after(0.1):
                await self.answered.wait()
            return  # a broken frame ends the session; the next starts with a hello

    async def _drain(self, link: Link) -> bool:
        """Wait until half the window is acknowledged.  An answered error ends the
        session; silence for 2 s without one is a stall (a failure)."""
        deadline = monotonic_ns() + STALL_NS
        while link.unacked() > WINDOW // 2:
            if self.answered.is_set():
                return False
            if monotonic_ns() > deadline:
                self.fuzz.fail(f"vCPU {self.vcpu}: the host acknowledged nothing for 2 s", self)
                return False
            with trio.move_on_after(0.05):
                await self.progress.wait()
            try:
                link.poll(monotonic_ns())
            except LinkError:
                pass
            self._send(link.data_to_send())
        return True


class WellBehaved:
    """vCPU 0: reads LVR in a loop, checks each answer, records the round trips.

    It runs in a process of its own (:class:`WellBehavedProcess`), so its round trips
    measure the host, not the fuzzer's own event loop."""

    def __init__(self, url: str, token: bytes, on_fail: Callable[[str], None]) -> None:
        self.token = token
        self.on_fail = on_fail
        self.link = Link(name="well-behaved vCPU 0")
        self.before: list[int] = []
        self.during: list[int] = []
        self.phase = self.before
        self.wrong: list[str] = []
        self.reply: m.ExitReply | None = None
        self.got = trio.Event()
        self.welcomed = trio.Event()
        self.stop = False
        self.conn = _Conn(link_url(url, 0), self._on_frame)

    def _on_frame(self, data: bytes) -> None:
        try:
            msgs = self.link.receive(data, monotonic_ns())
        except ProtocolError as exc:
            self.wrong.append(f"bad frame from the host: {exc}")
            return
        for msg in msgs:
            if isinstance(msg, m.Welcome):
                self.welcomed.set()
            elif isinstance(msg, m.ExitReply):
                self.reply = msg
                self.got.set()
        if self.link.ack_owed():
            self.link.send(m.Ack(), monotonic_ns())
        self.conn.send(self.link.data_to_send())

    async def hello(self, nursery: trio.Nursery) -> bool:
        await self.conn.open(nursery)
        hello = m.Hello(version=1, features=0x1F, vcpu=0, token=self.token, pid=os.getpid())
        with trio.move_on_after(5):
            while not self.welcomed.is_set():
                self.conn.send([encode(hello, 0, 0)])
                with trio.move_on_after(0.2):
                    await self.welcomed.wait()
        return self.welcomed.is_set()

    async def exit_once(self) -> bool:
        """One LVR read; False (after reporting why) if it was not answered right."""
        self.got = trio.Event()
        seq = self.link.send_next
        t0 = time.perf_counter_ns()
        self.link.send(m.ExitMmioRead(gpa=r.APIC_DEFAULT_BASE + r.APIC_LVR, size=4), monotonic_ns())
        self.conn.send(self.link.data_to_send())
        with trio.move_on_after(STALL_NS / 1e9):
            await self.got.wait()
        if not self.got.is_set():
            self.on_fail("the well-behaved vCPU 0's exit was not answered for 2 s")
            return False
        self.phase.append(time.perf_counter_ns() - t0)
        reply = self.reply
        assert reply is not None
        if reply.re != seq or reply.value != r.lvr_value(False, False) or reply.fault:
            self.wrong.append(c_describe(reply))
            self.on_fail(f"the well-behaved vCPU 0 got a wrong answer: {c_describe(reply)}")
            return False
        return True

    async def run(self, nursery: trio.Nursery) -> None:
        if not await self.hello(nursery):
            self.on_fail("the well-behaved vCPU 0 got no welcome")
            return
        while not self.stop:
            if not await self.exit_once():
                return
            if self.link.ack_owed(force=True):
                self.link.send(m.Ack(), monotonic_ns())
                self.conn.send(self.link.data_to_send())
            await trio.sleep(0.001)


class WellBehavedProcess:
    """The well-behaved vCPU in a child process (``python -m vtick.host.conformance.fuzz
    well-behaved URL``): ``during`` on its stdin starts the second phase, ``stop`` ends it;
    it prints ``{"fail": reason}`` at once on a failure and its samples at the end."""

    def __init__(self, fuzz: Fuzzer) -> None:
        self.fuzz = fuzz
        self.proc: trio.Process | None = None
        self.result: dict[str, Any] = {"before": [], "during": [], "wrong": []}
        self.finished = trio.Event()

    async def run(self, nursery: trio.Nursery) -> None:
        self.proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "vtick.host.conformance.fuzz", "well-behaved", self.fuzz.url],
            env=dict(os.environ, VTICK_TOKEN=self.fuzz.token.hex()),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        nursery.start_soon(self._read)

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        buf = b""
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            while chunk := await self.proc.stdout.receive_some(1 << 16):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    doc = json.loads(line)
                    if "fail" in doc:
                        self.fuzz.fail(doc["fail"], None)
                    else:
                        self.result = doc
        self.finished.set()

    async def tell(self, word: str) -> None:
        assert self.proc is not None
        assert self.proc.stdin is not None
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            await self.proc.stdin.send_all(word.encode() + b"\n")

    async def stop(self) -> None:
        await self.tell("stop")
        with trio.move_on_after(5):
            await self.finished.wait()
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with trio.CancelScope(shield=True):
                await self.proc.wait()


def _child_main(url: str) -> int:
    """The well-behaved vCPU's process (see :class:`WellBehavedProcess`)."""
    from vtick.proto.cliargs import read_token

    token = read_token(None)

    def emit(doc: dict[str, Any]) -> None:
        print(json.dumps(doc), flush=True)

    async def main() -> None:
        good = WellBehaved(url, token, lambda reason: emit({"fail": reason}))

        async def control() -> None:
            stdin = trio.lowlevel.FdStream(os.dup(0))
            buf = b""
            while chunk := await stdin.receive_some(4096):
                buf += chunk
                if b"during" in buf:
                    good.phase = good.during
                if b"stop" in buf:
                    break
            good.stop = True

        async with trio.open_nursery() as nursery:
            nursery.start_soon(control)
            await good.run(nursery)
            good.conn.close()
            emit({"before": good.before, "during": good.during, "wrong": good.wrong})
            nursery.cancel_scope.cancel()

    trio.run(main)
    return 0


def c_describe(msg: m.Message) -> str:
    from vtick.host.conformance.case import describe

    return describe(msg)


class Fuzzer:
    def __init__(
        self, url: str, token: bytes, vcpus: int, messages: int, seed: int, save_dir: str
    ) -> None:
        self.url = url
        self.token = token
        self.vcpus = vcpus
        self.messages = messages
        self.seed = seed
        self.save_dir = save_dir
        self.stats = FuzzStats()
        self.links: list[FuzzLink] = []
        self.failed = False
        self.saved: str | None = None
        self.notes: list[str] = []
        self.host_alive: Callable[[], bool] = lambda: True

    def note(self, text: str) -> None:
        if len(self.notes) < 20:
            self.notes.append(text)

    def fail(self, reason: str, culprit: FuzzLink | None) -> None:
        if self.failed:
            return
        self.failed = True
        self.stats.failures.append(reason)
        self.saved = self.save(reason, culprit)

    def save(self, reason: str, culprit: FuzzLink | None) -> str:
        os.makedirs(self.save_dir, exist_ok=True)
        links = [culprit] if culprit is not None else self.links
        doc = {
            "vtick_fuzz_failure": 1,
            "reason": reason,
            "seed": self.seed,
            "links": [{"vcpu": fl.vcpu, "frames": _from_a_hello(list(fl.ring))} for fl in links],
        }
        path = os.path.join(self.save_dir, f"failure-seed{self.seed}-{int(time.time())}.json")
        with open(path, "w") as fh:
            json.dump(doc, fh, indent=1)
        return path

    async def watch_host(self) -> None:
        while not self.failed:
            if not self.host_alive():
                self.fail("the host process died", None)
                return
            await trio.sleep(0.05)

    async def run(self) -> dict[str, Any]:
        if self.vcpus < 2:
            raise ValueError("fuzzing needs a host with at least 2 vCPUs (one stays well-behaved)")
        fuzzers = self.vcpus - 1
        self.links = [
            FuzzLink(self, v, self.messages // fuzzers + (1 if v <= self.messages % fuzzers else 0))
            for v in range(1, self.vcpus)
        ]
        good = WellBehavedProcess(self)
        async with trio.open_nursery() as nursery:
            await good.run(nursery)
            nursery.start_soon(self.watch_host)
            await trio.sleep(BEFORE_S)
            await good.tell("during")
            t0 = monotonic_ns()
            async with trio.open_nursery() as inner:
                for fl in self.links:
                    inner.start_soon(fl.run)
            elapsed = monotonic_ns() - t0
            await good.stop()
            nursery.cancel_scope.cancel()
        before, during = good.result["before"], good.result["during"]
        sent = sum(self.stats.sent[k] for k in ("valid", "broken", "mutated"))
        return {
            "messages": sent,
            "hellos": self.stats.sent["hello"],
            "by_kind": {k: self.stats.sent[k] for k in ("valid", "broken", "mutated")},
            "seconds": round(elapsed / 1e9, 3),
            "messages_per_s": round(sent / (elapsed / 1e9), 1) if elapsed else None,
            "sessions": self.stats.sessions,
            "answers": dict(sorted(self.stats.answers.items())),
            "failures": self.stats.failures,
            "saved": self.saved,
            "notes": self.notes,
            "well_behaved": {
                "exits_before": len(before),
                "p50_before_us": _us(percentile(before, 50)),
                "p99_before_us": _us(percentile(before, 99)),
                "exits_during": len(during),
                "p50_during_us": _us(percentile(during, 50)),
                "p99_during_us": _us(percentile(during, 99)),
                "wrong_answers": good.result["wrong"],
            },
        }


def _us(ns: int | None) -> float | None:
    return None if ns is None else round(ns / 1000, 1)


# ---------------------------------------------------------------------- replay


async def replay(url: str, token: bytes, doc: dict[str, Any]) -> list[str]:
    """Send a saved failure's frames again (hellos carry this run's token); returns the
    failures seen: INTERNAL errors, or a host that stops answering."""
    problems: list[str] = []

    def watch(data: bytes) -> None:
        with contextlib.suppress(ProtocolError):
            msg = decode(data, DEFAULT_MAX_MESSAGE).msg
            if isinstance(msg, m.Error) and msg.code == ErrorCode.INTERNAL:
                problems.append(f"error INTERNAL: {msg.reason}")

    async with trio.open_nursery() as nursery:
        for entry in doc["links"]:
            # session by session, each from a new socket, as the fuzzer sent them
            for frames in _sessions(entry["frames"], token):
                conn = _Conn(link_url(url, entry["vcpu"]), watch)
                await conn.open(nursery)
                for data in frames:
                    conn.send([data])
                    await trio.sleep(0.001)
                await trio.sleep(0.15)
                conn.close()
        good = WellBehaved(url, token, problems.append)
        with trio.move_on_after(5):
            if await good.hello(nursery):
                await good.exit_once()
        if not good.phase:
            problems.append("the host did not answer a well-behaved exit after the replay")
        good.conn.close()
        nursery.cancel_scope.cancel()
    return problems


def _from_a_hello(frames: list[str]) -> list[str]:
    """The saved frames from the first hello on (a replay starts with a session)."""
    for i, text in enumerate(frames):
        with contextlib.suppress(ProtocolError):
            if isinstance(decode(bytes.fromhex(text), 1 << 30).msg, m.Hello):
                return frames[i:]
    return frames


def _sessions(frames: list[str], token: bytes) -> list[list[bytes]]:
    """Saved frames cut into sessions at each fresh hello; hellos signed with ``token``
    (a repeated hello, sent while no welcome came, stays in its session)."""
    sessions: list[list[bytes]] = []
    for text in frames:
        data = bytes.fromhex(text)
        hello = None
        with contextlib.suppress(ProtocolError):
            frame = decode(data, 1 << 30)
            if isinstance(frame.msg, m.Hello):
                hello = m.Hello(**{**_fields(frame.msg), "token": token})
                data = encode(hello, frame.seq, frame.ack)
        repeated = (
            hello is not None
            and sessions
            and sessions[-1]
            and all(_is_hello(d) for d in sessions[-1])
        )
        if hello is not None and not repeated or not sessions:
            sessions.append([])
        sessions[-1].append(data)
    return sessions


def _is_hello(data: bytes) -> bool:
    try:
        return isinstance(decode(data, 1 << 30).msg, m.Hello)
    except ProtocolError:
        return False


def _fields(msg: m.Message) -> dict[str, Any]:
    from dataclasses import fields

    return {f.name: getattr(msg, f.name) for f in fields(msg)}


# ---------------------------------------------------------------------- main


def fuzz_main(args: Any) -> int:
    from vtick.host.conformance.main import check_outputs, host_spec
    from vtick.host.conformance.target import HostProcess, TargetError

    args.mutate = []
    try:
        spec = host_spec(args)
    except ValueError as exc:
        print(f"vtick fuzz: {exc}", file=sys.stderr)
        return 2
    problem = check_outputs([args.json])
    doc: dict[str, Any] | None = None
    if args.replay:
        try:
            with open(args.replay) as fh:
                doc = json.load(fh)
            if doc is None or doc.get("vtick_fuzz_failure") != 1:
                raise ValueError("not a vtick fuzz failure file")
        except (OSError, ValueError) as exc:
            problem = f"--replay {args.replay}: {exc}"
    if problem:
        print(f"vtick fuzz: {problem}", file=sys.stderr)
        return 2

    async def run() -> dict[str, Any]:
        async with trio.open_nursery() as nursery:
            host: HostProcess | None = None
            fuzzer: Fuzzer | None = None
            try:
                url = spec.connect or ""
                vcpus = 4
                if spec.started_by_us:
                    host = HostProcess(spec, vcpus, 86400)
                    await host.start(nursery)
                    url = host.url
                if doc is not None:
                    problems = await replay(url, spec.token, doc)
                    result: dict[str, Any] = {"replayed": args.replay, "failures": problems}
                else:
                    if not spec.started_by_us:
                        vcpus = await _probe_vcpus(url, spec.token)
                    fuzzer = Fuzzer(url, spec.token, vcpus, args.messages, args.seed, args.save)
                    if host is not None:
                        proc = host.proc
                        fuzzer.host_alive = lambda: proc is not None and proc.returncode is None
                    result = await fuzzer.run()
            finally:
                if host is not None:
                    await host.stop()
            if host is not None:
                bugs = sum(v.get("host_bugs", 0) for v in (host.results or {}).get("vcpus", []))
                result["host_bugs"] = bugs
                if bugs:
                    result["failures"] = [
                        *result["failures"],
                        f"the host recorded {bugs} host bugs",
                    ]
                if host.results is None:
                    tail = " | ".join(line for _, line in host.log[-3:])
                    reason = f"the host wrote no results when it was stopped: {tail}"
                    result["failures"] = [*result["failures"], reason]
                    if fuzzer is not None and result.get("saved") is None:
                        # the culprit was sent at any time: keep every link's last frames
                        result["saved"] = fuzzer.save(reason, None)
            nursery.cancel_scope.cancel()
            return result

    try:
        result = trio.run(run)
    except (TargetError, ValueError) as exc:
        print(f"vtick fuzz: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    text = json.dumps(result, indent=1)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    print(text)
    return 1 if result["failures"] else 0


async def _probe_vcpus(url: str, token: bytes) -> int:
    """The vCPU count of a running host, from vCPU 0's welcome (then a goodbye)."""
    got: list[m.Welcome] = []

    def on_frame(data: bytes) -> None:
        with contextlib.suppress(ProtocolError):
            msg = decode(data, DEFAULT_MAX_MESSAGE).msg
            if isinstance(msg, m.Welcome):
                got.append(msg)

    async with trio.open_nursery() as nursery:
        conn = _Conn(link_url(url, 0), on_frame)
        await conn.open(nursery)
        hello = m.Hello(version=1, features=0x1F, vcpu=0, token=token, pid=os.getpid())
        with trio.move_on_after(5):
            while not got:
                conn.send([encode(hello, 0, 0)])
                await trio.sleep(0.2)
        if got:
            conn.send([encode(m.Goodbye(), 1, 0)])
            await trio.sleep(0.05)
        conn.close()
        nursery.cancel_scope.cancel()
    if not got:
        raise ValueError(f"{url}: no welcome on vCPU 0 within 5 s")
    return got[0].vcpus


if __name__ == "__main__":  # the well-behaved vCPU's process
    if len(sys.argv) != 3 or sys.argv[1] != "well-behaved":
        sys.exit("usage: python -m vtick.host.conformance.fuzz well-behaved URL")
    sys.exit(_child_main(sys.argv[2]))
