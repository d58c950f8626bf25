"""Host cases, suite ``codec``: hostile input inside a session (``docs/protocol.md`` §9).

Each case opens a well-behaved session on vCPU 0 and a session on vCPU 1, sends one
hostile frame on vCPU 1, and checks three things: the host answers ``error`` with the
documented code and closes that pipe; vCPU 0 is still served; a new session on vCPU 1
is welcomed.  The frames are built here byte by byte where the codec would refuse to
produce them.
"""

from __future__ import annotations

from collections.abc import Callable

import cbor2

from vtick.host.conformance import case as c
from vtick.host.conformance.lib import Gen, apic_read, session
from vtick.proto import apicdef as r
from vtick.proto import messages as m
from vtick.proto.codec import encode
from vtick.proto.errors import ErrorCode

__all__ = ["CASES", "HOSTILE"]

CASES = c.Registry()
MUST = c.Level.MUST
LVR = 0x0005_0014

#: a valid in-session exit (first sequenced frame of a session)
VALID = encode(m.ExitMsrRead(msr=0x1B), 1, 0)


def _map(*pairs: tuple[bytes, bytes]) -> bytes:
    """A definite-length CBOR map from already-encoded (key, value) pairs."""
    assert len(pairs) < 24
    return bytes([0xA0 | len(pairs)]) + b"".join(k + v for k, v in pairs)


def _t(key: str) -> bytes:
    return cbor2.dumps(key)


def _nested(depth: int) -> list:
    value: list = [0]
    for _ in range(depth):
        value = [value]
    return value


#: id suffix -> (frame, expected error code, what it is)
HOSTILE: dict[str, tuple[bytes, ErrorCode | None, str]] = {
    "cbor.invalid": (b"\xff\xfe\xfd", ErrorCode.BAD_CBOR, "bytes that are not CBOR"),
    "cbor.truncated": (VALID[:-1], ErrorCode.BAD_CBOR, "a valid frame less its last byte"),
    "cbor.trailing": (VALID + b"\x00", ErrorCode.BAD_CBOR, "a valid frame plus one byte"),
    "cbor.tag": (
        cbor2.dumps({"k": 18, "s": 1, "a": 0, "msr": cbor2.CBORTag(1, 27)}),
        ErrorCode.BAD_CBOR,
        "a field wrapped in a CBOR tag",
    ),
    "cbor.indefinite": (
        b"\xbf"
        + _t("k")
        + b"\x12"
        + _t("s")
        + b"\x01"
        + _t("a")
        + b"\x00"
        + _t("msr")
        + b"\x18\x1b\xff",
        ErrorCode.BAD_CBOR,
        "an indefinite-length map",
    ),
    "cbor.duplicate-key": (
        _map(
            (_t("k"), b"\x12"),
            (_t("s"), b"\x01"),
            (_t("a"), b"\x00"),
            (_t("msr"), b"\x18\x1b"),
            (_t("msr"), b"\x18\x1c"),
        ),
        ErrorCode.BAD_CBOR,
        "a map with a key twice",
    ),
    "cbor.depth": (
        cbor2.dumps({"k": 22, "s": 1, "a": 0, "nr": 1, "args": _nested(9)}),
        ErrorCode.BAD_CBOR,
        "nesting deeper than 8",
    ),
    "int.bignum": (
        cbor2.dumps({"k": 18, "s": 1, "a": 0, "msr": 1 << 70}),
        ErrorCode.BAD_CBOR,
        "an integer beyond 64 bits (a bignum tag)",
    ),
    "int.range": (
        cbor2.dumps({"k": 18, "s": 1, "a": 0, "msr": 1 << 32}),
        ErrorCode.BAD_FIELD,
        "a u32 field holding 2**32",
    ),
    "int.negative": (
        cbor2.dumps({"k": 18, "s": 1, "a": 0, "msr": -(1 << 64)}),
        ErrorCode.BAD_FIELD,
        "a u32 field holding -2**64",
    ),
    "field.type": (
        cbor2.dumps({"k": 18, "s": 1, "a": 0, "msr": "0x1b"}),
        ErrorCode.BAD_FIELD,
        "a text where an integer belongs",
    ),
    "field.missing": (
        cbor2.dumps({"k": 18, "s": 1, "a": 0}),
        ErrorCode.BAD_FIELD,
        "exit-msr-read without msr",
    ),
    "field.unknown": (
        cbor2.dumps({"k": 18, "s": 1, "a": 0, "msr": 27, "x": 1}),
        ErrorCode.BAD_FIELD,
        "an unknown field",
    ),
    "field.size": (
        cbor2.dumps({"k": 16, "s": 1, "a": 0, "gpa": 0xFEE00030, "size": 16}),
        ErrorCode.BAD_FIELD,
        "an MMIO access of 16 bytes",
    ),
    "kind.unknown": (
        cbor2.dumps({"k": 99, "s": 1, "a": 0}),
        ErrorCode.UNKNOWN_KIND,
        "kind 99",
    ),
    "not-a-map": (cbor2.dumps([18, 1, 0, 27]), ErrorCode.BAD_FIELD, "an array, not a map"),
    "no-kind": (cbor2.dumps({"s": 1, "a": 0}), ErrorCode.BAD_FIELD, "a map without k"),
    "envelope.ack-beyond": (
        encode(m.ExitMsrRead(msr=0x1B), 1, 1000),
        ErrorCode.UNEXPECTED,
        "a frame acknowledging 1000 host frames that were never sent",
    ),
}


