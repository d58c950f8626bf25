"""smp_call_function's protocol, driven by hand: csd stores, IPIs, waits, a dead target."""

from __future__ import annotations

from vtick.guest.apic import X2ApicOps, XApicOps
from vtick.guest.cpu import MemoryWrite, PreemptionPoint, SpinWait
from vtick.guest.smp import Smp
from vtick.proto import apicdef as a
from vtick.proto import messages as m
from vtick.proto.abi import Vector
from vtick.proto.cpumask import encode_mask


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


def online(smp: Smp, *cpus: int) -> None:
    """The host's cpu_online_mask with ``cpus`` set reaches ``smp`` (an online-mask)."""
    smp.on_online_mask(encode_mask(sum(1 << c for c in cpus), smp.ncpus))


def drive(op, on_spin=None):
    """Run an op: exits answered with a zero reply, stores collected, spins handed to
    ``on_spin`` (which delivers stores to the sender)."""
    stores, exits = [], []
    value = None
    try:
        while True:
            item = op.send(value)
            value = None
            if isinstance(item, MemoryWrite):
                stores.append(item.msg)
            elif isinstance(item, SpinWait):
                on_spin(item)
            elif isinstance(item, PreemptionPoint):
                pass
            else:
                exits.append(item)
                value = m.ExitReply(re=0, value=0, fault=0, host_ns=0)
    except StopIteration as done:
        return done.value, stores, exits


def test_call_to_all_others_uses_one_allbut_ipi_and_waits_for_every_unlock():
    clock = Clock()
    sender = Smp(0, 3, XApicOps(0, 3), clock)
    targets = {c: Smp(c, 3, XApicOps(c, 3), clock) for c in (1, 2)}
    online(sender, 1, 2)

    def spin(_item):
        # the targets take the IPI, run the csds and unlock them
        for t in targets.values():
            _, stores, _ = drive(t.flush_queue())
            for done in stores:
                sender.on_done(done)

    # the csds reach the targets as the sender stores them
    op = sender.call_function("noop", 7, wait=True)
    errors, stores, exits = None, [], []
    value = None
    try:
        while True:
            item = op.send(value)
            value = None
            if isinstance(item, MemoryWrite):
                stores.append(item.msg)
                targets[item.msg.dst].on_csd(item.msg)
            elif isinstance(item, SpinWait):
                spin(item)
            elif not isinstance(item, PreemptionPoint):
                exits.append(item)
                value = m.ExitReply(re=0, value=0, fault=0, host_ns=0)
    except StopIteration as done:
        errors = done.value
    assert errors == []
    assert [s.dst for s in stores] == [1, 2]
    # xAPIC __send_IPI_shortcut: ICR read (wait idle) + one ICR write with ALLBUT
    assert exits == [
        m.ExitMmioRead(gpa=a.APIC_DEFAULT_BASE + a.APIC_ICR, size=4),
        m.ExitMmioWrite(
            gpa=a.APIC_DEFAULT_BASE + a.APIC_ICR,
            size=4,
            value=a.APIC_DEST_ALLBUT | Vector.CALL_FUNCTION,
        ),
    ]
    assert sender.outstanding == {}
    assert sender.stats.shortcut_ipis == 1
    assert all(t.stats.csds_run == 1 for t in targets.values())


def test_single_target_uses_call_function_single_vector():
    sender = Smp(0, 3, X2ApicOps(0, 3), Clock())
    online(sender, 1, 2)
    _, stores, exits = drive(sender.call_function_single(2, "noop", 0, wait=False))
    assert [s.dst for s in stores] == [2]
    assert exits == [
        m.ExitMsrWrite(msr=a.x2apic_msr(a.APIC_ICR), value=(2 << 32) | Vector.CALL_FUNCTION_SINGLE)
    ]


def test_ipi_only_when_the_targets_queue_was_empty():
    sender = Smp(0, 2, X2ApicOps(0, 2), Clock())
    online(sender, 1)
    _, _, first = drive(sender.call_function_single(1, "noop", 0, wait=False))
    _, stores, second = drive(sender.call_function_single(1, "noop", 1, wait=False))
    assert len(first) == 1  # the IPI
    assert len(stores) == 1
    assert second == []  # queue not empty: the first IPI will drain this csd too


