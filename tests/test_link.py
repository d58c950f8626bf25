"""The sans-I/O reliable link: order, acks, duplicates, gaps, timers, resume; integer time."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtick.proto import codec
from vtick.proto import messages as m
from vtick.proto.errors import ErrorCode, LinkError, RemoteProtocolError
from vtick.proto.link import ACK_EVERY, Link

RTO = 1_000
DEAD = 100_000
G = 100  # RFC 6298's G at the scale of these tests (the default is 20 ms)


def make(name: str, **kw) -> Link:
    kw.setdefault("rto_ns", RTO)
    kw.setdefault("dead_after_ns", DEAD)
    kw.setdefault("granularity_ns", G)
    return Link(name, **kw)


def inj(i: int) -> m.Inject:
    return m.Inject(vector=0xEC, host_time=i)


def send_all(link: Link, ids, now: int = 0) -> list[bytes]:
    for i in ids:
        link.send(inj(i), now)
    return link.data_to_send()


def deliver(dst: Link, frames, now: int = 0) -> list[m.Message]:
    out = []
    for frame in frames:
        out.extend(dst.receive(frame, now))
    return out


def frames_info(frames) -> list[tuple[str, int, int, object]]:
    """(rule, s, a, msg) of each frame, for assertions on what went on the wire."""
    return [(f.msg.RULE, f.seq, f.ack, f.msg) for f in map(codec.decode, frames)]


def test_in_order_delivery():
    """Sequenced messages get numbers 1, 2, ... and are delivered once, in order."""
    a, b = make("A"), make("B")
    frames = send_all(a, range(5))
    assert [s for _, s, _, _ in frames_info(frames)] == [1, 2, 3, 4, 5]
    assert deliver(b, frames) == [inj(i) for i in range(5)]
    assert b.stats.received == 5
    assert a.stats.sent == 5
    assert a.unacked() == 5
    assert a.unacked_range() == (1, 5)


def test_control_messages_are_not_sequenced():
    """Control kinds carry s = highest number used, are not kept, and are always delivered."""
    a, b = make("A"), make("B")
    send_all(a, range(2))
    a.send(m.Ack(), 0)
    [(rule, s, _, _)] = frames_info(a.data_to_send())
    assert (rule, s) == ("ack", 2)
    assert a.unacked() == 2
    b.send(m.Ack(), 0)
    assert deliver(a, b.data_to_send()) == [m.Ack()]


def test_piggybacked_ack_trims_unacked():
    """Every frame carries the cumulative ack; the peer drops exactly what it covers."""
    a, b = make("A"), make("B")
    frames = send_all(a, range(3))
    deliver(b, frames[:2])
    b.send(m.ExitHlt(), 5)
    reply = b.data_to_send()
    assert frames_info(reply)[0][2] == 2  # a = 2, piggybacked on a sequenced frame
    assert deliver(a, reply, now=5) == [m.ExitHlt()]
    assert a.peer_acked == 2
    assert a.unacked_range() == (3, 3)
    deliver(b, frames[2:])
    b.send(m.ExitHlt(), 6)
    deliver(a, b.data_to_send(), now=6)
    assert a.unacked() == 0
    assert a.unacked_range() is None
    assert a.next_deadline() is None


def test_ack_owed():
    """A bare ack is owed after ACK_EVERY deliveries, or after any with force; sending clears it."""
    a, b = make("A"), make("B")
    assert not b.ack_owed(force=True)
    deliver(b, send_all(a, range(ACK_EVERY - 1)))
    assert b.ack_owed(force=True)
    assert not b.ack_owed()
    deliver(b, send_all(a, [ACK_EVERY]))
    assert b.ack_owed()
    b.send(m.Ack(), 0)
    assert not b.ack_owed(force=True)
    deliver(a, b.data_to_send())
    assert a.unacked() == 0
    assert b.stats.acks_sent == 1


def test_duplicates_dropped_and_counted():
    """A frame already delivered (a retransmission that crossed an ack) is dropped and counted."""
    a, b = make("A"), make("B")
    frames = send_all(a, range(3))
    assert deliver(b, frames) == [inj(0), inj(1), inj(2)]
    assert deliver(b, frames) == []
    assert deliver(b, frames[1:2]) == []
    assert b.stats.duplicates == 4
    assert b.stats.received == 3
    assert b.stats.gaps == 0


def test_gap_triggers_resend_and_exactly_once_delivery():
    """A lost frame: the receiver asks Ack(resend) once, the sender goes back, all arrive once."""
    a, b = make("A"), make("B")
    frames = send_all(a, range(5))
    got = deliver(b, [frames[0], frames[2], frames[3], frames[4]])  # frame 2 lost
    assert got == [inj(0)]
    assert b.stats.gaps == 3
    request = b.data_to_send()
    assert frames_info(request) == [("ack", 0, 1, m.Ack(resend=True))]  # asked once, a = 1
    assert b.stats.resends_requested == 1
    assert deliver(a, request) == [m.Ack(resend=True)]
    resent = a.data_to_send()
    assert resent == frames[1:]
    assert a.stats.retransmitted == 4
    assert a.unacked_range() == (2, 5)
    got += deliver(b, resent)
    assert got == [inj(i) for i in range(5)]
    assert b.stats.received == 5
    b.send(m.Ack(), 0)
    deliver(a, b.data_to_send())
    assert a.unacked() == 0


def test_control_frame_reveals_gap():
    """An idle peer's control frame (s = highest used) shows a trailing loss; a resend follows."""
    a, b = make("A"), make("B")
    send_all(a, [1])  # lost
    a.send(m.Ack(), 0)
    assert deliver(b, a.data_to_send()) == [m.Ack()]
    assert frames_info(b.data_to_send()) == [("ack", 0, 0, m.Ack(resend=True))]


