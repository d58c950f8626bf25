"""Campaign plots (host/plots.py) from synthetic campaign documents."""

from __future__ import annotations

import os
import random
import struct
from typing import Any

import pytest
from hdrh.histogram import HdrHistogram

from vtick.host.lab import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL = [plots.LATENESS_CDF, plots.EXITS_PER_EVENT, plots.IPI_LATENCY, plots.LATENESS_OVER_TIME]

#: per timer mode: (median lateness ns, exits per event by kind)
TIMER_MODES: dict[str, tuple[float, dict[str, float]]] = {
    "lapic-xapic": (22_000.0, {"mmio-write": 2.0, "mmio-read": 0.4, "hlt": 1.0}),
    "tsc-deadline": (14_000.0, {"msr-write": 1.0, "hlt": 1.0}),
    "pv-ktime": (9_000.0, {"hypercall": 1.0, "hlt": 0.9}),
}
IPI_VARIANTS = {"xapic-shortcut": 30_000.0, "x2apic": 18_000.0, "pv": 12_000.0}


def _hdr(rng: random.Random, median_ns: float, n: int = 400, zeros: int = 0) -> str:
    hist = HdrHistogram(1, 60_000_000_000, 3)
    for _ in range(n):
        hist.record_value(int(rng.lognormvariate(0.0, 0.6) * median_ns))
    if zeros:
        hist.record_value(0, zeros)
    return hist.encode().decode("ascii")


def _timeline(rng: random.Random, median_ns: float, n: int = 150) -> list[list[int]]:
    return [[int(i * 12_000_000), int(rng.lognormvariate(0.0, 0.6) * median_ns)] for i in range(n)]


def _timer_run(rng: random.Random, mode: str, *, timeline: bool = True) -> dict[str, Any]:
    median, by_kind = TIMER_MODES[mode]
    vcpus = [
        {
            "vcpu": i,
            "guest": {
                "lateness_hdr": _hdr(rng, median, zeros=1 if i == 0 else 0),
                "ipi_hdr": None,
                "call_hdr": None,
                **({"timeline": _timeline(rng, median)} if timeline else {}),
            },
        }
        for i in range(2)
    ]
    metrics = {
        "mode": mode,
        "workload": "timers",
        "exits_per_event": sum(by_kind.values()),
        "exits_per_event_by_kind": dict(sorted(by_kind.items())),
    }
    results = {"ok": True, "config": {"workload": "timers", "mode": mode}, "vcpus": vcpus}
    return {"family": "timer", "name": mode, "metrics": metrics, "results": results}


def _ipi_run(rng: random.Random, variant: str) -> dict[str, Any]:
    median = IPI_VARIANTS[variant]
    vcpus = [
        {
            "vcpu": i,
            "guest": {
                "lateness_hdr": None,
                "ipi_hdr": _hdr(rng, median),
                "call_hdr": _hdr(rng, 2.5 * median),
                "timeline": [],
            },
        }
        for i in range(2)
    ]
    metrics = {"ipi": variant, "workload": "ipi", "exits_per_event_by_kind": {"hypercall": 1.0}}
    results = {"ok": True, "config": {"workload": "ipi", "ipi": variant}, "vcpus": vcpus}
    return {"family": "ipi", "name": variant, "metrics": metrics, "results": results}


def _doc(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"vtick": 2, "config": {}, "environment": {}, "runs": runs}


def _full_doc(seed: int = 1) -> dict[str, Any]:
    rng = random.Random(seed)
    return _doc(
        [_timer_run(rng, m) for m in TIMER_MODES] + [_ipi_run(rng, v) for v in IPI_VARIANTS]
    )


#: a failed run whose results, if anyone looked at them, would not decode
POISONED_ERROR = {
    "error": "vCPU 1 exited with status 5",
    "metrics": {"exits_per_event_by_kind": {"mmio-write": "x"}},
    "results": {"vcpus": [{"guest": {"lateness_hdr": "%%% not base64", "timeline": [[1]]}}]},
}


def _assert_png(path: str) -> None:
    assert os.path.isfile(path)
    with open(path, "rb") as f:
        data = f.read()
    assert len(data) > 10_000, f"{path}: suspiciously small ({len(data)} bytes)"
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert 600 <= width <= 2000
    assert 400 <= height <= 1200


def _names(paths: list[str]) -> list[str]:
    return [os.path.basename(p) for p in paths]


def test_full_campaign_writes_every_plot(tmp_path):
    out = tmp_path / "deep" / "plots"  # created, parents included
    paths = plots.write_plots(_full_doc(), str(out))
    assert _names(paths) == ALL
    assert all(os.path.dirname(p) == str(out) for p in paths)
    for path in paths:
        _assert_png(path)
    assert sorted(os.listdir(out)) == sorted(ALL)


