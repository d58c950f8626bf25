"""Codec conformance: round trips, the CDDL schema as an independent oracle, hostile input."""

from __future__ import annotations

import cbor2
import pytest
from cddl_verifier import Validator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtick.proto import codec
from vtick.proto import messages as m
from vtick.proto.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from vtick.proto.schema import ValidationError, schema_text

U8 = st.integers(0, 2**8 - 1)
#: access sizes the CDDL admits (mmio-size, pio-size)
MMIO_SIZE = st.sampled_from([1, 2, 4, 8])
PIO_SIZE = st.sampled_from([1, 2, 4])
U16 = st.integers(0, 2**16 - 1)
U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
I8 = st.integers(-(2**7), 2**7 - 1)
I64 = st.integers(-(2**63), 2**63 - 1)


def _utf8_at_most(n: int, min_bytes: int = 0):
    """Text whose UTF-8 encoding is min_bytes..n bytes (CDDL .size counts bytes)."""
    raw = st.text(max_size=n) | st.text(alphabet="aé€😀", min_size=n // 4, max_size=n)
    clipped = raw.map(lambda s: s.encode()[:n].decode("utf-8", "ignore"))
    return clipped.filter(lambda s: len(s.encode()) >= min_bytes)


TEXT = _utf8_at_most(512)
NAME = _utf8_at_most(64, min_bytes=1)
TOKEN = st.binary(min_size=32, max_size=32)
# near the 32768-byte limit; built from a short pattern (hypothesis caps raw entropy per example)
BIG_BSTR = st.tuples(st.integers(32_000, 32_768), st.binary(min_size=1, max_size=16)).map(
    lambda t: (t[1] * 32_768)[: t[0]]
)
PVCLOCK_INFO = st.fixed_dictionaries(
    {
        "version": U32,
        "tsc_timestamp": U64,
        "system_time": U64,
        "tsc_to_system_mul": U32,
        "tsc_shift": I8,
        "flags": U8,
    }
)

STRATEGIES = {
    m.Hello: st.builds(
        m.Hello,
        version=U16,
        features=U64,
        vcpu=U32,
        token=TOKEN,
        pid=U32,
        resume=st.none() | U64,
    ),
    m.Welcome: st.builds(
        m.Welcome,
        version=U16,
        features=U64,
        vcpu=U32,
        vcpus=U32,
        session=U64,
        max_message=U32,
        tsc_khz=U32,
        tsc_epoch=U64,
        pvclock=PVCLOCK_INFO,
        workload=NAME,
        seed=U64,
        params=st.dictionaries(NAME, I64, max_size=5),
        resumed=st.none() | st.booleans(),
        mode=st.none() | NAME,
        apic=st.none() | NAME,
        hz=st.none() | U32,
        ipi=st.none() | NAME,
        trace=st.none() | st.booleans(),
    ),
    m.Refuse: st.builds(m.Refuse, code=U16, reason=TEXT),
    m.Ack: st.builds(m.Ack, resend=st.none() | st.booleans()),
    m.Error: st.builds(m.Error, code=U16, reason=TEXT),
    m.Ping: st.builds(m.Ping, t=U64, echo=st.none() | U64, rx=st.none() | U64),
    m.Pong: st.builds(m.Pong, t=U64, host=U64),
    m.Migrate: st.builds(m.Migrate, to=_utf8_at_most(512, min_bytes=1), frozen=U64),
    m.ExitMmioRead: st.builds(
        m.ExitMmioRead, gpa=U64, size=MMIO_SIZE, pv_eoi=st.none() | st.booleans()
    ),
    m.ExitMmioWrite: st.builds(
        m.ExitMmioWrite, gpa=U64, size=MMIO_SIZE, value=U64, pv_eoi=st.none() | st.booleans()
    ),
    m.ExitMsrRead: st.builds(m.ExitMsrRead, msr=U32, pv_eoi=st.none() | st.booleans()),
    m.ExitMsrWrite: st.builds(m.ExitMsrWrite, msr=U32, value=U64, pv_eoi=st.none() | st.booleans()),
    m.ExitPioIn: st.builds(m.ExitPioIn, port=U16, size=PIO_SIZE, pv_eoi=st.none() | st.booleans()),
    m.ExitPioOut: st.builds(
        m.ExitPioOut, port=U16, size=PIO_SIZE, value=U32, pv_eoi=st.none() | st.booleans()
    ),
    m.ExitHypercall: st.builds(
        m.ExitHypercall, nr=U64, args=st.lists(U64, max_size=4), pv_eoi=st.none() | st.booleans()
    ),
    m.ExitHlt: st.builds(m.ExitHlt, pv_eoi=st.none() | st.booleans()),
    m.ExitPause: st.builds(m.ExitPause, pv_eoi=st.none() | st.booleans()),
    m.ExitReply: st.builds(
        m.ExitReply, re=U64, value=st.integers(-(2**63), 2**64 - 1), fault=U8, host_ns=U64
    ),
    m.Inject: st.builds(m.Inject, vector=U8, host_time=U64, pv_eoi=st.none() | st.booleans()),
    m.Pvclock: st.builds(
        m.Pvclock,
        info=PVCLOCK_INFO,
        tsc_sync=st.none()
        | st.fixed_dictionaries({"at": U64, "offset": I64, "ppb": I64, "bound": U64}),
    ),
    m.Shutdown: st.builds(m.Shutdown, reason=TEXT),
    m.Report: st.builds(
        m.Report,
        events=U64,
        early=U64,
        spurious=U64,
        exits=st.dictionaries(NAME, U64, max_size=6),
        exit_rtt_ns=st.dictionaries(NAME, U64, max_size=6),
        lateness_hdr=st.binary(max_size=64) | BIG_BSTR,
        lateness_max=U64,
        duration_ns=U64,
        mode=st.none() | NAME,
        counters=st.none() | st.dictionaries(NAME, I64, max_size=6),
        ipi_hdr=st.none() | st.binary(max_size=64),
        call_hdr=st.none() | st.binary(max_size=64),
        timeline=st.none() | st.binary(max_size=64),
    ),
    m.Trace: st.builds(
        m.Trace,
        exits=st.none() | st.binary(max_size=96),
        irqs=st.none() | st.binary(max_size=96),
        events=st.none() | st.binary(max_size=96),
        calls=st.none() | st.binary(max_size=96),
    ),
    m.Csd: st.builds(
        m.Csd, src=U32, dst=U32, id=U64, func=NAME, info=I64, wait=st.booleans(), sent=U64
    ),
    m.CsdDone: st.builds(m.CsdDone, src=U32, dst=U32, id=U64, ran=U64, error=st.none() | TEXT),
    m.CpuOnline: st.builds(m.CpuOnline, cpu=U32),
    m.OnlineMask: st.builds(m.OnlineMask, mask=st.binary(min_size=1, max_size=130)),
    m.Goodbye: st.builds(m.Goodbye),
}

ANY_MESSAGE = st.one_of(*STRATEGIES.values())
CDDL = Validator(schema_text())


def cddl_valid(data: bytes) -> bool:
    return CDDL.validate(data, "message").valid


def test_every_message_class_has_a_strategy():
    """The generators below cover exactly the classes the codec binds; a new kind must be added."""
    assert set(STRATEGIES) == set(m.MESSAGE_CLASSES)
    assert len(m.MESSAGE_CLASSES) == len(set(m.MESSAGE_CLASSES))


@pytest.mark.parametrize("cls", m.MESSAGE_CLASSES, ids=lambda c: c.RULE)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), seq=U64, ack=U64)
def test_round_trip_and_cddl(cls, data, seq, ack):
    """encode -> decode is the identity (envelope included) and every encoding meets the CDDL."""
    msg = data.draw(STRATEGIES[cls])
    wire = codec.encode(msg, seq, ack)
    frame = codec.decode(wire)
    assert type(frame.msg) is cls
    assert frame.msg == msg
    assert (frame.seq, frame.ack) == (seq, ack)
    assert cbor2.loads(wire)["k"] == codec.kind_of(cls)
    assert cddl_valid(wire), CDDL.validate(wire, "message").diagnostics


