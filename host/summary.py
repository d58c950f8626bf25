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
            row.update(
                events=g["events"],
                early=g["early"],
                exits=exits,
                exits_per_event=round(sum(exits.values()) / g["events"], 3)
                if g["events"]
                else None,
                guest_rtt_mean_ns={
                    k: g["exit_rtt_ns_total"][k] // n for k, n in exits.items() if n
                },
                host_ns_mean={
                    k: a["host_ns_total"] // a["count"]
                    for k, a in v["host_exits"].items()
                    if a["count"]
                },
                lateness_ns=_lateness(g),
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
    errors = [f"vCPU {r['vcpu']}: {e}" for r in rows for e in r["errors"]]
    if errors:
        lines.append("link errors:")
        lines.extend(f"  {e}" for e in errors)
    return "\n".join(lines)
