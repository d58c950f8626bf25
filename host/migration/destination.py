"""The destination side of a live migration (issue 13): receive, restore, resume.

Theory of operation
-------------------
``vtick host --incoming URL --listen BASE`` starts no VM: it listens on ``URL`` for a
source host (see ``source.py``) and answers its pings with this host's clock.  When the
``mig-state`` arrives it is checked before anything is built: the run's token, the
channel rule, then the ``vm-state`` blob's format version and schema
(``state.decode_state``); any failure is a ``mig-refuse`` naming it, and this host keeps
waiting (the source runs the VM on).

The VM is then rebuilt here, as KVM's destination does (``KVM_SET_LAPIC``,
``KVM_SET_MSRS``, ``KVM_SET_CLOCK``, then a kvmclock update before the first entry):

* the guest TSC model is the source's moved into this host's clock domain by the
  measured offset (``state.tsc_model_for``): the guest's TSC and ktime run on through
  the blackout, as with ``KVM_CLOCK_REALTIME``;
* every device is restored at this host's ``now``: an absolute PV-timer expiry (guest
  ktime) and a TSC deadline (guest TSC) are re-based onto this host's clock; a LAPIC
  one-shot or periodic count resumes from its saved current count; kvmclock is
  re-published with a new version before any vCPU runs;
* each link continues its session (same session id, sequence numbers and
  unacknowledged frames), so the vCPU's resume hello is accepted here and each side
  retransmits what the other lacks: an exit the source never took, an injection the
  vCPU never saw.

Only then does the destination listen on the vCPUs' addresses and answer ``mig-ready``;
the run goes on until the source's end of run, moved into this clock.  The results get
the ``blackout_*`` figures (see :func:`blackout`).
"""

from __future__ import annotations

import dataclasses
import hmac
import signal
import sys
from typing import Any

import trio

from vtick.host.migration.channel import (
    PING,
    PONG,
    READY,
    REFUSE,
    STATE,
    Channel,
    ChannelError,
    unpack,
)
from vtick.host.migration.state import MigrationError, decode_state, restore_vm, tsc_model_for
from vtick.host.mutations import MUTATIONS
from vtick.host.server import Host, HostConfig, LinkState, check_exposure, run_host
from vtick.proto.abi import Feature
from vtick.proto.cpumask import decode_mask
from vtick.proto.eventlog import H_MIGRATE_IN
from vtick.proto.lifecycle import watch_parent, watch_signals
from vtick.proto.transport import monotonic_ns, remove_ipc_file

__all__ = ["serve_incoming", "blackout"]


def _log(text: str) -> None:
    print(f"vtick host: incoming: {text}", file=sys.stderr, flush=True)


async def serve_incoming(
    cfg: HostConfig, *, task_status: trio.TaskStatus[Host] = trio.TASK_STATUS_IGNORED
) -> dict[str, Any]:
    """Wait for a VM on ``cfg.incoming``, then run it until the source's end of run."""
    assert cfg.incoming is not None
    check_exposure(cfg.incoming, cfg.allow_insecure_tcp)
    check_exposure(cfg.listen, cfg.allow_insecure_tcp)
    channel = Channel.listen(cfg.incoming)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.ep.run_sender)
            arrived = await _wait_for_vm(cfg, channel)
            if arrived is None:
                nursery.cancel_scope.cancel()
                return {"ok": False, "interrupted": "interrupted before a VM arrived"}
            host, prepare, end_ns, record = arrived

            async def run_until_end(host: Host) -> None:
                host.migration = {"migration": record}
                # what the restore queued (kvmclock re-published, timers that came due
                # in the blackout, a halted vCPU's wake-up) goes into the links now: it
                # reaches each vCPU right after its resume handshake.  Left queued, it
                # waited for the next exit or timer of any vCPU (a timer 1.5 s late
                # on an idle VM, found by `vtick bench migration`).
                host.run_actions()
                channel.send({"m": READY, "listen": cfg.listen})
                record["ready_at_ns"] = monotonic_ns()
                host.migration_summary = lambda: blackout(host, record)  # after the reports
                await trio.sleep(max(0.0, (end_ns - monotonic_ns()) / 1e9))

            results = await run_host(host, run_until_end, prepare, task_status=task_status)
            nursery.cancel_scope.cancel()
    finally:
        channel.close()
        remove_ipc_file(cfg.incoming)
    return results


