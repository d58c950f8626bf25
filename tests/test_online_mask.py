"""cpu_online_mask as one page the host holds (docs/protocol.md §4.6): O(N) messages.

A vCPU that comes online stores its bit with one ``cpu-online``; the host sends each vCPU
whose view is stale the whole page in ``online-mask``, coalesced by its link housekeeping
tick, and the current page right after every welcome.  Pure where it can be (the
bitmap, the guest's ``Smp``, the host's ``OnlineMask``, all with integer time); the
host's wiring is driven through a real :class:`Host` whose links write to fake
endpoints (no process, no socket), with the time passed in.

Each planted bug named below makes a test here fail (checked by the ``*_is_caught``
tests): a host that marks no view stale when the mask changes (the mutation
``online-mask-stale``), one that forgets the mask at welcome, one that ignores the
hold-off.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from test_guest_smp import drive as drive_op

from vtick.guest.apic import X2ApicOps
from vtick.guest.smp import Smp
from vtick.guest.vcpu import GuestConfig, GuestFatal, GuestVcpu
from vtick.host.migration.channel import pack, unpack
from vtick.host.migration.destination import _restore
from vtick.host.migration.source import _save, _state_message
from vtick.host.migration.state import MigrationError, encode_state
from vtick.host.mutations import Mutations
from vtick.host.onlinemask import OnlineMask, holdoff_for
from vtick.host.server import LINK_TICK_NS, NEVER, Host, HostConfig, LinkState, VcpuLink
from vtick.proto import messages as m
from vtick.proto.codec import decode, encode
from vtick.proto.cpumask import decode_mask, encode_mask, mask_cpus, mask_size
from vtick.proto.transport import monotonic_ns

TICK = LINK_TICK_NS
T0 = 5_000_000_000
TOKEN = bytes(range(32))
FULL = "full"


# ---------------------------------------------------------------------- the bitmap


def test_the_mask_is_linux_bitmap_bytewise_and_exactly_the_vms_size() -> None:
    assert mask_size(1) == 1
    assert mask_size(8) == 1
    assert mask_size(9) == 2
    assert mask_size(256) == 32
    assert encode_mask(0b1_0000_0001, 9) == b"\x01\x01"  # vCPU 8 is bit 0 of byte 1
    assert decode_mask(b"\x01\x01", 9) == 0b1_0000_0001
    assert mask_cpus(0b1_0000_0101) == {0, 2, 8}
    for bits in (0, 1, (1 << 256) - 1, 1 << 255):
        assert decode_mask(encode_mask(bits, 256), 256) == bits


@pytest.mark.parametrize(
    ("data", "ncpus", "says"),
    [
        (b"\x00\x00", 8, "online-mask of 2 bytes; a VM of 8 vCPUs has a 1-byte mask"),
        (b"", 4, "online-mask of 0 bytes"),
        (b"\x10", 4, "online-mask sets vCPU 4; the VM has 4 (0..3)"),
        (b"\x00\x80", 9, "online-mask sets vCPU 15; the VM has 9 (0..8)"),
    ],
)
def test_a_mask_longer_than_the_vm_is_refused_saying_why(data: bytes, ncpus: int, says) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        decode_mask(data, ncpus)
    with pytest.raises(ValueError, match=f"has a bit beyond vCPU {ncpus - 1}"):
        encode_mask(1 << ncpus, ncpus)


# ---------------------------------------------------------------------- the guest's view


class Clock:
    now = 1_000_000

    def __call__(self) -> int:
        return self.now


def drive(op: Any) -> tuple[list[m.Message], list[m.Message]]:
    """Run an op: exits answered with 0; returns (stores, exits)."""
    _, stores, exits = drive_op(op)
    return stores, exits


def test_a_cpu_announces_itself_with_one_store_whatever_the_vm_size() -> None:
    smp = Smp(5, 256, X2ApicOps(5, 256), Clock())
    stores, exits = drive(smp.announce_online())
    assert stores == [m.CpuOnline(cpu=5)]
    assert exits == []


def test_the_guest_reads_the_mask_and_keeps_itself_online() -> None:
    smp = Smp(1, 4, X2ApicOps(1, 4), Clock())
    assert smp.online == {1}
    smp.on_online_mask(encode_mask(0b0101, 4))  # its own store not read back yet
    assert smp.online == {0, 1, 2}
    smp.on_online_mask(encode_mask(0b1111, 4))
    assert smp.online == {0, 1, 2, 3}


def test_calls_target_only_the_online_cpus_and_allbut_waits_for_all_of_them() -> None:
    """Linux enables IPI shorthands once every present CPU booted: the ALLBUT shortcut
    is taken only when the mask is full, a mask send before."""
    smp = Smp(0, 4, X2ApicOps(0, 4), Clock())
    smp.on_online_mask(encode_mask(0b0111, 4))  # vCPU 3 not up yet
    stores, exits = drive(smp.call_function("noop", 0, wait=False))
    assert [s.dst for s in stores if isinstance(s, m.Csd)] == [1, 2]
    assert smp.stats.shortcut_ipis == 0
    assert len(exits) == 2  # x2APIC: one ICR write per destination
    smp.on_online_mask(encode_mask(0b1111, 4))
    smp.outstanding.clear()  # the targets unlocked (async csds)
    stores, exits = drive(smp.call_function("noop", 0, wait=False))
    assert [s.dst for s in stores if isinstance(s, m.Csd)] == [1, 2, 3]
    assert smp.stats.shortcut_ipis == 1
    assert len(exits) == 1  # one ALLBUT ICR write


def test_a_malformed_mask_is_a_protocol_error_the_guest_reports() -> None:
    smp = Smp(0, 4, X2ApicOps(0, 4), Clock())
    with pytest.raises(ValueError, match="sets vCPU 4"):
        smp.on_online_mask(b"\x1f")
    assert smp.online == {0}  # nothing taken from it
    vcpu = GuestVcpu(GuestConfig(connect="ipc:///unused", vcpu=0, token=TOKEN))
    vcpu.welcome = _welcome(vcpu=0, vcpus=4)
    vcpu._on_message(m.OnlineMask(mask=b"\x03"))  # before the kernel: kept for the boot
    assert vcpu._early_mask == b"\x03"
    for bad, says in [(b"\x00\x00", "2 bytes"), (b"\x80", "sets vCPU 7")]:
        with pytest.raises(GuestFatal, match=f"vCPU 0: bad online-mask from host: .*{says}") as e:
            vcpu._on_message(m.OnlineMask(mask=bad))
        assert e.value.status == 4


def _welcome(vcpu: int, vcpus: int) -> m.Welcome:
    info = {
        "version": 2,
        "tsc_timestamp": 0,
        "system_time": 0,
        "tsc_to_system_mul": 1 << 31,
        "tsc_shift": 0,
        "flags": 0,
    }
    return m.Welcome(
        version=1,
        features=0,
        vcpu=vcpu,
        vcpus=vcpus,
        session=1,
        max_message=65536,
        tsc_khz=2_500_000,
        tsc_epoch=0,
        pvclock=info,
        workload="timers",
        seed=1,
    )


# ---------------------------------------------------------------------- the host's page (pure)


def everyone_up(vcpu: int) -> bool:
    return True


def test_vcpus_coming_up_in_one_tick_cost_n_stores_and_at_most_n_masks() -> None:
    n = 256
    page = OnlineMask(n, holdoff_for(n, TICK))
    for cpu in range(n):
        assert page.welcomed(cpu, T0) is None  # nobody online yet: nothing to send
    for cpu in range(n):
        page.store(cpu, cpu)
    sent = page.due(T0 + TICK, everyone_up)
    assert page.stats.stores == n
    assert len(sent) <= n
    assert all(decode_mask(mask, n) == (1 << n) - 1 for _, mask in sent)
    assert page.due(T0 + 2 * TICK, everyone_up) == []  # nothing stale any more
    assert not page.pending()


def test_a_boot_spread_over_time_costs_o_n_not_n_squared() -> None:
    """One vCPU per tick for N ticks: each link gets at most one mask per hold-off, and
    the full mask at once."""
    n = 256
    holdoff = holdoff_for(n, TICK)
    assert holdoff == 16 * TICK
    page = OnlineMask(n, holdoff)
    masks = 0
    for cpu in range(n):
        now = T0 + cpu * TICK
        page.store(cpu, cpu)
        masks += len(page.due(now + TICK, everyone_up))
    boot = n * TICK
    assert masks <= n * (2 + boot // holdoff)  # 256 * 18 = 4 608 ...
    assert masks < n * (n - 1) // 10  # ... where relaying each store cost 65 280
    assert page.full
    assert not page.pending()


def test_only_online_vcpus_read_the_mask() -> None:
    """A CPU still booting does not read cpu_online_mask: only online views go stale,
    and a vCPU's own store brings it the page as it stands."""
    page = OnlineMask(3)
    page.store(0, 0)
    assert page.due(T0, everyone_up) == []  # vCPU 0 reads its own store back
    page.store(1, 1)
    assert page.due(T0 + TICK, everyone_up) == [(0, b"\x03"), (1, b"\x03")]
    assert page.welcomed(2, T0 + TICK) == b"\x03"  # a booting vCPU: at its welcome


