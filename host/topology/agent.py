"""``vtick agent``: owns one machine's vtick processes on behalf of a controller.

Theory of operation
-------------------
A topology run has one controller (``vtick run --topology``, ``vtick topology check``)
and one agent per machine it uses, started as a child of the controller: directly for
this machine, under ``ip netns exec`` for a network namespace, through the system ``ssh``
client for another machine.  The agent talks to its controller over its own stdin and
stdout, one JSON object per line (:mod:`vtick.host.topology.wire`), so the same agent
works over a pipe and over an ssh channel, and nothing but the controller can reach it.

What it owns:

* **Processes.**  ``start`` runs a vtick host or vCPU in its own session (process group),
  with stdin closed, the environment the controller sends (the run token travels here,
  inside the ssh channel, never on a command line) and ``VTICK_PARENT_PID`` set to the
  agent, so a process whose agent vanished stops by itself within 250 ms
  (vtick.proto.lifecycle).  A host is ready when it prints READY (docs/protocol.md
  section 8.1); the reply to ``start`` waits for that line.  Every exit is reported as
  an ``exited`` event with its status.  ``signal`` delivers a signal to a process group;
  ``pause`` stops one and resumes it after a window timed here, so a chaos fault on a
  remote vCPU costs no ssh round trip inside the window.  ``stop`` ends processes the
  way the launcher does: SIGCONT (a stopped process cannot act on SIGTERM), SIGTERM,
  SIGKILL after ``TERM_GRACE_S``.
* **Files.**  A private run directory (``$TMPDIR/vtick-agent-XXXXXXXX``, mode 0700) holds
  ipc sockets, results files and TLS material the controller ``put`` there; ``fetch``
  returns a file from it, nothing outside it.
* **The manifest.**  ``manifest.json`` in the run directory lists the agent and every
  process it started (pid, process group, argv, and the kernel's start time of the pid,
  so a recycled pid is never taken for ours).  It is rewritten atomically at each change.

How it ends, whatever happens:

* ``bye`` from the controller, end of file on stdin (the controller died or its ssh
  connection dropped: sshd closes the channel), a broken stdout, SIGTERM, SIGINT or
  SIGHUP, or its parent process gone: the agent stops every process it started, removes
  its run directory and exits.
* The agent itself SIGKILLed: its processes see their parent gone and stop; the run
  directory and its manifest stay, and :func:`sweep` removes them: the controller runs
  ``vtick agent --sweep DIR`` when an agent dies under it, and every agent sweeps the
  stale run directories of dead agents when it starts.  A sweep kills only process
  groups whose leader still has the start time the manifest recorded.

The agent measures nothing and sends no heartbeats: a stopped (SIGSTOP) vCPU is a fault
under test here, not a dead worker (docs/topology.md explains why this is not a cluster
framework).
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from vtick.host.topology import wire
from vtick.proto.lifecycle import PARENT_ENV

__all__ = ["Agent", "agent_main", "sweep", "sweep_stale", "proc_start_time", "RUN_PREFIX"]

RUN_PREFIX = "vtick-agent-"
MANIFEST = "manifest.json"
READY_TIMEOUT_S = 15.0
TERM_GRACE_S = 2.0
PARENT_POLL_S = 0.25
#: the largest file ``fetch`` returns (a results file of 1024 vCPUs is a few MB)
FETCH_MAX = 64 << 20


def vtick_version() -> str:
    try:
        return importlib.metadata.version("vtick")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return "unknown"


def proc_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot, /proc/PID/stat field
    22), or None if there is no such process: with the pid it names one process for good."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return None
    # the command name (field 2) is parenthesised and may hold spaces
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass
class Child:
    id: str
    argv: list[str]
    proc: trio.Process
    start_time: int | None
    status: int | None = None
    exited: trio.Event = field(default_factory=trio.Event)

    @property
    def pid(self) -> int:
        return self.proc.pid


class Agent:
    """One agent: its run directory, its children, its manifest."""

    def __init__(self, out: wire.LineWriter, base: str | None = None) -> None:
        self.out = out
        self.run_dir = tempfile.mkdtemp(prefix=RUN_PREFIX, dir=base)  # 0700
        self.children: dict[str, Child] = {}
        self.parent = os.getppid()
        self.started = proc_start_time(os.getpid())
        self.closing = False
        self.write_manifest()

    # ------------------------------------------------------------------ manifest

    def write_manifest(self) -> None:
        doc = {
            "agent_pid": os.getpid(),
            "agent_start_time": self.started,
            "run_dir": self.run_dir,
            "processes": {
                c.id: {
                    "pid": c.pid,
                    "pgid": c.pid,  # each child leads its own session
                    "start_time": c.start_time,
                    "argv": c.argv,
                    "status": c.status,
                }
                for c in self.children.values()
            },
        }
        tmp = os.path.join(self.run_dir, MANIFEST + ".tmp")
        with contextlib.suppress(OSError):  # gone already: we are being cleaned up
            with open(tmp, "w") as fh:
                json.dump(doc, fh, indent=1)
            os.replace(tmp, os.path.join(self.run_dir, MANIFEST))

    # ------------------------------------------------------------------ operations

    def _fill(self, text: str) -> str:
        return text.replace("{run}", self.run_dir)

    async def op_start(self, req: dict[str, Any], nursery: trio.Nursery) -> dict[str, Any]:
        cid = str(req["id"])
        if cid in self.children:
            raise wire.AgentError(f"{cid} was started already")
        argv = [self._fill(str(a)) for a in req["argv"]]
        env = dict(os.environ)
        env.update({str(k): self._fill(str(v)) for k, v in (req.get("env") or {}).items()})
        env[PARENT_ENV] = str(os.getpid())
        ready = bool(req.get("ready"))
        try:
            proc = await trio.lowlevel.open_process(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if ready else subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            raise wire.AgentError(f"cannot start {argv[0]}: {exc.strerror}") from None
        child = Child(cid, argv, proc, proc_start_time(proc.pid))
        self.children[cid] = child
        self.write_manifest()
        nursery.start_soon(self._reap, child)
        reply: dict[str, Any] = {"pid": proc.pid}
        if ready:
            reply["ready"] = await self._wait_ready(child)
        return reply

    async def _wait_ready(self, child: Child) -> str:
        stream = child.proc.stdout
        assert stream is not None
        buf = b""
        with trio.move_on_after(READY_TIMEOUT_S):
            while b"\n" not in buf:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    await child.exited.wait()
                    raise wire.AgentError(
                        f"{child.id} (pid {child.pid}) {describe_status(child.status)} "
                        "before it was ready"
                    )
                buf += chunk
            line = buf.split(b"\n", 1)[0].decode(errors="replace")
            if not line.startswith("READY"):
                raise wire.AgentError(f"{child.id} said {line[:200]!r} instead of READY")
            return line
        raise wire.AgentError(f"{child.id} (pid {child.pid}) not ready in {READY_TIMEOUT_S} s")

    async def _reap(self, child: Child) -> None:
        status = await child.proc.wait()
        child.status = status
        child.exited.set()
        self.write_manifest()
        await self.out.send(
            {
                "event": "exited",
                "id": child.id,
                "pid": child.pid,
                "status": status,
                "how": describe_status(status),
            }
        )

    def _child(self, req: dict[str, Any]) -> Child:
        child = self.children.get(str(req.get("id")))
        if child is None:
            raise wire.AgentError(f"no process {req.get('id')!r} here")
        return child

    def op_signal(self, req: dict[str, Any]) -> dict[str, Any]:
        child = self._child(req)
        sig = _signal(req.get("signal"))
        if child.status is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, sig)
        return {"delivered": child.status is None}

    async def op_pause(self, req: dict[str, Any]) -> dict[str, Any]:
        """SIGSTOP now and SIGCONT after ``seconds``, both timed here (chaos, locally)."""
        child = self._child(req)
        seconds = float(req.get("seconds", 0))
        if not 0 < seconds <= 3600:
            raise wire.AgentError(f"pause of {seconds} s: give 0..3600 s")
        if child.status is not None:
            return {"paused_ns": 0}
        t0 = time.monotonic_ns()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGSTOP)
        try:
            await trio.sleep(seconds)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGCONT)
        return {"paused_ns": time.monotonic_ns() - t0}

    async def op_stop(self, req: dict[str, Any]) -> dict[str, Any]:
        ids = req.get("ids")
        children = [self.children[i] for i in ids if i in self.children] if ids else None
        await self.stop(children)
        chosen = children if children is not None else list(self.children.values())
        return {"statuses": {c.id: c.status for c in chosen}}

    def op_put(self, req: dict[str, Any]) -> dict[str, Any]:
        name = str(req["name"])
        if os.path.basename(name) != name or name in ("", ".", "..", MANIFEST):
            raise wire.AgentError(f"put: {name!r} is not a plain file name")
        path = os.path.join(self.run_dir, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, int(req.get("mode", 0o600)))
        with os.fdopen(fd, "w") as fh:
            fh.write(str(req["text"]))
        return {"path": path}

    def op_fetch(self, req: dict[str, Any]) -> dict[str, Any]:
        path = os.path.realpath(self._fill(str(req["path"])))
        if os.path.dirname(path) != os.path.realpath(self.run_dir):
            raise wire.AgentError(f"fetch: {path} is not in this agent's run directory")
        try:
            if os.path.getsize(path) > FETCH_MAX:
                raise wire.AgentError(f"fetch: {path} is larger than {FETCH_MAX} bytes")
            with open(path) as fh:
                return {"text": fh.read()}
        except FileNotFoundError:
            raise wire.AgentError(f"fetch: {path}: no such file") from None

    def op_ports(self, req: dict[str, Any]) -> dict[str, Any]:
        """Which of ``ports`` on ``host`` cannot be listened on now (preflight)."""
        host = str(req.get("host") or "127.0.0.1")
        busy: list[int] = []
        try:
            family = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
        except socket.gaierror as exc:
            return {"busy": [], "error": f"cannot resolve {host}: {exc.strerror}"}
        for port in req.get("ports") or []:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((host, int(port)))
                except OSError as exc:
                    if exc.errno == errno.EADDRNOTAVAIL:
                        return {"busy": [], "error": f"{host} is not an address of this machine"}
                    busy.append(int(port))
        return {"busy": busy, "error": None}

    @staticmethod
    def op_time(req: dict[str, Any]) -> dict[str, Any]:
        return {"t": time.monotonic_ns()}

    # ------------------------------------------------------------------ ending

    async def stop(self, children: list[Child] | None = None) -> None:
        """SIGCONT, SIGTERM, SIGKILL after TERM_GRACE_S: the launcher's order."""
        chosen = list(self.children.values()) if children is None else children
        with trio.CancelScope(shield=True):
            live = [c for c in chosen if c.status is None]
            for sig in (signal.SIGCONT, signal.SIGTERM):
                for c in live:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(c.pid, sig)
            with trio.move_on_after(TERM_GRACE_S):
                for c in live:
                    await c.proc.wait()
            for c in chosen:  # the leaders, and anything left in their groups
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.pid, signal.SIGKILL)
            for c in live:
                await c.proc.wait()

    async def close(self) -> None:
        """Stop everything and remove the run directory (idempotent)."""
        if self.closing:
            return
        self.closing = True
        await self.stop()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    async def watch_parent(self, scope: trio.CancelScope) -> None:
        # a parent gone is a controller (or sshd session) gone: end like an EOF
        while os.getppid() == self.parent:  # noqa: ASYNC110 - nothing to wait on but the pid
            await trio.sleep(PARENT_POLL_S)
        scope.cancel()


