"""Metrics of one run, computed from its raw results (pure; tested on synthetic results).

A run's raw results (``host/server.py``) carry, per vCPU, the guest's report (exits and
summed round trips by kind, HDR histograms of lateness, IPI latency and call latency,
kernel counters including the boot exits) and the host's accounting (exits and host-side
handling time by kind).  From those this module derives what DESIGN.md section 5 asks
for, per vCPU and for the whole run:

* exits per event by kind, excluding the exits of boot and calibration;
* guest time and host time per event (the "11 us guest vs 22 us host" split): the mean
  guest-side round trip and the mean host-side handling time of each exit kind, times the
  exits per event;
* lateness percentiles p50/p90/p99/p99.9/max (HDR histograms merged across vCPUs);
* early device interrupts, coalesced interrupts, events per second;
* IPI latency (csd queued -> function ran) and smp_call_function duration percentiles;
* the LAPIC calibration error and the exits it cost.

An *event* is a timer callback for the timer workloads and an ``smp_call_function``
call for the IPI storm.
"""

from __future__ import annotations

from typing import Any

from hdrh.histogram import HdrHistogram

__all__ = ["PERCENTILES", "run_metrics", "merge_hdr", "percentiles", "APIC_BUS_HZ"]

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
#: KVM's default APIC bus (apic_bus_cycle_ns = 1): what calibration should find
APIC_BUS_HZ = 1_000_000_000
_HIGHEST = 60_000_000_000


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
    events = counters.get("smp_calls", 0) if workload == "ipi" else g["events"]
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
        },
        "link_errors": [e for v in results["vcpus"] for e in v["link_errors"]],
    }
    if results.get("exit_cost") and events:
        # the profile's cost of each exit as the host applied it (by kind and by reason),
        # averaged per kind, times the steady-state exits per event
        out["modeled_host_ns_per_event"] = modeled_ns / events
        out["exit_cost_profile"] = results["exit_cost"]["profile"]
    return out