async def _wait_for_vm(
    cfg: HostConfig, channel: Channel
) -> tuple[Host, Any, int, dict[str, Any]] | None:
    """Until a VM arrives and restores (None: SIGTERM/SIGINT or the launcher went away).

    Raises:
        OSError: no VM within the connect timeout.
    """
    async with trio.open_nursery() as waiting:

        def interrupted(signum: int) -> None:
            _log(f"interrupted by {signal.Signals(signum).name} while waiting for a VM")
            waiting.cancel_scope.cancel()

        await waiting.start(watch_signals, interrupted)
        waiting.start_soon(watch_parent, waiting.cancel_scope)
        if cfg.announce:
            print(f"READY {cfg.incoming}", flush=True)
        with trio.move_on_after(cfg.connect_timeout_s) as timeout:
            arrived = await _receive(cfg, channel)
            waiting.cancel_scope.cancel()
            return arrived
        if timeout.cancelled_caught:
            raise OSError(f"no VM arrived on {cfg.incoming} within {cfg.connect_timeout_s:g} s")
    return None


async def _receive(cfg: HostConfig, channel: Channel) -> tuple[Host, Any, int, dict[str, Any]]:
    """Answer pings until a state arrives that restores; refuse the others."""
    while True:
        try:
            data, _pipe = await channel.ep.recv()
            msg = _unpack(data)
        except ChannelError as exc:
            _refuse(channel, str(exc))
            continue
        if not hmac.compare_digest(msg.get("token", b""), cfg.token):
            _refuse(channel, "wrong token")
            continue
        if msg["m"] == PING:
            channel.send({"m": PONG, "t": msg["t"], "host": monotonic_ns()})
            continue
        if msg["m"] != STATE:
            _refuse(channel, f"unexpected m={msg['m']}")
            continue
        try:
            return _restore(cfg, msg)
        except MigrationError as exc:
            _refuse(channel, str(exc))


def _unpack(data: bytes) -> dict[str, Any]:
    msg = unpack(data)
    if msg["m"] not in (PING, STATE):
        raise ChannelError(f"a destination takes ping and state, not m={msg['m']}")
    return msg


def _refuse(channel: Channel, reason: str) -> None:
    _log(f"refused: {reason}")
    channel.send({"m": REFUSE, "reason": reason[:500]})


def _restore(cfg: HostConfig, msg: dict[str, Any]) -> tuple[Host, Any, int, dict[str, Any]]:
    """Build the Host for the VM in ``msg`` (nothing listens yet).

    Raises:
        MigrationError: the blob is of another version or does not match its schema,
            or it disagrees with the rest of the message (cpu_online_mask included).
    """
    now = monotonic_ns()
    state = decode_state(msg["state"])
    conf = msg["config"]
    if state["vcpus"] != conf["vcpus"] or len(msg["links"]) != conf["vcpus"]:
        raise MigrationError(
            f"state has {state['vcpus']} vCPUs, config {conf['vcpus']}, links {len(msg['links'])}"
        )
    offset = msg["offset"]
    vm_cfg = dataclasses.replace(
        cfg,
        vcpus=conf["vcpus"],
        workload=conf["workload"],
        mode=conf["mode"],
        apic=conf.get("apic"),
        hz=conf["hz"],
        ipi=conf.get("ipi"),
        seed=conf["seed"],
        params=dict(conf["params"]),
        max_message=conf["max_message"],
        trace=bool(conf.get("trace")),
        exit_cost=conf.get("exit_cost"),
        timer_advance=bool(conf.get("timer_advance")),
        mutations=tuple(conf.get("mutations", ())),
        duration_s=msg["remaining_ns"] / 1e9,
        announce=False,
    )
    try:
        decode_mask(msg["online"], conf["vcpus"])  # checked before anything is built
    except ValueError as exc:
        raise MigrationError(f"cpu_online_mask: {exc}") from None
    unknown = [name for name in vm_cfg.mutations if name not in MUTATIONS]
    if unknown:
        raise MigrationError(f"the VM carries mutation {unknown[0]!r}, unknown to this vtick")
    try:
        host = Host(vm_cfg, tsc=tsc_model_for(state, now, offset))
    except (OSError, ValueError) as exc:  # an exit-cost profile this machine lacks, ...
        raise MigrationError(f"cannot build the VM here: {exc}") from None
    restored = restore_vm(state, host.machine, now)
    frozen_here = msg["frozen_at"] + offset  # the source's freeze on this host's clock
    record: dict[str, Any] = {
        "role": "destination",
        "offset_ns": offset,
        "frozen_at_ns": frozen_here,
        "restored_at_ns": now,
        "state_bytes": len(msg["state"]),
        "last_exit_ns": {str(link["vcpu"]): link["last_exit"] + offset for link in msg["links"]},
    }
    host.started_at = msg["started_at"] + offset
    # guest memory that persists: cpu_online_mask; each vCPU is sent it as it resumes
    host.online.load(msg["online"])
    if host.history is not None:
        host.history.add(H_MIGRATE_IN, now, offset, msg["frozen_at"])
    links = {link["vcpu"]: link for link in msg["links"]}

    def prepare(host: Host) -> None:
        for vl in host.links:
            link, session = restored[vl.vcpu]
            meta = links[vl.vcpu]
            link.name = vl.name
            vl.link = link
            vl.session = session
            vl.sessions = meta["sessions"]
            vl.guest_pid = meta["pid"] or None
            vl.features = Feature(meta["features"])
            vl.version = meta["version"]
            vl.state = LinkState.OPEN
            host.machine.vcpus[vl.vcpu].features = meta["features"]
        host.all_connected.set()

    end_ns = msg["frozen_at"] + offset + msg["remaining_ns"]
    _log(f"VM of {conf['vcpus']} vCPUs restored ({len(msg['state'])} bytes); waiting for them")
    return host, prepare, end_ns, record