def describe_status(status: int | None) -> str:
    if status is None:
        return "still running"
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exited with status {status}"


def _signal(name: Any) -> int:
    try:
        return int(signal.Signals[str(name)]) if not isinstance(name, int) else int(name)
    except KeyError:
        raise wire.AgentError(f"unknown signal {name!r}") from None


# ---------------------------------------------------------------------- the loop


async def serve_agent(base: str | None = None) -> int:
    """Serve one controller on stdin/stdout until it says bye or goes away."""
    out = wire.LineWriter(trio.lowlevel.FdStream(os.dup(sys.stdout.fileno())))
    reader = wire.LineReader(trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())))
    for stale in sweep_stale(base):
        print(f"vtick agent: swept {stale}", file=sys.stderr, flush=True)
    agent = Agent(out, base)
    status = 0
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.watch_parent, nursery.cancel_scope)
            nursery.start_soon(_watch_signals, nursery.cancel_scope)
            await out.send(
                {
                    "event": "hello",
                    "vtick": vtick_version(),
                    "python": platform.python_version(),
                    "executable": sys.executable,
                    "pid": os.getpid(),
                    "run_dir": agent.run_dir,
                    "host": socket.gethostname(),
                    "uid": os.getuid(),
                    "t": time.monotonic_ns(),
                }
            )
            async for req in reader:
                if req.get("op") == "bye":
                    await agent.close()
                    await out.send({"re": req.get("re"), "ok": True})
                    break
                nursery.start_soon(_handle, agent, req, nursery)
            nursery.cancel_scope.cancel()
    except* (wire.Gone, trio.BrokenResourceError, trio.ClosedResourceError, BrokenPipeError):
        status = 1  # the controller is gone: clean up below all the same
    finally:
        await agent.close()
    return status


