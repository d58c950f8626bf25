"""The ``vtick`` command: argument parsing and dispatch, nothing else.

Each subcommand's logic is one module: ``run`` in ``vtick.host.lab.run``, ``compare`` in
``vtick.host.lab.compare``, ``host`` in ``vtick.host.server``, ``bench`` in
``vtick.host.bench``.  ``guest`` is a program of its own (``python -m vtick.guest``): this
command hands it its arguments in a fresh interpreter, so the host never imports the
guest.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import trio

from vtick.proto.catalog import APIC_NAMES, IPI_VARIANT_NAMES, MODE_NAMES, WORKLOAD_NAMES
from vtick.proto.cliargs import (
    TOKEN_ENV,
    duration,
    nonneg_int,
    param,
    positive_int,
    preempt_arg,
    read_token,
    url,
)

__all__ = ["main"]


def _vcpu_count(text: str) -> int:
    value = positive_int(text)
    if value > 1024:
        raise argparse.ArgumentTypeError(f"{value} vCPUs is more than vtick supports (1024)")
    return value


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


def _mutation(text: str) -> str:
    from vtick.host.mutations import MUTATIONS

    if text not in MUTATIONS:
        known = ", ".join(sorted(MUTATIONS)) or "none yet"
        raise argparse.ArgumentTypeError(f"unknown mutation {text!r} (known: {known})")
    return text


def _mutate_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mutate",
        type=_mutation,
        action="append",
        default=[],
        metavar="NAME",
        help="TEST AID: plant the named bug in the host to prove a checker catches it "
        "(the run's figures are then wrong on purpose; listed in vtick.host.mutations)",
    )


def _workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=nonneg_int, default=1, help="workload random seed")
    p.add_argument(
        "--workload",
        choices=list(WORKLOAD_NAMES),
        default="timers",
        help="guest workload: timers (random hrtimers, some cancelled or re-armed), "
        "tick (the periodic tick alone)",
    )
    p.add_argument(
        "--mode",
        choices=list(MODE_NAMES),
        default="pv-ktime",
        help="timer mode: how the guest programs its clock-event device",
    )
    p.add_argument(
        "--apic", choices=list(APIC_NAMES), default=None, help="APIC access (default: the mode's)"
    )
    p.add_argument("--hz", type=positive_int, default=1000, help="the guest kernel's HZ")
    p.add_argument(
        "--ipi",
        choices=list(IPI_VARIANT_NAMES),
        default=None,
        help="IPI path for smp_call_function (sets the APIC access unless --apic is given)",
    )
    p.add_argument(
        "--param",
        type=param,
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
    run.add_argument("--duration", type=duration, default=1.8, help="seconds of workload per path")
    run.add_argument(
        "--modes",
        type=_choices(list(MODE_NAMES)),
        default=list(MODE_NAMES),
        help="comma-separated timer modes, 'all' or 'none' (default all)",
    )
    run.add_argument(
        "--ipi",
        type=_choices(list(IPI_VARIANT_NAMES)),
        default=list(IPI_VARIANT_NAMES),
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
        type=url,
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
    run.add_argument("--seed", type=nonneg_int, default=1, help="workload random seed")
    run.add_argument("--hz", type=positive_int, default=1000, help="the guest kernel's HZ")
    run.add_argument(
        "--apic", choices=list(APIC_NAMES), default=None, help="APIC access (default: the mode's)"
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
        type=param,
        action="append",
        default=[],
        metavar="NAME=INT",
        help="workload parameter: timers, min_ns, max_ns, churn_pct, pause_ns, ipi_every_ns",
    )
    preempt_arg(run)
    _mutate_arg(run)

    cmp = sub.add_parser("compare", help="print the differences between two results files")
    cmp.add_argument("a", help="results JSON of the first run")
    cmp.add_argument("b", help="results JSON of the second run")

    host = sub.add_parser("host", help="run the host (VMM) process")
    host.add_argument("--listen", type=url, required=True)
    host.add_argument("--vcpus", type=_vcpu_count, required=True)
    host.add_argument("--duration", type=duration, default=5.0)
    host.add_argument("--results", default=None, help="write results JSON here")
    host.add_argument(
        "--connect-timeout",
        type=duration,
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
        type=duration,
        default=10.0,
        help="seconds to wait at the end for every vCPU's report and goodbye",
    )
    host.add_argument(
        "--token-file", default=None, help=f"file holding the run token in hex (else ${TOKEN_ENV})"
    )
    _workload_args(host)
    _mutate_arg(host)

    sub.add_parser(
        "guest",
        help="run one vCPU process (vtick guest --help for its options)",
        add_help=False,
    )

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench", required=True)
    bt = bsub.add_parser(
        "transport",
        help="exit round trip vs trio + pynng, bare pynng and AF_UNIX floors, interleaved",
    )
    bt.add_argument(
        "--count", type=positive_int, default=5000, help="round trips per path (default 5000)"
    )
    bt.add_argument(
        "--warmup", type=nonneg_int, default=500, help="warm-up round trips (default 500)"
    )
    bt.add_argument(
        "--block", type=positive_int, default=250, help="round trips per block (default 250)"
    )
    bw = bsub.add_parser(
        "wheel", help="host hrtimer wheel vs a heapq queue with lazy deletion, same workload"
    )
    bw.add_argument("--timers", type=positive_int, default=1_000_000)
    bw.add_argument("--seed", type=nonneg_int, default=1)
    br = bsub.add_parser("recording", help="a run with trace recording on vs off")
    br.add_argument("--mode", choices=list(MODE_NAMES), default="pv-ktime")
    br.add_argument("--rounds", type=positive_int, default=3)
    br.add_argument("--duration", type=duration, default=2.0)
    bl = bsub.add_parser(
        "lateness", help="vtick's timer lateness vs a bare timerfd storm, interleaved"
    )
    bl.add_argument("--rounds", type=positive_int, default=3, help="blocks per path (default 3)")
    bl.add_argument("--duration", type=duration, default=2.0, help="seconds per block (default 2)")
    bl.add_argument("--seed", type=nonneg_int, default=1, help="storm seed (default 1)")
    return parser


def _cmd_host(args: argparse.Namespace) -> int:
    from vtick.host.server import HostConfig, serve

    cfg = HostConfig(
        listen=args.listen,
        vcpus=args.vcpus,
        token=read_token(args.token_file),
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
        mutations=tuple(args.mutate),
    )
    try:
        results = trio.run(serve, cfg)
    except OSError as exc:
        print(f"vtick host: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0 if results["ok"] else 1


def _cmd_run(args: argparse.Namespace) -> int:
    from vtick.host.lab.run import run_main

    return run_main(args)


def _cmd_compare(args: argparse.Namespace) -> int:
    from vtick.host.lab.compare import compare_main

    return compare_main(args.a, args.b)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.bench == "recording":
        from vtick.host.bench.recording import run_recording_bench

        return run_recording_bench(args.mode, args.rounds, args.duration)
    if args.bench == "lateness":
        from vtick.host.bench.lateness import run_lateness_bench

        return run_lateness_bench(args.rounds, args.duration, args.seed)
    if args.bench == "wheel":
        from vtick.host.bench.wheel import run_wheel_bench

        return run_wheel_bench(timers=args.timers, seed=args.seed)
    from vtick.host.bench.transport import run_transport_bench

    return run_transport_bench(count=args.count, warmup=args.warmup, block=args.block)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["guest"]:
        # the guest is its own program: same pid, fresh interpreter, no host imports
        os.execv(sys.executable, [sys.executable, "-m", "vtick.guest", *argv[1:]])
    args = _parser().parse_args(argv)
    handler = {
        "run": _cmd_run,
        "host": _cmd_host,
        "bench": _cmd_bench,
        "compare": _cmd_compare,
    }[args.command]
    return handler(args)
