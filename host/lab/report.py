"""The comparison tables of ``vtick run`` and the differences of ``vtick compare``.

Theory of operation
-------------------
One table per family (timer modes, IPI paths).  Its rows are ranked by one statistic,
named under the table:

* with an exit-cost profile (``--exit-cost``), the modeled host cost per event: the
  profile is the user's statement of what an exit costs, so it decides;
* otherwise the host time per event built from each exit kind's *median* handling time
  (``host_p50_ns_per_event``): one stall (the host stopped in the middle of an exit)
  moves a mean by tens of µs per event and a median not at all.

The best path gets the ★ and the others their ratio to it.  A family is *not* ranked when
any of its paths was overloaded (``metrics.overload``: the machine did not keep up, so its
figures measure a queue); the table says so and why.  Under each table: which column
ranks, the stalls the run saw (``metrics.stalls``), real errors and calls cut off by the
end of the run.  Failed paths come last with their error.

Two layouts.  The full table has every column; the compact one (path, exits per
interrupt or per call, host µs, latency p50/p99/max, errors, ratio) fits 80 columns.  The
full table is printed when it fits the console or with ``--wide``.  No cell is ever cut:
numeric columns fold instead of truncating, and the compact table writes durations with
their unit (``850us``, ``7.26ms``, ``3.00s``) so that seconds-long stalls fit too.
Rendered with rich.
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from vtick.proto.cliargs import vcpu_ranges

__all__ = [
    "family_rows",
    "rank_basis",
    "comparison_tables",
    "print_campaign",
    "campaign_status",
    "compare",
    "print_compare",
    "duration_text",
]

FAMILIES = ("timer", "ipi")


def _us(ns: float | None) -> str:
    return "-" if ns is None else f"{ns / 1000:.1f}"


def duration_text(ns: float | None) -> str:
    """A duration with its unit in at most 7 characters: 850ns, 5.3us, 850us, 7.26ms,
    12.3ms, 123ms, 3.00s."""
    if ns is None:
        return "-"
    if ns < 1_000:
        return f"{ns:.0f}ns"
    if ns < 10_000:
        return f"{ns / 1e3:.1f}us"
    if ns < 1_000_000:
        return f"{ns / 1e3:.0f}us"
    if ns < 10_000_000:
        return f"{ns / 1e6:.2f}ms"
    if ns < 100_000_000:
        return f"{ns / 1e6:.1f}ms"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.0f}ms"
    return f"{ns / 1e9:.2f}s"


def rank_basis(campaign: dict[str, Any]) -> tuple[str, str]:
    """(metric key, what to say under the table) of the statistic that ranks."""
    if campaign.get("config", {}).get("exit_cost"):
        return (
            "modeled_host_ns_per_event",
            f"the modeled host cost of the {campaign['config']['exit_cost']} profile "
            "(modeled us), not vtick's own host time",
        )
    return (
        "host_p50_ns_per_event",
        "host us: Σ over exit kinds of exits per event × the kind's median host "
        "handling time (a stall cannot move a median)",
    )


def _rank_value(met: dict[str, Any], key: str) -> float | None:
    value = met.get(key)
    if value is None and key == "host_p50_ns_per_event":
        value = met.get("host_ns_per_event")  # results of a vtick without histograms
    return value


def family_rows(campaign: dict[str, Any], family: str) -> list[dict[str, Any]]:
    """The runs of one family with their metrics, best first, failed runs last.

    Each row has ``name`` and either ``error`` or ``metrics``, ``rank`` (the ranking
    statistic), ``fastest`` and ``ratio`` (to the best).  When a path of the family was
    overloaded, nothing is ranked: rows keep the campaign's order, ``fastest`` is False
    and ``ratio`` None.
    """
    key, _ = rank_basis(campaign)
    ok = [r for r in campaign["runs"] if r["family"] == family and "metrics" in r]
    failed = [r for r in campaign["runs"] if r["family"] == family and "metrics" not in r]
    ranked = not any(r["metrics"].get("overload") for r in ok)

    def value(run: dict[str, Any]) -> float:
        v = _rank_value(run["metrics"], key)
        return float("inf") if v is None else v

    if ranked:
        ok = sorted(ok, key=value)
    best = value(ok[0]) if ok and ranked else float("inf")
    rows: list[dict[str, Any]] = []
    for run in ok:
        v = value(run)
        finite = v != float("inf")
        rows.append(
            {
                "name": run["name"],
                "metrics": run["metrics"],
                "rank": v if finite else None,
                "fastest": ranked and finite and v == best,
                "ratio": v / best if ranked and finite and best not in (0, float("inf")) else None,
            }
        )
    rows.extend({"name": r["name"], "error": r.get("error", "no result")} for r in failed)
    return rows


# ---------------------------------------------------------------------- the tables


def _kinds(per_event: dict[str, float]) -> str:
    return " ".join(f"{k} {x:.2f}" for k, x in per_event.items() if x >= 0.005)


def _ratio(row: dict[str, Any]) -> str:
    if row["fastest"]:
        return "best"
    return f"x{row['ratio']:.2f}" if row["ratio"] else "-"


def _name(row: dict[str, Any]) -> str:
    return ("★ " if row.get("fastest") else "") + row["name"]


def _num(table: Table, title: str) -> None:
    # a number must never be cut: fold it over two lines rather than end it with "…"
    table.add_column(title, justify="right", overflow="fold", no_wrap=False)


def _text(table: Table, title: str) -> None:
    table.add_column(title, justify="left", overflow="fold")


def _layout(wide: bool) -> dict[str, Any]:
    if wide:
        return {"box": box.HEAVY_HEAD}
    # compact: no vertical rules, no padding: the box puts one space between columns
    return {"box": box.SIMPLE_HEAD, "show_edge": False, "padding": (0, 0)}


def _timer_table(campaign: dict[str, Any], rows: list[dict[str, Any]], wide: bool) -> Table:
    cfg = campaign["config"]
    modeled = bool(cfg.get("exit_cost"))
    t = Table(
        title=f"Timer paths ({cfg['timer_workload']} workload, {cfg['vcpus']} vCPUs, "
        f"{cfg['duration_s']:g} s each)",
        **_layout(wide),
    )
    if wide:
        _text(t, "mode")
        for col in ("exits/event", "exits/irq"):
            _num(t, col)
        _text(t, "by kind")
        for col in ("guest us/ev", "host mean us/ev", "host us/ev"):
            _num(t, col)
        if modeled:
            _num(t, "modeled us/ev")
        for col in ("late p50 us", "p99", "p99.9", "max", "early", "events/s", "vs best"):
            _num(t, col)
    else:
        _text(t, "mode")
        # the compact table shows the column that ranks: modeled cost with a profile
        for col in ("exits/ev", "exits/irq", "model us" if modeled else "host us"):
            _num(t, col)
        for col in ("late p50", "p99", "max", "vs best"):
            _num(t, col)
    for row in rows:
        if "error" in row:
            t.add_row(row["name"], Text(f"failed: {row['error']}", style="red"))
            continue
        met = row["metrics"]
        late = met.get("lateness_ns") or {}
        per_irq = met.get("exits_per_interrupt")
        irq = "-" if per_irq is None else f"{per_irq:.2f}"
        host = _us(met.get("host_p50_ns_per_event") or met.get("host_ns_per_event"))
        if wide:
            t.add_row(
                _name(row),
                f"{met['exits_per_event']:.2f}",
                irq,
                _kinds(met["exits_per_event_by_kind"]),
                _us(met["guest_ns_per_event"]),
                _us(met["host_ns_per_event"]),
                host,
                *((_us(met.get("modeled_host_ns_per_event")),) if modeled else ()),
                _us(late.get("p50")),
                _us(late.get("p99")),
                _us(late.get("p99.9")),
                _us(late.get("max")),
                str(met["early"]),
                f"{met['events_per_s']:.0f}",
                _ratio(row),
            )
        else:
            t.add_row(
                _name(row),
                f"{met['exits_per_event']:.2f}",
                irq,
                _us(met.get("modeled_host_ns_per_event")) if modeled else host,
                duration_text(late.get("p50")),
                duration_text(late.get("p99")),
                duration_text(late.get("max")),
                _ratio(row),
            )
    return t


def _ipi_table(campaign: dict[str, Any], rows: list[dict[str, Any]], wide: bool) -> Table:
    cfg = campaign["config"]
    modeled = bool(cfg.get("exit_cost"))
    t = Table(
        title=f"IPI paths (IPI storm: every vCPU calls smp_call_function on the others, "
        f"{cfg['vcpus']} vCPUs, {cfg['duration_s']:g} s each)",
        **_layout(wide),
    )
    if wide:
        _text(t, "IPI path")
        _num(t, "exits/call")
        _text(t, "by kind")
        for col in ("host mean us/call", "host us/call"):
            _num(t, col)
        if modeled:
            _num(t, "modeled us/call")
        for col in ("call p50 us", "call p99", "call max", "IPI p50 us", "IPI p99"):
            _num(t, col)
        for col in ("errors", "cut off", "calls/s", "vs best"):
            _num(t, col)
    else:
        _text(t, "IPI path")
        for col in ("exits/call", "model us" if modeled else "host us"):
            _num(t, col)
        for col in ("call p50", "p99", "max", "errors", "vs best"):
            _num(t, col)
    for row in rows:
        if "error" in row:
            t.add_row(row["name"], Text(f"failed: {row['error']}", style="red"))
            continue
        met = row["metrics"]
        call = met.get("call_latency_ns") or {}
        lat = met.get("ipi_latency_ns") or {}
        csds = met.get("csds") or {}
        errors = csds.get("errors", 0)
        err_cell = Text(str(errors), style="red bold") if errors else Text("0")
        host = _us(met.get("host_p50_ns_per_event") or met.get("host_ns_per_event"))
        model = _us(met.get("modeled_host_ns_per_event"))
        if wide:
            t.add_row(
                _name(row),
                f"{met['exits_per_event']:.2f}",
                _kinds(met["exits_per_event_by_kind"]),
                _us(met["host_ns_per_event"]),
                host,
                *((model,) if modeled else ()),
                _us(call.get("p50")),
                _us(call.get("p99")),
                _us(call.get("max")),
                _us(lat.get("p50")),
                _us(lat.get("p99")),
                err_cell,
                str(csds.get("cut_off_calls", 0)),
                f"{met['events_per_s']:.0f}",
                _ratio(row),
            )
        else:
            t.add_row(
                _name(row),
                f"{met['exits_per_event']:.2f}",
                model if modeled else host,
                duration_text(call.get("p50")),
                duration_text(call.get("p99")),
                duration_text(call.get("max")),
                err_cell,
                _ratio(row),
            )
    return t


#: stall lines printed per path; the results JSON keeps every stall
STALL_LINES = 10


def stall_lines(stalls: list[dict[str, Any]], limit: int = STALL_LINES) -> list[str]:
    """The stalls as a reader takes them in: vCPUs that stalled alike (the same kind, start
    and length to the printed 0.1 s; the vCPUs of one packed process stop together) share
    one line, ``vCPUs 16-31 stopped responding for 0.4 s at 23.8 s``; at most ``limit``
    lines, the longest stalls first, then how many more the results hold (a 256-vCPU run
    told 1 559 stalls one per line)."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    others: list[dict[str, Any]] = []
    for stall in stalls:
        who = stall["who"]
        if who.startswith("vCPU ") and who[5:].isdigit():
            rest = stall["text"][len(who) :]
            key = (rest, f"{stall['duration_s']:.1f}", f"{stall['at_s']:.1f}")
            groups.setdefault(key, []).append(int(who[5:]))
        else:
            others.append(stall)
    lines: list[tuple[float, str]] = [(s["duration_s"], s["text"]) for s in others]
    for (rest, duration, _), vcpus in groups.items():
        who = f"vCPU {vcpus[0]}" if len(vcpus) == 1 else f"vCPUs {vcpu_ranges(sorted(vcpus))}"
        lines.append((float(duration), who + rest))
    lines.sort(key=lambda line: -line[0])
    out = [text for _, text in lines[:limit]]
    if len(lines) > limit:
        out.append(
            f"... {len(lines) - limit} more (stalls in the results JSON: {len(stalls)} in all)"
        )
    return out


