"""The CDDL subset compiler and the import-time binding of message classes to schema rules."""

from __future__ import annotations

import dataclasses

import pytest

from vtick.proto import codec
from vtick.proto import messages as m
from vtick.proto.schema import (
    MapRule,
    Schema,
    SchemaError,
    ValidationError,
    compile_predicate,
    load_schema,
    schema_text,
)

TEXT = schema_text()

KINDS = {
    "hello": 1,
    "welcome": 2,
    "refuse": 3,
    "ack": 4,
    "error": 5,
    "ping": 6,
    "pong": 7,
    "migrate": 8,
    "exit-mmio-read": 16,
    "exit-mmio-write": 17,
    "exit-msr-read": 18,
    "exit-msr-write": 19,
    "exit-pio-in": 20,
    "exit-pio-out": 21,
    "exit-hypercall": 22,
    "exit-hlt": 23,
    "exit-pause": 24,
    "exit-reply": 32,
    "inject": 33,
    "pvclock": 34,
    "shutdown": 35,
    "csd": 40,
    "csd-done": 41,
    "cpu-online": 42,
    "online-mask": 43,
    "report": 48,
    "trace": 50,
    "goodbye": 49,
}


def test_shipped_schema_parses():
    """The normative schema compiles; its root is a choice of the message maps."""
    schema = load_schema()
    rules = schema.message_rules()
    assert set(rules) == set(KINDS)
    assert all(isinstance(r, MapRule) for r in rules.values())
    assert {"u8", "u64", "i64", "seq", "name", "text", "pvclock-info"} <= set(schema.rules)


def test_every_message_class_binds():
    """Each class has its rule, kind numbers are the schema's literals, and fields match members."""
    rules = load_schema().message_rules()
    assert {cls.RULE for cls in m.MESSAGE_CLASSES} == set(KINDS)
    for cls in m.MESSAGE_CLASSES:
        assert codec.kind_of(cls) == KINDS[cls.RULE]
        members = set(rules[cls.RULE].members) - {"k", "s", "a"}
        assert members == {f.name for f in dataclasses.fields(cls)}, cls.RULE
        assert (KINDS[cls.RULE] >= 16) == cls.SEQUENCED, cls.RULE


def _check(schema: Schema, rule: str, value) -> bool:
    """The validator's verdict, asserted equal to the compiled predicate's."""
    try:
        schema.rules[rule].check(value, rule)
        verdict = True
    except ValidationError:
        verdict = False
    assert compile_predicate(schema, schema.rules[rule])(value) == verdict, (rule, value)
    return verdict


