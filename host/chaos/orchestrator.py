"""The chaos orchestrator: one run's processes, its faults applied on time, its logs.

Theory of operation
-------------------
This is the I/O edge of ``vtick chaos`` (trio, processes, signals, files); everything it
decides was planned before by :func:`vtick.host.chaos.nemesis.plan_faults`, and
everything it learns goes into an :class:`Execution` that the pure history builder
(``history.py``) turns into ``history.jsonl``.

A run, built on the launcher's helpers (``host/lab/launcher.py``): a private 0700 run
directory for the sockets, a fresh token, a ``vtick host`` and one ``python -m
vtick.guest`` process per vCPU, each in its own process group, each handed its plan in
``$VTICK_CHAOS_PLAN`` (``vtick.proto.eventlog``): the descriptor of an anonymous file
(``memfd``) to write its event log into, and for a vCPU the preemption windows and link
faults its process applies itself.  Logs and stderr live in anonymous files the
orchestrator reads through its own descriptors, so nothing of them ever appears in a
directory.  The run's clock is the
host's: the orchestrator waits for the host's ``run-start`` record (every vCPU
connected) and applies the faults that need a signal at their scheduled times:

* ``stop``: SIGSTOP to the vCPU's process group, SIGCONT at the end;
* ``host-stop``: the same to the host;
* ``crash``: SIGKILL, then after the planned delay a new process for the same vCPU
  (incarnation 1, its own log and a plan whose ids start at 10**9), which says hello,
  gets a new session and a reset vCPU.

Every fault is recorded with the host times it really started and ended.  A fault
cancelled by the end of the run (or by Ctrl-C) still gets its SIGCONT, and if this process
is killed outright the guardian (``guardian.py``) continues and ends what it started.
At the end the host is waited for (it stops itself after ``duration``), the vCPUs get a
few seconds, then everything is stopped the launcher's way (SIGCONT, SIGTERM, SIGKILL),
the logs and the host's results are read into memory and the run directory is removed:
a chaos run leaves no process, socket or file behind in the temporary directory, also
when it is interrupted.

**Migration** (``--migrate-at S``, issue 13).  A second host, ``vtick host --incoming``,
starts first with its own event log and waits; the source host gets ``--migrate-at S
--migrate-to`` its address and moves the VM there S seconds into the run (the
destination then runs it to the end; see ``host/migration/``).  Both are supervised and
both logs collected (:attr:`Execution.host_logs`, source first; ``history.py`` merges
them).  The nemesis follows the VM: a ``host-stop`` stops whichever host runs it at that
moment, and a crashed vCPU's new process dials the destination once the VM is there.
The run's results are the destination's after a move (the source's under
``migration.source``, as ``vtick run`` merges them), the source's if the move failed:
the VM then ran on there and the destination is told to stop.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any

import trio

from vtick.host.chaos.guardian import Guardian
from vtick.host.chaos.nemesis import FaultOp, NemesisParams, guest_plan, plan_faults
from vtick.host.lab.launcher import (
    RUN_DIR_ENV,
    RunFailed,
    _child_cmd,
    _Children,
    _merge_migration,
    _moved,
    _wait_ready,
    describe_status,
)
from vtick.proto.eventlog import (
    H_MIGRATE_IN,
    H_RUN_START,
    PLAN_ENV,
    LogContents,
    anonymous_fd,
    read_log,
)
from vtick.proto.lifecycle import PARENT_ENV
from vtick.proto.timerfd import sleep_until_ns
from vtick.proto.transport import monotonic_ns

__all__ = ["ChaosOptions", "Execution", "execute", "INCARNATION_ID_BASE"]

#: ids of a restarted vCPU process start here times its incarnation
INCARNATION_ID_BASE = 10**9
#: the host's own connect timeout is 30 s; a run that has not started by then never will
RUN_START_TIMEOUT_S = 30.0
#: after the host is done, the vCPUs get this long to finish before they are stopped
VCPU_GRACE_S = 1.5
#: beyond the duration: boot, the report timeout and slack
HOST_GRACE_S = 40.0
#: the host waits this long for reports (a vCPU a mutation hung never sends one)
REPORT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class ChaosOptions:
    """One chaos run.  ``seed`` draws the schedule (and seeds the workload)."""

    seed: int
    mode: str
    ipi: str
    vcpus: int = 4
    duration_s: float = 2.0
    faults: tuple[str, ...] = ()
    mutations: tuple[str, ...] = ()
    hz: int = 1000
    workload: str = "mixed"
    params: tuple[tuple[str, int], ...] = ()
    #: issue 13: this many seconds into the run, move the VM to a second host process
    migrate_at_s: float | None = None

    def nemesis(self) -> NemesisParams:
        return NemesisParams(self.vcpus, int(self.duration_s * 1e9), self.faults)

    def config(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "mode": self.mode,
            "ipi": self.ipi,
            "vcpus": self.vcpus,
            "duration_s": self.duration_s,
            "faults": list(self.faults),
            "mutations": list(self.mutations),
            "hz": self.hz,
            "workload": self.workload,
            "params": dict(self.params),
            "migrate_at_s": self.migrate_at_s,
        }


@dataclass
class Execution:
    """What one run left behind, read into memory before its directory went away."""

    options: ChaosOptions
    schedule: list[FaultOp]
    #: the one host's event log (a run without migration may give it here) ...
    host_log: LogContents | None = None
    #: ... or every host's, the one that started the VM first, then the hosts it moved
    #: to (issue 13); ``history.py`` merges them onto the first host's clock
    host_logs: list[LogContents] = field(default_factory=list)
    guest_logs: list[LogContents] = field(default_factory=list)
    #: faults as applied: {id, kind, target, pattern, start, end (host ns), pids}
    faults: list[dict[str, Any]] = field(default_factory=list)
    #: processes that ended on their own: {"who", "vcpu", "pid", "status", "time"}
    exits: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, Any] | None = None
    run_start: int | None = None
    #: why the run could not be done (the history is then partial)
    failure: str | None = None
    interrupted: str | None = None
    wall_ns: int = 0
    #: the last lines each process wrote to stderr, by process name
    stderr: dict[str, str] = field(default_factory=dict)


class _Run:
    def __init__(self, opts: ChaosOptions, run_dir: str, guardian: Guardian | None) -> None:
        self.opts = opts
        self.guardian = guardian
        self.dir = run_dir
        self.token = secrets.token_bytes(32)
        self.listen = f"ipc://{run_dir}/link"
        self.children = _Children()
        self.env = dict(os.environ)
        self.env["VTICK_TOKEN"] = self.token.hex()
        self.env[PARENT_ENV] = str(os.getpid())
        self.env[RUN_DIR_ENV] = run_dir
        self.vcpus: dict[int, trio.Process] = {}
        self.incarnation: dict[int, int] = {}
        self.killed: set[int] = set()  # pids the nemesis killed (not a failure)
        self.host: trio.Process | None = None
        #: issue 13: the destination host (--migrate-at), its addresses and its log
        self.dest: trio.Process | None = None
        self.incoming = f"ipc://{run_dir}/incoming"
        self.dest_listen = f"ipc://{run_dir}/dest"
        self.host_log_fd: int | None = None
        self.dest_log_fd: int | None = None
        #: the destination was told to stop (the move failed): its status is no news
        self.dest_stopped = False
        #: the event logs (anonymous files)
        self.log_fds: list[int] = []
        self.stderr_fds: dict[str, int] = {}

    def _stderr(self, name: str) -> int:
        """An anonymous file for a process's stderr (read back at the end)."""
        fd = anonymous_fd(f"stderr-{name}")
        self.stderr_fds[name] = fd
        return fd

    def _log(self, name: str) -> int:
        fd = anonymous_fd(f"log-{name}")
        self.log_fds.append(fd)
        return fd

    def close(self) -> None:
        for fd in [*self.log_fds, *self.stderr_fds.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)

    def results_path(self, role: str = "results") -> str:
        return os.path.join(self.dir, f"{role}.json")

    def moved(self) -> bool:
        """Has the destination restored the VM (its log says H_MIGRATE_IN)?  From then
        on the VM runs there (the source only sends its vCPUs over)."""
        if self.dest_log_fd is None:
            return False
        with contextlib.suppress(OSError, ValueError):
            return any(r[0] == H_MIGRATE_IN for r in read_log(self.dest_log_fd).records)
        return False

    def vm_host(self) -> trio.Process | None:
        """The host process running the VM now (a host-stop stops that one)."""
        return self.dest if self.moved() else self.host

    def vcpu_listen(self) -> str:
        """Where a (re)started vCPU process dials: wherever the VM is."""
        return self.dest_listen if self.moved() else self.listen

    async def start_destination(self) -> trio.Process:
        """Issue 13: the host the VM moves to; it waits for it on ``self.incoming``."""
        opts = self.opts
        assert opts.migrate_at_s is not None
        log = self._log("destination")
        self.dest_log_fd = log
        env = dict(self.env, **{PLAN_ENV: json.dumps({"record_fd": log})})
        dest = await trio.lowlevel.open_process(
            _child_cmd(
                "host",
                "--incoming",
                self.incoming,
                "--listen",
                self.dest_listen,
                "--connect-timeout",
                str(opts.migrate_at_s + RUN_START_TIMEOUT_S + 15),
                "--report-timeout",
                str(REPORT_TIMEOUT_S),
                "--results",
                self.results_path("destination"),
                *[a for name in opts.mutations for a in ("--mutate", name)],
            ),  # fmt: skip
            env=env,
            stdout=subprocess.PIPE,
            stderr=self._stderr("destination"),
            pass_fds=(log,),
            start_new_session=True,
        )
        self.children.add("destination host", dest)
        if self.guardian is not None:
            self.guardian.add(dest.pid)
        self.dest = dest
        return dest

    async def start_host(self) -> trio.Process:
        opts = self.opts
        log = self._log("host")
        self.host_log_fd = log
        migrate = (
            ["--migrate-at", str(opts.migrate_at_s), "--migrate-to", self.incoming]
            if opts.migrate_at_s is not None
            else []
        )
        env = dict(self.env, **{PLAN_ENV: json.dumps({"record_fd": log})})
        params = [a for k, v in opts.params for a in ("--param", f"{k}={v}")]
        host = await trio.lowlevel.open_process(
            _child_cmd(
                "host",
                "--listen",
                self.listen,
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
                "--ipi",
                opts.ipi,
                "--hz",
                str(opts.hz),
                "--report-timeout",
                str(REPORT_TIMEOUT_S),
                "--results",
                self.results_path(),
                *[a for name in opts.mutations for a in ("--mutate", name)],
                *migrate,
                *params,
            ),  # fmt: skip
            env=env,
            stdout=subprocess.PIPE,
            stderr=self._stderr("host"),
            pass_fds=(log,),
            start_new_session=True,
        )
        self.children.add("host", host)
        if self.guardian is not None:
            self.guardian.add(host.pid)
        self.host = host
        return host

    async def start_vcpu(self, vcpu: int, schedule: list[FaultOp]) -> trio.Process:
        inc = self.incarnation.get(vcpu, -1) + 1
        self.incarnation[vcpu] = inc
        log = self._log(f"vcpu{vcpu}.{inc}")
        plan: dict[str, Any] = {
            "record_fd": log,
            "incarnation": inc,
            "id_base": inc * INCARNATION_ID_BASE,
            "seed": self.opts.seed * 1000 + vcpu * 10 + inc,
        }
        if inc == 0:  # a restarted process boots anew: its predecessor's schedule is gone
            plan |= guest_plan(schedule, vcpu)
        env = dict(self.env, **{PLAN_ENV: json.dumps(plan)})
        proc = await trio.lowlevel.open_process(
            _child_cmd("guest", "--connect", self.vcpu_listen(), "--vcpu", str(vcpu)),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr(f"vcpu{vcpu}.{inc}"),
            pass_fds=(log,),
            start_new_session=True,
        )
        self.children.add(f"vCPU {vcpu}", proc)
        if self.guardian is not None:
            self.guardian.add(proc.pid)
        self.vcpus[vcpu] = proc
        return proc


