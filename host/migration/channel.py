"""The migration channel: what a source host and a destination host say to each other.

Issue 13.  The messages are the ``mig-*`` rules of ``vtick.cddl`` (the one definition):
CBOR maps named by ``m``, validated here on the way out and on the way in, on one Pair0
pipe the source dials to the destination's ``--incoming`` address.  Nothing on this
channel is sequenced or retransmitted: a migration is one short exchange, and anything
lost or late fails it, which leaves the VM running on the source (the failure the issue
asks to lose nothing).  :func:`pack` and :func:`unpack` are pure; :class:`Channel` is the
trio/pynng edge.
"""

from __future__ import annotations

import contextlib
from typing import Any

import cbor2
import trio

from vtick.proto.codec import SCHEMA
from vtick.proto.schema import ValidationError
from vtick.proto.transport import PairEndpoint

__all__ = [
    "PING",
    "PONG",
    "STATE",
    "READY",
    "REFUSE",
    "MAX_CHANNEL_MESSAGE",
    "ChannelError",
    "pack",
    "unpack",
    "Channel",
]

PING, PONG, STATE, READY, REFUSE = 1, 2, 3, 4, 5
_RULES = {PING: "mig-ping", PONG: "mig-pong", STATE: "mig-state", READY: "mig-ready"}
_RULES[REFUSE] = "mig-refuse"
#: a state message carries every vCPU's devices and unacknowledged frames: a 256-vCPU VM
#: with full send windows is far below this; the limit keeps a stranger from making the
#: destination allocate without bound
MAX_CHANNEL_MESSAGE = 64 << 20


class ChannelError(Exception):
    """A migration channel message was malformed, unexpected or did not come."""


def pack(msg: dict[str, Any]) -> bytes:
    """Encode one channel message after checking it against its rule.

    Raises:
        ChannelError: the message does not match its rule (a bug on this side).
    """
    rule = _RULES.get(msg.get("m", 0))
    if rule is None:
        raise ChannelError(f"no migration channel message m={msg.get('m')!r}")
    try:
        SCHEMA.resolve(rule).check(msg, rule)
    except ValidationError as exc:
        raise ChannelError(f"refusing to send an invalid {rule}: {exc}") from None
    return cbor2.dumps(msg)


def unpack(data: bytes) -> dict[str, Any]:
    """Decode and check one channel message.

    Raises:
        ChannelError: too large, not CBOR, not a map, an unknown ``m`` or a field that
            breaks its rule (the message says which).
    """
    if len(data) > MAX_CHANNEL_MESSAGE:
        raise ChannelError(f"{len(data)}-byte message exceeds {MAX_CHANNEL_MESSAGE}")
    try:
        msg = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several types for garbage
        raise ChannelError(f"not CBOR: {exc}") from None
    if not isinstance(msg, dict):
        raise ChannelError(f"expected a map, got {type(msg).__name__}")
    kind = msg.get("m")
    rule = _RULES.get(kind) if isinstance(kind, int) else None
    if rule is None:
        raise ChannelError(f"unknown migration channel message m={msg.get('m')!r}")
    try:
        SCHEMA.resolve(rule).check(msg, rule)
    except ValidationError as exc:
        raise ChannelError(str(exc)) from None
    return msg


class Channel:
    """One end of the channel: a Pair0 endpoint and its sender task."""

    def __init__(self, ep: PairEndpoint) -> None:
        self.ep = ep

    @classmethod
    def dial(cls, url: str) -> Channel:
        return cls(PairEndpoint.dial(url, MAX_CHANNEL_MESSAGE))

    @classmethod
    def listen(cls, url: str) -> Channel:
        return cls(PairEndpoint.listen(url, MAX_CHANNEL_MESSAGE))

    def send(self, msg: dict[str, Any]) -> None:
        self.ep.send([pack(msg)])

    async def recv(self, timeout_s: float) -> dict[str, Any]:
        """The next message.

        Raises:
            ChannelError: nothing within ``timeout_s``, or what came is malformed.
        """
        with trio.move_on_after(timeout_s):
            data, _pipe = await self.ep.recv()
            return unpack(data)
        raise ChannelError(f"no answer within {timeout_s:g} s")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ep.close()
