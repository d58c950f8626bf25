"""The comparison tables of ``vtick run`` and the differences of ``vtick compare``.

One table per family (timer modes, IPI paths), sorted by host time per event, the
fastest path marked and every other one given as a ratio to it.  Rendered with rich.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["family_rows", "comparison_tables", "print_campaign", "compare", "print_compare"]


def _us(ns: float | None) -> str:
    return "-" if ns is None else f"{ns / 1000:.1f}"


def family_rows(campaign: dict[str, Any], family: str) -> list[dict[str, Any]]:
    """The runs of one family with their metrics, sorted by host time per event.

    Failed runs come last with their error.  The fastest successful run gets
    ``ratio`` 1.0 and ``fastest`` True; the others their host time over the fastest.
    """
    ok = [r for r in campaign["runs"] if r["family"] == family and "metrics" in r]
    failed = [r for r in campaign["runs"] if r["family"] == family and "metrics" not in r]

    def key(run: dict[str, Any]) -> float:
        host = run["metrics"]["host_ns_per_event"]
        return float("inf") if host is None else host

    ok.sort(key=key)
    best = key(ok[0]) if ok else float("inf")
    rows = []
    for run in ok:
        met = run["metrics"]
        host = met["host_ns_per_event"]
        rows.append(
            {
                "name": run["name"],
                "metrics": met,
                "fastest": host is not None and key(run) == best,
                "ratio": (host / best)
                if host is not None and best not in (0, float("inf"))
                else None,
            }
        )
    rows.extend({"name": r["name"], "error": r.get("error", "no result")} for r in failed)
    return rows


def _kinds(per_event: dict[str, float]) -> str:
    return " ".join(f"{k} {x:.2f}" for k, x in per_event.items() if x >= 0.005)


def comparison_tables(campaign: dict[str, Any]) -> list[Table]:
    cfg = campaign["config"]
    tables = []
    timer = family_rows(campaign, "timer")
    if timer:
        t = Table(
            title=f"Timer paths ({cfg['timer_workload']} workload, {cfg['vcpus']} vCPUs, "
            f"{cfg['duration_s']} s each), sorted by host time per event",
            caption="event = one timer callback; exits of boot and calibration excluded; "
            "lateness = handler time - requested expiry (guest ktime)",
        )
        for col in ("mode", "exits/event", "by kind", "guest us/ev", "host us/ev"):
            t.add_column(col, justify="left" if col in ("mode", "by kind") else "right")
        if any("modeled_host_ns_per_event" in r.get("metrics", {}) for r in timer):
            t.add_column("modeled us/ev", justify="right")
        for col in ("late p50 us", "p99", "p99.9", "early", "events/s", "vs fastest"):
            t.add_column(col, justify="right")
        for row in timer:
            if "error" in row:
                t.add_row(row["name"], f"[red]failed: {row['error']}[/red]")
                continue
            met = row["metrics"]
            late = met["lateness_ns"] or {}
            cells = [
                ("★ " if row["fastest"] else "") + row["name"],
                f"{met['exits_per_event']:.2f}",
                _kinds(met["exits_per_event_by_kind"]),
                _us(met["guest_ns_per_event"]),
                _us(met["host_ns_per_event"]),
            ]
            if len(t.columns) == 12:
                cells.append(_us(met.get("modeled_host_ns_per_event")))
            cells += [
                _us(late.get("p50")),
                _us(late.get("p99")),
                _us(late.get("p99.9")),
                str(met["early"]),
                f"{met['events_per_s']:.0f}",
                "fastest" if row["fastest"] else f"x{row['ratio']:.2f}" if row["ratio"] else "-",
            ]
            t.add_row(*cells)
        tables.append(t)
    ipi = family_rows(campaign, "ipi")
    if ipi:
        t = Table(
            title=f"IPI paths (IPI storm: every vCPU calls smp_call_function on the others, "
            f"{cfg['vcpus']} vCPUs), sorted by host time per call",
            caption="event = one smp_call_function(wait) call, counting the sender's and "
            "the targets' exits; IPI latency = csd queued -> function ran on the target",
        )
        modeled = any("modeled_host_ns_per_event" in r.get("metrics", {}) for r in ipi)
        for col in (
            "IPI path",
            "exits/call",
            "by kind",
            "host us/call",
            *(("modeled us/call",) if modeled else ()),
            "call p50 us",
            "call p99",
            "IPI p50 us",
            "IPI p99",
            "calls/s",
            "vs fastest",
        ):
            t.add_column(col, justify="left" if col in ("IPI path", "by kind") else "right")
        for row in ipi:
            if "error" in row:
                t.add_row(row["name"], f"[red]failed: {row['error']}[/red]")
                continue
            met = row["metrics"]
            call = met["call_latency_ns"] or {}
            lat = met["ipi_latency_ns"] or {}
            t.add_row(
                ("★ " if row["fastest"] else "") + row["name"],
                f"{met['exits_per_event']:.2f}",
                _kinds(met["exits_per_event_by_kind"]),
                _us(met["host_ns_per_event"]),
                *((_us(met.get("modeled_host_ns_per_event")),) if modeled else ()),
                _us(call.get("p50")),
                _us(call.get("p99")),
                _us(lat.get("p50")),
                _us(lat.get("p99")),
                f"{met['events_per_s']:.0f}",
                "fastest" if row["fastest"] else f"x{row['ratio']:.2f}" if row["ratio"] else "-",
            )
        tables.append(t)
    return tables


def print_campaign(campaign: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    for table in comparison_tables(campaign):
        console.print(table)
    calib = [
        (r["name"], c)
        for r in campaign["runs"]
        if "metrics" in r
        for c in r["metrics"]["calibration"]
    ]
    if calib:
        worst = max(calib, key=lambda nc: abs(nc[1]["error_pct"]))
        rescaled = sum(1 for _, c in calib if c.get("rescaled"))
        console.print(
            f"LAPIC calibration against the PIT/TSC: worst error {worst[1]['error_pct']:+.3f}% "
            f"({worst[0]}, vCPU {worst[1]['vcpu']}) over {len(calib)} calibrations"
            + (f"; {rescaled} PIT interval(s) rescaled by the TSC check" if rescaled else "")
        )
    errors = [
        (r["name"], e)
        for r in campaign["runs"]
        if "metrics" in r
        for e in r["metrics"]["link_errors"]
    ]
    for name, err in errors:
        console.print(f"[red]{name}: {err}[/red]")


# ---------------------------------------------------------------------- vtick compare

_COMPARED = (
    ("exits_per_event", "exits/event", 1.0),
    ("guest_ns_per_event", "guest us/event", 1e-3),
    ("host_ns_per_event", "host us/event", 1e-3),
    ("events_per_s", "events/s", 1.0),
)


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (family, path) present in both files: each headline metric in A and B."""
    index_b = {(r["family"], r["name"]): r for r in b.get("runs", []) if "metrics" in r}
    out = []
    for run in a.get("runs", []):
        other = index_b.get((run["family"], run["name"]))
        if "metrics" not in run or other is None:
            continue
        ma, mb = run["metrics"], other["metrics"]
        row: dict[str, Any] = {"family": run["family"], "name": run["name"], "metrics": {}}
        for key, label, scale in _COMPARED:
            va, vb = ma.get(key), mb.get(key)
            if va is None or vb is None:
                continue
            row["metrics"][label] = (va * scale, vb * scale)
        for key, label in (("lateness_ns", "late p99 us"), ("call_latency_ns", "call p99 us")):
            pa, pb = ma.get(key), mb.get(key)
            if pa and pb:
                row["metrics"][label] = (pa["p99"] / 1000, pb["p99"] / 1000)
        out.append(row)
    return out


def print_compare(
    a: dict[str, Any], b: dict[str, Any], names: tuple[str, str], console: Console | None = None
) -> None:
    console = console or Console()
    for side, doc in zip(names, (a, b), strict=True):
        env = doc.get("environment", {})
        console.print(
            f"{side}: vtick {env.get('versions', {}).get('vtick')}, Python {env.get('python')}, "
            f"{env.get('platform')}, {env.get('cpu_count')} CPUs, {env.get('started')}"
        )
    rows = compare(a, b)
    if not rows:
        console.print("no path appears in both files")
        return
    table = Table(title=f"{names[0]} -> {names[1]}")
    for col in ("path", "metric", "A", "B", "change"):
        table.add_column(col, justify="left" if col in ("path", "metric") else "right")
    for row in rows:
        for label, (va, vb) in row["metrics"].items():
            change = "" if va == 0 else f"{(vb - va) / va * 100:+.1f}%"
            table.add_row(f"{row['family']}/{row['name']}", label, f"{va:.2f}", f"{vb:.2f}", change)
    console.print(table)
