"""Metrics and tables from synthetic results with known answers; the trace-event format."""

from __future__ import annotations

import json

import pytest
from hdrh.histogram import HdrHistogram

from vtick.host.lab.metrics import run_metrics
from vtick.host.lab.report import compare, family_rows
from vtick.host.lab.trace import trace_events, write_trace


def hdr(values: list[int]) -> str:
    h = HdrHistogram(1, 60_000_000_000, 3)
    for v in values:
        h.record_value(v)
    return h.encode().decode("ascii")


def vcpu(i: int, events: int, exits: dict, rtt: dict, host: dict, boot: dict, late: list[int]):
    counters = {f"boot_exits {k}": n for k, n in boot.items()}
    counters |= {"device_interrupts": events, "calibration_period": 1_010_000}
    return {
        "vcpu": i,
        "link_errors": [],
        "host_exits": {k: {"count": exits[k], "host_ns_total": host[k] * exits[k]} for k in exits},
        "devices": {"lapic": {"coalesced": 2}},
        "guest": {
            "events": events,
            "early": 1,
            "exits": exits,
            "exit_rtt_ns_total": {k: rtt[k] * exits[k] for k in exits},
            "lateness_hdr": hdr(late),
            "duration_ns": 2_000_000_000,
            "counters": counters,
        },
    }


def results(mode: str = "lapic-xapic", host_write: int = 10_000) -> dict:
    # 100 events each; steady state: 2 mmio-writes per event (TMICT + EOI), boot: 5 extra
    exits = {"mmio-write": 205, "hlt": 50}
    rtt = {"mmio-write": 500_000, "hlt": 1_000_000}
    host = {"mmio-write": host_write, "hlt": 1_000}
    boot = {"mmio-write": 5}
    late = list(range(1_000, 101_000, 1_000))  # 1..100 us, 100 values
    return {
        "config": {"workload": "timers", "duration_s": 2.0, "mode": mode, "hz": 1000},
        "ok": True,
        "vcpus": [
            vcpu(0, 100, exits, rtt, host, boot, late),
            vcpu(1, 100, exits, rtt, host, boot, late),
        ],
    }


def test_exits_per_event_excludes_boot_and_splits_guest_and_host_time():
    met = run_metrics(results())
    assert met["events"] == 200
    assert met["exits_per_event_by_kind"] == {"hlt": 0.5, "mmio-write": 2.0}
    assert met["exits_per_event"] == pytest.approx(2.5)
    # guest: 2 x 500 us + 0.5 x 1 ms per event; host: 2 x 10 us + 0.5 x 1 us
    assert met["guest_ns_per_event"] == pytest.approx(1_500_000)
    assert met["host_ns_per_event"] == pytest.approx(20_500)
    assert met["early"] == 2
    assert met["coalesced"] == 4
    assert met["events_per_s"] == pytest.approx(100)
    assert met["boot_exits"] == 10


def test_lateness_percentiles_merge_every_vcpu():
    late = run_metrics(results())["lateness_ns"]
    assert late["count"] == 200
    assert late["p50"] == pytest.approx(50_000, rel=0.01)
    assert late["p99"] == pytest.approx(99_000, rel=0.01)
    assert late["max"] == pytest.approx(100_000, rel=0.01)
    assert set(late) >= {"p50", "p90", "p99", "p99.9", "max"}


def test_calibration_error_against_the_1ghz_bus():
    cal = run_metrics(results())["calibration"]
    assert [round(c["error_pct"], 3) for c in cal] == [1.0, 1.0]


def campaign(*runs):
    return {"vtick": 2, "config": {"timer_workload": "timers", "vcpus": 2, "duration_s": 2.0},
            "runs": list(runs)}  # fmt: skip


def test_family_rows_sort_by_host_time_mark_fastest_and_ratio():
    slow = {"family": "timer", "name": "lapic-xapic", "metrics": run_metrics(results())}
    fast = {
        "family": "timer",
        "name": "pv-ktime",
        "metrics": run_metrics(results("pv-ktime", host_write=5_000)),
    }
    failed = {"family": "timer", "name": "vmi", "error": "vCPU 1 (pid 9) exited with status 5"}
    rows = family_rows(campaign(slow, failed, fast), "timer")
    assert [r["name"] for r in rows] == ["pv-ktime", "lapic-xapic", "vmi"]
    assert rows[0]["fastest"]
    assert rows[0]["ratio"] == 1.0
    assert rows[1]["ratio"] == pytest.approx(20_500 / 10_500)
    assert rows[2]["error"].startswith("vCPU 1")


def test_compare_pairs_the_same_paths():
    a = campaign({"family": "timer", "name": "pv-ktime", "metrics": run_metrics(results())})
    b = campaign(
        {"family": "timer", "name": "pv-ktime",
         "metrics": run_metrics(results(host_write=20_000))},
        {"family": "ipi", "name": "pv", "error": "x"},
    )  # fmt: skip
    (row,) = compare(a, b)
    before, after = row["metrics"]["host mean us/event"]
    assert before == pytest.approx(20.5)
    assert after == pytest.approx(40.5)


