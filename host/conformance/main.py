"""``vtick conformance host|guest`` and ``vtick fuzz``: what the command line dispatches to.

``host/cli.py`` parses; these functions check what argparse cannot (a pattern that
matches no case, a template without ``{url}``, an output directory that does not
exist) before any process starts, run, write the reports and return the exit status:
0 when every MUST passed (no ``fail``, no ``error``), 1 otherwise, 2 for a usage error or
a host that cannot be started or reached.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

import trio

from vtick.host.conformance import case as c
from vtick.host.conformance import report as rep
from vtick.host.conformance.runner import Runner, RunnerConfig
from vtick.host.conformance.target import HostSpec, TargetError, own_host_command
from vtick.proto.cliargs import read_token

__all__ = ["conformance_host_main", "check_outputs", "host_spec"]


def _fail(text: str) -> int:
    print(f"vtick conformance: {text}", file=sys.stderr)
    return 2


def check_outputs(paths: Sequence[str | None]) -> str | None:
    """A one-line problem with an output path (its directory must exist), or None."""
    for path in paths:
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            return f"{path}: directory {folder} does not exist"
        if os.path.isdir(path):
            return f"{path} is a directory"
    return None


def host_spec(args: argparse.Namespace) -> HostSpec:
    """Where the host comes from (raises ValueError with a one-line reason)."""
    if args.connect and args.host_cmd:
        raise ValueError("--connect and --host-cmd exclude each other")
    if args.mutate and (args.connect or args.host_cmd):
        raise ValueError("--mutate applies to vtick's own host (drop --connect/--host-cmd)")
    if args.connect:
        try:
            token = read_token(args.token_file)
        except SystemExit as exc:  # read_token's one-line reason
            raise ValueError(str(exc).removeprefix("vtick: ")) from None
        return HostSpec(connect=args.connect, token=token)
    if args.host_cmd:
        if "{url}" not in args.host_cmd:
            raise ValueError("--host-cmd must contain {url} (the address the suite dials)")
        return HostSpec(command=args.host_cmd)
    return HostSpec(command=own_host_command(tuple(args.mutate)))


def _write(path: str | None, text: str) -> None:
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)


def write_reports(report: rep.Report, args: argparse.Namespace) -> None:
    _write(args.json, rep.to_json(report))
    _write(args.junit, rep.to_junit(report))
    _write(args.html, rep.to_html(report))


def conformance_host_main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from vtick.host.conformance.hostsuite import HOST_CASES

    try:
        cases = c.select(HOST_CASES, args.cases)
        spec = host_spec(args)
    except ValueError as exc:
        return _fail(str(exc))
    if args.list:
        for case in cases:
            print(f"{case.id}\t{case.level.value}\t{case.rule}\t{case.title}", file=out)
        return 0
    problem = check_outputs([args.json, args.junit, args.html])
    if problem:
        return _fail(problem)
    runner = Runner(RunnerConfig(spec=spec, vcpus=args.vcpus, strict=args.strict))
    print(rep.tap_header(len(cases)), file=out, flush=True)
    counter = iter(range(1, len(cases) + 1))

    def show(result: c.CaseResult) -> None:
        print(rep.tap_line(next(counter), result), file=out, flush=True)

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.monotonic_ns()
    try:
        results = trio.run(_run, runner, cases, show)
    except TargetError as exc:
        return _fail(f"host: {exc}")
    except KeyboardInterrupt:
        return 130
    report = rep.Report(
        side="host",
        target=runner.target_info | {"mutations": list(args.mutate)},
        results=results,
        strict=args.strict,
        started=started,
        duration_ns=time.monotonic_ns() - t0,
    )
    print(rep.tap_footer(report), file=out, flush=True)
    write_reports(report, args)
    return 0 if report.ok else 1


async def _run(
    runner: Runner, cases: Sequence[c.Case], show: Callable[[c.CaseResult], None]
) -> list[c.CaseResult]:
    return await runner.run(cases, on_result=show)
