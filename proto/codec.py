"""CBOR codec for vtick messages, driven by the CDDL schema.

``encode`` turns a typed message plus its envelope into one CBOR map; ``decode`` does the
reverse and raises nothing but :class:`~vtick.proto.errors.RemoteProtocolError`, whose
text names what was wrong (bad CBOR, unknown kind, missing or mistyped field, value out
of range, oversize message).  Both sides check the same schema rules, so a sender never
puts a message on the wire that its peer would reject, and both enforce the size limit:
nng drops the whole pipe when a message exceeds the receiver's ``recv_max_size``
(ecosystem-notes.md section 0.1), so the sender refuses first.

Hostile input: the decoder is given at most ``max_size`` bytes, a nesting depth of 8
(vtick messages are at most 3 deep), no indefinite-length items, no duplicate keys, no
CBOR tags (cbor2 would otherwise turn tag 2 into an int, tag 1 into a datetime, ...),
and no trailing bytes after the one item.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cbor2

from vtick.proto.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from vtick.proto.messages import MESSAGE_CLASSES, Message
from vtick.proto.schema import MapRule, Schema, ValidationError, compile_predicate, load_schema

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "MAX_DEPTH",
    "Frame",
    "encode",
    "decode",
    "kind_of",
    "SCHEMA",
]

#: Default size limit of one message in bytes, for nng's recv_max_size and the sender.
DEFAULT_MAX_MESSAGE = 64 * 1024
MAX_DEPTH = 8
ENVELOPE = ("k", "s", "a")

# Tags cbor2 decodes natively (probed over 0..70000 with cbor2 6.2.1, see
# tests/test_codec.py::test_no_tag_is_accepted).  Every other tag reaches tag_hook.
_BUILTIN_TAGS = (0, 1, 2, 3, 4, 5, 28, 30, 35, 36, 37, 54, 100, 256, 258, 260, 261, 43000, 55799)


def _no_tags(*_args: Any) -> Any:
    raise cbor2.CBORDecodeError("CBOR tags are not part of the vtick protocol")


_NO_SEMANTIC_TAGS = {tag: _no_tags for tag in _BUILTIN_TAGS}


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded message with its envelope."""

    seq: int
    ack: int
    msg: Message


@dataclass(frozen=True, slots=True)
class _Kind:
    number: int
    cls: type[Message]
    rule: MapRule
    fields: tuple[str, ...]
    #: the rule compiled to one predicate: the fast yes; ``rule.check`` names a no
    accepts: Callable[[Any], bool]


def _bind(schema: Schema) -> tuple[dict[type[Message], _Kind], dict[int, _Kind]]:
    """Match every message class with its schema rule; refuse any disagreement."""
    rules = schema.message_rules()
    by_class: dict[type[Message], _Kind] = {}
    by_number: dict[int, _Kind] = {}
    unbound = set(rules)
    for cls in MESSAGE_CLASSES:
        rule = rules.get(cls.RULE)
        if rule is None:
            raise ImportError(f"{cls.__name__}: no rule {cls.RULE!r} in the schema")
        unbound.discard(cls.RULE)
        kind_validator = rule.members.get("k", (None, True))[0]
        number = getattr(kind_validator, "lo", None)
        if number is None or getattr(kind_validator, "hi", None) != number:
            raise ImportError(f"rule {cls.RULE!r}: k must be an integer literal")
        for env in ENVELOPE:
            if env not in rule.members or rule.members[env][1]:
                raise ImportError(f"rule {cls.RULE!r}: envelope field {env!r} missing/optional")
        members = {k: opt for k, (_, opt) in rule.members.items() if k not in ENVELOPE}
        cls_fields = {f.name: f for f in dataclasses.fields(cls)}
        if set(members) != set(cls_fields):
            raise ImportError(
                f"{cls.__name__} fields {sorted(cls_fields)} != rule {cls.RULE!r} "
                f"members {sorted(members)}"
            )
        for name, optional in members.items():
            f = cls_fields[name]
            has_default = (
                f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            )
            if optional and f.default is not None:
                raise ImportError(f"{cls.__name__}.{name} is optional in the schema: default None")
            if not optional and has_default and name != "params":
                raise ImportError(f"{cls.__name__}.{name} is required in the schema")
        if number in by_number:
            raise ImportError(f"kind {number} used by two rules")
        kind = _Kind(number, cls, rule, tuple(members), compile_predicate(schema, rule))
        by_class[cls] = kind
        by_number[number] = kind
    if unbound:
        raise ImportError(f"schema rules without a message class: {sorted(unbound)}")
    return by_class, by_number


