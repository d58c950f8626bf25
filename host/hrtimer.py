"""Host hrtimers: every armed host timer for every vCPU, ordered by exact expiry.

The host device models arm and cancel through this API and keep no queue of their own,
as KVM's LAPIC uses the kernel's hrtimer.  The contract:

* ``arm(handle, expiry)`` arms a timer for absolute host time ``expiry`` (integer ns);
  arming an armed handle re-arms it (the old expiry is forgotten).  ``expiry`` may be in
  the past: the timer then fires at the next ``expire``.
* ``cancel(handle)`` disarms it and says whether it was armed.
* ``next_expiry()`` is the exact earliest armed expiry: the event loop sleeps until then.
* ``expire(now)`` disarms and returns every timer with ``expiry <= now``, ordered by
  expiry, equal expiries in arming order (FIFO; a re-arm counts as a new arming).  A timer
  never fires before its expiry, and the structure never makes one late: if the loop calls
  ``expire(next_expiry())`` it fires exactly at its expiry, to the nanosecond.

Theory of operation
===================

The structure is a hierarchical timing wheel (Varghese & Lauck) over absolute time, with
an exact heap in front of it for the present, and a heap of far-future timers behind it.

**Ticks and the cursor.**  Time is cut into *ticks* of ``2**tick_shift`` ns; a timer's
tick is ``expiry >> tick_shift``.  The wheel keeps a *cursor* tick, which starts at 0 and
never decreases.  It is not a clock read: it moves when the wheel hands timers down (see
*Cascading*), and ``expire(now)`` moves it up to ``now``'s tick when that skips no armed
timer.  Every armed timer lives in exactly one of three places, chosen from its tick ``t``
and the cursor ``c``:

* the **near heap** if ``t <= c``: the current tick and the past (negative expiries
  included).  A binary heap ordered by ``(expiry, arming order)``, so this part is exact
  to the nanosecond and FIFO at equal expiries.  It holds the timers of one tick plus
  late arrivals, so it stays small.
* a **wheel bucket** if ``t > c`` and ``t`` lies in the cursor's *epoch* (the same
  ``levels * level_bits`` tick bits above those).  Level ``L`` has ``2**level_bits``
  buckets, each spanning ``2**(L*level_bits)`` ticks: level 0 buckets are one tick wide,
  and each level up is ``2**level_bits`` times coarser.  A timer goes to the level of the
  highest ``level_bits``-bit digit in which ``t`` differs from ``c``, and to the bucket
  named by ``t``'s digit at that level.  ``t`` and ``c`` agree on every digit above, and
  ``t > c``, so ``t``'s digit there is larger than the cursor's: every occupied bucket lies
  ahead of the cursor, and every timer on a lower level is earlier than every timer on a
  higher one.  The next timers are therefore in the lowest occupied bucket of the lowest
  occupied level (a bitmap per level finds it with two integer operations).
* the **overflow heap** if ``t`` lies in a later epoch: beyond the top level's reach
  (with the default geometry, beyond ``2**64`` ns: in practice never).

The default geometry has ticks of ``2**16`` ns (65.536 us) and 8 levels of 64 buckets;
bucket widths are 65.5 us, 4.2 ms, 268 ms, 17.2 s, 18.3 min, ... up to the ``2**64`` ns
reach.  The tick was chosen with ``vtick bench wheel``: it keeps the near heap to one tick's
worth of timers while sparing most timers a cascade.

**Cascading.**  When the near heap is empty and the lowest occupied bucket is due (for
``expire``) or its timers are needed (for ``next_expiry``), the cursor jumps to that
bucket's first tick and the bucket's timers are handed down: placed again against the new
cursor, each lands on a lower level (a finer bucket) or, once its own tick is reached, in
the near heap.  Every timer still on the wheel stays correctly placed across the jump: the
cursor's digits only change at and below the emptied bucket's level, where nothing
earlier is left.  The placement is a pure function of ``(t, c)``, so a timer's bucket is
recomputed, not stored, to cancel it; and equal expiries always share a bucket, so they
cascade together and reach the near heap together.  An armed timer is handed down at most
once per level (``levels`` is 8 by default): arming, cancelling and re-arming a timer on
the wheel are O(1) dictionary operations (each bucket is a dict used as a set), and most
cancelled timers - the normal life of an hrtimer - never reach a heap at all.  The overflow
heap is drained into the wheel when the wheel runs dry and the cursor enters a new epoch.

**Why it is exact.**  Buckets never decide when a timer fires; they only decide when its
timers move closer.  A timer fires only from the near heap, which orders by exact expiry
and arming order.  A bucket is emptied as soon as its first tick is due (``expire``) or
as soon as nothing earlier is armed (``next_expiry``), so no coarse bucket ever hides a
timer that is due or earlier than the one reported: the near heap's top is the global
minimum whenever it is not empty, since it holds only ticks ``<= c`` and the wheel only
ticks ``> c``.  Unlike the Linux timer wheel (no cascading, expiry rounded up to the
bucket: up to 1/8 of the timeout late), there is no slack to model or report.

**Costs and limits.**  ``next_expiry`` is O(1) when the near heap has a live top.  Cancels
and re-arms of timers on the wheel delete them from their bucket at once.  Re-arms
and cancels of timers already in the near heap leave a stale heap entry behind (lazy
deletion); stale entries are dropped when they surface, and the heap is compacted if they
outnumber the live ones.  ``next_expiry`` may move the cursor ahead of real time (up to the
earliest expiry); timers armed before that point meanwhile go to the near heap, which
then behaves like a plain heap for them.  Nothing here reads a clock or does I/O.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable

__all__ = ["HrtimerQueue"]

#: default tick: 2**16 ns (65.536 us), the width of a level-0 bucket
DEFAULT_TICK_SHIFT = 16
#: default digit width: 2**6 = 64 buckets per level (as Linux and Varghese & Lauck's examples)
DEFAULT_LEVEL_BITS = 6
#: reach of the wheel in ns with the default geometry, from ``tick_shift + levels * level_bits``
WHEEL_REACH_BITS = 64

# One armed timer: (expiry, arming order, handle).  The same tuple object is the value in
# ``_timers``, in its bucket and in a heap; a heap entry is live only if it *is* the
# handle's current entry, and arming orders are unique, so handles are never compared.
_Entry = tuple[int, int, Hashable]

_heappush = heapq.heappush
_heappop = heapq.heappop


class HrtimerQueue:
    """Exact timer queue keyed by an opaque, hashable timer handle (see the module doc).

    The keyword arguments set the wheel geometry (the defaults reach ``2**64`` ns with
    65.536 us level-0 buckets); they change costs only, never which timers fire or when.
    Tests use tiny geometries to reach every level, cascade and the overflow heap.
    """

    __slots__ = (
        "_armings",
        "_buckets",
        "_cursor",
        "_epoch_bits",
        "_level_bits",
        "_levels",
        "_near",
        "_near_stale",
        "_occupied",
        "_overflow",
        "_overflow_stale",
        "_place_of",
        "_slot_mask",
        "_tick_shift",
        "_timers",
    )

    def __init__(
        self,
        *,
        tick_shift: int = DEFAULT_TICK_SHIFT,
        level_bits: int = DEFAULT_LEVEL_BITS,
        levels: int | None = None,
    ) -> None:
        if tick_shift < 0 or level_bits < 1:
            raise ValueError("tick_shift must be >= 0 and level_bits >= 1")
        if levels is None:
            levels = max(1, -(-(WHEEL_REACH_BITS - tick_shift) // level_bits))
        if levels < 1:
            raise ValueError("levels must be >= 1")
        self._tick_shift = tick_shift
        self._level_bits = level_bits
        self._levels = levels
        self._slot_mask = (1 << level_bits) - 1
        #: a tick whose bits differ from the cursor's above this many is in a later epoch
        self._epoch_bits = levels * level_bits
        #: by the bit length of (tick ^ cursor): the timer's level and that level's digit
        #: shift (entry 0 is unused: a tick equal to the cursor's is in the near heap)
        self._place_of = tuple(
            ((n - 1) // level_bits, (n - 1) // level_bits * level_bits)
            for n in range(self._epoch_bits + 1)
        )
        #: bucket ``s`` of level ``L`` is ``_buckets[L << level_bits | s]``: handle -> entry
        self._buckets: list[dict[Hashable, _Entry]] = [{} for _ in range(levels << level_bits)]
        #: per level, bit ``s`` set iff bucket ``s`` is not empty
        self._occupied = [0] * levels
        self._cursor = 0
        self._near: list[_Entry] = []
        self._near_stale = 0
        self._overflow: list[_Entry] = []
        self._overflow_stale = 0
        self._timers: dict[Hashable, _Entry] = {}
        self._armings = 0  # the arming order of the latest arming

    def __len__(self) -> int:
        return len(self._timers)

    # ------------------------------------------------------------------ arm, cancel, query

    def arm(self, handle: Hashable, expiry: int) -> None:
        """Arm ``handle`` to fire at ``expiry`` ns; re-arming replaces the old expiry."""
        timers = self._timers
        old = timers.get(handle)
        self._armings = order = self._armings + 1
        timers[handle] = entry = (expiry, order, handle)
        if old is not None:
            self._unlink(old)  # after the replacement: a compaction must see ``old`` as stale
        tick = expiry >> self._tick_shift
        cursor = self._cursor
        if tick <= cursor:
            _heappush(self._near, entry)
            return
        bits = (tick ^ cursor).bit_length()
        if bits > self._epoch_bits:
            _heappush(self._overflow, entry)
            return
        level, shift = self._place_of[bits]
        slot = (tick >> shift) & self._slot_mask
        self._buckets[level << self._level_bits | slot][handle] = entry
        self._occupied[level] |= 1 << slot

    def cancel(self, handle: Hashable) -> bool:
        """Disarm ``handle``; True if it was armed."""
        entry = self._timers.pop(handle, None)
        if entry is None:
            return False
        self._unlink(entry)
        return True

    def expiry(self, handle: Hashable) -> int | None:
        """The expiry ``handle`` is armed for, or None."""
        entry = self._timers.get(handle)
        return None if entry is None else entry[0]

    def next_expiry(self) -> int | None:
        """The earliest armed expiry, exactly, for the event loop to sleep until."""
        timers = self._timers
        near = self._near
        while True:
            while near:
                entry = near[0]
                if timers.get(entry[2]) is entry:
                    return entry[0]
                _heappop(near)
                self._near_stale -= 1
            if not self._timers or not self._advance(None):
                return None

    def expire(self, now: int) -> list[Hashable]:
        """Disarm and return every timer with expiry <= ``now``: by expiry, then arming order."""
        fired: list[Hashable] = []
        timers = self._timers
        near = self._near
        while True:
            while near and near[0][0] <= now:
                entry = _heappop(near)
                handle = entry[2]
                if timers.get(handle) is entry:
                    del timers[handle]
                    fired.append(handle)
                else:
                    self._near_stale -= 1
            if near or not self._advance(now >> self._tick_shift):
                # Nothing left is due.  The near heap's entries (live or stale) expire
                # after ``now``; the wheel's and the overflow heap's ticks exceed the
                # cursor, which is at least the tick of anything pushed onto the near
                # heap, and ``_advance`` returned False: nothing starts by ``now``'s tick.
                return fired

    # ------------------------------------------------------------------ the wheel

    def _unlink(self, entry: _Entry) -> None:
        """Take ``entry``, no longer its handle's entry in ``_timers``, out of its place."""
        tick = entry[0] >> self._tick_shift
        cursor = self._cursor
        if tick <= cursor:
            self._near_stale += 1
            if self._near_stale > 64 and 2 * self._near_stale > len(self._near):
                self._near_stale = self._compact(self._near)
            return
        bits = (tick ^ cursor).bit_length()
        if bits > self._epoch_bits:
            self._overflow_stale += 1
            if self._overflow_stale > 64 and 2 * self._overflow_stale > len(self._overflow):
                self._overflow_stale = self._compact(self._overflow)
            return
        level, shift = self._place_of[bits]
        slot = (tick >> shift) & self._slot_mask
        bucket = self._buckets[level << self._level_bits | slot]
        del bucket[entry[2]]
        if not bucket:
            self._occupied[level] &= ~(1 << slot)

    def _compact(self, heap: list[_Entry]) -> int:
        """Drop stale entries from ``heap`` in place; the new stale count (0)."""
        timers = self._timers
        heap[:] = [e for e in heap if timers.get(e[2]) is e]
        heapq.heapify(heap)
        return 0

    def _advance(self, limit: int | None) -> bool:
        """With the near heap empty, bring the next timers closer; False if there are none.

        Cascades the lowest occupied bucket (or drains the overflow heap into the wheel),
        unless ``limit`` is given and that bucket starts after tick ``limit``: then the
        cursor moves up to ``limit`` instead (as far as it validly can) and nothing is due.
        """
        cursor = self._cursor
        if limit is not None and limit <= cursor:
            return False
        occupied = self._occupied
        level = 0
        for bitmap in occupied:
            if bitmap:
                break
            level += 1
        else:
            return self._advance_overflow(limit)
        level_bits = self._level_bits
        slot = (bitmap & -bitmap).bit_length() - 1
        shift = level * level_bits
        above = shift + level_bits
        start = ((cursor >> above) << above) | (slot << shift)
        if limit is not None and start > limit:
            # Every occupied bucket starts after ``limit``: moving the cursor up to it
            # keeps every timer in the bucket it is in (same digits above each level).
            self._cursor = limit
            return False
        occupied[level] = bitmap & ~(1 << slot)
        buckets = self._buckets
        index = level << level_bits | slot
        bucket = buckets[index]
        buckets[index] = {}
        self._cursor = start
        near = self._near
        if level == 0:
            near.extend(bucket.values())  # the near heap is empty: one tick's timers
            heapq.heapify(near)
            return True
        tick_shift = self._tick_shift
        place_of = self._place_of
        slot_mask = self._slot_mask
        for handle, entry in bucket.items():
            tick = entry[0] >> tick_shift
            if tick == start:
                _heappush(near, entry)
                continue
            # ``tick`` and ``start`` differ only below this level: it goes lower
            lower, shift = place_of[(tick ^ start).bit_length()]
            slot = (tick >> shift) & slot_mask
            buckets[lower << level_bits | slot][handle] = entry
            occupied[lower] |= 1 << slot
        return True

    def _advance_overflow(self, limit: int | None) -> bool:
        """The wheel is empty: move into the epoch of the earliest far-future timer."""
        overflow = self._overflow
        timers = self._timers
        while overflow and timers.get(overflow[0][2]) is not overflow[0]:
            _heappop(overflow)
            self._overflow_stale -= 1
        if not overflow:
            if limit is not None:
                self._cursor = limit
            return False
        epoch_bits = self._epoch_bits
        epoch = (overflow[0][0] >> self._tick_shift) >> epoch_bits
        start = epoch << epoch_bits
        if limit is not None and start > limit:
            self._cursor = limit  # still before every overflow timer's epoch
            return False
        self._cursor = start
        # Move every timer of the new epoch onto the wheel (or the near heap, for ``start``).
        near = self._near
        pulled: list[_Entry] = []
        while overflow and (overflow[0][0] >> self._tick_shift) >> epoch_bits == epoch:
            entry = _heappop(overflow)
            if timers.get(entry[2]) is entry:
                pulled.append(entry)
            else:
                self._overflow_stale -= 1
        for entry in pulled:
            tick = entry[0] >> self._tick_shift
            if tick == start:
                _heappush(near, entry)
                continue
            level, shift = self._place_of[(tick ^ start).bit_length()]
            slot = (tick >> shift) & self._slot_mask
            self._buckets[level << self._level_bits | slot][entry[2]] = entry
            self._occupied[level] |= 1 << slot
        return True
