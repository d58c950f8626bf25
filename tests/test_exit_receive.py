"""Issue 9: the exit path's receive, and the IPI workload's wait for every CPU.

A vCPU waiting for an exit's reply reads it itself instead of waking a second task per
reply (``GuestVcpu._await_reply``); the receive loop takes over before any other wait
and gives the receiving back at the next exit.  The endpoint receives through nng's own
calls (``PairEndpoint.try_recv``), finding each frame's pipe in pynng's table.  These
tests drive a real ``GuestVcpu`` over a real Pair0 socket against a scripted host end
built from the link layer, so every frame is checked in order and none may be lost or
handled twice across the hand-overs.
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import pynng
import pytest
import trio

from vtick.guest.apic import X2ApicOps
from vtick.guest.smp import Smp
from vtick.guest.vcpu import ALL_ONLINE_S, ALL_ONLINE_STALL_S, GuestConfig, GuestVcpu
from vtick.proto import messages as m
from vtick.proto.codec import DEFAULT_MAX_MESSAGE
from vtick.proto.cpumask import encode_mask
from vtick.proto.faultshim import FaultShim
from vtick.proto.link import Link
from vtick.proto.transport import PairEndpoint, monotonic_ns

TIMEOUT_S = 10


class ScriptedHost:
    """The host end of one link: answers each exit with ``injects_per_exit`` injections
    first (as a host sends what an exit raised before its reply), then the reply."""

    def __init__(self, ep: PairEndpoint, injects_per_exit: int = 1) -> None:
        self.ep = ep
        self.link = Link(name="scripted host", max_message=DEFAULT_MAX_MESSAGE)
        self.injects_per_exit = injects_per_exit
        self.exits: list[int] = []
        self.next_vector = 0x40

    def inject(self) -> None:
        self.link.send(m.Inject(vector=self.next_vector, host_time=monotonic_ns()), 0)
        self.next_vector += 1
        self.ep.send(self.link.data_to_send())

    async def serve(self) -> None:
        while True:
            data, _pipe = await self.ep.recv()
            for msg in self.link.receive(data, monotonic_ns()):
                if isinstance(msg, m.ExitMessage):
                    seq = self.link.recv_next - 1
                    self.exits.append(seq)
                    for _ in range(self.injects_per_exit):
                        self.inject()
                    self.link.send(m.ExitReply(re=seq, value=seq * 10, fault=0, host_ns=1), 0)
                    self.ep.send(self.link.data_to_send())


@asynccontextmanager
async def linked(
    tmp: pathlib.Path, injects_per_exit: int = 1
) -> AsyncIterator[tuple[GuestVcpu, ScriptedHost]]:
    """A real GuestVcpu past its handshake, dialled to a scripted host end, with both
    receiving; everything is closed afterwards."""
    url = f"ipc://{tmp}/link.0"
    host_ep = PairEndpoint.listen(url, DEFAULT_MAX_MESSAGE)
    vcpu = GuestVcpu(GuestConfig(connect=f"ipc://{tmp}/link", vcpu=0, token=b"t" * 32))
    vcpu.ep = PairEndpoint.dial(url, DEFAULT_MAX_MESSAGE)
    # past the handshake: _on_frame takes every frame as the session's
    vcpu.welcome = cast(m.Welcome, object())
    host = ScriptedHost(host_ep, injects_per_exit)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(host.serve)
            nursery.start_soon(vcpu.receive_loop)
            await _until(lambda: bool(host_ep.sock.pipes))
            yield vcpu, host
            nursery.cancel_scope.cancel()
    finally:
        vcpu.ep.close()
        host_ep.close()


async def _until(predicate: object) -> None:
    assert callable(predicate)
    with trio.fail_after(TIMEOUT_S):
        while not predicate():  # noqa: ASYNC110 (a condition of other processes' sockets)
            await trio.sleep(0.002)


async def test_exits_read_their_replies_and_every_frame_before_them(
    private_tmp: pathlib.Path,
) -> None:
    async with linked(private_tmp, injects_per_exit=2) as (vcpu, host):
        # before any exit the receive loop receives
        host.inject()
        await _until(lambda: len(vcpu.pending) == 1)
        assert not vcpu._exit_rx
        handled_by: list[trio.lowlevel.Task] = []
        on_frame = vcpu._on_frame

        def recording(data: bytes) -> None:
            handled_by.append(trio.lowlevel.current_task())
            on_frame(data)

        vcpu._on_frame = recording  # type: ignore[method-assign]
        # the first exit takes the receiving over from the parked loop (cancelled wait)
        for i in range(20):
            with trio.fail_after(TIMEOUT_S):
                reply = await vcpu.exit(m.ExitHypercall(nr=1, args=[i]))
            assert reply.re == host.exits[-1]
            assert reply.value == reply.re * 10
            assert vcpu._exit_rx
        # the exits' own task read every frame: no second task woke for a reply
        assert set(handled_by) == {trio.lowlevel.current_task()}
        assert len(handled_by) == 3 * 20
        # every injection arrived once, in order, the ones sent before each reply included
        assert [p[0] for p in vcpu.pending] == list(range(0x40, 0x40 + 1 + 2 * 20))
        # handed back: what arrives now is taken by the receive loop, with no exit
        vcpu.give_rx()
        host.inject()
        await _until(lambda: len(vcpu.pending) == 42)
        # and taken over again by the next exit
        with trio.fail_after(TIMEOUT_S):
            reply = await vcpu.exit(m.ExitHypercall(nr=1, args=[99]))
        assert reply.re == host.exits[-1]
        assert len(vcpu.pending) == 44
        assert vcpu.link.stats.duplicates == 0


async def test_frames_queued_between_exits_are_drained_without_waiting(
    private_tmp: pathlib.Path,
) -> None:
    async with linked(private_tmp, injects_per_exit=0) as (vcpu, host):
        with trio.fail_after(TIMEOUT_S):
            await vcpu.exit(m.ExitHypercall(nr=1, args=[]))
        # the vCPU's task owns the receiving: nobody waits on the socket now
        for _ in range(5):
            host.inject()
        await trio.sleep(0.1)
        assert not vcpu.pending
        vcpu._drain_rx()  # what run_kernel does before it yields between calls
        assert [p[0] for p in vcpu.pending] == list(range(0x40, 0x45))


async def test_try_recv_names_the_pipe_and_never_waits(private_tmp: pathlib.Path) -> None:
    url = f"ipc://{private_tmp}/rx"
    ep = PairEndpoint.listen(url, DEFAULT_MAX_MESSAGE)
    with pynng.Pair0(dial=url) as peer:
        assert ep.try_recv() is None
        assert ep.try_recv_bytes() is None
        for i in range(3):
            peer.send(bytes([i]) * 10)
        with trio.fail_after(TIMEOUT_S):
            await ep.wait_recv()
        got = ep.try_recv()
        assert got is not None
        assert got[0] == b"\x00" * 10
        assert got[1].id == ep.sock.pipes[0].id
        await _until(lambda: ep.pending())
        assert ep.try_recv_bytes() == b"\x01" * 10
        # a frame whose pipe is not in pynng's table (read after it went): still named
        ep.sock._pipes.clear()
        await _until(lambda: ep.pending())
        got = ep.try_recv()
        assert got is not None
        assert got[0] == b"\x02" * 10
        assert got[1].id == ep.sock.pipes[0].id
        assert ep.try_recv() is None
    ep.close()
    with pytest.raises(pynng.Closed):
        ep.try_recv()
    with pytest.raises(pynng.Closed):
        ep.try_recv_bytes()


async def test_try_recv_without_pynngs_pipe_table(private_tmp: pathlib.Path) -> None:
    url = f"ipc://{private_tmp}/rx"
    ep = PairEndpoint.listen(url, DEFAULT_MAX_MESSAGE)
    ep._pipe_table = False  # as on a pynng whose private pipe table is gone
    with pynng.Pair0(dial=url) as peer:
        assert ep.try_recv() is None
        peer.send(b"frame")
        with trio.fail_after(TIMEOUT_S):
            await ep.wait_recv()
        got = ep.try_recv()
        assert got is not None
        assert got[0] == b"frame"
        assert got[1].id > 0
    ep.close()


async def test_fault_shim_wait_keeps_the_frame_it_took(private_tmp: pathlib.Path) -> None:
    url = f"ipc://{private_tmp}/shim"
    inner = PairEndpoint.listen(url, DEFAULT_MAX_MESSAGE)
    shim = FaultShim(inner, [], seed=1)
    with pynng.Pair0(dial=url) as peer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(shim.run_sender)
            assert shim.try_recv_bytes() is None
            with trio.move_on_after(0.05):
                await shim.wait_recv()  # cancelled with nothing taken
            peer.send(b"one")
            peer.send(b"two")
            with trio.fail_after(TIMEOUT_S):
                await shim.wait_recv()
                await shim.wait_recv()  # a second wait keeps the first frame
            assert shim.pending()
            assert shim.try_recv_bytes() == b"one"
            with trio.fail_after(TIMEOUT_S):
                data, _pipe = await shim.recv()
            assert data == b"two"
            assert shim.try_recv() is None
            nursery.cancel_scope.cancel()
    inner.close()


class _Kernel:
    """What the wait for the other CPUs reads of a kernel: its smp state."""

    def __init__(self, smp: Smp) -> None:
        self.smp = smp


@pytest.mark.parametrize("others_come_up", [True, False])
async def test_an_ipi_workload_waits_for_every_cpu_and_not_for_a_dead_one(
    private_tmp: pathlib.Path, others_come_up: bool
) -> None:
    smp = Smp(0, 3, X2ApicOps(0, 3), monotonic_ns)
    kernel = _Kernel(smp)

    async def boot_the_others(host: ScriptedHost) -> None:
        for bits in (0b011, 0b111):  # vCPU 1, then vCPU 2 comes online
            await trio.sleep(0.1)
            host.link.send(m.OnlineMask(mask=encode_mask(bits, 3)), 0)
            host.ep.send(host.link.data_to_send())

    async with linked(private_tmp) as (vcpu, host), trio.open_nursery() as nursery:
        vcpu.kernel = cast(Any, kernel)
        if others_come_up:
            nursery.start_soon(boot_the_others, host)
        with trio.fail_after(TIMEOUT_S):
            await vcpu._wait_for_all_cpus(cast(Any, kernel))
    if others_come_up:
        assert smp.online == {0, 1, 2}
        assert 0.15e9 < vcpu.all_online_wait_ns < ALL_ONLINE_STALL_S * 1e9
    else:
        # nobody else comes up: the workload starts after the stall window
        assert smp.online == {0}
        assert vcpu.all_online_wait_ns >= ALL_ONLINE_STALL_S * 1e9
        assert vcpu.all_online_wait_ns < ALL_ONLINE_S * 1e9
