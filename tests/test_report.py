"""Honest figures (issue 15), on synthetic results with known answers.

One test per finding: calls cut off by the end of the run are neither latencies nor
errors; real errors get a column and fail the run; one stall cannot move the ranking and
is listed; an overloaded family is not ranked; an exit-cost profile ranks; ``--vcpus 1``
says why there is no IPI table; the compact table fits 80 columns without cutting a
number; an interrupted campaign shows what finished.
"""

from __future__ import annotations

import re
import struct

import pytest
from hdrh.histogram import HdrHistogram
from rich.console import Console

from vtick.guest.apic import X2ApicOps
from vtick.guest.cpu import MemoryWrite, PreemptionPoint, SpinWait
from vtick.guest.smp import Smp
from vtick.guest.vcpu import Timeline
from vtick.host.lab import metrics, report
from vtick.proto import messages as m
from vtick.proto.cpumask import encode_mask

# ---------------------------------------------------------------------- builders


def hdr(values: list[int], digits: int = 3) -> str:
    h = HdrHistogram(1, 60_000_000_000, digits)
    for v in values:
        h.record_value(v)
    return h.encode().decode("ascii")


def vcpu(
    i: int,
    *,
    events: int = 100,
    exits: dict[str, int] | None = None,
    host_ns: dict[str, list[int]] | None = None,
    late: list[int] | None = None,
    counters: dict[str, int] | None = None,
    timeline: list[list[int]] | None = None,
    calls: list[int] | None = None,
) -> dict:
    """One vCPU's raw results: ``host_ns[kind]`` is every exit's host handling time."""
    exits = exits or {"hypercall": 200, "hlt": 20}
    host_ns = host_ns or {k: [5_000] * n for k, n in exits.items()}
    late = late if late is not None else list(range(10_000, 1_010_000, 10_000))
    return {
        "vcpu": i,
        "link_errors": [],
        "host_exits": {
            k: {
                "count": len(v),
                "host_ns_total": sum(v),
                "host_ns_max": max(v),
                "host_ns_hdr": hdr(v, 2),
            }
            for k, v in host_ns.items()
        },
        "devices": {"lapic": {"coalesced": 0}},
        "guest": {
            "events": events,
            "early": 0,
            "exits": exits,
            "exit_rtt_ns_total": {k: 300_000 * n for k, n in exits.items()},
            "lateness_hdr": hdr(late) if late else hdr([]),
            "duration_ns": 2_000_000_000,
            "counters": {"device_interrupts": events // 2, "workload_started_ns": 1_000_000_000}
            | (counters or {}),
            "timeline": timeline or [],
            "call_hdr": hdr(calls) if calls else None,
        },
    }


def results(*vcpus: dict, workload: str = "timers", duration_s: float = 2.0, **cfg) -> dict:
    return {
        "config": {"workload": workload, "duration_s": duration_s, "hz": 1000} | cfg,
        "ok": True,
        "vcpus": list(vcpus),
    }


def run(family: str, name: str, res: dict) -> dict:
    return {"family": family, "name": name, "metrics": metrics.run_metrics(res), "results": res}


def campaign(*runs: dict, vcpus: int = 2, exit_cost: str | None = None) -> dict:
    modes = [r["name"] for r in runs if r["family"] == "timer"]
    ipis = [r["name"] for r in runs if r["family"] == "ipi"]
    return {
        "vtick": 2,
        "config": {
            "modes": modes,
            "ipis": ipis,
            "timer_workload": "timers",
            "vcpus": vcpus,
            "duration_s": 2.0,
            "exit_cost": exit_cost,
        },
        "runs": list(runs),
    }


def render(doc: dict, width: int, wide: bool | None = None) -> str:
    console = Console(width=width, record=True, force_terminal=False, color_system=None)
    report.print_campaign(doc, console, wide=wide)
    return console.export_text()


# ---------------------------------------------------------------------- 1. shutdown artefact


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


def drive(op, on_spin):
    """Run a kernel op: exits answered with zero, stores dropped, spins to ``on_spin``."""
    value = None
    try:
        while True:
            item = op.send(value)
            value = None
            if isinstance(item, SpinWait):
                on_spin(item)
            elif not isinstance(item, MemoryWrite | PreemptionPoint):
                value = m.ExitReply(re=0, value=0, fault=0, host_ns=0)
    except StopIteration as done:
        return done.value


def sender() -> tuple[Smp, Clock]:
    clock = Clock()
    smp = Smp(0, 3, X2ApicOps(0, 3), clock)
    smp.on_online_mask(encode_mask(0b111, 3))  # every CPU online
    return smp, clock


def test_a_wait_open_at_shutdown_is_cut_off_not_a_latency_nor_an_error():
    """The host's shutdown arrives while vCPU 0 waits in csd_lock_wait: the targets stop
    running csds, so today the wait runs out its 1 s timeout and counts an error and a
    1 s call.  It must end at once, counted as cut off."""
    smp, clock = sender()
    spins = []

    def on_spin(item):
        spins.append(item)
        clock.now += 1_000_000
        if len(spins) == 3:
            smp.end_of_run()  # vtick.guest.vcpu: the Shutdown message arrived

    errors = drive(smp.call_function("noop", 0, wait=True), on_spin)
    assert errors == []
    assert len(spins) == 3, "the wait must end as soon as the run is over"
    assert smp.stats.cut_off == 1
    assert smp.stats.errors == 0
    assert smp.stats.timeouts == 0
    assert smp.stats.call_latency_ns == []
    assert smp.outstanding == {}


def test_a_target_gone_at_shutdown_is_cut_off_but_a_real_timeout_is_an_error():
    smp, clock = sender()

    def goodbye(item):
        # the host answers for a target that already said goodbye (relay_memory)
        smp.end_of_run()
        for target, cid in list(smp.outstanding):
            smp.on_done(m.CsdDone(src=target, dst=0, id=cid, ran=0, error="not running"))

    assert drive(smp.call_function("noop", 0, wait=True), goodbye) == []
    assert smp.stats.cut_off == 1
    assert smp.stats.errors == 0

    smp, clock = sender()

    def nobody_answers(item):
        clock.now = item.deadline  # a target that never runs its csd, mid-run

    errors = drive(smp.call_function("noop", 0, wait=True), nobody_answers)
    assert len(errors) == 2
    assert all("did not run csd" in e for e in errors)
    assert smp.stats.errors == 2
    assert smp.stats.cut_off == 0
    assert smp.stats.call_latency_ns == [], "a failed call lasts the timeout: no latency"


def test_metrics_count_cut_off_calls_apart_and_real_errors_fail_the_run():
    clean = vcpu(0, calls=[5_000_000] * 50, counters={"smp_calls": 51, "smp_cut_off_calls": 1})
    failing = vcpu(
        1,
        calls=[5_000_000] * 40,
        counters={"smp_calls": 43, "smp_cut_off_calls": 1, "csd_errors": 2},
    )
    met = metrics.run_metrics(results(clean, failing, workload="ipi"))
    assert met["events"] == 51 + 43 - 2  # completed calls only
    assert met["csds"]["cut_off_calls"] == 2
    assert met["csds"]["errors"] == 2
    assert met["ok"] is False
    assert met["problems"] == ["2 smp_call_function error(s)"]
    assert met["call_latency_ns"]["max"] == pytest.approx(5_000_000, rel=0.01)
    doc = campaign(run("ipi", "pv", results(clean, failing, workload="ipi")))
    text = render(doc, 120, wide=False)
    assert re.search(r"pv .* 2 +", text), "the errors column shows the count"
    assert "cut off by the end of the run" in text
    line, ok = report.campaign_status(doc)
    assert not ok
    assert "pv (2 smp_call_function error(s))" in line


# ---------------------------------------------------------------------- 2. stalls


def _two_paths(stalled_host_ns: int) -> dict:
    # lapic-x2apic: 10 us per exit; pv-ktime: 6 us per exit, but one exit of the host
    # stopped for ``stalled_host_ns`` (SIGSTOP in the middle of handling it)
    fast = [6_000] * 199 + [stalled_host_ns]
    pv = results(vcpu(0, host_ns={"hypercall": fast, "hlt": [1_000] * 20}), vcpu(1))
    x2 = results(vcpu(0, host_ns={"hypercall": [10_000] * 200, "hlt": [1_000] * 20}), vcpu(1))
    return campaign(run("timer", "pv-ktime", pv), run("timer", "lapic-x2apic", x2))


def test_one_host_stall_cannot_move_the_ranking():
    calm = report.family_rows(_two_paths(6_000), "timer")
    stalled = report.family_rows(_two_paths(3_000_000_000), "timer")
    assert [r["name"] for r in calm] == [r["name"] for r in stalled] == ["pv-ktime", "lapic-x2apic"]
    assert stalled[0]["fastest"]
    assert stalled[0]["rank"] == pytest.approx(calm[0]["rank"], rel=0.02)
    # the mean does move: what the old ranking used
    mean = stalled[0]["metrics"]["host_ns_per_event"]
    assert mean > 5 * calm[0]["metrics"]["host_ns_per_event"]
    assert stalled[0]["metrics"]["host_max_ns"] == 3_000_000_000


def test_stalls_are_listed_with_who_how_long_and_when():
    # vCPU 1's watchdog saw its process stopped 3.0 s, 4.2 s into the workload; its
    # timers fired ~3 s late when it came back (kept by the timeline as peaks)
    stop_at = 1_000_000_000 + 4_200_000_000
    stopped = vcpu(
        1,
        counters={"stall 0 ns": 3_000_000_000, "stall 0 at_ns": stop_at},
        late=[1_000_000] * 99 + [2_990_000_000],
        timeline=[[stop_at + 3_000_000_000, 2_990_000_000], [stop_at + 3_001_000_000, 2_950_000]],
    )
    res = results(vcpu(0), stopped, duration_s=10.0)
    assert [s["text"] for s in metrics.stalls(res)] == [
        "vCPU 1 stopped responding for 3.0 s at 4.2 s"
    ]
    # the host stopped: every vCPU's timers late together, none of them stopped itself
    host_at = 1_000_000_000 + 1_500_000_000
    both = [vcpu(i, timeline=[[host_at + 2_000_000_000, 2_000_000_000]]) for i in (0, 1)]
    assert [s["text"] for s in metrics.stalls(results(*both))] == [
        "the host stopped responding for 2.0 s at 1.5 s"
    ]
    # an exit the host did not answer for 0.5 s is the host's too
    waited = vcpu(0, counters={"host_wait 0 ns": 500_000_000, "host_wait 0 at_ns": host_at})
    assert [s["who"] for s in metrics.stalls(results(waited, vcpu(1)))] == ["the host"]
    # ordinary jitter is no stall
    assert metrics.stalls(results(vcpu(0, timeline=[[2_000_000_000, 30_000_000]]), vcpu(1))) == []
    doc = campaign(run("timer", "pv-ktime", res))
    text = render(doc, 80)
    assert "vCPU 1 stopped responding for 3.0 s at 4.2 s" in " ".join(text.split())
    assert "2.99s" in text, "the max column shows the stall"


def test_the_timeline_keeps_its_peaks_through_decimation():
    tl = Timeline(256, peaks=8)
    for i in range(100_000):
        tl.add(i, 3_000_000_000 if i in (77_777, 77_778) else 1_000)
    points = dict(struct.iter_unpack("<qq", tl.pack()))
    assert points[77_777] == 3_000_000_000
    assert points[77_778] == 3_000_000_000
    assert len(points) <= 256


# ---------------------------------------------------------------------- 3. overload


def test_an_overloaded_family_is_flagged_and_not_ranked():
    # lateness p99 above the whole 2 s run: the machine did not keep up
    swamped = results(vcpu(0, late=[2_500_000_000] * 100), vcpu(1, late=[2_400_000_000] * 100))
    doc = campaign(run("timer", "pv-ktime", swamped), run("timer", "vmi", results(vcpu(0))))
    met = doc["runs"][0]["metrics"]
    assert met["overload"] is not None
    assert "of the 2 s run" in met["overload"]
    assert doc["runs"][1]["metrics"]["overload"] is None
    rows = report.family_rows(doc, "timer")
    assert [r["name"] for r in rows] == ["pv-ktime", "vmi"]  # campaign order, unranked
    assert not any(r["fastest"] for r in rows)
    assert all(r["ratio"] is None for r in rows)
    text = render(doc, 100)
    assert "NOT RANKED" in text
    assert "★" not in text
    line, ok = report.campaign_status(doc)
    assert "overloaded, not ranked: pv-ktime" in line


def test_a_tick_run_far_below_hz_is_overloaded():
    slow = results(vcpu(0, events=100), vcpu(1, events=100), workload="tick")  # 100/s of 2000
    assert "ticks/s of the 2000 asked" in metrics.run_metrics(slow)["overload"]


# ---------------------------------------------------------------------- 4. exit-cost ranks


def test_an_exit_cost_profile_ranks_and_the_table_says_so():
    def modeled(res: dict, ns: int) -> dict:
        res["exit_cost"] = {"profile": "kvm-2011-xapic"}
        for v in res["vcpus"]:
            for a in v["host_exits"].values():
                a["modeled_ns_total"] = ns * a["count"]
        return res

    # pv-ktime is cheaper in vtick's own host time but dearer in the profile's model
    pv = modeled(
        results(vcpu(0, host_ns={"hypercall": [3_000] * 200}, exits={"hypercall": 200})), 11_000
    )  # noqa: E501
    x2 = modeled(
        results(vcpu(0, host_ns={"msr-write": [9_000] * 200}, exits={"msr-write": 200})), 2_000
    )  # noqa: E501
    doc = campaign(
        run("timer", "pv-ktime", pv), run("timer", "lapic-x2apic", x2), exit_cost="kvm-2011-xapic"
    )  # noqa: E501
    assert [r["name"] for r in report.family_rows(doc, "timer")] == ["lapic-x2apic", "pv-ktime"]
    text = " ".join(render(doc, 80).split())
    assert "ranked by the modeled host cost of the kvm-2011-xapic profile" in text
    assert "model us" in text
    without = campaign(run("timer", "pv-ktime", pv), run("timer", "lapic-x2apic", x2))
    assert [r["name"] for r in report.family_rows(without, "timer")] == ["pv-ktime", "lapic-x2apic"]
    assert "ranked by host us" in " ".join(render(without, 80).split())


# ---------------------------------------------------------------------- 5. one vCPU


def test_one_vcpu_says_why_there_is_no_ipi_table():
    doc = campaign(run("timer", "pv-ktime", results(vcpu(0))), vcpus=1)
    text = " ".join(render(doc, 80).split())
    assert "No IPI table: the IPI storm needs at least 2 vCPUs (this run has 1)" in text
    assert "IPI paths" not in text


# ---------------------------------------------------------------------- 7. 80 columns


def _big_campaign() -> dict:
    late = [3_162_000_000, 316_000_000, 1_234_567] * 40  # seconds-long: wide numbers
    timer = [
        run("timer", name, results(vcpu(0, late=late), vcpu(1)))
        for name in ("lapic-periodic", "tsc-deadline", "pv-future")
    ]
    ipi = run(
        "ipi",
        "xapic-shortcut",
        results(
            vcpu(0, calls=[1_010_827_300] * 30, counters={"smp_calls": 30, "csd_errors": 12}),
            vcpu(1, calls=[21_184_500] * 30, counters={"smp_calls": 30}),
            workload="ipi",
        ),
    )
    failed = {"family": "ipi", "name": "pv", "error": "vCPU 1 (pid 4242) killed by signal SIGKILL"}
    return campaign(*timer, ipi, failed)


def test_the_compact_table_fits_80_columns_and_cuts_no_number():
    doc = _big_campaign()
    text = render(doc, 80)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    assert "…" not in text
    met = doc["runs"][0]["metrics"]
    for cell in (
        report.duration_text(met["lateness_ns"]["p50"]),
        report.duration_text(met["lateness_ns"]["max"]),
        f"{met['exits_per_event']:.2f}",
        report.duration_text(doc["runs"][3]["metrics"]["call_latency_ns"]["max"]),
    ):
        assert re.search(rf"(^|\s){re.escape(cell)}(\s|$)", text, re.M), (cell, text)
    assert "compact tables; --wide" in text
    # the full table when asked for (or when the terminal is wide enough)
    wide = render(doc, 240, wide=True)
    assert "host mean us/ev" in wide
    assert "by kind" in wide
    assert "…" not in wide
    assert render(doc, 240) == wide


def test_durations_keep_their_unit_and_at_most_seven_characters():
    cases = {
        850: "850ns", 5_300: "5.3us", 850_000: "850us", 7_264_000: "7.26ms",
        12_340_000: "12.3ms", 123_400_000: "123ms", 3_162_000_000: "3.16s", None: "-",
    }  # fmt: skip
    for ns, text in cases.items():
        assert report.duration_text(ns) == text
    assert all(len(report.duration_text(10**e * 9.99)) <= 7 for e in range(0, 12))


# ---------------------------------------------------------------------- 6. interruption


def test_an_interrupted_campaign_shows_what_finished_and_says_so():
    doc = campaign(run("timer", "pv-ktime", results(vcpu(0))))
    doc["config"]["modes"] += ["lapic-xapic", "vmi"]
    doc["interrupted"] = "SIGINT"
    text = " ".join(render(doc, 80).split())
    assert "pv-ktime" in text
    assert "INTERRUPTED (SIGINT) after 1 of 3 paths" in text
    assert report.campaign_status(doc)[1] is False


def test_stalls_of_many_vcpus_are_grouped_and_capped() -> None:
    """A packed process's vCPUs stop together: one line for them, not one each; the
    longest first; at most STALL_LINES lines, then how many more the results hold (a
    256-vCPU run printed 1 559 stall lines)."""

    def stall(who: str, at: float, length: float) -> dict:
        return metrics._stall(who, "stopped responding", int(at * 1e9), int((at + length) * 1e9), 0)

    stalls = [stall(f"vCPU {v}", 2.0, 0.4) for v in (*range(16, 32), 40, 41, 43)]
    stalls += [stall("vCPU 7", 1.0, 0.3), stall("the host", 0.5, 3.0)]
    stalls += [stall(f"vCPU {v}", 10.0 + v, 0.1) for v in range(100, 120)]  # 20 alone
    lines = report.stall_lines(stalls)
    assert lines[0] == "the host stopped responding for 3.0 s at 0.5 s"
    assert lines[1] == "vCPUs 16-31,40-41,43 stopped responding for 0.4 s at 2.0 s"
    assert lines[2] == "vCPU 7 stopped responding for 0.3 s at 1.0 s"
    assert len(lines) == report.STALL_LINES + 1
    assert lines[-1] == f"... 13 more (stalls in the results JSON: {len(stalls)} in all)"
    assert report.stall_lines(stalls[:2]) == ["vCPUs 16-17 stopped responding for 0.4 s at 2.0 s"]