def hostile_case(frame: bytes, code: ErrorCode | None, what: str) -> Callable[[c.Ctx], Gen]:
    def script(ctx: c.Ctx) -> Gen:
        ctx.require_vcpus(2)
        yield from session(ctx, 0)
        yield from session(ctx, 1)
        yield c.Mark(1)
        yield c.SendRaw(1, frame)
        if code is None:
            ctx.note("nng drops a pipe whose message exceeds recv_max_size; an error is optional")
        else:
            got = yield c.Await(1, (m.Error, m.Refuse), 2000)
            ctx.check(
                f"{what}: answered with error {code.name} ({int(code)})",
                got is not None and isinstance(got.msg, m.Error) and got.msg.code == code,
                f"error {{code: {int(code)}}}",
                got.msg if got is not None else "no answer",
            )
        closed = yield c.Closed(1, 1000)
        ctx.check("the host closes that pipe", closed, "pipe closed", "pipe open")
        lvr = yield from apic_read(ctx, 0, r.APIC_LVR)
        ctx.equal("vCPU 0 is still served (LVR read)", LVR, lvr)
        welcome = yield c.Session(1)
        ctx.check(
            "a new session on the hostile link is welcomed",
            isinstance(welcome, m.Welcome),
            "welcome",
            welcome or "no answer",
        )

    return script


for _suffix, (_frame, _code, _what) in HOSTILE.items():
    CASES.add(
        f"codec.{_suffix}",
        f"{_what} inside a session gets error {_code.name if _code else ''} and the host serves on",
        MUST,
        "protocol.md §9",
        hostile_case(_frame, _code, _what),
    )

CASES.add(
    "codec.oversize",
    "a frame beyond max_message closes the pipe and the host serves on",
    MUST,
    "protocol.md §9, §5.8",
    hostile_case(
        cbor2.dumps({"k": 50, "s": 1, "a": 0, "exits": bytes(70_000)}), None, "a 70 kB frame"
    ),
)


@CASES.case(
    "codec.kind.direction",
    "a host-to-vCPU kind sent by a vCPU is not executed and the session goes on",
    MUST,
    "protocol.md §4.5",
)
def wrong_direction(ctx: c.Ctx) -> Gen:
    yield from session(ctx, 0)
    yield c.Mark(0)
    seq = yield c.Send(0, m.Inject(vector=0x31, host_time=0))
    got = yield c.Collect(0, 100, (m.ExitReply, m.Inject, m.Error))
    ctx.check(
        "nothing is executed or answered for it",
        not got,
        "no reply, inject or error",
        [c.describe(a.msg) for a in got if a.msg],
    )
    lvr = yield from apic_read(ctx, 0, r.APIC_LVR)
    ctx.equal("the session goes on (LVR read)", LVR, lvr)
    ctx.note(f"inject sent by the vCPU as its frame {seq}")
