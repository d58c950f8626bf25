"""LAPIC timer calibration against the simulated PIT (BSP) and the TSC (APs).

The host side is real: the Machine's PIT model and LAPIC (1 GHz bus, KVM's default), so
every port read is an exit handled at the harness's integer host time, and the error of
the result comes from the polling alone: an edge is seen up to one exit late.
"""

from __future__ import annotations

import pytest
from inproc import InProcVm

from vtick.guest.calibrate import REFERENCE_EDGES, REFERENCE_HZ
from vtick.proto.abi import PIT_HZ, PitPort

NSEC_PER_SEC = 1_000_000_000
#: PIT channel 2 count for the 10 ms reference, and the true length of ten periods
PIT_COUNT = (PIT_HZ + REFERENCE_HZ // 2) // REFERENCE_HZ
TRUE_INTERVAL_NS = REFERENCE_EDGES * PIT_COUNT * NSEC_PER_SEC / PIT_HZ  # 100.0015 ms


def calibrate_bsp(exit_cost: int, hz: int = 1000, mode: str = "lapic-xapic", apic=None):
    vm = InProcVm(1, mode, exit_cost_ns=exit_cost, hz=hz, apic=apic)
    k = vm.boot(0)
    assert k.calibration is not None
    return vm, k.calibration


@pytest.mark.parametrize("exit_cost", [5_000, 20_000, 33_333, 100_000, 149_999])
@pytest.mark.parametrize("mode", ["lapic-xapic", "lapic-x2apic"])
def test_bsp_calibration_against_the_pit(exit_cost, mode):
    vm, cal = calibrate_bsp(exit_cost, mode=mode)
    hz = 1000
    true_period = NSEC_PER_SEC // hz  # 1 GHz bus clocks per jiffy
    assert abs(cal.lapic_timer_period - true_period) < true_period // 100
    # tighter: off by at most one exit round trip (plus a TMCCT tick) over 100 ms
    measured_ns = cal.lapic_timer_period * hz // 10
    assert abs(measured_ns - TRUE_INTERVAL_NS) <= exit_cost + 32 + hz // 10
    assert abs(cal.error(NSEC_PER_SEC)) <= (exit_cost + 2_000) / 100_000_000
    # every poll is one exit: the port 0x61 reads are the polls plus the gate setup read
    port_b_reads = vm.vcpus[0].exit_keys().count(("pio-in", PitPort.PORT_B))
    assert port_b_reads == cal.polls + 1
    # an alignment edge (<= 10 ms) plus 100 ms of polling, one poll per exit
    assert 100_000_000 // exit_cost <= cal.polls <= 110_000_000 // exit_cost + 2
    assert cal.loops == hz // 10
    exits = len(vm.vcpus[0].exits)
    print(
        f"{mode} exit cost {exit_cost} ns: period {cal.lapic_timer_period} "
        f"(error {cal.error(NSEC_PER_SEC):+.5%}), polls {cal.polls}, boot exits {exits}"
    )


@pytest.mark.parametrize("hz", [100, 250, 1000])
def test_bsp_calibration_at_other_hz(hz):
    _, cal = calibrate_bsp(20_000, hz=hz)
    true_period = NSEC_PER_SEC // hz
    assert abs(cal.lapic_timer_period - true_period) < true_period // 100
    assert cal.hz == hz
    assert abs(cal.bus_hz() - NSEC_PER_SEC) < NSEC_PER_SEC // 1000


def test_bsp_calibration_through_vmi_hypercalls():
    """The same calibration with apic_read/apic_write as hypercalls (VMI ops)."""
    vm, cal = calibrate_bsp(20_000, apic="vmi")
    assert abs(cal.lapic_timer_period - 1_000_000) < 10_000
    assert all(
        key[0] in ("hypercall", "pio-in", "pio-out", "msr-write") for key in vm.vcpus[0].exit_keys()
    )


@pytest.mark.parametrize("exit_cost", [5_000, 20_000, 100_000])
@pytest.mark.parametrize("mode", ["lapic-xapic", "lapic-x2apic"])
def test_ap_calibration_against_the_tsc(exit_cost, mode):
    """APs calibrate against the TSC: TMCCT and TSC are sampled in the same exit's
    aftermath, so the exit cost cancels out; no port access at all."""
    vm = InProcVm(2, mode, exit_cost_ns=exit_cost)
    k = vm.boot(1)
    cal = k.calibration
    assert cal is not None
    assert abs(cal.lapic_timer_period - 1_000_000) <= 1
    assert cal.polls == 0
    ctx = vm.vcpus[1]
    assert not any(key[0].startswith("pio") for key in ctx.exit_keys())
    assert ("udelay", 100_000_000) in ctx.trace
    tmcct_reads = [key for key in ctx.exit_keys() if key[1] in (0xFEE00390, 0x839)]
    assert len(tmcct_reads) == 2
    print(
        f"AP {mode} exit cost {exit_cost}: period {cal.lapic_timer_period}, exits {len(ctx.exits)}"
    )


def test_calibrated_lapic_timer_fires_on_time():
    """With the calibrated period the LAPIC one-shot lands within one exit of its expiry
    (a calibration error would show up as early device events or lateness)."""
    vm = InProcVm(2, "lapic-xapic")
    kernels = vm.boot_all()
    for k in kernels:
        expires = vm.ktime(k.cpu) + 3_000_000
        k.start_timer("t", expires, lambda now, exp: None)
        vm.run_op(k.cpu, k.reprogram())
        assert vm.hlt(k.cpu)
        vm.deliver(k.cpu)
        assert k.timers is not None
        assert k.timers.early == 0
        (expiry,) = vm.vcpus[k.cpu].expiries
        assert 0 <= expiry.lateness <= 2 * vm.exit_cost_ns + 1_000
