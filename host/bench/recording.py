"""``vtick bench recording``: does recording a trace window distort what it measures?

The same path runs with the recorder off and on, alternately (off, on, off, on, ...), in
one invocation; the table shows events per second and guest time per event for each, and
the ratio of the means (on / off).  A ratio within a few percent of 1 means recording is
not what the numbers measure.
"""

from __future__ import annotations

import statistics

import trio

from vtick.host.lab.campaign import CampaignOptions, run_campaign

__all__ = ["run_recording_bench"]


def run_recording_bench(mode: str = "pv-ktime", rounds: int = 3, duration_s: float = 2.0) -> int:
    figures: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    print(
        f"vtick bench recording: {mode}, timer storm, 2 vCPUs, {duration_s} s per run, "
        f"{rounds} rounds of off/on"
    )
    for _ in range(rounds):
        for trace in (False, True):
            opts = CampaignOptions(
                modes=[mode], ipis=[], vcpus=2, duration_s=duration_s, trace=trace
            )
            doc = trio.run(run_campaign, opts, None)
            run = doc["runs"][0]
            if "metrics" not in run:
                print(f"run failed: {run.get('error')}")
                return 1
            met = run["metrics"]
            figures[trace].append((met["events_per_s"], met["guest_ns_per_event"] or 0.0))
    print(f"{'recording':<10} {'events/s':>12} {'guest us/event':>16}")
    means = {}
    for trace in (False, True):
        eps = statistics.mean(f[0] for f in figures[trace])
        gpe = statistics.mean(f[1] for f in figures[trace])
        means[trace] = (eps, gpe)
        print(f"{'on' if trace else 'off':<10} {eps:>12.0f} {gpe / 1000:>16.1f}")
    print(f"ratio events/s {means[True][0] / means[False][0]:.3f} (on / off)")
    print(f"ratio guest time per event {means[True][1] / means[False][1]:.3f} (on / off)")
    return 0