def blackout(host: Host, record: dict[str, Any]) -> dict[str, Any]:
    """The ``blackout_*`` results of a migration, on this host's clock (ns).

    * ``blackout_ns``: the VM's blackout as the issue defines it, from the last exit
      the source handled (any vCPU) to the first exit handled here (any vCPU);
    * ``blackout_vcpu_ns``: the same per vCPU (a halted vCPU's includes its idle time:
      its first exit here comes when it wakes);
    * ``blackout_resume_ns``: per vCPU, from the freeze to its resume handshake here;
    * ``blackout_downtime_ns``: the freeze to the last vCPU resumed (the VM could not
      run at all), which ``blackout_ns`` exceeds when a vCPU idles in HLT after it;
    * ``blackout_phases_ns``: freeze to ready (copy, transfer, restore) and ready to the
      last vCPU resumed;
    * ``blackout_state_bytes``; the timers in flight across the move are added by the
      caller from the vCPUs' reports (:func:`late_timers`).
    """
    last = {int(k): v for k, v in record["last_exit_ns"].items()}
    firsts = {vl.vcpu: vl.first_exit_at for vl in host.links if vl.first_exit_at}
    resumed = {vl.vcpu: vl.resumed_at for vl in host.links if vl.resumed_at}
    out: dict[str, Any] = {
        "blackout_ns": (min(firsts.values()) - max(last.values())) if firsts and last else None,
        "blackout_vcpu_ns": [
            firsts[v] - last[v] if v in firsts and last.get(v) else None
            for v in range(len(host.links))
        ],
        "blackout_resume_ns": [
            resumed[v] - record["frozen_at_ns"] if v in resumed else None
            for v in range(len(host.links))
        ],
        # the time the VM could not run at all: the freeze to the last vCPU resumed here
        # (blackout_ns also counts how long an idle vCPU took to make its next exit)
        "blackout_downtime_ns": (max(resumed.values()) - record["frozen_at_ns"])
        if len(resumed) == len(host.links)
        else None,
        "blackout_phases_ns": {
            # save, transfer and restore; a LAPIC count runs again from the restore
            "freeze_to_restored": record["restored_at_ns"] - record["frozen_at_ns"],
            "freeze_to_ready": record["ready_at_ns"] - record["frozen_at_ns"],
            "ready_to_resumed": (max(resumed.values()) - record["ready_at_ns"])
            if len(resumed) == len(host.links)
            else None,
        },
        "blackout_state_bytes": record["state_bytes"],
    }
    return out | late_timers(host)


def late_timers(host: Host) -> dict[str, Any]:
    """The timers the move delayed, per the vCPUs' reports: programmed before the vCPU
    resumed here and run after it (guest/vcpu.py), and how late they ran (ns).  Count
    and maximum are exact over the VM; the percentiles are each vCPU's own."""
    counters = [(vl.report.counters or {}) if vl.report is not None else {} for vl in host.links]
    return {
        "blackout_late_timers": sum(c.get("migration_timers", 0) for c in counters),
        "blackout_late_max_ns": max(c.get("migration_late_max_ns", 0) for c in counters),
        "blackout_late_vcpu_p50_ns": [c.get("migration_late_p50_ns") for c in counters],
        "blackout_late_vcpu_p99_ns": [c.get("migration_late_p99_ns") for c in counters],
        # the ones due after the resume: on time for an absolute expiry, late by the
        # blackout for a LAPIC count that paused through it
        "blackout_spanning_timers": sum(c.get("migration_spanning_timers", 0) for c in counters),
        "blackout_spanning_late_max_ns": max(
            c.get("migration_spanning_late_max_ns", 0) for c in counters
        ),
        "blackout_spanning_late_vcpu_p50_ns": [
            c.get("migration_spanning_late_p50_ns") for c in counters
        ],
    }
