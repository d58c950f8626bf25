"""``vtick chaos --experiment preempt-window``: the 2007 argument, measured.

Theory of operation
-------------------
A relative delta is correct only at the instant it is computed (``docs/design.md``
section 1): a vCPU preempted for W between computing ``expires - now`` and handing it to
the device programs a timer that fires W late, where an absolute expiry does not move.
The experiment injects exactly that window, at the guest's
``clockevents.delta_to_device`` preemption point (slept with ns resolution,
``proto/timerfd.py``), on every pass, for every timer mode and W in
:data:`WINDOWS_NS` (0, 100 us, 1 ms, 10 ms), each an ordinary run (``launch``: fresh host
and vCPUs, the timer storm), and reports the *extra* lateness: the median lateness with
the window minus the median without it, per mode.  The median, because a stall moves it
least (a mean would carry every scheduling hiccup of a loaded machine).

What Linux's order of operations predicts (:data:`PREDICTION`): the LAPIC one-shot modes
and ``pv-delta`` pass the point with a relative delta, so they are late by about W;
``tsc-deadline`` and ``vmi`` turn the delta into an absolute TSC value only inside the
driver (``rdtsc + delta``), after the point, so they are late by W too; ``pv-ktime`` and
``pv-future`` hand the absolute expiry to the device and never pass the point;
``lapic-periodic`` programs nothing per event.  The table shows the measurement next to
the prediction; nothing here is asserted, it is measured.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from vtick.proto.catalog import PREEMPT_DELTA_TO_DEVICE

__all__ = ["WINDOWS_NS", "PREDICTION", "preempt_window_main", "extra_lateness", "write_plot"]

WINDOWS_NS = (0, 100_000, 1_000_000, 10_000_000)
#: late by about the window (True) or not late (False), from Linux's order of operations
PREDICTION = {
    "lapic-xapic": True,
    "lapic-x2apic": True,
    "lapic-periodic": False,
    "tsc-deadline": True,
    "vmi": True,
    "pv-ktime": False,
    "pv-delta": True,
    "pv-future": False,
}


def extra_lateness(p50: dict[int, int | None]) -> dict[int, int | None]:
    """Median lateness per window -> extra lateness over the window-0 run."""
    base = p50.get(0)
    return {w: None if v is None or base is None else v - base for w, v in p50.items() if w}


def _fmt(ns: int | None) -> str:
    if ns is None:
        return "-"
    if abs(ns) >= 1_000_000:
        return f"{ns / 1e6:+.2f} ms"
    return f"{ns / 1e3:+.0f} us"


def _window(ns: int) -> str:
    return f"{ns / 1e6:g} ms" if ns >= 1_000_000 else f"{ns / 1e3:g} us"


def _judge(mode: str, extra: dict[int, int | None]) -> str:
    """Does the measurement follow the prediction at the largest window?"""
    w = max(extra)
    got = extra[w]
    if got is None:
        return "no data"
    late = got >= w // 2
    if late == PREDICTION.get(mode, late):
        return "as predicted"
    return "NOT as predicted"


def preempt_window_main(args: argparse.Namespace, console: Any) -> int:
    """Run the sweep, print the table, write the plot; 0 when every run worked."""
    import trio
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from vtick.host.lab.launcher import RunFailed, RunInterrupted, RunOptions, launch
    from vtick.host.lab.metrics import run_metrics

    modes = list(args.modes)
    p50: dict[str, dict[int, int | None]] = {m: {} for m in modes}
    failed: list[str] = []
    total = len(modes) * len(WINDOWS_NS)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("preempt-window", total=total)
        for mode in modes:
            for w in WINDOWS_NS:
                progress.update(task, description=f"{mode}, window {_window(w)}")
                opts = RunOptions(
                    vcpus=args.vcpus,
                    duration_s=args.duration,
                    seed=args.seed,
                    workload="timers",
                    mode=mode,
                    preempt={PREEMPT_DELTA_TO_DEVICE: w} if w else {},
                    params=dict(args.param),
                    mutations=tuple(args.mutate),
                )
                try:
                    results = trio.run(launch, opts)
                except RunInterrupted as exc:
                    console.print(f"interrupted by {exc.signal_name}")
                    return 130 if exc.signal_name == "SIGINT" else 143
                except RunFailed as exc:
                    failed.append(f"{mode} at {_window(w)}: {exc}")
                    p50[mode][w] = None
                else:
                    lateness = run_metrics(results).get("lateness_ns") or {}
                    p50[mode][w] = lateness.get("p50")
                progress.advance(task)
    table = Table(
        title=f"Extra lateness (median) with a preemption window at {PREEMPT_DELTA_TO_DEVICE}, "
        f"{args.vcpus} vCPUs, {args.duration:g} s per run",
        title_justify="left",
    )
    table.add_column("mode")
    table.add_column("p50, no window", justify="right")
    for w in WINDOWS_NS[1:]:
        table.add_column(f"+{_window(w)}", justify="right")
    table.add_column("prediction")
    table.add_column("measured")
    rows: dict[str, dict[int, int | None]] = {}
    for mode in modes:
        extra = extra_lateness(p50[mode])
        rows[mode] = extra
        base = p50[mode].get(0)
        table.add_row(
            mode,
            "-" if base is None else f"{base / 1e3:.0f} us",
            *[_fmt(extra.get(w)) for w in WINDOWS_NS[1:]],
            "late by ~W" if PREDICTION.get(mode) else "not late",
            _judge(mode, extra),
        )
    console.print(table)
    console.print(
        "extra = median lateness with the window minus the median without it (same mode, "
        "same seed); prediction: relative modes late by about the window W, absolute "
        "modes (pv-ktime, pv-future) and the periodic tick not late"
    )
    os.makedirs(args.out, exist_ok=True)
    path = write_plot(rows, os.path.join(args.out, "preempt_window.png"))
    if path:
        console.print(f"plot: {path}")
    with open(os.path.join(args.out, "preempt_window.json"), "w") as fh:
        import json

        json.dump({"p50_ns": p50, "windows_ns": list(WINDOWS_NS)}, fh, indent=1)
    for line in failed:
        console.print(f"failed: {line}")
    return 1 if failed else 0


def write_plot(rows: dict[str, dict[int, int | None]], path: str) -> str | None:
    """Extra lateness against the window, one line per mode, with the y = W line."""
    from matplotlib.figure import Figure

    series = {m: [(w, v) for w, v in r.items() if v is not None] for m, r in rows.items()}
    if not any(series.values()):
        return None
    fig = Figure(figsize=(9.0, 5.5), layout="constrained")
    ax = fig.subplots()
    ws = [w / 1e3 for w in WINDOWS_NS[1:]]
    ax.plot(ws, ws, color="0.6", linestyle="--", linewidth=1.0, label="late by the window")
    for i, (mode, points) in enumerate(series.items()):
        if not points:
            continue
        style = "-" if PREDICTION.get(mode) else ":"
        ax.plot(
            [w / 1e3 for w, _ in points],
            [v / 1e3 for _, v in points],
            style,
            marker="o",
            label=mode,
            color=f"C{i}",
        )
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=100.0)
    ax.set_xlabel("preemption window between computing the delta and programming (µs)")
    ax.set_ylabel("extra median lateness (µs; symlog, linear within ±100 µs)")
    ax.set_title("Absolute against relative expiry under preemption")
    ax.grid(True, color="0.9", linewidth=0.7)
    ax.legend(fontsize="small", loc="upper left")
    fig.savefig(path, dpi=120, format="png")
    return path