def _notes(campaign: dict[str, Any], family: str, rows: list[dict[str, Any]]) -> list[Text]:
    """What to read under a family's table: ranking, overload, stalls, errors, cut-offs."""
    notes: list[Text] = []
    measured = [r for r in rows if "metrics" in r]
    overloaded = [(r["name"], r["metrics"]["overload"]) for r in measured]
    overloaded = [(n, why) for n, why in overloaded if why]
    _, basis = rank_basis(campaign)
    if overloaded:
        why = "; ".join(f"{n}: {w}" for n, w in overloaded)
        notes.append(
            Text(
                f"NOT RANKED: the machine could not keep up ({why}); these figures measure "
                "queueing, not the paths. Fewer vCPUs or a less loaded machine will do.",
                style="bold yellow",
            )
        )
    elif measured:
        notes.append(Text(f"ranked by {basis}; ★ = best, the others as ratios to it"))
    if family == "timer":
        notes.append(
            Text(
                "event = one timer callback; exits of boot and calibration excluded; "
                "lateness = handler time - requested expiry (guest ktime); "
                "exits/irq = exits per device interrupt"
            )
        )
    else:
        notes.append(
            Text(
                "event = one completed smp_call_function(wait) call, counting the sender's "
                "and the targets' exits; IPI latency = csd queued -> function ran on the target"
            )
        )
    for row in measured:
        met = row["metrics"]
        for line in stall_lines(met.get("stalls") or []):
            notes.append(Text(f"stall in {row['name']}: {line}", style="yellow"))
        errors = (met.get("csds") or {}).get("errors", 0)
        if errors:
            notes.append(
                Text(
                    f"{row['name']}: {errors} smp_call_function call(s) failed (a target did "
                    "not run its csd within the csd lock timeout, or was not running)",
                    style="red",
                )
            )
    cut = [(r["name"], r["metrics"]["csds"].get("cut_off_calls", 0)) for r in measured]
    cut = [(n, c) for n, c in cut if c]
    if cut:
        notes.append(
            Text(
                "calls cut off by the end of the run, counted neither as latencies nor as "
                "errors: " + ", ".join(f"{n} {c}" for n, c in cut)
            )
        )
    return notes


