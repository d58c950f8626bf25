"""Names both sides agree on: timer modes, APIC access variants, IPI paths, workloads and
preemption points.

They travel in ``welcome`` (``mode``, ``apic``, ``ipi``, ``workload``) and on the command
lines of ``vtick run``, ``vtick host`` and ``vtick guest``, so they are protocol facts and
live here, once.  The guest keys its implementations by these names and checks at import
that it implements exactly these (``vtick.guest.kernel``, ``vtick.guest.apic``,
``vtick.guest.workload``); the host validates options against them without importing the
guest.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "APIC_NAMES",
    "IPI_VARIANT_NAMES",
    "MODE_NAMES",
    "PREEMPT_CSD_WAIT",
    "PREEMPT_DELTA_TO_DEVICE",
    "PREEMPT_ICR_IDLE_TO_WRITE",
    "PREEMPTION_POINTS",
    "WORKLOAD_NAMES",
    "WORKLOAD_PARAMS",
    "WorkloadParam",
]

#: timer modes: how the guest programs its clock-event device (docs/guest.md)
MODE_NAMES = (
    "lapic-xapic",
    "lapic-x2apic",
    "lapic-periodic",
    "tsc-deadline",
    "vmi",
    "pv-ktime",
    "pv-delta",
    "pv-future",
)

#: APIC access variants (the guest's ``struct apic`` ops tables)
APIC_NAMES = ("xapic", "x2apic", "vmi", "kvm-pv")

#: IPI paths for smp_call_function
IPI_VARIANT_NAMES = ("xapic-shortcut", "xapic-mask", "x2apic", "pv")

#: guest workloads
WORKLOAD_NAMES = ("timers", "tick", "ipi", "mixed")


@dataclass(frozen=True)
class WorkloadParam:
    """One ``--param NAME=INT``: its default, its allowed range and who reads it."""

    default: int
    lowest: int
    highest: int
    workloads: tuple[str, ...]
    meaning: str


#: workload parameters, travelling in ``welcome.params``: the guest takes its defaults
#: from here and the command line checks names and ranges before any process starts
#: (the timer storm also needs min_ns < max_ns)
WORKLOAD_PARAMS: dict[str, WorkloadParam] = {
    "timers": WorkloadParam(8, 1, 4096, ("timers", "mixed"), "hrtimers per vCPU"),
    "min_ns": WorkloadParam(
        100_000, 1_000, 10_000_000_000, ("timers", "mixed"), "shortest timer delay"
    ),
    "max_ns": WorkloadParam(
        2_000_000, 1_001, 10_000_000_000, ("timers", "mixed"), "longest timer delay"
    ),
    "churn_pct": WorkloadParam(
        10, 0, 100, ("timers", "mixed"), "% of boundaries that cancel or re-arm a timer"
    ),
    "pause_ns": WorkloadParam(0, 0, 10_000_000_000, ("ipi",), "pause between IPI storm calls"),
    "ipi_every_ns": WorkloadParam(
        2_000_000, 10_000, 10_000_000_000, ("mixed",), "smp_call_function period"
    ),
    # Linux's smp.csd_lock_timeout (kernel/smp.c, CONFIG_CSD_LOCK_WAIT_DEBUG): 5000 ms
    # before a csd_lock_wait is reported as stuck.  A kernel boot parameter rather than a
    # workload's, but it travels to the guest the same way.
    "csd_lock_timeout_ms": WorkloadParam(
        5_000, 1, 300_000, ("ipi", "mixed"), "csd_lock_wait before a call is an error"
    ),
}

#: named places in the guest's kernel paths where a delay can be injected
PREEMPT_DELTA_TO_DEVICE = "clockevents.delta_to_device"
PREEMPT_ICR_IDLE_TO_WRITE = "apic.icr_idle_to_write"
PREEMPT_CSD_WAIT = "smp.csd_wait"
PREEMPTION_POINTS = (PREEMPT_DELTA_TO_DEVICE, PREEMPT_ICR_IDLE_TO_WRITE, PREEMPT_CSD_WAIT)
