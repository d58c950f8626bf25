"""The state a live migration moves: save a VM at the freeze, restore it elsewhere.

Theory of operation
-------------------
Pure, like the models it saves: every function takes the time as an argument, reads
no clock and does no I/O; the orchestration (freeze the source, transfer, start the
destination, reconnect the vCPUs) is built on top of this API.

**What travels.**  One CBOR map, the CDDL rule ``vm-state`` in ``proto/vtick.cddl``
(validated on save, encode, decode and restore): a format number
(:data:`STATE_VERSION`; any other is refused), the guest clock at the freeze, the
VM-wide devices (kvmclock's wall clock, the PIT) and per vCPU: negotiated features, the
deferred exit-hlt, PV EOI, the LAPIC (registers, IRR/ISR/TMR, APIC_BASE, the timer),
the actions queued and not yet sent, the per-vCPU device state (kvmclock MSR, PV timer
expiry, VMI alarm), chaos-history ids, and the link's sequence state with the
unacknowledged frames.  Statistics counters travel too (``stats``: the LAPIC's, the
injections, the devices'), though nothing behaves differently for them: the run's
results and the chaos checker ``lapic-consistent`` (injections = EOIs + vectors in
service) read them as whole-run figures, so the destination's continue the source's.

**Why every time is guest-relative.**  The destination's CLOCK_MONOTONIC is another
clock (another machine: an offset; even on one machine: a later moment), so a source
host time would mean nothing there.  The blob holds guest ktime (ns), guest TSC
(cycles), durations, and PIT CLK edges relative to the freeze; only ``clock.host_ns``
is a source host time, used with the caller's clock offset to measure the blackout
(:func:`tsc_model_for`), as KVM_SET_CLOCK's KVM_CLOCK_REALTIME flag uses the saved
realtime.  The destination builds a TscModel in which the guest TSC and guest ktime
are continuous with the source's and keep running through the blackout, as they do
in KVM (KVM_SET_TSC_KHZ keeps the guest TSC frequency, the TSC offset keeps the guest
TSC value, KVM_SET_CLOCK with KVM_CLOCK_REALTIME advances kvmclock by the real time
elapsed).  Then, per timer kind:

* **PV timer** (pv-ktime / pv-delta): the armed expiry is absolute guest ktime; it is
  re-based onto the destination's host clock through its TscModel and the vCPU's
  pvclock.  It fires at the same guest time; one due during the blackout fires at
  resume, late by the blackout.
* **TSC-deadline** and the **VMI alarm**: absolute guest TSC, which continues: same
  guest-time behaviour.  A deadline passed during the blackout fires at resume.
* **LAPIC one-shot / periodic**: KVM_GET_LAPIC saves TMCCT (the current count) and
  KVM_SET_LAPIC restarts the countdown from it (``__start_apic_timer(apic,
  APIC_TMCCT)``): the remaining time is carried (in ns) and resumes at the destination's
  ``now``, so such a timer is delayed by the blackout.  The **PIT** likewise keeps its
  count (KVM_GET/SET_PIT2, re-based by QEMU onto its virtual clock, which stops while
  the VM is stopped).

**kvmclock.**  After restore the destination re-publishes every enabled vCPU's pvclock
with a new (even) version before the vCPUs run again, as KVM does after KVM_SET_CLOCK
(KVM_REQ_CLOCK_UPDATE on every vCPU); the vCPUs are queued in
``KvmClock.pending_publications`` for the server to send.  Since guest TSC and ktime are
continuous, the old parameters stay valid until the guest reads the new ones.

**Pending injections** (acknowledged IRR -> ISR on the source, not yet sent) are queued
again on the destination before anything the restore raises.

**Where the devices are.**  The device models are objects the Host builds on its
Machine; each registers itself in ``Machine.devices`` by name when it is built
(``kvmclock``, ``pvtimer``, ``vmi-alarm``, ``pit``, ``pvapic``), so :func:`save_vm` and
:func:`restore_vm` need only the Machine: a destination built like the Host builds
one (Machine, then the devices, with the PV timer listening to kvmclock) is ready to
restore into.  A device the source has and the destination lacks is refused; a device
this module does not know how to migrate is refused on save.

Restore order matters and is fixed here: vCPUs first (pvclock, queued actions, LAPIC),
then VM-wide devices, then per-vCPU devices (PV timer after pvclock), then the
kvmclock re-publication (which re-derives the PV timer), then one expiry pass at
``now`` (``Machine.on_timer``): whatever came due during the blackout fires at resume.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import cbor2

from vtick.host.machine import Machine, counters_of, load_counters
from vtick.proto.link import Link
from vtick.proto.pvclock import PvclockInfo, TscModel
from vtick.proto.schema import SchemaError, ValidationError, load_schema

__all__ = [
    "STATE_VERSION",
    "MigrationError",
    "save_vm",
    "encode_state",
    "decode_state",
    "restore_vm",
    "tsc_model_for",
]

#: the format of the ``vm-state`` map this vtick writes and reads
STATE_VERSION: int = 1
#: the CDDL rule of the state blob
RULE = "vm-state"
#: the devices this module migrates (Machine.devices names)
KNOWN_DEVICES = frozenset({"kvmclock", "pvtimer", "vmi-alarm", "pit", "pvapic"})
#: per-vCPU device state: Machine.devices name -> vcpu-devices key
_VCPU_DEVICES = {"kvmclock": "kvmclock", "pvtimer": "pvtimer", "vmi-alarm": "vmi_alarm"}
#: planted bug (host/mutations.py): the destination does not re-arm the restored timers
DROP_TIMERS = "migration-drops-timers"

_SCHEMA = load_schema()  # read once at import, like the codec's


def _software_version() -> str:
    try:
        return importlib.metadata.version("vtick")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return "unknown"


VTICK_VERSION = _software_version()


class MigrationError(Exception):
    """A state blob cannot be saved, decoded or restored; the message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


