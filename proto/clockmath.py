"""Fixed-point time math shared by host and guest: the one place for it.

Every function is bit-exact with the Linux or KVM routine of the same name, including
u32/u64 wrap-around (sources: docs/design.md section 8, rows 3, 7 and 8).  Python ints
do not wrap, so each intermediate that is a u32 or u64 in C is masked explicitly where
the C code could overflow.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ClockSample",
    "Offset",
    "estimate_offset",
    "NSEC_PER_SEC",
    "U32_MASK",
    "U64_MASK",
    "clocks_calc_mult_shift",
    "cev_delta2ns",
    "kvm_get_time_scale",
    "pvclock_scale_delta",
    "tdcr_divisor",
]

NSEC_PER_SEC = 1_000_000_000
U32_MASK = (1 << 32) - 1
U64_MASK = (1 << 64) - 1


def clocks_calc_mult_shift(from_hz: int, to_hz: int, maxsec: int) -> tuple[int, int]:
    """Linux ``clocks_calc_mult_shift``: mult/shift converting ``from_hz`` units to ``to_hz``.

    Picks the largest shift (at most 32) whose rounded mult still lets ``maxsec`` seconds
    of input be multiplied without overflowing 64 bits.

    Returns:
        ``(mult, shift)`` with ``to = (from * mult) >> shift``.
    """
    # sftacc: how many bits of mult may be used so that maxsec*from*mult fits in u64.
    tmp = ((maxsec * from_hz) & U64_MASK) >> 32
    sftacc = 32
    while tmp:
        tmp >>= 1
        sftacc -= 1
    # As in Linux, when no shift fits the loop ends with sft = 0 and mult keeps the
    # value computed for shift 1 (truncated to u32).
    tmp = 0
    sft = 32
    while sft > 0:
        tmp = ((to_hz << sft) & U64_MASK) + from_hz // 2
        tmp = (tmp & U64_MASK) // from_hz
        if (tmp >> sftacc) == 0:
            break
        sft -= 1
    return tmp & U32_MASK, sft


def cev_delta2ns(latch: int, mult: int, shift: int, ismax: bool) -> int:
    """Linux ``cev_delta2ns``: device ticks -> ns, rounded so the clamp is safe.

    For the minimum (``ismax`` false) the result is rounded up so that converting back
    gives at least ``latch`` ticks; for the maximum, rounding up is skipped when it could
    overflow unless ``mult > 1 << shift``.  Results below 1000 ns are raised to 1000
    ("deltas below 1 us are noise").
    """
    if mult == 0:
        mult = 1  # Linux: WARN_ON(!evt->mult) then evt->mult = 1
    clc = (latch << shift) & U64_MASK
    if (clc >> shift) != latch:
        clc = U64_MASK
    rnd = (mult - 1) & U64_MASK
    # Avoid rounding up when that would overflow, except for the max delta of a device
    # whose mult > (1 << shift), where the overflow is what the caller must see clamped.
    if (U64_MASK - clc) > rnd and (not ismax or mult <= (1 << shift)):
        clc += rnd
    clc //= mult
    return clc if clc > 1000 else 1000


def kvm_get_time_scale(scaled_hz: int, base_hz: int) -> tuple[int, int]:
    """KVM ``kvm_get_time_scale``: (shift, mul) so that scaled = (base << shift) * mul >> 32.

    Used by the host to publish kvmclock's ``tsc_shift``/``tsc_to_system_mul`` with
    ``scaled_hz = NSEC_PER_SEC`` and ``base_hz`` = the guest TSC frequency.

    Returns:
        ``(shift, mul)``: shift is a signed 8-bit value, mul a u32.
    """
    shift = 0
    tps64 = base_hz
    scaled64 = scaled_hz
    while tps64 > scaled64 * 2 or tps64 & 0xFFFFFFFF00000000:
        tps64 >>= 1
        shift -= 1
    tps32 = tps64 & U32_MASK
    while tps32 <= scaled64 or scaled64 & 0xFFFFFFFF00000000:
        if scaled64 & 0xFFFFFFFF00000000 or tps32 & 0x80000000:
            scaled64 >>= 1
        else:
            tps32 = (tps32 << 1) & U32_MASK
        shift += 1
    # div_frac(scaled64, tps32): (scaled64 << 32) / tps32, a 32-bit quotient.
    mul = ((scaled64 << 32) // tps32) & U32_MASK
    return shift, mul


def pvclock_scale_delta(delta: int, mul: int, shift: int) -> int:
    """pvclock ``pvclock_scale_delta``: TSC cycles -> ns with kvmclock's mul/shift.

    ``delta`` is shifted (right when shift < 0), then multiplied by the 32-bit fraction
    ``mul``; bits 95:32 of the 96-bit product are kept, as the x86 ``mul`` sequence does.
    """
    delta &= U64_MASK
    if shift < 0:
        delta >>= -shift
    else:
        delta = (delta << shift) & U64_MASK
    return ((delta * (mul & U32_MASK)) >> 32) & U64_MASK


def tdcr_divisor(tdcr: int) -> int:
    """LAPIC divide configuration register -> divisor (bits 0, 1 and 3; bit 2 ignored)."""
    return 1 << ((((tdcr & 3) | ((tdcr & 8) >> 1)) + 1) & 7)


# ---------------------------------------------------------------------- clock offsets
#
# Two processes on different machines read unrelated CLOCK_MONOTONICs.  A few ping
# exchanges estimate the offset: the sample with the smallest round trip is kept (NTP's
# rule: its midpoint is off by at most half that round trip), and an estimate smaller
# than the round trip cannot be told from zero, so it is taken as exactly 0: one machine
# keeps its exact clock.  The vCPU uses it against its host at the handshake
# (guest/clocksync.py), a source host against the destination of a migration
# (host/migration/).


@dataclass(frozen=True, slots=True)
class ClockSample:
    sent: int  # local clock when the ping left
    host: int  # the other side's clock when it answered
    received: int  # local clock when the pong arrived

    @property
    def rtt(self) -> int:
        return self.received - self.sent


@dataclass(frozen=True, slots=True)
class Offset:
    ns: int  # other clock - local clock
    rtt: int  # round trip of the sample it came from
    same_domain: bool  # indistinguishable from 0: one machine


def estimate_offset(samples: list[ClockSample]) -> Offset:
    """The offset (other - local) from the minimum-round-trip sample.

    Raises:
        ValueError: no samples.
    """
    if not samples:
        raise ValueError("no clock samples")
    best = min(samples, key=lambda s: s.rtt)
    offset = best.host - (best.sent + best.received) // 2
    if abs(offset) <= best.rtt:
        return Offset(0, best.rtt, True)
    return Offset(offset, best.rtt, False)