def test_rto_retransmission():
    """Unacknowledged frames are sent again once the timer, started by the oldest, expires
    (all of them here: fewer than RETRANSMIT_BURST)."""
    a = make("A")
    a.send(inj(0), 0)
    a.send(inj(1), 10)
    original = a.data_to_send()
    assert a.next_deadline() == RTO
    a.poll(RTO - 1)
    assert a.data_to_send() == []
    a.poll(RTO)
    assert a.data_to_send() == original
    assert a.stats.retransmitted == 2
    # no progress: the timeout doubles (RFC 6298 section 5.5), then doubles again
    assert a.next_deadline() == RTO + 2 * RTO
    a.poll(3 * RTO - 1)
    assert a.data_to_send() == []
    a.poll(3 * RTO)
    assert a.data_to_send() == original
    assert a.next_deadline() == 3 * RTO + 4 * RTO


def test_rto_backs_off_to_a_ceiling_and_keeps_it_until_a_sample():
    """A peer slower than the timeout is not sent frames again every rto_ns: the timeout
    doubles to MAX_RTO_NS; an ack of retransmitted frames only (no RTT sample, Karn) keeps
    the backed-off value; the next frame acknowledged gives a sample and the RTO collapses
    to the computed one (RFC 6298 section 5, last paragraph), not to rto_ns."""
    from vtick.proto.link import MAX_RTO_NS

    a, b = make("A", dead_after_ns=10**15), make("B")
    a.send(inj(0), 0)
    frames = a.data_to_send()
    now = 0
    for _ in range(30):  # never acknowledged: the timeout grows to the ceiling
        deadline = a.next_deadline()
        assert deadline is not None
        now = deadline
        a.poll(now)
        a.data_to_send()
    assert a.next_deadline() == now + MAX_RTO_NS
    assert a.stats.timeouts == 30
    deliver(b, frames)
    b.send(m.Ack(), now)
    deliver(a, b.data_to_send(), now=now)  # progress, but only a retransmitted frame
    assert a.stats.rtt_samples == 0
    a.send(inj(1), now)
    assert a.next_deadline() == now + MAX_RTO_NS  # still backed off
    deliver(b, a.data_to_send(), now=now)
    b.send(m.Ack(), now + 300)
    deliver(a, b.data_to_send(), now=now + 300)  # sampled: 300 ns
    assert (a.stats.rtt_samples, a.stats.srtt_ns, a.stats.rttvar_ns) == (1, 300, 150)
    a.send(inj(2), now + 400)
    assert a.next_deadline() == now + 400 + max(RTO, 300 + max(G, 4 * 150))


def test_dead_after_names_the_lost_range():
    """No ack progress for dead_after_ns is a LinkError naming the numbers and kinds lost."""
    a, b = make("A"), make("B")
    frames = send_all(a, range(4), now=0)
    a.send(m.ExitHlt(), 0)
    frames += a.data_to_send()
    deliver(b, frames[:1])
    b.send(m.Ack(), 30_000)
    deliver(a, b.data_to_send(), now=30_000)  # progress at 30 us: 1 acknowledged
    a.poll(30_000 + DEAD - 1)
    with pytest.raises(LinkError) as exc:
        a.poll(30_000 + DEAD)
    text = str(exc.value)
    assert "messages 2..5" in text
    assert "exit-hlt" in text
    assert "inject" in text
    assert text.startswith("A:")


def test_window_full_is_a_link_error():
    """A full send window raises LinkError instead of dropping; control kinds still go out."""
    a = make("A", window=3)
    send_all(a, range(3))
    with pytest.raises(LinkError, match="window of 3 full"):
        a.send(inj(3), 0)
    assert a.unacked() == 3
    a.send(m.Ack(), 0)
    assert len(a.data_to_send()) == 1