def _validate(state: Any) -> None:
    try:
        _SCHEMA.check(RULE, state)
    except ValidationError as exc:
        where = exc.path or "top level"
        raise MigrationError(f"state blob does not match {RULE} at {where}: {exc.problem}") from exc
    except SchemaError as exc:  # pragma: no cover - the shipped schema has the rule
        raise MigrationError(str(exc)) from exc


def _check_format(state: Any) -> None:
    if not isinstance(state, dict):
        raise MigrationError(f"state blob is not a map (a {type(state).__name__})")
    fmt = state.get("format")
    if fmt != STATE_VERSION:
        raise MigrationError(f"state blob is format {fmt}; this vtick reads format {STATE_VERSION}")


# ---------------------------------------------------------------------- save


def save_vm(
    machine: Machine, links: dict[int, Link], sessions: dict[int, int], now: int
) -> dict[str, Any]:
    """The ``vm-state`` map of ``machine`` frozen at source host time ``now``.

    Args:
        machine: the source VM, stopped at an instruction boundary (no exit being
            handled); its devices are found in ``machine.devices``.  Not modified.
        links: vCPU -> its Link (vCPUs with no session may be missing).
        sessions: vCPU -> its session id, for every vCPU in ``links``.
        now: the source host's CLOCK_MONOTONIC ns at the freeze.

    Raises:
        MigrationError: a device this module cannot migrate, a link without a session,
            or a state that does not match the CDDL.
    """
    unknown = sorted(set(machine.devices) - KNOWN_DEVICES)
    if unknown:
        raise MigrationError(f"cannot migrate device {', '.join(unknown)}: no saved state defined")
    missing = sorted(set(links) - set(sessions))
    if missing:
        raise MigrationError(f"vCPU {missing[0]} has a link but no session id")
    devices = machine.devices
    tsc = machine.tsc
    vm_devices: dict[str, Any] = {}
    if "kvmclock" in devices:
        vm_devices["kvmclock"] = devices["kvmclock"].save(now)
    if "pit" in devices:
        vm_devices["pit"] = devices["pit"].save(now)
    if "pvapic" in devices:
        vm_devices["pvapic"] = {}
    vm_stats = {
        name: counters_of(dev.stats)
        for name, dev in sorted(devices.items())
        if getattr(dev, "stats", None) is not None and not isinstance(dev.stats, list)
    }
    vcpus: list[dict[str, Any]] = []
    for vs in machine.vcpus:
        entry = vs.save(now)
        entry["devices"] = {
            key: devices[name].save_vcpu(vs.vcpu, now)
            for name, key in _VCPU_DEVICES.items()
            if name in devices
        }
        entry["stats"] = vs.save_stats() | {
            "devices": {
                name: counters_of(dev.stats[vs.vcpu])
                for name, dev in sorted(devices.items())
                if isinstance(getattr(dev, "stats", None), list)
            }
        }
        if vs.vcpu in links:
            entry["link"] = {"session": sessions[vs.vcpu], **links[vs.vcpu].snapshot()}
        vcpus.append(entry)
    state: dict[str, Any] = {
        "format": STATE_VERSION,
        "vtick": VTICK_VERSION,
        "vcpus": len(machine.vcpus),
        "clock": {
            "tsc_khz": tsc.tsc_khz,
            "guest_tsc": tsc.tsc(now),
            "tsc_ns": now - tsc.tsc_epoch,
            "guest_ns": now - tsc.ktime_epoch,
            "host_ns": now,
            "pvclock": [vs.pvclock.to_wire() for vs in machine.vcpus],
        },
        "devices": vm_devices,
        "stats": vm_stats,
        "vcpu": vcpus,
    }
    _validate(state)
    return state