def test_timer_only_campaign_writes_no_ipi_plot(tmp_path):
    rng = random.Random(2)
    paths = plots.write_plots(_doc([_timer_run(rng, m) for m in TIMER_MODES]), str(tmp_path))
    assert _names(paths) == [plots.LATENESS_CDF, plots.EXITS_PER_EVENT, plots.LATENESS_OVER_TIME]
    assert not (tmp_path / plots.IPI_LATENCY).exists()
    for path in paths:
        _assert_png(path)


def test_ipi_only_campaign_writes_only_the_ipi_plot(tmp_path):
    rng = random.Random(3)
    paths = plots.write_plots(_doc([_ipi_run(rng, v) for v in IPI_VARIANTS]), str(tmp_path))
    assert _names(paths) == [plots.IPI_LATENCY]
    _assert_png(paths[0])


def test_error_runs_are_skipped(tmp_path):
    rng = random.Random(4)
    runs = [
        {"family": "timer", "name": "vmi", **POISONED_ERROR},
        _timer_run(rng, "pv-ktime"),
        {"family": "ipi", "name": "pv", **POISONED_ERROR},
        {"family": "ipi", "name": "x2apic", "error": "host did not start"},
    ]
    doc = _doc(runs)
    assert [name for name, _ in plots._runs(doc, "timer")] == ["pv-ktime"]
    assert plots._runs(doc, "ipi") == []
    paths = plots.write_plots(doc, str(tmp_path))
    # every IPI run failed: no IPI plot
    assert _names(paths) == [plots.LATENESS_CDF, plots.EXITS_PER_EVENT, plots.LATENESS_OVER_TIME]


def test_nothing_to_plot_writes_nothing(tmp_path):
    out = tmp_path / "empty"
    failed = {"family": "timer", "name": "pv-ktime", "error": "boom"}
    assert plots.write_plots(_doc([]), str(out)) == []
    assert plots.write_plots(_doc([failed]), str(out)) == []
    assert plots.write_plots({"runs": []}, str(out)) == []
    assert out.is_dir()
    assert os.listdir(out) == []


def test_runs_without_timelines_or_histograms(tmp_path):
    rng = random.Random(5)
    with_timeline = _timer_run(rng, "lapic-xapic")
    without = _timer_run(rng, "pv-ktime", timeline=False)
    empty = _timer_run(rng, "tsc-deadline")
    for v in empty["results"]["vcpus"]:
        v["guest"].update(lateness_hdr=None, timeline=[])
    empty["metrics"]["exits_per_event_by_kind"] = {}
    paths = plots.write_plots(_doc([with_timeline, without, empty]), str(tmp_path))
    assert _names(paths) == [plots.LATENESS_CDF, plots.EXITS_PER_EVENT, plots.LATENESS_OVER_TIME]

    # no timeline anywhere, no histogram anywhere: only the exits plot is left
    for run in (with_timeline, without):
        for v in run["results"]["vcpus"]:
            v["guest"]["lateness_hdr"] = None
            v["guest"].pop("timeline", None)
    paths = plots.write_plots(_doc([with_timeline, without, empty]), str(tmp_path / "b"))
    assert _names(paths) == [plots.EXITS_PER_EVENT]


def test_negative_lateness_and_partial_ipi_data(tmp_path):
    rng = random.Random(6)
    timer = _timer_run(rng, "pv-ktime")
    timer["results"]["vcpus"][0]["guest"]["timeline"] += [
        [1_900_000_000, -3_000],
        [1_950_000_000, 0],
    ]
    ipi = _ipi_run(rng, "pv")
    for v in ipi["results"]["vcpus"]:
        v["guest"]["ipi_hdr"] = None  # only call durations: one panel says "no data"
    paths = plots.write_plots(_doc([timer, ipi]), str(tmp_path))
    assert _names(paths) == ALL
    for path in paths:
        _assert_png(path)


def test_duplicate_names_get_distinct_labels():
    rng = random.Random(7)
    doc = _doc([_timer_run(rng, "pv-ktime"), _timer_run(rng, "pv-ktime")])
    assert [name for name, _ in plots._runs(doc, "timer")] == ["pv-ktime", "pv-ktime (2)"]


@pytest.mark.parametrize("seed", [11, 12])
def test_cdf_points_are_monotonic_and_end_at_one(seed):
    rng = random.Random(seed)
    hist = HdrHistogram.decode(_hdr(rng, 10_000.0, zeros=3).encode("ascii"))
    xs, ys = plots._cdf_us(hist)
    assert ys[0] == 0.0
    assert ys[-1] == pytest.approx(1.0)
    assert xs == sorted(xs)
    assert ys == sorted(ys)
    assert xs[0] == 0.0  # the recorded zeros: _draw_cdfs moves them to the left edge
