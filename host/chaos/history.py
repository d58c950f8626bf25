"""One history per chaos run: the processes' event logs merged into ``history.jsonl``.

Theory of operation
-------------------
The history is the single record of what happened in a run; the checkers read nothing
else, so ``vtick analyze`` can re-check a stored run.  :func:`build_history` is pure: it
takes an :class:`~vtick.host.chaos.orchestrator.Execution` (the host's and every vCPU
process's event log, the faults as applied, the processes that ended, the host's
results) and returns the events in host-time order.  Format (``docs/chaos.md``): one
JSON object per line with ``index``, ``time`` (host CLOCK_MONOTONIC ns), ``vcpu`` (None
for the host or the run), ``type`` (``invoke``, ``ok``, ``fail``, ``info``), ``f`` and
``value``.

**Time.**  Guest records carry guest ktime.  They are moved to host ns through the
kvmclock parameters the guest read them with (its ``clock`` records) and the guest TSC
model of its welcome (``TscModel.host_ns_for_ktime``, the same conversion the host uses
to arm a guest deadline), linearised per publication: exact to a few ns.  vCPUs on this
machine share CLOCK_MONOTONIC with the host; on another machine the handshake's offset
is already in the TSC epoch.

**Ids, not times, tie an operation together.**  A timer is ``"<vcpu>.<arm>"`` from
``timer-arm`` to ``timer-fire`` or ``timer-cancel``; a csd ``"<sender>.<id>"`` from
``csd-queue`` to ``csd-run`` to ``csd-wait``; an IPI ``"<sender>.<id>"`` from ``ipi-send``
to ``ipi-deliver`` to ``ipi-handle``.  A restarted vCPU process numbers from 10**9 times
its incarnation, so ids never repeat within a vCPU.  Host records name a guest exit by
(vCPU, generation, link number): the generation is the session's index on that vCPU
(the host resets the vCPU for every new session), and the guest's own exit records say
which timer arming or IPI that exit was for.  An injection is joined to its arrival on
the guest the same way (its link number in that session).

**Two hosts (a live migration, issue 13).**  An Execution may hold several host logs:
the host that started the VM, then the host(s) it moved to.  :func:`merge_host_logs`
makes one record stream of them, on the first host's clock: a destination's times (and
the host expiries in its timer records) are moved back by the clock offset its
``H_MIGRATE_IN`` record carries (destination - source; 0 on one machine).  Guest
records need no move: a vCPU keeps the source's clock domain across the move.  The
stream is the source's records, then the destination's, so the builder's one pass
keeps the session generations continuous: the destination resumes the same sessions
(``SESSION_RESUMED``), and only a new process after the move starts a new generation.
The move becomes ``migrate-out`` (the freeze), ``migrate-in`` (the restore) and, when
it failed, ``migrate-failed`` (the VM ran on at the source: the destination's log, if it
restored anything, is left out, as no vCPU ever ran there) info events; the checkers
take the blackout from them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from vtick.host.chaos.orchestrator import Execution
from vtick.proto import eventlog as ev
from vtick.proto import messages as m
from vtick.proto.catalog import PREEMPTION_POINTS
from vtick.proto.pvclock import PvclockInfo, TscModel

__all__ = [
    "build_history",
    "merge_host_logs",
    "write_history",
    "read_history",
    "HistoryError",
    "FORMAT",
]

FORMAT = 1
_EXIT_KINDS = [m.EXIT_KIND_NAMES[cls] for cls in m.EXIT_CLASSES]
_OUTCOMES = {ev.IPI_ACCEPTED: "accepted", ev.IPI_COALESCED: "coalesced"}
_CSD = {
    ev.CSD_OK: ("ok", "ok"),
    ev.CSD_ERROR: ("fail", "error"),
    ev.CSD_CUT_OFF: ("info", "cut off"),
}


class HistoryError(ValueError):
    """A history file that cannot be read (the message names the file and the line)."""


class _GuestClock:
    """Guest ktime -> host ns for one vCPU process."""

    def __init__(self, tsc_khz: int, tsc_epoch: int) -> None:
        self.model = TscModel(tsc_khz, tsc_epoch, tsc_epoch)
        self.delta = tsc_epoch  # until a clock record: ktime counts from the host's epoch

    def publish(self, info: PvclockInfo) -> None:
        probe = info.system_time + 1_000_000_000
        host = self.model.host_ns_for_ktime(info, probe)
        if host is not None:
            self.delta = host - probe

    def host(self, ktime: int) -> int:
        return ktime + self.delta


def _vectors(mask: int) -> list[int]:
    return [i for i in range(64) if mask >> i & 1]


class _Builder:
    def __init__(self, ex: Execution) -> None:
        self.ex = ex
        self.events: list[tuple[int, int, int | None, str, str, dict[str, Any]]] = []
        self.order = 0
        #: session id -> (vcpu, generation)
        self.sessions: dict[int, tuple[int, int]] = {}
        #: (vcpu, generation, exit seq) -> (timer id or None, ipi id or None)
        self.exits: dict[tuple[int, int, int], tuple[str | None, str | None]] = {}
        #: (vcpu, generation, inject seq) -> IPI ids it carries
        self.inject_ipis: dict[tuple[int, int, int], list[str]] = {}
        #: (vcpu, generation, inject seq) -> vector
        self.inject_vector: dict[tuple[int, int, int], int] = {}
        #: vcpu -> host time its incarnation-0 workload started (link windows count from it)
        self.workload_start: dict[int, int] = {}
        #: host time at which guest ktime was 0 (the host's start)
        self.ktime_epoch: int | None = None

    def add(self, t: int, vcpu: int | None, typ: str, f: str, value: dict[str, Any]) -> None:
        self.order += 1
        self.events.append((t, self.order, vcpu, typ, f, value))

    # ---------------------------------------------------------------- host log

    def sessions_from_host(self, records: list[tuple[int, ...]]) -> None:
        generation: dict[int, int] = {}
        for r in records:
            if r[0] == ev.H_SESSION and r[5] == ev.SESSION_NEW:
                gen = generation.get(r[2], -1) + 1
                generation[r[2]] = gen
                self.sessions[r[3]] = (r[2], gen)

    def migrations(self, moves: list[tuple[int, str, dict[str, Any]]]) -> None:
        for t, f, value in moves:
            self.add(t, None, "info", f, value)

    def host(self, records: list[tuple[int, ...]]) -> None:
        gen: dict[int, int] = {}
        value: dict[str, Any]
        last_inject: tuple[int, int, int] | None = None
        for r in records:
            kind, t = r[0], r[1]
            if kind == ev.H_RUN_START:
                self.add(t, None, "info", "run-start", {})
            elif kind == ev.H_RUN_END:
                self.add(t, None, "info", "run-end", {})
            elif kind == ev.H_SESSION:
                vcpu, session, pid, how, lo, hi = r[2], r[3], r[4], r[5], r[6], r[7]
                if how == ev.SESSION_NEW:
                    gen[vcpu] = gen.get(vcpu, -1) + 1
                value = {
                    "session": session,
                    "pid": pid,
                    "kind": "new" if how == ev.SESSION_NEW else "resumed",
                    "generation": gen.get(vcpu, 0),
                    "lost": [lo, hi] if hi else None,
                }
                self.add(t, vcpu, "info", "session", value)
            elif kind == ev.H_LAPIC_BASE:
                self.add(t, r[2], "info", "lapic-base", {"eois": r[3], "injected": r[4]})
            elif kind == ev.H_EXIT:
                vcpu = r[2]
                value = {"seq": r[3], "kind": _EXIT_KINDS[r[4]], "handling_ns": r[5]}
                self.add(t, vcpu, "info", "host-exit", value)
            elif kind in (ev.H_TARM, ev.H_TFIRE):
                vcpu, origin, expiry = r[2], r[3], r[4]
                timer, _ = self.exits.get((vcpu, gen.get(vcpu, 0), origin), (None, None))
                f = "host-timer-arm" if kind == ev.H_TARM else "host-timer-fire"
                value = {"timer": timer, "origin": origin, "expiry": expiry}
                self.add(t, vcpu, "info", f, value)
            elif kind == ev.H_IPI:
                src, src_gen, src_seq, target, vector, outcome = r[2:8]
                _, ipi = self.exits.get((src, src_gen, src_seq), (None, None))
                value = {
                    "ipi": ipi,
                    "src": src,
                    "vector": vector,
                    "outcome": _OUTCOMES.get(outcome, "not accepted"),
                }
                self.add(t, target, "info", "ipi-deliver", value)
            elif kind == ev.H_INJECT:
                vcpu, seq, vector, origin = r[2], r[3], r[4], r[5]
                key = (vcpu, gen.get(vcpu, 0), seq)
                timer = None
                if origin:
                    timer, _ = self.exits.get((vcpu, key[1], origin), (None, None))
                ipis: list[str] = []
                self.inject_ipis[key] = ipis
                self.inject_vector[key] = vector
                last_inject = key
                value = {
                    "seq": seq,
                    "vector": vector,
                    "timer": timer,
                    "ipis": ipis,
                    "generation": key[1],
                }
                self.add(t, vcpu, "info", "inject", value)
            elif kind == ev.H_INJECT_IPI:
                _, ipi = self.exits.get((r[4], r[5], r[6]), (None, None))
                if last_inject is not None and last_inject[2] == r[3]:
                    self.inject_ipis[last_inject].append(ipi or f"{r[4]}.?")
            elif kind == ev.H_LINK_ERROR:
                self.add(t, r[2], "info", "link-error", {})
            elif kind == ev.H_STALL:
                self.add(t, None, "info", "stall", {"gap_ns": r[2], "end": t + r[2]})

    # ---------------------------------------------------------------- guest logs

    def guest_exits(self, log: ev.LogContents) -> tuple[int, int, int]:
        """Index one guest log's exits; returns (vcpu, generation, incarnation)."""
        vcpu = int(log.header.get("vcpu", -1))
        inc = int(log.header.get("incarnation", 0))
        gen = inc
        for r in log.records:
            if r[0] == ev.G_SESSION:
                vcpu, gen = self.sessions.get(r[2], (r[6], inc))
            elif r[0] == ev.G_EXIT:
                timer = f"{vcpu}.{r[6]}" if r[6] else None
                ipi = f"{vcpu}.{r[7]}" if r[7] else None
                self.exits[(vcpu, gen, r[2])] = (timer, ipi)
        return vcpu, gen, inc

    def guest(self, log: ev.LogContents, vcpu: int, gen: int, inc: int) -> None:
        clock: _GuestClock | None = None
        pid = int(log.header.get("pid", 0))
        for r in log.records:
            kind = r[0]
            if kind == ev.G_SESSION:
                clock = _GuestClock(r[3], r[4])
                if self.ktime_epoch is None:
                    self.ktime_epoch = r[4]
                continue
            if kind == ev.G_CLOCK:
                if clock is not None:
                    clock.publish(PvclockInfo(r[2], r[3], r[4], r[5], r[6], r[7]))
                continue
            if clock is None:
                continue
            t = clock.host(r[1])
            if kind == ev.G_ARM:
                value = {
                    "timer": f"{vcpu}.{r[2]}",
                    "expires": r[3],
                    "expires_host": clock.host(r[3]),
                }
                self.add(t, vcpu, "invoke", "timer-arm", value | {"incarnation": inc})
            elif kind == ev.G_CANCEL:
                why = "replaced" if r[4] == ev.CANCEL_REPLACED else "cancelled"
                self.add(t, vcpu, "ok", "timer-cancel", {"timer": f"{vcpu}.{r[2]}", "reason": why})
            elif kind == ev.G_FIRE:
                value = {
                    "timer": f"{vcpu}.{r[2]}",
                    "expires": r[3],
                    "expires_host": clock.host(r[3]),
                    "ran": r[1],
                    "late_ns": r[1] - r[3],
                    "programmed_host": clock.host(r[4]) if r[4] else None,
                    "irq": r[5] or None,
                    "generation": gen,
                }
                self.add(t, vcpu, "ok", "timer-fire", value)
            elif kind == ev.G_EXIT:
                timer, ipi = self.exits.get((vcpu, gen, r[2]), (None, None))
                value = {
                    "seq": r[2],
                    "kind": _EXIT_KINDS[r[3]] if 0 <= r[3] < len(_EXIT_KINDS) else "?",
                    "rtt_ns": r[4] or None,
                    "host_ns": r[5] if r[4] else None,
                    "timer": timer,
                    "ipi": ipi,
                    "generation": gen,
                    "incarnation": inc,
                }
                self.add(t, vcpu, "info", "exit", value)
            elif kind == ev.G_IRQ:
                key = (vcpu, gen, r[2])
                handled = clock.host(r[4]) if r[4] else None
                value = {
                    "seq": r[2],
                    "vector": r[3],
                    "handled": handled,
                    "host_time": r[5],
                    "pv_eoi": bool(r[6]),
                    "generation": gen,
                }
                self.add(t, vcpu, "ok", "irq", value)
                if handled is not None:
                    for ipi in self.inject_ipis.get(key, ()):
                        self.add(
                            handled, vcpu, "ok", "ipi-handle",
                            {"ipi": ipi, "vector": r[3], "seq": r[2], "generation": gen},
                        )  # fmt: skip
            elif kind == ev.G_IPI_SEND:
                value = {"ipi": f"{vcpu}.{r[2]}", "vector": r[3], "targets": _vectors(r[4])}
                self.add(t, vcpu, "invoke", "ipi-send", value)
            elif kind == ev.G_CSD_QUEUE:
                value = {"csd": f"{vcpu}.{r[2]}", "target": r[3], "wait": bool(r[4])}
                self.add(t, vcpu, "invoke", "csd-queue", value)
            elif kind == ev.G_CSD_RUN:
                self.add(t, vcpu, "ok", "csd-run", {"csd": f"{r[2]}.{r[3]}", "src": r[2]})
            elif kind == ev.G_CSD_WAIT:
                typ, outcome = _CSD.get(r[4], ("info", "?"))
                value = {"csd": f"{vcpu}.{r[2]}", "target": r[3], "outcome": outcome}
                self.add(t, vcpu, typ, "csd-wait", value)
            elif kind == ev.G_STALL:
                self.add(t, vcpu, "info", "stall", {"gap_ns": r[2], "end": clock.host(r[1] + r[2])})
            elif kind == ev.G_WINDOW:
                point = PREEMPTION_POINTS[r[3]] if 0 <= r[3] < len(PREEMPTION_POINTS) else "?"
                fid = f"w{vcpu}.{self.order}"
                value = {"fault": fid, "kind": "window", "target": vcpu, "pattern": point}
                self.add(t, vcpu, "invoke", "fault", value)
                self.add(clock.host(r[2]), vcpu, "ok", "fault", value | {"length_ns": r[2] - r[1]})
            elif kind == ev.G_LINK:
                value = {
                    "fault": ev.LINK_FAULTS[r[2]] if 0 <= r[2] < len(ev.LINK_FAULTS) else "?",
                    "direction": ev.LINK_DIRECTIONS[r[3]] if 0 <= r[3] < 2 else "?",
                    "seq": r[4],
                }
                self.add(t, vcpu, "info", "link-fault", value)
            elif kind == ev.G_START:
                if inc == 0:
                    self.workload_start[vcpu] = t
                self.add(t, vcpu, "info", "workload-start", {"incarnation": inc, "pid": pid})
            elif kind == ev.G_END:
                value = {
                    "incarnation": inc,
                    "pid": pid,
                    "eois": r[2],
                    "pv_eoi_unreported": r[3],
                    "irqs_handled": r[4],
                    "generation": gen,
                }
                self.add(t, vcpu, "info", "workload-end", value)

    # ---------------------------------------------------------------- orchestrator

    def faults(self) -> None:
        for fault in self.ex.faults:
            target = fault["target"]
            vcpu = None if target < 0 else target
            value = {
                "fault": fault["id"],
                "kind": fault["kind"],
                "target": target,
                "pattern": fault.get("pattern", ""),
                "pid": fault.get("pid"),
            }
            self.add(fault["start"], vcpu, "invoke", "fault", value)
            end = fault.get("end", fault["start"])
            self.add(end, vcpu, "ok", "fault", value | {"new_pid": fault.get("new_pid")})
        for op in self.ex.schedule:  # link windows count from the vCPU's workload start
            start = self.workload_start.get(op.target)
            if op.kind != "link" or start is None:
                continue
            value = {
                "fault": op.id,
                "kind": "link",
                "target": op.target,
                "pattern": op.pattern,
                "direction": op.direction,
                "per_mille": op.per_mille,
            }
            self.add(start + op.start_ns, op.target, "invoke", "fault", value)
            self.add(start + op.end_ns, op.target, "ok", "fault", value)
        for e in self.ex.exits:
            value = {"who": e["who"], "pid": e["pid"], "status": e["status"]}
            self.add(e["time"], e["vcpu"], "info", "process-exit", value)

    def results(self, end: int) -> None:
        results = self.ex.results
        if not results:
            return
        for v in results.get("vcpus", []):
            lapic = (v.get("devices") or {}).get("lapic") or {}
            value = {
                "isr": lapic.get("isr_vectors", []),
                "irr": lapic.get("irr_vectors", []),
                "eois": lapic.get("eois"),
                "injected": v.get("injected"),
                "sessions": v.get("sessions"),
            }
            self.add(end, v["vcpu"], "info", "lapic-end", value)
            value = {"link": v.get("link"), "errors": v.get("link_errors", [])}
            self.add(end, v["vcpu"], "info", "link-end", value)


