"""``vtick run``: run every timer mode then every IPI path, print the tables, write results."""

from __future__ import annotations

import argparse
import sys

import trio

from vtick.host.results import write_json

__all__ = ["run_main"]


def run_main(args: argparse.Namespace) -> int:
    """``vtick run``: every path, the tables, the results file (and plots, trace)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from vtick.host.lab.campaign import CampaignOptions, run_campaign
    from vtick.host.lab.launcher import RunInterrupted
    from vtick.host.lab.report import print_campaign

    opts = CampaignOptions(
        modes=args.modes,
        ipis=args.ipi,
        vcpus=args.vcpus,
        duration_s=args.duration,
        timer_workload=args.workload,
        seed=args.seed,
        hz=args.hz,
        apic=args.apic,
        listen=args.listen,
        params=dict(args.param),
        preempt=dict(args.preempt),
        exit_cost=args.exit_cost,
        trace=args.trace is not None,
        mutations=tuple(args.mutate),
    )
    paths = opts.runs()
    if not paths:
        print("vtick run: nothing to run (--modes none --ipi none)", file=sys.stderr)
        return 2
    # a terminal gets its own width; a pipe or a log file gets room for the full tables
    console = Console(width=None if sys.stdout.isatty() else 200)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("starting", total=len(paths))

        def on_progress(index: int, family: str, name: str) -> None:
            progress.update(task, completed=index, description=f"{family} path {name}")

        try:
            campaign = trio.run(run_campaign, opts, on_progress)
        except RunInterrupted as exc:
            print(f"vtick run: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"vtick run: {exc}", file=sys.stderr)
            return 1
        progress.update(task, completed=len(paths))
    write_json(args.json, campaign)
    print_campaign(campaign, console)
    if args.trace:
        from vtick.host.lab.trace import write_trace

        events = write_trace(campaign, args.trace)
        console.print(f"trace: {args.trace} ({events} events; open it in the Perfetto UI)")
    if args.plots:
        from vtick.host.lab.plots import write_plots

        for path in write_plots(campaign, args.plots):
            console.print(f"plot: {path}")
    console.print(f"results: {args.json}")
    failed = [r for r in campaign["runs"] if "metrics" not in r or not r["metrics"]["ok"]]
    return 1 if failed else 0
