"""The terminal report of ``vtick run --topology``: each VM's table, how much the VMs
slowed each other, and each cross-machine link's clock.

Each VM's table is the ordinary ``vtick run`` table (host/lab/report.py) with that VM as
its one row, so its columns read the same as in the main job.  The interference table
puts each VM's run beside the others against the same VM run alone: events/s, lateness
(or call latency) p99, host µs per event and the exit round trip, with the ratio
together/alone (for events/s alone/together, so > 1 always means "slowed").  The clock
table lists every link whose clocks were not one: the tracked offset, drift, error
bound and corrections (host/topology/clocktrack.py).  A VM that migrates (issue 13) gets a
row in the migration table: whether it moved and its ``blackout_*`` figures
(host/migration/destination.py), or why the move failed (the VM then ran on at its source).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from vtick.host.lab.report import comparison_tables, duration_text
from vtick.proto.cliargs import vcpu_ranges

__all__ = ["print_topology", "vm_campaign", "migration_table"]


def vm_campaign(vm: dict[str, Any]) -> dict[str, Any]:
    """One VM's together run as a one-row campaign document for host/lab/report.py."""
    cfg = vm["config"]
    family = "ipi" if cfg["workload"] == "ipi" else "timer"
    label = (cfg["ipi"] or "ipi") if family == "ipi" else cfg["mode"]
    return {
        "config": {
            "vcpus": cfg["vcpus"],
            "exit_cost": cfg.get("exit_cost"),
            "duration_s": cfg["duration_s"],
            "timer_workload": cfg["workload"],
            "modes": [cfg["mode"]] if family == "timer" else [],
            "ipis": [label] if family == "ipi" else [],
        },
        "runs": [
            {
                "family": family,
                "name": f"{vm['name']}: {label}",
                "metrics": vm["metrics"],
                "results": vm["results"],
            }
        ],
    }


def _headline(vm: dict[str, Any]) -> Text:
    cfg = vm["config"]
    where = "; ".join(
        f"vCPU {vcpu_ranges(ids)} on {machine}" for machine, ids in vm["placement"].items()
    )
    what = cfg["workload"] if cfg["workload"] != "timers" else f"{cfg['mode']} timers"
    mig = vm.get("migration")
    moves = f"; moves to {mig['to']} at {mig['at_s']:g} s over {mig['transport']}" if mig else ""
    return Text(
        f"VM {vm['name']}: {what}, {cfg['vcpus']} vCPUs; host on {vm['host']}; {where}; "
        f"{vm['transport']}{moves}",
        style="bold",
    )


def _fits(console: Console, renderable: RenderableType) -> bool:
    parts = renderable.renderables if isinstance(renderable, Group) else [renderable]
    unbounded = console.options.update(width=100_000)
    return all(
        Measurement.get(console, unbounded, t).maximum <= console.width
        for t in parts
        if isinstance(t, Table)
    )


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"x{value:.2f}"


def _p99(met: dict[str, Any] | None) -> float | None:
    if not met:
        return None
    lat = met.get("lateness_ns") or met.get("call_latency_ns") or {}
    return lat.get("p99")


def interference_table(vms: list[dict[str, Any]]) -> Table:
    table = Table(
        title="How much the VMs slowed each other (together against alone)",
        title_justify="left",
    )
    for title in ("VM", "events/s alone", "together", "slowed"):
        table.add_column(title, justify="left" if title == "VM" else "right")
    for title in ("p99 alone", "together", "ratio", "host us alone", "together", "ratio"):
        table.add_column(title, justify="right")
    table.add_column("exit rtt alone", justify="right")
    table.add_column("together", justify="right")
    table.add_column("ratio", justify="right")
    for vm in vms:
        alone = (vm.get("alone") or {}).get("metrics")
        met = vm.get("metrics")
        slow = vm.get("slowdown") or {}
        if met is None or alone is None:
            why = vm.get("error") or (vm.get("alone") or {}).get("error") or "no run"
            table.add_row(vm["name"], Text(why, style="red"))
            continue

        def host_us(m: dict[str, Any]) -> str:
            v = m.get("host_p50_ns_per_event")
            return "-" if v is None else f"{v / 1e3:.1f}"

        table.add_row(
            vm["name"],
            f"{alone['events_per_s']:.0f}",
            f"{met['events_per_s']:.0f}",
            _ratio(slow.get("events_per_s")),
            duration_text(_p99(alone)),
            duration_text(_p99(met)),
            _ratio(slow.get("lateness_p99")),
            host_us(alone),
            host_us(met),
            _ratio(slow.get("host_us_per_event")),
            duration_text(alone.get("exit_rtt_ns")),
            duration_text(met.get("exit_rtt_ns")),
            _ratio(slow.get("exit_rtt")),
        )
    return table


