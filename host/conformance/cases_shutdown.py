"""Host cases, suite ``shutdown``: the end of a run (``docs/protocol.md`` §3.7, §8.3).

These need a host whose run ends while the case watches, so they get a host of their
own (fixture ``own-host``: one vCPU, a 0.5 s run) when the runner starts hosts itself;
against ``--connect`` they are ``unsupported``.
"""

from __future__ import annotations

from vtick.host.conformance import case as c
from vtick.host.conformance.lib import Gen, session
from vtick.proto import messages as m
from vtick.proto.errors import ErrorCode

__all__ = ["CASES"]

CASES = c.Registry()
MUST = c.Level.MUST

#: what a vCPU that measured nothing reports
EMPTY_REPORT = m.Report(
    events=0,
    early=0,
    spurious=0,
    exits={},
    exit_rtt_ns={},
    lateness_hdr=b"",
    lateness_max=0,
    duration_ns=0,
)


def _until_shutdown(ctx: c.Ctx) -> Gen:
    ctx.require_capability("run-ends", "needs a host the runner starts (its run ends in the case)")
    yield from session(ctx, 0)
    got = yield c.Await(0, (m.Shutdown,), 5000)
    ctx.check("the host says shutdown when its run is over", got is not None, "shutdown", "none")
    if got is None:
        raise c.Abort
    yield c.Send(0, EMPTY_REPORT)


def _host_status(ctx: c.Ctx) -> Gen:
    status, ok = yield c.HostEnd(5000)
    if status is None:
        ctx.note("the host's exit status is not observable")
        return
    ctx.equal("the host exits with status 0 (every vCPU reported and said goodbye)", 0, status)
    ctx.equal("its results say ok", True, ok)


@CASES.case(
    "shutdown.goodbye",
    "after shutdown, report and goodbye the host says goodbye and exits 0",
    MUST,
    "protocol.md §3.7, §8.3",
    fixture="own-host",
)
def goodbye(ctx: c.Ctx) -> Gen:
    yield from _until_shutdown(ctx)
    said = yield c.Goodbye(0)
    ctx.check("the host answers goodbye with goodbye", said, "goodbye", "none")
    yield from _host_status(ctx)


@CASES.case(
    "shutdown.late-hello",
    "a hello after a clean goodbye is refused as the run is over, and the run stays clean",
    MUST,
    "protocol.md §3.7, §8.3",
    fixture="own-host",
)
def late_hello(ctx: c.Ctx) -> Gen:
    yield from _until_shutdown(ctx)
    yield c.HoldAcks(0)  # the host waits for the ack of its goodbye: the hello comes first
    yield c.Send(0, m.Goodbye())
    bye = yield c.Await(0, (m.Goodbye,), 2000)
    ctx.check("the host answers goodbye", bye is not None, "goodbye", "none")
    answer = yield c.Hello(0)  # a new process on the same link, before the host is gone
    msg = answer.msg
    ctx.check(
        "the late hello is refused SHUTTING_DOWN",
        isinstance(msg, m.Refuse) and msg.code == ErrorCode.SHUTTING_DOWN,
        "refuse {code: 11}",
        msg or "no answer",
    )
    yield from _host_status(ctx)