#: host records whose second word is a host time, and which words are host times
_HOST_TIMES: dict[int, tuple[int, ...]] = {ev.H_TARM: (1, 4), ev.H_TFIRE: (1, 4)}
#: host records that show the VM running (a frame taken, a timer run, a message sent)
_RUNNING = frozenset({ev.H_EXIT, ev.H_TFIRE, ev.H_INJECT, ev.H_IPI, ev.H_SESSION})


def _shift(record: tuple[int, ...], by: int) -> tuple[int, ...]:
    if not by:
        return record
    words = list(record)
    for i in _HOST_TIMES.get(record[0], (1,)):
        if words[i]:  # 0 = "no expiry" stays 0
            words[i] += by
    return tuple(words)


def _arrival(log: ev.LogContents) -> tuple[int, int]:
    came = next((r for r in log.records if r[0] == ev.H_MIGRATE_IN), None)
    return (0, 0) if came is None else (1, came[3])


def merge_host_logs(
    logs: list[ev.LogContents],
) -> tuple[list[tuple[int, ...]], list[tuple[int, str, dict[str, Any]]]]:
    """Every host's records as one stream on the first host's clock, and the moves.

    ``logs``: every host's log, in any order (the one without ``H_MIGRATE_IN`` started
    the VM).
    Returns (records, [(time, "migrate-out" | "migrate-in" | "migrate-failed", value)]).
    Pure: the same logs give the same stream.
    """
    if not logs:
        return [], []
    # whatever order they come in: the host that started the VM (no H_MIGRATE_IN) first,
    # then the destinations by the freeze they took the VM from (a destination that
    # never got one logged nothing: a process that never builds a Host opens no log)
    logs = sorted(logs, key=_arrival)
    records: list[tuple[int, ...]] = []
    moves: list[tuple[int, str, dict[str, Any]]] = []
    shift = 0  # this host's clock -> the first host's
    current = logs[0]
    records.extend(current.records)
    for to, dest in enumerate(logs[1:], start=1):
        came = next((r for r in dest.records if r[0] == ev.H_MIGRATE_IN), None)
        out = [r for r in current.records if r[0] == ev.H_MIGRATE_OUT]
        if not out:
            continue  # nothing left this host: the other one never ran the VM
        frozen = out[-1][1] + shift
        offset = out[-1][2]
        moves.append((frozen, "migrate-out", {"offset_ns": offset, "to": to}))
        # the VM ran on here: the source says so (H_MIGRATE_FAIL), or, from a log
        # without that record, it took a frame or ran a timer after the freeze
        again = next(
            (
                r[1] + shift
                for r in current.records
                if r[0] in (ev.H_MIGRATE_FAIL, *_RUNNING) and r[1] > out[-1][1]
            ),
            None,
        )
        if came is None or again is not None:
            value = {"frozen": frozen, "restored": came is not None}
            moves.append((again if again is not None else frozen, "migrate-failed", value))
            continue
        shift -= came[2]
        restored = came[1] + shift
        value = {
            "offset_ns": came[2],
            "frozen": frozen,
            "restore_ns": restored - frozen,  # freeze -> restored (copy, transfer, restore)
        }
        moves.append((restored, "migrate-in", value))
        records.extend(_shift(r, shift) for r in dest.records)
        current = dest
    return records, moves