def test_supported_subset_semantics():
    """Ranges over literal rules, .size, occurrences, choices and generic maps follow CDDL."""
    schema = Schema(
        """
        lo = 3
        hi = 5
        r = lo .. hi                  ; range between literal rules
        neg = -2..-1
        fixed = bstr .size 2
        sized = tstr .size (1..3)
        one-plus = [+ uint]
        opt = [? uint]
        two-three = [2*3 uint]
        ch = uint / tstr
        gm = { * tstr => bool }
        mp = { x: uint, ? y: (uint / bool) }
        """
    )
    cases = [
        ("r", 3, True),
        ("r", 5, True),
        ("r", 2, False),
        ("r", 6, False),
        ("neg", -2, True),
        ("neg", 0, False),
        ("fixed", b"ab", True),
        ("fixed", b"a", False),
        ("fixed", "ab", False),
        ("sized", "abc", True),
        ("sized", "", False),
        ("sized", "é" * 2, False),  # 4 bytes
        ("one-plus", [1], True),
        ("one-plus", [], False),
        ("opt", [], True),
        ("opt", [1, 2], False),
        ("two-three", [1, 2], True),
        ("two-three", [1, 2, 3, 4], False),
        ("two-three", [1, -1], False),
        ("ch", "x", True),
        ("ch", b"x", False),
        ("ch", True, False),
        ("gm", {"a": True}, True),
        ("gm", {1: True}, False),
        ("gm", {"a": 1}, False),
        ("mp", {"x": 1}, True),
        ("mp", {"x": 1, "y": False}, True),
        ("mp", {"y": 1}, False),
        ("mp", {"x": 1, "z": 1}, False),
        ("mp", [("x", 1)], False),
    ]
    wrong = [(rule, value, ok) for rule, value, ok in cases if _check(schema, rule, value) != ok]
    assert wrong == []


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("a = { k: 1, $$x }", "line 1"),  # group socket
        ("$$x //= ( y: int )\na = { k: 1 }", "line 1"),  # socket extension
        ("a = bstr .cbor int", ".cbor"),  # control other than .size
        ("a = uint .le 5", ".le"),
        ("a = b", "undefined 'b'"),
        ("a = { k: b }", "undefined 'b'"),
        ("a = int\nb = 1\na = int", "line 3: rule 'a' defined twice"),
        ("a = { k: 1, k: 2 }", "key 'k' twice"),
        ("a = #6.2(bstr)", "line 1"),  # tags
        ('a = { "k": 1 }', "line 1"),  # quoted keys
        ("a = 1.5", "line 1"),  # floats
        ("a = &(x: 1)", "line 1"),  # enumerations
        ("a = { k: 1, * tstr => int }", "lone"),  # generic entry mixed with members
        ("a = [ uint, tstr ]", "line 1"),  # arrays are homogeneous here
        ("a = { + k: 1 }", "only '?'"),
        ("a = { k: 1", ""),  # unterminated
    ],
)
def test_schema_error_on_unsupported_syntax(text, needle):
    """Anything outside the supported subset is a SchemaError, never a silently wrong validator."""
    with pytest.raises(SchemaError) as exc:
        Schema(text)
    assert needle in str(exc.value)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("x = 1\na = int .size 4\nb = 2", 2),
        ("x = 1\na = 0..int\nb = 2", 2),
    ],
)
def test_schema_error_names_the_offending_line(text, line):
    """Errors name the line of the offending construct (not the line of the following token)."""
    with pytest.raises(SchemaError) as exc:
        Schema(text)
    assert str(exc.value).startswith(f"line {line}:"), str(exc.value)


# ---------------------------------------------------------------- import-time binding


def _modified(old: str, new: str) -> Schema:
    assert TEXT.count(old) == 1, old
    return Schema(TEXT.replace(old, new))


ACK = "ack = { k: 4, s: seq, a: seq, ? resend: bool }"


def test_bind_accepts_the_shipped_schema():
    """The unmodified text binds to the same kinds the codec loaded."""
    by_class, by_number = codec._bind(Schema(TEXT))
    assert {cls: k.number for cls, k in by_class.items()} == {
        cls: KINDS[cls.RULE] for cls in m.MESSAGE_CLASSES
    }
    assert set(by_number) == set(KINDS.values())


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        (ACK, ACK.replace("}", ", extra: u8 }"), "extra"),  # member added
        ("  pid: u32,                     ; for logs and error messages\n", "", "pid"),  # removed
        (ACK, ACK.replace(", ? resend: bool", ""), "resend"),
        ("  ? resume: u64,", "  resume: u64,", "resume"),  # optional made required
        ("  vcpus: u32,", "  ? vcpus: u32,", "vcpus"),  # required made optional
        ("refuse = { k: 3,", "refuse = { k: 4,", "kind 4"),  # duplicate kind number
        (ACK, ACK.replace("a: seq", "? a: seq"), "envelope"),
        (ACK, ACK.replace("k: 4", "k: 4..5"), "literal"),
        ("trace / goodbye", "trace", "goodbye"),  # rule dropped from the root choice
        (
            "trace / goodbye",
            "trace / goodbye / extra\nextra = { k: 60, s: seq, a: seq }",
            "extra",
        ),  # rule without a class
    ],
)
def test_bind_refuses_mismatch(old, new, needle):
    """A class/rule disagreement (member added/removed, optionality, kinds) refuses to import."""
    schema = _modified(old, new)
    with pytest.raises(ImportError) as exc:
        codec._bind(schema)
    assert needle in str(exc.value)
