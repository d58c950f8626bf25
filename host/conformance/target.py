"""The host under test: one vtick would start itself, one started from a command, or one
that is already running (the I/O edge of ``vtick conformance host`` and ``vtick fuzz``).

A started host gets what a launcher gives vtick's own host (``docs/protocol.md`` §8):
a private 0700 directory for its ipc sockets, the run's token in ``$VTICK_TOKEN`` (never
on the command line), its own process group, and a ``READY`` line on stdout to wait for.
It is stopped with SIGCONT, SIGTERM and then SIGKILL, and the directory is removed
whatever happened, so nothing is left in the temporary directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import trio

from vtick.proto.lifecycle import PARENT_ENV
from vtick.proto.transport import monotonic_ns

__all__ = ["HostSpec", "HostProcess", "TargetError", "own_host_command"]

READY_TIMEOUT_S = 15.0
TERM_GRACE_S = 3.0
#: the longest run ``vtick host --duration`` accepts: the suite ends it itself
LONG_RUN_S = 86400


class TargetError(Exception):
    """The host under test could not be started or reached (a harness error)."""


def own_host_command(mutations: tuple[str, ...] = ()) -> str:
    """The command template that starts vtick's own host (``{url}``, ``{vcpus}``,
    ``{duration}`` are filled in by :class:`HostProcess`)."""
    mutate = "".join(f" --mutate {shlex.quote(name)}" for name in mutations)
    return (
        f"{shlex.quote(sys.executable)} -m vtick.host host --listen {{url}} --vcpus {{vcpus}} "
        f"--duration {{duration}} --connect-timeout {{duration}} --report-timeout 2 "
        f"--results {{results}}{mutate}"
    )


@dataclass
class HostSpec:
    """Where the host under test comes from: a command template or a URL."""

    command: str | None = None
    connect: str | None = None
    token: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    @property
    def started_by_us(self) -> bool:
        return self.command is not None


class HostProcess:
    """One started host: its directory, URL, process and captured stderr lines."""

    def __init__(self, spec: HostSpec, vcpus: int, duration_s: float) -> None:
        assert spec.command is not None
        self.spec = spec
        self.dir = tempfile.mkdtemp(prefix="vtick-conformance-")  # 0700
        self.url = f"ipc://{self.dir}/link"
        self.results_path = os.path.join(self.dir, "results.json")
        try:
            argv = shlex.split(
                spec.command.format(
                    url=self.url,
                    vcpus=vcpus,
                    duration=f"{duration_s:g}",
                    results=self.results_path,
                )
            )
        except (KeyError, IndexError, ValueError) as exc:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise TargetError(f"--host-cmd: cannot fill in the template: {exc}") from None
        self.argv = argv
        self.proc: trio.Process | None = None
        #: (host-clock ns, line) of everything the host printed on stderr
        self.log: list[tuple[int, str]] = []
        self.status: int | None = None
        self.results: dict | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        # the host stops when this process is gone (proto/lifecycle.py), as a run's
        # children do: a runner killed with SIGKILL left a day-long host behind
        env = dict(os.environ, VTICK_TOKEN=self.spec.token.hex(), **{PARENT_ENV: str(os.getpid())})
        try:
            self.proc = await trio.lowlevel.open_process(
                self.argv,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            raise TargetError(f"cannot start the host ({self.argv[0]}): {exc}") from None
        nursery.start_soon(self._read_stderr)
        await self._wait_ready()

    async def _read_stderr(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        buf = b""
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            while True:
                chunk = await self.proc.stderr.receive_some(65536)
                if not chunk:
                    return
                buf += chunk
                *lines, buf = buf.split(b"\n")
                now = monotonic_ns()
                self.log += [(now, line.decode(errors="replace")) for line in lines]

    async def _wait_ready(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        buf = b""
        with trio.move_on_after(READY_TIMEOUT_S):
            while b"\n" not in buf:
                chunk = await self.proc.stdout.receive_some(4096)
                if not chunk:
                    status = await self.proc.wait()
                    tail = "; ".join(line for _, line in self.log[-3:])
                    raise TargetError(
                        f"the host exited with status {status} before it was ready"
                        + (f" ({tail})" if tail else "")
                    )
                buf += chunk
            if not buf.startswith(b"READY"):
                raise TargetError(f"the host said {buf[:200]!r} instead of READY")
            return
        raise TargetError(f"the host was not ready within {READY_TIMEOUT_S:g} s")

    async def wait(self, timeout_s: float) -> int | None:
        """Wait for the host to end by itself; its exit status, or None if it did not."""
        assert self.proc is not None
        with trio.move_on_after(timeout_s):
            self.status = await self.proc.wait()
        return self.status

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    async def stop(self) -> None:
        """End the host (SIGCONT, SIGTERM, SIGKILL), read its results, remove its dir."""
        with trio.CancelScope(shield=True):
            if self.proc is not None:
                self._signal(signal.SIGCONT)
                self._signal(signal.SIGTERM)
                with trio.move_on_after(TERM_GRACE_S):
                    await self.proc.wait()
                self._signal(signal.SIGKILL)
                self.status = await self.proc.wait()
                self._signal(signal.SIGKILL)  # anything left in its group
            self._collect()

    def _collect(self) -> None:
        """Read the host's results file (if it wrote one) and remove the directory."""
        with contextlib.suppress(OSError, ValueError), open(self.results_path) as fh:
            self.results = json.load(fh)
        shutil.rmtree(self.dir, ignore_errors=True)
