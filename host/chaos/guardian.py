"""The guardian: whatever happens to ``vtick chaos``, no process it stopped stays stopped.

The nemesis SIGSTOPs vCPU processes and the host.  A stopped process cannot notice that
its launcher is gone (the children's parent watch, ``vtick.proto.lifecycle``), so if
``vtick chaos`` itself were SIGKILLed in the middle of a stop, that process would stay
stopped for ever, an orphan.  The guardian is a tiny process of its own (its own
session, so a terminal's Ctrl-C does not reach it) that reads ``add PGID`` / ``del
PGID`` lines on its stdin for the process groups the orchestrator starts and reaps.
When its stdin closes, which the kernel does the moment the orchestrator dies however
it dies, it sends every group still listed SIGCONT, then SIGTERM, and SIGKILL a second
later, and exits.  Groups are removed as soon as the orchestrator has reaped them, so a
reused process group id is never signalled.  The run's private directory is the
guardian's too (``dir PATH`` / ``undir PATH``): the processes it holds would remove it
when their launcher is gone, but one SIGKILLed after the grace (a host slow to exit on a
loaded machine) cannot, so the guardian removes what is left after the last signal.

Run as ``python -m vtick.host.chaos.guardian``; :class:`Guardian` starts and feeds it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

__all__ = ["Guardian", "main"]

TERM_GRACE_S = 1.0


class Guardian:
    """The orchestrator's end: start the guardian, tell it which groups to look after."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vtick.host.chaos.guardian"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )

    def _say(self, line: str) -> None:
        if self.proc.stdin is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(line + "\n")
                self.proc.stdin.flush()

    def add(self, pgid: int) -> None:
        self._say(f"add {pgid}")

    def remove(self, pgid: int) -> None:
        self._say(f"del {pgid}")

    def own_dir(self, path: str) -> None:
        """Remove ``path`` if the orchestrator dies before it does."""
        self._say(f"dir {path}")

    def release_dir(self, path: str) -> None:
        """The orchestrator removed ``path`` itself."""
        self._say(f"undir {path}")

    def close(self) -> None:
        """Every group was reaped: let the guardian go (it signals nothing)."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def _signal(groups: set[int], sig: int) -> None:
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def main() -> int:
    groups: set[int] = set()
    dirs: set[str] = set()
    for line in sys.stdin:  # until EOF: the orchestrator closed it, or died
        what, _, arg = line.rstrip("\n").partition(" ")
        if what == "dir" and os.path.isabs(arg):
            dirs.add(arg)
        elif what == "undir":
            dirs.discard(arg)
        elif not arg.isdigit():
            continue
        elif what == "add":
            groups.add(int(arg))
        elif what == "del":
            groups.discard(int(arg))
    if groups:  # the orchestrator died with processes still running: end them
        _signal(groups, signal.SIGCONT)
        _signal(groups, signal.SIGTERM)
        time.sleep(TERM_GRACE_S)
        _signal(groups, signal.SIGKILL)
    for path in dirs:  # (the killed processes can no longer remove it themselves)
        time.sleep(0.1)  # a SIGKILLed process's ipc files go with its last close
        shutil.rmtree(path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only its stdin's end ends it
    sys.exit(main())
