"""Metrics of one run, computed from its raw results (pure; tested on synthetic results).

A run's raw results (``host/server.py``) carry, per vCPU, the guest's report (exits and
summed round trips by kind, HDR histograms of lateness, IPI latency and call latency,
kernel counters including the boot exits) and the host's accounting (exits and host-side
handling time by kind).  From those this module derives what DESIGN.md section 5 asks
for, per vCPU and for the whole run:

* exits per event by kind, excluding the exits of boot and calibration, and exits per
  device interrupt (one interrupt can expire several timers);
* guest time and host time per event (the "11 us guest vs 22 us host" split): the mean
  guest-side round trip and the mean host-side handling time of each exit kind, times the
  exits per event;
* the same host time from each kind's *median* handling time (``host_p50_ns_per_event``):
  the statistic ``vtick run`` ranks by, because one exit that took seconds (the host
  stopped mid-exit) moves a mean by tens of microseconds per event and a median not at all;
* lateness percentiles p50/p90/p99/p99.9/max (HDR histograms merged across vCPUs);
* early device interrupts, coalesced interrupts, events per second;
* IPI latency (csd queued -> function ran) and smp_call_function duration percentiles,
  the calls' real errors, and the calls the end of the run cut off (neither: a wait open
  when the host said shutdown, guest/smp.py);
* stalls: when a vCPU or the host stopped responding, and for how long (:func:`stalls`);
* overload: whether the machine kept up with the run at all (:func:`overload`);
* the LAPIC calibration error and the exits it cost.

An *event* is a timer callback for the timer workloads and a completed
``smp_call_function`` call for the IPI storm.
"""

from __future__ import annotations

from typing import Any

from hdrh.histogram import HdrHistogram

__all__ = [
    "PERCENTILES",
    "run_metrics",
    "merge_hdr",
    "percentiles",
    "stalls",
    "overload",
    "APIC_BUS_HZ",
    "OVERLOAD_FRACTION",
    "STALL_NS",
]

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
#: KVM's default APIC bus (apic_bus_cycle_ns = 1): what calibration should find
APIC_BUS_HZ = 1_000_000_000
_HIGHEST = 60_000_000_000
#: a path whose latency p99 (timer lateness, or smp_call_function duration) reaches this
#: share of the run did not keep up: its figures measure a queue, not the path
OVERLOAD_FRACTION = 0.10
#: the tick workload asks for HZ interrupts a second per vCPU; under this share of them
#: the machine did not keep up
TICK_RATE_FRACTION = 0.5
#: a vCPU not scheduled, an exit unanswered, or one event late this long is a stall (the
#: guest records the first two from the same threshold, guest/vcpu.py STALL_NS)
STALL_NS = 250_000_000
#: stall evidence this close together is one stall
_STALL_MERGE_NS = 50_000_000
_KEPT = 8  # counters "stall i ns" / "host_wait i ns" the guest may send


def merge_hdr(blobs: list[str | None]) -> HdrHistogram | None:
    """Merge HDR histograms encoded as base64 text; None when there are none."""
    merged: HdrHistogram | None = None
    for blob in blobs:
        if not blob:
            continue
        hist = HdrHistogram.decode(blob.encode("ascii"))
        if merged is None:
            merged = HdrHistogram(1, _HIGHEST, 3)
        merged.add(hist)
    return merged


def percentiles(hist: HdrHistogram | None) -> dict[str, int] | None:
    if hist is None or hist.get_total_count() == 0:
        return None
    out = {f"p{p:g}": int(hist.get_value_at_percentile(p)) for p in PERCENTILES}
    out["max"] = int(hist.get_max_value())
    out["count"] = int(hist.get_total_count())
    return out


def _steady_exits(guest: dict[str, Any]) -> dict[str, int]:
    counters = guest.get("counters") or {}
    return {
        kind: n - counters.get(f"boot_exits {kind}", 0)
        for kind, n in guest["exits"].items()
        if n - counters.get(f"boot_exits {kind}", 0) > 0
    }