def test_resume_retransmits_exactly_the_unacked():
    """resume(peer_ack) re-sends every frame after peer_ack, byte for byte, and nothing else."""
    a = make("A")
    frames = send_all(a, range(5))
    a.resume(2, 7)
    assert a.data_to_send() == frames[2:]
    assert a.unacked_range() == (3, 5)
    assert a.peer_acked == 2
    a.resume(2, 8)
    assert a.data_to_send() == frames[2:]
    b = make("B")
    frames = send_all(b, range(3))
    b.resume(0, 1)
    assert b.data_to_send() == frames


def test_ack_beyond_sent_is_a_protocol_error():
    """An ack for a number never sent is the peer's protocol error, naming both numbers."""
    a = make("A")
    send_all(a, range(2))
    with pytest.raises(RemoteProtocolError) as exc:
        a.receive(codec.encode(m.Ack(), 0, 3), 0)
    assert exc.value.code is ErrorCode.UNEXPECTED
    assert "3" in str(exc.value)
    assert "only 2" in str(exc.value)
    with pytest.raises(RemoteProtocolError):
        a.resume(3, 0)
    a.receive(codec.encode(m.Ack(), 0, 2), 0)
    assert a.unacked() == 0


def test_lost_ack_is_acknowledged_again():
    """A duplicate means our ack was lost: the receiver must acknowledge again.

    Otherwise an idle receiver never re-acks, the sender retransmits every RTO and the
    link dies after dead_after_ns although nothing was lost.
    """
    a, b = make("A"), make("B")
    frames = send_all(a, [0], now=0)
    assert deliver(b, frames) == [inj(0)]
    assert b.ack_owed(force=True)
    b.send(m.Ack(), 0)
    b.data_to_send()  # the bare ack is lost
    a.poll(RTO)
    assert deliver(b, a.data_to_send(), now=RTO) == []  # the retransmission is a duplicate
    queued = b.data_to_send()
    if b.ack_owed(force=True):
        b.send(m.Ack(), RTO)
        queued += b.data_to_send()
    assert queued, "receiver neither queued nor owes an ack after a duplicate"
    deliver(a, queued, now=RTO)
    assert a.unacked() == 0


# ---------------------------------------------------------------- model-based


def run_lossy(a: Link, b: Link, plan, n_a: int, n_b: int, step_ns: int):
    """Drive two links over a lossy pipe until both have sent everything and all is acked.

    ``plan(i)`` gives the fate of the i-th frame put on the wire while loss is on:
    0 deliver, 1 drop, 2 duplicate (None once loss is over).  Returns the payloads each
    side received and whether the run went quiet.
    """
    got = {"A": [], "B": []}
    pending = {"A": list(range(n_a)), "B": list(range(1000, 1000 + n_b))}
    links = {"A": a, "B": b}
    now = 0
    frame_no = 0
    for _ in range(400):
        for name, link in links.items():
            if pending[name]:
                link.send(inj(pending[name].pop(0)), now)
        for src, dst in (("A", "B"), ("B", "A")):
            for frame in links[src].data_to_send():
                fate = plan(frame_no)
                frame_no += 1
                for _ in range({None: 1, 0: 1, 1: 0, 2: 2}[fate]):
                    for msg in links[dst].receive(frame, now):
                        if isinstance(msg, m.Inject):
                            got[dst].append(msg.host_time)
        for link in links.values():
            if link.ack_owed(force=True):
                link.send(m.Ack(), now)
            link.poll(now)
        now += step_ns
        quiet = not any(pending.values()) and a.unacked() == b.unacked() == 0
        if quiet and not a.ack_owed(force=True) and not b.ack_owed(force=True):
            return got, True
    return got, False


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_a=st.integers(1, 30),
    n_b=st.integers(0, 10),
    fates=st.lists(st.sampled_from([0, 0, 0, 1, 2]), max_size=120),
)
def test_random_loss_and_duplication_delivers_exactly_once(n_a, n_b, fates):
    """Whatever frames are dropped or duplicated, each message arrives exactly once, in order."""
    a = make("A", dead_after_ns=10**15)
    b = make("B", dead_after_ns=10**15)

    def plan(i):
        return fates[i] if i < len(fates) else None

    got, quiet = run_lossy(a, b, plan, n_a, n_b, step_ns=RTO // 4)
    assert got["B"] == list(range(n_a))
    assert got["A"] == list(range(1000, 1000 + n_b))
    assert quiet, f"not quiescent: A unacked {a.unacked_range()}, B unacked {b.unacked_range()}"
