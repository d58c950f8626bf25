"""The controller's end of each machine's agent: how a machine is reached.

Theory of operation
-------------------
Every machine of a topology is served by one ``vtick agent`` (agent.py) that the
controller starts as a child process and talks to over the child's stdin and stdout:

* ``local``: ``python -m vtick.host agent`` with this interpreter;
* ``netns``: the same under ``ip netns exec NAME`` (root);
* ``ssh``: the system ``ssh`` client runs ``PYTHON -m vtick.host agent`` on the machine,
  in batch mode (no password or host-key prompt can hang a run: a missing key is an
  error), with connection reuse (``ControlMaster=auto``, ``ControlPersist``) through
  sockets in a private 0700 control directory, so the preflight's and the run's
  connections share one TCP and one authentication per machine.  Users' ``~/.ssh/config``,
  agents and jump hosts keep working because it is their ssh (Mininet's cluster mode and
  Jepsen's control node reach machines the same way).

The agent's first line (``hello``) carries its vtick and Python versions; a vtick version
that differs from this one is refused in one line before anything starts (the wire
protocol and the command lines must match).  A machine that cannot be reached is a one-
line error too, built from what ssh (or ip, or Python) said last on stderr.  The agent's
other stderr lines, its processes' included, are passed through prefixed with the
machine's name.

When the controller is done it sends ``bye`` and waits for the agent to clean up; an
agent that is gone before that (killed) is swept (``vtick agent --sweep DIR``) so its run
directory does not stay behind.  If the controller itself dies, the agent's stdin closes
and the agent cleans up on its own.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from typing import Any

import trio

from vtick.host.topology import wire
from vtick.host.topology.agent import sweep, vtick_version
from vtick.host.topology.spec import Machine

__all__ = ["AgentHandle", "RemoteError", "SshControl", "agent_command"]

HELLO_TIMEOUT_S = 30.0
BYE_TIMEOUT_S = 10.0
#: seconds an idle ssh master connection stays up for the next command to reuse
CONTROL_PERSIST_S = 15
SSH_CONNECT_TIMEOUT_S = 10
#: sockaddr_un's sun_path, less its terminating NUL
SOCKET_PATH_MAX = 107


class RemoteError(Exception):
    """A machine could not be reached or refused a request; one line naming it."""


class SshControl:
    """The private directory of the ssh master sockets of one controller run."""

    def __init__(self) -> None:
        self.dir: str | None = None
        self.used: dict[str, list[str]] = {}

    def path(self) -> str:
        if self.dir is None:
            # %C (a 40-character hash of host, port and user) must fit a socket path
            # (108 bytes on Linux): under a long $TMPDIR, use /tmp instead
            base = tempfile.gettempdir()
            if len(base) > SOCKET_PATH_MAX - len("/vtick-ssh-XXXXXXXX/") - 40 and os.access(
                "/tmp", os.W_OK
            ):
                base = "/tmp"
            self.dir = tempfile.mkdtemp(prefix="vtick-ssh-", dir=base)  # 0700
        return os.path.join(self.dir, "%C")

    def options(self, machine: Machine) -> list[str]:
        """``ssh`` arguments up to and including the destination."""
        target = machine.ssh
        assert target is not None
        opts = [
            "ssh",
            "-T",
            "-o", "BatchMode=yes",
            "-o", "ControlMaster=auto",
            "-o", f"ControlPath={self.path()}",
            "-o", f"ControlPersist={CONTROL_PERSIST_S}",
            "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_S}",
            # the agent's ssh channel, not the measured path: a dead network ends the
            # agent (it cleans up) within about 15 s
            "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=3",
            "-p", str(target.port),
        ]  # fmt: skip
        if target.key:
            opts += ["-i", target.key, "-o", "IdentitiesOnly=yes"]
        if target.known_hosts:
            opts += [
                "-o", f"UserKnownHostsFile={target.known_hosts}",
                "-o", "StrictHostKeyChecking=yes",
            ]  # fmt: skip
        opts.append(target.destination())
        self.used[machine.name] = opts
        return opts

    def close(self) -> None:
        """Stop every master connection and remove the control directory."""
        for opts in self.used.values():
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    [*opts[:-1], "-O", "exit", opts[-1]],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=10,
                    check=False,
                )
        self.used.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def agent_command(machine: Machine, control: SshControl, *extra: str) -> list[str]:
    """The command line that starts ``vtick agent`` for ``machine``."""
    if machine.kind == "ssh":
        remote = [machine.python or "python3", "-m", "vtick.host", "agent", *extra]
        return [*control.options(machine), "--", shlex.join(remote)]
    local = [sys.executable, "-m", "vtick.host", "agent", *extra]
    if machine.kind == "netns":
        assert machine.netns is not None
        return ["ip", "netns", "exec", machine.netns, *local]
    return local


class AgentHandle:
    """One machine's agent, as the controller sees it."""

    def __init__(self, machine: Machine, control: SshControl) -> None:
        self.machine = machine
        self.control = control
        self.proc: trio.Process | None = None
        self.hello: dict[str, Any] = {}
        self._writer: wire.LineWriter | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}
        self.exits: dict[str, int] = {}
        self._exit_events: dict[str, trio.Event] = {}
        self.stderr_tail: deque[str] = deque(maxlen=20)
        self.gone = trio.Event()
        self._said_bye = False

    @property
    def name(self) -> str:
        return self.machine.name

    def where(self) -> str:
        return f"machine {self.name} ({self.machine.describe()})"

    @property
    def python(self) -> str:
        """The interpreter the agent runs on: vtick processes run on it too."""
        return str(self.hello.get("executable") or sys.executable)

    # ------------------------------------------------------------------ start

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the agent and wait for its hello (checks the vtick version).

        Raises:
            RemoteError: unreachable, no vtick there, or another vtick version.
        """
        cmd = agent_command(self.machine, self.control)
        try:
            self.proc = await trio.lowlevel.open_process(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise RemoteError(f"{self.where()}: cannot run {cmd[0]}: {exc.strerror}") from None
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self._writer = wire.LineWriter(self.proc.stdin)
        reader = wire.LineReader(self.proc.stdout)
        hello = trio.Event()
        nursery.start_soon(self._read, reader, hello)
        nursery.start_soon(self._stderr, self.proc.stderr)
        with trio.move_on_after(HELLO_TIMEOUT_S):
            await _first(hello.wait, self.gone.wait)
        if not hello.is_set():
            await self._reap()
            raise RemoteError(self._why_not_started(reader))
        theirs, ours = self.hello.get("vtick"), vtick_version()
        if theirs != ours:
            await self.close(bye=False)  # another vtick's agent: no request of ours
            raise RemoteError(
                f"{self.where()}: vtick {theirs} there, {ours} here: install the same "
                "vtick on every machine (the wire protocol and the commands must match)"
            )

    def _why_not_started(self, reader: wire.LineReader) -> str:
        status = self.proc.returncode if self.proc is not None else None
        said = [line for line in self.stderr_tail if line.strip()] + reader.junk
        last = said[-1].strip() if said else "no output"
        if self.machine.kind == "ssh" and status == 255:
            return f"{self.where()}: unreachable: {last}"
        if status is None:
            return f"{self.where()}: no answer from the agent within {HELLO_TIMEOUT_S:g} s"
        if "No module named" in last and "vtick" in last:
            python = self.machine.python or "python3"
            return f"{self.where()}: vtick is not installed for {python} there ({last})"
        return f"{self.where()}: the agent did not start (status {status}): {last}"

    async def _read(self, reader: wire.LineReader, hello: trio.Event) -> None:
        try:
            async for obj in reader:
                if obj.get("event") == "hello":
                    self.hello = obj
                    hello.set()
                elif obj.get("event") == "exited":
                    pid = str(obj.get("id"))
                    self.exits[pid] = int(obj.get("status", -1))
                    self._exit_event(pid).set()
                elif "re" in obj and obj["re"] in self._waiting:
                    event, slot = self._waiting.pop(obj["re"])
                    slot.append(obj)
                    event.set()
        finally:
            self.gone.set()
            for event, _ in self._waiting.values():
                event.set()  # their slots stay empty: the agent is gone
            for event in self._exit_events.values():
                event.set()

    async def _stderr(self, stream: trio.abc.ReceiveStream) -> None:
        buf = b""
        while True:
            try:
                chunk = await stream.receive_some(4096)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                chunk = b""
            if not chunk:
                break
            buf += chunk
            *lines, rest = buf.split(b"\n")
            buf = rest
            for raw in lines:
                line = raw.decode(errors="replace")
                self.stderr_tail.append(line)
                if line.strip():
                    print(f"[{self.name}] {line}", file=sys.stderr, flush=True)

    def _exit_event(self, pid: str) -> trio.Event:
        if pid not in self._exit_events:
            self._exit_events[pid] = trio.Event()
            if pid in self.exits or self.gone.is_set():
                self._exit_events[pid].set()
        return self._exit_events[pid]

    # ------------------------------------------------------------------ requests

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for its answer.

        Raises:
            RemoteError: the agent refused (its reason) or is gone.
        """
        if self._writer is None or self.gone.is_set():
            raise RemoteError(f"{self.where()}: the agent is gone")
        re = next(self._ids)
        event: trio.Event = trio.Event()
        slot: list[dict[str, Any]] = []
        self._waiting[re] = (event, slot)
        try:
            await self._writer.send({"op": op, "re": re, **fields})
        except wire.Gone:
            self._waiting.pop(re, None)
            raise RemoteError(f"{self.where()}: the agent is gone") from None
        await event.wait()
        if not slot:
            raise RemoteError(f"{self.where()}: the agent is gone")
        reply = slot[0]
        if not reply.get("ok"):
            raise RemoteError(f"{self.where()}: {reply.get('error', 'refused')}")
        return reply

    async def wait_exit(self, pid: str) -> int | None:
        """The exit status of process ``pid`` (None if the agent went away first)."""
        await self._exit_event(pid).wait()
        return self.exits.get(pid)

    # ------------------------------------------------------------------ end

    async def close(self, bye: bool = True) -> None:
        """Say bye (the agent stops its processes and removes its run directory) and
        wait for it; kill and sweep an agent that does not go.  ``bye=False``: only
        close its stdin (an agent of another vtick version, whose answers we do not
        read; end of file makes a vtick agent clean up all the same)."""
        proc = self.proc
        if proc is None:
            return
        with trio.CancelScope(shield=True):
            if bye and not self.gone.is_set() and not self._said_bye:
                self._said_bye = True
                with trio.move_on_after(BYE_TIMEOUT_S):
                    with contextlib.suppress(RemoteError):
                        await self.request("bye")
            if self._writer is not None:
                with contextlib.suppress(Exception):
                    await self._writer.aclose()
            await self._reap()
            if bye and proc.returncode not in (0, None) and self.hello.get("run_dir"):
                await self.sweep()

    async def _reap(self) -> None:
        proc = self.proc
        if proc is None:
            return
        with trio.CancelScope(shield=True):
            with trio.move_on_after(BYE_TIMEOUT_S):
                await proc.wait()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, 9)
                await proc.wait()

    async def sweep(self) -> None:
        """Remove what a dead agent left (its run directory, any process of its
        manifest still running), on its machine."""
        run_dir = str(self.hello["run_dir"])
        if self.machine.kind != "ssh":
            sweep(run_dir)  # this kernel, this file system (a namespace shares both)
            return
        cmd = agent_command(self.machine, self.control, "--sweep", run_dir)
        with trio.move_on_after(30), contextlib.suppress(OSError):
            await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)


async def _first(*waits: Any) -> None:
    """Return when the first of ``waits`` returns."""
    async with trio.open_nursery() as nursery:
        for wait in waits:

            async def one(w: Any = wait) -> None:
                await w()
                nursery.cancel_scope.cancel()

            nursery.start_soon(one)