def traced_campaign() -> dict:
    res = results()
    res["vcpus"][0]["trace"] = {
        "exits": [[1_000_000, 400_000, 10_000, "hypercall"], [2_000_000, 300_000, 8_000, "hlt"]],
        "irqs": [[2_200_000, 2_250_000, 0xEC, 2_100_000]],
    }
    res["vcpus"][1]["trace"] = {"exits": [[1_500_000, 200_000, 9_000, "mmio-write"]], "irqs": []}
    return campaign({"family": "timer", "name": "pv-ktime", "results": res, "metrics": {}})


def test_trace_events_follow_the_trace_event_format(tmp_path):
    path = tmp_path / "t.json"
    n = write_trace(traced_campaign(), str(path))
    doc = json.loads(path.read_text())
    events = doc["traceEvents"]
    assert len(events) == n
    assert doc["displayTimeUnit"] == "ns"
    for e in events:
        assert {"name", "ph", "pid", "tid"} <= set(e)
        if e["ph"] == "X":
            assert e["dur"] > 0
            assert e["ts"] >= 0
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {"timer pv-ktime: host", "timer pv-ktime: vCPU 0", "timer pv-ktime: vCPU 1"}
    outs = [e["bind_id"] for e in events if e.get("flow_out")]
    ins = [e["bind_id"] for e in events if e.get("flow_in")]
    assert outs == ins == [1]  # every injection flows to exactly one interrupt slice
    exits = [e for e in events if e.get("cat") == "exit"]
    assert [(e["name"], e["dur"]) for e in exits] == [
        ("hypercall", 400.0), ("hlt", 300.0), ("mmio-write", 200.0)
    ]  # fmt: skip
    # the earliest record of the path is at ts 0
    assert min(e["ts"] for e in events if e["ph"] == "X") == 0


def test_trace_without_windows_is_empty():
    assert trace_events(campaign({"family": "timer", "name": "x", "error": "e"})) == []


def test_modeled_cost_per_event_uses_what_the_host_applied():
    """A profile can make one exit reason free (apicv's EOI): the modeled cost per event
    follows what the host recorded per exit, not the profile's per-kind default."""
    res = results()
    res["exit_cost"] = {"profile": "apicv", "costs_ns": {"mmio-write": 11_000}}
    for v in res["vcpus"]:
        # 205 mmio-writes: 100 TMICT at 11 us, 100 EOIs free, 5 boot writes at 11 us
        v["host_exits"]["mmio-write"]["modeled_ns_total"] = 105 * 11_000
        v["host_exits"]["hlt"]["modeled_ns_total"] = 0
    met = run_metrics(res)
    assert met["exit_cost_profile"] == "apicv"
    # 2 mmio-writes per event at the mean applied cost 105 * 11 us / 205
    assert met["modeled_host_ns_per_event"] == pytest.approx(2 * 105 * 11_000 / 205)


def test_trace_has_timer_event_spans_and_csd_flows_across_vcpus():
    doc = traced_campaign()
    vcpus = doc["runs"][0]["results"]["vcpus"]
    vcpus[0]["trace"]["events"] = [[2_000_000, 1_500_000, 2_200_000, 2_300_000]]
    vcpus[0]["trace"]["calls"] = [
        [2_400_000, 1, 2_600_000, 2_700_000],
        [2_400_000, 1, 0, 3_000_000],
    ]
    events = trace_events(doc)
    (timer,) = [e for e in events if e.get("cat") == "timer"]
    assert timer["tid"] == 3
    assert timer["dur"] == 800.0  # programmed at 1.5 ms, ran at 2.3 ms
    assert timer["args"]["lateness_ns"] == 300_000
    calls = [e for e in events if e.get("cat") == "smp" and e["tid"] == 4]
    assert len(calls) == 2
    ran = [e for e in events if e.get("cat") == "smp" and e["tid"] == 5]
    assert len(ran) == 1  # the csd that never ran has no arrow
    assert ran[0]["pid"] == calls[0]["pid"] + 1  # on vCPU 1's process
    assert ran[0]["bind_id"] == calls[0]["bind_id"]
    outs = sorted(e["bind_id"] for e in events if e.get("flow_out"))
    assert outs == sorted(e["bind_id"] for e in events if e.get("flow_in"))


def test_a_vcpu_without_a_report_is_named_among_the_problems():
    raw = results()
    raw["ok"] = False
    raw["vcpus"][-1]["guest"] = None
    met = run_metrics(raw)
    assert not met["ok"]
    vcpu = raw["vcpus"][-1]["vcpu"]
    assert f"1 vCPU(s) sent no report (first: vCPU {vcpu})" in met["problems"]
