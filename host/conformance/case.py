"""What a conformance case is: an id tied to a rule, a level, a script, checks, an outcome.

Theory of operation
-------------------
A case is a generator, written like the guest's kernel routines (``guest/cpu.py``): it
*yields* the operations it needs (:class:`Session`, :class:`Exit`, :class:`SendRaw`,
:class:`Await`, ...) and receives what came back.  The case never touches a socket or a
clock: the runner at the edge (``vtick.host.conformance.runner``) performs each
operation on real Pair0 sockets and sends the result back into the generator, so a case
is pure, replayable with canned answers in a test, and printable as evidence.

A case judges with :meth:`Ctx.check`: each check names what it looked at, what was
expected and what was observed, and every check is kept as evidence whether it passed
or not.  The outcome is decided by :func:`judge` from the checks and the case's level,
as h2spec and Autobahn|Testsuite do (``tooling-anchors.md`` section 3):

* ``pass``: every check held;
* ``fail``: a check of a MUST case failed (or of a SHOULD case under ``--strict``);
* ``non-strict``: a check of a SHOULD or MAY case failed (a visible deviation that
  does not break interoperation);
* ``unsupported``: the case needs a feature the host did not offer in its welcome
  (:class:`Unsupported`), or a capability the target cannot show (a host started by
  someone else has no observable exit status);
* ``error``: the harness failed (an exception in the case, a socket that could not be
  opened), which says nothing about the implementation (XTF's Error vs Failure).

An operation that times out is not an error: it returns ``None`` and the case checks it,
so "the host never answered" is the implementation's failure, as h2spec reports it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from vtick.proto import messages as m
from vtick.proto.abi import Feature

__all__ = [
    "ALL_FEATURES",
    "Abort",
    "HostEnd",
    "Registry",
    "describe",
    "Arrival",
    "Await",
    "Case",
    "CaseResult",
    "Check",
    "Closed",
    "Collect",
    "Ctx",
    "Drop",
    "Exit",
    "ExitDone",
    "AwaitReply",
    "Goodbye",
    "Hello",
    "HelloAnswer",
    "HoldAcks",
    "Leave",
    "Level",
    "Mark",
    "Now",
    "Redial",
    "Op",
    "Outcome",
    "Pause",
    "Script",
    "Send",
    "SendRaw",
    "Session",
    "Unsupported",
    "judge",
    "select",
]

ALL_FEATURES = int(
    Feature.PVCLOCK | Feature.PV_TIMER | Feature.VMI | Feature.PV_EOI | Feature.PV_SEND_IPI
)


class Level(StrEnum):
    """RFC 2119 level of the rule a case checks."""

    MUST = "MUST"
    SHOULD = "SHOULD"
    MAY = "MAY"


class Outcome(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    NON_STRICT = "non-strict"
    UNSUPPORTED = "unsupported"
    ERROR = "error"


class Unsupported(Exception):
    """Raised by a case whose feature or capability the target does not have."""


class Abort(Exception):
    """Raised by a case that cannot go on after a failed check (the check is recorded)."""


# ---------------------------------------------------------------------- what comes back


@dataclass(frozen=True, slots=True)
class Arrival:
    """One frame a peer received: ``t`` in the host's clock domain (ns)."""

    index: int
    t: int
    msg: m.Message | None
    seq: int
    ack: int
    data: bytes
    #: a sequenced frame whose number was already delivered (a retransmission)
    dup: bool = False
    #: why it did not decode, if it did not
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class ExitDone:
    """An exit and its answer.  ``reply`` is None when none came within the timeout."""

    seq: int
    sent: int
    reply: m.ExitReply | None
    replied: int | None
    #: host frames that arrived after the exit was sent and before its reply
    during: tuple[Arrival, ...]
    #: the exit's frame as it went on the wire (to replay it)
    frame: bytes = b""
    #: the reply frame's envelope: its own number and its cumulative ack
    reply_seq: int | None = None
    reply_ack: int | None = None

    @property
    def value(self) -> int | None:
        return None if self.reply is None else self.reply.value

    @property
    def fault(self) -> int | None:
        return None if self.reply is None else self.reply.fault

    def injected_before_reply(self) -> list[int]:
        return [a.msg.vector for a in self.during if isinstance(a.msg, m.Inject)]