def _vcpu(v: dict[str, Any], workload: str, duration_s: float) -> dict[str, Any] | None:
    g = v.get("guest")
    if not g:
        return None
    counters = g.get("counters") or {}
    steady = _steady_exits(g)
    # an IPI storm event is a completed call: a call the end of the run cut off is none
    calls = counters.get("smp_calls", 0) - counters.get("smp_cut_off_calls", 0)
    events = calls if workload == "ipi" else g["events"]
    guest_rtt = {k: g["exit_rtt_ns_total"][k] / n for k, n in g["exits"].items() if n}
    host_ns = {k: a["host_ns_total"] / a["count"] for k, a in v["host_exits"].items() if a["count"]}
    modeled_ns = {
        k: a.get("modeled_ns_total", 0) / a["count"]
        for k, a in v["host_exits"].items()
        if a["count"]
    }
    lapic = (v.get("devices") or {}).get("lapic") or {}
    return {
        "vcpu": v["vcpu"],
        "events": events,
        "steady_exits": steady,
        "guest_rtt_ns": guest_rtt,
        "host_ns": host_ns,
        "modeled_ns": modeled_ns,
        "early": g["early"],
        "coalesced": lapic.get("coalesced", 0),
        "calibration_period": counters.get("calibration_period"),
        "calibration_rescaled": bool(counters.get("calibration_rescaled", 0)),
        "calibration_exits": sum(n for k, n in counters.items() if k.startswith("boot_exits ")),
        "duration_ns": g["duration_ns"],
        "csds_sent": counters.get("csds_sent", 0),
        "csds_run": counters.get("csds_run", 0),
        "csd_errors": counters.get("csd_errors", 0),
        "cut_off_calls": counters.get("smp_cut_off_calls", 0),
        "device_interrupts": counters.get("device_interrupts", 0),
    }


def run_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """The metrics of one run (one mode or one IPI variant)."""
    cfg = results["config"]
    workload = cfg["workload"]
    duration_s = cfg["duration_s"]
    vcpus = [m for v in results["vcpus"] if (m := _vcpu(v, workload, duration_s))]
    events = sum(m["events"] for m in vcpus)
    exits: dict[str, int] = {}
    guest_ns = host_ns = modeled_ns = 0.0
    for m in vcpus:
        for kind, n in m["steady_exits"].items():
            exits[kind] = exits.get(kind, 0) + n
            guest_ns += n * m["guest_rtt_ns"].get(kind, 0.0)
            host_ns += n * m["host_ns"].get(kind, 0.0)
            modeled_ns += n * m["modeled_ns"].get(kind, 0.0)
    per_event = {k: n / events for k, n in sorted(exits.items())} if events else {}
    host_p50 = _host_p50_ns_per_event(results["vcpus"], per_event)
    interrupts = sum(m["device_interrupts"] for m in vcpus)
    lateness = merge_hdr([(v.get("guest") or {}).get("lateness_hdr") for v in results["vcpus"]])
    ipi = merge_hdr([(v.get("guest") or {}).get("ipi_hdr") for v in results["vcpus"]])
    calls = merge_hdr([(v.get("guest") or {}).get("call_hdr") for v in results["vcpus"]])
    run_s = max((m["duration_ns"] for m in vcpus), default=0) / 1e9
    hz = cfg.get("hz") or 1000
    calibration = [
        {
            "vcpu": m["vcpu"],
            "period": m["calibration_period"],
            "error_pct": (m["calibration_period"] * hz - APIC_BUS_HZ) / APIC_BUS_HZ * 100,
            "rescaled": m["calibration_rescaled"],
        }
        for m in vcpus
        if m["calibration_period"]
    ]
    out: dict[str, Any] = {
        "mode": cfg.get("mode"),
        "ipi": cfg.get("ipi"),
        "workload": workload,
        "ok": results.get("ok", False),
        "vcpus": len(results["vcpus"]),
        "events": events,
        "events_per_s": events / run_s if run_s else 0.0,
        "exits_per_event": sum(per_event.values()),
        "exits_per_event_by_kind": per_event,
        "guest_ns_per_event": guest_ns / events if events else None,
        "host_ns_per_event": host_ns / events if events else None,
        "host_p50_ns_per_event": host_p50,
        "host_max_ns": max(
            (a.get("host_ns_max", 0) for v in results["vcpus"] for a in v["host_exits"].values()),
            default=0,
        ),
        "exits_per_interrupt": (
            sum(exits.values()) / interrupts if interrupts and workload != "ipi" else None
        ),
        "early": sum(m["early"] for m in vcpus),
        "coalesced": sum(m["coalesced"] for m in vcpus),
        "lateness_ns": percentiles(lateness),
        "ipi_latency_ns": percentiles(ipi),
        "call_latency_ns": percentiles(calls),
        "calibration": calibration,
        "boot_exits": sum(m["calibration_exits"] for m in vcpus),
        "csds": {
            "sent": sum(m["csds_sent"] for m in vcpus),
            "run": sum(m["csds_run"] for m in vcpus),
            "errors": sum(m["csd_errors"] for m in vcpus),
            "cut_off_calls": sum(m["cut_off_calls"] for m in vcpus),
        },
        "link_errors": [e for v in results["vcpus"] for e in v["link_errors"]],
        "stalls": stalls(results),
    }
    out["overload"] = overload(out, cfg)
    problems = []
    if out["csds"]["errors"]:
        problems.append(f"{out['csds']['errors']} smp_call_function error(s)")
    if out["link_errors"]:
        problems.append(f"{len(out['link_errors'])} link error(s)")
    silent = [v["vcpu"] for v in results["vcpus"] if v.get("guest") is None]
    if not results.get("ok", False) and silent:
        problems.append(f"{len(silent)} vCPU(s) sent no report (first: vCPU {silent[0]})")
    if not results.get("ok", False) and not problems:
        problems.append("the host marked the run not ok")
    out["problems"] = problems
    out["ok"] = not problems
    if results.get("exit_cost") and events:
        # the profile's cost of each exit as the host applied it (by kind and by reason),
        # averaged per kind, times the steady-state exits per event
        out["modeled_host_ns_per_event"] = modeled_ns / events
        out["exit_cost_profile"] = results["exit_cost"]["profile"]
    return out


