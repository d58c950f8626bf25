"""Architectural faults a device model can raise for the access being emulated."""

from __future__ import annotations

from vtick.proto.abi import Fault

__all__ = ["GuestFault"]


class GuestFault(Exception):
    """The emulated access raises an exception in the guest (e.g. #GP for a bad WRMSR).

    Device models raise it; the Machine turns it into ``exit-reply.fault`` and counts it.
    It never escapes the host.
    """

    def __init__(self, vector: int = Fault.GP, reason: str = "") -> None:
        super().__init__(reason or f"fault {vector}")
        self.vector = vector
        self.reason = reason