@dataclass(frozen=True, slots=True)
class HelloAnswer:
    """The answer to a hello: a welcome, refuse or error, or None (no answer)."""

    msg: m.Message | None
    t: int | None
    #: the host closed the pipe after answering (within the wait)
    closed: bool


# ---------------------------------------------------------------------- operations


@dataclass(frozen=True, slots=True)
class Session:
    """Open a fresh session on ``vcpu`` (ending the peer's previous one cleanly first).

    Returns the :class:`~vtick.proto.messages.Welcome`, or None if none came.
    """

    vcpu: int
    features: int = ALL_FEATURES
    version: int = 1
    peer: int = 0


@dataclass(frozen=True, slots=True)
class Hello:
    """Send one hello exactly as given and wait for its answer (:class:`HelloAnswer`).

    A fresh welcome becomes the peer's session; a resumed one resumes the peer's link.
    ``token=None`` is the run's token; ``vcpu_field=None`` is ``vcpu``.
    """

    vcpu: int
    features: int = ALL_FEATURES
    version: int = 1
    token: bytes | None = None
    vcpu_field: int | None = None
    resume: int | None = None
    ack: int = 0
    timeout_ms: int = 1000
    #: send the peer's previous hello again (same process: same pid, same link)
    repeat: bool = False
    peer: int = 0


@dataclass(frozen=True, slots=True)
class Exit:
    """Send an exit on the peer's session.  ``wait``: return an :class:`ExitDone`;
    otherwise return the exit's sequence number at once (see :class:`AwaitReply`)."""

    vcpu: int
    msg: m.Message
    wait: bool = True
    timeout_ms: int = 2000
    peer: int = 0


@dataclass(frozen=True, slots=True)
class AwaitReply:
    """Wait for the reply to exit ``seq`` (an :class:`ExitDone`, reply None on timeout)."""

    vcpu: int
    seq: int
    timeout_ms: int = 2000
    peer: int = 0


@dataclass(frozen=True, slots=True)
class Send:
    """Send a message on the peer's session through its link; returns its number (0 for
    a control message)."""

    vcpu: int
    msg: m.Message
    peer: int = 0


@dataclass(frozen=True, slots=True)
class Drop:
    """Number a sequenced message on the peer's link but lose it (never put it on the
    wire); returns the frame.  The link retransmits it like any lost frame."""

    vcpu: int
    msg: m.Message
    peer: int = 0


@dataclass(frozen=True, slots=True)
class SendRaw:
    """Put bytes on the peer's pipe as they are, outside any link."""

    vcpu: int
    data: bytes
    peer: int = 0


@dataclass(frozen=True, slots=True)
class Await:
    """The first frame after the peer's cursor whose message is one of ``kinds`` (and
    whose :class:`Arrival` passes ``match``), waiting up to ``timeout_ms``; None if none
    came.  Unrelated frames are skipped, not consumed (h2spec #126: interleaved frames
    must not break a case)."""

    vcpu: int
    kinds: tuple[type[m.Message], ...]
    timeout_ms: int = 1000
    match: Callable[[Arrival], bool] | None = None
    include_dups: bool = False
    peer: int = 0


@dataclass(frozen=True, slots=True)
class Collect:
    """Every frame of ``kinds`` (all kinds if empty) arriving in the next ``ms``."""

    vcpu: int
    ms: int
    kinds: tuple[type[m.Message], ...] = ()
    include_dups: bool = False
    peer: int = 0


@dataclass(frozen=True, slots=True)
class Mark:
    """Move the peer's cursor past everything received so far."""

    vcpu: int
    peer: int = 0


