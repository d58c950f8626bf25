"""Process lifecycle helpers shared by the host and vCPU processes (trio edge)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import trio

__all__ = ["PARENT_ENV", "watch_parent", "watch_signals"]

#: set by ``vtick run`` in its children: the launcher's pid
PARENT_ENV = "VTICK_PARENT_PID"
PARENT_POLL_S = 0.25


async def watch_parent(on_orphaned: trio.CancelScope | None = None) -> None:
    """Exit when the launcher that started this process is gone.

    PR_SET_PDEATHSIG would be the kernel's way, but it fires when the *thread* that
    forked the child exits, and trio forks from worker threads that retire after 10 s
    idle: children were killed mid-run.  So poll the parent pid instead (the process
    is re-parented when its parent dies).
    """
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    expected = int(parent)
    while os.getppid() == expected:  # noqa: ASYNC110 - nothing to wait on but the pid
        await trio.sleep(PARENT_POLL_S)
    if on_orphaned is not None:
        on_orphaned.cancel()
    else:  # pragma: no cover - defensive
        os._exit(1)


async def watch_signals(
    on_signal: Callable[[int], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``on_signal(signum)`` on SIGTERM or SIGINT.  Start it with ``nursery.start``
    so the handler is installed before the caller announces it is ready."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            on_signal(signum)
