"""Issue 14, defect 4: the host segfaulted inside nng while vCPUs dropped and re-dialed.

nng's Pair0 (1.6 to 1.11) lets a read that completes after its pipe was stopped mark a
message ready on the socket with no pipe behind it; the next receive dereferences NULL.
``proto/transport.py`` gives every socket a receive buffer, so such a message is queued
instead.  These soaks run the host's receive path (``PairEndpoint``) against a dialer
process that drops its pipe abruptly with frames in flight, in a child process so that a
SIGSEGV fails the test instead of killing pytest.  Without the workaround the same soak
crashes within a few hundred drops (``vtick bench drops --undo-fix``); the 20 000-drop
figure is a benchmark (``vtick bench drops``).
"""

from __future__ import annotations

import re

import pytest

from vtick.host.bench.drops import soak

pytestmark = pytest.mark.processes


def _check(drops: int, lclose: int = 0) -> dict[str, int]:
    status, out = soak(drops, lclose=lclose)
    assert status == 0, f"listener exited {status} (-11 = SIGSEGV)\n{out}"
    ok = re.search(r"^OK drops=(\d+) dialer_status=(-?\d+) (\{.*?\})", out, re.M)
    assert ok, out
    assert ok.group(2) == "0"
    assert f"dialer: drops={drops}" in out
    counts = {k: int(v) for k, v in re.findall(r"'(\w+)': (\d+)", ok.group(3))}
    return counts


def test_2000_abrupt_pipe_drops_in_a_row() -> None:
    counts = _check(2000)
    assert counts["added"] >= 2000
    assert counts["removed"] >= 2000


def test_drops_while_the_listener_also_closes_pipes() -> None:
    counts = _check(1000, lclose=7)  # as the host's _raw_reply closes pipes
    assert counts["closed"] > 0
