"""The end-of-run report always fits one message: bulky optional parts are shed."""

from __future__ import annotations

import trio

from vtick.guest.vcpu import GuestConfig, GuestVcpu
from vtick.proto import messages as m
from vtick.proto.codec import decode


class Endpoint:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send(self, frames: list[bytes]) -> None:
        self.frames.extend(frames)


async def test_oversize_report_sheds_the_timeline_and_says_so() -> None:
    vcpu = GuestVcpu(GuestConfig(connect="ipc:///x", vcpu=0, token=bytes(32)))
    ep = Endpoint()
    vcpu.ep = ep  # type: ignore[assignment]
    vcpu.link.max_message = 12_000  # a timeline of 1000 points is 16 kB
    for i in range(1000):
        vcpu.stats.record_lateness(i * 7 + 1, at=i * 1000)
    vcpu.host_goodbye.set()
    vcpu.cfg.goodbye_timeout_s = 0.1
    with trio.fail_after(5):
        await vcpu.finish()
    reports = [decode(f).msg for f in ep.frames if isinstance(decode(f).msg, m.Report)]
    assert len(reports) == 1
    report = reports[0]
    assert report.timeline is None
    assert report.counters is not None
    assert report.counters["report_shed"] == 1
    assert report.lateness_hdr  # the histogram survives


async def test_report_that_fits_keeps_everything() -> None:
    vcpu = GuestVcpu(GuestConfig(connect="ipc:///x", vcpu=0, token=bytes(32)))
    ep = Endpoint()
    vcpu.ep = ep  # type: ignore[assignment]
    for i in range(100):
        vcpu.stats.record_lateness(i + 1, at=i)
    vcpu.host_goodbye.set()
    with trio.fail_after(5):
        await vcpu.finish()
    (report,) = [decode(f).msg for f in ep.frames if isinstance(decode(f).msg, m.Report)]
    assert report.timeline is not None
    assert len(report.timeline) == 100 * 16
    assert "report_shed" not in (report.counters or {})