SCHEMA = load_schema()
_BY_CLASS, _BY_NUMBER = _bind(SCHEMA)


def kind_of(cls: type[Message]) -> int:
    """The kind number of a message class, as the schema assigns it."""
    return _BY_CLASS[cls].number


def _plain(value: Any) -> Any:
    """IntEnum/IntFlag members as plain ints (the schema check wants exact types)."""
    kind = type(value)
    if kind is int or kind is str or kind is bytes or kind is bool:
        return value
    if isinstance(value, int):
        return int(value)
    if type(value) is list:
        return [_plain(v) for v in value]
    return value


def encode(msg: Message, seq: int, ack: int, max_size: int = DEFAULT_MAX_MESSAGE) -> bytes:
    """Encode ``msg`` with its envelope.

    Raises:
        LocalProtocolError: the message breaks its schema rule or is larger than
            ``max_size``; nothing should be sent.
    """
    kind = _BY_CLASS[type(msg)]
    wire: dict[str, Any] = {"k": kind.number, "s": seq, "a": ack}
    for name in kind.fields:
        value = getattr(msg, name)
        if value is not None:
            wire[name] = _plain(value)
    if not kind.accepts(wire):
        try:
            kind.rule.check(wire, kind.cls.RULE)
        except ValidationError as exc:
            raise LocalProtocolError(ErrorCode.BAD_FIELD, f"refusing to send: {exc}") from None
    data = cbor2.dumps(wire)
    if len(data) > max_size:
        raise LocalProtocolError(
            ErrorCode.OVERSIZE,
            f"refusing to send {kind.cls.RULE} of {len(data)} bytes: limit is {max_size}",
        )
    return data


def decode(data: bytes, max_size: int = DEFAULT_MAX_MESSAGE) -> Frame:
    """Decode one message.

    Raises:
        RemoteProtocolError: and nothing else, for any input.
    """
    if len(data) > max_size:
        raise RemoteProtocolError(
            ErrorCode.OVERSIZE, f"message of {len(data)} bytes exceeds limit {max_size}"
        )
    try:
        stream = io.BytesIO(data)
        value = cbor2.CBORDecoder(
            stream,
            max_depth=MAX_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            tag_hook=_no_tags,
            semantic_decoders=_NO_SEMANTIC_TAGS,
        ).decode()
        consumed = stream.tell()
    except Exception as exc:  # cbor2 raises several types; all mean "bad CBOR" here
        raise RemoteProtocolError(ErrorCode.BAD_CBOR, f"bad CBOR: {exc}") from None
    if consumed != len(data):
        raise RemoteProtocolError(
            ErrorCode.BAD_CBOR, f"bad CBOR: {len(data) - consumed} bytes after the message"
        )
    if type(value) is not dict:
        raise RemoteProtocolError(
            ErrorCode.BAD_FIELD, f"message is {type(value).__name__}, not map"
        )
    number = value.get("k")
    if type(number) is not int:
        raise RemoteProtocolError(ErrorCode.BAD_FIELD, "message has no integer kind 'k'")
    kind = _BY_NUMBER.get(number)
    if kind is None:
        raise RemoteProtocolError(ErrorCode.UNKNOWN_KIND, f"unknown message kind {number}")
    if not kind.accepts(value):
        try:
            kind.rule.check(value, kind.cls.RULE)
        except ValidationError as exc:
            raise RemoteProtocolError(ErrorCode.BAD_FIELD, str(exc)) from None
    msg = kind.cls(**{name: value[name] for name in kind.fields if name in value})
    return Frame(value["s"], value["a"], msg)
