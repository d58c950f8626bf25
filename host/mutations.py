"""Planted bugs: ``vtick host --mutate NAME`` breaks one documented behaviour on purpose.

A test aid, never a mode of measurement.  The chaos checkers and the conformance suite
are proven by catching each mutation: a checker that passes a mutated host checks
nothing.  A mutated host says so loudly on stderr at start, and its results carry the
names under ``config.mutations``, so no figure from such a run can pass for a real one.

Each mutation is registered in :data:`MUTATIONS` with the behaviour it breaks and what
must catch it; its hook lives at the place it breaks (a device model, the LAPIC, the
server's link handling) and asks ``mutations.on(NAME)`` or ``mutations.sometimes(NAME)``.
"Occasional" mutations draw from their own random stream seeded by the run's seed, so a
mutated run is reproducible and stays pure (no clock, no global state).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["MUTATIONS", "Mutation", "Mutations"]


@dataclass(frozen=True, slots=True)
class Mutation:
    name: str
    #: the documented behaviour it breaks
    breaks: str
    #: what must catch it (a chaos invariant or conformance case ids)
    caught_by: str
    #: for occasional mutations: act on about one in this many opportunities
    one_in: int = 1


#: every planted bug: one table; each hook cites its entry's name.  Entries are added
#: with their hooks (the chaos and conformance issues).
_TABLE: tuple[Mutation, ...] = (
    # ---- conformance (issue 11): `vtick conformance host --mutate NAME` fails these cases
    Mutation(
        "ignore-tdcr",
        "the LAPIC timer counts with the reset divisor (2) whatever TDCR says",
        "conformance lapic.timer.tdcr.{1,2,3,8,9,a,b}",
    ),
    Mutation(
        "x2apic-no-gp",
        "an x2APIC MSR that is reserved, read-only or write-only (or a reserved value) "
        "is read as 0 or ignored instead of raising #GP",
        "conformance x2apic.msr.gp.* (the MSRs not both readable and writable)",
    ),
    Mutation(
        "pvclock-odd-version",
        "kvmclock publishes its parameters with an odd version (update in progress)",
        "conformance pv.kvmclock.publish",
    ),
    Mutation(
        "periodic-no-clamp",
        "a periodic LAPIC timer period below 200 us is not raised to KVM's minimum",
        "conformance lapic.timer.periodic.min-period",
    ),
    Mutation(
        "replay-executes",
        "a duplicate (already delivered) sequenced frame is executed again",
        "conformance link.duplicate, link.replay.icr",
    ),
    Mutation(
        "online-mask-stale",
        "a vCPU coming online marks no other vCPU's view of cpu_online_mask stale: the "
        "others get the mask only at their next welcome",
        "conformance ipi.online-mask; tests/test_online_mask.py",
    ),
    # ---- end conformance
    # ---- chaos (issue 10): `vtick chaos --mutate NAME` exits 1 naming the invariant
    Mutation(
        "early-timer",
        "now and then a host timer (LAPIC, PV timer, VMI alarm) is armed 1 ms before the "
        "expiry its device asked for (so it fires early by up to that, less the host's own "
        "wake-up latency)",
        "chaos timer-not-early (invariant 1)",
        one_in=5,
    ),
    Mutation(
        "double-fire",
        "now and then a spent one-shot timer (LAPIC or PV) fires a second time 20 us later",
        "chaos timer-once (invariant 2)",
        one_in=10,
    ),
    Mutation(
        "drop-ipi",
        "now and then a fixed IPI (ICR write or KVM_HC_SEND_IPI) reaches no LAPIC",
        "chaos ipi-once (invariant 3)",
        one_in=20,
    ),
    Mutation(
        "lost-eoi",
        "now and then an EOI is ignored: the vector stays in service",
        "chaos lapic-consistent (invariant 5)",
        one_in=50,
    ),
    Mutation(
        "ack-before-exec",
        "now and then the link accepts (and so acknowledges) an exit that the host then "
        "never executes nor answers",
        "chaos no-silent-loss (invariants 6 and 8)",
        one_in=200,
    ),
    Mutation(
        "migration-drops-timers",
        "a live migration's destination does not re-arm the host timers it restored: a "
        "guest timer armed on the source never fires on the destination (issue 13)",
        "chaos timer-once on a migrated run (vtick chaos --migrate-at)",
    ),
    # ---- end chaos
)

#: every planted bug, by name
MUTATIONS: dict[str, Mutation] = {mutation.name: mutation for mutation in _TABLE}


#: sometimes() applies a mutation for the first time by this call at the latest
FIRST_BY = 5


class Mutations:
    """The mutations active in one host, with a reproducible stream for occasional ones.

    Raises:
        ValueError: an unknown name (one line naming the known ones).
    """

    def __init__(self, names: Iterable[str] = (), seed: int = 1) -> None:
        names = tuple(names)
        unknown = [n for n in names if n not in MUTATIONS]
        if unknown:
            known = ", ".join(sorted(MUTATIONS)) or "none"
            raise ValueError(f"unknown mutation {unknown[0]!r} (known: {known})")
        self.active = frozenset(names)
        self._rng = random.Random(f"vtick-mutations-{seed}")
        #: how often each active mutation acted
        self.applied: Counter[str] = Counter()
        #: calls to sometimes() per name
        self.calls: Counter[str] = Counter()

    def __bool__(self) -> bool:
        return bool(self.active)

    def on(self, name: str) -> bool:
        """True when ``name`` is active (counted as one application)."""
        if name not in self.active:
            return False
        self.applied[name] += 1
        return True

    def sometimes(self, name: str) -> bool:
        """True on about one in ``MUTATIONS[name].one_in`` calls while ``name`` is active."""
        if name not in self.active:
            return False
        self.calls[name] += 1
        # the first time is never left to chance: a short run (a chaos test's 35 IPIs
        # against one in 20) would otherwise escape about one time in six
        first = not self.applied[name] and self.calls[name] >= FIRST_BY
        if not first and self._rng.randrange(MUTATIONS[name].one_in) != 0:
            return False
        self.applied[name] += 1
        return True

    def as_dict(self) -> dict[str, int]:
        return {name: self.applied[name] for name in sorted(self.active)}
