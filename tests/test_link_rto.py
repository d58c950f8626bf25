"""The link's retransmission timer (RFC 6298) and bounded retransmission; integer time.

Unit tests pin the estimator to hand-computed values; simulations run two Links over
FIFO pipes (Pair0 keeps order on one pipe) with delays and drops, event by event.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtick.proto import codec
from vtick.proto import messages as m
from vtick.proto.link import (
    DEFAULT_RTO_NS,
    MAX_RTO_NS,
    RETRANSMIT_BURST,
    Link,
)

MS = 1_000_000
RTO = 1_000  # the small-scale tests' initial and minimum RTO
G = 100


def make(name: str, **kw) -> Link:
    kw.setdefault("rto_ns", RTO)
    kw.setdefault("granularity_ns", G)
    kw.setdefault("dead_after_ns", 10**15)
    return Link(name, **kw)


def inj(i: int) -> m.Inject:
    return m.Inject(vector=0xEC, host_time=i)


def ack_now(receiver: Link, frames: list[bytes], sender: Link, at: int) -> None:
    """``receiver`` gets ``frames`` and its bare ack reaches ``sender`` at ``at``."""
    for f in frames:
        receiver.receive(f, at)
    receiver.send(m.Ack(), at)
    for f in receiver.data_to_send():
        sender.receive(f, at)


def sample(a: Link, b: Link, sent_at: int, rtt: int) -> None:
    """One frame sent at ``sent_at`` and acknowledged ``rtt`` later: one RTT sample."""
    a.send(inj(sent_at), sent_at)
    ack_now(b, a.data_to_send(), a, sent_at + rtt)


def estimator(link: Link) -> tuple[int, int, int]:
    return link.stats.srtt_ns, link.stats.rttvar_ns, link.rto()


# ---------------------------------------------------------------- the estimator


def test_srtt_rttvar_and_rto_after_known_samples() -> None:
    """RFC 6298 section 2, by hand (G = 100 ns, floor 100 ns so it stays out of the way):

    R=800:  SRTT = 800, RTTVAR = 400, RTO = 800 + 4*400 = 2400 (2.2)
    R=1200: RTTVAR = 3/4*400 + 1/4*|800-1200| = 400, SRTT = 7/8*800 + 1/8*1200 = 850,
            RTO = 850 + 1600 = 2450 (2.3)
    R=400:  RTTVAR = 3/4*400 + 1/4*450 = 412.5, SRTT = 7/8*850 + 1/8*400 = 793.75,
            RTO = 793.75 + 1650 = 2443.75 -> 2443 (8*SRTT and 4*RTTVAR are exact integers)
    """
    a, b = make("A", rto_ns=100), make("B")
    assert estimator(a) == (0, 0, 100)  # before any sample: rto_ns (2.1)
    sample(a, b, 0, 800)
    assert estimator(a) == (800, 400, 2400)
    sample(a, b, 10_000, 1200)
    assert estimator(a) == (850, 400, 2450)
    sample(a, b, 20_000, 400)
    assert estimator(a) == (793, 412, 2443)
    assert a.stats.rtt_samples == 3
    assert a.stats.rto_ns == a.computed_rto() == 2443
    # the timer runs from the last progress (5.3), here the next frame's send (5.1)
    a.send(inj(0), 30_000)
    assert a.next_deadline() == 30_000 + 2443


def test_one_sample_per_ack_from_the_oldest_newly_acked_frame() -> None:
    """An ack covering three frames sent at 0, 100 and 200 gives one sample: the oldest's
    (what the timer, started by the oldest, waits for)."""
    a, b = make("A"), make("B")
    for t in (0, 100, 200):
        a.send(inj(t), t)
    ack_now(b, a.data_to_send(), a, 1000)
    assert a.stats.rtt_samples == 1
    assert a.stats.srtt_ns == 1000


def test_floor_cap_and_granularity() -> None:
    """RTO never below rto_ns (2.4) nor above MAX_RTO_NS (2.5); a steady RTT (RTTVAR
    decaying to 0) leaves RTO = SRTT + G, not SRTT."""
    a, b = make("A"), make("B")
    sample(a, b, 0, 10)  # 10 + max(100, 20) = 110: the floor wins
    assert a.rto() == RTO
    slow, b2 = Link("slow"), Link("b2")  # production defaults
    sample(slow, b2, 0, 5_000 * MS)  # 5 s + 4 * 2.5 s = 15 s
    assert slow.rto() == MAX_RTO_NS
    steady, b3 = make("steady", rto_ns=100), make("b3")
    for i in range(100):
        sample(steady, b3, i * 100_000, 5000)
    assert estimator(steady) == (5000, 0, 5000 + G)


def test_karn_a_retransmitted_frame_gives_no_sample() -> None:
    """An ack for a frame sent twice is ambiguous: no sample (Karn).  In a window partly
    retransmitted by the timer, the oldest frame sent once is sampled."""
    a, b = make("A"), make("B")
    a.send(inj(0), 0)
    frames = a.data_to_send()
    a.poll(RTO)  # timeout: frame 1 is sent again
    assert a.data_to_send() == frames
    ack_now(b, frames, a, RTO + 10)  # the ack may answer either copy
    assert a.unacked() == 0
    assert (a.stats.rtt_samples, a.stats.srtt_ns) == (0, 0)

    a, b = make("A"), make("B")
    for i in range(RETRANSMIT_BURST + 4):
        a.send(inj(i), 0)
    frames = a.data_to_send()
    a.poll(RTO)  # frames 1..16 again
    a.data_to_send()
    ack_now(b, frames, a, 1500)
    assert a.stats.rtt_samples == 1
    assert a.stats.srtt_ns == 1500  # frame 17, sent once at 0


def test_backoff_doubles_from_the_computed_rto_and_collapses_on_a_sample() -> None:
    """Each expiry doubles the RTO (5.5); an ack of retransmitted frames only keeps it
    backed off; the next RTT sample brings it back to the computed RTO, not to rto_ns."""
    a, b = make("A"), make("B")
    sample(a, b, 0, 3000)  # SRTT 3000, RTTVAR 1500: RTO 9000
    assert a.rto() == 9000
    a.send(inj(1), 10_000)
    frames = a.data_to_send()
    assert a.next_deadline() == 19_000
    a.poll(18_999)
    assert a.data_to_send() == []
    a.poll(19_000)
    assert a.data_to_send() == frames
    assert a.rto() == 18_000
    assert a.next_deadline() == 37_000  # restarted at the retransmission (5.6)
    a.poll(37_000)
    assert a.rto() == 36_000
    ack_now(b, frames, a, 40_000)  # progress, no sample
    assert a.rto() == 36_000
    a.send(inj(2), 41_000)
    ack_now(b, a.data_to_send(), a, 44_000)  # sample 3000: RTTVAR 3/4*1500, SRTT 3000
    assert estimator(a) == (3000, 1125, 3000 + 4 * 1125)
    assert a.stats.timeouts == 2


def test_backoff_stops_at_the_cap() -> None:
    a = Link("A", dead_after_ns=10**15)
    a.send(inj(0), 0)
    now = 0
    for _ in range(8):
        deadline = a.next_deadline()
        assert deadline is not None
        now = deadline
        a.poll(now)
    assert a.rto() == MAX_RTO_NS  # 0.5 s * 2**4 = 8 s, then no further
    assert a.next_deadline() == now + MAX_RTO_NS


# ---------------------------------------------------------------- bounded retransmission


def test_timeout_resends_the_oldest_burst_then_an_ack_revealing_the_rest() -> None:
    """A timeout with 100 frames unacknowledged resends frames 1..16 and a bare ack whose
    s = 100, not the whole window; the next one the same 16 again."""
    a = make("A")
    for i in range(100):
        a.send(inj(i), 0)
    frames = a.data_to_send()
    a.poll(RTO)
    out = a.data_to_send()
    assert out[:RETRANSMIT_BURST] == frames[:RETRANSMIT_BURST]
    [probe] = out[RETRANSMIT_BURST:]
    decoded = codec.decode(probe)
    assert (decoded.msg, decoded.seq, decoded.ack) == (m.Ack(), 100, 0)
    assert (a.stats.timeouts, a.stats.retransmitted_timeout) == (1, RETRANSMIT_BURST)
    assert a.stats.retransmitted == RETRANSMIT_BURST
    a.poll(RTO + 2 * RTO)
    assert a.data_to_send()[:RETRANSMIT_BURST] == frames[:RETRANSMIT_BURST]
    assert a.stats.retransmitted_timeout == 2 * RETRANSMIT_BURST


def test_the_peer_sees_no_gap_in_the_probe_when_nothing_was_lost() -> None:
    """The burst's ack reaches a peer that has every frame (only its acks were late):
    it asks for nothing, it only acknowledges again."""
    a, b = make("A"), make("B")
    for i in range(40):
        a.send(inj(i), 0)
    for f in a.data_to_send():
        b.receive(f, 0)
    a.poll(RTO)
    for f in a.data_to_send():
        b.receive(f, RTO)
    assert b.stats.resends_requested == 0
    assert b.stats.duplicates == RETRANSMIT_BURST
    assert b.ack_owed(force=True)


def test_resend_request_and_resume_still_resend_everything() -> None:
    """Real losses: the peer's ack{resend} and a resume resend every frame after the
    peer's ack, counted apart from the timer's."""
    a = make("A")
    for i in range(40):
        a.send(inj(i), 0)
    frames = a.data_to_send()
    a.receive(codec.encode(m.Ack(resend=True), 0, 3), 10)
    assert a.data_to_send() == frames[3:]
    assert a.stats.retransmitted_request == 37
    a.resume(5, 20)
    assert a.data_to_send() == frames[5:]
    assert a.stats.retransmitted_resume == 35
    assert a.stats.retransmitted == 72
    assert a.stats.retransmitted_timeout == 0


# ---------------------------------------------------------------- simulations


@dataclass
class Pipe:
    """One direction of a Pair0 pipe: in order; frame i arrives ``delay(i)`` after it
    is sent (never before the one ahead of it) unless ``drop(i)``."""

    delay: Callable[[int], int] = lambda i: 0
    drop: Callable[[int], bool] = lambda i: False
    queue: deque[tuple[int, bytes]] = field(default_factory=deque)
    last: int = 0
    count: int = 0

    def put(self, frame: bytes, now: int) -> None:
        i, self.count = self.count, self.count + 1
        if self.drop(i):
            return
        self.last = max(self.last, now + self.delay(i))
        self.queue.append((self.last, frame))

    def due(self, now: int) -> list[bytes]:
        out = []
        while self.queue and self.queue[0][0] <= now:
            out.append(self.queue.popleft()[1])
        return out


@dataclass
class Run:
    got: list[list[int]]
    end: int
    links: list[Link]


def simulate(
    links: list[Link],
    pipes: list[Pipe],
    sends: list[list[int]],
    *,
    tick: int,
    max_events: int = 200_000,
    one_in_flight: bool = False,
) -> Run:
    """Drive two Links event by event until both sent everything and all is acked.

    ``pipes[i]`` carries side i's frames; ``sends[i]`` are side i's send times (payloads
    0, 1, ...).  Each side acknowledges as the drivers do: after ACK_EVERY deliveries at
    once, any owed on its ``tick`` (the vCPU's 20 ms).  ``one_in_flight``: side 0 sends
    its next frame only when the previous is acknowledged (an exit waiting for its reply).
    """
    got: list[list[int]] = [[], []]
    queued = [deque(s) for s in sends]
    numbers = [0, 0]
    now = 0
    for _ in range(max_events):
        for i in (0, 1):
            for frame in pipes[1 - i].due(now):
                for msg in links[i].receive(frame, now):
                    if isinstance(msg, m.Inject):
                        got[i].append(msg.host_time)
        for i in (0, 1):
            link = links[i]
            while queued[i] and queued[i][0] <= now:
                if one_in_flight and i == 0 and link.unacked():
                    break  # its ack is an event of its own
                queued[i].popleft()
                link.send(inj(numbers[i]), now)
                numbers[i] += 1
            link.poll(now)
            if link.ack_owed() or (now % tick == 0 and link.ack_owed(force=True)):
                link.send(m.Ack(), now)
            for frame in link.data_to_send():
                pipes[i].put(frame, now)
        if (
            not any(queued)
            and not any(p.queue for p in pipes)
            and not any(link.unacked() or link.ack_owed(force=True) for link in links)
        ):
            return Run(got, now, links)
        blocked = one_in_flight and links[0].unacked() > 0
        events = [p.queue[0][0] for p in pipes if p.queue]
        events += [d for d in (link.next_deadline() for link in links) if d is not None]
        events += [q[0] for i, q in enumerate(queued) if q and not (blocked and i == 0)]
        if any(link.ack_owed(force=True) for link in links):
            events.append((now // tick + 1) * tick)
        now = max(now + 1, min(events))
    raise AssertionError(f"not quiet after {max_events} events at {now} ns")


def test_a_peer_whose_acks_come_2s_late_gets_a_bounded_number_of_retransmissions() -> None:
    """The overload of the problem: one frame a millisecond for 6 s to a peer whose acks
    come 2 s late (production RTO settings).  The first two timeouts resend 16 frames
    each; the first ack then samples a frame sent once (2 s) and the RTO rises above the
    RTT: 32 retransmissions for 6000 frames.  The old timer (whole window every timeout,
    back to 500 ms on every ack) resent 23 006."""
    a, b = Link("A"), Link("B")
    pipes = [Pipe(delay=lambda i: 100_000), Pipe(delay=lambda i: 2_000 * MS)]
    run = simulate([a, b], pipes, [[t * MS for t in range(6000)], []], tick=20 * MS)
    assert run.got[1] == list(range(6000))
    assert a.stats.timeouts <= 2
    assert a.stats.retransmitted <= 2 * RETRANSMIT_BURST
    assert b.stats.resends_requested == 0  # the bursts' acks revealed no gap
    assert 2_000 * MS <= a.stats.srtt_ns <= 2_020 * MS
    assert a.rto() > a.stats.srtt_ns


def test_one_frame_in_flight_to_a_2s_peer_keeps_the_backed_off_rto() -> None:
    """An exit waiting for its reply from a peer 2 s slow: every frame is retransmitted
    before its ack, so no ack gives a sample; the backed-off RTO must survive the ack
    (Karn) or each frame is resent twice forever (60 retransmissions for 30 frames with
    the old reset-on-progress)."""
    a, b = Link("A"), Link("B")
    pipes = [Pipe(delay=lambda i: 100_000), Pipe(delay=lambda i: 2_000 * MS)]
    sends = [[t * 2_000 * MS for t in range(30)], []]
    run = simulate([a, b], pipes, sends, tick=20 * MS, one_in_flight=True)
    assert run.got[1] == list(range(30))
    assert a.stats.retransmitted <= 5
    assert a.stats.rtt_samples >= 25


def tail_loss(lost: int) -> Run:
    """100 frames at t = 0 over 1 ms pipes; the last ``lost`` never arrive and nothing
    follows them."""
    a, b = Link("A"), Link("B")
    pipes = [Pipe(delay=lambda i: MS, drop=lambda i: 100 - lost <= i < 100), Pipe(lambda i: MS)]
    return simulate([a, b], pipes, [[0] * 100, []], tick=20 * MS)


def test_a_long_tail_loss_is_recovered_one_rto_after_the_last_progress() -> None:
    """40 frames lost at the tail: the timeout's burst brings 16, its ack shows the peer
    the rest is missing, the peer asks, everything after its ack comes: one RTO (500 ms,
    the floor: the measured RTT is ~21 ms) after the last ack, not one RTO per 16."""
    run = tail_loss(40)
    a, b = run.links
    assert run.got[1] == list(range(100))
    assert run.end <= 30 * MS + DEFAULT_RTO_NS + 10 * MS
    assert a.stats.timeouts == 1
    assert a.stats.retransmitted_timeout == RETRANSMIT_BURST
    assert a.stats.retransmitted_request == 40 - RETRANSMIT_BURST
    assert b.stats.resends_requested == 1


def test_a_short_tail_loss_is_recovered_by_the_burst_alone() -> None:
    run = tail_loss(RETRANSMIT_BURST)
    a, b = run.links
    assert run.got[1] == list(range(100))
    assert run.end <= 30 * MS + DEFAULT_RTO_NS + 10 * MS
    assert a.stats.retransmitted == RETRANSMIT_BURST
    assert b.stats.resends_requested == 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_a=st.integers(1, 80),
    n_b=st.integers(0, 20),
    gap=st.integers(0, 3 * RTO),
    max_delay=st.sampled_from([0, RTO // 2, 3 * RTO, 20 * RTO]),
    loss=st.sampled_from([0.0, 0.0, 0.05, 0.3]),
    seed=st.integers(0, 2**32),
)
def test_random_delays_and_drops_deliver_everything_once_in_order(
    n_a, n_b, gap, max_delay, loss, seed
):
    """Random per-frame delays (in order per direction, as Pair0) and drops, both sides
    sending: every message exactly once, in order, and the links go quiet; the timer
    never resends more than RETRANSMIT_BURST frames per expiry; without loss nothing
    ever looks like a gap to either side (no resend request, no duplicate from one)."""
    rng = random.Random(seed)
    delays = [[rng.randrange(max_delay + 1) for _ in range(4096)] for _ in (0, 1)]
    drops = [[rng.random() < loss for _ in range(4096)] for _ in (0, 1)]
    pipes = [
        Pipe(delay=lambda i, d=delays[k]: d[i % 4096], drop=lambda i, d=drops[k]: d[i % 4096])
        for k in (0, 1)
    ]
    links = [make("A"), make("B")]
    sends = [[i * gap for i in range(n_a)], [i * gap + gap // 2 for i in range(n_b)]]
    run = simulate(links, pipes, sends, tick=5 * RTO)
    assert run.got[1] == list(range(n_a))
    assert run.got[0] == list(range(n_b))
    for link in links:
        assert link.stats.retransmitted_timeout <= RETRANSMIT_BURST * link.stats.timeouts
        if loss == 0:
            assert link.stats.resends_requested == 0
            assert link.stats.retransmitted_request == 0


def test_a_resume_gives_no_rtt_sample() -> None:
    """The ack in a resume hello was held up by the pipe's replacement, not the round
    trip: it moves the acknowledged mark but does not feed the estimator."""
    a = make("A")
    for i in range(5):
        a.send(inj(i), 0)
    a.data_to_send()
    a.resume(3, 50_000)
    assert a.peer_acked == 3
    assert (a.stats.rtt_samples, a.stats.srtt_ns, a.rto()) == (0, 0, RTO)


def test_a_restored_link_starts_its_estimator_afresh() -> None:
    """The RTT estimator is not in the migration snapshot: the destination's round trip is
    another one.  Frames restored from it are not sampled (their first send was on the
    source), the next frame sent here is."""
    a, b = make("A"), make("B")
    sample(a, b, 0, 5000)
    a.send(inj(1), 10_000)
    restored = Link.from_snapshot(a.snapshot(), 20_000, name="A'", rto_ns=RTO, granularity_ns=G)
    assert (restored.stats.rtt_samples, restored.rto()) == (0, RTO)
    assert restored.next_deadline() == 20_000 + RTO
    restored.receive(codec.encode(m.Ack(), 0, 2), 20_300)
    assert restored.stats.rtt_samples == 0
    restored.send(inj(2), 21_000)
    restored.receive(codec.encode(m.Ack(), 0, 3), 21_300)
    assert (restored.stats.rtt_samples, restored.stats.srtt_ns) == (1, 300)
