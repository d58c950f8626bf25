"""PNG plots of a campaign document (``vtick run``'s results), for a reader comparing paths.

Theory of operation
-------------------
A campaign document (``host/campaign.py``) lists its runs in order; each run is either
``{"family", "name", "metrics", "results"}`` or, when it failed, ``{"family", "name",
"error"}``.  Failed runs are skipped everywhere: a plot shows only what was measured.
:func:`write_plots` draws, from the runs that succeeded:

``lateness_cdf.png``
    Timer family.  The lateness CDF of each timer mode: the guests' lateness HDR
    histograms (base64 HdrHistogram V2 text, one per vCPU) merged with
    :func:`vtick.host.lab.metrics.merge_hdr`, walked bucket by bucket with
    ``get_recorded_iterator()`` and drawn as a step function (x: lateness in µs, log
    scale; y: fraction of timer events at most that late).  A log axis has no zero, so
    zero values (if any) are drawn at the axis's left edge, half the smallest non-zero
    value of the panel, and the axis label says so.
``exits_per_event.png``
    Timer family.  One stacked bar per mode: ``metrics["exits_per_event_by_kind"]``
    (steady-state exits, boot and calibration excluded), one segment per exit kind, the
    total printed on top of each bar.
``ipi_latency.png``
    IPI family.  Two panels of CDFs, one line per IPI variant: IPI latency (the guests'
    ``ipi_hdr``: csd queued -> function ran) and ``smp_call_function`` duration (the
    guests' ``call_hdr``), both in µs on a log axis.
``lateness_breakdown.png``
    Timer family, ``vtick run --explain`` only.  Per mode two stacked bars: the mean
    lateness of all its timer events and of its worst 1 %, split into the parts of
    ``vtick.host.chaos.explain.PARTS`` (programmed late, host timer, host handling,
    transit, guest until handler, handler).
``lateness_over_time.png``
    Timer family.  Lateness (µs) against guest time (s) from the guests' decimated
    ``timeline`` ([guest_ktime_ns, lateness_ns] pairs), all vCPUs of a mode in one colour;
    modes without a timeline are left out.  The y axis is logarithmic, or symmetric-log
    when some lateness is zero or negative.

A plot with nothing to show (no timer runs, no IPI runs, no timelines, every histogram
empty) is not written and its path is not returned.  A timer mode keeps the same colour
in every plot, so the CDF and the timeline can be read side by side.

Figures are built on :class:`matplotlib.figure.Figure` directly and saved with the Agg
renderer that ``savefig`` picks for PNG: no pyplot, no backend selection, no rcParams
changes, nothing global, so the function is safe to call from a server or a test suite.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

from hdrh.histogram import HdrHistogram
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from vtick.host.lab.metrics import merge_hdr

__all__ = [
    "write_plots",
    "write_chaos_plot",
    "LATENESS_CDF",
    "EXITS_PER_EVENT",
    "IPI_LATENCY",
    "LATENESS_OVER_TIME",
    "LATENESS_BREAKDOWN",
]

LATENESS_CDF = "lateness_cdf.png"
EXITS_PER_EVENT = "exits_per_event.png"
IPI_LATENCY = "ipi_latency.png"
LATENESS_OVER_TIME = "lateness_over_time.png"
LATENESS_BREAKDOWN = "lateness_breakdown.png"

_DPI = 120
#: qualitative palette (matplotlib's tab10, then tab20's light shades) as fixed hex strings
_PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#c7c7c7",
    "#dbdb8d",
    "#9edae5",
]

Run = dict[str, Any]
Curve = tuple[list[float], list[float]]


# ---------------------------------------------------------------------- public API


def write_plots(campaign: dict[str, Any], out_dir: str) -> list[str]:
    """Write the campaign's plots as PNG files into ``out_dir`` (created if needed).

    Returns the paths written, in the order lateness CDF, exits per event, IPI latency,
    lateness over time; a plot without data is neither written nor returned.
    """
    timer = _runs(campaign, "timer")
    ipi = _runs(campaign, "ipi")
    colors = {label: _color(i) for i, (label, _) in enumerate(timer)}
    figures = [
        (LATENESS_CDF, _lateness_cdf(timer, colors)),
        (EXITS_PER_EVENT, _exits_per_event(timer)),
        (IPI_LATENCY, _ipi_latency(ipi)),
        (LATENESS_OVER_TIME, _lateness_over_time(timer, colors)),
        (LATENESS_BREAKDOWN, _lateness_breakdown(timer)),
    ]
    os.makedirs(out_dir, exist_ok=True)
    written: list[str] = []
    for filename, fig in figures:
        if fig is None:
            continue
        path = os.path.join(out_dir, filename)
        fig.savefig(path, dpi=_DPI, format="png")
        written.append(path)
    return written


# ---------------------------------------------------------------------- data access


def _runs(campaign: dict[str, Any], family: str) -> list[tuple[str, Run]]:
    """(label, run) of the family's successful runs, in campaign order, labels unique."""
    out: list[tuple[str, Run]] = []
    seen: dict[str, int] = {}
    for run in campaign.get("runs") or []:
        if run.get("family") != family or run.get("error") is not None:
            continue
        if "metrics" not in run and "results" not in run:
            continue
        name = str(run.get("name"))
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name} ({seen[name]})", run))
    return out


