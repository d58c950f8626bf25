"""The host suite: every host case, in the order ``vtick conformance host`` runs them."""

from __future__ import annotations

from vtick.host.conformance import (
    cases_codec,
    cases_handshake,
    cases_ipi,
    cases_lapic,
    cases_link,
    cases_pv,
    cases_shutdown,
    cases_timer,
)
from vtick.host.conformance.case import Case

__all__ = ["HOST_CASES"]

#: handshake first (it checks what every later case relies on), shutdown last
HOST_CASES: tuple[Case, ...] = tuple(
    case
    for module in (
        cases_handshake,
        cases_codec,
        cases_link,
        cases_lapic,
        cases_timer,
        cases_ipi,
        cases_pv,
        cases_shutdown,
    )
    for case in module.CASES.cases
)


def _unique() -> None:
    ids = [c.id for c in HOST_CASES]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ImportError(f"conformance case ids defined twice: {duplicates}")


_unique()