def _host_p50_ns_per_event(
    raw_vcpus: list[dict[str, Any]], per_event: dict[str, float]
) -> float | None:
    """Σ over kinds of exits/event × the kind's median host handling time (merged across
    vCPUs).  None when the host kept no histograms (results of an older vtick)."""
    total = 0.0
    for kind, rate in per_event.items():
        hist = merge_hdr([v["host_exits"].get(kind, {}).get("host_ns_hdr") for v in raw_vcpus])
        if hist is None or hist.get_total_count() == 0:
            return None
        total += rate * hist.get_value_at_percentile(50.0)
    return total


def overload(met: dict[str, Any], cfg: dict[str, Any]) -> str | None:
    """Why the machine did not keep up with this run, or None if it did.

    A timer path is overloaded when its lateness p99 reaches OVERLOAD_FRACTION of the
    run (with 64 vCPUs on 2 cores it exceeded the whole run); an IPI path when its call
    p99 does; the tick workload also when it got under TICK_RATE_FRACTION of the HZ
    interrupts it asked for.  An overloaded path's figures measure how long work queued,
    so ranking it against others would rank the queue.
    """
    duration_ns = float(cfg.get("duration_s") or 0) * 1e9
    if not met["events"]:
        return "no event completed"
    ipi = met["workload"] == "ipi"
    key, what = ("call_latency_ns", "call") if ipi else ("lateness_ns", "lateness")
    p99 = (met.get(key) or {}).get("p99")
    if p99 is not None and duration_ns and p99 >= OVERLOAD_FRACTION * duration_ns:
        return (
            f"{what} p99 {p99 / 1e6:.0f} ms is {p99 / duration_ns:.0%} of the "
            f"{duration_ns / 1e9:g} s run"
        )
    if met["workload"] == "tick":
        asked = (cfg.get("hz") or 1000) * met["vcpus"]
        if met["events_per_s"] < TICK_RATE_FRACTION * asked:
            return f"{met['events_per_s']:.0f} ticks/s of the {asked} asked"
    return None