def _guests(run: Run) -> list[dict[str, Any]]:
    results = run.get("results") or {}
    return [g for v in results.get("vcpus") or [] if (g := (v or {}).get("guest"))]


def _merged(run: Run, key: str) -> HdrHistogram | None:
    hist = merge_hdr([g.get(key) for g in _guests(run)])
    if hist is None or hist.get_total_count() == 0:
        return None
    return hist


def _cdf_us(hist: HdrHistogram) -> Curve:
    """Step points (value µs, cumulative fraction) of a histogram's recorded values."""
    total = hist.get_total_count()
    xs: list[float] = []
    ys: list[float] = []
    seen = 0
    for item in hist.get_recorded_iterator():
        seen += item.count_added_in_this_iter_step
        xs.append(item.value_iterated_to / 1e3)
        ys.append(seen / total)
    # start the step at zero height, so the first bucket shows as a rise
    return [xs[0], *xs], [0.0, *ys]


def _timeline(run: Run) -> Curve:
    """(guest time s, lateness µs) of every vCPU's decimated timeline, malformed points dropped."""
    ts: list[float] = []
    lat: list[float] = []
    for g in _guests(run):
        for point in g.get("timeline") or []:
            try:
                t, late = float(point[0]), float(point[1])
            except (TypeError, ValueError, IndexError):
                continue
            if math.isfinite(t) and math.isfinite(late):
                ts.append(t / 1e9)
                lat.append(late / 1e3)
    return ts, lat


def _color(index: int) -> str:
    return _PALETTE[index % len(_PALETTE)]


def _fmt_us(us: float) -> str:
    if us >= 1000:
        return f"{us / 1000:.3g} ms"
    return f"{us:.3g} µs"


def _label(name: str, hist: HdrHistogram) -> str:
    p50 = hist.get_value_at_percentile(50.0) / 1e3
    p99 = hist.get_value_at_percentile(99.0) / 1e3
    return f"{name}: p50 {_fmt_us(p50)}, p99 {_fmt_us(p99)}, n={hist.get_total_count()}"


# ---------------------------------------------------------------------- figures


def _new_figure(
    width: float = 9.0, height: float = 5.5, ncols: int = 1
) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _draw_cdfs(
    ax: Axes, curves: Sequence[tuple[str, HdrHistogram, str | None]], xlabel: str
) -> None:
    """One CDF step line per curve on a log x axis; zero values drawn at the left edge."""
    points = [_cdf_us(hist) for _, hist, _ in curves]
    positive = [x for xs, _ in points for x in xs if x > 0]
    floor = min(positive) / 2 if positive else 1e-3
    has_zero = any(x <= 0 for xs, _ in points for x in xs)
    for (name, hist, color), (xs, ys) in zip(curves, points, strict=True):
        xs = [max(x, floor) for x in xs]
        ax.step(xs, ys, where="post", color=color, linewidth=1.6, label=_label(name, hist))
    ax.set_xscale("log")
    if has_zero:
        ax.set_xlim(left=floor)
        xlabel += "; 0 drawn at left edge"
    ax.set_xlabel(xlabel)
    ax.set_ylim(0.0, 1.02)
    for level in (0.5, 0.9, 0.99):
        ax.axhline(level, color="0.6", linewidth=0.7, linestyle=":", zorder=0)
    ax.grid(True, which="major", axis="x", color="0.88", linewidth=0.7)
    ax.set_ylabel("fraction of events ≤ x")
    ax.legend(loc="upper left", fontsize="small", framealpha=0.9)


