"""The guest's instructions that trap: exits as values, kernel code as generators.

Guest kernel routines are written as generators that *yield* the exit they need (the
wire message itself: ``ExitMsrWrite``, ``ExitHypercall``, ...) and are resumed with the
host's ``ExitReply``.  That keeps every path of the guest model pure: the vCPU process
drives the generators over the real link, tests drive them with a fake that records each
exit, and the exact exit sequence of a path is something a test can assert.

A routine may also yield a :class:`PreemptionPoint`: a named place where a delay can be
injected from outside (a vCPU preempted between computing a timer delta and writing it,
...).  Drivers resume it at once unless a delay is configured for that name.

    def eoi():
        yield from wrmsr(APIC_EOI_MSR, 0)

    value = yield from rdmsr(0x1B)
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeVar

from vtick.proto import messages as m

__all__ = [
    "KernelOp",
    "PreemptionPoint",
    "GeneralProtection",
    "rdmsr",
    "wrmsr",
    "mmio_read",
    "mmio_write",
    "inb",
    "outb",
    "hypercall",
    "hlt",
    "preemption_point",
    "Udelay",
    "udelay",
    "MemoryWrite",
    "SpinWait",
    "run_to_completion",
]

T = TypeVar("T")

#: A kernel routine: yields exits (each answered with its ExitReply) and preemption points
#: (answered with None), and returns its result.
KernelOp = Generator[Any, Any, T]

_U64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class PreemptionPoint:
    """A named place where the vCPU may be preempted (a delay injected from outside)."""

    name: str


@dataclass(frozen=True, slots=True)
class Udelay:
    """Busy-wait ``ns`` nanoseconds of guest time without an exit (``udelay``)."""

    ns: int


def udelay(ns: int) -> KernelOp[None]:
    yield Udelay(ns)


@dataclass(frozen=True, slots=True)
class MemoryWrite:
    """A store to memory another vCPU reads (a csd, its lock flag): no exit, relayed by
    the host because vtick's vCPUs share no memory."""

    msg: m.Message


@dataclass(frozen=True, slots=True)
class SpinWait:
    """Spin (interrupts enabled, no exit) until another vCPU's store arrives or the guest
    clock reaches ``deadline``; interrupts pending meanwhile are handled first."""

    deadline: int


class GeneralProtection(Exception):  # noqa: N818 - the architectural name
    """The host answered an access with #GP (or another fault vector)."""

    def __init__(self, what: str, vector: int) -> None:
        super().__init__(f"{what}: fault {vector}")
        self.vector = vector


def _check(reply: m.ExitReply, what: str) -> m.ExitReply:
    if reply.fault:
        raise GeneralProtection(what, reply.fault)
    return reply


def rdmsr(msr: int) -> KernelOp[int]:
    reply = yield m.ExitMsrRead(msr=msr)
    return _check(reply, f"rdmsr {msr:#x}").value


def wrmsr(msr: int, value: int) -> KernelOp[None]:
    reply = yield m.ExitMsrWrite(msr=msr, value=value & _U64)
    _check(reply, f"wrmsr {msr:#x}")


def mmio_read(gpa: int, size: int = 4) -> KernelOp[int]:
    reply = yield m.ExitMmioRead(gpa=gpa, size=size)
    return _check(reply, f"mmio read {gpa:#x}").value


def mmio_write(gpa: int, value: int, size: int = 4) -> KernelOp[None]:
    reply = yield m.ExitMmioWrite(gpa=gpa, size=size, value=value & _U64)
    _check(reply, f"mmio write {gpa:#x}")


def inb(port: int) -> KernelOp[int]:
    reply = yield m.ExitPioIn(port=port, size=1)
    return _check(reply, f"in {port:#x}").value & 0xFF


def outb(port: int, value: int) -> KernelOp[None]:
    reply = yield m.ExitPioOut(port=port, size=1, value=value & 0xFF)
    _check(reply, f"out {port:#x}")


def hypercall(nr: int, *args: int) -> KernelOp[int]:
    """``vmcall``: the signed RAX the host returns (negative = -errno)."""
    reply = yield m.ExitHypercall(nr=nr, args=[a & _U64 for a in args])
    value = _check(reply, f"hypercall {nr:#x}").value
    return value - (1 << 64) if value >= 1 << 63 else value


def hlt() -> KernelOp[None]:
    """Halt until an interrupt is pending (the host answers then)."""
    yield m.ExitHlt()


def pause_exit() -> KernelOp[None]:
    """A PAUSE-loop exit: the CPU's pause filter ends a spin with an exit."""
    yield m.ExitPause()


def preemption_point(name: str) -> KernelOp[None]:
    yield PreemptionPoint(name)


def run_to_completion(op: KernelOp[T], answer: Any) -> T:
    """Drive ``op`` synchronously: ``answer(yielded)`` gives each yield its reply.

    For tests and for host-free tools; the vCPU process drives ops over the link.
    """
    try:
        item = next(op)
        while True:
            item = op.send(answer(item))
    except StopIteration as done:
        return done.value
