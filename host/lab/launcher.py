"""``vtick run``: start the host and N vCPU processes, supervise them, collect results.

Every child is a real OS process in its own session (process group), so cleanup reaches
anything it started.  The per-run secret token travels in the environment (never on a
command line, where ``ps`` shows it), and ipc sockets live in a private 0700 directory
that is removed at the end whatever happened.  Children also watch the launcher's pid
and stop when it is gone, so even ``kill -9`` of the launcher leaves no orphan running
(see vtick.proto.lifecycle for why that is not PR_SET_PDEATHSIG).

A vCPU that exits with a non-zero status ends the run with an error naming it and its
status; SIGINT and SIGTERM stop everything.

The run directory (``$TMPDIR/vtick-XXXXXXXX``) holds the ipc sockets and the host's
results file, and the launcher removes it whatever happened.  A launcher killed with
SIGKILL cannot; its host then cleans up instead: it learns the directory from
``$VTICK_RUN_DIR`` and, finding its launcher gone when the run ends, removes its results
file (nobody will read it) and the directory, which its sockets have already left
(:func:`orphaned_host_cleanup`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import trio

from vtick.host.chaos.explain import Recording
from vtick.host.migration.results import merge_migration, moved
from vtick.host.results import write_json
from vtick.host.server import REPORT_S_PER_VCPU
from vtick.proto.lifecycle import PARENT_ENV
from vtick.proto.transport import link_url

__all__ = [
    "RunOptions",
    "RunFailed",
    "RunInterrupted",
    "launch",
    "describe_status",
    "orphaned_host_cleanup",
]

#: the run directory a launched host removes if its launcher is gone
RUN_DIR_ENV = "VTICK_RUN_DIR"
READY_TIMEOUT_S = 15.0
#: beyond the run's duration: the host's connect timeout (30 s) and report timeout (10 s)
#: plus slack; a host still running then has stopped answering
HOST_GRACE_S = 60.0
TERM_GRACE_S = 2.0


class RunFailed(Exception):
    """The run could not complete; the message says which process and why."""


class RunInterrupted(RunFailed):
    """SIGINT or SIGTERM stopped the run: the caller should stop too."""

    @property
    def signal_name(self) -> str:
        """``SIGINT`` or ``SIGTERM``."""
        return str(self).removeprefix("interrupted by ")


@dataclass
class RunOptions:
    vcpus: int = 4
    duration_s: float = 5.0
    listen: str | None = None
    seed: int = 1
    params: dict[str, int] = field(default_factory=dict)
    workload: str = "timers"
    mode: str = "pv-ktime"
    apic: str | None = None
    hz: int = 1000
    ipi: str | None = None
    #: preemption point -> injected delay in ns, for every vCPU
    preempt: dict[str, int] = field(default_factory=dict)
    exit_cost: str | None = None
    trace: bool = False
    #: planted bugs for the host (a test aid; vtick.host.mutations)
    mutations: tuple[str, ...] = ()
    #: seconds past the duration after which a still-running host has stopped answering
    host_grace_s: float = HOST_GRACE_S
    #: vCPUs per guest process (each keeps its own link and kernel model); 1 = one
    #: process per vCPU, as on a real host where each vCPU is a thread of its own
    vcpus_per_process: int = 1
    #: let the host listen on a non-loopback tcp:// address (issue 12: refused otherwise)
    allow_insecure_tcp: bool = False
    #: record every event and explain the worst late timers (issue 15; results["explain"])
    explain: bool = False
    #: issue 13: this many seconds into the run, move the VM to a second host process
    migrate_at_s: float | None = None


def describe_status(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


def _child_cmd(*args: str) -> list[str]:
    """``vtick host ...`` or ``vtick guest ...`` as a child of this interpreter.

    The guest is started as ``python -m vtick.guest`` directly (what ``vtick guest``
    execs), so a vCPU process pays for one interpreter start, not two.
    """
    if args[:1] == ("guest",):
        return [sys.executable, "-m", "vtick.guest", *args[1:]]
    return [sys.executable, "-m", "vtick.host", *args]


class _Children:
    def __init__(self) -> None:
        self.procs: list[tuple[str, trio.Process]] = []

    def add(self, name: str, proc: trio.Process) -> None:
        self.procs.append((name, proc))

    def _signal_groups(self, sig: int) -> None:
        for _, proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)

    async def stop_all(self) -> None:
        """SIGCONT (a stopped child cannot act on SIGTERM), SIGTERM, then SIGKILL."""
        with trio.CancelScope(shield=True):
            self._signal_groups(signal.SIGCONT)
            self._signal_groups(signal.SIGTERM)
            with trio.move_on_after(TERM_GRACE_S):
                for _, proc in self.procs:
                    await proc.wait()
            self._signal_groups(signal.SIGKILL)
            for _, proc in self.procs:
                await proc.wait()
            # reap anything left in the groups (grandchildren), best effort
            self._signal_groups(signal.SIGKILL)


async def launch(opts: RunOptions, results_path: str | None = None) -> dict:
    """Run one topology to completion; returns the host's results (and writes them to
    ``results_path`` if given).

    Raises:
        RunFailed: a process failed, timed out, or the run was interrupted.
    """
    if opts.listen:  # validate early: a clear error before anything is created
        for i in range(opts.vcpus):
            link_url(opts.listen, i)
    run_dir = tempfile.mkdtemp(prefix="vtick-")  # mkdtemp creates it 0700
    token = secrets.token_bytes(32)
    listen = opts.listen or f"ipc://{run_dir}/link"
    host_results = os.path.join(run_dir, "results.json")
    dest_results = os.path.join(run_dir, "destination.json")
    env = dict(os.environ)
    env["VTICK_TOKEN"] = token.hex()
    env[PARENT_ENV] = str(os.getpid())
    env[RUN_DIR_ENV] = run_dir
    children = _Children()
    failure: list[str] = []
    recording = Recording() if opts.explain else None  # issue 15: the path's event logs
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, nursery.cancel_scope, failure)
            param_args = [
                a for k, v in sorted(opts.params.items()) for a in ("--param", f"{k}={v}")
            ]
            host_plan = recording.host() if recording else ({}, ())
            migration: list[str] = []
            dest: trio.Process | None = None
            if opts.migrate_at_s is not None:
                # issue 13: the destination waits first, so the source can reach it
                incoming = f"ipc://{run_dir}/incoming"
                dest_plan = recording.host() if recording else ({}, ())  # its own log
                dest = await trio.lowlevel.open_process(
                    _child_cmd(
                        "host",
                        "--incoming",
                        incoming,
                        "--listen",
                        f"ipc://{run_dir}/dest",
                        "--connect-timeout",
                        str(opts.migrate_at_s + READY_TIMEOUT_S + 30),
                        "--results",
                        dest_results,
                        *(["--allow-insecure-tcp"] if opts.allow_insecure_tcp else []),
                    ),
                    env=env | dest_plan[0],
                    pass_fds=dest_plan[1],
                    stdout=subprocess.PIPE,
                    start_new_session=True,
                )
                children.add("destination host", dest)
                await _wait_ready(dest)
                migration = ["--migrate-at", str(opts.migrate_at_s), "--migrate-to", incoming]
            host = await trio.lowlevel.open_process(
                _child_cmd(
                    "host",
                    "--listen",
                    listen,
                    "--vcpus",
                    str(opts.vcpus),
                    "--duration",
                    str(opts.duration_s),
                    "--seed",
                    str(opts.seed),
                    "--workload",
                    opts.workload,
                    "--mode",
                    opts.mode,
                    "--hz",
                    str(opts.hz),
                    *(["--apic", opts.apic] if opts.apic else []),
                    *(["--ipi", opts.ipi] if opts.ipi else []),
                    *(["--exit-cost", opts.exit_cost] if opts.exit_cost else []),
                    *[a for name in opts.mutations for a in ("--mutate", name)],
                    *(["--allow-insecure-tcp"] if opts.allow_insecure_tcp else []),
                    *(["--trace"] if opts.trace else []),
                    "--results",
                    host_results,
                    *migration,
                    *param_args,
                ),
                env=env | host_plan[0],
                pass_fds=host_plan[1],
                stdout=subprocess.PIPE,
                start_new_session=True,
            )
            children.add("host", host)
            await _wait_ready(host)
            per = max(1, opts.vcpus_per_process)
            for first in range(0, opts.vcpus, per):
                last = min(first + per, opts.vcpus) - 1
                guest_plan = recording.guests(range(first, last + 1)) if recording else ({}, ())
                proc = await trio.lowlevel.open_process(
                    _child_cmd(
                        "guest",
                        "--connect",
                        listen,
                        "--vcpu",
                        str(first) if first == last else f"{first}-{last}",
                        *[
                            a
                            for k, v in sorted(opts.preempt.items())
                            for a in ("--preempt", f"{k}={v}")
                        ],
                    ),
                    env=env | guest_plan[0],
                    pass_fds=guest_plan[1],
                    stdout=subprocess.DEVNULL,
                    start_new_session=True,
                )
                children.add(f"vCPU {first}" if first == last else f"vCPUs {first}-{last}", proc)
            for name, proc in children.procs:
                if proc is not dest:  # (its end is judged once the source's is known)
                    # the host's status 1 is a run with errors its results describe
                    tolerated = HOST_RUN_HAD_ERRORS if proc is host else 0
                    nursery.start_soon(
                        _supervise, name, proc, nursery.cancel_scope, failure, tolerated
                    )
            # the host waits for every vCPU's report at the end, longer for a big VM
            # (host/server.py REPORT_S_PER_VCPU): so does the grace
            grace = opts.host_grace_s + REPORT_S_PER_VCPU * opts.vcpus
            with trio.move_on_after(opts.duration_s + grace):
                await host.wait()
                if dest is not None and host.returncode == 0:
                    problem = await _wait_destination(dest, host_results)
                    if problem and not failure:
                        failure.append(problem)
            if host.returncode is None and not failure:
                # a host that neither finishes nor dies has stopped answering: say so,
                # and the cleanup below ends it (SIGCONT, SIGTERM, then SIGKILL)
                failure.append(
                    f"host (pid {host.pid}) stopped answering: still running "
                    f"{grace:g} s after the run's {opts.duration_s:g} s"
                )
                nursery.cancel_scope.cancel()
            # the host is done; the vCPUs follow within moments
            with trio.move_on_after(5):
                for _, proc in children.procs:
                    await proc.wait()
            nursery.cancel_scope.cancel()
    except* RunFailed as group:
        # raised inside the nursery (the host never got ready): one RunFailed for the
        # caller, not an ExceptionGroup traceback
        if not failure:
            failure.append(str(group.exceptions[0]))
    finally:
        await children.stop_all()
        explained = recording.explain(_config(opts)) if recording else None  # issue 15
        if opts.migrate_at_s is not None:
            host_results = _merge_migration(host_results, dest_results)
        results = _collect_and_remove(run_dir, host_results)
    if failure:
        if failure[0].startswith("interrupted by"):
            raise RunInterrupted(failure[0])
        raise RunFailed(failure[0])
    if results is None:
        raise RunFailed(f"host wrote no results ({describe_status(host.returncode or 0)})")
    if explained is not None:
        results["explain"] = explained
    if results_path is not None:
        write_json(results_path, results)
    return results


async def _wait_destination(dest: trio.Process, source_results: str) -> str | None:
    """Issue 13: the destination runs the VM to the end of the run, unless the
    migration failed (the source says so in its results and ran the VM itself): then
    the destination has nothing to run and is told to stop.  Returns what went wrong."""
    if not _moved(source_results):
        if dest.returncode is None:
            dest.send_signal(signal.SIGTERM)
        await dest.wait()
        return None
    status = await dest.wait()
    if status != 0:
        return f"destination host (pid {dest.pid}) {describe_status(status)}"
    return None


def _moved(source_results: str) -> bool:
    """Did the source hand its VM over (its results say so)?"""
    try:
        with open(source_results) as fh:
            return moved(json.load(fh))
    except (OSError, ValueError):
        return False


def _merge_migration(source_path: str, dest_path: str) -> str:
    """The run's results after a migration: the destination's (it collected every
    vCPU's report), with the source's own record and per-vCPU host figures under
    ``migration.source``; the source's alone if the VM never moved
    (host/migration/results.py, shared with a topology's migration step)."""
    try:
        with open(source_path) as fh:
            source = json.load(fh)
    except (OSError, ValueError):
        return source_path
    if not moved(source) or not os.path.exists(dest_path):
        return source_path
    with open(dest_path) as fh:
        dest = json.load(fh)
    write_json(dest_path, merge_migration(source, dest))
    os.remove(source_path)
    return dest_path


def _config(opts: RunOptions) -> dict[str, object]:
    return {
        "seed": opts.seed,
        "mode": opts.mode,
        "ipi": opts.ipi,
        "vcpus": opts.vcpus,
        "duration_s": opts.duration_s,
    }


def orphaned_host_cleanup(results_path: str | None) -> bool:
    """In a host started by :func:`launch`, after the run: if the launcher is gone (it was
    SIGKILLed), remove the results file and the run directory it was written to, as the
    launcher would have.  Returns True when it removed them."""
    run_dir = os.environ.get(RUN_DIR_ENV)
    parent = os.environ.get(PARENT_ENV)
    if not run_dir or not parent or os.getppid() == int(parent):
        return False
    if results_path and os.path.dirname(os.path.abspath(results_path)) == run_dir:
        with contextlib.suppress(OSError):
            os.remove(results_path)
    with contextlib.suppress(OSError):
        os.rmdir(run_dir)  # only if empty: the host's sockets are already gone
    return not os.path.exists(run_dir)


def _collect_and_remove(run_dir: str, host_results: str) -> dict | None:
    """Read the host's results, note anything else left in the run dir, remove the dir."""
    leftovers = sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []
    results = None
    if os.path.exists(host_results):
        with open(host_results) as fh:
            results = json.load(fh)
    shutil.rmtree(run_dir, ignore_errors=True)
    if results is not None:
        leftovers = [f for f in leftovers if f != os.path.basename(host_results)]
        results.setdefault("cleanup", {})["ipc_leftovers"] = leftovers
    return results


async def _wait_ready(host: trio.Process) -> None:
    assert host.stdout is not None
    buf = b""
    with trio.move_on_after(READY_TIMEOUT_S):
        while b"\n" not in buf:
            chunk = await host.stdout.receive_some(4096)
            if not chunk:
                await host.wait()
                raise RunFailed(
                    f"host (pid {host.pid}) {describe_status(host.returncode or 0)} "
                    "before it was ready"
                )
            buf += chunk
        if not buf.startswith(b"READY"):
            raise RunFailed(f"host said {buf[:200]!r} instead of READY")
        return
    raise RunFailed(f"host (pid {host.pid}) not ready within {READY_TIMEOUT_S} s")


#: ``vtick host``'s exit status when its run completed with errors (its results say
#: which: ``"ok": false``); any other non-zero status is a failure of the host itself
HOST_RUN_HAD_ERRORS = 1


async def _supervise(
    name: str,
    proc: trio.Process,
    scope: trio.CancelScope,
    failure: list[str],
    tolerated: int = 0,
) -> None:
    """A child that exits with a status other than 0 (or ``tolerated``: the host's
    status when it wrote results that say what went wrong, which are then the path's
    figures and errors, not a bare status that throws them away) fails the path."""
    status = await proc.wait()
    if status not in (0, tolerated) and not failure:
        failure.append(f"{name} (pid {proc.pid}) {describe_status(status)}")
        scope.cancel()


async def _watch_signals(scope: trio.CancelScope, failure: list[str]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if not failure:
                failure.append(f"interrupted by {signal.Signals(signum).name}")
            scope.cancel()
            return