def test_the_full_mask_goes_out_at_the_next_tick_hold_off_or_not() -> None:
    page = OnlineMask(4, holdoff_ns=100 * TICK)
    page.store(0, 0)
    page.store(1, 1)
    assert page.due(T0, everyone_up) == [(0, b"\x03"), (1, b"\x03")]
    page.store(2, 2)
    # vCPU 2 was never sent the page: at once; 0 and 1 got one a tick ago: held off
    assert page.due(T0 + TICK, everyone_up) == [(2, b"\x07")]
    assert page.pending()
    page.store(3, 3)  # now every vCPU is online: ALLBUT becomes possible
    assert page.due(T0 + 2 * TICK, everyone_up) == [(v, b"\x0f") for v in range(4)]
    assert not page.pending()
    page.store(0, 0)  # a replaced process stores its bit again: nothing changes
    assert not page.pending()


def test_a_forged_or_out_of_range_store_is_refused_and_changes_nothing() -> None:
    page = OnlineMask(4)
    with pytest.raises(ValueError, match="cpu-online for vCPU 2 refused: vCPU 1 stores only"):
        page.store(1, 2)
    with pytest.raises(ValueError, match="cpu-online for vCPU 9 refused: the VM has 4"):
        page.store(9, 9)
    assert page.bits == 0
    assert not page.pending()
    assert page.stats.refused == 2


