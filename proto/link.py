"""Reliable delivery over an unreliable pipe: the sans-I/O link state machine.

nng's Pair0 is not loss-free: a message whose send already succeeded is lost when its
pipe is dropped (an oversize message, a peer that restarts while old data is unread;
ecosystem-notes.md section 0.1), and nng's manual tells applications that need
reliability to acknowledge at their own layer.  This module is that layer.  It does no
I/O: ``send``/``receive``/``poll`` take time as an argument and queue bytes that the
driver fetches with :meth:`Link.data_to_send`.

Theory of operation
-------------------
* Sequenced messages (exits, replies, injections, reports, goodbye, ...) get numbers
  1, 2, 3, ... per direction.  The receiver delivers number ``n`` only after ``n - 1``
  (Pair0 keeps order on one pipe, so anything else is a loss or a duplicate).
* Every frame carries ``a``, a cumulative acknowledgement.  The sender keeps each
  sequenced frame until it is acknowledged.
* A frame with a number already delivered is a duplicate (a retransmission that
  crossed an ack): dropped and counted.  A number beyond the next one is a gap: the
  frame is dropped and an ``ack`` with ``resend`` asks the peer to go back to ``a + 1``.
  A control frame's ``s`` (the sender's highest number) reveals a gap even when no
  data follows it.
* Timer (RFC 6298): the retransmission timeout adapts to the measured round trip.
  An ack that newly covers frames sent exactly once gives one RTT sample (the oldest
  such frame; Karn's algorithm: a retransmitted frame is ambiguous and never sampled);
  SRTT and RTTVAR follow section 2 in integer ns with Linux's shifts (alpha 1/8, beta
  1/4) and RTO = SRTT + max(G, 4 * RTTVAR), never below ``rto_ns`` (also the RTO before
  any sample, section 2.1) nor above ``MAX_RTO_NS`` (sections 2.4, 2.5).  A sample
  includes the peer's delayed ack (up to ~20 ms): that is what the sender waits for.
  The timer runs while frames are unacknowledged and restarts on every ack that makes
  progress (section 5.3).  When it expires (section 5.4 - 5.6) the oldest
  ``RETRANSMIT_BURST`` unacknowledged frames go again, not the whole window: nng does
  not lose frames on a live pipe, so a timeout is mostly a slow peer, and resending up
  to 4096 frames to a peer that is slow already is congestive collapse.  If frames
  remain after the burst, a bare ``ack`` follows it: its ``s`` reveals a real tail loss
  to the peer, which then asks for everything it lacks (below), while a peer that has
  the frames (Pair0 keeps order, so it read them before the ack) asks nothing.  Each
  expiry doubles the RTO (section 5.5, up to ``MAX_RTO_NS``), and the backed-off value
  is kept until a new RTT sample (section 5's last paragraph, Karn): a peer slower than
  the timeout whose every frame got retransmitted would otherwise be timed out at the
  short RTO forever.  If nothing is acknowledged for ``dead_after_ns`` the link fails
  with a :class:`LinkError` naming the numbers lost, unless the driver knows the peer's
  frames are waiting unread (:meth:`peer_alive`): on a machine with far more processes
  than cores the acks may be there, not yet read.
* The peer's explicit ``ack`` with ``resend`` (a gap it saw: a real loss) sends again
  everything after its ``a``.
* Pipe replaced: the driver calls :meth:`Link.resume` with the peer's ack from the
  resume handshake; everything after it is retransmitted on the new pipe.
* The send window is bounded; a full window is a LinkError, never a silent drop.
* Acks are piggybacked on every frame; :meth:`Link.ack_owed` tells the driver when a
  bare ``ack`` is due because nothing else is going out.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from vtick.proto.codec import DEFAULT_MAX_MESSAGE, Frame, decode, encode
from vtick.proto.errors import ErrorCode, LinkError, RemoteProtocolError
from vtick.proto.messages import Ack, Message

__all__ = [
    "Link",
    "LinkStats",
    "DEFAULT_RTO_NS",
    "DEFAULT_DEAD_AFTER_NS",
    "DEFAULT_WINDOW",
    "DEFAULT_GRANULARITY_NS",
    "MAX_RTO_NS",
    "RETRANSMIT_BURST",
]

#: the RTO before any RTT sample and its floor (RFC 6298 sections 2.1 and 2.4)
DEFAULT_RTO_NS = 500_000_000
DEFAULT_DEAD_AFTER_NS = 10_000_000_000
DEFAULT_WINDOW = 4096
#: the RTO's ceiling, backoff included (RFC 6298 section 2.5 allows one; ours stays
#: below the 10 s dead-peer timer so a backed-off link still retransmits before that)
MAX_RTO_NS = 8_000_000_000
#: G of RFC 6298 section 2: the vCPU polls its link on a 20 ms tick and either side
#: may hold a bare ack about that long, so an RTO closer than this to SRTT is noise
DEFAULT_GRANULARITY_NS = 20_000_000
#: frames sent again per timer expiry (the oldest unacknowledged ones)
RETRANSMIT_BURST = 16
#: a bare ack is owed after this many unacknowledged deliveries, even without a timer
ACK_EVERY = 32


@dataclass(slots=True)
class LinkStats:
    sent: int = 0
    received: int = 0
    duplicates: int = 0
    gaps: int = 0
    #: frames sent again, for any reason (the three below add up to it)
    retransmitted: int = 0
    resends_requested: int = 0
    acks_sent: int = 0
    #: retransmission timer expiries, and the frames they sent again
    timeouts: int = 0
    retransmitted_timeout: int = 0
    #: frames sent again because the peer asked (``ack`` with ``resend``)
    retransmitted_request: int = 0
    #: frames sent again on a new pipe (:meth:`Link.resume`)
    retransmitted_resume: int = 0
    rtt_samples: int = 0
    #: the RFC 6298 estimator now (0 before the first sample) and the RTO now, backoff
    #: included
    srtt_ns: int = 0
    rttvar_ns: int = 0
    rto_ns: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class _Pending:
    seq: int
    data: bytes
    sent_at: int
    kind: str
    #: sent more than once (or restored from a snapshot): no RTT sample (Karn)
    retransmitted: bool = False


@dataclass
class Link:
    """One direction pair of a host <-> vCPU link.  ``name`` appears in error messages."""

    name: str
    max_message: int = DEFAULT_MAX_MESSAGE
    window: int = DEFAULT_WINDOW
    rto_ns: int = DEFAULT_RTO_NS
    dead_after_ns: int = DEFAULT_DEAD_AFTER_NS
    stats: LinkStats = field(default_factory=LinkStats)
    granularity_ns: int = DEFAULT_GRANULARITY_NS

    def __post_init__(self) -> None:
        self.send_next = 1  # number the next sequenced frame gets
        self.recv_next = 1  # number we deliver next
        self.peer_acked = 0  # highest number the peer acknowledged
        self.ack_sent = 0  # highest ``a`` we have put on the wire
        self._unacked: deque[_Pending] = deque()
        self._outbox: list[bytes] = []
        self._last_progress: int | None = None  # when peer_acked last moved
        self._resend_asked_at = -1  # recv_next when we last asked for a resend
        # RFC 6298 estimator, scaled as Linux keeps it: _srtt8 = 8 * SRTT and
        # _rttvar4 = 4 * RTTVAR (so 4 * RTTVAR needs no multiplication)
        self._srtt8 = 0
        self._rttvar4 = 0
        self._sampled = False  # an RTT sample was taken (SRTT and RTTVAR are set)
        self._max_rto = max(MAX_RTO_NS, self.rto_ns)
        #: the retransmission timeout now: the computed one (rto_ns before any sample),
        #: doubled by every expiry (section 5.5) until the next RTT sample
        self._rto = self.rto_ns
        #: when the retransmission timer was (re)started; it runs while frames are
        #: unacknowledged and expires at _timer_start + _rto
        self._timer_start = 0
        self.stats.rto_ns = self._rto

    # ------------------------------------------------------------------ sending

    def send(self, msg: Message, now: int) -> None:
        """Queue ``msg``.  Sequenced kinds get the next number and are kept until acked.

        Raises:
            LocalProtocolError: the message is invalid or too large (nothing queued).
            LinkError: the send window is full: the peer has stopped acknowledging.
        """
        if not msg.SEQUENCED:
            data = encode(msg, self.send_next - 1, self._ack_value(), self.max_message)
            if isinstance(msg, Ack):
                self.stats.acks_sent += 1
            self._outbox.append(data)
            return
        if len(self._unacked) >= self.window:
            raise LinkError(
                f"{self.name}: send window of {self.window} full; peer has acknowledged "
                f"nothing after {self.peer_acked}"
            )
        data = encode(msg, self.send_next, self._ack_value(), self.max_message)
        if not self._unacked:
            self._last_progress = now
            self._timer_start = now  # section 5.1: start the timer if it is not running
        self._unacked.append(_Pending(self.send_next, data, now, msg.RULE))
        self.send_next += 1
        self.stats.sent += 1
        self._outbox.append(data)

    def _ack_value(self) -> int:
        self.ack_sent = self.recv_next - 1
        return self.ack_sent

    def data_to_send(self) -> list[bytes]:
        """Frames queued since the last call, in order."""
        out, self._outbox = self._outbox, []
        return out

    # ------------------------------------------------------------------ receiving

    def receive(self, data: bytes, now: int) -> list[Message]:
        """Process one frame from the peer; return the messages to act on, in order.

        Control messages are always returned; a sequenced message only when it is the
        next in order.

        Raises:
            RemoteProtocolError: the frame does not decode or breaks the protocol.
        """
        frame = decode(data, self.max_message)
        self._on_ack(frame.ack, now)
        msg = frame.msg
        if not msg.SEQUENCED:
            if isinstance(msg, Ack) and msg.resend:
                self.stats.retransmitted_request += self._retransmit(now, after=frame.ack)
            if frame.seq >= self.recv_next:
                # The peer has sent numbers we never got.
                self._ask_resend()
            return [msg]
        return self._accept_sequenced(frame)

    def _accept_sequenced(self, frame: Frame) -> list[Message]:
        if frame.seq == self.recv_next:
            self.recv_next += 1
            self.stats.received += 1
            return [frame.msg]
        if frame.seq < self.recv_next:
            # A retransmission: our ack may have been lost, so owe one again, or an idle
            # receiver would let the sender retransmit until the link is declared dead.
            self.stats.duplicates += 1
            self.ack_sent = min(self.ack_sent, frame.seq - 1)
            return []
        self.stats.gaps += 1
        self._ask_resend()
        return []

    def _ask_resend(self) -> None:
        if self._resend_asked_at == self.recv_next:
            return  # already asked for exactly this; the timer retransmits if it is lost
        self._resend_asked_at = self.recv_next
        self.stats.resends_requested += 1
        self.send(Ack(resend=True), 0)

    def check_peer_ack(self, ack: int) -> None:
        """Raise RemoteProtocolError if the peer acknowledges more than was ever sent.

        Changes nothing, so a caller can refuse a frame (a resume hello, say) before it
        acts on any part of it.
        """
        if ack >= self.send_next:
            raise RemoteProtocolError(
                ErrorCode.UNEXPECTED,
                f"{self.name}: peer acknowledges {ack} but only {self.send_next - 1} were sent",
            )

    def _on_ack(self, ack: int, now: int, sample_rtt: bool = True) -> None:
        self.check_peer_ack(ack)
        if ack <= self.peer_acked:
            return
        self.peer_acked = ack
        sample: int | None = None
        while self._unacked and self._unacked[0].seq <= ack:
            pending = self._unacked.popleft()
            if sample_rtt and sample is None and not pending.retransmitted:
                # the oldest newly acknowledged frame sent exactly once: what the timer,
                # started by the oldest frame, waits for (delayed ack included)
                sample = max(0, now - pending.sent_at)
        if sample is not None:
            self._rtt_sample(sample)
        self._last_progress = now
        self._timer_start = now  # section 5.3: restart the timer on progress

    def _rtt_sample(self, r: int) -> None:
        """RFC 6298 section 2.2 / 2.3 with one sample ``r`` ns, then the RTO (2.4, 2.5).

        A sample also ends the backoff (section 5, last paragraph)."""
        if not self._sampled:
            self._sampled = True
            self._srtt8 = r << 3  # SRTT = R
            self._rttvar4 = r << 1  # RTTVAR = R / 2
        else:
            err = r - (self._srtt8 >> 3)  # R' - SRTT, with the SRTT before this sample
            self._rttvar4 += abs(err) - (self._rttvar4 >> 2)  # (1 - 1/4) RTTVAR + 1/4 |err|
            self._srtt8 += err  # (1 - 1/8) SRTT + 1/8 R'
        self.stats.rtt_samples += 1
        self.stats.srtt_ns = self._srtt8 >> 3
        self.stats.rttvar_ns = self._rttvar4 >> 2
        self._set_rto(self.computed_rto())

    def computed_rto(self) -> int:
        """The RTO without backoff: SRTT + max(G, 4 * RTTVAR) within [rto_ns, MAX_RTO_NS];
        ``rto_ns`` before the first RTT sample."""
        if not self._sampled:
            return self.rto_ns
        rto = (self._srtt8 >> 3) + max(self.granularity_ns, self._rttvar4)
        return min(max(rto, self.rto_ns), self._max_rto)

    def _set_rto(self, rto: int) -> None:
        self._rto = rto
        self.stats.rto_ns = rto

    # ------------------------------------------------------------------ timers and pipes

    def ack_owed(self, force: bool = False) -> bool:
        """True when deliveries are unacknowledged (and ACK_EVERY reached unless ``force``)."""
        owed = self.recv_next - 1 - self.ack_sent
        return owed > 0 and (force or owed >= ACK_EVERY)

    def unacked(self) -> int:
        return len(self._unacked)

    def unacked_range(self) -> tuple[int, int] | None:
        if not self._unacked:
            return None
        return self._unacked[0].seq, self._unacked[-1].seq

    def next_deadline(self) -> int | None:
        """When :meth:`poll` next has work (a retransmission), or None."""
        if not self._unacked:
            return None
        return self._timer_start + self._rto

    def rto(self) -> int:
        """The retransmission timeout now, backoff included."""
        return self._rto

    def poll(self, now: int) -> None:
        """On the timer's expiry, send the oldest ``RETRANSMIT_BURST`` unacknowledged
        frames again (and a bare ack revealing any tail loss if more remain), and back off.

        Raises:
            LinkError: nothing was acknowledged for ``dead_after_ns``.
        """
        if not self._unacked:
            return
        if self._last_progress is not None and now - self._last_progress >= self.dead_after_ns:
            lo, hi = self._unacked[0].seq, self._unacked[-1].seq
            kinds = sorted({p.kind for p in self._unacked})
            raise LinkError(
                f"{self.name}: messages {lo}..{hi} ({', '.join(kinds)}) unacknowledged for "
                f"{(now - self._last_progress) / 1e9:.1f} s; the peer is gone or stuck"
            )
        if now - self._timer_start >= self._rto:
            self.stats.timeouts += 1
            self.stats.retransmitted_timeout += self._retransmit(
                now, after=self.peer_acked, limit=RETRANSMIT_BURST
            )
            if len(self._unacked) > RETRANSMIT_BURST:
                # the rest is not resent blindly: this ack's s (our highest number) shows
                # the peer a gap only if frames were really lost, and it then asks
                self.send(Ack(), now)
            # back off (section 5.5): a peer slower than the timeout (hundreds of vCPUs
            # on a few cores) must not be sent frames again every rto_ns, which only adds
            # to what keeps it slow
            self._set_rto(min(self._rto * 2, self._max_rto))

    def peer_alive(self, now: int) -> None:
        """The peer is known to be there (its frames wait unread: this side is the slow
        one, on an overloaded machine): restart the dead timer instead of failing."""
        self._last_progress = now

    def _retransmit(self, now: int, after: int, limit: int | None = None) -> int:
        """Send again the unacknowledged frames after ``after`` (at most ``limit``), and
        (re)start the timer (RFC 6298 section 5.4 / 5.6); returns how many were sent."""
        count = 0
        for pending in self._unacked:
            if limit is not None and count >= limit:
                break
            if pending.seq > after:
                pending.sent_at = now
                pending.retransmitted = True
                self._outbox.append(pending.data)
                count += 1
        if count:
            self._timer_start = now
        self.stats.retransmitted += count
        return count

    def resume(self, peer_ack: int, now: int) -> None:
        """A new pipe replaced the old one: retransmit everything after ``peer_ack``.

        The resume's ack gives no RTT sample: it was delayed by the pipe's replacement,
        not by the round trip."""
        self._on_ack(peer_ack, now, sample_rtt=False)
        self._resend_asked_at = -1
        self.stats.retransmitted_resume += self._retransmit(now, after=peer_ack)

    # ------------------------------------------------------------------ migration (issue 13)

    def snapshot(self) -> dict[str, Any]:
        """The sequence state a live migration carries (CDDL ``link-state`` without the
        session id, which the host holds).

        Pure: no time travels.  The unacknowledged frames go as their encoded bytes, so
        the destination retransmits exactly what the peer lacks, byte for byte.  Frames
        queued but not yet handed to the pipe are covered: sequenced ones are among the
        unacknowledged, control ones are never retransmitted anyway.
        """
        return {
            "send_next": self.send_next,
            "recv_next": self.recv_next,
            "peer_acked": self.peer_acked,
            "ack_sent": self.ack_sent,
            "max_message": self.max_message,
            "unacked": [{"seq": p.seq, "kind": p.kind, "data": p.data} for p in self._unacked],
        }

    @classmethod
    def from_snapshot(
        cls,
        snapshot: dict[str, Any],
        now: int,
        *,
        name: str,
        window: int = DEFAULT_WINDOW,
        rto_ns: int = DEFAULT_RTO_NS,
        dead_after_ns: int = DEFAULT_DEAD_AFTER_NS,
        granularity_ns: int = DEFAULT_GRANULARITY_NS,
    ) -> Link:
        """A Link continuing :meth:`snapshot`'s session at ``now`` (other keys ignored).

        Pending frames count as sent at ``now`` (the source's send times are another
        host's clock): the RTO and the dead-peer timer start over here.  The RTT
        estimator is deliberately not carried (the snapshot has no key for it): the
        round trip to this host is another one, so SRTT/RTTVAR start over from the
        first sample and the RTO from ``rto_ns``; the restored frames are marked
        retransmitted, since an ack for them says nothing about this host's round trip.

        Raises:
            ValueError: the numbers are inconsistent (unacknowledged frames must be
                exactly ``peer_acked + 1 .. send_next - 1``), or a frame is larger
                than ``max_message``.
        """
        link = cls(
            name=name,
            max_message=snapshot["max_message"],
            window=window,
            rto_ns=rto_ns,
            dead_after_ns=dead_after_ns,
            granularity_ns=granularity_ns,
        )
        send_next, peer_acked = snapshot["send_next"], snapshot["peer_acked"]
        frames = snapshot["unacked"]
        seqs = [f["seq"] for f in frames]
        if not 0 <= peer_acked < send_next or seqs != list(range(peer_acked + 1, send_next)):
            raise ValueError(
                f"{name}: unacknowledged frames {seqs[:1]}..{seqs[-1:]} do not fill "
                f"{peer_acked + 1}..{send_next - 1}"
            )
        if len(frames) > window:
            raise ValueError(f"{name}: {len(frames)} unacknowledged frames exceed the window")
        for f in frames:
            if len(f["data"]) > link.max_message:
                raise ValueError(f"{name}: frame {f['seq']} exceeds max_message")
        link.send_next = send_next
        link.recv_next = snapshot["recv_next"]
        link.peer_acked = peer_acked
        link.ack_sent = min(snapshot["ack_sent"], link.recv_next - 1)
        link._unacked = deque(_Pending(f["seq"], f["data"], now, f["kind"], True) for f in frames)
        link._last_progress = now if frames else None
        link._timer_start = now
        return link
