"""The ``vtick`` command: run, host, guest, bench."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import trio

from vtick.guest.apic import APIC_OPS
from vtick.guest.kernel import IPI_VARIANTS, MODES, PREEMPTION_POINTS
from vtick.guest.workload import WORKLOADS

__all__ = ["main"]

TOKEN_ENV = "VTICK_TOKEN"


def _int_at_least(lowest: int) -> Callable[[str], int]:
    """An argparse type: an integer (any base prefix) no smaller than ``lowest``."""

    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {lowest}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _vcpu_count(text: str) -> int:
    value = _positive_int(text)
    if value > 1024:
        raise argparse.ArgumentTypeError(f"{value} vCPUs is more than vtick supports (1024)")
    return value


def _duration(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 24 * 3600:
        raise argparse.ArgumentTypeError(f"duration {text!r} must be in (0, 86400] seconds")
    return value


def _url(text: str) -> str:
    from vtick.proto.transport import link_url

    try:
        link_url(text, 0)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _param(text: str) -> tuple[str, int]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=INTEGER")
    try:
        return key, int(value, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not an integer") from None


def _exit_cost(text: str) -> str:
    from vtick.host.exitcost import load_profile

    try:
        load_profile(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _choices(allowed: list[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated subset of ``allowed``, or 'all' / 'none'."""

    def parse(text: str) -> list[str]:
        if text == "all":
            return list(allowed)
        if text == "none":
            return []
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{text!r}: choose from {', '.join(allowed)} (comma-separated), all or none"
            )
        return items

    return parse


def _preempt(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or name not in PREEMPTION_POINTS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected POINT=NS with POINT one of {', '.join(PREEMPTION_POINTS)}"
        )
    try:
        ns = int(value, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not an integer") from None
    if not 0 <= ns <= 10 * 10**9:
        raise argparse.ArgumentTypeError(f"{text!r}: delay must be 0..10 s in ns")
    return name, ns


def _preempt_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preempt",
        type=_preempt,
        action="append",
        default=[],
        metavar="POINT=NS",
        help="preempt the vCPU for NS ns every time it passes POINT: "
        + ", ".join(PREEMPTION_POINTS),
    )


