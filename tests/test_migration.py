"""Live migration end to end (issue 13): real host processes, real vCPU processes.

* a VM moves from one host process to another in the middle of a run, per timer mode,
  and every vCPU resumes there (the run's results come from the destination, with the
  ``blackout_*`` figures);
* a destination that dies during the transfer leaves the VM running on the source;
* a destination refuses a state blob of another format (and a wrong token), naming it,
  and keeps waiting.

The pure state layer (every device's save/restore) is tests/test_migration_state.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap

import cbor2
import pynng
import pytest
import trio

from tests.hostproc import VTICK, StandaloneHost
from vtick.host.lab.launcher import RunOptions, launch
from vtick.host.migration.channel import (
    PING,
    PONG,
    REFUSE,
    STATE,
    ChannelError,
    pack,
    unpack,
)

MODES = ["lapic-xapic", "lapic-periodic", "tsc-deadline", "pv-ktime", "vmi"]


def _migrated_run(mode: str, ipi: str | None = None) -> dict:
    opts = RunOptions(
        vcpus=2,
        duration_s=2.5,
        mode=mode,
        ipi=ipi,
        workload="ipi" if ipi else "timers",
        migrate_at_s=1.0,
    )
    return trio.run(launch, opts)


def _check_moved(results: dict) -> None:
    assert results["ok"], [v["link_errors"] for v in results["vcpus"]]
    mig = results["migration"]
    assert mig["role"] == "destination"
    assert mig["source"]["record"]["ok"] is True
    assert mig["source"]["ok"] is True
    # every vCPU moved: its report came to the destination and says it migrated once
    for v in results["vcpus"]:
        assert v["link_errors"] == []
        assert v["guest"] is not None
        assert v["guest"]["counters"]["migrations"] == 1
        # the source held back what arrived while frozen; nothing was lost: no link
        # error on either side, and the destination answered the rest
        assert v["host_exits"], "no exit was handled on the destination"
    assert 0 < results["blackout_ns"] < 2_000_000_000
    assert all(ns is not None and ns > 0 for ns in results["blackout_resume_ns"])
    assert results["blackout_state_bytes"] > 0
    assert results["blackout_phases_ns"]["freeze_to_ready"] > 0


@pytest.mark.parametrize("mode", MODES)
def test_vm_moves_to_another_host_per_timer_mode(mode: str) -> None:
    results = _migrated_run(mode)
    _check_moved(results)
    for v in results["vcpus"]:
        guest = v["guest"]
        assert guest["events"] > 0
        # guest time ran on through the move: the run's guest duration is the run's
        assert guest["duration_ns"] > 2_000_000_000
    # timers were in flight across the move, and their lateness is measured
    assert results["blackout_late_timers"] > 0
    assert results["blackout_late_max_ns"] > 0


def test_ipi_storm_survives_a_move() -> None:
    results = _migrated_run("pv-ktime", ipi="pv")
    _check_moved(results)
    counters = [v["guest"]["counters"] for v in results["vcpus"]]
    for c, v in zip(counters, results["vcpus"], strict=True):
        # every call completed or was cut off by the end: none timed out or failed
        # across the move (a csd or IPI lost in it would be a timeout here)
        assert c["smp_calls"] > 0
        assert c["csd_timeouts"] == 0
        assert c["csd_errors"] == 0
        assert c["ipi_failed_calls"] == 0
        # calls went on after the move
        assert c["migration_resumed_ns"] < v["guest"]["duration_ns"] + c["workload_started_ns"]
    # every csd sent was run, but for those the end of the run cut off (each cut-off
    # call leaves at most one csd per target unrun)
    sent = sum(c["csds_sent"] for c in counters)
    ran = sum(c["csds_run"] for c in counters)
    assert 0 <= sent - ran <= sum(c["smp_cut_off_calls"] for c in counters) * (len(counters) - 1)
    assert sum(v["relayed_stores"] for v in results["vcpus"]) > 0


FAKE_DESTINATION = textwrap.dedent(
    """
    import os, sys, pynng
    from vtick.host.migration.channel import PING, PONG, STATE, pack, unpack
    from vtick.proto.transport import monotonic_ns
    sock = pynng.Pair0(recv_max_size=64 << 20)
    sock.listen(sys.argv[1])
    print("READY", flush=True)
    while True:
        msg = unpack(sock.recv())
        if msg["m"] == PING:
            sock.send(pack({"m": PONG, "t": msg["t"], "host": monotonic_ns()}))
        elif msg["m"] == STATE:
            os._exit(9)  # dies in the middle of the transfer
    """
)


def test_destination_dying_during_transfer_leaves_the_vm_on_the_source() -> None:
    run_dir = tempfile.mkdtemp(prefix="vtick-test-")
    incoming = f"ipc://{run_dir}/incoming"
    fake = subprocess.Popen(
        [sys.executable, "-c", FAKE_DESTINATION, incoming],
        stdout=subprocess.PIPE,
        text=True,
    )
    host = None
    guests: list[subprocess.Popen] = []
    try:
        assert fake.stdout is not None
        assert fake.stdout.readline().startswith("READY")
        host = StandaloneHost(
            2,
            2.5,
            "--migrate-at",
            "1",
            "--migrate-to",
            incoming,
            "--migrate-timeout",
            "1",
        )
        guests = [host.guest(i) for i in range(2)]
        code, results, err = host.finish()
        assert fake.wait(timeout=10) == 9
        assert code == 0, err
        mig = results["migration"]
        assert mig["role"] == "source"
        assert mig["ok"] is False
        assert "no answer" in mig["error"], mig
        # the VM ran on here: every vCPU reported to the source, nothing lost
        assert results["ok"], [v["link_errors"] for v in results["vcpus"]]
        for v in results["vcpus"]:
            assert v["guest"] is not None
            assert v["link_errors"] == []
            assert "migrations" not in v["guest"]["counters"]
            assert v["frozen_frames"] >= 0
        for g in guests:
            assert g.wait(timeout=20) == 0
    finally:
        for g in guests:
            if g.poll() is None:
                g.kill()
            g.communicate()
        if fake.poll() is None:
            fake.kill()
        fake.communicate()
        if host is not None:
            host.cleanup()
        shutil.rmtree(run_dir, ignore_errors=True)


def _state_message(token: bytes, blob: bytes) -> dict:
    return {
        "m": STATE,
        "token": token,
        "offset": 0,
        "frozen_at": 1,
        "started_at": 1,
        "remaining_ns": 1_000_000_000,
        "config": {
            "vcpus": 1,
            "workload": "timers",
            "mode": "pv-ktime",
            "hz": 1000,
            "seed": 1,
            "params": {},
            "max_message": 65536,
        },
        "links": [],
        "online": b"\x00",
        "state": blob,
    }


def test_destination_refuses_another_format_and_a_wrong_token() -> None:
    run_dir = tempfile.mkdtemp(prefix="vtick-test-")
    incoming = f"ipc://{run_dir}/incoming"
    token = os.urandom(32)
    dest = subprocess.Popen(
        [
            *VTICK,
            "host",
            "--incoming",
            incoming,
            "--listen",
            f"ipc://{run_dir}/dest",
            "--connect-timeout",
            "30",
        ],
        env=dict(os.environ, VTICK_TOKEN=token.hex()),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert dest.stdout is not None
        assert dest.stdout.readline().startswith("READY")
        with pynng.Pair0(recv_timeout=10_000, recv_max_size=1 << 20) as sock:
            sock.dial(incoming, block=True)
            sock.send(pack({"m": PING, "token": token, "t": 5}))
            pong = unpack(sock.recv())
            assert pong["m"] == PONG
            assert pong["t"] == 5
            # a blob written by another version of vtick
            blob = cbor2.dumps({"format": 2, "vtick": "9.9", "vcpus": 1})
            sock.send(pack(_state_message(token, blob)))
            refused = unpack(sock.recv())
            assert refused["m"] == REFUSE
            assert "format 2; this vtick reads format 1" in refused["reason"]
            # garbage that is not CBOR at all
            sock.send(pack(_state_message(token, b"\xff\x00garbage")))
            refused = unpack(sock.recv())
            assert refused["m"] == REFUSE
            assert "CBOR" in refused["reason"]
            # the run's secret is checked first
            sock.send(pack({"m": PING, "token": bytes(32), "t": 6}))
            refused = unpack(sock.recv())
            assert refused == {"m": REFUSE, "reason": "wrong token"}
            # and the destination still waits for a VM
            sock.send(pack({"m": PING, "token": token, "t": 7}))
            assert unpack(sock.recv())["t"] == 7
        dest.send_signal(signal.SIGTERM)
        _, err = dest.communicate(timeout=10)
        assert "interrupted by SIGTERM while waiting for a VM" in err
        assert os.listdir(run_dir) == []  # the incoming socket is gone
    finally:
        if dest.poll() is None:
            os.killpg(dest.pid, signal.SIGKILL)
            dest.communicate()
        shutil.rmtree(run_dir, ignore_errors=True)


def test_channel_refuses_malformed_messages() -> None:
    with pytest.raises(ChannelError, match="not CBOR"):
        unpack(b"\xff")
    with pytest.raises(ChannelError, match="expected a map"):
        unpack(cbor2.dumps([1, 2]))
    with pytest.raises(ChannelError, match="unknown migration channel message"):
        unpack(cbor2.dumps({"m": 99}))
    with pytest.raises(ChannelError, match="token"):
        unpack(cbor2.dumps({"m": PING, "token": b"short", "t": 1}))
    with pytest.raises(ChannelError, match="refusing to send"):
        pack({"m": PONG, "t": -1, "host": 0})


def test_a_vcpu_keeps_its_tsc_when_the_destination_clock_has_another_origin() -> None:
    """The destination's TSC epoch is the source's moved by d (its CLOCK_MONOTONIC
    differs by d): the vCPU's TSC must not step, and the destination's clock lines (in
    its own domain) must not make the discipline slew d away."""
    import dataclasses

    from vtick.guest.clocksync import ClockDiscipline, DisciplinedTsc, TscSync
    from vtick.guest.vcpu import GuestConfig, GuestVcpu
    from vtick.proto import messages as m
    from vtick.proto.pvclock import TscModel
    from vtick.proto.transport import monotonic_ns

    khz, epoch, d = 2_500_000, 1_000_000_000, 7_000_000_000
    # (the discipline never goes back, so every read below is at or after the last)
    vcpu = GuestVcpu(GuestConfig(connect="ipc:///unused", vcpu=0, token=bytes(32)))
    welcome = m.Welcome(
        version=1,
        features=int(vcpu.cfg.features),
        vcpu=0,
        vcpus=1,
        session=7,
        max_message=65536,
        tsc_khz=khz,
        tsc_epoch=epoch,
        pvclock=TscModel(khz, epoch, epoch).publish(epoch + 10**9, version=2).to_wire(),
        workload="timers",
        seed=1,
        params={},
    )
    vcpu._on_welcome(welcome)
    vcpu.discipline = ClockDiscipline(0)  # as sync_clock leaves it on one machine
    vcpu.tsc = DisciplinedTsc(khz, epoch, vcpu.discipline)
    source_tsc = TscModel(khz, epoch, epoch)
    now = monotonic_ns()
    assert vcpu.tsc.tsc(now) == source_tsc.tsc(now)
    # the destination: same guest TSC, its own clock d ahead
    dest = TscModel(khz, epoch + d, epoch + d)
    vcpu.migrating_to = "ipc:///dest"
    vcpu._on_welcome(
        dataclasses.replace(
            welcome,
            tsc_epoch=epoch + d,
            pvclock=dest.publish(epoch + d + 2 * 10**9, version=4).to_wire(),
            resumed=True,
        )
    )
    assert vcpu.migrations == 1
    assert vcpu.migrating_to is None
    later = monotonic_ns()
    assert vcpu.tsc.tsc(later) == source_tsc.tsc(later)  # no step
    # the destination's line for this machine: host' = local + d, exactly right
    sync = TscSync(at=6 * 10**9, offset=d, ppb=0, bound=0)
    vcpu._on_message(m.Pvclock(info=dest.publish(epoch + d, 6).to_wire(), tsc_sync=sync.to_wire()))
    assert vcpu.discipline.largest_step == 0  # nothing to slew
    future = monotonic_ns() + 3 * 10**9
    assert vcpu.tsc.tsc(future) == source_tsc.tsc(future)