def build_history(ex: Execution) -> list[dict[str, Any]]:
    """The run's history: every event in host-time order, indexed from 0."""
    b = _Builder(ex)
    logs = ex.host_logs or ([ex.host_log] if ex.host_log is not None else [])
    host, moves = merge_host_logs(logs)
    b.sessions_from_host(host)
    placed = [(log, *b.guest_exits(log)) for log in ex.guest_logs]
    b.host(host)
    b.migrations(moves)
    for log, vcpu, gen, inc in placed:
        b.guest(log, vcpu, gen, inc)
    b.faults()
    last = max((e[0] for e in b.events), default=ex.run_start or 0)
    b.results(last + 1)
    b.events.sort(key=lambda e: (e[0], e[1]))
    opts = ex.options
    first = b.events[0][0] if b.events else 0
    run = {
        "format": FORMAT,
        "config": opts.config(),
        "schedule": [op.as_dict() for op in ex.schedule],
        "run_start": ex.run_start,
        "ktime_epoch": b.ktime_epoch,
        "failure": ex.failure,
        "interrupted": ex.interrupted,
        "wall_ns": ex.wall_ns,
    }
    out: list[dict[str, Any]] = [
        {"index": 0, "time": first, "vcpu": None, "type": "info", "f": "run", "value": run}
    ]
    for i, (t, _, who, typ, f, value) in enumerate(b.events, start=1):
        out.append({"index": i, "time": t, "vcpu": who, "type": typ, "f": f, "value": value})
    return out


def write_history(events: Iterable[dict[str, Any]], path: str) -> int:
    """Write ``history.jsonl``; returns its size in bytes."""
    size = 0
    with open(path, "w") as fh:
        for event in events:
            line = json.dumps(event, separators=(",", ":")) + "\n"
            fh.write(line)
            size += len(line)
    return size


def read_history(path: str) -> list[dict[str, Any]]:
    """Read a ``history.jsonl``.

    Raises:
        HistoryError: not readable, not UTF-8, a line that is not a history event.
    """
    events: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise HistoryError(f"{path}:{n}: not JSON ({exc.msg})") from None
                if not isinstance(event, dict) or not {"index", "time", "type", "f"} <= set(event):
                    raise HistoryError(f"{path}:{n}: not a history event")
                events.append(event)
    except UnicodeDecodeError:
        raise HistoryError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise HistoryError(f"{path}: {exc.strerror}") from None
    if not events or events[0].get("f") != "run":
        raise HistoryError(f"{path}: no run event on the first line: not a vtick chaos history")
    return events