def _signal(proc: trio.Process | None, sig: int) -> None:
    if proc is not None and proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


async def _wait_run_start(log: int, host: trio.Process) -> int:
    """The host time at which every vCPU was connected (the host's run-start record)."""
    with trio.move_on_after(RUN_START_TIMEOUT_S):
        while host.returncode is None:
            with contextlib.suppress(OSError, ValueError):
                for record in read_log(log).records:
                    if record[0] == H_RUN_START:
                        return record[1]
            await trio.sleep(0.02)
    raise RunFailed(
        "the run never started (not every vCPU connected)"
        if host.returncode is None
        else f"host {describe_status(host.returncode)} before every vCPU connected"
    )


async def _apply(run: _Run, op: FaultOp, t0: int, ex: Execution) -> None:
    """Apply one orchestrator fault at its time; whatever happens, undo a stop."""
    await sleep_until_ns(t0 + op.start_ns)
    entry: dict[str, Any] = {
        "id": op.id,
        "kind": op.kind,
        "target": op.target,
        "pattern": op.pattern,
    }
    if op.kind in ("stop", "host-stop"):
        proc = run.vm_host() if op.kind == "host-stop" else run.vcpus.get(op.target)
        if proc is None or proc.returncode is not None:
            return
        _signal(proc, signal.SIGSTOP)
        entry |= {"start": monotonic_ns(), "pid": proc.pid}
        ex.faults.append(entry)
        try:
            await sleep_until_ns(t0 + op.end_ns)
        finally:
            _signal(proc, signal.SIGCONT)
            entry["end"] = monotonic_ns()
    elif op.kind == "crash":
        proc = run.vcpus.get(op.target)
        if proc is None or proc.returncode is not None:
            return
        run.killed.add(proc.pid)
        _signal(proc, signal.SIGKILL)
        entry |= {"start": monotonic_ns(), "pid": proc.pid}
        ex.faults.append(entry)
        with trio.CancelScope(shield=True):
            await proc.wait()
        await sleep_until_ns(t0 + op.end_ns)
        new = await run.start_vcpu(op.target, ex.schedule)
        entry |= {"end": monotonic_ns(), "new_pid": new.pid}


