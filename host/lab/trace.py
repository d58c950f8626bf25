"""Chrome/Perfetto trace-event JSON of a campaign's trace windows (``vtick run --trace``).

Layout, per path of the campaign (runs laid end to end on one timeline):

* one process per vCPU, named ``"<path>: vCPU i"``: thread 1 holds its exits as complete
  ("X") slices from the moment the exit was sent to the reply (the guest-side round
  trip); thread 2 holds its interrupts, each a slice from the injection's arrival to
  the moment its handler ran;
* one process for the host, named ``"<path>: host"``: one thread per vCPU with the
  host-side handling of each exit (its measured duration, centred in the round trip: the
  host's own timestamps are not shipped) and each injection as a short slice;
* a flow arrow (``bind_id`` / ``flow_out`` / ``flow_in``) from every injection on the host
  to the interrupt it became on the vCPU;
* thread 3 of a vCPU: each timer callback as a slice from the moment the device was
  programmed to the moment the callback ran (args: requested expiry, interrupt arrival,
  lateness);
* thread 4 of a vCPU: each csd of its ``smp_call_function`` calls, from queued to the
  wait's return, with a flow to a short "csd ran" slice on the target vCPU's thread 5;
* thread 6 of a vCPU (``vtick run --explain``): each explained late timer as consecutive
  slices, one per part of its lateness (programmed late, host timer, host handling,
  transit, guest until handler, handler), the blocker in the args.

Times are guest ktime (one clock for every vCPU of a machine), in microseconds relative to
the path's first record, as the trace-event format wants; ``displayTimeUnit`` is ns.

``vtick chaos --trace`` writes one run's history the same way, with its faults as slices
(:func:`chaos_trace_events`).
"""

from __future__ import annotations

import json
from typing import Any

from vtick.host.chaos.explain import PARTS as EXPLAIN_PARTS

__all__ = ["trace_events", "write_trace", "chaos_trace_events", "write_chaos_trace"]

_GAP_US = 1000.0  # between two paths on the timeline
_TINY_US = 0.001


def _meta(pid: int, name: str) -> dict[str, Any]:
    return {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}}