def _workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=_nonneg_int, default=1, help="workload random seed")
    p.add_argument(
        "--workload",
        choices=list(WORKLOADS),
        default="timers",
        help="guest workload: timers (random hrtimers, some cancelled or re-armed), "
        "tick (the periodic tick alone)",
    )
    p.add_argument(
        "--mode",
        choices=list(MODES),
        default="pv-ktime",
        help="timer mode: how the guest programs its clock-event device",
    )
    p.add_argument(
        "--apic", choices=list(APIC_OPS), default=None, help="APIC access (default: the mode's)"
    )
    p.add_argument("--hz", type=_positive_int, default=1000, help="the guest kernel's HZ")
    p.add_argument(
        "--ipi",
        choices=list(IPI_VARIANTS),
        default=None,
        help="IPI path for smp_call_function (sets the APIC access unless --apic is given)",
    )
    p.add_argument(
        "--param",
        type=_param,
        action="append",
        default=[],
        metavar="NAME=INT",
        help="workload parameter: timers, min_ns, max_ns, churn_pct",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vtick",
        description="Measure virtual CPU timer and IPI paths over real host and vCPU processes.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="the main job: every timer mode, then every IPI path, then the comparison",
        description="Run each timer mode with the timer workload, then each IPI path with "
        "the IPI storm, each on a fresh host and fresh vCPU processes, and print one "
        "comparison table per family.",
    )
    run.add_argument("--vcpus", type=_vcpu_count, default=4)
    run.add_argument("--duration", type=_duration, default=1.8, help="seconds of workload per path")
    run.add_argument(
        "--modes",
        type=_choices(list(MODES)),
        default=list(MODES),
        help="comma-separated timer modes, 'all' or 'none' (default all)",
    )
    run.add_argument(
        "--ipi",
        type=_choices(list(IPI_VARIANTS)),
        default=list(IPI_VARIANTS),
        help="comma-separated IPI paths, 'all' or 'none' (default all)",
    )
    run.add_argument(
        "--workload",
        choices=["timers", "tick", "mixed"],
        default="timers",
        help="workload of the timer modes (the IPI paths always run the IPI storm)",
    )
    run.add_argument(
        "--listen",
        type=_url,
        default=None,
        help="base URL (default: ipc:// in a private temporary directory); "
        "tcp://HOST:PORT uses ports PORT..PORT+N-1",
    )
    run.add_argument("--json", default="vtick-results.json", help="results file to write")
    run.add_argument("--plots", default=None, metavar="DIR", help="write PNG plots here")
    run.add_argument(
        "--trace",
        default=None,
        metavar="PATH",
        help="write a Chrome/Perfetto trace-event JSON file of every path's first events",
    )
    run.add_argument("--seed", type=_nonneg_int, default=1, help="workload random seed")
    run.add_argument("--hz", type=_positive_int, default=1000, help="the guest kernel's HZ")
    run.add_argument(
        "--apic", choices=list(APIC_OPS), default=None, help="APIC access (default: the mode's)"
    )
    run.add_argument(
        "--exit-cost",
        type=_exit_cost,
        default=None,
        metavar="PROFILE",
        help="add a modeled host cost per exit (kvm-2011-xapic, x2apic, apicv, or a TOML file)",
    )
    run.add_argument(
        "--param",
        type=_param,
        action="append",
        default=[],
        metavar="NAME=INT",
        help="workload parameter: timers, min_ns, max_ns, churn_pct, pause_ns, ipi_every_ns",
    )
    _preempt_arg(run)

    cmp = sub.add_parser("compare", help="print the differences between two results files")
    cmp.add_argument("a", help="results JSON of the first run")
    cmp.add_argument("b", help="results JSON of the second run")

    host = sub.add_parser("host", help="run the host (VMM) process")
    host.add_argument("--listen", type=_url, required=True)
    host.add_argument("--vcpus", type=_vcpu_count, required=True)
    host.add_argument("--duration", type=_duration, default=5.0)
    host.add_argument("--results", default=None, help="write results JSON here")
    host.add_argument(
        "--connect-timeout",
        type=_duration,
        default=30.0,
        help="seconds to wait for every vCPU to connect",
    )
    host.add_argument(
        "--exit-cost",
        type=_exit_cost,
        default=None,
        metavar="PROFILE",
        help="add a modeled handling cost per exit: a shipped profile "
        "(kvm-2011-xapic, x2apic, apicv) or a TOML file",
    )
    host.add_argument("--trace", action="store_true", help="ask every vCPU for a trace window")
    host.add_argument(
        "--timer-advance",
        action="store_true",
        help="adaptive LAPIC timer advance for TSC-deadline (KVM's lapic_timer_advance)",
    )
    host.add_argument(
        "--report-timeout",
        type=_duration,
        default=10.0,
        help="seconds to wait at the end for every vCPU's report and goodbye",
    )
    host.add_argument(
        "--token-file", default=None, help=f"file holding the run token in hex (else ${TOKEN_ENV})"
    )
    _workload_args(host)

    guest = sub.add_parser("guest", help="run one vCPU process")
    guest.add_argument("--connect", type=_url, required=True)
    guest.add_argument("--vcpu", type=_nonneg_int, required=True)
    guest.add_argument(
        "--token-file", default=None, help=f"file holding the run token in hex (else ${TOKEN_ENV})"
    )
    _preempt_arg(guest)
    guest.add_argument(
        "--clock-skew",
        type=int,
        default=0,
        metavar="NS",
        help="run this vCPU's clock NS ahead of CLOCK_MONOTONIC, as on another machine",
    )

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench", required=True)
    bt = bsub.add_parser("transport", help="exit round trip vs a raw AF_UNIX socketpair")
    bt.add_argument("--count", type=_positive_int, default=5000, help="round trips per path")
    bt.add_argument("--warmup", type=_nonneg_int, default=500)
    bw = bsub.add_parser(
        "wheel", help="host hrtimer wheel vs a heapq queue with lazy deletion, same workload"
    )
    bw.add_argument("--timers", type=_positive_int, default=1_000_000)
    bw.add_argument("--seed", type=_nonneg_int, default=1)
    br = bsub.add_parser("recording", help="a run with trace recording on vs off")
    br.add_argument("--mode", choices=list(MODES), default="pv-ktime")
    br.add_argument("--rounds", type=_positive_int, default=3)
    br.add_argument("--duration", type=_duration, default=2.0)
    return parser


