"""Exit cost profiles: a modeled host handling cost per exit, added on top of the real one.

By default the host adds nothing: vtick measures its own real cost.  With a profile
(``--exit-cost NAME`` for a shipped one, or a path to a TOML file) the host delays each
exit's reply by the profile's cost for that exit, so the guest's measurements include it,
and reports the modeled cost next to the real one.  A profile has ``costs_ns`` by exit
kind (``mmio-write``, ``msr-write``, ``hypercall``, ...) and ``reasons_ns`` overrides by
exit reason (``wrmsr 0x80b``, ``mmio write 0xfee000b0``, ...), the same names the host's
accounting uses.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources

from vtick.host.accounting import exit_reason
from vtick.proto import messages as m

__all__ = ["ExitCostProfile", "load_profile", "SHIPPED_PROFILES"]

SHIPPED_PROFILES = ("kvm-2011-xapic", "x2apic", "apicv")


@dataclass(frozen=True)
class ExitCostProfile:
    name: str
    description: str = ""
    costs_ns: dict[str, int] = field(default_factory=dict)
    reasons_ns: dict[str, int] = field(default_factory=dict)

    def cost_ns(self, msg: m.Message) -> int:
        reason = exit_reason(msg)
        if reason in self.reasons_ns:
            return self.reasons_ns[reason]
        return self.costs_ns.get(m.EXIT_KIND_NAMES[type(msg)], 0)

    def as_dict(self) -> dict[str, object]:
        return {
            "profile": self.name,
            "description": self.description,
            "costs_ns": dict(self.costs_ns),
            "reasons_ns": dict(self.reasons_ns),
        }


def load_profile(name_or_path: str) -> ExitCostProfile:
    """A shipped profile by name, or a TOML file by path.

    Raises:
        ValueError: unknown name, unreadable file, or a malformed profile (the message
            says which).
    """
    if os.path.sep in name_or_path or name_or_path.endswith(".toml"):
        try:
            with open(name_or_path, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"exit-cost profile {name_or_path}: {exc}") from None
    elif name_or_path in SHIPPED_PROFILES:
        text = resources.files("vtick.host").joinpath(f"profiles/{name_or_path}.toml")
        data = tomllib.loads(text.read_text(encoding="utf-8"))
    else:
        raise ValueError(
            f"unknown exit-cost profile {name_or_path!r}: one of {', '.join(SHIPPED_PROFILES)} "
            "or a path to a .toml file"
        )
    kinds = set(m.EXIT_KIND_NAMES.values())
    costs = data.get("costs_ns", {})
    reasons = data.get("reasons_ns", {})
    for table, what in ((costs, "costs_ns"), (reasons, "reasons_ns")):
        if not isinstance(table, dict):
            raise ValueError(f"exit-cost profile {name_or_path}: {what} must be a table")
        for key, value in table.items():
            if type(value) is not int or not 0 <= value <= 1_000_000_000:
                raise ValueError(
                    f"exit-cost profile {name_or_path}: {what}.{key} must be 0..1e9 ns"
                )
    unknown = set(costs) - kinds
    if unknown:
        raise ValueError(
            f"exit-cost profile {name_or_path}: unknown exit kinds {sorted(unknown)}; "
            f"use {sorted(kinds)}"
        )
    return ExitCostProfile(
        name=str(data.get("name", os.path.basename(name_or_path))),
        description=str(data.get("description", "")),
        costs_ns=dict(costs),
        reasons_ns=dict(reasons),
    )