def _lateness_cdf(timer: Iterable[tuple[str, Run]], colors: dict[str, str]) -> Figure | None:
    curves = [
        (name, hist, colors.get(name))
        for name, run in timer
        if (hist := _merged(run, "lateness_hdr")) is not None
    ]
    if not curves:
        return None
    fig, (ax,) = _new_figure()
    _draw_cdfs(ax, curves, "timer lateness (µs, log scale)")
    ax.set_title("Timer lateness CDF per timer mode (all vCPUs merged)")
    return fig


def _exits_per_event(timer: Iterable[tuple[str, Run]]) -> Figure | None:
    rows = [
        (name, {str(k): float(v) for k, v in by_kind.items()})
        for name, run in timer
        if isinstance(by_kind := (run.get("metrics") or {}).get("exits_per_event_by_kind"), dict)
    ]
    kinds = sorted({k for _, by_kind in rows for k, v in by_kind.items() if v > 0})
    if not kinds:
        return None
    fig, (ax,) = _new_figure(width=max(6.0, 1.1 * len(rows) + 3.5))
    xs = list(range(len(rows)))
    bottoms = [0.0] * len(rows)
    for i, kind in enumerate(kinds):
        heights = [by_kind.get(kind, 0.0) for _, by_kind in rows]
        ax.bar(xs, heights, 0.65, bottom=bottoms, label=kind, color=_color(i), edgecolor="white")
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    for x, total in zip(xs, bottoms, strict=True):
        ax.annotate(
            f"{total:.3g}",
            (x, total),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize="small",
        )
    ax.set_xticks(xs, [name for name, _ in rows], rotation=20, ha="right")
    ax.set_ylim(0.0, max(bottoms) * 1.12)
    ax.set_xlabel("timer mode")
    ax.set_ylabel("VM exits per timer event (steady state)")
    ax.set_title("VM exits per timer event, by exit kind")
    ax.grid(True, axis="y", color="0.88", linewidth=0.7)
    ax.set_axisbelow(True)
    ax.legend(title="exit kind", fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def _ipi_latency(ipi: Sequence[tuple[str, Run]]) -> Figure | None:
    panels = [
        ("ipi_hdr", "IPI latency: csd queued → function ran", "IPI latency (µs, log scale)"),
        ("call_hdr", "smp_call_function duration", "call duration (µs, log scale)"),
    ]
    curves = [
        [
            (name, hist, _color(i))
            for i, (name, run) in enumerate(ipi)
            if (hist := _merged(run, key)) is not None
        ]
        for key, _, _ in panels
    ]
    if not any(curves):
        return None
    fig, axes = _new_figure(width=13.0, ncols=2)
    for ax, (_, title, xlabel), panel in zip(axes, panels, curves, strict=True):
        if panel:
            _draw_cdfs(ax, panel, xlabel)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            ax.set_ylabel("fraction of events ≤ x")
            ax.set_xlabel(xlabel)
        ax.set_title(title)
    fig.suptitle("IPI paths: latency CDF per IPI variant (all vCPUs merged)")
    return fig


def _lateness_over_time(timer: Iterable[tuple[str, Run]], colors: dict[str, str]) -> Figure | None:
    series = [(name, pts) for name, run in timer if (pts := _timeline(run))[0]]
    if not series:
        return None
    fig, (ax,) = _new_figure(width=10.0)
    for name, (ts, lat) in series:
        ax.scatter(
            ts,
            lat,
            s=6,
            alpha=0.5,
            linewidths=0,
            color=colors.get(name),
            label=f"{name} ({len(ts)} points)",
            rasterized=True,
        )
    if min(v for _, (_, lat) in series for v in lat) > 0:
        ax.set_yscale("log")
        ax.set_ylabel("lateness (µs, log scale)")
    else:
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylabel("lateness (µs, symmetric log; linear within ±1 µs)")
    ax.set_xlabel("guest time (s)")
    ax.set_title("Timer lateness over time per timer mode (decimated, all vCPUs)")
    ax.grid(True, color="0.9", linewidth=0.7)
    ax.set_axisbelow(True)
    ax.legend(loc="upper right", fontsize="small", markerscale=3, framealpha=0.9)
    return fig


# ---------------------------------------------------------------------- chaos (issue 10)

#: fault kinds in the order and colours of the chaos plot's shading
_FAULT_COLORS = {
    "stop": "#d62728",
    "host-stop": "#9467bd",
    "window": "#ff7f0e",
    "crash": "#000000",
    "link": "#17becf",
}


def write_chaos_plot(history: list[dict[str, Any]], path: str) -> str | None:
    """``vtick chaos --plots``: one run's timer lateness over time, one panel per vCPU,
    with the fault windows shaded on the vCPU they hit (a host stop on every panel).

    Points are the history's ``timer-fire`` events (every callback, not a sample), x in
    seconds of guest ktime (0 = the host's start), y the lateness in ms on a symmetric
    log axis.  Returns the path, or None (nothing written) when no timer fired.
    """
    run = history[0]["value"] if history and history[0]["f"] == "run" else {}
    origin = run.get("ktime_epoch") or (history[0]["time"] if history else 0)
    points: dict[int, tuple[list[float], list[float]]] = {}
    faults: list[tuple[str, int, float, float]] = []
    opened: dict[Any, dict[str, Any]] = {}
    for e in history:
        if e["f"] == "timer-fire":
            xs, ys = points.setdefault(e["vcpu"], ([], []))
            xs.append((e["time"] - origin) / 1e9)
            ys.append(e["value"]["late_ns"] / 1e6)
        elif e["f"] == "fault":
            key = (e["value"].get("kind"), e["value"].get("fault"))
            if e["type"] == "invoke":
                opened[key] = e
            elif key in opened:
                start = opened.pop(key)
                faults.append(
                    (
                        e["value"].get("kind", "?"),
                        int(e["value"].get("target", -1)),
                        (start["time"] - origin) / 1e9,
                        (e["time"] - origin) / 1e9,
                    )
                )
    if not points:
        return None
    vcpus = sorted(points)
    fig = Figure(figsize=(11.0, 1.0 + 1.9 * len(vcpus)), layout="constrained")
    axes = fig.subplots(len(vcpus), 1, sharex=True, squeeze=False)[:, 0]
    shown: set[str] = set()
    for ax, vcpu in zip(axes, vcpus, strict=True):
        for kind, target, a, b in faults:
            if target not in (vcpu, -1):
                continue
            label = None if kind in shown else kind
            shown.add(kind)
            ax.axvspan(a, max(b, a + 1e-4), color=_FAULT_COLORS.get(kind, "0.5"), alpha=0.25,
                       linewidth=0, label=label)  # fmt: skip
        xs, ys = points[vcpu]
        ax.scatter(xs, ys, s=4, color="#1f77b4", linewidths=0, rasterized=True)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylabel(f"vCPU {vcpu}\nlateness (ms)")
        ax.grid(True, color="0.9", linewidth=0.7)
        ax.set_axisbelow(True)
    axes[-1].set_xlabel("guest time (s); shaded: faults on that vCPU or the host")
    cfg = run.get("config", {})
    fig.suptitle(
        f"Chaos run seed {cfg.get('seed')}: {cfg.get('mode')}, {cfg.get('ipi')}, "
        f"{cfg.get('vcpus')} vCPUs: timer lateness with the faults"
    )
    if shown:
        fig.legend(loc="outside right upper", fontsize="small", title="fault")
    fig.savefig(path, dpi=_DPI, format="png")
    return path


# ---------------------------------------------------------------------- --explain (issue 15)


def _lateness_breakdown(timer: Sequence[tuple[str, Run]]) -> Figure | None:
    from vtick.host.chaos.explain import PARTS

    rows = [
        (name, explained)
        for name, run in timer
        if (explained := (run.get("results") or {}).get("explain")) and explained.get("events")
    ]
    if not rows:
        return None
    fig, axes = _new_figure(width=13.0, height=max(3.0, 0.55 * len(rows) + 2.0), ncols=2)
    for ax, key, title in zip(
        axes,
        ("mean_ns", "worst_mean_ns"),
        ("all timer events (mean)", "the worst 1 % (mean)"),
        strict=True,
    ):
        ys = list(range(len(rows)))
        lefts = [0.0] * len(rows)
        for i, part in enumerate(PARTS):
            widths = [(explained.get(key) or {}).get(part, 0) / 1e3 for _, explained in rows]
            ax.barh(ys, widths, 0.6, left=lefts, label=part, color=_color(i), edgecolor="white")
            lefts = [a + w for a, w in zip(lefts, widths, strict=True)]
        ax.set_yticks(ys, [name for name, _ in rows])
        ax.invert_yaxis()
        ax.set_xlabel("lateness (µs), split along the path")
        ax.set_title(title)
        ax.grid(True, axis="x", color="0.9", linewidth=0.7)
        ax.set_axisbelow(True)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    fig.suptitle("Where timer lateness goes, per timer mode (vtick run --explain)")
    return fig