def encode_state(state: dict[str, Any]) -> bytes:
    """The CBOR blob of a ``vm-state`` map (validated first).

    Raises:
        MigrationError: the map does not match the CDDL or has another format.
    """
    _check_format(state)
    _validate(state)
    return bytes(cbor2.dumps(state))


def decode_state(data: bytes) -> dict[str, Any]:
    """The ``vm-state`` map of a blob, checked: CBOR, a map, this format, the CDDL.

    Raises:
        MigrationError: one line saying which of those it is not (a schema violation
            names the path, e.g. ``vcpu[0].lapic.timer``).
    """
    try:
        state = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several types; any of them means "not CBOR"
        raise MigrationError(f"state blob is not valid CBOR ({len(data)} bytes): {exc}") from exc
    _check_format(state)
    _validate(state)
    return dict(state)


# ---------------------------------------------------------------------- restore


def tsc_model_for(state: dict[str, Any], dest_now: int, offset_ns: int) -> TscModel:
    """The destination's TscModel: guest TSC and guest ktime continuous with the source's.

    The guest keeps the source's ``tsc_khz`` (KVM_SET_TSC_KHZ).  The freeze happened at
    destination time ``host_ns + offset_ns`` (``offset_ns`` = destination clock - source
    clock, 0 on one machine); guest time runs on through the blackout, so at
    ``dest_now`` the guest reads the freeze values plus the time elapsed since then.
    Never less: if ``dest_now`` is before the freeze by the destination's clock (a bad
    offset estimate), the guest resumes where it stopped rather than go back, as KVM
    adds only a positive realtime delta in KVM_SET_CLOCK.

    Raises:
        MigrationError: the clock section is inconsistent (guest_tsc is not tsc_ns at
            tsc_khz).
    """
    clock = state["clock"]
    khz = clock["tsc_khz"]
    if khz <= 0 or clock["tsc_ns"] * khz // 1_000_000 != clock["guest_tsc"]:
        raise MigrationError(
            f"state blob clock is inconsistent: guest_tsc {clock['guest_tsc']} is not "
            f"{clock['tsc_ns']} ns at {khz} kHz"
        )
    frozen_at = clock["host_ns"] + offset_ns
    anchor = min(dest_now, frozen_at)  # destination time at which the guest reads the freeze
    return TscModel(
        tsc_khz=khz,
        tsc_epoch=anchor - clock["tsc_ns"],
        ktime_epoch=anchor - clock["guest_ns"],
    )


