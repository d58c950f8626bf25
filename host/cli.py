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
import typing
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


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (what is wrong, and where the help is), status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("vtick")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return "unknown"


def _run_duration(text: str) -> float:
    """``vtick run --duration``: long enough to boot, calibrate and measure something."""
    value = duration(text)
    if value < 0.1:
        raise argparse.ArgumentTypeError(
            f"duration {text!r} s is too short to measure anything: give at least 0.1 s"
        )
    return value


def _hz(text: str) -> int:
    """The guest's HZ: Linux offers 100, 250, 300 and 1000."""
    value = positive_int(text)
    if not 100 <= value <= 10_000:
        raise argparse.ArgumentTypeError(
            f"HZ {value} is out of range 100..10000 (Linux offers 100, 250, 300, 1000)"
        )
    return value


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
        twice = sorted({t for t in items if items.count(t) > 1})
        if twice:
            raise argparse.ArgumentTypeError(f"{text!r}: {', '.join(twice)} given twice")
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
        "(the run's figures are then wrong on purpose; listed in vtick.host.mutations; "
        "repeatable; default: none)",
    )


def _param_help() -> str:
    from vtick.host.lab.preflight import param_help

    return f"workload parameter, repeatable (default: none): {param_help()}"


def _workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=nonneg_int, default=1, help="workload random seed (default: 1)")
    p.add_argument(
        "--workload",
        choices=list(WORKLOAD_NAMES),
        default="timers",
        help="guest workload: timers (random hrtimers, some cancelled or re-armed), "
        "tick (the periodic tick alone), ipi (the IPI storm: smp_call_function on every "
        "other vCPU, back to back), mixed (timers plus a call every ipi_every_ns) "
        "(default: timers)",
    )
    p.add_argument(
        "--mode",
        choices=list(MODE_NAMES),
        default="pv-ktime",
        help="timer mode, how the guest programs its clock-event device: "
        f"{', '.join(MODE_NAMES)} (default: pv-ktime)",
    )
    p.add_argument(
        "--apic",
        choices=list(APIC_NAMES),
        default=None,
        help=f"APIC access: {', '.join(APIC_NAMES)} (default: the mode's)",
    )
    p.add_argument(
        "--hz", type=_hz, default=1000, help="the guest kernel's HZ, 100..10000 (default: 1000)"
    )
    p.add_argument(
        "--ipi",
        choices=list(IPI_VARIANT_NAMES),
        default=None,
        help=f"IPI path for smp_call_function: {', '.join(IPI_VARIANT_NAMES)}; sets the "
        "APIC access unless --apic is given (default: the APIC access's own)",
    )
    p.add_argument(
        "--param",
        type=param,
        action="append",
        default=[],
        metavar="NAME=INT",
        help=_param_help(),
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vtick",
        description="Measure virtual CPU timer and IPI paths over real host and vCPU processes.",
    )
    parser.add_argument("--version", action="version", version=f"vtick {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="the main job: every timer mode, then every IPI path, then the comparison",
        description="Run each timer mode with the timer workload, then each IPI path with "
        "the IPI storm, each on a fresh host and fresh vCPU processes, and print one "
        "comparison table per family.",
    )
    run.add_argument(
        "--vcpus",
        type=_vcpu_count,
        default=4,
        help="vCPU processes per path; the IPI paths need 2 or more (default: 4)",
    )
    run.add_argument(
        "--duration",
        type=_run_duration,
        default=1.8,
        help="seconds of workload per path, 0.1..86400 (default: 1.8)",
    )
    run.add_argument(
        "--modes",
        type=_choices(list(MODE_NAMES)),
        default=list(MODE_NAMES),
        help=f"comma-separated timer modes from {', '.join(MODE_NAMES)}, 'all' or 'none' "
        "(default: all)",
    )
    run.add_argument(
        "--ipi",
        type=_choices(list(IPI_VARIANT_NAMES)),
        default=None,
        help=f"comma-separated IPI paths from {', '.join(IPI_VARIANT_NAMES)}, 'all' or "
        "'none' (default: all, or none with --vcpus 1)",
    )
    run.add_argument(
        "--workload",
        choices=["timers", "tick", "mixed"],
        default="timers",
        help="workload of the timer modes: timers, tick or mixed (the IPI paths always run "
        "the IPI storm) (default: timers)",
    )
    run.add_argument(
        "--listen",
        type=url,
        default=None,
        help="base URL; tcp://HOST:PORT uses ports PORT..PORT+N-1 "
        "(default: ipc:// in a private temporary directory)",
    )
    run.add_argument(
        "--json",
        default="vtick-results.json",
        metavar="PATH",
        help="results file to write (default: vtick-results.json)",
    )
    run.add_argument(
        "--plots", default=None, metavar="DIR", help="write PNG plots here (default: none)"
    )
    run.add_argument(
        "--trace",
        default=None,
        metavar="PATH",
        help="write a Chrome/Perfetto trace-event JSON file of every path's first events "
        "(default: none)",
    )
    run.add_argument(
        "--histogram",
        default=None,
        metavar="PATH",
        help="write each timer path's lateness histograms in cyclictest's --json shape; "
        "with several timer paths, PATH's name gets the path's (lat.json -> "
        "lat.pv-ktime.json) (default: none)",
    )
    run.add_argument(
        "--wide",
        action="store_true",
        help="print the full tables whatever the terminal's width "
        "(default: full tables only when they fit)",
    )
    run.add_argument("--seed", type=nonneg_int, default=1, help="workload random seed (default: 1)")
    run.add_argument(
        "--hz", type=_hz, default=1000, help="the guest kernel's HZ, 100..10000 (default: 1000)"
    )
    run.add_argument(
        "--apic",
        choices=list(APIC_NAMES),
        default=None,
        help=f"APIC access: {', '.join(APIC_NAMES)} (default: each mode's own)",
    )
    run.add_argument(
        "--exit-cost",
        type=_exit_cost,
        default=None,
        metavar="PROFILE",
        help="add a modeled host cost per exit and rank by it: kvm-2011-xapic, x2apic, "
        "apicv, or a TOML file (default: none, rank by vtick's own host time)",
    )
    run.add_argument(
        "--param",
        type=param,
        action="append",
        default=[],
        metavar="NAME=INT",
        help=_param_help(),
    )
    preempt_arg(run)
    _mutate_arg(run)
    run.add_argument(
        "--vcpus-per-process",
        type=positive_int,
        default=1,
        metavar="K",
        help="run K vCPUs in each guest process, each with its own link and kernel "
        "model (default: 1, a process per vCPU); lets 256 vCPUs fit on a small machine",
    )

    cmp = sub.add_parser(
        "compare",
        help="print the differences between two results files",
        description="Compare two `vtick run --json` files: configuration differences "
        "first, then every path measured in both, then the paths only one has.",
    )
    cmp.add_argument("a", help="results JSON of the first run")
    cmp.add_argument("b", help="results JSON of the second run")

    host = sub.add_parser("host", help="run the host (VMM) process")
    host.add_argument(
        "--listen",
        type=url,
        required=True,
        help="base URL: ipc:///DIR/NAME or tcp://HOST:PORT (ports PORT..PORT+N-1) (required)",
    )
    host.add_argument(
        "--vcpus", type=_vcpu_count, required=True, help="vCPUs to serve, 1..1024 (required)"
    )
    host.add_argument(
        "--duration",
        type=duration,
        default=5.0,
        help="seconds of workload once every vCPU connected (default: 5)",
    )
    host.add_argument(
        "--results", default=None, metavar="PATH", help="write results JSON here (default: none)"
    )
    host.add_argument(
        "--connect-timeout",
        type=duration,
        default=30.0,
        help="seconds to wait for every vCPU to connect (default: 30)",
    )
    host.add_argument(
        "--exit-cost",
        type=_exit_cost,
        default=None,
        metavar="PROFILE",
        help="add a modeled handling cost per exit: a shipped profile "
        "(kvm-2011-xapic, x2apic, apicv) or a TOML file (default: none)",
    )
    host.add_argument(
        "--trace", action="store_true", help="ask every vCPU for a trace window (default: off)"
    )
    host.add_argument(
        "--timer-advance",
        action="store_true",
        help="adaptive LAPIC timer advance for TSC-deadline (KVM's lapic_timer_advance) "
        "(default: off)",
    )
    host.add_argument(
        "--report-timeout",
        type=duration,
        default=10.0,
        help="seconds to wait at the end for every vCPU's report and goodbye (default: 10)",
    )
    host.add_argument(
        "--token-file",
        default=None,
        help=f"file holding the run token in hex (default: ${TOKEN_ENV})",
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
    bw.add_argument(
        "--timers", type=positive_int, default=1_000_000, help="timers (default: 1000000)"
    )
    bw.add_argument("--seed", type=nonneg_int, default=1, help="workload seed (default: 1)")
    bw.add_argument(
        "--shape",
        choices=["hrtimer", "watchdog"],
        default="hrtimer",
        help="hrtimer: the normal life of host hrtimers; watchdog: every timer pushed back "
        "16 times before it fires (default: hrtimer)",
    )
    br = bsub.add_parser("recording", help="a run with trace recording on vs off")
    br.add_argument(
        "--mode",
        choices=list(MODE_NAMES),
        default="pv-ktime",
        help=f"timer mode: {', '.join(MODE_NAMES)} (default: pv-ktime)",
    )
    br.add_argument("--rounds", type=positive_int, default=3, help="rounds (default: 3)")
    br.add_argument("--duration", type=duration, default=2.0, help="seconds per run (default: 2)")
    bs = bsub.add_parser(
        "scale", help="events/s, exit round trip and lateness for 1, 2, 4, ... vCPUs"
    )
    bs.add_argument(
        "--largest",
        type=positive_int,
        default=64,
        help="largest size with one process per vCPU (default 64)",
    )
    bs.add_argument(
        "--packed",
        type=nonneg_int,
        default=256,
        help="vCPUs of the packed run, 0 for none (default 256)",
    )
    bs.add_argument(
        "--per-process",
        type=positive_int,
        default=16,
        help="vCPUs per process when packed (default 16)",
    )
    bs.add_argument("--duration", type=duration, default=2.0, help="seconds per size (default 2)")
    bs.add_argument(
        "--plot", default=None, metavar="PNG", help="draw the curve here (default: none)"
    )
    bl = bsub.add_parser(
        "lateness", help="vtick's timer lateness vs a bare timerfd storm, interleaved"
    )
    bl.add_argument("--rounds", type=positive_int, default=3, help="blocks per path (default 3)")
    bl.add_argument("--duration", type=duration, default=2.0, help="seconds per block (default 2)")
    bl.add_argument("--seed", type=nonneg_int, default=1, help="storm seed (default 1)")
    _conformance_parsers(sub)
    return parser


# ---------------------------------------------------------------------- conformance (issue 11)


def _conformance_outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cases",
        default=None,
        metavar="PATTERN",
        help="comma-separated case ids, prefixes or globs, e.g. 'lapic.timer,link.*' "
        "(default: every case)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="a failed SHOULD is a failure, not non-strict (default: off)",
    )
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--json", default=None, metavar="PATH", help="write the JSON report here")
    p.add_argument("--junit", default=None, metavar="PATH", help="write JUnit XML here")
    p.add_argument("--html", default=None, metavar="PATH", help="write one HTML page here")


