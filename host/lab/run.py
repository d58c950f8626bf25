"""``vtick run``: run every timer mode then every IPI path, print the tables, write results.

Order of work, so that nothing measured is lost to a mistake:

1. every check of ``host/lab/preflight.py`` (workload parameters, output paths,
   ``--listen``) and the ``--vcpus 1`` rule, each a one-line error with status 2 before
   any process starts;
2. the campaign (``campaign.run_campaign``) behind a progress bar;
3. the results file first, then the tables, trace, plots and histograms; a signal
   during the campaign still gets here with the paths that finished.

Exit status: 0 when every path ran without errors, 1 when a path failed or had errors,
128 + N when signal N (SIGINT 130, SIGTERM 143) interrupted the campaign, 2 for a
mistake in the command line.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys

import trio

from vtick.host.results import write_json
from vtick.proto.catalog import IPI_VARIANT_NAMES

__all__ = ["run_main"]


def _preflight(args: argparse.Namespace) -> list[str]:
    """The IPI paths to run; raises UsageError for any mistake in the command line."""
    from vtick.host.lab.preflight import (
        UsageError,
        check_distinct,
        check_listen,
        check_output_dir,
        check_output_file,
        check_params,
    )

    if args.ipi is None:  # default: all, or none when there is no other vCPU to call
        ipis = list(IPI_VARIANT_NAMES) if args.vcpus > 1 else []
    else:
        ipis = args.ipi
        if ipis and args.vcpus < 2:
            raise UsageError(
                f"--ipi {','.join(ipis)} with --vcpus {args.vcpus}: the IPI storm needs at "
                "least 2 vCPUs (one to call, one to be called)"
            )
    if not args.modes and not ipis:
        raise UsageError("nothing to run (--modes none and no IPI path)")
    if args.migrate_at is not None:
        if args.migrate_at >= args.duration:
            raise UsageError(
                f"--migrate-at {args.migrate_at:g} is not inside the run's --duration "
                f"{args.duration:g}"
            )
        if args.listen:
            raise UsageError("--migrate-at runs both hosts on ipc:// here; drop --listen")
    workloads = ([args.workload] if args.modes else []) + (["ipi"] if ipis else [])
    check_params(dict(args.param), workloads)
    check_output_file(args.json, "--json")
    if args.trace:
        check_output_file(args.trace, "--trace")
    if args.histogram:
        check_output_file(args.histogram, "--histogram")
    if args.plots:
        check_output_dir(args.plots, "--plots")
    check_distinct({"--json": args.json, "--trace": args.trace, "--histogram": args.histogram})
    if args.listen:
        check_listen(args.listen, args.vcpus)
        from vtick.host.server import check_exposure  # issue 12: clear text stays local

        try:
            check_exposure(args.listen, args.allow_insecure_tcp)
        except OSError as exc:
            raise UsageError(f"--listen {exc}") from None
    return ipis


def run_main(args: argparse.Namespace) -> int:
    """``vtick run``: every path, the tables, the results file (and plots, trace)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from vtick.host.lab.campaign import CampaignOptions, run_campaign
    from vtick.host.lab.preflight import UsageError
    from vtick.host.lab.report import print_campaign

    try:
        ipis = _preflight(args)
    except UsageError as exc:
        print(f"vtick run: {exc}", file=sys.stderr)
        return 2
    opts = CampaignOptions(
        modes=args.modes,
        ipis=ipis,
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
        vcpus_per_process=args.vcpus_per_process,
        allow_insecure_tcp=args.allow_insecure_tcp,
        explain=args.explain,
        migrate_at_s=args.migrate_at,
    )
    paths = opts.runs()
    # a terminal gets its own width; a pipe or a log file gets room for the full tables
    console = Console(width=None if sys.stdout.isatty() else 240)
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
        except OSError as exc:
            print(f"vtick run: {exc}", file=sys.stderr)
            return 1
        progress.update(task, completed=len(campaign["runs"]))
    write_json(args.json, campaign)  # first: whatever happens next, the figures are kept
    print_campaign(campaign, console, wide=True if args.wide else None)
    if args.explain:  # issue 15
        from vtick.host.lab.report import print_explain

        print_explain(campaign, console)
    if args.trace:
        from vtick.host.lab.trace import write_trace

        events = write_trace(campaign, args.trace)
        console.print(f"trace: {args.trace} ({events} events; open it in the Perfetto UI)")
    if args.plots:
        from vtick.host.lab.plots import write_plots

        for path in write_plots(campaign, args.plots):
            console.print(f"plot: {path}")
    if args.histogram:
        from vtick.host.lab.histogram import write_histograms

        cmdline = shlex.join(["vtick", *sys.argv[1:]])
        for path in write_histograms(campaign, args.histogram, cmdline):
            console.print(f"histogram: {path}")
    console.print(f"results: {args.json}")
    if campaign.get("interrupted"):
        return 128 + signal.Signals[campaign["interrupted"]].value
    failed = [r for r in campaign["runs"] if "metrics" not in r or not r["metrics"]["ok"]]
    return 1 if failed else 0