def test_text_size_counts_utf8_bytes():
    """tstr .size bounds UTF-8 bytes, not chars: 128 four-byte chars fit, 129 do not."""
    ok = m.Shutdown(reason="😀" * 128)
    assert codec.decode(codec.encode(ok, 1, 0)).msg == ok
    with pytest.raises(LocalProtocolError) as exc:
        codec.encode(m.Shutdown(reason="😀" * 129), 1, 0)
    assert exc.value.code is ErrorCode.BAD_FIELD
    assert "516" in str(exc.value)


def test_intenum_values_go_on_the_wire_as_plain_ints():
    """IntEnum field values are encoded as ints; a bool is not an int on the wire."""
    wire = codec.encode(m.Error(code=ErrorCode.OVERSIZE, reason="x"), 0, 0)
    assert type(codec.decode(wire).msg.code) is int
    assert codec.decode(wire).msg.code == 4
    with pytest.raises(LocalProtocolError) as exc:
        codec.encode(m.ExitMmioRead(gpa=True, size=4), 1, 0)
    assert exc.value.code is ErrorCode.BAD_FIELD


# ---------------------------------------------------------------- negative vectors

BASE = {"k": 16, "s": 1, "a": 0, "gpa": 0xFEE00000, "size": 4}  # exit-mmio-read
INJECT = {"k": 33, "s": 1, "a": 0, "vector": 0xEC, "host_time": 5}
HELLO = {
    "k": 1,
    "s": 0,
    "a": 0,
    "version": 1,
    "features": 3,
    "vcpu": 0,
    "token": bytes(32),
    "pid": 42,
}


