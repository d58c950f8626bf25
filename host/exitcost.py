"""Exit cost profiles: a modeled host handling cost per exit, added on top of the real one.

By default the host adds nothing: vtick measures its own real cost.  With a profile
(``--exit-cost NAME`` for a shipped one, or a path to a TOML file) the host delays each
exit's reply by the profile's cost for that exit, so the guest's measurements include it,
and reports the modeled cost next to the real one.  A profile has ``costs_ns`` by exit
kind (``mmio-write``, ``msr-write``, ``hypercall``, ...) and ``reasons_ns`` overrides by
exit reason (``wrmsr 0x80b``, ``mmio write 0xfee000b0``, ...), the same names the host's
accounting uses.

A profile is read strictly: a misspelt table (``[cost_ns]``) or key would otherwise
silently mean "zero cost", the most misleading figure there is, so any key this module
does not know is an error that names the file and the key.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources

from vtick.host.accounting import exit_reason
from vtick.proto import messages as m

__all__ = ["ExitCostProfile", "load_profile", "SHIPPED_PROFILES"]

SHIPPED_PROFILES = ("kvm-2011-xapic", "x2apic", "apicv")
#: the keys a profile may have at its top level
PROFILE_KEYS = ("name", "description", "costs_ns", "reasons_ns")
#: an exit reason as host/accounting.py's exit_reason names it
_REASON = re.compile(
    r"(hypercall|rdmsr|wrmsr|mmio read|mmio write|in|out) 0x[0-9a-f]+"
    r"|hlt|mmio-read|mmio-write|msr-read|msr-write|pio-in|pio-out"
)


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
                raw = fh.read()
        except OSError as exc:
            raise ValueError(f"exit-cost profile {name_or_path}: {exc.strerror}") from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"exit-cost profile {name_or_path}: not UTF-8 text (byte {exc.start})"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"exit-cost profile {name_or_path}: {exc}") from None
    elif name_or_path in SHIPPED_PROFILES:
        text = resources.files("vtick.host").joinpath(f"profiles/{name_or_path}.toml")
        data = tomllib.loads(text.read_text(encoding="utf-8"))
    else:
        raise ValueError(
            f"unknown exit-cost profile {name_or_path!r}: one of {', '.join(SHIPPED_PROFILES)} "
            "or a path to a .toml file"
        )
    unknown_keys = sorted(set(data) - set(PROFILE_KEYS))
    if unknown_keys:
        raise ValueError(
            f"exit-cost profile {name_or_path}: unknown key or table {unknown_keys[0]!r}; "
            f"a profile has {', '.join(PROFILE_KEYS)}"
        )
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            raise ValueError(f"exit-cost profile {name_or_path}: {key} must be a string")
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
            f"exit-cost profile {name_or_path}: unknown exit kind costs_ns.{sorted(unknown)[0]}; "
            f"use {', '.join(sorted(kinds))}"
        )
    for reason in reasons:
        if not _REASON.fullmatch(reason):
            raise ValueError(
                f"exit-cost profile {name_or_path}: reasons_ns.{reason!r} is not an exit "
                "reason (such as 'wrmsr 0x80b', 'mmio write 0xfee000b0', 'hypercall 0x1')"
            )
    return ExitCostProfile(
        name=str(data.get("name", os.path.basename(name_or_path))),
        description=str(data.get("description", "")),
        costs_ns=dict(costs),
        reasons_ns=dict(reasons),
    )
