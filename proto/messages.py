"""Typed messages: a Python view of the rules in ``vtick.cddl``.

Each class names its CDDL rule in ``RULE``; its kind number, its field types and ranges
come from the schema, and ``vtick.proto.codec`` refuses to load if a class's fields and
its rule's members differ.  The envelope (kind, sequence number, acknowledgement) is not
part of these classes: the link layer owns it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

__all__ = [
    "Message",
    "Hello",
    "Welcome",
    "Refuse",
    "Ack",
    "Error",
    "Ping",
    "Pong",
    "Migrate",
    "ExitMmioRead",
    "ExitMmioWrite",
    "ExitMsrRead",
    "ExitMsrWrite",
    "ExitPioIn",
    "ExitPioOut",
    "ExitHypercall",
    "ExitHlt",
    "ExitPause",
    "ExitMessage",
    "EXIT_CLASSES",
    "EXIT_KIND_NAMES",
    "ExitReply",
    "Inject",
    "Pvclock",
    "Shutdown",
    "Csd",
    "CsdDone",
    "CpuOnline",
    "OnlineMask",
    "Report",
    "Trace",
    "Goodbye",
    "MESSAGE_CLASSES",
]


@dataclass(frozen=True, slots=True)
class Message:
    RULE: ClassVar[str] = ""
    #: sequenced kinds consume a sequence number, are acknowledged and retransmitted
    SEQUENCED: ClassVar[bool] = True


# ------------------------------------------------------------------ control kinds


@dataclass(frozen=True, slots=True)
class Hello(Message):
    RULE: ClassVar[str] = "hello"
    SEQUENCED: ClassVar[bool] = False
    version: int
    features: int
    vcpu: int
    token: bytes
    pid: int
    resume: int | None = None


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    RULE: ClassVar[str] = "welcome"
    SEQUENCED: ClassVar[bool] = False
    version: int
    features: int
    vcpu: int
    vcpus: int
    session: int
    max_message: int
    tsc_khz: int
    tsc_epoch: int
    pvclock: dict[str, int]
    workload: str
    seed: int
    params: dict[str, int] = field(default_factory=dict)
    resumed: bool | None = None
    mode: str | None = None
    apic: str | None = None
    hz: int | None = None
    ipi: str | None = None
    trace: bool | None = None


@dataclass(frozen=True, slots=True)
class Refuse(Message):
    RULE: ClassVar[str] = "refuse"
    SEQUENCED: ClassVar[bool] = False
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Ack(Message):
    RULE: ClassVar[str] = "ack"
    SEQUENCED: ClassVar[bool] = False
    resend: bool | None = None


@dataclass(frozen=True, slots=True)
class Error(Message):
    RULE: ClassVar[str] = "error"
    SEQUENCED: ClassVar[bool] = False
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Ping(Message):
    RULE: ClassVar[str] = "ping"
    SEQUENCED: ClassVar[bool] = False
    t: int
    echo: int | None = None
    rx: int | None = None


@dataclass(frozen=True, slots=True)
class Pong(Message):
    RULE: ClassVar[str] = "pong"
    SEQUENCED: ClassVar[bool] = False
    t: int
    host: int


@dataclass(frozen=True, slots=True)
class Migrate(Message):
    RULE: ClassVar[str] = "migrate"
    SEQUENCED: ClassVar[bool] = False
    to: str
    frozen: int


# ------------------------------------------------------------------ exits


@dataclass(frozen=True, slots=True)
class ExitMessage(Message):
    """Base of the exits: synchronous vCPU -> host requests answered by an exit-reply.

    ``pv_eoi`` (keyword-only, on every exit): the vCPU did a paravirtual EOI since its
    previous exit, which the host performs before handling this one.
    """

    pv_eoi: bool | None = field(default=None, kw_only=True)


@dataclass(frozen=True, slots=True)
class ExitMmioRead(ExitMessage):
    RULE: ClassVar[str] = "exit-mmio-read"
    gpa: int
    size: int


@dataclass(frozen=True, slots=True)
class ExitMmioWrite(ExitMessage):
    RULE: ClassVar[str] = "exit-mmio-write"
    gpa: int
    size: int
    value: int


@dataclass(frozen=True, slots=True)
class ExitMsrRead(ExitMessage):
    RULE: ClassVar[str] = "exit-msr-read"
    msr: int


@dataclass(frozen=True, slots=True)
class ExitMsrWrite(ExitMessage):
    RULE: ClassVar[str] = "exit-msr-write"
    msr: int
    value: int


@dataclass(frozen=True, slots=True)
class ExitPioIn(ExitMessage):
    RULE: ClassVar[str] = "exit-pio-in"
    port: int
    size: int


@dataclass(frozen=True, slots=True)
class ExitPioOut(ExitMessage):
    RULE: ClassVar[str] = "exit-pio-out"
    port: int
    size: int
    value: int


@dataclass(frozen=True, slots=True)
class ExitHypercall(ExitMessage):
    RULE: ClassVar[str] = "exit-hypercall"
    nr: int
    args: list[int]


@dataclass(frozen=True, slots=True)
class ExitHlt(ExitMessage):
    RULE: ClassVar[str] = "exit-hlt"


@dataclass(frozen=True, slots=True)
class ExitPause(ExitMessage):
    """A PAUSE-loop exit: the vCPU spins in a wait loop (see the schema)."""

    RULE: ClassVar[str] = "exit-pause"


# ------------------------------------------------------------------ host -> vCPU


@dataclass(frozen=True, slots=True)
class ExitReply(Message):
    RULE: ClassVar[str] = "exit-reply"
    re: int
    value: int
    fault: int
    host_ns: int


@dataclass(frozen=True, slots=True)
class Inject(Message):
    RULE: ClassVar[str] = "inject"
    vector: int
    host_time: int
    pv_eoi: bool | None = None


@dataclass(frozen=True, slots=True)
class Pvclock(Message):
    RULE: ClassVar[str] = "pvclock"
    info: dict[str, int]
    tsc_sync: dict[str, int] | None = None


@dataclass(frozen=True, slots=True)
class Shutdown(Message):
    RULE: ClassVar[str] = "shutdown"
    reason: str


@dataclass(frozen=True, slots=True)
class Csd(Message):
    RULE: ClassVar[str] = "csd"
    src: int
    dst: int
    id: int
    func: str
    info: int
    wait: bool
    sent: int


@dataclass(frozen=True, slots=True)
class CsdDone(Message):
    RULE: ClassVar[str] = "csd-done"
    src: int
    dst: int
    id: int
    ran: int
    error: str | None = None


@dataclass(frozen=True, slots=True)
class CpuOnline(Message):
    """``set_cpu_online``: vCPU ``cpu`` stores its bit in cpu_online_mask (the host's)."""

    RULE: ClassVar[str] = "cpu-online"
    cpu: int


@dataclass(frozen=True, slots=True)
class OnlineMask(Message):
    """cpu_online_mask as the vCPU reads it (layout: ``vtick.proto.cpumask``)."""

    RULE: ClassVar[str] = "online-mask"
    mask: bytes


@dataclass(frozen=True, slots=True)
class Report(Message):
    RULE: ClassVar[str] = "report"
    events: int
    early: int
    spurious: int
    exits: dict[str, int]
    exit_rtt_ns: dict[str, int]
    lateness_hdr: bytes
    lateness_max: int
    duration_ns: int
    mode: str | None = None
    counters: dict[str, int] | None = None
    ipi_hdr: bytes | None = None
    call_hdr: bytes | None = None
    timeline: bytes | None = None


@dataclass(frozen=True, slots=True)
class Trace(Message):
    RULE: ClassVar[str] = "trace"
    exits: bytes | None = None
    irqs: bytes | None = None
    events: bytes | None = None
    calls: bytes | None = None


@dataclass(frozen=True, slots=True)
class Goodbye(Message):
    RULE: ClassVar[str] = "goodbye"


def _defined_here(base: type[Message]) -> tuple[type[Message], ...]:
    # Module globals, not base.__subclasses__(): dataclass(slots=True) replaces each class,
    # and the replaced one lingers among the subclasses until it is garbage-collected.
    return tuple(
        obj
        for obj in globals().values()
        if isinstance(obj, type) and issubclass(obj, base) and obj.RULE
    )


#: every message class, in definition order (each one names a rule in the schema)
MESSAGE_CLASSES: tuple[type[Message], ...] = _defined_here(Message)
EXIT_CLASSES: tuple[type[Message], ...] = _defined_here(ExitMessage)
#: the short name of each exit kind, as results and reports count them ("hypercall", ...)
EXIT_KIND_NAMES: dict[type[Message], str] = {
    cls: cls.RULE.removeprefix("exit-") for cls in EXIT_CLASSES
}
