"""``vtick chaos`` and ``vtick analyze``: runs, verdicts, the summary, the exit status.

``vtick chaos`` runs ``--runs`` chaos runs one after the other.  Run *i* uses seed
``--seed + i``, which draws its fault schedule (``nemesis.py``), picks its timer mode
and IPI path from ``--modes`` and ``--ipi`` (by the seed, so ``--runs 1 --seed S`` with
the same lists reproduces run S's schedule) and seeds its workload.  Each run's
directory under ``--out`` gets ``verdict.json`` (every checker's answer and first
counterexample) and ``schedule.json``, plus ``history.jsonl`` (``--keep``), a lateness
plot (``--plots``) and a Perfetto trace (``--trace``).  After the runs: a table of fault
kind x invariant (operations checked while a fault of that kind was on, and
violations), and the totals.  Every run that is not valid prints the exact command that
reproduces its schedule.

Exit status, as Jepsen's: 0 every run valid, 1 a run invalid, 2 a run unknown (a fault
kind asked for never touched armed timers or in-flight IPIs, or the run could not be
completed) or a mistake in the command line (caught in one line before anything runs),
128 + N when signal N interrupted the runs.

``vtick analyze DIR`` re-checks stored histories (a run directory, a ``history.jsonl``,
or an ``--out`` directory of runs) with the current checkers, and exits the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from vtick.host.chaos.checkers import (
    CHECKERS,
    UNKNOWN,
    CheckOptions,
    Verdict,
    check_history,
    overall,
)
from vtick.host.chaos.nemesis import FAULT_KINDS

__all__ = ["chaos_main", "analyze_main", "RunSummary", "verdict_word", "status_for"]

KEEP = ("all", "failing", "none")
#: chaos runs churn half of the timer storm's boundaries (the workload's default is 10 %),
#: so cancels and replacements are common enough to check; --param overrides it
CHAOS_PARAMS = {"churn_pct": 50}


def verdict_word(valid: bool | str) -> str:
    if valid is True:
        return "valid"
    return "INVALID" if valid is False else "unknown"


def status_for(results: list[bool | str]) -> int:
    if any(r is False for r in results):
        return 1
    if any(r == UNKNOWN for r in results):
        return 2
    return 0


@dataclass
class RunSummary:
    index: int
    seed: int
    mode: str
    ipi: str
    valid: bool | str = UNKNOWN
    events: int = 0
    check_s: float = 0.0
    wall_s: float = 0.0
    faults: Counter[str] = field(default_factory=Counter)
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    stalls: list[str] = field(default_factory=list)
    failure: str | None = None
    directory: str = ""
    history_bytes: int = 0


def _faults_applied(history: list[dict[str, Any]]) -> Counter[str]:
    return Counter(
        e["value"]["kind"] for e in history if e["f"] == "fault" and e["type"] == "invoke"
    )


def _repro(args: argparse.Namespace, seed: int, mode: str, ipi: str) -> str:
    cmd = [
        "vtick", "chaos", "--runs", "1", "--seed", str(seed), "--modes", mode, "--ipi", ipi,
        "--faults", ",".join(args.faults) or "none", "--vcpus", str(args.vcpus),
        "--duration", f"{args.duration:g}",
    ]  # fmt: skip
    cmd += [a for name in args.mutate for a in ("--mutate", name)]
    cmd += [a for k, v in args.param for a in ("--param", f"{k}={v}")]
    if getattr(args, "migrate_at", None) is not None:
        cmd += ["--migrate-at", f"{args.migrate_at:g}"]
    if args.late_bound != DEFAULT_LATE_BOUND_MS:
        cmd += ["--late-bound", f"{args.late_bound:g}"]
    return shlex.join(cmd)


DEFAULT_LATE_BOUND_MS = 250.0


def _check_options(args: argparse.Namespace) -> CheckOptions:
    return CheckOptions(late_bound_ns=int(args.late_bound * 1e6))


def _preflight(args: argparse.Namespace) -> None:
    """Every mistake in the command line, before anything runs (raises UsageError)."""
    from vtick.host.lab.preflight import UsageError, check_output_dir, check_params

    if args.runs < 1:
        raise UsageError("--runs must be at least 1")
    if args.duration < 1.0:
        raise UsageError(
            f"--duration {args.duration:g}: a chaos run needs at least 1 s (0.3 s of boot, "
            "faults, 0.3 s of tail)"
        )
    if not 1 <= args.vcpus <= 32:
        raise UsageError(f"--vcpus {args.vcpus}: chaos runs take 1..32 vCPUs")
    if args.late_bound <= 0:
        raise UsageError("--late-bound must be positive")
    if not args.modes:
        raise UsageError("--modes: at least one timer mode")
    if not args.ipi:
        raise UsageError("--ipi: at least one IPI path")
    migrate_at = getattr(args, "migrate_at", None)
    if migrate_at is not None and not 0.3 <= migrate_at < args.duration:
        raise UsageError(
            f"--migrate-at {migrate_at:g}: move the VM after boot (0.3 s) and before the "
            f"end of the run ({args.duration:g} s)"
        )
    check_output_dir(args.out, "--out")
    check_params(dict(args.param), ["mixed"])


def chaos_main(args: argparse.Namespace) -> int:
    """``vtick chaos``: the runs, their verdicts, the summary table; the exit status."""
    from rich.console import Console

    from vtick.host.lab.preflight import UsageError

    try:
        _preflight(args)
    except UsageError as exc:
        print(f"vtick chaos: {exc}", file=sys.stderr)
        return 2
    console = Console(width=None if sys.stdout.isatty() else 160)
    if args.experiment:
        from vtick.host.chaos.experiment import preempt_window_main

        return preempt_window_main(args, console)
    for name in args.mutate:
        from vtick.host.mutations import MUTATIONS

        console.print(
            f"[bold red]MUTATION ACTIVE[/]: {name}: {MUTATIONS[name].breaks} (a planted bug: "
            f"this must fail {MUTATIONS[name].caught_by})"
        )
    summaries, interrupted = _run_all(args, console)
    _print_summary(summaries, args, console)
    if interrupted:
        console.print(f"interrupted by {interrupted}: {len(summaries)} run(s) finished")
        return 128 + signal.Signals[interrupted].value
    return status_for([s.valid for s in summaries])


def _run_all(args: argparse.Namespace, console: Any) -> tuple[list[RunSummary], str | None]:
    import trio
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from vtick.host.chaos.guardian import Guardian
    from vtick.host.chaos.history import build_history, write_history
    from vtick.host.chaos.orchestrator import ChaosOptions, execute

    summaries: list[RunSummary] = []
    interrupted: str | None = None
    os.makedirs(args.out, exist_ok=True)
    guardian = Guardian()  # no process stays stopped, even if this one is killed
    with (
        contextlib.closing(guardian),
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress,
    ):
        task = progress.add_task("chaos", total=args.runs)
        for i in range(args.runs):
            seed = args.seed + i
            mode = args.modes[seed % len(args.modes)]
            ipi = args.ipi[seed % len(args.ipi)]
            progress.update(task, description=f"run {i + 1} (seed {seed}, {mode}, {ipi})")
            opts = ChaosOptions(
                seed=seed,
                mode=mode,
                ipi=ipi,
                vcpus=args.vcpus,
                duration_s=args.duration,
                faults=tuple(args.faults),
                mutations=tuple(args.mutate),
                params=tuple(sorted((CHAOS_PARAMS | dict(args.param)).items())),
                migrate_at_s=getattr(args, "migrate_at", None),
            )
            ex = trio.run(execute, opts, guardian)
            history = build_history(ex)
            t0 = time.perf_counter()
            verdicts = check_history(history, _check_options(args))
            summary = RunSummary(
                index=i,
                seed=seed,
                mode=mode,
                ipi=ipi,
                valid=overall(verdicts),
                events=len(history),
                check_s=time.perf_counter() - t0,
                wall_s=ex.wall_ns / 1e9,
                faults=_faults_applied(history),
                verdicts=verdicts,
                failure=ex.failure,
            )
            if ex.results:
                from vtick.host.lab.metrics import stalls

                summary.stalls = [s["text"] for s in stalls(ex.results)]
            summary.directory = os.path.join(args.out, f"run-{seed}")
            _write_run(summary, history, ex, args, write_history)
            summaries.append(summary)
            progress.update(task, completed=i + 1)
            _print_run(summary, args, console)
            if ex.interrupted:
                interrupted = ex.interrupted
                break
    return summaries, interrupted


def _write_run(
    s: RunSummary, history: list[dict[str, Any]], ex: Any, args: argparse.Namespace, write: Any
) -> None:
    os.makedirs(s.directory, exist_ok=True)
    keep = args.keep == "all" or (args.keep == "failing" and s.valid is not True)
    if keep:
        s.history_bytes = write(history, os.path.join(s.directory, "history.jsonl"))
    with open(os.path.join(s.directory, "schedule.json"), "w") as fh:
        json.dump([op.as_dict() for op in ex.schedule], fh, indent=1)
    verdict = {
        "seed": s.seed,
        "mode": s.mode,
        "ipi": s.ipi,
        "valid": s.valid,
        "events": s.events,
        "history_kept": keep,
        "reproduce": _repro(args, s.seed, s.mode, s.ipi),
        "failure": ex.failure,
        "stalls": s.stalls,
        "faults": dict(s.faults),
        "stderr": ex.stderr,
        "checkers": {name: v.as_dict() for name, v in s.verdicts.items()},
    }
    with open(os.path.join(s.directory, "verdict.json"), "w") as fh:
        json.dump(verdict, fh, indent=1, default=str)
    if args.plots:
        from vtick.host.lab.plots import write_chaos_plot

        write_chaos_plot(history, os.path.join(s.directory, "lateness.png"))
    if args.trace:
        from vtick.host.lab.trace import write_chaos_trace

        write_chaos_trace(history, os.path.join(s.directory, "trace.json"))


def _print_run(s: RunSummary, args: argparse.Namespace, console: Any) -> None:
    faults = ", ".join(f"{k} {n}" for k, n in sorted(s.faults.items())) or "no faults"
    word = verdict_word(s.valid)
    color = {"valid": "green", "INVALID": "bold red"}.get(word, "yellow")
    console.print(
        f"run {s.index + 1} (seed {s.seed}, {s.mode}, {s.ipi}): [{color}]{word}[/] — "
        f"{s.events} events, {faults}, {s.wall_s:.1f} s"
    )
    for text in s.stalls:
        console.print(f"  stall: {text}")
    if s.valid is True:
        return
    if s.failure:
        console.print(f"  the run did not complete: {s.failure}")
    for name, v in s.verdicts.items():
        if v.valid is True:
            continue
        console.print(f"  {name}: {verdict_word(v.valid)}", highlight=False)
        if v.first is not None:
            idx = ", ".join(str(i) for i in v.first["indices"][:6])
            console.print(
                f"    {v.first['message']}" + (f" [events {idx}]" if idx else ""), highlight=False
            )
        if v.violations > 1:
            console.print(f"    ({v.violations} violations in all)")
    console.print(f"  reproduce: {_repro(args, s.seed, s.mode, s.ipi)}", highlight=False)
    console.print(f"  details: {s.directory}", highlight=False)


def _print_summary(summaries: list[RunSummary], args: argparse.Namespace, console: Any) -> None:
    from rich.table import Table

    if not summaries:
        return
    kinds = [k for k in FAULT_KINDS if k in args.faults] + ["none"]
    table = Table(
        title=f"Invariants x faults ({len(summaries)} run(s)): operations checked while a "
        "fault of that kind was on / violations",
        title_justify="left",
    )
    table.add_column("invariant")
    for kind in kinds:
        table.add_column(kind, justify="right")
    table.add_column("violations", justify="right")
    table.add_column("runs v/i/u", justify="right")
    for name in CHECKERS:
        exposure: Counter[str] = Counter()
        violations = 0
        tally: Counter[str] = Counter()
        for s in summaries:
            v = s.verdicts.get(name)
            if v is None:
                continue
            exposure.update(v.exposure)
            violations += v.violations
            tally[verdict_word(v.valid)] += 1
        runs = f"{tally['valid']}/{tally['INVALID']}/{tally['unknown']}"
        table.add_row(name, *[str(exposure.get(k, 0)) for k in kinds], str(violations), runs)
    console.print(table)
    faults: Counter[str] = Counter()
    for s in summaries:
        faults.update(s.faults)
    events = sum(s.events for s in summaries)
    check_s = sum(s.check_s for s in summaries)
    wall = sum(s.wall_s for s in summaries)
    results = [s.valid for s in summaries]
    per_m = check_s / events * 1e6 if events else 0.0
    console.print(
        f"runs: {results.count(True)} valid, {results.count(False)} invalid, "
        f"{len(results) - results.count(True) - results.count(False)} unknown; "
        f"run time {wall:.0f} s"
    )
    console.print(
        "faults injected: " + (", ".join(f"{k} {n}" for k, n in sorted(faults.items())) or "none")
    )
    console.print(
        f"events checked: {events}; checkers: {check_s:.2f} s ({per_m:.2f} s per million events)"
    )
    console.print(f"runs written to {args.out}")


# ---------------------------------------------------------------------- vtick analyze


def _histories(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    single = os.path.join(path, "history.jsonl")
    if os.path.isfile(single):
        return [single]
    if os.path.isdir(path):
        found = sorted(
            os.path.join(path, d, "history.jsonl")
            for d in os.listdir(path)
            if os.path.isfile(os.path.join(path, d, "history.jsonl"))
        )
        return found
    return []


def analyze_main(args: argparse.Namespace) -> int:
    """``vtick analyze DIR``: re-check stored histories; exit as ``vtick chaos`` does."""
    from rich.console import Console

    from vtick.host.chaos.history import HistoryError, read_history

    if args.late_bound <= 0:
        print("vtick analyze: --late-bound must be positive", file=sys.stderr)
        return 2
    paths = _histories(args.dir)
    if not paths:
        print(
            f"vtick analyze: {args.dir}: no history.jsonl there (nor in its run-* directories)",
            file=sys.stderr,
        )
        return 2
    console = Console(width=None if sys.stdout.isatty() else 160)
    results: list[bool | str] = []
    for path in paths:
        try:
            history = read_history(path)
        except HistoryError as exc:
            print(f"vtick analyze: {exc}", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        verdicts = check_history(history, _check_options(args))
        took = time.perf_counter() - t0
        valid = overall(verdicts)
        results.append(valid)
        cfg = history[0]["value"].get("config", {})
        console.print(
            f"{path}: {verdict_word(valid)} — {len(history)} events "
            f"(seed {cfg.get('seed')}, {cfg.get('mode')}, {cfg.get('ipi')}), checked in "
            f"{took:.2f} s",
            highlight=False,
        )
        for name, v in verdicts.items():
            line = f"  {name:22} {verdict_word(v.valid):8} {v.checked:7} checked"
            if v.violations:
                line += f", {v.violations} violation(s)"
            console.print(line, highlight=False)
            if v.first is not None and v.valid is not True:
                idx = ", ".join(str(i) for i in v.first["indices"][:6])
                console.print(
                    f"      {v.first['message']}" + (f" [events {idx}]" if idx else ""),
                    highlight=False,
                )
            for note in v.notes[:3] if v.valid is not True else []:
                console.print(f"      {note}", highlight=False)
    return status_for(results)