def comparison_tables(campaign: dict[str, Any], wide: bool = True) -> list[RenderableType]:
    """Each family's table followed by its notes, plus why a family has no table."""
    out: list[RenderableType] = []
    for family in FAMILIES:
        rows = family_rows(campaign, family)
        if not rows:
            continue
        build = _timer_table if family == "timer" else _ipi_table
        out.append(Group(build(campaign, rows, wide), *_notes(campaign, family, rows)))
    cfg = campaign.get("config", {})
    if not family_rows(campaign, "ipi") and cfg.get("vcpus", 2) < 2:
        out.append(
            Text(
                f"No IPI table: the IPI storm needs at least 2 vCPUs "
                f"(this run has {cfg.get('vcpus')}); try --vcpus 2 or more."
            )
        )
    return out


def _fits(console: Console, renderable: RenderableType) -> bool:
    """Whether the tables in ``renderable`` fit the console at their natural width
    (notes are text: they wrap)."""
    parts = renderable.renderables if isinstance(renderable, Group) else [renderable]
    unbounded = console.options.update(width=100_000)
    return all(
        Measurement.get(console, unbounded, t).maximum <= console.width
        for t in parts
        if isinstance(t, Table)
    )


def campaign_status(campaign: dict[str, Any]) -> tuple[str, bool]:
    """One line saying how the run went, and whether it went well."""
    runs = campaign.get("runs", [])
    planned = len(campaign.get("config", {}).get("modes", [])) + len(
        campaign.get("config", {}).get("ipis", [])
    )
    bad = []
    for r in runs:
        if "metrics" not in r:
            bad.append(f"{r['name']} (failed: {r.get('error', 'no result')})")
        elif not r["metrics"]["ok"]:
            bad.append(f"{r['name']} ({', '.join(r['metrics']['problems'])})")
    overloaded = [r["name"] for r in runs if "metrics" in r and r["metrics"].get("overload")]
    parts = []
    if campaign.get("interrupted"):
        parts.append(
            f"INTERRUPTED ({campaign['interrupted']}) after {len(runs)} of {planned} paths; "
            "the finished ones are shown and saved"
        )
    if bad:
        parts.append(f"{len(bad)} of {len(runs)} paths had errors: " + "; ".join(bad))
    if overloaded:
        parts.append(f"overloaded, not ranked: {', '.join(overloaded)}")
    ok = not bad and not campaign.get("interrupted")
    if not parts:
        parts.append(f"ok, {len(runs)} path{'' if len(runs) == 1 else 's'}")
    return "status: " + "; ".join(parts), ok


