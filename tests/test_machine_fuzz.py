"""No guest access can crash the host: random exits against every device model.

Malformed accesses (bad offsets, sizes, unknown MSRs, reserved bits, nonsense hypercall
arguments) must get an architectural answer (a value, #GP, -errno), never a Python
exception escaping ``Machine.handle_exit``.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vtick.host.devices.kvmclock import KvmClock
from vtick.host.devices.pit import Pit
from vtick.host.devices.pvapic import PvApic
from vtick.host.devices.pvtimer import PvTimer
from vtick.host.devices.vmi_alarm import VmiAlarm
from vtick.host.machine import Machine
from vtick.proto import messages as m
from vtick.proto.abi import Feature, Hypercall
from vtick.proto.pvclock import TscModel

U64 = st.integers(0, 2**64 - 1)
INTERESTING_MSRS = st.sampled_from(
    [0x1B, 0x6E0, 0x11, 0x12, 0x4B564D00, 0x4B564D01, 0x4B564D04]
    + list(range(0x800, 0x840))
    + [0x8FF, 0x900, 0x0]
)
APIC_GPA = st.integers(0xFEE00000 - 8, 0xFEE01000 + 8)
HYPERCALLS = st.sampled_from([int(h) for h in Hypercall] + [0, 1, 0x5654_00FF])
VALUES = st.one_of(U64, st.sampled_from([0, 1, 0xFF, 0x1FF, 0x800, 0xC00, 0x2_0000, 0x4_0000]))

EXITS = st.one_of(
    st.builds(m.ExitMsrRead, msr=st.one_of(INTERESTING_MSRS, st.integers(0, 2**32 - 1))),
    st.builds(
        m.ExitMsrWrite, msr=st.one_of(INTERESTING_MSRS, st.integers(0, 2**32 - 1)), value=VALUES
    ),
    st.builds(m.ExitMmioRead, gpa=APIC_GPA, size=st.integers(0, 255)),
    st.builds(m.ExitMmioWrite, gpa=APIC_GPA, size=st.integers(0, 255), value=VALUES),
    st.builds(m.ExitPioIn, port=st.integers(0x3E, 0x64), size=st.integers(0, 255)),
    st.builds(
        m.ExitPioOut,
        port=st.integers(0x3E, 0x64),
        size=st.integers(0, 255),
        value=st.integers(0, 2**32 - 1),
    ),
    st.builds(m.ExitHypercall, nr=HYPERCALLS, args=st.lists(VALUES, max_size=4)),
    st.builds(m.ExitHlt, pv_eoi=st.sampled_from([None, True])),
)


def machine_with_everything(vcpus: int = 3) -> Machine:
    machine = Machine(vcpus, TscModel(2_500_000, 0, 0), 0)
    for state in machine.vcpus:
        state.features = int(
            Feature.PVCLOCK | Feature.PV_TIMER | Feature.VMI | Feature.PV_EOI | Feature.PV_SEND_IPI
        )
    kvmclock = KvmClock(machine)
    pv = PvTimer(machine)
    kvmclock.add_listener(pv.on_republish)
    VmiAlarm(machine)
    Pit(machine)
    PvApic(machine)
    return machine


@settings(max_examples=300)
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 5_000_000), EXITS), min_size=1, max_size=40
    )
)
def test_random_exits_never_raise(steps) -> None:
    machine = machine_with_everything()
    now = 1_000_000
    for seq, (vcpu, dt, msg) in enumerate(steps, 1):
        now += dt
        result = machine.handle_exit(vcpu, seq, msg, now, unseen=False)
        assert isinstance(result.value, int)
        assert -(2**63) <= result.value < 2**64
        assert result.fault in (0, 6, 13)
        due = machine.next_deadline()
        if due is not None and due <= now:
            machine.on_timer(now)
        machine.take_actions()