def test_a_view_on_a_link_that_is_down_waits_for_its_welcome() -> None:
    page = OnlineMask(3)
    page.store(0, 0)
    page.store(1, 1)
    assert page.due(T0, lambda vcpu: vcpu != 1) == [(0, b"\x03")]
    assert not page.pending()  # vCPU 1 is not kept stale: its welcome brings the page
    assert page.welcomed(1, T0 + TICK) == b"\x03"


@pytest.mark.parametrize("planted", [False, True])
def test_a_page_that_marks_no_view_stale_is_caught(planted: bool) -> None:
    page = OnlineMask(8, mutations=Mutations(["online-mask-stale"] if planted else []))
    for cpu in range(8):
        page.store(cpu, cpu)
    sent = page.due(T0, everyone_up)
    assert (len(sent) == 8) is not planted


# ---------------------------------------------------------------------- the host's wiring


class FakeEp:
    """A link endpoint that keeps what the host sends (frames, in order)."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send(self, frames: list[bytes]) -> None:
        self.frames += frames

    def pending(self) -> int:
        return 0

    def close(self) -> None:
        pass


class FakePipe:
    def __init__(self, id: int) -> None:
        self.id = id


def masks(vl: VcpuLink) -> list[int]:
    """The online-mask frames a vCPU got, once each (retransmissions dropped), decoded."""
    seen: dict[int, int] = {}
    for data in vl.ep.frames:
        frame = decode(data)
        if isinstance(frame.msg, m.OnlineMask):
            seen[frame.seq] = decode_mask(frame.msg.mask, len(vl.host.links))
    return [seen[s] for s in sorted(seen)]


def first_sequenced(vl: VcpuLink) -> list[m.Message]:
    return [decode(d).msg for d in vl.ep.frames]


@contextmanager
def host_of(vcpus: int, mutations: tuple[str, ...] = ()) -> Iterator[Host]:
    cfg = HostConfig(
        listen="ipc:///unused", vcpus=vcpus, token=TOKEN, announce=False, mutations=mutations
    )
    host = Host(cfg)
    try:
        host.links = [VcpuLink(host, i, FakeEp()) for i in range(vcpus)]  # type: ignore[arg-type]
        host._housekeeping_at = NEVER  # the timer loop's first pass found nothing to do
        yield host
    finally:
        host.close()


async def hello(vl: VcpuLink, now: int, resume: int | None = None, ack: int = 0) -> None:
    msg = m.Hello(
        version=1, features=0, vcpu=vl.vcpu, token=TOKEN, pid=1000 + vl.vcpu, resume=resume
    )
    await vl._handshake(encode(msg, 0, ack), FakePipe(100 + vl.vcpu), now)  # type: ignore[arg-type]


async def online(host: Host, cpu: int, now: int, src: int | None = None) -> None:
    """vCPU ``src`` (default ``cpu``) sends cpu-online {cpu} (through the link dispatch)."""
    vl = host.links[cpu if src is None else src]
    pipe = FakePipe(100 + vl.vcpu)
    await vl._dispatch(m.CpuOnline(cpu=cpu), b"", pipe, now)  # type: ignore[arg-type]


async def test_the_host_sends_one_mask_per_link_per_tick_and_a_late_vcpu_gets_it_at_welcome() -> (
    None
):
    n = 16
    with host_of(n) as host:
        t0 = monotonic_ns()
        for vl in host.links[:-1]:
            await hello(vl, t0)
        assert all(masks(vl) == [] for vl in host.links)  # nothing online: no mask
        for cpu in range(n - 1):
            await online(host, cpu, t0 + 1000)
        # the store scheduled the housekeeping tick that sends the masks
        assert host._housekeeping_at == t0 + 1000 + TICK
        host._link_housekeeping(t0 + 1000 + TICK)
        up = (1 << (n - 1)) - 1
        assert [masks(vl) for vl in host.links[:-1]] == [[up]] * (n - 1)
        assert sum(len(masks(vl)) for vl in host.links) <= n - 1  # N masks + N stores
        host._link_housekeeping(t0 + 2 * TICK)
        assert [len(masks(vl)) for vl in host.links[:-1]] == [1] * (n - 1)  # no repeats
        # the last vCPU connects late: the page comes right after its welcome
        late = host.links[-1]
        await hello(late, t0 + 3 * TICK)
        kinds = [type(msg) for msg in first_sequenced(late)]
        assert kinds[:2] == [m.Welcome, m.OnlineMask]
        assert masks(late) == [up]
        await online(host, n - 1, t0 + 3 * TICK)
        host._link_housekeeping(t0 + 4 * TICK)  # full: no hold-off
        assert [masks(vl)[-1] for vl in host.links[:-1]] == [(1 << n) - 1] * (n - 1)
        assert masks(late) == [up]  # it read back its own store: nothing to send
        assert all(vl.errors == [] for vl in host.links)
        assert host.results(t0)["online_mask"] == {
            "stores": n,
            "refused": 0,
            "welcome_masks": 1,
            "tick_masks": 2 * (n - 1),
        }


async def test_a_forged_store_is_refused_on_its_link_and_the_host_goes_on() -> None:
    with host_of(3) as host:
        t0 = monotonic_ns()
        for vl in host.links:
            await hello(vl, t0)
        await online(host, 0, t0)
        await online(host, 1, t0)
        await online(host, 2, t0, src=0)  # vCPU 0 claims vCPU 2 is online
        await online(host, 7, t0, src=1)  # no such vCPU
        assert host.links[0].errors == [
            "cpu-online for vCPU 2 refused: vCPU 0 stores only its own bit"
        ]
        assert host.links[1].errors == ["cpu-online for vCPU 7 refused: the VM has 3"]
        assert host.online.bits == 0b011
        host._link_housekeeping(t0 + TICK)
        assert [masks(vl) for vl in host.links] == [[0b011], [0b011], []]
        await online(host, 2, t0 + TICK)  # the real one
        host._link_housekeeping(t0 + 2 * TICK)
        assert [masks(vl) for vl in host.links] == [[0b011, 0b111]] * 2 + [[0b111]]
        assert all(vl.state is LinkState.OPEN for vl in host.links)


async def test_a_resumed_session_gets_the_page_again() -> None:
    with host_of(2) as host:
        t0 = monotonic_ns()
        a, b = host.links
        await hello(a, t0)
        await hello(b, t0)
        await online(host, 0, t0)
        await online(host, 1, t0)
        host._link_housekeeping(t0 + TICK)
        assert masks(b) == [0b11]
        b.ep.frames.clear()
        await hello(b, t0 + 2 * TICK, resume=b.session, ack=b.link.send_next - 1)
        assert masks(b) == [0b11]
        assert b.errors == []


async def test_a_host_that_forgets_to_mark_the_links_is_caught() -> None:
    """The planted bug ``online-mask-stale``: the others never hear of the new CPU."""
    with host_of(4, mutations=("online-mask-stale",)) as host:
        t0 = monotonic_ns()
        for vl in host.links:
            await hello(vl, t0)
        for cpu in range(4):
            await online(host, cpu, t0)
        host._link_housekeeping(t0 + TICK)
        got = [masks(vl) for vl in host.links]
    assert got != [[0b1111]] * 4  # what the test above demands of a correct host
    assert got == [[]] * 4


async def test_a_host_that_forgets_the_page_at_welcome_is_caught(monkeypatch) -> None:
    with host_of(2) as host:
        t0 = monotonic_ns()
        await hello(host.links[0], t0)
        await online(host, 0, t0)
        host._link_housekeeping(t0 + TICK)
        monkeypatch.setattr(OnlineMask, "welcomed", lambda self, vcpu, now: None)
        await hello(host.links[1], t0 + 2 * TICK)
        host._link_housekeeping(t0 + 3 * TICK)
        assert masks(host.links[1]) == []  # the late vCPU never reads vCPU 0's bit


def test_a_page_that_ignores_the_hold_off_is_caught(monkeypatch) -> None:
    """Without the hold-off a boot spread over N ticks costs about N^2 / 2 masks: the
    bound of test_a_boot_spread_over_time_costs_o_n_not_n_squared fails."""
    n = 256
    page = OnlineMask(n, holdoff_ns=0)  # the planted bug: no hold-off
    total = 0
    for cpu in range(n):
        page.store(cpu, cpu)
        total += len(page.due(T0 + (cpu + 1) * TICK, everyone_up))
    assert total > n * (2 + n * TICK // holdoff_for(n, TICK))


# ---------------------------------------------------------------------- live migration


async def test_the_mask_moves_with_the_vm_and_each_vcpu_reads_it_on_resuming() -> None:
    with host_of(3) as src:
        t0 = monotonic_ns()
        for vl in src.links:
            await hello(vl, t0)
        await online(src, 0, t0)
        await online(src, 2, t0)
        src.freeze()
        blob = encode_state(_save(src, t0 + TICK))
        msg = unpack(pack(_state_message(src, blob, 0, t0 + TICK, t0 + 10**9)))
        assert msg["online"] == b"\x05"
        sessions = [vl.session for vl in src.links]
        acks = [vl.link.send_next - 1 for vl in src.links]
    cfg = HostConfig(listen="ipc:///unused", vcpus=0, token=TOKEN, announce=False)
    dest, prepare, _, _ = _restore(cfg, msg)
    try:
        assert dest.online.bits == 0b101
        dest.links = [VcpuLink(dest, i, FakeEp()) for i in range(3)]  # type: ignore[arg-type]
        prepare(dest)
        for vl in dest.links:
            await hello(vl, t0 + 2 * TICK, resume=sessions[vl.vcpu], ack=acks[vl.vcpu])
            assert masks(vl)[-1] == 0b101, vl.vcpu
            assert vl.errors == []
    finally:
        dest.close()


@pytest.mark.parametrize(
    ("wire", "says"),
    [(b"\x00\x00", "cpu_online_mask: online-mask of 2 bytes"), (b"\x08", "sets vCPU 3")],
)
async def test_a_mask_that_does_not_fit_the_vm_is_refused(wire: bytes, says: str) -> None:
    with host_of(3) as src:
        t0 = monotonic_ns()
        for vl in src.links:
            await hello(vl, t0)
        src.freeze()
        blob = encode_state(_save(src, t0))
        msg = _state_message(src, blob, 0, t0, t0 + 10**9) | {"online": wire}
    cfg = HostConfig(listen="ipc:///unused", vcpus=0, token=TOKEN, announce=False)
    with pytest.raises(MigrationError, match=says):
        _restore(cfg, unpack(pack(msg)))