def stalls(results: dict[str, Any]) -> list[dict[str, Any]]:
    """When a vCPU or the host stopped responding, from what the vCPUs report.

    Evidence, per vCPU (guest/vcpu.py): its watchdog's longest gaps in its own scheduling
    (``stall i ns``/``at_ns``: the process was stopped or starved), its longest non-HLT
    exits the host took to answer (``host_wait i``), and its timeline's samples of at
    least STALL_NS (lateness for timer workloads, call duration for the IPI storm; the
    timeline always keeps its largest samples), each an interval [at - value, at].
    Intervals that overlap (within 50 ms) are one stall, told as:

    * ``vCPU i stopped responding`` when vCPU i's own watchdog saw the gap, one line per
      gap (what others waited for during it is its consequence, not a second stall);
    * ``the host stopped responding`` when an exit went unanswered (longer than the
      waiting vCPU's own gaps explain), or when the timers of
      every vCPU (two or more) were late at once and none of them had stopped (in the IPI
      storm vCPUs that all wait may be waiting on each other, so that is not concluded);
    * otherwise ``vCPU i's timers ran late`` / ``calls waited`` for the vCPUs involved.

    Times are seconds since the earliest vCPU started its workload (negative: during
    boot).  Returns ``[{"who", "what", "at_s", "duration_s", "text"}]`` by time.
    """
    ipi = results.get("config", {}).get("workload") == "ipi"
    evidence: list[tuple[int, int, int, str]] = []  # (start, end, vcpu, kind)
    starts = []
    reporting = 0
    for v in results.get("vcpus", []):
        g = v.get("guest")
        if not g:
            continue
        reporting += 1
        c = g.get("counters") or {}
        if c.get("workload_started_ns"):
            starts.append(c["workload_started_ns"])
        for name, kind in (("stall", "stopped"), ("host_wait", "host")):
            for i in range(_KEPT):
                ns, at = c.get(f"{name} {i} ns"), c.get(f"{name} {i} at_ns")
                if ns is not None and at is not None and ns >= STALL_NS:
                    evidence.append((at, at + ns, v["vcpu"], kind))
        for point in g.get("timeline") or []:
            if len(point) == 2 and point[1] >= STALL_NS:
                evidence.append((point[0] - point[1], point[0], v["vcpu"], "late"))
    if not evidence:
        return []
    origin = min(starts) if starts else 0
    evidence.sort()
    clusters: list[list[tuple[int, int, int, str]]] = []
    end = None
    for item in evidence:
        if end is None or item[0] > end + _STALL_MERGE_NS:
            clusters.append([])
            end = item[1]
        clusters[-1].append(item)
        end = max(end, item[1])
    out = []
    for cluster in clusters:
        stopped = sorted({e[2] for e in cluster if e[3] == "stopped"})
        late = sorted({e[2] for e in cluster if e[3] == "late"})
        if stopped:
            # each of a vCPU's own gaps is told as it was: a cluster also holds what others
            # waited for meanwhile, so its span is not how long this vCPU was stopped (at
            # 256 vCPUs gaps of 1.1 s and 0.3 s, 10 s apart, were told as one of 11 s)
            gaps: dict[int, list[tuple[int, int]]] = {}
            for vcpu in stopped:
                own = [(e[0], e[1]) for e in cluster if e[2] == vcpu and e[3] == "stopped"]
                gaps[vcpu] = _merge(own)
                for start, stop in gaps[vcpu]:
                    out.append(_stall(f"vCPU {vcpu}", "stopped responding", start, stop, origin))
            # an exit's reply depends on the host alone: a wait the waiting vCPU's own gaps
            # do not cover is the host's (at 256 vCPUs an IPI storm's exits wait ~10 s
            # behind 65 280 relayed csd stores while no vCPU was off its CPU for 3 s)
            waits = [
                (e[0], e[1])
                for e in cluster
                if e[3] == "host" and _uncovered(e[0], e[1], gaps.get(e[2], [])) >= STALL_NS
            ]
            if waits:
                start, stop = max(waits, key=lambda w: w[1] - w[0])
                out.append(_stall("the host", "stopped responding", start, stop, origin))
            continue
        start, stop = min(e[0] for e in cluster), max(e[1] for e in cluster)
        # every vCPU late at once, none stopped: their timers depend on the host alone; in
        # the IPI storm they may be waiting on each other instead, so that is not said
        everyone = reporting > 1 and len(late) == reporting and not ipi
        if any(e[3] == "host" for e in cluster) or everyone:
            out.append(_stall("the host", "stopped responding", start, stop, origin))
        else:
            who = f"vCPU {late[0]}" if len(late) == 1 else "vCPUs " + ", ".join(map(str, late))
            what = "smp_call_function calls waited up to" if ipi else "timers ran up to"
            worst = max(e[1] - e[0] for e in cluster)
            out.append(_stall(who, what, start, start + worst, origin))
    return sorted(out, key=lambda s: s["at_s"])


def _merge(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Intervals that overlap or lie within _STALL_MERGE_NS of each other, as one."""
    out: list[tuple[int, int]] = []
    for start, stop in sorted(intervals):
        if out and start <= out[-1][1] + _STALL_MERGE_NS:
            out[-1] = (out[-1][0], max(out[-1][1], stop))
        else:
            out.append((start, stop))
    return out


def _uncovered(start: int, stop: int, gaps: list[tuple[int, int]]) -> int:
    """How much of [start, stop] none of ``gaps`` (disjoint, sorted) covers."""
    covered = sum(max(0, min(stop, b) - max(start, a)) for a, b in gaps)
    return stop - start - covered


def _stall(who: str, what: str, start: int, stop: int, origin: int) -> dict[str, Any]:
    at_s = (start - origin) / 1e9
    duration_s = (stop - start) / 1e9
    when = f"at {at_s:.1f} s" if at_s >= 0 else "during boot"
    if what == "stopped responding":
        text = f"{who} {what} for {duration_s:.1f} s {when}"
    elif what.startswith("timers"):
        text = f"{who}: {what} {duration_s:.1f} s late {when}"
    else:
        text = f"{who}: {what} {duration_s:.1f} s {when}"
    return {"who": who, "what": what, "at_s": at_s, "duration_s": duration_s, "text": text}