@dataclass(frozen=True, slots=True)
class Now:
    """The current time in the host's clock domain (ns)."""


@dataclass(frozen=True, slots=True)
class Pause:
    """Let ``ms`` pass (only to open a window in which something must *not* happen)."""

    ms: int


@dataclass(frozen=True, slots=True)
class Closed:
    """Wait until the host closes the peer's current pipe; True if it did in time."""

    vcpu: int
    timeout_ms: int = 1000
    peer: int = 0


@dataclass(frozen=True, slots=True)
class Leave:
    """The peer's process leaves: its socket closes without a goodbye.  The next
    operation on this peer dials from a new socket (a new process)."""

    vcpu: int
    peer: int = 0


@dataclass(frozen=True, slots=True)
class Redial:
    """The peer's pipe is replaced: the same process closes its socket and dials again,
    keeping its session and link state (to resume it with a :class:`Hello`)."""

    vcpu: int
    peer: int = 0


@dataclass(frozen=True, slots=True)
class Goodbye:
    """End the peer's session cleanly (goodbye, the host's goodbye, the final ack);
    returns True if the host said goodbye."""

    vcpu: int
    peer: int = 0


@dataclass(frozen=True, slots=True)
class HostEnd:
    """Wait for the host process to end (only for a host the runner started).

    Returns ``(exit status, results ok)``; None for either when not observable.
    """

    timeout_ms: int = 5000


@dataclass(frozen=True, slots=True)
class HoldAcks:
    """Stop (or resume) sending bare acks on the peer's link, so host frames stay
    unacknowledged (retransmission cases)."""

    vcpu: int
    hold: bool = True
    peer: int = 0


Op = (
    Session
    | Hello
    | Exit
    | AwaitReply
    | Send
    | Drop
    | SendRaw
    | Await
    | Collect
    | Mark
    | Now
    | Pause
    | Closed
    | Leave
    | Redial
    | Goodbye
    | HoldAcks
    | HostEnd
)
#: a case script: yields operations, receives their results
Script = Generator[Op, Any, None]


# ---------------------------------------------------------------------- checks and context


@dataclass(frozen=True, slots=True)
class Check:
    what: str
    ok: bool
    expected: str
    observed: str


@dataclass
class Ctx:
    """What a case may know about the target, and where its evidence goes.

    Args:
        vcpus: the number of vCPU links the target serves.
        features: the feature bits the target offered in its first welcome.
        capabilities: things the runner can observe about the target (``"exit-status"``
            when it started the host itself).
    """

    vcpus: int
    features: int = ALL_FEATURES
    capabilities: frozenset[str] = frozenset()
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def check(self, what: str, ok: bool, expected: Any, observed: Any) -> bool:
        """Record one check (kept as evidence whether it held or not)."""
        self.checks.append(Check(what, bool(ok), _show(expected), _show(observed)))
        return bool(ok)

    def equal(self, what: str, expected: Any, observed: Any) -> bool:
        return self.check(what, expected == observed, expected, observed)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def require(self, feature: int, offered: int | None = None) -> None:
        """Raise :class:`Unsupported` unless the target offered ``feature``."""
        have = self.features if offered is None else offered
        if not have & feature:
            raise Unsupported(f"the host did not offer feature {Feature(feature)!r}")

    def require_vcpus(self, n: int) -> None:
        if self.vcpus < n:
            raise Unsupported(f"needs {n} vCPUs, the host serves {self.vcpus}")

    def require_capability(self, name: str, why: str) -> None:
        if name not in self.capabilities:
            raise Unsupported(why)

    @property
    def failed(self) -> bool:
        return any(not c.ok for c in self.checks)


