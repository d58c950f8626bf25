"""``vtick bench scale``: what vtick sustains as vCPUs are added, on this machine.

One ``pv-ktime`` timer-storm run per size (1, 2, 4, ... vCPUs, one process each, then
the largest sizes packed several vCPUs per process), each on a fresh host.  Per size:
events per second (all vCPUs), the mean exit round trip the guests saw, lateness p50 and
p99, host CPU per exit (the host's own handling time; the exit-reply's ``host_ns``
summed by the host), and whether the run completed without errors.  The table is
printed, and ``--plot PATH`` draws events/s and lateness p99 against vCPUs.

Two host figures: ``host us/exit`` is the wall time of the model's handling of an exit
(the exit-reply's ``host_ns``), which a descheduled host inflates; ``host cpu us/exit`` is
the host process's CPU time over the run (``host_cpu_ns``: user + system, nng's threads
included) divided by the exits it handled: what an exit really costs the host.  Memory
per vCPU process comes from each guest's ``/proc/self/smaps_rollup`` at the end of its
run: RSS counts the shared libraries in every process, PSS shares them out, private is
what the process alone holds.

The *knee* is the first size where events per second per vCPU falls below half of the
single-vCPU figure: beyond it the machine's cores, not vtick's protocol, set the pace.
With one interpreter per vCPU on a 2-core machine that happens as soon as the runnable
vCPU processes outnumber the cores (each exit needs both its vCPU's process and the host
to run), which is why the line prints the core count next to it.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import trio

from vtick.host.lab.launcher import RunFailed, RunOptions, launch
from vtick.host.lab.metrics import run_metrics

__all__ = ["run_scale_bench"]


def _sizes(largest: int) -> list[int]:
    sizes = [1]
    while sizes[-1] * 2 <= largest:
        sizes.append(sizes[-1] * 2)
    return sizes


def _one(vcpus: int, per_process: int, seconds: float) -> dict[str, Any]:
    opts = RunOptions(
        vcpus=vcpus,
        duration_s=seconds,
        mode="pv-ktime",
        workload="timers",
        vcpus_per_process=per_process,
    )
    row: dict[str, Any] = {"vcpus": vcpus, "per_process": per_process}
    with tempfile.TemporaryDirectory(prefix="vtick-bench-") as scratch:
        try:
            results = trio.run(launch, opts, os.path.join(scratch, "r.json"))
        except RunFailed as exc:
            row["error"] = str(exc)
            return row
    met = run_metrics(results)
    exits = rtt = host_ns = host_exits = 0
    #: memory of each vCPU process (its vCPUs report the same figures), by pid
    memory: dict[int, tuple[int, int, int]] = {}
    for v in results["vcpus"]:
        g = v.get("guest") or {}
        exits += sum(g.get("exits", {}).values())
        rtt += sum(g.get("exit_rtt_ns_total", {}).values())
        host_ns += sum(k["host_ns_total"] for k in v["host_exits"].values())
        host_exits += sum(k["count"] for k in v["host_exits"].values())
        c = g.get("counters") or {}
        if "process_rss_kb" in c:
            memory[v.get("guest_pid") or v["vcpu"]] = (
                c["process_rss_kb"],
                c.get("process_pss_kb", 0),
                c.get("process_private_kb", 0),
            )
    late = met["lateness_ns"] or {}
    procs = max(1, len(memory))
    host_cpu = results.get("host_cpu_ns") or 0
    row.update(
        ok=bool(results["ok"]),
        events_per_s=met["events_per_s"],
        rtt_us=rtt / exits / 1000 if exits else None,
        host_us_per_exit=host_ns / exits / 1000 if exits else None,
        host_cpu_us_per_exit=host_cpu / host_exits / 1000 if host_exits else None,
        p50_us=late.get("p50", 0) / 1000,
        p99_us=late.get("p99", 0) / 1000,
        rss_mb=sum(m[0] for m in memory.values()) / procs / 1024,
        pss_mb=sum(m[1] for m in memory.values()) / procs / 1024,
        private_mb=sum(m[2] for m in memory.values()) / procs / 1024,
    )
    return row


def run_scale_bench(
    largest: int = 64,
    packed: int = 256,
    per_process: int = 16,
    seconds: float = 2.0,
    plot: str | None = None,
) -> int:
    cores = os.cpu_count() or 1
    plan = [(n, 1) for n in _sizes(largest)]
    if packed:
        plan.append((packed, per_process))
    print(
        f"vtick bench scale: pv-ktime timer storm, {seconds} s per size, {cores} CPUs; "
        f"sizes {', '.join(f'{n}' + (f'/{k}' if k > 1 else '') for n, k in plan)} "
        "(vCPUs/vCPUs per process)",
        flush=True,
    )
    rows = []
    header = (
        f"{'vCPUs':>6} {'per proc':>8} {'events/s':>10} {'ev/s/vCPU':>10} "
        f"{'exit rtt us':>11} {'host us/exit':>12} {'host cpu us/exit':>16} "
        f"{'late p50 us':>11} {'late p99 us':>11} {'MB/proc rss pss private':>23}  ok"
    )
    print(header, flush=True)
    for n, k in plan:
        row = _one(n, k, seconds)
        rows.append(row)
        if "error" in row:
            print(f"{n:>6} {k:>8}  failed: {row['error']}", flush=True)
            continue
        mem = f"{row['rss_mb']:.1f} {row['pss_mb']:.1f} {row['private_mb']:.1f}"
        print(
            f"{n:>6} {k:>8} {row['events_per_s']:>10.0f} {row['events_per_s'] / n:>10.0f} "
            f"{row['rtt_us'] or 0:>11.1f} {row['host_us_per_exit'] or 0:>12.1f} "
            f"{row['host_cpu_us_per_exit'] or 0:>16.1f} "
            f"{row['p50_us']:>11.1f} {row['p99_us']:>11.1f} {mem:>23}  "
            f"{'yes' if row['ok'] else 'NO'}",
            flush=True,
        )
    good = [r for r in rows if "error" not in r and r["per_process"] == 1]
    if good:
        base = good[0]["events_per_s"] / good[0]["vcpus"]
        knee = next((r["vcpus"] for r in good if r["events_per_s"] / r["vcpus"] < base / 2), None)
        if knee is None:
            print("knee: none up to the largest size (events/s per vCPU stayed above half)")
        else:
            print(
                f"knee: {knee} vCPUs (events/s per vCPU below half of 1 vCPU's) on {cores} "
                "CPUs: each exit needs its vCPU process and the host scheduled, so past "
                "the core count the processes queue for CPU"
            )
    if plot:
        _plot(rows, plot, cores)
        print(f"plot: {plot}")
    return 0 if all(r.get("ok") for r in rows) else 1


def _plot(rows: list[dict[str, Any]], path: str, cores: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in rows if "error" not in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["vcpus"] for r in good]
    ax.plot(xs, [r["events_per_s"] for r in good], "o-", label="events/s (all vCPUs)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("vCPUs")
    ax.set_ylabel("events/s")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["p99_us"] for r in good], "s--", color="tab:red", label="lateness p99")
    ax2.set_yscale("log")
    ax2.set_ylabel("lateness p99 (us)")
    ax.axvline(cores, color="grey", linestyle=":", label=f"{cores} CPUs")
    ax.set_title("vtick bench scale: pv-ktime timer storm")
    fig.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