def _with(base: dict, **changes) -> bytes:
    return cbor2.dumps({**base, **changes})


def _without(base: dict, key: str) -> bytes:
    return cbor2.dumps({k: v for k, v in base.items() if k != key})


def _raw_mmio_read(gpa_item: bytes) -> bytes:
    """exit-mmio-read with a hand-encoded item in place of gpa."""
    head = b"\xa5" + b"".join(cbor2.dumps(x) for x in ("k", 16, "s", 1, "a", 0, "gpa"))
    return head + gpa_item + cbor2.dumps("size") + cbor2.dumps(4)


_BASE_BYTES = cbor2.dumps(BASE)

# (id, data, error code, text the error must contain)
# Well-formed CBOR that breaks the schema: the CDDL validator must reject these too.
SCHEMA_INVALID = [
    ("missing-field", _without(BASE, "size"), ErrorCode.BAD_FIELD, "missing field 'size'"),
    ("missing-envelope", _without(BASE, "a"), ErrorCode.BAD_FIELD, "missing field 'a'"),
    ("extra-field", _with(BASE, x=1), ErrorCode.BAD_FIELD, "unknown field 'x'"),
    ("wrong-type", _with(BASE, gpa="0"), ErrorCode.BAD_FIELD, "gpa: expected int, got tstr"),
    ("size-256", _with(BASE, size=256), ErrorCode.BAD_FIELD, "size: 256 is not one of 1, 2, 4, 8"),
    ("size-16", _with(BASE, size=16), ErrorCode.BAD_FIELD, "size: 16 is not one of 1, 2, 4, 8"),
    ("u8-256", _with(INJECT, vector=256), ErrorCode.BAD_FIELD, "vector: 256 out of range 0..255"),
    ("negative-uint", _with(BASE, gpa=-1), ErrorCode.BAD_FIELD, "gpa: -1 out of range"),
    ("negative-seq", _with(BASE, s=-1), ErrorCode.BAD_FIELD, "s: -1 out of range"),
    (
        "i64-too-small",
        _with({"k": 32, "s": 1, "a": 0, "re": 1, "fault": 0, "host_ns": 0}, value=-(2**63) - 1),
        ErrorCode.BAD_FIELD,
        "matches no choice",
    ),
    ("token-31", _with(HELLO, token=bytes(31)), ErrorCode.BAD_FIELD, "size 31 outside 32..32"),
    ("token-33", _with(HELLO, token=bytes(33)), ErrorCode.BAD_FIELD, "size 33 outside 32..32"),
    (
        "text-513",
        cbor2.dumps({"k": 35, "s": 1, "a": 0, "reason": "x" * 513}),
        ErrorCode.BAD_FIELD,
        "size 513 outside 0..512",
    ),
    (
        "args-5",
        cbor2.dumps({"k": 22, "s": 1, "a": 0, "nr": 1, "args": [1, 2, 3, 4, 5]}),
        ErrorCode.BAD_FIELD,
        "5 items, expected 0..4",
    ),
    (
        "name-empty",
        cbor2.dumps(
            {
                "k": 48,
                "s": 1,
                "a": 0,
                "events": 0,
                "early": 0,
                "spurious": 0,
                "exits": {"": 1},
                "exit_rtt_ns": {},
                "lateness_hdr": b"",
                "lateness_max": 0,
                "duration_ns": 0,
            }
        ),
        ErrorCode.BAD_FIELD,
        "size 0 outside 1..64",
    ),
    ("unknown-kind", _with(BASE, k=99), ErrorCode.UNKNOWN_KIND, "unknown message kind 99"),
    ("no-kind", _without(BASE, "k"), ErrorCode.BAD_FIELD, "no integer kind"),
    ("bool-for-int", _with(BASE, gpa=True), ErrorCode.BAD_FIELD, "expected int, got bool"),
    ("float-for-int", _with(BASE, gpa=4.0), ErrorCode.BAD_FIELD, "expected int, got float"),
    ("int-for-bool", _with({"k": 4, "s": 0, "a": 0}, resend=1), ErrorCode.BAD_FIELD, "bool"),
    (
        "bignum-tag-2",
        _raw_mmio_read(bytes.fromhex("c24101")),  # 2(h'01')
        ErrorCode.BAD_CBOR,
        "tag",
    ),
    ("duplicate-key", b"\xa6" + _BASE_BYTES[1:] + _BASE_BYTES[-6:], ErrorCode.BAD_CBOR, "uplicate"),
    ("nested-100", _raw_mmio_read(b"\x81" * 100 + b"\x00"), ErrorCode.BAD_CBOR, "depth"),
    ("array", cbor2.dumps([16, 1, 0, 4096, 4]), ErrorCode.BAD_FIELD, "not map"),
    ("bare-int", cbor2.dumps(16), ErrorCode.BAD_FIELD, "not map"),
]

