"""``vtick run``'s main job: every timer mode, then every IPI path, then the comparison.

A campaign is a sequence of ordinary runs (``launch``), each a fresh host and fresh vCPU
processes, so one path's leftovers cannot bias the next.  Timer modes run the timer
workload; IPI paths run the IPI storm.  A run that fails is recorded with its error and
the campaign goes on: a user comparing paths wants every figure that could be had.

SIGINT or SIGTERM stops the campaign, not the program: the path running then is
stopped (its processes ended, its run directory removed) and left out, and the document
comes back with the paths that finished and ``"interrupted": "SIGINT"`` (or
``"SIGTERM"``), so the caller can still print and save them.  A signal between two paths
(while metrics are computed) is caught the same way.  Nothing is written to disk here:
each run's results come back in memory.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from vtick.host.lab.launcher import RunFailed, RunInterrupted, RunOptions, launch
from vtick.host.lab.metrics import run_metrics

__all__ = ["CampaignOptions", "run_campaign", "environment", "RESULTS_VERSION"]

RESULTS_VERSION = 2


@dataclass
class CampaignOptions:
    modes: list[str]
    ipis: list[str]
    vcpus: int = 4
    duration_s: float = 1.8
    timer_workload: str = "timers"
    seed: int = 1
    hz: int = 1000
    apic: str | None = None
    listen: str | None = None
    params: dict[str, int] = field(default_factory=dict)
    preempt: dict[str, int] = field(default_factory=dict)
    exit_cost: str | None = None
    trace: bool = False
    #: planted bugs for every path's host (a test aid; vtick.host.mutations)
    mutations: tuple[str, ...] = ()
    #: vCPUs per guest process (launcher.RunOptions.vcpus_per_process)
    vcpus_per_process: int = 1
    #: let each host listen on a non-loopback tcp:// address (issue 12)
    allow_insecure_tcp: bool = False
    #: record every event and explain each path's worst late timers (issue 15)
    explain: bool = False
    #: issue 13: move each path's VM to a second host this many seconds into the run
    migrate_at_s: float | None = None

    def runs(self) -> list[tuple[str, str]]:
        """(family, name) of every run, in order."""
        return [("timer", m) for m in self.modes] + [("ipi", i) for i in self.ipis]


def environment() -> dict[str, Any]:
    """What a comparison of two result files needs to know about where they came from."""
    versions: dict[str, str | None] = {}
    for pkg in ("vtick", "trio", "pynng", "cbor2", "hdrhistogram"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "versions": versions,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


async def run_campaign(
    opts: CampaignOptions,
    on_progress: Callable[[int, str, str], None] | None = None,
) -> dict[str, Any]:
    """Run every path of ``opts`` in turn; returns the campaign's results document.

    ``on_progress(index, family, name)`` is called before each run starts.  An
    interrupted campaign returns what finished, with ``"interrupted"`` set.
    """
    runs: list[dict[str, Any]] = []
    interrupted: list[str] = []
    current = [trio.CancelScope()]

    async def watch_signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # a running launch() installs its own receiver (the newest one gets the signal)
        # and raises RunInterrupted; this one covers the moments between paths
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                interrupted.append(signal.Signals(signum).name)
                current[0].cancel()
                return

    async with trio.open_nursery() as nursery:
        await nursery.start(watch_signals)
        for index, (family, name) in enumerate(opts.runs()):
            if interrupted:
                break
            if on_progress is not None:
                on_progress(index, family, name)
            run = RunOptions(
                vcpus=opts.vcpus,
                duration_s=opts.duration_s,
                listen=opts.listen,
                seed=opts.seed,
                params=dict(opts.params),
                workload=opts.timer_workload if family == "timer" else "ipi",
                mode=name if family == "timer" else "pv-ktime",
                apic=opts.apic,
                hz=opts.hz,
                ipi=name if family == "ipi" else None,
                preempt=dict(opts.preempt),
                exit_cost=opts.exit_cost,
                trace=opts.trace,
                mutations=opts.mutations,
                vcpus_per_process=opts.vcpus_per_process,
                allow_insecure_tcp=opts.allow_insecure_tcp,
                explain=opts.explain,
                migrate_at_s=opts.migrate_at_s,
            )
            entry: dict[str, Any] = {"family": family, "name": name}
            with trio.CancelScope() as scope:
                current[0] = scope
                try:
                    results = await launch(run)
                except RunInterrupted as exc:
                    interrupted.append(exc.signal_name)
                    break  # Ctrl-C / SIGTERM stops the whole campaign, not one path
                except RunFailed as exc:
                    entry["error"] = str(exc)
                else:
                    entry["metrics"] = run_metrics(results)
                    entry["results"] = results
            if scope.cancelled_caught:
                break  # a signal between paths: this one never finished
            runs.append(entry)
        nursery.cancel_scope.cancel()
    config = asdict(opts)
    doc: dict[str, Any] = {
        "vtick": RESULTS_VERSION,
        "config": config,
        "environment": environment(),
        "runs": runs,
    }
    if interrupted:
        doc["interrupted"] = interrupted[0]
    return doc