def _host_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--connect",
        type=url,
        default=None,
        metavar="URL",
        help="a running host's base URL (token from $VTICK_TOKEN or --token-file)",
    )
    p.add_argument(
        "--host-cmd",
        default=None,
        metavar="CMD",
        help="start the host with CMD; {url}, {vcpus}, {duration} and {results} are filled "
        "in, the token is in $VTICK_TOKEN, READY on stdout means ready "
        "(default: vtick's own host)",
    )
    p.add_argument(
        "--token-file",
        default=None,
        help=f"the token of a --connect host, in hex (default: ${TOKEN_ENV})",
    )


def _conformance_parsers(sub: typing.Any) -> None:
    conf = sub.add_parser("conformance", help="check a host or a guest against the protocol")
    csub = conf.add_subparsers(dest="side", required=True)
    ch = csub.add_parser(
        "host",
        help="play guest peers against a host: handshake, codec, link, LAPIC, timers, IPIs, "
        "PV devices, shutdown",
    )
    _host_target_args(ch)
    ch.add_argument(
        "--vcpus",
        type=_vcpu_count,
        default=4,
        help="vCPUs of a host the suite starts (default: 4)",
    )
    _mutate_arg(ch)
    _conformance_outputs(ch)
    cg = csub.add_parser("guest", help="run a guest against a scripted host")
    cg.add_argument(
        "--guest-cmd",
        default=None,
        metavar="CMD",
        help="the guest program; {url} and {vcpu} are filled in, the token is in "
        "$VTICK_TOKEN (default: vtick's own guest)",
    )
    cg.add_argument(
        "--modes",
        type=_choices(list(MODE_NAMES)),
        default=None,
        help="timer modes to boot the guest in (default: pv-ktime,lapic-xapic,tsc-deadline)",
    )
    _conformance_outputs(cg)
    fz = sub.add_parser("fuzz", help="fuzz a running host while a well-behaved vCPU works")
    _host_target_args(fz)
    fz.add_argument(
        "--messages", type=positive_int, default=10_000, help="messages to send (default: 10000)"
    )
    fz.add_argument("--seed", type=nonneg_int, default=1, help="generator seed (default: 1)")
    fz.add_argument(
        "--save",
        default="vtick-fuzz-failures",
        metavar="DIR",
        help="where failing inputs are saved (default: vtick-fuzz-failures)",
    )
    fz.add_argument(
        "--replay",
        default=None,
        metavar="FILE",
        help="send a saved failing input again instead of fuzzing",
    )
    fz.add_argument("--json", default=None, metavar="PATH", help="write the fuzz report here")


