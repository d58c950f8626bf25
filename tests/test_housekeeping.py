"""The host's link housekeeping (issue 9): how often it runs for a VM's size, and a
session that ended with goodbyes is not failed when its process has left."""

from __future__ import annotations

import pytest
from test_online_mask import hello, host_of

from vtick.host.server import (
    LINK_TICK_MAX_NS,
    LINK_TICK_NS,
    NEVER,
    LinkState,
    link_tick_ns,
)
from vtick.proto import messages as m

T0 = 5_000_000_000
DEAD = 11_000_000_000  # past the link's dead timer (10 s)


@pytest.mark.parametrize(
    ("vcpus", "tick"),
    [(1, LINK_TICK_NS), (16, LINK_TICK_NS), (64, 4 * LINK_TICK_NS), (256, LINK_TICK_MAX_NS)],
)
def test_a_big_vm_looks_after_its_links_less_often(vcpus: int, tick: int) -> None:
    assert link_tick_ns(vcpus) == tick
    # about LINK_TICK_VCPUS link visits per 10 ms whatever the size, up to the cap
    assert vcpus * LINK_TICK_NS // link_tick_ns(vcpus) <= max(vcpus, 16)


@pytest.mark.parametrize("peer_left", [True, False])
async def test_a_finished_session_whose_process_left_is_not_a_lost_peer(peer_left: bool) -> None:
    with host_of(2) as host:
        vl = host.links[0]
        await hello(vl, T0)
        assert vl.link is not None
        vl.send(m.Goodbye(), T0)  # our goodbye, never acknowledged: the ack was lost
        vl.state = LinkState.DONE
        if peer_left:
            vl.removed_pipes.add(vl.session_pipe)  # nng: the process's pipe went
        host._link_housekeeping(T0 + DEAD)
        if peer_left:
            assert vl.errors == []
            assert vl.link is not None
        else:
            # its process still holds the pipe: slow, not lost (the rule for every link)
            assert vl.errors == []
            assert vl.link is not None
        # an open session whose process left is still a lost peer
        other = host.links[1]
        await hello(other, T0)
        assert other.link is not None
        other.send(m.Inject(vector=0x40, host_time=T0), T0)
        other.removed_pipes.add(other.session_pipe)
        assert host._link_housekeeping(T0 + DEAD) == NEVER or other.link is None
        assert other.link is None
        assert any("unacknowledged" in e for e in other.errors)
