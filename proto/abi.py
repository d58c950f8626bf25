"""Numbers both ends agree on: protocol version, feature bits, hypercalls, vectors, errnos.

Hypercall numbers and error codes follow KVM where KVM has them
(reference section 7: ``KVM_HC_SEND_IPI`` = 10, ``-KVM_ENOSYS`` = -1000, ...).  KVM has
no paravirtual clock-event hypercall, so vtick's own live in a range KVM does not use,
marked by the ASCII tag "VT" in bits 31:16.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

__all__ = [
    "PROTOCOL_VERSION",
    "Feature",
    "Hypercall",
    "KvmErrno",
    "ETIME",
    "PV_TIMER_FUTURE",
    "Vector",
    "Fault",
]

#: Highest protocol version this implementation speaks.
PROTOCOL_VERSION = 1


class Feature(IntFlag):
    """Feature bits negotiated in the handshake (hello.features AND host support)."""

    PVCLOCK = 1 << 0  # kvmclock parameters published to the vCPU
    PV_TIMER = 1 << 1  # the paravirtual clock-event device (set_next_ktime)


class Hypercall(IntEnum):
    """Hypercall numbers (RAX)."""

    KVM_HC_KICK_CPU = 5
    KVM_HC_SEND_IPI = 10
    KVM_HC_SCHED_YIELD = 11
    # vtick's paravirtual clock-event device: a0 = absolute expiry in guest ns
    # (CLOCK_MONOTONIC as read through kvmclock), a1 = flags (see PV_TIMER_FUTURE).
    VTICK_SET_NEXT_KTIME = 0x5654_0001
    # a0 = 0: stop the device (clockevents shutdown)
    VTICK_TIMER_SHUTDOWN = 0x5654_0002


#: Xen VCPU_SSHOTTMR_future: refuse a past expiry with -ETIME instead of firing at once.
PV_TIMER_FUTURE = 1 << 0


class KvmErrno(IntEnum):
    """KVM hypercall error numbers (returned negated in RAX)."""

    KVM_ENOSYS = 1000
    KVM_EFAULT = 14
    KVM_EINVAL = 22
    KVM_E2BIG = 7
    KVM_EPERM = 1
    KVM_EOPNOTSUPP = 95


#: Linux errno ETIME (the Xen single-shot timer's answer to a past expiry with "future").
ETIME = 62


class Vector(IntEnum):
    """Interrupt vectors, as x86 Linux numbers them (arch/x86/include/asm/irq_vectors.h)."""

    LOCAL_TIMER = 0xEC
    SPURIOUS = 0xFF


class Fault(IntEnum):
    """exit-reply.fault: the exception an access raised (0 = none)."""

    NONE = 0
    UD = 6
    GP = 13
