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
        "--vcpus",
        type=_vcpu_count,
        default=None,
        help="vCPUs to serve, 1..1024 (required, except with --incoming: the VM says)",
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
    mig = host.add_argument_group("live migration (issue 13)")
    mig.add_argument(
        "--migrate-at",
        type=duration,
        default=None,
        metavar="SECONDS",
        help="this many seconds into the run, move the VM to --migrate-to (default: never)",
    )
    mig.add_argument(
        "--migrate-to",
        type=url,
        default=None,
        metavar="URL",
        help="the destination host's --incoming address (required with --migrate-at)",
    )
    mig.add_argument(
        "--incoming",
        type=url,
        default=None,
        metavar="URL",
        help="be a migration's destination: wait on URL for a VM instead of starting one "
        "(its vCPUs then dial --listen) (default: start a VM)",
    )
    mig.add_argument(
        "--migrate-timeout",
        type=duration,
        default=5.0,
        metavar="SECONDS",
        help="how long the transfer may take before the source gives up and runs the VM "
        "on (default: 5)",
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
    bd = bsub.add_parser("drops", help="abrupt pipe drops in a row against vtick's Pair0 endpoint")
    bd.add_argument("--drops", type=positive_int, default=20_000, help="per run (default 20000)")
    bd.add_argument("--runs", type=positive_int, default=1, help="runs (default 1)")
    bd.add_argument(
        "--lclose",
        type=nonneg_int,
        default=0,
        metavar="K",
        help="the listener also closes every K-th frame's pipe (default 0: never)",
    )
    bd.add_argument(
        "--undo-fix",
        action="store_true",
        help="receive buffer 0, nng's default: the code before the fix (crashes)",
    )
    bl = bsub.add_parser(
        "lateness", help="vtick's timer lateness vs a bare timerfd storm, interleaved"
    )
    bl.add_argument("--rounds", type=positive_int, default=3, help="blocks per path (default 3)")
    bl.add_argument("--duration", type=duration, default=2.0, help="seconds per block (default 2)")
    bl.add_argument("--seed", type=nonneg_int, default=1, help="storm seed (default 1)")
    bl.add_argument(
        "--timers",
        type=positive_int,
        default=8,
        help="timers per process / vCPU (default 8)",
    )
    bl.add_argument(
        "--min-us",
        type=positive_int,
        default=100,
        help="shortest re-arm, us (default 100: with --max-us 2000 the storm the goal is for)",
    )
    bl.add_argument(
        "--max-us", type=positive_int, default=2000, help="longest re-arm, us (default 2000)"
    )
    bm = bsub.add_parser(
        "migration", help="live migration per timer mode: blackout and delayed timers"
    )
    bm.add_argument(
        "--modes",
        type=_choices(list(MODE_NAMES)),
        default=None,
        help="comma-separated timer modes (default: lapic-xapic, lapic-periodic, "
        "tsc-deadline, vmi, pv-ktime, pv-delta)",
    )
    bm.add_argument("--rounds", type=positive_int, default=3, help="stay/move pairs (default 3)")
    bm.add_argument("--duration", type=duration, default=3.0, help="seconds per run (default 3)")
    bm.add_argument("--seed", type=nonneg_int, default=1, help="workload seed (default 1)")
    bm.add_argument(
        "--json", default=None, metavar="PATH", help="write the figures here (default: none)"
    )
    bm.add_argument(
        "--shape",
        choices=("sparse", "dense"),
        default="sparse",
        help="sparse: 1 timer 30..60 ms ahead (it spans the blackout); dense: the timers "
        "workload's 100 us .. 2 ms storm (default: sparse)",
    )
    _conformance_parsers(sub)
    _topology_parsers(sub, run, host)
    _chaos_parsers(sub, run)  # issue 10 (and issue 15's run --explain)
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


# ---------------------------------------------------------------------- topology (issue 12)


def _topology_parsers(
    sub: typing.Any, run: argparse.ArgumentParser, host: argparse.ArgumentParser
) -> None:
    run.add_argument(
        "--topology",
        default=None,
        metavar="FILE",
        help="run the VMs of a topology file (machines, VMs, placement: docs/topology.md) "
        "instead of the path comparison; per-VM tables (default: none, one local VM)",
    )
    for p in (run, host):
        p.add_argument(
            "--allow-insecure-tcp",
            action="store_true",
            help="allow a clear-text tcp:// listen beyond loopback (the token and every exit "
            "cross the network unencrypted; prefer tls+tcp://) (default: refused)",
        )
    agent = sub.add_parser(
        "agent",
        help="serve a topology controller on stdin/stdout (started by vtick itself)",
        description="Own this machine's vtick processes for a controller that talks on "
        "stdin/stdout (vtick run --topology starts it, over ssh for other machines).  "
        "Everything it started is removed when the controller says bye or goes away.",
    )
    agent.add_argument(
        "--run-base",
        default=None,
        metavar="DIR",
        help="where to create the private run directory (default: $TMPDIR)",
    )
    agent.add_argument(
        "--sweep",
        default=None,
        metavar="DIR",
        help="remove a dead agent's run directory and processes by its manifest, and exit",
    )
    topo = sub.add_parser("topology", help="check a topology file; make TLS certificates")
    tsub = topo.add_subparsers(dest="topology_command", required=True)
    check = tsub.add_parser(
        "check",
        help="preflight every machine: reachable, Python and vtick versions, free ports, "
        "clock offset",
    )
    check.add_argument("file", help="the topology TOML file")
    certs = tsub.add_parser(
        "certs",
        help="create a self-signed certificate and key for tls+tcp:// links on a test network",
    )
    certs.add_argument("dir", help="directory to write vtick-cert.pem and vtick-key.pem into")
    certs.add_argument(
        "--name",
        action="append",
        default=[],
        metavar="HOST_OR_IP",
        help="extra subject names besides 'vtick' (repeatable) (default: none)",
    )
    certs.add_argument(
        "--days", type=positive_int, default=30, help="validity in days (default: 30)"
    )
    certs.add_argument(
        "--force", action="store_true", help="overwrite an existing pair (default: refuse)"
    )


def _cmd_agent(args: argparse.Namespace) -> int:
    from vtick.host.topology.agent import agent_main

    return agent_main(args.run_base, args.sweep)


def _cmd_topology(args: argparse.Namespace) -> int:
    if args.topology_command == "certs":
        from vtick.host.topology.certs import certs_main

        return certs_main(args.dir, args.name, args.days, args.force)
    from vtick.host.topology.check import check_main

    return check_main(args.file)


def _cmd_run_topology(args: argparse.Namespace) -> int:
    from vtick.host.topology.controller import topology_main

    defaults = vars(_parser().parse_args(["run"]))
    given = [
        f"--{name.replace('_', '-')}"
        for name, value in vars(args).items()
        if name not in ("topology", "json", "wide", "command", "allow_insecure_tcp")
        and value != defaults.get(name)
    ]
    return topology_main(args.topology, args.json, args.wide, given)


# ---------------------------------------------------------------------- end of topology


# ---------------------------------------------------------------------- chaos (issue 10)


def _late_bound(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of ms") from None
    if not 0 < value <= 60_000:
        raise argparse.ArgumentTypeError(f"{text!r}: give 0 < MS <= 60000")
    return value


def _chaos_parsers(sub: typing.Any, run: argparse.ArgumentParser) -> None:
    from vtick.host.chaos.nemesis import FAULT_KINDS

    run.add_argument(
        "--migrate-at",
        type=duration,
        default=None,
        metavar="SECONDS",
        help="live-migrate each path's VM to a second host process this many seconds "
        "into the run; the results get blackout_* figures (default: never)",
    )
    run.add_argument(
        "--explain",
        action="store_true",
        help="record every event and explain each path's worst late timers: lateness "
        "split into host timer, host handling, transit, guest and handler, with the "
        "blocker named (also in --trace and --plots) (default: off)",
    )

    ch = sub.add_parser(
        "chaos",
        help="preempt, stop, kill and disturb vCPUs on a seeded schedule and check every "
        "invariant (exit 0 valid, 1 invalid, 2 unknown)",
        description="Run chaos runs: host and vCPU processes under a seeded fault schedule "
        "(the nemesis), one history per run, every invariant checked. Exit status 0 when "
        "every run is valid, 1 when one is invalid, 2 when one is unknown or the command "
        "line is wrong. docs/chaos.md describes the faults and the history.",
    )
    ch.add_argument("--runs", type=positive_int, default=1, help="runs, one after the other "
                    "(default: 1)")  # fmt: skip
    ch.add_argument(
        "--seed",
        type=nonneg_int,
        default=1,
        help="run i uses seed SEED+i for its fault schedule, mode, IPI path and workload "
        "(default: 1)",
    )
    ch.add_argument(
        "--faults",
        type=_choices(list(FAULT_KINDS)),
        default=list(FAULT_KINDS),
        help=f"comma-separated fault kinds from {', '.join(FAULT_KINDS)}, 'all' or 'none' "
        "(default: all)",
    )
    ch.add_argument(
        "--modes",
        type=_choices(list(MODE_NAMES)),
        default=list(MODE_NAMES),
        help="timer modes the runs take in turn (by seed), comma-separated, or 'all' "
        "(default: all)",
    )
    ch.add_argument(
        "--ipi",
        type=_choices(list(IPI_VARIANT_NAMES)),
        default=list(IPI_VARIANT_NAMES),
        help="IPI paths the runs take in turn (by seed), comma-separated, or 'all' (default: all)",
    )
    ch.add_argument("--vcpus", type=_vcpu_count, default=4, help="vCPUs per run, 1..32 "
                    "(default: 4)")  # fmt: skip
    ch.add_argument(
        "--duration",
        type=duration,
        default=2.0,
        help="seconds of workload per run, at least 1 (default: 2)",
    )
    ch.add_argument(
        "--out",
        default="vtick-chaos",
        metavar="DIR",
        help="where each run's directory (run-SEED/) goes (default: vtick-chaos)",
    )
    ch.add_argument(
        "--keep",
        choices=["all", "failing", "none"],
        default="failing",
        help="which runs keep their history.jsonl: all, failing (not valid) or none; "
        "verdict.json is always written (default: failing)",
    )
    ch.add_argument(
        "--late-bound",
        type=_late_bound,
        default=250.0,
        metavar="MS",
        help="lateness beyond this must overlap a fault or a stall on the timer's vCPU or "
        "the host (default: 250)",
    )
    ch.add_argument("--plots", action="store_true", help="write each run's lateness plot, "
                    "fault windows shaded (default: off)")  # fmt: skip
    ch.add_argument("--trace", action="store_true", help="write each run's Perfetto trace, "
                    "faults as slices (default: off)")  # fmt: skip
    ch.add_argument(
        "--experiment",
        choices=["preempt-window"],
        default=None,
        help="instead of chaos runs: preempt-window sweeps the window between computing a "
        "timer delta and programming the device (0, 100 us, 1 ms, 10 ms) for every timer "
        "mode and prints and plots the extra lateness (default: none)",
    )
    ch.add_argument(
        "--param",
        type=param,
        action="append",
        default=[],
        metavar="NAME=INT",
        help=_param_help(),
    )
    ch.add_argument(
        "--migrate-at",
        type=duration,
        default=None,
        metavar="SECONDS",
        help="live-migrate each run's VM to a second host process this many seconds into "
        "the run; the checkers read both hosts' logs as one history (default: never)",
    )
    _mutate_arg(ch)
    an = sub.add_parser(
        "analyze",
        help="re-check stored chaos histories (exit 0 valid, 1 invalid, 2 unknown)",
        description="Re-check the history.jsonl of a chaos run directory, a history file, "
        "or every run-*/ in a vtick chaos --out directory, with the current checkers.",
    )
    an.add_argument("dir", metavar="DIR", help="a run directory, a history.jsonl, or an --out "
                    "directory")  # fmt: skip
    an.add_argument(
        "--late-bound",
        type=_late_bound,
        default=250.0,
        metavar="MS",
        help="lateness that must be explained by a fault or a stall (default: 250)",
    )


def _cmd_chaos(args: argparse.Namespace) -> int:
    from vtick.host.chaos.main import chaos_main

    return chaos_main(args)


def _cmd_analyze(args: argparse.Namespace) -> int:
    from vtick.host.chaos.main import analyze_main

    return analyze_main(args)


# ---------------------------------------------------------------------- end of chaos


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
        if args.vcpus is None and args.incoming is None:
            raise UsageError("--vcpus is required (except with --incoming)")
        if (args.migrate_at is None) != (args.migrate_to is None):
            raise UsageError("--migrate-at and --migrate-to go together")
        if args.incoming is not None and args.migrate_at is not None:
            raise UsageError("--incoming waits for a VM; --migrate-at moves one: pick one")
        check_params(dict(args.param), [args.workload])
        check_listen(args.listen, args.vcpus or 1)
        if args.results:
            check_output_file(args.results, "--results")
    except UsageError as exc:
        print(f"vtick host: {exc}", file=sys.stderr)
        return 2
    cfg = HostConfig(
        listen=args.listen,
        vcpus=args.vcpus or 1,
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
        allow_insecure_tcp=args.allow_insecure_tcp,
        migrate_at_s=args.migrate_at,
        migrate_to=args.migrate_to,
        incoming=args.incoming,
        migrate_timeout_s=args.migrate_timeout,
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
    if args.topology is not None:
        return _cmd_run_topology(args)  # issue 12
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
    if args.bench == "drops":
        from vtick.host.bench.drops import run_drops_bench

        return run_drops_bench(args.drops, args.runs, args.lclose, args.undo_fix)
    if args.bench == "lateness":
        from vtick.host.bench.lateness import run_lateness_bench

        if args.min_us >= args.max_us:
            print(
                f"vtick bench lateness: --min-us {args.min_us} must be below --max-us "
                f"{args.max_us}",
                file=sys.stderr,
            )
            return 2
        return run_lateness_bench(
            args.rounds,
            args.duration,
            args.seed,
            args.timers,
            args.min_us * 1000,
            args.max_us * 1000,
        )
    if args.bench == "migration":
        from vtick.host.bench.migration import run_migration_bench

        return run_migration_bench(
            args.modes, args.rounds, args.duration, args.seed, args.json, args.shape
        )
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
        "agent": _cmd_agent,
        "topology": _cmd_topology,
        "chaos": _cmd_chaos,
        "analyze": _cmd_analyze,
    }[args.command]
    return handler(args)
