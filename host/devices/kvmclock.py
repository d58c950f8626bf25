"""kvmclock: the guest enables pvclock publication through MSRs (reference section 7).

Theory of operation
-------------------
KVM publishes ``pvclock_vcpu_time_info`` into guest memory at the GPA the guest wrote to
``MSR_KVM_SYSTEM_TIME_NEW`` (0x4B564D01; bit 0 = enable).  vtick has no guest memory:
the "page" is the vCPU's :attr:`VcpuState.pvclock` field, and a publication is a
``pvclock`` wire message the server sends to that vCPU.  So this device:

* stores each vCPU's system-time MSR (reads return the last value written, like KVM's
  ``vcpu->arch.time``; the legacy MSR 0x12 is an alias sharing the same storage);
* on a write with bit 0 set re-publishes: ``VcpuState.pvclock`` becomes
  ``machine.tsc.publish(now, version + 2)`` and the vCPU id is queued in
  :attr:`KvmClock.pending_publications` for the server to drain and send;
* on a write with bit 0 clear stops updates: :meth:`KvmClock.republish` then leaves the
  vCPU alone (its last publication stays what the guest has);
* ``MSR_KVM_WALL_CLOCK_NEW`` (0x4B564D00, legacy 0x11) is per VM: every write records a
  :class:`WallClock` (the wall-clock time at guest ktime 0, "boot time", as KVM's
  ``kvm_write_wall_clock`` writes it), computed at write time only.

Version seqlock: the host makes the version odd, updates, then makes it even; here the
update is one atomic assignment, so the odd value exists only "transiently" inside
:meth:`KvmClock.republish` and is never observable.  Every visible version is even
and each re-publication adds 2 (u32, wrapping), so a guest can tell publications apart.

Devices that convert guest ktime to host time through ``VcpuState.pvclock`` (the PV
timer) must recompute their armed expiries when it changes: register them with
:meth:`KvmClock.add_listener`.

Everything is gated on ``Feature.PVCLOCK`` in the vCPU's negotiated features: without it
the four MSRs raise #GP, as KVM does when the guest lacks the CLOCKSOURCE(2) CPUID bit.
GPA alignment is not checked (KVM does not #GP on it either).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vtick.host.faults import GuestFault
from vtick.host.machine import Machine, VcpuState
from vtick.proto.abi import Fault, Feature, Msr
from vtick.proto.clockmath import NSEC_PER_SEC, U32_MASK

__all__ = ["KvmClock", "WallClock", "KVMCLOCK_ENABLE"]

#: MSR_KVM_SYSTEM_TIME(_NEW) bit 0
KVMCLOCK_ENABLE = 1 << 0

#: listener(vcpu_state, now): the vCPU's pvclock was just re-published
RepublishListener = Callable[[VcpuState, int], None]


@dataclass(frozen=True, slots=True)
class WallClock:
    """``pvclock_wall_clock``: u32 version, u32 sec, u32 nsec (wall time at guest ktime 0)."""

    version: int
    sec: int
    nsec: int


class KvmClock:
    """Registers the kvmclock MSRs on ``machine``.

    Args:
        machine: the VM; its ``tsc`` model computes every publication.
        realtime_offset_ns: host CLOCK_REALTIME minus CLOCK_MONOTONIC, read once by the
            server (the model itself reads no clock); used for the wall-clock struct.
    """

    def __init__(self, machine: Machine, realtime_offset_ns: int = 0) -> None:
        self.machine = machine
        self.realtime_offset_ns = realtime_offset_ns
        self.system_time = [0] * len(machine.vcpus)  # MSR value per vCPU
        self.wall_clock_gpa = 0  # MSR value (per VM)
        self.wall_clock: WallClock | None = None
        #: vCPU ids whose pvclock changed and must get a ``pvclock`` message, in order,
        #: each at most once; the server drains it with :meth:`take_publications`
        self.pending_publications: list[int] = []
        #: re-publications per vCPU
        self.publications = [0] * len(machine.vcpus)
        self._listeners: list[RepublishListener] = []
        machine.devices["kvmclock"] = self
        machine.register_msr(
            Msr.MSR_KVM_WALL_CLOCK, Msr.MSR_KVM_SYSTEM_TIME, self.rdmsr, self.wrmsr, "kvmclock"
        )
        machine.register_msr(
            Msr.MSR_KVM_WALL_CLOCK_NEW,
            Msr.MSR_KVM_SYSTEM_TIME_NEW,
            self.rdmsr,
            self.wrmsr,
            "kvmclock-new",
        )

    # ------------------------------------------------------------------ API for the host

    def add_listener(self, listener: RepublishListener) -> None:
        """Call ``listener(vcpu, now)`` after each re-publication (in registration order)."""
        self._listeners.append(listener)

    def enabled(self, vcpu: VcpuState) -> bool:
        return bool(self.system_time[vcpu.vcpu] & KVMCLOCK_ENABLE)

    def republish(self, vcpu: VcpuState, now: int) -> bool:
        """Re-publish ``vcpu``'s pvclock at ``now`` if the guest enabled kvmclock.

        Returns:
            True if published (the vCPU is queued in :attr:`pending_publications`).
        """
        if not self.enabled(vcpu):
            return False
        # KVM: version |= 1 (odd: "update in progress"), write the fields, version += 1.
        # Here the fields change in one assignment, so the odd value is never visible.
        version = (vcpu.pvclock.version + 2) & U32_MASK & ~1
        if self.machine.mutations.on("pvclock-odd-version"):
            version |= 1  # mutation: the odd "update in progress" version is published
        vcpu.pvclock = self.machine.tsc.publish(now, version)
        self.publications[vcpu.vcpu] += 1
        if vcpu.vcpu not in self.pending_publications:
            self.pending_publications.append(vcpu.vcpu)
        for listener in self._listeners:
            listener(vcpu, now)
        return True

    def republish_all(self, now: int) -> list[int]:
        """Re-publish every enabled vCPU (e.g. after the host re-estimated a clock offset)."""
        return [s.vcpu for s in self.machine.vcpus if self.republish(s, now)]

    def take_publications(self) -> list[int]:
        """Drain :attr:`pending_publications`: send each vCPU a ``pvclock`` message."""
        out, self.pending_publications = self.pending_publications, []
        return out

    # ------------------------------------------------------------------ MSR handlers

    @staticmethod
    def _check(vcpu: VcpuState) -> None:
        if not vcpu.features & Feature.PVCLOCK:
            raise GuestFault(Fault.GP, "kvmclock not negotiated")

    def rdmsr(self, vcpu: VcpuState, msr: int, now: int) -> int:
        self._check(vcpu)
        if msr in (Msr.MSR_KVM_SYSTEM_TIME, Msr.MSR_KVM_SYSTEM_TIME_NEW):
            return self.system_time[vcpu.vcpu]
        return self.wall_clock_gpa

    def wrmsr(self, vcpu: VcpuState, msr: int, value: int, now: int) -> None:
        self._check(vcpu)
        if msr in (Msr.MSR_KVM_SYSTEM_TIME, Msr.MSR_KVM_SYSTEM_TIME_NEW):
            self.system_time[vcpu.vcpu] = value
            self.republish(vcpu, now)  # no-op when bit 0 is clear: updates stop
            return
        self.wall_clock_gpa = value
        self._write_wall_clock(now)

    def _write_wall_clock(self, now: int) -> None:
        # KVM kvm_write_wall_clock: wall = realtime now - kvmclock now (the boot time).
        realtime = now + self.realtime_offset_ns
        kvmclock_ns = now - self.machine.tsc.ktime_epoch
        boot = realtime - kvmclock_ns
        sec, nsec = divmod(boot, NSEC_PER_SEC)
        version = 2 if self.wall_clock is None else (self.wall_clock.version + 2) & U32_MASK
        self.wall_clock = WallClock(version=version, sec=sec & U32_MASK, nsec=nsec)

    # ------------------------------------------------------------------ migration (issue 13)

    def save(self, now: int) -> dict[str, Any]:
        """The VM-wide part (CDDL ``kvmclock-vm``): the wall-clock MSR and the
        ``pvclock_wall_clock`` the guest last got (guest memory travels with the VM).
        ``realtime_offset_ns`` is the host's own and stays; ``publications`` is a counter."""
        state: dict[str, Any] = {"wall_clock_gpa": self.wall_clock_gpa}
        if self.wall_clock is not None:
            wc = self.wall_clock
            state["wall_clock"] = {"version": wc.version, "sec": wc.sec, "nsec": wc.nsec}
        return state

    def restore(self, state: dict[str, Any], now: int) -> None:
        self.wall_clock_gpa = state["wall_clock_gpa"]
        wc = state.get("wall_clock")
        self.wall_clock = None if wc is None else WallClock(wc["version"], wc["sec"], wc["nsec"])

    def save_vcpu(self, vcpu: int, now: int) -> dict[str, Any]:
        """One vCPU's system-time MSR (enable bit included; CDDL ``kvmclock-vcpu``).

        The vCPU's last publication travels in the clock section (``clock.pvclock``);
        ``pending_publications`` does not travel: the destination re-publishes every
        enabled vCPU anyway (:meth:`republish_all`), as KVM raises KVM_REQ_CLOCK_UPDATE
        on every vCPU after KVM_SET_CLOCK.
        """
        return {"system_time": self.system_time[vcpu]}

    def restore_vcpu(self, vcpu: int, state: dict[str, Any], now: int) -> None:
        """Load the MSR only; the caller re-publishes once every device is restored
        (a re-publication calls the listeners, e.g. the PV timer)."""
        self.system_time[vcpu] = state["system_time"]