def restore_vm(state: dict[str, Any], machine: Machine, now: int) -> dict[int, tuple[Link, int]]:
    """Restore ``state`` into ``machine`` at destination host time ``now``.

    Args:
        state: a ``vm-state`` map (:func:`decode_state`'s result); validated again.
        machine: a fresh destination Machine with its devices, built with
            ``tsc_model_for(state, now, offset_ns)`` (or any TscModel continuous with
            the source's guest TSC).
        now: the destination's CLOCK_MONOTONIC ns at the restore.

    Returns:
        vCPU -> (its Link, continuing the session, and the session id), for every vCPU
        that had a session.

    Raises:
        MigrationError: the state does not fit the machine (vCPU count, TSC frequency,
            a device the destination lacks, inconsistent link numbers, ...).
    """
    _check_format(state)
    _validate(state)
    clock = state["clock"]
    n = state["vcpus"]
    saved_vcpus = state["vcpu"]
    if len(saved_vcpus) != n or len(clock["pvclock"]) != n:
        raise MigrationError(f"state blob describes {n} vCPUs but holds {len(saved_vcpus)}")
    if len(machine.vcpus) != n:
        raise MigrationError(
            f"state has {n} vCPUs; the destination machine has {len(machine.vcpus)}"
        )
    if machine.tsc.tsc_khz != clock["tsc_khz"]:
        raise MigrationError(
            f"destination guest TSC runs at {machine.tsc.tsc_khz} kHz; the VM's is "
            f"{clock['tsc_khz']} kHz (build the machine with tsc_model_for)"
        )
    devices = machine.devices
    wanted = set(state["devices"])  # vm-devices keys are Machine.devices names
    for saved in saved_vcpus:
        wanted |= {name for name, key in _VCPU_DEVICES.items() if key in saved["devices"]}
    lacking = sorted(wanted - set(devices))
    if lacking:
        raise MigrationError(f"the VM has {', '.join(lacking)}; the destination machine has none")
    try:
        _restore_stats(state, machine)  # first: what the restore itself counts adds to them
        for vs, saved, info in zip(machine.vcpus, saved_vcpus, clock["pvclock"], strict=True):
            vs.pvclock = PvclockInfo.from_wire(info)
            vs.restore(saved, now)
        if "kvmclock" in state["devices"]:
            devices["kvmclock"].restore(state["devices"]["kvmclock"], now)
        if "pit" in state["devices"]:
            devices["pit"].restore(state["devices"]["pit"], now)
        drop = machine.mutations.on(DROP_TIMERS)
        for saved in saved_vcpus:
            for name, key in _VCPU_DEVICES.items():
                if drop and name in ("pvtimer", "vmi-alarm"):
                    continue  # planted bug: the device forgets its armed expiry
                if key in saved["devices"]:
                    devices[name].restore_vcpu(saved["vcpu"], saved["devices"][key], now)
        if "kvmclock" in devices:
            # new kvmclock parameters (new version) before the vCPUs run again
            devices["kvmclock"].republish_all(now)
        if drop:
            # planted bug: every host timer the restore re-armed is dropped (a guest timer
            # armed on the source never fires here)
            for handle in list(machine._timer_callbacks):
                machine.hrtimers.cancel(handle)
        machine.on_timer(now)  # what came due during the blackout fires at resume
        links: dict[int, tuple[Link, int]] = {}
        for saved in saved_vcpus:
            if "link" in saved:
                snap = saved["link"]
                link = Link.from_snapshot(snap, now, name=f"vCPU {saved['vcpu']}")
                links[saved["vcpu"]] = (link, snap["session"])
    except (ValueError, KeyError, IndexError) as exc:
        raise MigrationError(f"cannot restore the VM: {exc}") from exc
    return links


def _restore_stats(state: dict[str, Any], machine: Machine) -> None:
    """The source's statistics counters into the fresh ``machine`` (absent in a blob that
    carries none: they then start at zero, as before)."""
    devices = machine.devices
    for name, counts in state.get("stats", {}).items():
        dev = devices.get(name)
        if dev is not None and getattr(dev, "stats", None) is not None:
            load_counters(dev.stats, counts)
    for vs, saved in zip(machine.vcpus, state["vcpu"], strict=True):
        stats = saved.get("stats")
        if stats is None:
            continue
        vs.restore_stats(stats)
        for name, counts in stats["devices"].items():
            dev = devices.get(name)
            if dev is not None and isinstance(getattr(dev, "stats", None), list):
                load_counters(dev.stats[vs.vcpu], counts)
