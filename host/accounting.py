"""Host-side exit accounting: per vCPU, how many exits of each kind and what they cost.

Kinds are the exit message kinds (``hypercall``, ``mmio-write``, ...); reasons refine
them the way KVM's ``kvm_exit``/``kvm_msr``/``kvm_hypercall`` tracepoints do (which MSR,
which hypercall number, which port or guest-physical address), so a run can be compared
with a host trace of the same workload.  Handling time is measured around the handler
by the caller; this module only adds it up, and keeps an HDR histogram of it per kind:
a mean is moved by one exit that took seconds (a host stopped mid-exit), a median is
not, and ``vtick run`` ranks paths by the median (host/lab/metrics.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from vtick.proto import messages as m

__all__ = ["ExitAccount", "ExitAccounting", "exit_reason"]


def exit_reason(msg: m.Message) -> str:
    """A short, trace-like description of what an exit touched."""
    if isinstance(msg, m.ExitHypercall):
        return f"hypercall {msg.nr:#x}"
    if isinstance(msg, m.ExitMsrRead):
        return f"rdmsr {msg.msr:#x}"
    if isinstance(msg, m.ExitMsrWrite):
        return f"wrmsr {msg.msr:#x}"
    if isinstance(msg, m.ExitMmioRead):
        return f"mmio read {msg.gpa:#x}"
    if isinstance(msg, m.ExitMmioWrite):
        return f"mmio write {msg.gpa:#x}"
    if isinstance(msg, m.ExitPioIn):
        return f"in {msg.port:#x}"
    if isinstance(msg, m.ExitPioOut):
        return f"out {msg.port:#x}"
    return msg.RULE.removeprefix("exit-")


@dataclass(slots=True)
class ExitAccount:
    count: int = 0
    host_ns_total: int = 0
    host_ns_max: int = 0
    modeled_ns_total: int = 0  # added by an exit-cost profile (0 without one)

    def add(self, host_ns: int, modeled_ns: int = 0) -> None:
        self.count += 1
        self.host_ns_total += host_ns
        self.modeled_ns_total += modeled_ns
        if host_ns > self.host_ns_max:
            self.host_ns_max = host_ns

    def as_dict(self) -> dict[str, int]:
        return {
            "count": self.count,
            "host_ns_total": self.host_ns_total,
            "host_ns_max": self.host_ns_max,
            "modeled_ns_total": self.modeled_ns_total,
        }


@dataclass
class ExitAccounting:
    """Exits of one vCPU by kind and by reason."""

    by_kind: dict[str, ExitAccount] = field(default_factory=dict)
    by_reason: dict[str, ExitAccount] = field(default_factory=dict)
    #: handling time per kind, 1 ns .. 60 s at 2 significant digits (1 %)
    hist_by_kind: dict[str, HdrHistogram] = field(default_factory=dict)

    def record(self, msg: m.Message, host_ns: int, modeled_ns: int = 0) -> None:
        kind = m.EXIT_KIND_NAMES[type(msg)]
        self.by_kind.setdefault(kind, ExitAccount()).add(host_ns, modeled_ns)
        self.by_reason.setdefault(exit_reason(msg), ExitAccount()).add(host_ns, modeled_ns)
        hist = self.hist_by_kind.get(kind)
        if hist is None:
            hist = self.hist_by_kind[kind] = HdrHistogram(1, 60_000_000_000, 2)
        hist.record_value(min(max(host_ns, 1), 60_000_000_000))

    def kinds(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for kind, account in sorted(self.by_kind.items()):
            out[kind] = dict(account.as_dict())
            hist = self.hist_by_kind.get(kind)
            if hist is not None:
                out[kind]["host_ns_hdr"] = hist.encode().decode("ascii")
        return out

    def reasons(self) -> dict[str, Any]:
        return {k: a.as_dict() for k, a in sorted(self.by_reason.items())}