async def _handle(agent: Agent, req: dict[str, Any], nursery: trio.Nursery) -> None:
    op = req.get("op")
    reply: dict[str, Any]
    try:
        if op == "start":
            reply = await agent.op_start(req, nursery)
        elif op == "signal":
            reply = agent.op_signal(req)
        elif op == "pause":
            reply = await agent.op_pause(req)
        elif op == "stop":
            reply = await agent.op_stop(req)
        elif op == "put":
            reply = agent.op_put(req)
        elif op == "fetch":
            reply = agent.op_fetch(req)
        elif op == "ports":
            reply = agent.op_ports(req)
        elif op == "time":
            reply = agent.op_time(req)
        else:
            raise wire.AgentError(f"unknown op {op!r}")
        reply = {"re": req.get("re"), "ok": True, **reply}
    except wire.AgentError as exc:
        reply = {"re": req.get("re"), "ok": False, "error": str(exc)}
    except (KeyError, TypeError, ValueError) as exc:
        reply = {"re": req.get("re"), "ok": False, "error": f"bad {op} request: {exc!r}"}
    await agent.out.send(reply)


async def _watch_signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            print(
                f"vtick agent: {signal.Signals(signum).name}: stopping",
                file=sys.stderr,
                flush=True,
            )
            scope.cancel()
            return