def _show(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 9:
        return f"{value:#x}" if value >= 0 else f"-{-value:#x}"
    if isinstance(value, m.Message):
        return describe(value)
    return str(value)


def describe(msg: m.Message) -> str:
    """A message as ``rule {field: value, ...}`` with integers above 9 in hex."""
    from dataclasses import fields

    parts = []
    for f in fields(msg):
        value = getattr(msg, f.name)
        if value is None:
            continue
        if isinstance(value, bytes):
            shown = f"h'{value[:24].hex()}{'...' if len(value) > 24 else ''}'"
        elif isinstance(value, int) and not isinstance(value, bool):
            shown = _show(value)
        else:
            shown = repr(value)
        parts.append(f"{f.name}: {shown}")
    return f"{msg.RULE} {{{', '.join(parts)}}}"


# ---------------------------------------------------------------------- cases


@dataclass(frozen=True, slots=True)
class Case:
    """One conformance case.

    Args:
        id: stable id (``lapic.timer.tdcr.3``); its first part names the suite.
        title: one line saying what is checked.
        level: MUST, SHOULD or MAY.
        rule: where the rule is written (``protocol.md §4.3``, an SDM section, a KVM
            function), so a failure quotes its source.
        script: the generator.
        fixture: ``"shared"`` runs on the suite's host; ``"own-host"`` gets a fresh,
            short-lived host of one vCPU whose run ends during the case (shutdown cases).
    """

    id: str
    title: str
    level: Level
    rule: str
    script: Callable[[Ctx], Script]
    fixture: str = "shared"

    @property
    def suite(self) -> str:
        return self.id.split(".")[0]


@dataclass
class CaseResult:
    case: Case
    outcome: Outcome
    reason: str
    checks: list[Check]
    notes: list[str]
    #: the wire log: every frame any peer sent or received while the case ran
    frames: list[dict[str, Any]]
    duration_ns: int


def judge(level: Level, checks: Iterable[Check], strict: bool) -> tuple[Outcome, str]:
    """The outcome of a case that ran to its end (no exception): see the module text."""
    failed = [c for c in checks if not c.ok]
    if not failed:
        return Outcome.PASS, ""
    first = failed[0]
    reason = f"{first.what}: expected {first.expected}, observed {first.observed}"
    if level is Level.MUST or (level is Level.SHOULD and strict):
        return Outcome.FAIL, reason
    return Outcome.NON_STRICT, reason


def select(cases: Iterable[Case], patterns: str | None) -> list[Case]:
    """The cases whose id matches one of the comma-separated glob ``patterns`` (a bare
    prefix such as ``lapic.timer`` matches everything under it); all when None.

    Raises:
        ValueError: a pattern that matches no case (one line naming it).
    """
    cases = list(cases)
    if not patterns:
        return cases
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen: list[Case] = []
    for pattern in wanted:
        hits = [
            c
            for c in cases
            if fnmatch.fnmatchcase(c.id, pattern) or c.id.startswith(pattern.rstrip(".") + ".")
        ]
        if not hits:
            raise ValueError(f"--cases: {pattern!r} matches no case")
        chosen += [c for c in hits if c not in chosen]
    return [c for c in cases if c in chosen]


class Registry:
    """An ordered collection of cases; ids are unique."""

    def __init__(self) -> None:
        self.cases: list[Case] = []

    def add(
        self,
        id: str,
        title: str,
        level: Level,
        rule: str,
        script: Callable[[Ctx], Script],
        fixture: str = "shared",
    ) -> None:
        if any(c.id == id for c in self.cases):
            raise ValueError(f"case {id} defined twice")
        self.cases.append(Case(id, title, level, rule, script, fixture))

    def case(
        self, id: str, title: str, level: Level, rule: str, fixture: str = "shared"
    ) -> Callable[[Callable[[Ctx], Script]], Callable[[Ctx], Script]]:
        """Decorator form of :meth:`add`."""

        def register(script: Callable[[Ctx], Script]) -> Callable[[Ctx], Script]:
            self.add(id, title, level, rule, script, fixture)
            return script

        return register