def _read_token(token_file: str | None) -> bytes:
    """The run token from a 0600 file or the environment (never the command line)."""
    if token_file:
        st = os.stat(token_file)
        if st.st_mode & 0o077:
            raise SystemExit(f"vtick: {token_file} is readable by others; chmod 600 it")
        with open(token_file) as fh:
            text = fh.read().strip()
    else:
        text = os.environ.get(TOKEN_ENV, "")
        if not text:
            raise SystemExit(f"vtick: no token: set ${TOKEN_ENV} or pass --token-file")
    try:
        token = bytes.fromhex(text)
    except ValueError:
        raise SystemExit("vtick: the token must be 64 hex digits") from None
    if len(token) != 32:
        raise SystemExit("vtick: the token must be 64 hex digits")
    return token


def _cmd_host(args: argparse.Namespace) -> int:
    from vtick.host.server import HostConfig, serve

    cfg = HostConfig(
        listen=args.listen,
        vcpus=args.vcpus,
        token=_read_token(args.token_file),
        duration_s=args.duration,
        workload=args.workload,
        seed=args.seed,
        params=dict(args.param),
        mode=args.mode,
        apic=args.apic,
        hz=args.hz,
        ipi=args.ipi,
        results_path=args.results,
        connect_timeout_s=args.connect_timeout,
        report_timeout_s=args.report_timeout,
        timer_advance=args.timer_advance,
        exit_cost=args.exit_cost,
        trace=args.trace,
    )
    try:
        results = trio.run(serve, cfg)
    except OSError as exc:
        print(f"vtick host: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0 if results["ok"] else 1


def _cmd_guest(args: argparse.Namespace) -> int:
    from vtick.guest.vcpu import GuestConfig, run_guest

    if args.clock_skew:
        from vtick.proto.transport import set_clock_skew

        set_clock_skew(args.clock_skew)
    cfg = GuestConfig(
        connect=args.connect,
        vcpu=args.vcpu,
        token=_read_token(args.token_file),
        preempt_ns=dict(args.preempt),
    )
    try:
        return trio.run(run_guest, cfg)
    except KeyboardInterrupt:
        return 130


def _cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from vtick.host.campaign import CampaignOptions, run_campaign
    from vtick.host.launcher import RunInterrupted
    from vtick.host.report import print_campaign
    from vtick.host.results import write_json

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
        from vtick.host.trace import write_trace

        events = write_trace(campaign, args.trace)
        console.print(f"trace: {args.trace} ({events} events; open it in the Perfetto UI)")
    if args.plots:
        from vtick.host.plots import write_plots

        for path in write_plots(campaign, args.plots):
            console.print(f"plot: {path}")
    console.print(f"results: {args.json}")
    failed = [r for r in campaign["runs"] if "metrics" not in r or not r["metrics"]["ok"]]
    return 1 if failed else 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import json

    from vtick.host.report import print_compare

    docs = []
    for path in (args.a, args.b):
        try:
            with open(path) as fh:
                doc = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"vtick compare: {path}: {exc}", file=sys.stderr)
            return 2
        if not isinstance(doc, dict) or doc.get("vtick") != 2 or "runs" not in doc:
            print(f"vtick compare: {path} is not a vtick run results file", file=sys.stderr)
            return 2
        docs.append(doc)
    print_compare(docs[0], docs[1], (args.a, args.b))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.bench == "recording":
        from vtick.host.bench_recording import run_recording_bench

        return run_recording_bench(args.mode, args.rounds, args.duration)
    if args.bench == "wheel":
        from vtick.host.bench_wheel import run_wheel_bench

        return run_wheel_bench(timers=args.timers, seed=args.seed)
    from vtick.host.bench_transport import run_transport_bench

    return run_transport_bench(count=args.count, warmup=args.warmup)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {
        "run": _cmd_run,
        "host": _cmd_host,
        "guest": _cmd_guest,
        "bench": _cmd_bench,
        "compare": _cmd_compare,
    }[args.command]
    return handler(args)
