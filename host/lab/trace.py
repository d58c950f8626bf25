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
  wait's return, with a flow to a short "csd ran" slice on the target vCPU's thread 5.

Times are guest ktime (one clock for every vCPU of a machine), in microseconds relative to
the path's first record, as the trace-event format wants; ``displayTimeUnit`` is ns.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["trace_events", "write_trace"]

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
        offset = end + _GAP_US
    return events


def write_trace(campaign: dict[str, Any], path: str) -> int:
    """Write the trace file; returns the number of events."""
    events = trace_events(campaign)
    with open(path, "w") as fh:
        json.dump({"traceEvents": events, "displayTimeUnit": "ns"}, fh)
    return len(events)
