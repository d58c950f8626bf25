"""``vtick bench migration``: what a live migration costs, per timer mode (issue 13).

For each mode, rounds of two runs interleaved (stay, move, move, stay, ...) so a change of
background load biases neither: the same VM (2 vCPUs, the ``timers`` workload) either
stays on its host or moves to a second host process halfway through.  Per mode it prints

* the blackout (the last exit the source handled to the first the destination handled,
  ``blackout_ns``) and its parts: freeze to ready (save, transfer, restore) and ready to
  the last vCPU resumed;
* the timers the move delayed (in flight across it: programmed before the vCPU resumed
  on the destination, run after) and how late the latest of them ran;
* the run's lateness p99 and maximum for the runs that stayed and the runs that moved.

The expectation the 2011 debate argued over: an absolute expiry (pv-ktime, TSC-deadline,
VMI) fires at resume when it came due in the blackout and on time otherwise; a LAPIC
count resumes from its saved remaining count, so every programmed timer is delayed by
the whole blackout, even one due long after it.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from typing import Any

import trio

from vtick.host.lab.launcher import RunFailed, RunOptions, launch
from vtick.host.lab.metrics import merge_hdr

__all__ = ["run_migration_bench", "DEFAULT_MODES"]

DEFAULT_MODES = ("lapic-xapic", "lapic-periodic", "tsc-deadline", "vmi", "pv-ktime", "pv-delta")
VCPUS = 2
#: workload shapes: ``sparse`` keeps one timer per vCPU armed 30..60 ms ahead, so it
#: usually spans the blackout without being due in it (where an absolute expiry and a
#: paused LAPIC count differ); ``dense`` is the timers workload's default storm
#: (100 us .. 2 ms)
SHAPES: dict[str, dict[str, int]] = {
    "sparse": {"timers": 1, "min_ns": 30_000_000, "max_ns": 60_000_000},
    "dense": {},
}


def _run(mode: str, seconds: float, seed: int, move: bool, shape: str) -> dict[str, Any]:
    opts = RunOptions(
        vcpus=VCPUS,
        duration_s=seconds,
        seed=seed,
        mode=mode,
        workload="timers",
        params=dict(SHAPES[shape]),
        migrate_at_s=seconds / 2 if move else None,
    )
    with tempfile.TemporaryDirectory(prefix="vtick-bench-") as scratch:
        results = trio.run(launch, opts, os.path.join(scratch, "r.json"))
    hist = merge_hdr([(v["guest"] or {}).get("lateness_hdr") for v in results["vcpus"]])
    out: dict[str, Any] = {
        "ok": results["ok"],
        "p99_ns": hist.get_value_at_percentile(99) if hist else None,
        "max_ns": hist.get_max_value() if hist else None,
    }
    if move:
        phases = results.get("blackout_phases_ns") or {}
        out |= {
            "blackout_ns": results.get("blackout_ns"),
            "downtime_ns": results.get("blackout_downtime_ns"),
            "restored_ns": phases.get("freeze_to_restored"),
            "late_timers": results.get("blackout_late_timers"),
            "late_max_ns": results.get("blackout_late_max_ns"),
            "spanning": results.get("blackout_spanning_timers"),
            "spanning_max_ns": results.get("blackout_spanning_late_max_ns"),
            "state_bytes": results.get("blackout_state_bytes"),
        }
    return out


def _ms(values: list[Any]) -> str:
    nums = [v for v in values if isinstance(v, int | float)]
    return f"{statistics.median(nums) / 1e6:.1f}" if nums else "-"


def run_migration_bench(
    modes: list[str] | None = None,
    rounds: int = 3,
    seconds: float = 3.0,
    seed: int = 1,
    json_path: str | None = None,
    shape: str = "sparse",
) -> int:
    modes = list(modes or DEFAULT_MODES)
    params = " ".join(f"{k}={v}" for k, v in SHAPES[shape].items()) or "defaults"
    print(
        f"vtick bench migration: {VCPUS} vCPUs, timers workload ({shape}: {params}), "
        f"{seconds:g} s per run, the "
        f"move at {seconds / 2:g} s; {rounds} rounds of stay/move per mode, interleaved; "
        f"{os.cpu_count()} CPUs; medians over rounds",
        flush=True,
    )
    table: dict[str, dict[str, list[dict[str, Any]]]] = {}
    failures = 0
    for mode in modes:
        runs: dict[str, list[dict[str, Any]]] = {"stay": [], "move": []}
        for r in range(rounds):
            order = ("stay", "move") if r % 2 == 0 else ("move", "stay")
            for path in order:
                try:
                    one = _run(mode, seconds, seed + r, path == "move", shape)
                except RunFailed as exc:
                    print(f"  {mode} round {r + 1} {path}: failed: {exc}", flush=True)
                    failures += 1
                    continue
                if not one["ok"]:
                    failures += 1
                runs[path].append(one)
                extra = (
                    f" blackout {one['blackout_ns'] / 1e6:.1f} ms (downtime "
                    f"{(one['downtime_ns'] or 0) / 1e6:.1f} ms), {one['late_timers']} "
                    f"timers delayed, latest {one['late_max_ns'] / 1e6:.1f} ms late"
                    if path == "move" and one.get("blackout_ns") is not None
                    else ""
                )
                print(f"  {mode} round {r + 1} {path}: ok={one['ok']}{extra}", flush=True)
        table[mode] = runs
    head = (
        f"{'mode':<16}{'blackout ms':>12}{'downtime':>9}{'restored':>9}"
        f"{'delayed':>9}{'latest ms':>10}{'spanning':>9}{'span max':>9}{'p99 stay':>10}"
        f"{'p99 move':>10}{'max stay':>10}{'max move':>10}"
    )
    print(head)
    for mode, runs in table.items():
        move, stay = runs["move"], runs["stay"]

        def col(rows: list[dict[str, Any]], key: str) -> list[Any]:
            return [row.get(key) for row in rows]

        delayed = [v for v in col(move, "late_timers") if v is not None]
        spanning = [v for v in col(move, "spanning") if v is not None]
        print(
            f"{mode:<16}{_ms(col(move, 'blackout_ns')):>12}"
            f"{_ms(col(move, 'downtime_ns')):>9}"
            f"{_ms(col(move, 'restored_ns')):>9}"
            f"{(statistics.median(delayed) if delayed else '-'):>9}"
            f"{_ms(col(move, 'late_max_ns')):>10}"
            f"{(statistics.median(spanning) if spanning else '-'):>9}"
            f"{_ms(col(move, 'spanning_max_ns')):>9}"
            f"{_ms(col(stay, 'p99_ns')):>10}{_ms(col(move, 'p99_ns')):>10}"
            f"{_ms(col(stay, 'max_ns')):>10}{_ms(col(move, 'max_ns')):>10}"
        )
    print(
        "blackout = last exit on the source -> first exit on the destination (an idle "
        "vCPU's next exit may come long after it resumed); downtime = the freeze -> the "
        "last vCPU resumed; restored = the freeze -> the destination restored the devices "
        "(a LAPIC count runs again from there); delayed = "
        "timers in flight across the move (programmed before the vCPU resumed, run "
        "after); latest = how late the latest of them ran; spanning / span max = those of "
        "them due after the resume and the latest of those (an absolute expiry runs them "
        "on time, a paused LAPIC count late by the blackout); p99/max = the whole run's "
        "lateness (ms)"
    )
    if failures:
        print(f"{failures} run(s) failed or reported errors: their figures are not trusted")
    if json_path:
        with open(json_path, "w") as fh:
            doc = {"seconds": seconds, "rounds": rounds, "shape": shape, "modes": table}
            json.dump(doc, fh, indent=1)
        print(f"results: {json_path}")
    return 1 if failures else 0