# Not well-formed single CBOR items: bad for any validator.
MALFORMED = [
    ("trailing-bytes", _BASE_BYTES + b"\x00", "1 bytes after the message"),
    ("truncated", _BASE_BYTES[:-1], "premature end"),
    ("huge-declared-length", bytes.fromhex("5b" + "ff" * 8), "premature end"),
    ("empty", b"", "premature end"),
    ("break-alone", b"\xff", "bad CBOR"),
]


def test_negative_vectors_are_what_they_claim():
    """Guard the vectors: the duplicate-key one really repeats 'size' and the base is valid."""
    assert codec.decode(_BASE_BYTES).msg == m.ExitMmioRead(gpa=0xFEE00000, size=4)
    assert cddl_valid(_BASE_BYTES)
    assert SCHEMA_INVALID_BY_ID["duplicate-key"].count(cbor2.dumps("size")) == 2
    assert codec.decode(_raw_mmio_read(cbor2.dumps(7))).msg.gpa == 7


SCHEMA_INVALID_BY_ID = {case[0]: case[1] for case in SCHEMA_INVALID}


@pytest.mark.parametrize(
    ("data", "code", "text"), [c[1:] for c in SCHEMA_INVALID], ids=[c[0] for c in SCHEMA_INVALID]
)
def test_schema_invalid_rejected_by_both(data, code, text):
    """Both validators reject well-formed CBOR that breaks the schema; decode names the problem."""
    with pytest.raises(RemoteProtocolError) as exc:
        codec.decode(data)
    assert exc.value.code is code
    assert text in str(exc.value)
    assert not cddl_valid(data)


