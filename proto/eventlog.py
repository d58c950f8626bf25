"""The chaos event log: compact records both processes write and the orchestrator reads.

Theory of operation
-------------------
A chaos run (``vtick chaos``, ``host/chaos/``) keeps the full history of every timer,
IPI, csd and exit, not a window.  Each process writes its own log file in the run
directory, and the orchestrator merges them into ``history.jsonl`` after the run.  The
record kinds and their fields are a fact both sides share, so they live here.

* **File layout.**  A 4096-byte header (magic ``VTEVLOG1``, the record count as a
  little-endian s64 at offset 8, a JSON description of the writer at offset 24 with its
  length at offset 16), then records of :data:`WORDS` little-endian s64 each:
  ``[kind, time, a, b, c, d, e, f]``.  Guest records carry guest ktime, host records
  host CLOCK_MONOTONIC ns.
* **Crash-proof and cheap.**  The file is ``mmap``-ed: a record is one ``pack_into``
  into the mapping and one store of the count, no system call and no per-record object
  (the hot path of a vCPU stays what ``guest/recorder.py`` made it).  The kernel keeps
  the mapped pages when the process is SIGKILLed, so a crashed vCPU's records up to its
  last instruction survive: what the dead process had armed is accounted for.  A record
  is counted only after its words are written, so a torn record is never read.
* **Patching.**  An exit's round trip and an interrupt's handling time are known only
  later: :meth:`EventLog.add` returns the record's slot and :meth:`EventLog.patch`
  fills a field in place (0 until then: an exit never answered keeps ``rtt == 0``).
* **Nothing in the file system.**  The orchestrator creates each log as an anonymous
  file (``memfd_create``, :func:`anonymous_fd`) and hands its descriptor to the process
  that writes it; it reads it back through its own descriptor when the process is gone.
  No log, however the run ends (even with the orchestrator SIGKILLed), is left behind.
* **The plan.**  The orchestrator hands each process its part of the nemesis schedule
  (its log's descriptor ``record_fd``, or a path ``record``; preemption windows; link
  faults) as JSON in ``$VTICK_CHAOS_PLAN`` (:func:`load_plan`), as the launcher hands
  over the run directory in ``$VTICK_RUN_DIR``.  Without it nothing is recorded and
  nothing changes.

Memory: :data:`WORDS` * 8 = 64 bytes per record in the page cache; the file grows by
doubling (``mmap.resize``), starting at :data:`INITIAL_RECORDS`.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator
from typing import Any

__all__ = [
    "EventLog",
    "LogContents",
    "read_log",
    "load_plan",
    "anonymous_fd",
    "record_target",
    "PLAN_ENV",
    "WORDS",
    # guest record kinds
    "G_SESSION",
    "G_CLOCK",
    "G_ARM",
    "G_CANCEL",
    "G_FIRE",
    "G_EXIT",
    "G_IRQ",
    "G_IPI_SEND",
    "G_CSD_QUEUE",
    "G_CSD_RUN",
    "G_CSD_WAIT",
    "G_STALL",
    "G_WINDOW",
    "G_LINK",
    "G_START",
    "G_END",
    # host record kinds
    "H_RUN_START",
    "H_SESSION",
    "H_LAPIC_BASE",
    "H_EXIT",
    "H_TARM",
    "H_TFIRE",
    "H_IPI",
    "H_INJECT",
    "H_INJECT_IPI",
    "H_LINK_ERROR",
    "H_RUN_END",
    "H_STALL",
    "H_MIGRATE_OUT",
    "H_MIGRATE_IN",
    "H_MIGRATE_FAIL",
    # field values
    "CANCEL_CANCELLED",
    "CANCEL_REPLACED",
    "CSD_OK",
    "CSD_ERROR",
    "CSD_CUT_OFF",
    "IPI_ACCEPTED",
    "IPI_COALESCED",
    "IPI_NOT_ACCEPTED",
    "SESSION_NEW",
    "SESSION_RESUMED",
    "LINK_FAULTS",
    "LINK_DIRECTIONS",
]

PLAN_ENV = "VTICK_CHAOS_PLAN"
MAGIC = b"VTEVLOG1"
HEADER_BYTES = 4096
WORDS = 8
RECORD_BYTES = WORDS * 8
INITIAL_RECORDS = 1 << 14

_RECORD = struct.Struct("<8q")
_COUNT = struct.Struct("<q")

# ---------------------------------------------------------------- guest records
# time = guest ktime (ns) unless said otherwise; ids are per vCPU process

#: [kind, 0, session, tsc_khz, tsc_epoch (host ns), clock offset ns, vcpu, pid]
G_SESSION = 1
#: [kind, 0, version, tsc_timestamp, system_time, tsc_to_system_mul, tsc_shift, flags]:
#: the kvmclock parameters the guest reads ktime through from now on
G_CLOCK = 2
#: [kind, t, arm id, expires]: hrtimer_start (each arming gets its own id)
G_ARM = 3
#: [kind, t, arm id, 0, CANCEL_*]: hrtimer_cancel, or a re-start replacing it
G_CANCEL = 4
#: [kind, ran_at, arm id, expires, programmed_at, irq seq (0: ran without an interrupt)]
G_FIRE = 5
#: [kind, sent, exit seq, exit kind index, rtt (0: never answered), host_ns,
#:  arm id being programmed (0), ipi id being sent (0)]
G_EXIT = 6
#: [kind, arrived, inject seq, vector, handled (0: never), host_time, pv_eoi]
G_IRQ = 7
#: [kind, t, ipi id, vector, target bitmask]
G_IPI_SEND = 8
#: [kind, t, csd id, target, wait]
G_CSD_QUEUE = 9
#: [kind, t, sender, csd id]: this vCPU ran a csd
G_CSD_RUN = 10
#: [kind, t, csd id, target, CSD_*]: the sender's csd_lock_wait ended
G_CSD_WAIT = 11
#: [kind, stopped at, gap ns]: the watchdog saw this process not scheduled
G_STALL = 12
#: [kind, start, end, preemption point index (catalog.PREEMPTION_POINTS)]
G_WINDOW = 13
#: [kind, t, LINK_FAULTS index, LINK_DIRECTIONS index, frame seq (-1: unknown)]
G_LINK = 14
#: [kind, t]: the workload started
G_START = 15
#: [kind, t, EOIs performed, PV EOIs not yet reported, interrupts handled]
G_END = 16

# ---------------------------------------------------------------- host records
# time = host CLOCK_MONOTONIC ns

#: [kind, t]: every vCPU connected: the run's clock starts
H_RUN_START = 101
#: [kind, t, vcpu, session, pid, SESSION_*, lost lo, lost hi]
H_SESSION = 102
#: [kind, t, vcpu, LAPIC EOIs so far, injections so far]: counters at a session start
H_LAPIC_BASE = 103
#: [kind, received, vcpu, exit seq, exit kind index, handling ns]
H_EXIT = 104
#: [kind, t, vcpu, origin exit seq, host expiry, timer index]: a guest exit armed it
H_TARM = 105
#: [kind, t, vcpu, origin exit seq, host expiry, timer index]: it fired
H_TFIRE = 106
#: [kind, t, source, source generation, source exit seq, target, vector, IPI_*]
H_IPI = 107
#: [kind, sent, vcpu, inject seq, vector, origin exit seq (0), IPIs it carries]
H_INJECT = 108
#: [kind, t, target, inject seq, source, source generation, source exit seq]
H_INJECT_IPI = 109
#: [kind, t, vcpu]: a link failed (LinkError): loss reported, not silent
H_LINK_ERROR = 110
#: [kind, t]: the run's clock ran out: shutdown goes out
H_RUN_END = 111
#: [kind, stopped at, gap ns]: the host's watchdog saw its process not scheduled (or
#: its event loop busy) for that long
H_STALL = 112
#: [kind, t, offset ns (destination - source clock)]: issue 13, the source froze the
#: VM for a migration; nothing of it runs on this host after t
H_MIGRATE_OUT = 113
#: [kind, t, offset ns (destination - source clock), source's freeze time]: issue 13,
#: this host restored the VM (t on this host's clock)
H_MIGRATE_IN = 114
#: [kind, t]: issue 13, the move failed at t and the VM runs on at this (source) host
H_MIGRATE_FAIL = 115

CANCEL_CANCELLED = 0
CANCEL_REPLACED = 1
CSD_OK = 0
CSD_ERROR = 1
CSD_CUT_OFF = 2
IPI_ACCEPTED = 1
IPI_COALESCED = 2
IPI_NOT_ACCEPTED = 3
SESSION_NEW = 0
SESSION_RESUMED = 1

#: link faults the shim injects (proto/faultshim.py), by index in G_LINK records
LINK_FAULTS = ("drop", "duplicate", "delay", "reorder", "close")
LINK_DIRECTIONS = ("send", "recv")


class EventLog:
    """An append-only, mmap-backed log of fixed-size integer records.

    Args:
        target: the file to create (truncated if it exists), or the descriptor of one
            (an :func:`anonymous_fd` handed down by the orchestrator).
        header: a JSON-able description of the writer (role, vCPU, pid, ...).
        capacity: records before the first growth.
    """

    def __init__(
        self, target: str | int, header: dict[str, Any], capacity: int = INITIAL_RECORDS
    ) -> None:
        described = json.dumps(header).encode()
        if 24 + len(described) > HEADER_BYTES:
            raise ValueError("event log header too large")
        self.capacity = capacity
        self.count = 0
        if isinstance(target, int):
            self._fd = target
        else:
            self._fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, HEADER_BYTES + capacity * RECORD_BYTES)
        self._mm = mmap.mmap(self._fd, HEADER_BYTES + capacity * RECORD_BYTES)
        self._mm[0:8] = MAGIC
        _COUNT.pack_into(self._mm, 8, 0)
        _COUNT.pack_into(self._mm, 16, len(described))
        self._mm[24 : 24 + len(described)] = described
        self.closed = False

    def add(
        self, kind: int, t: int, a: int = 0, b: int = 0, c: int = 0, d: int = 0, e: int = 0,
        f: int = 0,
    ) -> int:  # fmt: skip
        """Append one record; returns its slot (for :meth:`patch`), -1 once closed."""
        if self.closed:
            return -1
        slot = self.count
        if slot >= self.capacity:
            self._grow()
        _RECORD.pack_into(
            self._mm, HEADER_BYTES + slot * RECORD_BYTES, kind, t, a, b, c, d, e, f
        )  # fmt: skip
        self.count = slot + 1
        _COUNT.pack_into(self._mm, 8, slot + 1)  # counted only once written
        return slot

    def patch(self, slot: int, word: int, value: int) -> None:
        """Set word ``word`` (0..7) of the record in ``slot``."""
        if self.closed or not 0 <= slot < self.count:
            return
        _COUNT.pack_into(self._mm, HEADER_BYTES + slot * RECORD_BYTES + 8 * word, value)

    def _grow(self) -> None:
        self.capacity *= 2
        self._mm.resize(HEADER_BYTES + self.capacity * RECORD_BYTES)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._mm.close()
        os.close(self._fd)


class LogContents:
    """A log as read back: ``header`` (the writer's description) and ``records``."""

    def __init__(self, header: dict[str, Any], records: list[tuple[int, ...]]) -> None:
        self.header = header
        self.records = records

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        return iter(self.records)


def read_log(source: str | int) -> LogContents:
    """Read a log written by :class:`EventLog` (also one whose writer was killed), from a
    path or a descriptor of the same file.

    Raises:
        ValueError: not an event log.
    """
    if isinstance(source, int):
        data = os.pread(source, os.fstat(source).st_size, 0)
    else:
        with open(source, "rb") as fh:
            data = fh.read()
    if len(data) < HEADER_BYTES or data[:8] != MAGIC:
        raise ValueError(f"{source}: not a vtick event log")
    (count,) = _COUNT.unpack_from(data, 8)
    (length,) = _COUNT.unpack_from(data, 16)
    header = json.loads(data[24 : 24 + length])
    end = HEADER_BYTES + count * RECORD_BYTES
    if end > len(data):  # pragma: no cover - a count is stored only after its record
        end = HEADER_BYTES + (len(data) - HEADER_BYTES) // RECORD_BYTES * RECORD_BYTES
    return LogContents(header, list(_RECORD.iter_unpack(data[HEADER_BYTES:end])))


def load_plan() -> dict[str, Any] | None:
    """This process's part of a chaos schedule (``$VTICK_CHAOS_PLAN``: JSON, or the path
    of a JSON file), or None."""
    text = os.environ.get(PLAN_ENV)
    if not text:
        return None
    if not text.lstrip().startswith("{"):
        with open(text) as fh:
            text = fh.read()
    plan = json.loads(text)
    if not isinstance(plan, dict):
        raise ValueError(f"{PLAN_ENV}: not a JSON object")
    return plan


def record_target(plan: dict[str, Any] | None, vcpu: int | None = None) -> str | int | None:
    """Where this process (or this vCPU of it) writes its log: an inherited descriptor
    (``record_fd``, or ``record_fds`` by vCPU) or a path (``record``, ``{vcpu}`` filled
    in); None when the plan asks for none."""
    if not plan:
        return None
    fds = plan.get("record_fds") or {}
    if vcpu is not None and str(vcpu) in fds:
        return int(fds[str(vcpu)])
    if plan.get("record_fd") is not None:
        return int(plan["record_fd"])
    if plan.get("record"):
        return str(plan["record"]).replace("{vcpu}", str(vcpu if vcpu is not None else ""))
    return None


def anonymous_fd(name: str) -> int:
    """A file with no name in any directory (``memfd_create``; elsewhere a temporary file
    unlinked at once), for a log a child writes and its parent reads: nothing to clean up.
    Inheritable, so ``pass_fds`` can hand it down."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create(f"vtick-{name}", 0)
    else:  # pragma: no cover - Linux has memfd_create
        import tempfile

        fd, path = tempfile.mkstemp(prefix="vtick-log-")
        os.unlink(path)
    os.set_inheritable(fd, True)
    return fd