def clock_table(vms: list[dict[str, Any]]) -> Table | None:
    rows = [
        (vm["name"], link)
        for vm in vms
        for link in vm.get("clock") or []
        if not link.get("one_clock", True)
    ]
    if not rows:
        return None
    table = Table(title="Clock tracking of the links whose clocks differ", title_justify="left")
    for title in ("VM", "vCPU", "offset", "drift ppm", "error bound", "min rtt", "corrections"):
        table.add_column(title, justify="left" if title == "VM" else "right")
    for name, link in rows:
        table.add_row(
            name,
            str(link["vcpu"]),
            f"{link['offset_ns'] / 1e9:+.6f}s",
            f"{link['drift_ppb'] / 1e3:+.2f}",
            duration_text(link.get("bound_ns")),
            duration_text(link.get("min_rtt_ns")),
            str(link.get("corrections", 0)),
        )
    return table


def migration_table(vms: list[dict[str, Any]]) -> Table | None:
    """One row per VM that migrates: did it move, its blackout and what the move delayed."""
    rows = [vm for vm in vms if vm.get("migration")]
    if not rows:
        return None
    table = Table(title="Migrations (issue 13)", title_justify="left")
    for title in ("VM", "move", "at", "moved"):
        table.add_column(title, justify="left" if title != "at" else "right")
    for title in (
        "blackout",
        "freeze to ready",
        "ready to resumed",
        "state",
        "late timers",
        "late max",
    ):
        table.add_column(title, justify="right")
    for vm in rows:
        mig = vm["migration"]
        move = f"{vm['host']} -> {mig['to']} ({mig['transport']})"
        res = vm.get("results")
        if res is None:
            table.add_row(vm["name"], move, f"{mig['at_s']:g}s", Text("no run", style="red"))
            continue
        record = res.get("migration") or {}
        if record.get("role") != "destination":
            why = record.get("error") or "the source never tried"
            table.add_row(vm["name"], move, f"{mig['at_s']:g}s", Text(f"no: {why}", style="red"))
            continue
        phases = res.get("blackout_phases_ns") or {}
        size = res.get("blackout_state_bytes")
        table.add_row(
            vm["name"],
            move,
            f"{mig['at_s']:g}s",
            Text("yes", style="green"),
            duration_text(res.get("blackout_ns")),
            duration_text(phases.get("freeze_to_ready")),
            duration_text(phases.get("ready_to_resumed")),
            "-" if size is None else f"{size / 1e3:.1f} KB",
            str(res.get("blackout_late_timers", "-")),
            duration_text(res.get("blackout_late_max_ns")),
        )
    return table


def print_topology(doc: dict[str, Any], console: Console, wide: bool | None = None) -> None:
    """Each VM's table, the interference and clock tables, the status line."""
    for vm in doc["vms"]:
        console.print(_headline(vm))
        if "metrics" not in vm:
            console.print(Text(f"  failed: {vm.get('error', 'no result')}", style="red"))
            continue
        campaign = vm_campaign(vm)
        full = comparison_tables(campaign, wide=True)
        use_wide = wide if wide is not None else all(_fits(console, r) for r in full)
        for renderable in full if use_wide else comparison_tables(campaign, wide=False):
            console.print(renderable)
    if any("alone" in vm for vm in doc["vms"]):
        console.print(interference_table(doc["vms"]))
        console.print(
            "slowed: events/s alone / together; the other ratios together / alone "
            "(> 1: worse beside the other VMs)"
        )
    moves = migration_table(doc["vms"])
    if moves is not None:
        console.print(moves)
    clocks = clock_table(doc["vms"])
    if clocks is not None:
        console.print(clocks)
    bad = [f"{vm['name']} ({_problem(vm)})" for vm in doc["vms"] if not vm.get("ok")]
    if doc.get("interrupted"):
        line, style = f"status: INTERRUPTED ({doc['interrupted']})", "bold red"
    elif bad:
        line, style = (
            f"status: {len(bad)} of {len(doc['vms'])} VMs had errors: " + "; ".join(bad),
            "bold red",
        )
    else:
        n = len(doc["vms"])
        line, style = f"status: ok, {n} VM{'' if n == 1 else 's'}", "green"
    if (doc.get("cleanup") or {}).get("namespaces_left"):
        line += f"; namespaces left behind: {', '.join(doc['cleanup']['namespaces_left'])}"
    console.print(Text(line, style=style))


def _problem(vm: dict[str, Any]) -> str:
    if vm.get("error"):
        return str(vm["error"])
    problems = (vm.get("metrics") or {}).get("problems") or []
    if problems:
        return ", ".join(problems)
    return f"alone: {(vm.get('alone') or {}).get('error', 'no result')}"