def _cmd_conformance(args: argparse.Namespace) -> int:
    if args.side == "host":
        from vtick.host.conformance.main import conformance_host_main

        return conformance_host_main(args)
    from vtick.host.conformance.guestside import conformance_guest_main

    return conformance_guest_main(args)


def _cmd_fuzz(args: argparse.Namespace) -> int:
    from vtick.host.conformance.fuzz import fuzz_main

    return fuzz_main(args)


# ---------------------------------------------------------------------- end of conformance


def _cmd_host(args: argparse.Namespace) -> int:
    from vtick.host.lab.launcher import orphaned_host_cleanup
    from vtick.host.lab.preflight import (
        UsageError,
        check_listen,
        check_output_file,
        check_params,
    )
    from vtick.host.server import HostConfig, serve

    try:  # mistakes caught before the host listens (host/lab/preflight.py)
        check_params(dict(args.param), [args.workload])
        check_listen(args.listen, args.vcpus)
        if args.results:
            check_output_file(args.results, "--results")
    except UsageError as exc:
        print(f"vtick host: {exc}", file=sys.stderr)
        return 2
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
    finally:
        orphaned_host_cleanup(args.results)  # our launcher was SIGKILLed: tidy for it
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
    if args.bench == "scale":
        from vtick.host.bench.scale import run_scale_bench

        return run_scale_bench(
            args.largest, args.packed, args.per_process, args.duration, args.plot
        )
    if args.bench == "lateness":
        from vtick.host.bench.lateness import run_lateness_bench

        return run_lateness_bench(args.rounds, args.duration, args.seed)
    if args.bench == "wheel":
        from vtick.host.bench.wheel import run_wheel_bench

        return run_wheel_bench(timers=args.timers, seed=args.seed, shape=args.shape)
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
        "conformance": _cmd_conformance,
        "fuzz": _cmd_fuzz,
    }[args.command]
    return handler(args)
