"""Protocol errors.

Decoding raises nothing but :class:`ProtocolError` subclasses, each naming what was
wrong; the ``code`` travels in ``refuse`` and ``error`` messages.  As in h11, a
:class:`LocalProtocolError` means *we* were about to do something the protocol forbids
(send an oversize or mistyped message); a :class:`RemoteProtocolError` means the peer
did.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["ErrorCode", "ProtocolError", "LocalProtocolError", "RemoteProtocolError", "LinkError"]


class ErrorCode(IntEnum):
    """Codes carried in ``refuse.code`` and ``error.code``."""

    BAD_CBOR = 1
    UNKNOWN_KIND = 2
    BAD_FIELD = 3
    OVERSIZE = 4
    BAD_TOKEN = 5
    BAD_VERSION = 6
    BAD_VCPU = 7
    VCPU_BUSY = 8
    UNEXPECTED = 9  # a valid message at a time the protocol does not allow it
    LOST = 10  # the link lost sequenced messages it cannot recover
    SHUTTING_DOWN = 11
    INTERNAL = 12  # the receiver failed handling the frame (its bug); the session is ended


class ProtocolError(Exception):
    """Something on the wire broke the protocol.  ``code`` says what, for the peer."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We were about to break the protocol; nothing was sent."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol."""


class LinkError(Exception):
    """A link failed in a way that may have lost messages; the message says which."""
