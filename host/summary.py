"""Turn a run's raw results into per-vCPU figures and a terminal summary."""

from __future__ import annotations

from typing import Any

from hdrh.histogram import HdrHistogram

__all__ = ["summarize", "format_summary", "PERCENTILES"]

PERCENTILES = (50.0, 99.0)


def _lateness(guest: dict[str, Any]) -> dict[str, int]:
    hist = HdrHistogram.decode(guest["lateness_hdr"].encode("ascii"))
    out = {f"p{p:g}": int(hist.get_value_at_percentile(p)) for p in PERCENTILES}
    out["max"] = int(guest["lateness_max_ns"])
    out["count"] = int(hist.get_total_count())
    return out


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per-vCPU events, exits by kind, lateness percentiles; adds them under ``summary``."""
    rows = []
    for v in results["vcpus"]:
        g = v.get("guest")
        row: dict[str, Any] = {"vcpu": v["vcpu"], "errors": v["link_errors"]}
        if g:
            exits = g["exits"]
            boot = {
                k.removeprefix("boot_exits "): n
                for k, n in (g.get("counters") or {}).items()
                if k.startswith("boot_exits ")
            }
            steady = {k: n - boot.get(k, 0) for k, n in exits.items()}
            row.update(
                events=g["events"],
                early=g["early"],
                exits=exits,
                boot_exits=boot,
                # steady state: the exits of boot and calibration are not per event
                exits_per_event=round(sum(steady.values()) / g["events"], 3)
                if g["events"]
                else None,
                exits_per_event_by_kind={
                    k: round(n / g["events"], 3) for k, n in sorted(steady.items()) if n
                }
                if g["events"]
                else {},
                guest_rtt_mean_ns={
                    k: g["exit_rtt_ns_total"][k] // n for k, n in exits.items() if n
                },
                host_ns_mean={
                    k: a["host_ns_total"] // a["count"]
                    for k, a in v["host_exits"].items()
                    if a["count"]
                },
                exits_per_interrupt_by_kind={
                    k: round(n / irqs, 3) for k, n in sorted(steady.items()) if n
                }
                if (irqs := (g.get("counters") or {}).get("device_interrupts"))
                else {},
                lateness_ns=_lateness(g),
                calibration_period=(g.get("counters") or {}).get("calibration_period"),
            )
        rows.append(row)
    results["summary"] = rows
    return results


def format_summary(results: dict[str, Any]) -> str:
    rows = results.get("summary") or summarize(results)["summary"]
    cfg = results["config"]
    kinds: dict[str, int] = {}
    for r in rows:
        for k, n in r.get("exits", {}).items():
            kinds[k] = kinds.get(k, 0) + n
    kind_names = sorted(kinds)
    lines = [
        f"vtick run: {cfg['vcpus']} vCPUs, mode {cfg['mode']}, workload {cfg['workload']}, "
        f"{cfg['duration_s']} s, {cfg['listen'].split('://')[0]}",
        "",
        f"{'vCPU':>4} {'events':>8} {'early':>6} {'exits':>8} {'exits/ev':>8} "
        + "".join(f"{k + ' rtt':>16}" for k in kind_names)
        + f" {'late p50':>9} {'late p99':>9} {'late max':>9}",
    ]

    def us(ns: int | None) -> str:
        return "-" if ns is None else f"{ns / 1000:.1f}us"

    for r in rows:
        if "events" not in r:
            lines.append(f"{r['vcpu']:>4}  no report: {'; '.join(r['errors'])}")
            continue
        rtt = r["guest_rtt_mean_ns"]
        late = r["lateness_ns"]
        lines.append(
            f"{r['vcpu']:>4} {r['events']:>8} {r['early']:>6} {sum(r['exits'].values()):>8} "
            f"{r['exits_per_event'] or 0:>8} "
            + "".join(f"{us(rtt.get(k)):>16}" for k in kind_names)
            + f" {us(late['p50']):>9} {us(late['p99']):>9} {us(late['max']):>9}"
        )
    lines.append("")
    lines.append("exits by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    lines.append("rtt: mean guest-side round trip of one exit of that kind, host handling included")
    lines.append("exits/ev: exits per timer callback after boot (boot and calibration excluded)")
    for key, label in (
        ("exits_per_event_by_kind", "exits per timer callback"),
        ("exits_per_interrupt_by_kind", "exits per timer device interrupt"),
    ):
        per_kind: dict[str, float] = {}
        for r in rows:
            for k, x in r.get(key, {}).items():
                per_kind[k] = per_kind.get(k, 0.0) + x / len(rows)
        if per_kind:
            lines.append(
                f"{label} by kind (mean over vCPUs): "
                + ", ".join(f"{k} {x:.3f}" for k, x in sorted(per_kind.items()))
            )
    calib = [(r["vcpu"], r["calibration_period"]) for r in rows if r.get("calibration_period")]
    if calib:
        hz = cfg.get("hz") or 1000
        lines.append(
            "LAPIC calibration error vs the 1 GHz bus: "
            + ", ".join(f"vCPU {c} {(p * hz - 1e9) / 1e7:+.3f}%" for c, p in calib)
        )
    errors = [f"vCPU {r['vcpu']}: {e}" for r in rows for e in r["errors"]]
    if errors:
        lines.append("link errors:")
        lines.extend(f"  {e}" for e in errors)
    return "\n".join(lines)