@pytest.mark.parametrize(
    ("data", "text"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_cbor_rejected_by_both(data, text):
    """Input that is not exactly one well-formed CBOR item is BAD_CBOR and fails CDDL too."""
    with pytest.raises(RemoteProtocolError) as exc:
        codec.decode(data)
    assert exc.value.code is ErrorCode.BAD_CBOR
    assert text in str(exc.value)
    try:
        valid = cddl_valid(data)
    except Exception:  # the verifier may refuse malformed input by raising
        valid = False
    assert not valid


def test_indefinite_length_map_is_refused():
    """Indefinite-length items are codec policy (CDDL cannot see the encoding): decode refuses."""
    data = b"\xbf" + _BASE_BYTES[1:] + b"\xff"
    assert cbor2.loads(data) == BASE  # well-formed, same data model value
    with pytest.raises(RemoteProtocolError) as exc:
        codec.decode(data)
    assert exc.value.code is ErrorCode.BAD_CBOR
    assert "indefinite" in str(exc.value)
    indefinite_key = b"\xa3\x7f\x61k\xff\x04" + _BASE_BYTES[4:10]  # key "k" as (_ "k")
    assert cbor2.loads(indefinite_key) == {"k": 4, "s": 1, "a": 0}
    with pytest.raises(RemoteProtocolError, match="indefinite"):
        codec.decode(indefinite_key)


def _tag_head(tag: int) -> bytes:
    if tag < 24:
        return bytes([0xC0 | tag])
    if tag < 2**8:
        return bytes([0xD8, tag])
    if tag < 2**16:
        return b"\xd9" + tag.to_bytes(2, "big")
    if tag < 2**32:
        return b"\xda" + tag.to_bytes(4, "big")
    return b"\xdb" + tag.to_bytes(8, "big")


def test_no_tag_is_accepted():
    """No CBOR tag is part of the protocol: a tagged field value or message is always refused.

    cbor2 turns many tags into Python values (tag 2 -> int, 1 -> datetime, 258 -> set, ...)
    that could slip past the schema; each payload shape is tried so a decoder that needs a
    particular payload still runs.
    """
    payloads = [4096, b"\x01", "x", [1], {}]
    tags = [*range(1101), 43000, 55799, 2**32, 2**64 - 1]
    accepted = []
    for tag in tags:
        for payload in payloads:
            data = _raw_mmio_read(_tag_head(tag) + cbor2.dumps(payload))
            try:
                frame = codec.decode(data)
            except RemoteProtocolError:
                continue
            accepted.append((tag, payload, frame))
    assert accepted == []
    for tag in (0, 1, 2, 55799):
        with pytest.raises(RemoteProtocolError):
            codec.decode(_tag_head(tag) + _BASE_BYTES)


def test_tag_in_nested_map_key_is_refused():
    """Tags are refused at any depth, here on a key inside report.exits."""
    report = {
        "k": 48,
        "s": 1,
        "a": 0,
        "events": 0,
        "early": 0,
        "spurious": 0,
        "exits": {},
        "exit_rtt_ns": {},
        "lateness_hdr": b"",
        "lateness_max": 0,
        "duration_ns": 0,
    }
    valid = cbor2.dumps(report)
    codec.decode(valid)
    # replace the empty "exits" map with {tag 0("x"): 1}
    empty_exits = cbor2.dumps("exits") + b"\xa0"
    assert valid.count(empty_exits) == 1
    bad = valid.replace(
        empty_exits, cbor2.dumps("exits") + b"\xa1\xc0" + cbor2.dumps("x") + b"\x01"
    )
    with pytest.raises(RemoteProtocolError, match="tag"):
        codec.decode(bad)


# ---------------------------------------------------------------- size limits and local errors


def test_encode_refuses_oversize():
    """A sender refuses a message larger than max_size (OVERSIZE) instead of losing the pipe."""
    msg = m.Report(1, 0, 0, {}, {}, bytes(2000), 0, 0)
    wire = codec.encode(msg, 1, 0)
    assert codec.encode(msg, 1, 0, max_size=len(wire)) == wire
    with pytest.raises(LocalProtocolError) as exc:
        codec.encode(msg, 1, 0, max_size=len(wire) - 1)
    assert exc.value.code is ErrorCode.OVERSIZE
    assert f"{len(wire)} bytes" in str(exc.value)


def test_encode_refuses_invalid_field():
    """A sender never puts a schema-invalid message on the wire (BAD_FIELD, names the field)."""
    cases = [
        (m.ExitMmioRead(gpa=0, size=256), "size"),
        (m.Hello(1, 0, 0, bytes(31), 1), "token"),
        (m.ExitHypercall(nr=1, args=[0] * 5), "args"),
        (m.ExitHypercall(nr=1, args=[-1]), "args[0]"),
        (m.Welcome(1, 0, 0, 1, 1, 1, 1, 1, {}, "w", 0), "pvclock"),
        (m.Inject(vector=0xEC, host_time=2**64), "host_time"),
        (m.Report(0, 0, 0, {}, {}, bytes(32769), 0, 0), "lateness_hdr"),
        (m.Report(0, 0, 0, {"x" * 65: 1}, {}, b"", 0, 0), "exits"),
        (m.Welcome(1, 0, 0, 1, 1, 1, 1, 1, PVC, "", 0), "workload"),
        (m.Welcome(1, 0, 0, 1, 1, 1, 1, 1, PVC, "w", 0, params={"p": 2**63}), "params.p"),
    ]
    for msg, field in cases:
        with pytest.raises(LocalProtocolError) as exc:
            codec.encode(msg, 1, 0)
        assert exc.value.code is ErrorCode.BAD_FIELD
        assert field in str(exc.value)
    for seq, ack in ((-1, 0), (0, 2**64)):
        with pytest.raises(LocalProtocolError) as exc:
            codec.encode(m.ExitHlt(), seq, ack)
        assert exc.value.code is ErrorCode.BAD_FIELD


def test_decode_refuses_oversize():
    """The receiver refuses data longer than max_size before decoding it."""
    wire = codec.encode(m.Shutdown(reason="x" * 100), 1, 0)
    assert codec.decode(wire, max_size=len(wire)).msg == m.Shutdown(reason="x" * 100)
    with pytest.raises(RemoteProtocolError) as exc:
        codec.decode(wire, max_size=len(wire) - 1)
    assert exc.value.code is ErrorCode.OVERSIZE
    with pytest.raises(RemoteProtocolError) as exc:
        codec.decode(bytes(codec.DEFAULT_MAX_MESSAGE + 1))
    assert exc.value.code is ErrorCode.OVERSIZE


# ---------------------------------------------------------------- fuzz


def _decode_or_none(data: bytes):
    """The Frame, or None after checking the RemoteProtocolError carries a code and a text."""
    error = None
    try:
        return codec.decode(data)
    except RemoteProtocolError as exc:
        error = exc
    assert isinstance(error.code, ErrorCode)
    assert str(error)
    return None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(data):
    """decode of any bytes returns a Frame or raises RemoteProtocolError, never anything else."""
    frame = _decode_or_none(data)
    if frame is not None:
        assert isinstance(frame, codec.Frame)
        assert codec.encode(frame.msg, frame.seq, frame.ack) is not None


@st.composite
def mutated_encodings(draw):
    msg = draw(ANY_MESSAGE)
    wire = bytearray(codec.encode(msg, draw(U64), draw(U64)))
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 4]))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "set"]))
        if not wire:
            break
        i = draw(st.integers(0, len(wire) - 1))
        if op == "flip":
            wire[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del wire[i:]
        elif op == "insert":
            wire[i:i] = bytes([draw(st.integers(0, 255))])
        elif op == "delete":
            del wire[i]
        else:
            wire[i] = draw(
                st.sampled_from([0x00, 0x18, 0x1B, 0x5B, 0x7F, 0x9F, 0xBF, 0xC2, 0xF9, 0xFF])
            )
    return bytes(wire)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_encodings())
