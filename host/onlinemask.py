"""cpu_online_mask: the one page of guest memory every vCPU reads, which the host holds.

Theory of operation
-------------------
Linux's ``cpu_online_mask`` is one bitmap: a CPU that comes up sets its own bit
(``set_cpu_online``) and every CPU reads the bitmap when it picks the targets of a call.
vtick's vCPUs share no memory, so the page lives in the host (``docs/protocol.md`` §4.6):

* a vCPU that booted stores its bit with one ``cpu-online`` message (:meth:`store`): a
  store, not an exit, so nothing answers it.  A vCPU stores only its own bit; another
  number is refused (``ValueError``, recorded against the link);
* the host sends a vCPU the whole page in ``online-mask`` when that vCPU's view of it is
  stale.  A vCPU's *view* is the mask last sent to it, plus its own bit once it stored it
  (a CPU reads back its own store without the host).  Only an online vCPU's view goes
  stale: a CPU still booting does not read the mask (Linux's APs pick call targets only
  once they are online), and its own store brings it the page as it stands then.

Relaying each store to every other vCPU cost N(N-1) messages (65 280 at 256 vCPUs, a boot
that never ended).  Here the stores cost N messages and the masks are coalesced:

* right after every welcome (fresh or resumed, :meth:`welcomed`) the vCPU gets the page
  as it stands, once any bit is set (a new process starts from a view of itself alone);
* when the page changes every online vCPU's view is marked stale, and the host's link
  housekeeping (every ``LINK_TICK_NS``, 10 ms) sends each stale view the page at most
  once per tick (:meth:`due`), and to one vCPU no sooner than ``holdoff_ns`` after the
  previous mask it sent it.  vCPUs that come up in the same tick cost one mask per vCPU,
  not one per pair; with :func:`holdoff_for`'s hold-off (one tick per 16 vCPUs) a boot
  spread over time costs each vCPU about one mask per hold-off, so the VM at most about
  16 masks per tick, whatever its size;
* the full page (every vCPU online: the moment Linux enables IPI shorthands, and the
  guest its ALLBUT shortcut) goes out at the first tick after it, hold-off or not (once
  per vCPU: bits are never cleared).

Bits are never cleared: vtick models no CPU going offline.  A vCPU whose process is
replaced stores its bit again, which changes nothing; one that died stays online, and
the csds sent to it are answered by the host with an error (``relay_memory``).

Pure: no clock (time is an argument), no I/O; the host sends what :meth:`due` returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vtick.host.mutations import Mutations
from vtick.proto.cpumask import decode_mask, encode_mask, mask_cpus

__all__ = ["OnlineMask", "OnlineMaskStats", "holdoff_for", "VCPUS_PER_TICK"]

#: the hold-off grows by one housekeeping tick per this many vCPUs (see holdoff_for)
VCPUS_PER_TICK = 16


def holdoff_for(vcpus: int, tick_ns: int) -> int:
    """The shortest gap between two masks sent to one vCPU: one tick per 16 vCPUs.

    Up to 16 vCPUs a mask can follow every tick; a larger VM, whose boot takes longer on
    the same cores, waits longer between two masks to one vCPU, so the masks of a whole
    boot stay about N * (2 + boot time / hold-off), O(N), instead of N per tick.
    """
    return tick_ns * max(1, -(-vcpus // VCPUS_PER_TICK))


@dataclass
class OnlineMaskStats:
    #: cpu-online stores taken (a repeated one included), and refused
    stores: int = 0
    refused: int = 0
    #: online-mask messages handed out: at a welcome, and by the ticks
    welcome_masks: int = 0
    tick_masks: int = 0


class OnlineMask:
    """Args:
    vcpus: the VM's vCPUs (bit i = vCPU i).
    holdoff_ns: the shortest gap between two masks :meth:`due` hands out for one vCPU
        (0: one per tick at most, nothing more).
    mutations: the host's planted bugs (``online-mask-stale`` acts here).
    """

    def __init__(self, vcpus: int, holdoff_ns: int = 0, mutations: Mutations | None = None) -> None:
        self.vcpus = vcpus
        self.holdoff_ns = holdoff_ns
        self.mutations = mutations or Mutations()
        self.bits = 0
        self.stats = OnlineMaskStats()
        #: each vCPU's view: what it last read (sent to it, or its own store)
        self._view = [0] * vcpus
        #: when each vCPU was last sent the mask (None: never in this session)
        self._sent_at: list[int | None] = [None] * vcpus
        #: vCPUs whose view differs from the page
        self._stale: set[int] = set()

    @property
    def full(self) -> bool:
        return self.bits == (1 << self.vcpus) - 1

    def wire(self) -> bytes:
        """The page as ``online-mask.mask`` carries it."""
        return encode_mask(self.bits, self.vcpus)

    def load(self, data: bytes) -> None:
        """Restore the page (a migration's destination); every view becomes unknown, so
        each vCPU is sent the page when it resumes here.

        Raises:
            ValueError: not a mask of this VM (the message says why).
        """
        self.bits = decode_mask(data, self.vcpus)
        self._view = [0] * self.vcpus
        self._sent_at = [None] * self.vcpus
        self._stale.clear()

    def store(self, vcpu: int, cpu: int) -> bool:
        """vCPU ``vcpu`` stored ``cpu``'s bit (a ``cpu-online``).  Returns whether the
        page changed (then every online vCPU's view that lacks the bit is stale).

        Raises:
            ValueError: ``cpu`` is not the storing vCPU, or no vCPU of this VM.
        """
        if not 0 <= cpu < self.vcpus:
            self.stats.refused += 1
            raise ValueError(f"cpu-online for vCPU {cpu} refused: the VM has {self.vcpus}")
        if cpu != vcpu:
            self.stats.refused += 1
            raise ValueError(
                f"cpu-online for vCPU {cpu} refused: vCPU {vcpu} stores only its own bit"
            )
        self.stats.stores += 1
        bit = 1 << cpu
        self._view[vcpu] |= bit  # it reads its own store back
        changed = not self.bits & bit
        self.bits |= bit
        if changed and not self.mutations.on("online-mask-stale"):
            self._stale.update(mask_cpus(self.bits))  # the online vCPUs (itself too)
        if self._view[vcpu] == self.bits:
            self._stale.discard(vcpu)
        return changed

    def welcomed(self, vcpu: int, now: int) -> bytes | None:
        """A session began or resumed on ``vcpu``: the page to send right after the
        welcome (None while no bit is set: the vCPU's own view says as much)."""
        self._stale.discard(vcpu)
        if not self.bits:
            self._view[vcpu] = 0
            self._sent_at[vcpu] = None
            return None
        self._view[vcpu] = self.bits
        self._sent_at[vcpu] = now
        self.stats.welcome_masks += 1
        return self.wire()

    def pending(self) -> bool:
        """Are views stale (the housekeeping must come again)?"""
        return bool(self._stale)

    def due(self, now: int, up: Callable[[int], bool]) -> list[tuple[int, bytes]]:
        """One housekeeping tick: (vCPU, mask) for each stale view to send now.

        ``up(vcpu)``: the vCPU has a session that takes messages.  A stale view on a
        vCPU without one is dropped (its next welcome brings the page); one held off
        waits for a later tick.
        """
        if not self._stale:
            return []
        full = self.full
        out: list[tuple[int, bytes]] = []
        wire = b""
        for vcpu in sorted(self._stale):
            if not up(vcpu):
                self._stale.discard(vcpu)
                continue
            sent = self._sent_at[vcpu]
            if not full and sent is not None and now - sent < self.holdoff_ns:
                continue  # held off: a later tick sends the page as it stands then
            wire = wire or self.wire()
            self._view[vcpu] = self.bits
            self._sent_at[vcpu] = now
            self._stale.discard(vcpu)
            out.append((vcpu, wire))
        self.stats.tick_masks += len(out)
        return out