async def _supervise(run: _Run, name: str, vcpu: int, proc: trio.Process, ex: Execution) -> None:
    status = await proc.wait()
    if proc.pid in run.killed:
        return
    ex.exits.append(
        {"who": name, "vcpu": vcpu, "pid": proc.pid, "status": status, "time": monotonic_ns()}
    )


async def execute(opts: ChaosOptions, guardian: Guardian | None = None) -> Execution:
    """Run one chaos run to the end; everything it left behind, in memory.

    ``guardian``: told every process group started and reaped, so that none stays
    stopped if this process dies (``guardian.py``).
    """
    schedule = plan_faults(opts.seed, opts.nemesis())
    ex = Execution(opts, schedule)
    run_dir = tempfile.mkdtemp(prefix="vtick-chaos-")  # 0700
    if guardian is not None:
        guardian.own_dir(run_dir)  # removed even if this process is SIGKILLed
    run = _Run(opts, run_dir, guardian)
    started = monotonic_ns()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, nursery.cancel_scope, ex)
            if opts.migrate_at_s is not None:
                # the destination waits first, so the source can reach it when it moves
                await _wait_ready(await run.start_destination())
            host = await run.start_host()
            await _wait_ready(host)
            for vcpu in range(opts.vcpus):
                await run.start_vcpu(vcpu, schedule)
            assert run.host_log_fd is not None
            t0 = await _wait_run_start(run.host_log_fd, host)
            ex.run_start = t0
            async with trio.open_nursery() as faults:
                for vcpu, proc in list(run.vcpus.items()):
                    faults.start_soon(_supervise, run, f"vCPU {vcpu}", vcpu, proc, ex)
                for op in schedule:
                    if op.kind in ("stop", "host-stop", "crash"):
                        faults.start_soon(_apply, run, op, t0, ex)
                with trio.move_on_after(opts.duration_s + HOST_GRACE_S):
                    await host.wait()
                    if run.dest is not None:
                        await _finish_destination(run, ex)
                if host.returncode is None:
                    ex.failure = f"host (pid {host.pid}) still running {HOST_GRACE_S:g} s late"
                elif run.dest is not None and run.dest.returncode is None and not ex.failure:
                    ex.failure = f"destination host (pid {run.dest.pid}) still running late"
                with trio.move_on_after(VCPU_GRACE_S):
                    for proc in list(run.vcpus.values()):
                        await proc.wait()
                for vcpu, proc in run.vcpus.items():  # restarted ones are supervised here
                    noted = proc.pid in run.killed or any(e["pid"] == proc.pid for e in ex.exits)
                    if proc.returncode not in (None, 0) and not noted:
                        ex.exits.append(
                            {
                                "who": f"vCPU {vcpu}",
                                "vcpu": vcpu,
                                "pid": proc.pid,
                                "status": proc.returncode,
                                "time": monotonic_ns(),
                            }
                        )
                faults.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    except* RunFailed as group:
        ex.failure = str(group.exceptions[0])
    finally:
        await run.children.stop_all()  # SIGCONT, SIGTERM, SIGKILL: nothing left running
        if guardian is not None:
            for _, proc in run.children.procs:  # reaped: their group ids may be reused
                guardian.remove(proc.pid)
        ex.wall_ns = monotonic_ns() - started
        if run.host is not None and run.host.returncode not in (0, None):
            ex.exits.append(
                {
                    "who": "host",
                    "vcpu": None,
                    "pid": run.host.pid,
                    "status": run.host.returncode,
                    "time": monotonic_ns(),
                }
            )
        dest = run.dest
        # (status 1: its results say not ok, as the source's may after a fault)
        if dest is not None and dest.returncode not in (0, 1, None) and not run.dest_stopped:
            ex.exits.append(
                {
                    "who": "destination host",
                    "vcpu": None,
                    "pid": dest.pid,
                    "status": dest.returncode,
                    "time": monotonic_ns(),
                }
            )
        _collect(run, ex)
        run.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        if guardian is not None:
            guardian.release_dir(run_dir)
    return ex


