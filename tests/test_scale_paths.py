"""Issue 9, "speed and scale": what kept default paths from completing at 256 vCPUs on
a 2-core machine, one regression test per cause.

1. ``lapic-periodic``: the host's timer loop never yielded while it was behind (its
   alarm's wait returns without a checkpoint when the expiry has passed), so the receive
   loops, the run clock and ``stop_all`` starved; and a vCPU that had said goodbye kept
   its periodic LAPIC timer firing in the host.
2. ``xapic-mask``: a vCPU told to stop finished the kernel op it was in first, a mask
   IPI to 255 targets (765 trapped APIC accesses); 256 of them took longer than the
   host's wait for the reports.  A VMM stops a vCPU at its next exit; the call it was
   making is cut off, not counted as completed.
3. ``pv`` (the IPI storm): the stall report told a vCPU's own short gaps and the ~10 s
   its exits waited for the host (behind 65 280 relayed csd stores) as one long stop of
   the vCPU.
"""

from __future__ import annotations

import pytest
import trio
from test_guest_smp import Clock, drive, online
from test_online_mask import hello, host_of

from vtick.guest.apic import XApicOps
from vtick.guest.cpu import MemoryWrite
from vtick.guest.smp import Smp
from vtick.guest.vcpu import GuestConfig, GuestVcpu, VcpuStopped
from vtick.host.lab.metrics import _vcpu, stalls
from vtick.host.server import LinkState
from vtick.proto import apicdef as r
from vtick.proto import messages as m
from vtick.proto.eventlog import CSD_CUT_OFF, G_CSD_QUEUE, G_CSD_WAIT

T0 = 5_000_000_000


async def test_a_timer_loop_that_is_always_behind_still_lets_the_other_tasks_run() -> None:
    passes = 0
    limit = 200
    seen: list[int] = []  # the timer loop's pass count each time the other task ran
    done = trio.Event()
    with host_of(1) as host:

        def next_deadline() -> int | None:
            return 1 if passes < limit else None  # due at once, for ``limit`` passes

        def on_timer(now: int) -> None:
            nonlocal passes
            passes += 1
            if passes == limit:
                done.set()

        host.machine.next_deadline = next_deadline  # type: ignore[method-assign]
        host.machine.on_timer = on_timer  # type: ignore[method-assign]

        async def other() -> None:
            while True:
                seen.append(passes)
                await trio.lowlevel.checkpoint()

        with trio.move_on_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(other)
                nursery.start_soon(host.timer_loop)
                await done.wait()
                nursery.cancel_scope.cancel()
    assert passes == limit
    # the other task ran between the passes, not only once they were over
    assert any(0 < p < limit for p in seen), sorted(set(seen))[:5]
    assert len({p for p in seen if p < limit}) > limit // 2


async def test_a_vcpu_that_said_goodbye_has_no_host_timer_left() -> None:
    """KVM cancels a vCPU's LAPIC hrtimer when the vCPU is destroyed (kvm_free_lapic);
    a guest that shut down masked it first (Linux disable_local_APIC).  Here the vCPU's
    goodbye ends it: its periodic timer must not keep firing in the host while the
    other vCPUs' reports are collected (256 x 1 kHz of them on 2 cores)."""
    with host_of(2) as host:
        for vl in host.links:
            await hello(vl, T0)
        for cpu in (0, 1):
            lapic = host.machine.vcpus[cpu].lapic
            lapic.mmio_write(r.APIC_SPIV, 4, 0x1FF, T0)  # software-enabled
            lapic.mmio_write(r.APIC_LVTT, 4, r.APIC_LVT_TIMER_PERIODIC | 0xEC, T0)
            lapic.mmio_write(r.APIC_TDCR, 4, 0xB, T0)  # divide by 1
            lapic.mmio_write(r.APIC_TMICT, 4, 1_000_000, T0)
        assert host.machine.hrtimers.expiry(("lapic", 0)) is not None
        vl = host.links[0]
        vl.state = LinkState.CLOSING
        await vl._dispatch(m.Goodbye(), b"", None, T0 + 1)  # type: ignore[arg-type]
        assert vl.state is LinkState.DONE
        assert host.machine.hrtimers.expiry(("lapic", 0)) is None
        assert host.machine.hrtimers.expiry(("lapic", 1)) is not None  # the other runs on


N = 256  # vCPUs: a mask IPI to the 255 others


def sender() -> Smp:
    smp = Smp(0, N, XApicOps(0, N), Clock(), shortcuts=False)  # xapic-mask: no ALLBUT
    online(smp, *range(N))
    return smp