def _thread(pid: int, tid: int, name: str) -> dict[str, Any]:
    return {"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}}


def trace_events(campaign: dict[str, Any]) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    offset = 0.0
    flow = 0
    for index, run in enumerate(campaign.get("runs", [])):
        results = run.get("results")
        if not results:
            continue
        traces = [(v["vcpu"], v.get("trace")) for v in results["vcpus"] if v.get("trace")]
        if not traces:
            continue
        stamps = [e[0] for _, t in traces for e in t["exits"]]
        stamps += [i[0] for _, t in traces for i in t["irqs"]]
        stamps += [i[3] for _, t in traces for i in t["irqs"]]
        stamps += [e[1] or e[3] for _, t in traces for e in t.get("events", [])]
        stamps += [c[0] for _, t in traces for c in t.get("calls", [])]
        if not stamps:
            continue
        t0 = min(stamps)

        def us(t: int, t0: int = t0, offset: float = offset) -> float:
            return (t - t0) / 1000 + offset

        path = f"{run['family']} {run['name']}"
        host_pid = 1000 * (index + 1)
        events.append(_meta(host_pid, f"{path}: host"))
        end = offset
        for vcpu, trace in traces:
            pid = host_pid + 1 + vcpu
            events.append(_meta(pid, f"{path}: vCPU {vcpu}"))
            events.append(_thread(pid, 1, "exits"))
            events.append(_thread(pid, 2, "interrupts"))
            events.append(_thread(host_pid, 1 + vcpu, f"vCPU {vcpu} exits and injections"))
            for sent, rtt, host_ns, kind in trace["exits"]:
                start = us(sent)
                events.append(
                    {
                        "name": kind,
                        "cat": "exit",
                        "ph": "X",
                        "ts": start,
                        "dur": max(rtt / 1000, _TINY_US),
                        "pid": pid,
                        "tid": 1,
                        "args": {"rtt_ns": rtt, "host_ns": host_ns},
                    }
                )
                events.append(
                    {
                        "name": f"handle {kind}",
                        "cat": "host",
                        "ph": "X",
                        "ts": start + max(rtt - host_ns, 0) / 2000,
                        "dur": max(host_ns / 1000, _TINY_US),
                        "pid": host_pid,
                        "tid": 1 + vcpu,
                        "args": {"host_ns": host_ns, "note": "placed mid round trip"},
                    }
                )
                end = max(end, start + rtt / 1000)
            for arrived, handled, vector, injected in trace["irqs"]:
                flow += 1
                events.append(
                    {
                        "name": f"inject {vector:#x}",
                        "cat": "irq",
                        "ph": "X",
                        "ts": us(injected),
                        "dur": _TINY_US,
                        "pid": host_pid,
                        "tid": 1 + vcpu,
                        "bind_id": flow,
                        "flow_out": True,
                    }
                )
                done = handled if handled else arrived
                events.append(
                    {
                        "name": f"irq {vector:#x}",
                        "cat": "irq",
                        "ph": "X",
                        "ts": us(arrived),
                        "dur": max((done - arrived) / 1000, _TINY_US),
                        "pid": pid,
                        "tid": 2,
                        "bind_id": flow,
                        "flow_in": True,
                        "args": {"pending_ns": done - arrived, "vector": vector},
                    }
                )
                end = max(end, us(done))
            events.append(_thread(pid, 3, "timer events"))
            events.append(_thread(pid, 4, "smp calls"))
            events.append(_thread(pid, 5, "csds run here"))
            for expires, programmed, irq_at, ran in trace.get("events", []):
                start = us(programmed or ran)
                events.append(
                    {
                        "name": "timer",
                        "cat": "timer",
                        "ph": "X",
                        "ts": start,
                        "dur": max(us(ran) - start, _TINY_US),
                        "pid": pid,
                        "tid": 3,
                        "args": {
                            "expires_ns": expires,
                            "programmed_ns": programmed,
                            "irq_arrived_ns": irq_at,
                            "lateness_ns": ran - expires,
                        },
                    }
                )
                end = max(end, us(ran))
            for queued, target, ran, returned in trace.get("calls", []):
                start = us(queued)
                call = {
                    "name": f"csd -> vCPU {target}",
                    "cat": "smp",
                    "ph": "X",
                    "ts": start,
                    "dur": max(us(returned) - start, _TINY_US),
                    "pid": pid,
                    "tid": 4,
                    "args": {"target": target, "ran_ns": ran},
                }
                end = max(end, us(returned))
                if ran:
                    flow += 1
                    call |= {"bind_id": flow, "flow_out": True}
                    events.append(
                        {
                            "name": f"csd from vCPU {vcpu}",
                            "cat": "smp",
                            "ph": "X",
                            "ts": us(ran),
                            "dur": _TINY_US,
                            "pid": host_pid + 1 + target,
                            "tid": 5,
                            "bind_id": flow,
                            "flow_in": True,
                        }
                    )
                events.append(call)
        for worst in (results.get("explain") or {}).get("worst", []):
            # --explain (issue 15): the worst timers' lateness, part after part
            pid = host_pid + 1 + worst["vcpu"]
            events.append(_thread(pid, 6, "late timers explained"))
            points = worst["points_ktime"]
            for part, a, b in zip(EXPLAIN_PARTS, points, points[1:], strict=False):
                if b <= a:
                    continue
                events.append(
                    {
                        "name": part,
                        "cat": "explain",
                        "ph": "X",
                        "ts": us(a),
                        "dur": (b - a) / 1000,
                        "pid": pid,
                        "tid": 6,
                        "args": {
                            "timer": worst["timer"],
                            "late_ns": worst["late_ns"],
                            "blocker": worst["blocker"],
                        },
                    }
                )
                end = max(end, us(b))
        offset = end + _GAP_US
    return events


def write_trace(campaign: dict[str, Any], path: str) -> int:
    """Write the trace file; returns the number of events."""
    events = trace_events(campaign)
    with open(path, "w") as fh:
        json.dump({"traceEvents": events, "displayTimeUnit": "ns"}, fh)
    return len(events)


# ---------------------------------------------------------------------- chaos (issue 10)


def chaos_trace_events(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A chaos history as trace events: faults as slices next to what they disturbed.

    One process per vCPU (``vCPU i``) with threads: 1 ``faults`` (each stop, crash,
    preemption window and link fault window on that vCPU, as a slice from its start to
    its end, args: kind, pattern, fault id), 2 ``timers`` (each callback as a slice from
    its requested expiry to the moment it ran: its lateness), 3 ``interrupts`` (arrival
    to handler), 4 ``exits`` (sent to answered); one process ``host`` with the host stops
    on its ``faults`` thread and each injection as an instant on a thread per vCPU.
    Times are µs of guest ktime (0 = the host's start).
    """
    run = history[0]["value"] if history and history[0]["f"] == "run" else {}
    origin = run.get("ktime_epoch") or (history[0]["time"] if history else 0)

    def us(t: int) -> float:
        return (t - origin) / 1000

    host = 1
    events: list[dict[str, Any]] = [_meta(host, "host"), _thread(host, 1, "faults")]
    named: set[int] = set()

    def vcpu_pid(vcpu: int) -> int:
        pid = 100 + vcpu
        if vcpu not in named:
            named.add(vcpu)
            events.append(_meta(pid, f"vCPU {vcpu}"))
            for tid, name in ((1, "faults"), (2, "timers"), (3, "interrupts"), (4, "exits")):
                events.append(_thread(pid, tid, name))
            events.append(_thread(host, 10 + vcpu, f"injections to vCPU {vcpu}"))
        return pid

    opened: dict[Any, dict[str, Any]] = {}
    for e in history:
        f, v, vcpu = e["f"], e["value"], e["vcpu"]
        if f == "fault":
            key = (v.get("kind"), v.get("fault"))
            if e["type"] == "invoke":
                opened[key] = e
                continue
            start = opened.pop(key, e)
            target = int(v.get("target", -1))
            pid = host if target < 0 else vcpu_pid(target)
            name = v.get("kind", "fault") + (f" {v['pattern']}" if v.get("pattern") else "")
            events.append(
                {
                    "name": name,
                    "cat": "fault",
                    "ph": "X",
                    "ts": us(start["time"]),
                    "dur": max((e["time"] - start["time"]) / 1000, _TINY_US),
                    "pid": pid,
                    "tid": 1,
                    "args": {k: v[k] for k in ("fault", "kind", "pattern", "direction") if k in v},
                }
            )
        elif f == "timer-fire" and vcpu is not None:
            events.append(
                {
                    "name": f"timer {v['timer']}",
                    "cat": "timer",
                    "ph": "X",
                    "ts": us(v["expires_host"]),
                    "dur": max(v["late_ns"] / 1000, _TINY_US),
                    "pid": vcpu_pid(vcpu),
                    "tid": 2,
                    "args": {"late_ns": v["late_ns"], "irq": v.get("irq")},
                }
            )
        elif f == "irq" and vcpu is not None:
            done = v["handled"] or e["time"]
            events.append(
                {
                    "name": f"irq {v['vector']:#x}",
                    "cat": "irq",
                    "ph": "X",
                    "ts": us(e["time"]),
                    "dur": max((done - e["time"]) / 1000, _TINY_US),
                    "pid": vcpu_pid(vcpu),
                    "tid": 3,
                    "args": {"seq": v["seq"], "handled": v["handled"] is not None},
                }
            )
        elif f == "exit" and vcpu is not None:
            events.append(
                {
                    "name": v["kind"],
                    "cat": "exit",
                    "ph": "X",
                    "ts": us(e["time"]),
                    "dur": max((v["rtt_ns"] or 0) / 1000, _TINY_US),
                    "pid": vcpu_pid(vcpu),
                    "tid": 4,
                    "args": {"seq": v["seq"], "answered": v["rtt_ns"] is not None},
                }
            )
        elif f == "inject" and vcpu is not None:
            vcpu_pid(vcpu)
            events.append(
                {
                    "name": f"inject {v['vector']:#x}",
                    "cat": "irq",
                    "ph": "i",
                    "s": "t",
                    "ts": us(e["time"]),
                    "pid": host,
                    "tid": 10 + vcpu,
                    "args": {"seq": v["seq"], "timer": v.get("timer"), "ipis": v.get("ipis")},
                }
            )
    return events


def write_chaos_trace(history: list[dict[str, Any]], path: str) -> int:
    """Write a chaos run's trace file (``vtick chaos --trace``); returns its event count."""
    events = chaos_trace_events(history)
    with open(path, "w") as fh:
        json.dump({"traceEvents": events, "displayTimeUnit": "ns"}, fh)
    return len(events)
