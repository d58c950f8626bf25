"""``vtick run``'s main job: every timer mode, then every IPI path, then the comparison.

A campaign is a sequence of ordinary runs (``launch``), each a fresh host and fresh vCPU
processes, so one path's leftovers cannot bias the next.  Timer modes run the timer
workload; IPI paths run the IPI storm.  A run that fails is recorded with its error and
the campaign goes on: a user comparing paths wants every figure that could be had.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

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

    ``on_progress(index, family, name)`` is called before each run starts.
    """
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vtick-campaign-") as scratch:
        for index, (family, name) in enumerate(opts.runs()):
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
            )
            entry: dict[str, Any] = {"family": family, "name": name}
            try:
                results = await launch(run, os.path.join(scratch, f"{index}.json"))
            except RunInterrupted:
                raise  # Ctrl-C / SIGTERM stops the whole campaign, not one path
            except RunFailed as exc:
                entry["error"] = str(exc)
            else:
                entry["metrics"] = run_metrics(results)
                entry["results"] = results
            runs.append(entry)
    config = asdict(opts)
    return {
        "vtick": RESULTS_VERSION,
        "config": config,
        "environment": environment(),
        "runs": runs,
    }