def print_campaign(
    campaign: dict[str, Any], console: Console | None = None, wide: bool | None = None
) -> None:
    """The tables, their notes, the calibration line and the status line.

    ``wide`` None: the full tables when they fit the console, the compact ones otherwise.
    """
    console = console or Console()
    full = comparison_tables(campaign, wide=True)
    if wide is None:
        wide = all(_fits(console, r) for r in full)
    tables = full if wide else comparison_tables(campaign, wide=False)
    for renderable in tables:
        console.print(renderable)
    if not wide:
        console.print("compact tables; --wide (or a wider terminal) shows every column")
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
        console.print(Text(f"{name}: {err}", style="red"))
    line, ok = campaign_status(campaign)
    console.print(Text(line, style="green" if ok else "bold red"))


# ---------------------------------------------------------------------- vtick compare

_COMPARED = (
    ("exits_per_event", "exits/event", 1.0),
    ("guest_ns_per_event", "guest us/event", 1e-3),
    ("host_ns_per_event", "host mean us/event", 1e-3),
    ("host_p50_ns_per_event", "host us/event", 1e-3),
    ("modeled_host_ns_per_event", "modeled us/event", 1e-3),
    ("events_per_s", "events/s", 1.0),
)

#: configuration keys whose difference makes two runs measure different things
_CONFIG_KEYS = (
    "vcpus",
    "duration_s",
    "timer_workload",
    "hz",
    "apic",
    "listen",
    "params",
    "preempt",
    "exit_cost",
    "seed",
    "mutations",
)


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, A's value, B's value) of every configuration setting that differs."""
    ca, cb = a.get("config", {}), b.get("config", {})
    return [(k, ca.get(k), cb.get(k)) for k in _CONFIG_KEYS if ca.get(k) != cb.get(k)]


def unmatched(a: dict[str, Any], b: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Paths measured in only one of the files: (only in A, only in B)."""

    def paths(doc: dict[str, Any]) -> list[str]:
        return [f"{r['family']}/{r['name']}" for r in doc.get("runs", []) if "metrics" in r]

    pa, pb = paths(a), paths(b)
    return [p for p in pa if p not in pb], [p for p in pb if p not in pa]


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (family, path) measured in both: each headline metric in A and B."""
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
        for key, label in (("lateness_ns", "late"), ("call_latency_ns", "call")):
            pa, pb = ma.get(key), mb.get(key)
            if pa and pb:
                for p in ("p99", "max"):
                    if p in pa and p in pb:
                        row["metrics"][f"{label} {p} us"] = (pa[p] / 1000, pb[p] / 1000)
        ea, eb = (ma.get("csds") or {}).get("errors"), (mb.get("csds") or {}).get("errors")
        if ea is not None and eb is not None and (ea or eb):
            row["metrics"]["call errors"] = (float(ea), float(eb))
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
    diffs = config_differences(a, b)
    if diffs:
        console.print(
            Text(
                "The runs were configured differently, so their figures measure different "
                "things: " + "; ".join(f"{k}: {va!r} -> {vb!r}" for k, va, vb in diffs),
                style="bold yellow",
            )
        )
    only_a, only_b = unmatched(a, b)
    for side, only in ((names[0], only_a), (names[1], only_b)):
        if only:
            console.print(f"only in {side} (not compared): {', '.join(only)}")
    rows = compare(a, b)
    if not rows:
        console.print("no path was measured in both files")
        return
    table = Table(title=f"{names[0]} -> {names[1]}", box=box.SIMPLE_HEAD)
    for col in ("path", "metric", "A", "B", "change"):
        table.add_column(
            col, justify="left" if col in ("path", "metric") else "right", overflow="fold"
        )
    for row in rows:
        for label, (va, vb) in row["metrics"].items():
            change = "" if va == 0 else f"{(vb - va) / va * 100:+.1f}%"
            table.add_row(f"{row['family']}/{row['name']}", label, f"{va:.2f}", f"{vb:.2f}", change)
    console.print(table)


# ---------------------------------------------------------------------- --explain (issue 15)

#: short names of vtick.host.chaos.explain.PARTS for the printed breakdown
_PART_NAMES = {
    "programmed late": "programmed late",
    "host timer": "host timer",
    "host handling": "host handling",
    "transit": "transit",
    "guest until handler": "guest",
    "handler": "handler",
}


def _part_line(parts: dict[str, int], total: int) -> str:
    """The parts that took any time, with their share of the lateness."""
    shown = []
    for part, label in _PART_NAMES.items():
        ns = parts.get(part, 0)
        if ns <= 0:
            continue
        pct = 100 * ns / total if total > 0 else 0.0
        shown.append(f"{label} {duration_text(ns)} ({pct:.0f}%)")
    return ", ".join(shown) or "nothing late"


def print_explain(campaign: dict[str, Any], console: Console) -> None:
    """``vtick run --explain``: per timer path, the worst late timers with their lateness
    split along the path (µs/ms and %) and the blocker named; then each path's average
    split over all its timer events."""
    console.print(
        Text(
            "Late timers explained: lateness = programmed late + host timer + host "
            "handling + transit (to the vCPU) + guest (until the handler) + handler",
            style="bold",
        )
    )
    any_path = False
    for run in campaign.get("runs", []):
        explained = (run.get("results") or {}).get("explain")
        if run.get("family") != "timer" or not explained or not explained.get("events"):
            continue
        any_path = True
        mean = explained.get("mean_ns") or {}
        total = sum(mean.values())
        console.print(
            Text(f"{run['name']}: {explained['events']} timer events; on average ", style="bold")
            + Text(_part_line(mean, total))
        )
        for worst in explained.get("worst", []):
            late = worst["late_ns"]
            console.print(
                f"  timer {worst['timer']} on vCPU {worst['vcpu']}: {duration_text(late)} late "
                f"(history event {worst['index']})",
                highlight=False,
            )
            console.print(f"    {_part_line(worst['parts'], late)}", highlight=False)
            console.print(f"    blocker: {worst['blocker']}", highlight=False)
    if not any_path:
        console.print("no timer path recorded events to explain")