def test_dead_target_ends_the_wait_with_an_error_after_the_timeout():
    clock = Clock()
    sender = Smp(0, 2, X2ApicOps(0, 2), clock, timeout_ns=5_000_000)
    online(sender, 1)

    def spin(item: SpinWait) -> None:
        clock.now = item.deadline  # nobody answers: time passes to the deadline

    errors, _, _ = drive(sender.call_function("noop", 0, wait=True), on_spin=spin)
    assert len(errors) == 1
    assert "vCPU 1 did not run csd" in errors[0]
    assert sender.stats.timeouts == 1
    assert sender.outstanding == {}


def test_host_reported_error_is_returned():
    sender = Smp(0, 2, X2ApicOps(0, 2), Clock())
    online(sender, 1)

    def spin(_item):
        sender.on_done(m.CsdDone(src=1, dst=0, id=1, ran=0, error="vCPU 1 is not running"))

    errors, _, _ = drive(sender.call_function("noop", 0, wait=True), on_spin=spin)
    assert errors == ["vCPU 1: vCPU 1 is not running"]


def test_async_csd_unlocks_before_running_sync_after():
    clock = Clock()
    target = Smp(1, 2, X2ApicOps(1, 2), clock)
    target.on_csd(m.Csd(src=0, dst=1, id=1, func="noop", info=0, wait=False, sent=0))
    target.on_csd(m.Csd(src=0, dst=1, id=2, func="noop", info=0, wait=True, sent=0))
    _, stores, exits = drive(target.flush_queue())
    assert [s.id for s in stores] == [1, 2]
    assert exits == []
    assert target.stats.csds_run == 2
    _, _, _ = drive(target.flush_queue())
    assert target.stats.empty_queue_ipis == 1


def test_offline_cpus_are_not_called():
    sender = Smp(0, 3, X2ApicOps(0, 3), Clock())
    online(sender, 2)
    _, stores, _ = drive(sender.call_function("noop", 0, wait=False))
    assert [s.dst for s in stores] == [2]


# ---------------------------------------------------------------------- calibration check


def test_pit_calibration_missing_an_edge_is_rescaled_by_the_tsc():
    """A vCPU descheduled for longer than half the PIT's period misses an edge: the PIT
    interval is one period too long.  The TSC check (Linux checks against the PM timer)
    catches the >1 % disagreement and rescales, so the result stays right."""
    from vtick.guest.calibrate import REFERENCE_HZ, calibrate_lapic_timer
    from vtick.proto.abi import PitPort

    period_ns = 1_000_000_000 // REFERENCE_HZ  # the square wave's period
    clock = {"ns": 0}
    stalled = {"done": False}

    def tmcct() -> int:  # LAPIC at 1 GHz / 16, counting down from 0xFFFFFFFF // 16
        return (0xFFFF_FFFF // 16) - clock["ns"] // 16

    def answer(item):
        clock["ns"] += 200_000  # every exit costs 200 us
        if isinstance(item, m.ExitPioIn) and item.port == PitPort.PORT_B:
            if not stalled["done"] and clock["ns"] > 3 * period_ns:
                clock["ns"] += period_ns  # descheduled for a whole period: an edge is lost
                stalled["done"] = True
            high = (clock["ns"] % period_ns) < period_ns // 2
            return m.ExitReply(re=0, value=0x20 if high else 0, fault=0, host_ns=0)
        if isinstance(item, m.ExitMmioRead):
            return m.ExitReply(re=0, value=tmcct(), fault=0, host_ns=0)
        return m.ExitReply(re=0, value=0, fault=0, host_ns=0)

    def rdtsc() -> int:
        return clock["ns"] * 2_500_000 // 1_000_000  # 2.5 GHz

    from vtick.guest.cpu import run_to_completion

    unchecked = run_to_completion(calibrate_lapic_timer(XApicOps(0, 1), 1000), answer)
    clock["ns"], stalled["done"] = 0, False
    checked = run_to_completion(
        calibrate_lapic_timer(XApicOps(0, 1), 1000, rdtsc, 2_500_000), answer
    )
    assert not unchecked.rescaled
    assert unchecked.lapic_timer_period > 1_050_000  # ~10 % too long
    assert checked.rescaled
    assert abs(checked.lapic_timer_period - 1_000_000) < 10_000