# ---------------------------------------------------------------------- sweeping


def sweep(run_dir: str, force: bool = False) -> bool:
    """Remove a dead agent's leftovers by its manifest: kill the process groups it
    recorded (only those whose leader still has the recorded start time) and remove the
    run directory.  A live agent's directory is left alone unless ``force``.  Returns
    True if the directory is gone."""
    manifest = os.path.join(run_dir, MANIFEST)
    try:
        with open(manifest) as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        doc = None
    if doc is not None:
        agent_pid = int(doc.get("agent_pid", 0))
        alive = agent_pid and proc_start_time(agent_pid) == doc.get("agent_start_time")
        if alive and not force:
            return False
        for entry in (doc.get("processes") or {}).values():
            pid = int(entry.get("pid", 0))
            if (
                pid
                and entry.get("status") is None
                and proc_start_time(pid) == entry.get("start_time")
            ):
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(int(entry.get("pgid", pid)), sig)
    elif os.path.isdir(run_dir) and not os.path.basename(run_dir).startswith(RUN_PREFIX):
        return False  # no manifest and not ours by name: not ours to remove
    shutil.rmtree(run_dir, ignore_errors=True)
    return not os.path.exists(run_dir)


def sweep_stale(base: str | None = None) -> list[str]:
    """Sweep every run directory of a dead agent of this user under ``base``."""
    base = base or tempfile.gettempdir()
    swept = []
    with contextlib.suppress(OSError):
        for name in os.listdir(base):
            path = os.path.join(base, name)
            if not name.startswith(RUN_PREFIX) or not os.path.isdir(path):
                continue
            with contextlib.suppress(OSError):
                if os.stat(path).st_uid != os.getuid():
                    continue
                if not os.path.exists(os.path.join(path, MANIFEST)):
                    continue  # being created right now, or not an agent's
                if sweep(path):
                    swept.append(path)
    return swept


def agent_main(run_base: str | None, sweep_dir: str | None) -> int:
    """``vtick agent``: serve a controller on stdin/stdout, or ``--sweep DIR``."""
    if sweep_dir is not None:
        if not os.path.isdir(sweep_dir):
            print(f"vtick agent: --sweep {sweep_dir}: no such directory", file=sys.stderr)
            return 2
        ok = sweep(sweep_dir)
        print(json.dumps({"swept": sweep_dir, "removed": ok}), flush=True)
        return 0 if ok else 1
    if run_base is not None and not os.path.isdir(run_base):
        print(f"vtick agent: --run-base {run_base}: no such directory", file=sys.stderr)
        return 2
    try:
        return trio.run(serve_agent, run_base)
    except KeyboardInterrupt:  # pragma: no cover - the signal receiver handles it
        return 130
