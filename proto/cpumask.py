"""``cpu_online_mask`` on the wire: the page the host holds, as ``online-mask`` carries it.

Linux's ``cpu_online_mask`` is one bitmap every CPU reads.  vtick's vCPUs share no
memory, so the host holds it (``vtick.host.onlinemask``): a vCPU that comes online
stores its bit with ``cpu-online``, and the host sends each vCPU the whole mask in
``online-mask`` (``docs/protocol.md`` §4.6).  The layout is Linux's bitmap, byte-wise:
bit *i* (vCPU *i*) is bit ``i % 8`` of byte ``i // 8``, and the mask of a VM of *n*
vCPUs is exactly ``mask_size(n)`` bytes with no bit set at or beyond *n*.
"""

from __future__ import annotations

__all__ = ["mask_size", "encode_mask", "decode_mask", "mask_cpus"]


def mask_size(ncpus: int) -> int:
    """Bytes of the mask of a VM of ``ncpus`` vCPUs."""
    return max(1, (ncpus + 7) // 8)


def encode_mask(bits: int, ncpus: int) -> bytes:
    """The wire form of ``bits`` (bit i = vCPU i) for a VM of ``ncpus`` vCPUs."""
    if bits < 0 or bits >> ncpus:
        raise ValueError(f"mask {bits:#x} has a bit beyond vCPU {ncpus - 1}")
    return bits.to_bytes(mask_size(ncpus), "little")


def decode_mask(data: bytes, ncpus: int) -> int:
    """The bits of a wire mask, checked against a VM of ``ncpus`` vCPUs.

    Raises:
        ValueError: the mask is not ``mask_size(ncpus)`` bytes long, or sets a bit for a
            vCPU the VM does not have (the message says which).
    """
    size = mask_size(ncpus)
    if len(data) != size:
        raise ValueError(
            f"online-mask of {len(data)} bytes; a VM of {ncpus} vCPUs has a {size}-byte mask"
        )
    bits = int.from_bytes(data, "little")
    if bits >> ncpus:
        beyond = (bits >> ncpus).bit_length() - 1 + ncpus
        raise ValueError(f"online-mask sets vCPU {beyond}; the VM has {ncpus} (0..{ncpus - 1})")
    return bits


def mask_cpus(bits: int) -> set[int]:
    """The vCPU numbers whose bits are set."""
    cpus = set()
    while bits:
        low = bits & -bits
        cpus.add(low.bit_length() - 1)
        bits ^= low
    return cpus
