"""The source side of a live migration (issue 13): freeze, copy, hand over, step back.

Theory of operation
-------------------
1. **Clock offset first.**  While the VM still runs, the source pings the destination a
   few times (``mig-ping``/``mig-pong``) and keeps the minimum-round-trip estimate of
   ``destination clock - source clock`` (``vtick.proto.clockmath.estimate_offset``: one
   machine gives exactly 0).  Doing it before the freeze keeps it out of the blackout.
2. **Freeze at a frame boundary.**  The host stops taking frames and parks its timer
   loop (:meth:`Host.freeze`), after the frame being handled finishes.  The vCPUs are
   the guest CPUs; whatever they send from now on waits, unacknowledged, in their links,
   and reaches whichever host runs the VM next: the exit a vCPU is blocked in is its
   instruction boundary, as a vCPU kicked out of ``KVM_RUN`` is paused at one.
3. **Copy.**  Every device's state, the LAPICs, pending injections and each link's
   sequence state and unacknowledged frames become one ``vm-state`` blob
   (``state.save_vm``), sent in ``mig-state`` with what the handshakes agreed, the
   guest memory that persists (cpu_online_mask) and how much of the run is left.
4. **Hand over or step back.**  ``mig-ready`` names where the vCPUs dial next; the
   source then repeats a ``migrate`` control message to every vCPU until its pipe goes
   (the vCPU redialled) and its part of the run is over.  ``mig-refuse``, silence, a
   malformed answer or a destination that dies before answering: the source thaws, asks
   every vCPU to resend what it held back, and runs the VM on, losing nothing.  A
   destination that dies after ``mig-ready`` has the VM; the source cannot take it back
   (KVM's post-copy has the same point of no return) and the run fails there, loudly.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import trio
import trio.lowlevel

from vtick.host.migration.channel import (
    PING,
    PONG,
    READY,
    REFUSE,
    STATE,
    Channel,
    ChannelError,
)
from vtick.host.migration.state import MigrationError, encode_state, save_vm
from vtick.proto import messages as m
from vtick.proto.clockmath import ClockSample, estimate_offset
from vtick.proto.eventlog import H_MIGRATE_FAIL, H_MIGRATE_OUT
from vtick.proto.transport import monotonic_ns

if TYPE_CHECKING:
    from vtick.host.server import Host

__all__ = ["migrate_out", "PINGS"]

PINGS = 5
PING_TIMEOUT_S = 1.0
#: how often the source repeats ``migrate`` to a vCPU that has not left yet
MIGRATE_REPEAT_S = 0.05
#: how long the vCPUs get to leave before the source stops waiting for them
LEAVE_TIMEOUT_S = 10.0


def _log(text: str) -> None:
    print(f"vtick host: migration: {text}", file=sys.stderr, flush=True)


async def migrate_out(host: Host, to: str, end_ns: int) -> bool:
    """Move the VM ``host`` runs to the destination listening on ``to``.

    ``end_ns`` is when the run ends (this host's clock).  Returns True when the
    destination has the VM (this host's part of the run is over), False when the
    migration failed and the VM runs on here; ``host.migration`` records either.
    """
    record: dict[str, Any] = {"role": "source", "to": to}
    host.migration = {"migration": record}
    channel = Channel.dial(to)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.ep.run_sender)
            try:
                moved = await _transfer(host, channel, end_ns, record)
            finally:
                nursery.cancel_scope.cancel()
    finally:
        channel.close()
    if not moved:
        return False
    await _send_vcpus_away(host, record)
    return True


async def _transfer(host: Host, channel: Channel, end_ns: int, record: dict[str, Any]) -> bool:
    cfg = host.cfg
    try:
        with trio.fail_after(cfg.migrate_timeout_s):
            samples = []
            for _ in range(PINGS):
                sent = monotonic_ns()
                channel.send({"m": PING, "token": cfg.token, "t": sent})
                pong = await channel.recv(PING_TIMEOUT_S)
                if pong["m"] == REFUSE:
                    raise ChannelError(f"destination refused: {pong['reason']}")
                if pong["m"] != PONG or pong["t"] != sent:
                    raise ChannelError(f"expected pong to {sent}, got {pong}")
                samples.append(ClockSample(sent, pong["host"], monotonic_ns()))
            offset = estimate_offset(samples)
            record["offset_ns"] = offset.ns
            record["offset_rtt_ns"] = offset.rtt
            # ---- the blackout starts: stop the VM at a frame boundary
            host.freeze()
            while host.handling:
                await trio.lowlevel.checkpoint()  # the frame being handled completes first
            frozen_at = monotonic_ns()
            if host.history is not None:
                host.history.add(H_MIGRATE_OUT, frozen_at, offset.ns)
            blob = encode_state(_save(host, frozen_at))
            sent_at = monotonic_ns()
            channel.send(_state_message(host, blob, offset.ns, frozen_at, end_ns))
            answer = await channel.recv(cfg.migrate_timeout_s)
            answered = monotonic_ns()
    except (ChannelError, MigrationError, OSError, trio.TooSlowError) as exc:
        reason = str(exc) or f"no answer within {cfg.migrate_timeout_s:g} s"
        return _failed(host, record, reason)
    if answer["m"] == REFUSE:
        return _failed(host, record, f"destination refused the VM: {answer['reason']}")
    if answer["m"] != READY:
        return _failed(host, record, f"destination answered m={answer['m']}, not ready")
    record |= {
        "ok": True,
        "listen": answer["listen"],
        "frozen_at_ns": frozen_at,
        "state_bytes": len(blob),
        "save_ns": sent_at - frozen_at,
        "transfer_ns": answered - sent_at,
    }
    host.migrated_out = True
    _log(f"VM handed to {answer['listen']} ({len(blob)} bytes of state)")
    return True


def _save(host: Host, now: int) -> dict[str, Any]:
    links = {vl.vcpu: vl.link for vl in host.links if vl.link is not None}
    sessions = {vl.vcpu: vl.session for vl in host.links if vl.link is not None}
    return save_vm(host.machine, links, sessions, now)


def _state_message(
    host: Host, blob: bytes, offset: int, frozen_at: int, end_ns: int
) -> dict[str, Any]:
    cfg = host.cfg
    config: dict[str, Any] = {
        "vcpus": cfg.vcpus,
        "workload": cfg.workload,
        "mode": cfg.mode,
        "hz": cfg.hz,
        "seed": cfg.seed,
        "params": dict(cfg.params),
        "max_message": cfg.max_message,
    }
    for key in ("apic", "ipi"):
        if getattr(cfg, key) is not None:
            config[key] = getattr(cfg, key)
    if cfg.trace:
        config["trace"] = True
    if cfg.exit_cost is not None:
        config["exit_cost"] = cfg.exit_cost
    if cfg.timer_advance:
        config["timer_advance"] = True
    if cfg.mutations:
        config["mutations"] = list(cfg.mutations)
    links = [
        {
            "vcpu": vl.vcpu,
            "features": int(vl.features),
            "version": vl.version,
            "pid": vl.guest_pid or 0,
            "sessions": vl.sessions,
            "last_exit": vl.last_exit_at,
        }
        for vl in host.links
        if vl.link is not None
    ]
    return {
        "m": STATE,
        "token": cfg.token,
        "offset": offset,
        "frozen_at": frozen_at,
        "started_at": host.started_at or frozen_at,
        "remaining_ns": max(0, end_ns - frozen_at),
        "config": config,
        "links": links,
        "online": host.online.wire(),
        "state": blob,
    }


def _failed(host: Host, record: dict[str, Any], reason: str) -> bool:
    """The VM stays here: thaw it; the vCPUs resend what waited (nothing is lost)."""
    record |= {"ok": False, "error": reason}
    _log(f"failed, the VM runs on here: {reason}")
    if host.frozen:
        if host.history is not None:
            host.history.add(H_MIGRATE_FAIL, monotonic_ns())
        host.thaw()
    return False


async def _send_vcpus_away(host: Host, record: dict[str, Any]) -> None:
    """Tell every vCPU where the VM is now, until each has left this host."""
    # the guest ktime of the freeze, read as a vCPU reads it (kvmclock of its TSC)
    frozen_ktime = host.machine.vcpus[0].pvclock.ktime(host.tsc.tsc(record["frozen_at_ns"]))
    left: dict[int, int] = {}
    with trio.move_on_after(LEAVE_TIMEOUT_S):
        while True:
            pending = [
                vl
                for vl in host.links
                if vl.link is not None
                and vl.session_pipe is not None
                and vl.session_pipe not in vl.removed_pipes
            ]
            now = monotonic_ns()
            for vl in host.links:
                if vl.vcpu not in left and vl not in pending:
                    left[vl.vcpu] = now
            if not pending:
                break
            for vl in pending:
                vl.send(m.Migrate(to=record["listen"], frozen=frozen_ktime))
            await trio.sleep(MIGRATE_REPEAT_S)
    stayed = [vl.vcpu for vl in host.links if vl.vcpu not in left]
    record["left_ns"] = {str(v): t - record["frozen_at_ns"] for v, t in sorted(left.items())}
    if stayed:
        # the destination has the VM; a vCPU that did not follow will fail there
        record["stayed"] = stayed
        for vcpu in stayed:
            host.links[vcpu].record_error(
                f"did not leave for {record['listen']} within {LEAVE_TIMEOUT_S:g} s"
            )
