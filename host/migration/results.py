"""A migrated VM's results, from its two host processes (issue 13).

Shared by ``vtick run --migrate-at`` (host/lab/launcher.py, both hosts here over ipc) and
a topology's migration step (host/topology/controller.py, the destination host on any
machine of the topology).  Pure: dictionaries in, a dictionary out; reading and writing
the files is the caller's.

After a successful move the run's results are the destination's: it ran the VM to the
end and collected every vCPU's report, and its ``blackout_*`` figures are there.  The
source's own record (where it sent the VM, the offset it measured, how long saving and
the transfer took) and its per-vCPU host figures go under ``migration.source``.  When the
VM never moved (the transfer failed: the source says so in ``migration.ok: false`` and ran
the VM itself) the results are the source's alone.
"""

from __future__ import annotations

from typing import Any

__all__ = ["moved", "merge_migration", "SOURCE_VCPU_KEYS"]

#: what ``migration.source.vcpus`` keeps of each of the source's vCPU entries
SOURCE_VCPU_KEYS = ("vcpu", "host_exits", "link_errors", "frozen_frames", "link")


def moved(source: Any) -> bool:
    """Did the source hand its VM over (its results say so)?"""
    try:
        return bool(source.get("migration", {}).get("ok"))
    except AttributeError:
        return False


def merge_migration(source: dict[str, Any], dest: dict[str, Any] | None) -> dict[str, Any]:
    """The run's results: ``dest`` with the source's record under ``migration.source``
    (``dest`` is changed in place), or ``source`` itself if the VM never moved or the
    destination wrote nothing."""
    if not moved(source) or dest is None:
        return source
    dest.setdefault("migration", {})["source"] = {
        "record": source.get("migration"),
        "ok": source.get("ok"),
        "wall_ns": source.get("wall_ns"),
        "vcpus": [{k: v.get(k) for k in SOURCE_VCPU_KEYS} for v in source.get("vcpus", [])],
    }
    dest["ok"] = bool(dest.get("ok")) and bool(source.get("ok"))
    return dest