def test_fuzz_mutated_encodings(data):
    """Mutated valid messages decode to a re-encodable Frame the CDDL accepts, or raise RPE."""
    frame = _decode_or_none(data)
    if frame is not None:
        assert codec.encode(frame.msg, frame.seq, frame.ack)  # something we could send ourselves
        assert cddl_valid(data)  # the codec never accepts what the schema forbids


# ---------------------------------------------------------------- golden vectors

PVC = {
    "version": 2,
    "tsc_timestamp": 1000,
    "system_time": 5,
    "tsc_to_system_mul": 0x80000000,
    "tsc_shift": -1,
    "flags": 5,
}
GOLDEN = [
    (m.Ack(resend=True), 3, 7, "a4 616b04 617303 616107 66726573656e64f5"),
    (
        m.ExitMmioRead(gpa=0xFEE00380, size=4),
        1,
        0,
        "a5 616b10 617301 616100 636770611afee00380 6473697a6504",
    ),
    (
        m.ExitReply(re=5, value=-22, fault=0, host_ns=1234),
        9,
        5,
        "a7 616b1820 617309 616105 62726505 6576616c756535 656661756c7400 67686f73745f6e731904d2",
    ),
    (
        m.ExitHypercall(nr=0x56540001, args=[2**64 - 1, 1]),
        2,
        1,
        "a5 616b16 617302 616101 626e721a56540001 6461726773821bffffffffffffffff01",
    ),
    (
        m.Pvclock(info=PVC),
        4,
        0,
        "a4 616b1822 617304 616100 64696e666fa6 6776657273696f6e02"
        " 6d7473635f74696d657374616d701903e8 6b73797374656d5f74696d6505"
        " 717473635f746f5f73797374656d5f6d756c1a80000000 697473635f736869667420"
        " 65666c61677305",
    ),
    (
        m.Hello(version=1, features=3, vcpu=0, token=bytes(range(32)), pid=4242),
        0,
        0,
        "a8 616b01 617300 616100 6776657273696f6e01 686665617475726573 03 6476637075 00"
        " 65746f6b656e5820000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
        " 63706964191092",
    ),
]


