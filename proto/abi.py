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
    "VMI_ALARM_PERIODIC",
    "Msr",
    "PIT_HZ",
    "PitPort",
]

#: Highest protocol version this implementation speaks.
PROTOCOL_VERSION = 1


class Feature(IntFlag):
    """Feature bits negotiated in the handshake (hello.features AND host support)."""

    PVCLOCK = 1 << 0  # kvmclock parameters published to the vCPU
    PV_TIMER = 1 << 1  # the paravirtual clock-event device (set_next_ktime)
    VMI = 1 << 2  # VMI-style alarm in TSC cycles and apic_read/apic_write hypercalls
    PV_EOI = 1 << 3  # KVM PV EOI (KVM_FEATURE_PV_EOI): EOI by clearing a flag, no exit
    PV_SEND_IPI = 1 << 4  # KVM_HC_SEND_IPI (KVM_FEATURE_PV_SEND_IPI)


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
    # a0 = relative expiry in ns from the host's "now" in guest ktime (1:1, a signed s64),
    # a1 = flags (see PV_TIMER_FUTURE): the "pv-delta" mode
    VTICK_SET_NEXT_DELTA = 0x5654_0003
    # VMI-style alarm (VMI_CALL_SetAlarm 68 / CancelAlarm 69 in the original VMI ROM ABI):
    # a0 = absolute guest TSC deadline in cycles, a1 = flags (VMI_ALARM_PERIODIC),
    # a2 = period in cycles when periodic
    VTICK_VMI_SET_ALARM = 0x5654_0010
    # returns 1 if an alarm was pending (and is now cancelled), else 0
    VTICK_VMI_CANCEL_ALARM = 0x5654_0011
    # VMI's paravirtual APIC accessors (VMI_APICRead / VMI_APICWrite): a0 = register
    # offset in the APIC page, a1 = value (write); the read returns the value in RAX.
    VTICK_VMI_APIC_READ = 0x5654_0012
    VTICK_VMI_APIC_WRITE = 0x5654_0013


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
    CALL_FUNCTION_SINGLE = 0xFB
    CALL_FUNCTION = 0xFC
    RESCHEDULE = 0xFD
    SPURIOUS = 0xFF


class Fault(IntEnum):
    """exit-reply.fault: the exception an access raised (0 = none)."""

    NONE = 0
    UD = 6
    GP = 13


#: VTICK_VMI_SET_ALARM a1 bit 0: periodic alarm (a2 = period in TSC cycles); clear = one-shot.
VMI_ALARM_PERIODIC = 1 << 0


class Msr(IntEnum):
    """MSR indices the host models (reference section 7, kvmclock)."""

    MSR_KVM_WALL_CLOCK = 0x11  # legacy alias of MSR_KVM_WALL_CLOCK_NEW
    MSR_KVM_SYSTEM_TIME = 0x12  # legacy alias of MSR_KVM_SYSTEM_TIME_NEW
    MSR_KVM_WALL_CLOCK_NEW = 0x4B56_4D00
    MSR_KVM_SYSTEM_TIME_NEW = 0x4B56_4D01
    MSR_KVM_PV_EOI_EN = 0x4B56_4D04  # bit 0 enable, bit 1 reserved, 63:2 GPA of the flag


#: i8254 PIT input clock (Hz): CLOCK_TICK_RATE / PIT_TICK_RATE in Linux.
PIT_HZ = 1_193_182


class PitPort(IntEnum):
    """Legacy I/O ports of the i8254 PIT and of system control port B."""

    CHANNEL0 = 0x40
    CHANNEL1 = 0x41
    CHANNEL2 = 0x42
    MODE = 0x43  # control word / latch / read-back command (write only)
    PORT_B = 0x61  # bit 0 gate 2, bit 1 speaker data, bit 5 OUT2 (read)