class StoppedVcpu:
    """A GuestVcpu whose exits are answered at once, and whose host's shutdown arrives
    while its third exit is out.  ``exits`` counts the exits it took."""

    def __init__(self, workload_started: bool) -> None:
        self.exits = 0
        vcpu = GuestVcpu(GuestConfig(connect="ipc:///unused", vcpu=0, token=bytes(32)))
        vcpu.workload_started = 1 if workload_started else 0

        async def exit(msg: m.Message) -> m.ExitReply:
            self.exits += 1
            if self.exits == 3:
                vcpu._on_message(m.Shutdown(reason="run complete"))
            return m.ExitReply(re=0, value=0, fault=0, host_ns=0)

        vcpu.exit = exit  # type: ignore[method-assign]
        vcpu._send = lambda msg, now: None  # type: ignore[method-assign]
        vcpu.flush = lambda: None  # type: ignore[method-assign]
        self.vcpu = vcpu


async def test_a_vcpu_told_to_stop_leaves_its_mask_ipi_at_the_next_exit() -> None:
    smp = sender()
    stopped = StoppedVcpu(workload_started=True)
    with pytest.raises(VcpuStopped):
        await stopped.vcpu.run_op(smp.call_function("noop", 0, wait=True))
    # stopped at its next exit, not after the 765 APIC accesses of the whole mask send
    assert stopped.exits == 3
    assert stopped.vcpu.stopped_mid_op
    assert smp.stats.csds_sent == N - 1
    assert smp.stats.ipis_sent == 0


async def test_a_vcpu_told_to_stop_while_booting_finishes_the_op() -> None:
    """Before its workload started the shutdown is taken at the workload's first
    boundary, as before (the boot is bounded; the guest conformance cases count on it)."""
    smp = sender()
    stopped = StoppedVcpu(workload_started=False)
    await stopped.vcpu.run_op(smp.call_function("noop", 0, wait=False))
    assert stopped.exits == 3 * (N - 1)
    assert not stopped.vcpu.stopped_mid_op


def test_a_call_the_stop_interrupts_is_cut_off_not_completed() -> None:
    smp = sender()
    heard: list[tuple[int, int, int, int]] = []
    smp.listener = lambda *event: heard.append(event)
    op = smp.call_function("noop", 0, wait=True)
    item = op.send(None)
    for _ in range(10):  # ten csds stored, then the vCPU stops
        assert isinstance(item, MemoryWrite)
        item = op.send(None)
    op.close()
    assert smp.stats.calls == 1
    assert smp.stats.cut_off == 1  # counted apart: not an event, not an error
    assert smp.stats.errors == 0
    assert smp.stats.call_latency_ns == []
    assert not smp.outstanding
    queued = [e[1] for e in heard if e[0] == G_CSD_QUEUE]
    cut = [e[1] for e in heard if e[0] == G_CSD_WAIT and e[3] == CSD_CUT_OFF]
    assert queued
    assert cut == queued
    # the run's figures count no event for it (host/lab/metrics.py)
    counters = {"smp_calls": smp.stats.calls, "smp_cut_off_calls": smp.stats.cut_off}
    guest = {"counters": counters, "exits": {}, "exit_rtt_ns_total": {}, "early": 0}
    figures = _vcpu({"vcpu": 0, "guest": guest | {"duration_ns": 0}, "host_exits": {}}, "ipi", 2)
    assert figures is not None
    assert figures["events"] == 0


def test_a_call_that_completed_is_not_cut_off_when_the_vcpu_stops_later() -> None:
    smp = sender()
    errors, _, exits = drive(smp.call_function("noop", 0, wait=False))
    assert errors == []
    assert len(exits) == 3 * (N - 1)  # the whole mask send: 3 APIC accesses a target
    assert smp.stats.cut_off == 0


def test_a_vcpus_own_gaps_and_its_wait_for_the_host_are_told_apart() -> None:
    """vCPU 96 of a 256-vCPU xapic-shortcut run: off its CPU 1.1 s at the start and
    0.26 s at 10.8 s; its IPI exit meanwhile waited 10.7 s for the host's reply.  It was
    told as "vCPU 96 stopped responding for 11.0 s"."""
    s = 1_000_000_000
    counters = {
        "workload_started_ns": 100 * s,
        "stall 0 ns": 1_115_000_000,
        "stall 0 at_ns": 100 * s + 35_000_000,
        "stall 1 ns": 256_000_000,
        "stall 1 at_ns": 100 * s + 10_790_000_000,
        "host_wait 0 ns": 10_730_000_000,
        "host_wait 0 at_ns": 100 * s + 403_000_000,
    }
    results = {
        "config": {"workload": "ipi"},
        "vcpus": [{"vcpu": 96, "guest": {"counters": counters}}],
    }
    assert [x["text"] for x in stalls(results)] == [
        "vCPU 96 stopped responding for 1.1 s at 0.0 s",
        "the host stopped responding for 10.7 s at 0.4 s",
        "vCPU 96 stopped responding for 0.3 s at 10.8 s",
    ]
    # a wait its own stop explains is not the host's
    counters["host_wait 0 ns"] = 1_000_000_000
    counters["host_wait 0 at_ns"] = 100 * s + 100_000_000
    assert [x["who"] for x in stalls(results)] == ["vCPU 96", "vCPU 96"]