async def _finish_destination(run: _Run, ex: Execution) -> None:
    """Issue 13, after the source ended: a destination that has the VM runs it to the
    end of the run; one that never got it (the move failed: the source ran the VM on,
    its results say so) has nothing to run and is told to stop."""
    dest = run.dest
    assert dest is not None
    if not _moved(run.results_path()):
        run.dest_stopped = True
        _signal(dest, signal.SIGTERM)
        await dest.wait()
        return
    await dest.wait()


def _collect(run: _Run, ex: Execution) -> None:
    host_fds = [fd for fd in (run.host_log_fd, run.dest_log_fd) if fd is not None]
    for fd in [*host_fds, *(fd for fd in run.log_fds if fd not in host_fds)]:
        try:
            contents = read_log(fd)
        except (OSError, ValueError):
            continue  # a process killed before it opened its log: nothing to read
        if contents.header.get("role") == "host":
            ex.host_logs.append(contents)  # the source first, then the destination
        else:
            ex.guest_logs.append(contents)
    for name, fd in run.stderr_fds.items():
        text = ""
        with contextlib.suppress(OSError):
            size = os.fstat(fd).st_size
            text = os.pread(fd, size, max(0, size - 4000)).decode(errors="replace").strip()
        if text:
            ex.stderr[name] = text
    results = run.results_path()
    if run.dest is not None:
        # the destination's after a move (with the source's record), else the source's
        results = _merge_migration(results, run.results_path("destination"))
    with contextlib.suppress(OSError, ValueError), open(results) as fh:
        ex.results = json.load(fh)


async def _watch_signals(scope: trio.CancelScope, ex: Execution) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            ex.interrupted = signal.Signals(signum).name
            scope.cancel()
            return
