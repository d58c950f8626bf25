"""The local APIC device model: pure, KVM-faithful, one :class:`Lapic` per vCPU.

The register table and constants live in :mod:`vtick.proto.apicdef` (shared with the
guest's APIC drivers, as Linux shares ``apicdef.h``); ``lapic`` is the per-vCPU state
machine, ``port`` the host interface it calls, ``delivery`` IPI destination matching.
"""

from vtick.host.lapic.delivery import deliver as deliver
from vtick.host.lapic.delivery import match_destinations as match_destinations
from vtick.host.lapic.delivery import route as route
from vtick.host.lapic.lapic import Lapic as Lapic
from vtick.host.lapic.lapic import LapicStats as LapicStats
from vtick.host.lapic.port import LapicPort as LapicPort
from vtick.proto.apicdef import DeliveryMode as DeliveryMode

__all__ = [
    "DeliveryMode",
    "Lapic",
    "LapicPort",
    "LapicStats",
    "deliver",
    "match_destinations",
    "route",
]