@pytest.mark.parametrize(("msg", "seq", "ack", "hexdata"), GOLDEN, ids=[g[0].RULE for g in GOLDEN])
def test_golden_vectors(msg, seq, ack, hexdata):
    """The wire format is pinned: encode gives exactly these bytes and decode reads them back."""
    expected = bytes.fromhex(hexdata.replace(" ", ""))
    assert codec.encode(msg, seq, ack).hex() == expected.hex()
    assert codec.decode(expected) == codec.Frame(seq, ack, msg)
    assert cddl_valid(expected)


# ---------------------------------------------------------------- compiled predicates


def _slow_accepts(kind, value) -> bool:
    try:
        kind.rule.check(value, kind.cls.RULE)
    except ValidationError:
        return False
    return True


@st.composite
def mutated_maps(draw):
    """A valid message's map with one field changed to a value at or past an edge."""
    msg = draw(ANY_MESSAGE)
    wire = cbor2.loads(codec.encode(msg, draw(U64), draw(U64)))
    key = draw(st.sampled_from(sorted(wire)))
    edge = st.sampled_from(
        [None, True, 0, -1, 2**64, 2**64 - 1, -(2**63) - 1, 256, 65536, 4.0, "", b"", [], {}]
    )
    op = draw(st.sampled_from(["set", "drop", "add"]))
    if op == "set":
        wire[key] = draw(edge | st.binary(max_size=40) | st.text(max_size=600))
    elif op == "drop":
        del wire[key]
    else:
        wire[draw(st.sampled_from(["zz", "k2", key + "x"]))] = draw(edge)
    return wire


@settings(max_examples=600, deadline=None)
@given(mutated_maps())
def test_compiled_predicate_agrees_with_the_validator(wire) -> None:
    """The codec's fast yes must be exactly the validator's yes (never looser)."""
    kind = codec._BY_NUMBER.get(wire.get("k")) if type(wire.get("k")) is int else None
    if kind is None:
        return
    assert kind.accepts(wire) == _slow_accepts(kind, wire)


@settings(max_examples=200, deadline=None)
@given(ANY_MESSAGE)
def test_compiled_predicate_accepts_every_valid_message(msg) -> None:
    wire = cbor2.loads(codec.encode(msg, 1, 0))
    assert codec._BY_NUMBER[wire["k"]].accepts(wire)
