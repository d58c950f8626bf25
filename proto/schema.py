"""Compile vtick's CDDL schema into validators.

The schema file (``vtick.cddl``) is the one place a message is defined.  This module
reads the subset of RFC 8610 the schema uses and turns every rule into a small
validator object; the codec runs those on every message it sends and receives.  A
general CDDL implementation would be slower and, as the ecosystem notes found for
pycddl, not necessarily more correct; the conformance tests cross-check this compiler
against an independent validator (cddl-verifier) on positive and negative vectors.

Supported subset: rules ``name = type``; choices ``a / b``; unsigned and negative int
literals; ranges ``lo..hi`` over literals or rules bound to literals; the prelude types
``uint``, ``nint``, ``int``, ``bool``, ``bstr``, ``tstr``; ``.size N`` and
``.size (lo..hi)`` on strings; maps ``{ key: type, ? key: type, * keytype => type }``
with bare-word text keys; arrays ``[ occ type ]`` with occurrences ``?``, ``*``, ``+``
and ``n*m``; ``;`` comments.  Anything else is a SchemaError naming the line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

__all__ = [
    "SchemaError",
    "ValidationError",
    "Validator",
    "MapRule",
    "Schema",
    "load_schema",
    "compile_predicate",
]

U64_MAX = (1 << 64) - 1


class SchemaError(Exception):
    """The CDDL text uses something this compiler does not support, or is malformed."""


class ValidationError(Exception):
    """A value does not match its rule.  ``path`` names where, e.g. ``welcome.pvclock``."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path
        self.problem = problem


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"bool {value}"
    if isinstance(value, int):
        return f"int {value}"
    if isinstance(value, bytes):
        return f"bstr of {len(value)} bytes"
    if isinstance(value, str):
        return f"tstr of {len(value)} chars"
    if isinstance(value, dict):
        return "map"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


class Validator:
    """Checks one decoded CBOR value; raises ValidationError when it does not match."""

    def check(self, value: Any, path: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(slots=True)
class IntRange(Validator):
    lo: int
    hi: int

    def check(self, value: Any, path: str) -> None:
        if type(value) is not int:
            raise ValidationError(path, f"expected {self.describe()}, got {_describe(value)}")
        if not self.lo <= value <= self.hi:
            raise ValidationError(path, f"{value} out of range {self.lo}..{self.hi}")

    def describe(self) -> str:
        return "int" if self.lo != self.hi else str(self.lo)


@dataclass(slots=True)
class BoolType(Validator):
    def check(self, value: Any, path: str) -> None:
        if type(value) is not bool:
            raise ValidationError(path, f"expected bool, got {_describe(value)}")

    def describe(self) -> str:
        return "bool"


@dataclass(slots=True)
class StrType(Validator):
    kind: type  # bytes or str
    min_size: int = 0
    max_size: int | None = None

    def check(self, value: Any, path: str) -> None:
        if type(value) is not self.kind:
            raise ValidationError(path, f"expected {self.describe()}, got {_describe(value)}")
        # CDDL .size on tstr counts bytes of the UTF-8 encoding.
        n = len(value) if isinstance(value, bytes) else len(str(value).encode())
        if n < self.min_size or (self.max_size is not None and n > self.max_size):
            raise ValidationError(path, f"size {n} outside {self.min_size}..{self.max_size} bytes")

    def describe(self) -> str:
        return "bstr" if self.kind is bytes else "tstr"


@dataclass(slots=True)
class Choice(Validator):
    options: list[Validator]

    def check(self, value: Any, path: str) -> None:
        if all(isinstance(o, IntRange) and o.lo == o.hi for o in self.options):
            # a choice of integer literals (``mmio-size = 1 / 2 / 4 / 8``): say so plainly
            allowed = [o.lo for o in self.options if isinstance(o, IntRange)]
            if type(value) is int and value in allowed:
                return
            shown = value if type(value) is int else _describe(value)
            raise ValidationError(path, f"{shown} is not one of {', '.join(map(str, allowed))}")
        problems = []
        for option in self.options:
            try:
                option.check(value, path)
                return
            except ValidationError as exc:
                problems.append(exc.problem)
        raise ValidationError(path, "matches no choice (" + "; ".join(problems) + ")")

    def describe(self) -> str:
        return " / ".join(o.describe() for o in self.options)


@dataclass(slots=True)
class Ref(Validator):
    """A rule name, resolved after the whole file is read."""

    name: str
    schema: Schema

    def check(self, value: Any, path: str) -> None:
        self.schema.rules[self.name].check(value, path)

    def describe(self) -> str:
        return self.name


@dataclass(slots=True)
class MapRule(Validator):
    """A map with text keys.  ``members`` keeps the schema's order."""

    members: dict[str, tuple[Validator, bool]] = field(default_factory=dict)  # key -> (v, optional)
    generic: tuple[Validator, Validator] | None = None  # `* K => V`

    def check(self, value: Any, path: str) -> None:
        if type(value) is not dict:
            raise ValidationError(path, f"expected map, got {_describe(value)}")
        if self.generic is not None:
            key_v, val_v = self.generic
            for key, item in value.items():
                key_v.check(key, f"{path} key {key!r}")
                val_v.check(item, f"{path}.{key}")
            return
        for key, (validator, optional) in self.members.items():
            if key in value:
                validator.check(value[key], f"{path}.{key}" if path else key)
            elif not optional:
                raise ValidationError(path, f"missing field {key!r}")
        if len(value) > len(self.members) or any(k not in self.members for k in value):
            extra = sorted(repr(k) for k in value if k not in self.members)
            raise ValidationError(path, f"unknown field {', '.join(extra)}")

    def describe(self) -> str:
        return "map"


@dataclass(slots=True)
class ArrayRule(Validator):
    item: Validator
    min_items: int
    max_items: int | None

    def check(self, value: Any, path: str) -> None:
        if type(value) is not list:
            raise ValidationError(path, f"expected array, got {_describe(value)}")
        n = len(value)
        if n < self.min_items or (self.max_items is not None and n > self.max_items):
            raise ValidationError(path, f"{n} items, expected {self.min_items}..{self.max_items}")
        for i, item in enumerate(value):
            self.item.check(item, f"{path}[{i}]")

    def describe(self) -> str:
        return "array"


_TOKEN = re.compile(
    r"""\s*(?:
        (?P<num>-?\d+)
      | (?P<name>[A-Za-z@_$][A-Za-z0-9@_$.-]*[A-Za-z0-9@_$]|[A-Za-z@_$])
      | (?P<op>\.\.|=>|\.size|[=/{}\[\]():,?*+])
    )""",
    re.VERBOSE,
)

_PRELUDE: dict[str, Validator] = {
    "uint": IntRange(0, U64_MAX),
    "nint": IntRange(-U64_MAX - 1, -1),
    "int": IntRange(-U64_MAX - 1, U64_MAX),
    "bool": BoolType(),
    "bstr": StrType(bytes),
    "tstr": StrType(str),
}


class _Parser:
    def __init__(self, text: str, schema: Schema) -> None:
        self.schema = schema
        self.tokens: list[tuple[str, str, int]] = []
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.split(";", 1)[0]
            pos = 0
            while pos < len(line):
                if line[pos:].strip() == "":
                    break
                m = _TOKEN.match(line, pos)
                if m is None or m.end() == pos:
                    raise SchemaError(f"line {lineno}: cannot read {line[pos:].strip()!r}")
                kind = m.lastgroup or ""
                self.tokens.append((kind, m.group(kind), lineno))
                pos = m.end()
        self.pos = 0

    def peek(self, offset: int = 0) -> tuple[str, str, int]:
        i = self.pos + offset
        return self.tokens[i] if i < len(self.tokens) else ("eof", "", -1)

    def last_line(self) -> int:
        """The line of the token read last (the one an error is about)."""
        return self.tokens[self.pos - 1][2] if self.pos else 1

    def take(self, expected: str | None = None) -> tuple[str, str, int]:
        tok = self.peek()
        if expected is not None and tok[1] != expected:
            raise SchemaError(f"line {tok[2]}: expected {expected!r}, found {tok[1]!r}")
        self.pos += 1
        return tok

    def rules(self) -> None:
        while self.peek()[0] != "eof":
            kind, name, line = self.take()
            if kind != "name":
                raise SchemaError(f"line {line}: expected a rule name, found {name!r}")
            self.take("=")
            if name in self.schema.rules:
                raise SchemaError(f"line {line}: rule {name!r} defined twice")
            self.schema.rules[name] = self.type_()

    def type_(self) -> Validator:
        options = [self.type1()]
        while self.peek()[1] == "/":
            self.take()
            options.append(self.type1())
        return options[0] if len(options) == 1 else Choice(options)

    def type1(self) -> Validator:
        first = self.type2()
        if self.peek()[1] == "..":
            self.take()
            upper = self.type2()
            return IntRange(self.literal(first), self.literal(upper))
        if self.peek()[1] == ".size":
            self.take()
            if self.peek()[1] == "(":
                self.take()
                lo = self.literal(self.type2())
                self.take("..")
                hi = self.literal(self.type2())
                self.take(")")
            else:
                lo = hi = self.literal(self.type2())
            base = self.resolve(first)
            if not isinstance(base, StrType):
                raise SchemaError(f"line {self.last_line()}: .size only on bstr/tstr here")
            return StrType(base.kind, lo, hi)
        return first

    def literal(self, v: Validator) -> int:
        v = self.resolve(v)
        if isinstance(v, IntRange) and v.lo == v.hi:
            return v.lo
        raise SchemaError(f"line {self.last_line()}: expected an integer literal")

    def resolve(self, v: Validator) -> Validator:
        while isinstance(v, Ref):
            if v.name not in self.schema.rules:
                raise SchemaError(f"rule {v.name!r} used before it is defined")
            v = self.schema.rules[v.name]
        return v

    def type2(self) -> Validator:
        kind, text, line = self.take()
        if kind == "num":
            return IntRange(int(text), int(text))
        if kind == "name":
            if text in _PRELUDE:
                return _PRELUDE[text]
            return Ref(text, self.schema)
        if text == "{":
            return self.map_body()
        if text == "[":
            return self.array_body()
        if text == "(":
            inner = self.type_()
            self.take(")")
            return inner
        raise SchemaError(f"line {line}: unexpected {text!r}")

    def occurrence(self) -> tuple[int, int | None] | None:
        kind, text, _ = self.peek()
        if text == "?":
            self.take()
            return (0, 1)
        if text == "*":
            self.take()
            return (0, None)
        if text == "+":
            self.take()
            return (1, None)
        if kind == "num" and self.peek(1)[1] == "*":
            lo = int(self.take()[1])
            self.take("*")
            hi = int(self.take()[1]) if self.peek()[0] == "num" else None
            return (lo, hi)
        return None

    def map_body(self) -> MapRule:
        rule = MapRule()
        while self.peek()[1] != "}":
            occ = self.occurrence()
            kind, text, line = self.peek()
            if kind == "name" and self.peek(1)[1] == ":":
                self.take()
                self.take(":")
                if text in rule.members:
                    raise SchemaError(f"line {line}: key {text!r} twice in one map")
                if occ not in (None, (0, 1)):
                    raise SchemaError(f"line {line}: only '?' may qualify a named member")
                rule.members[text] = (self.type_(), occ == (0, 1))
            else:
                key = self.type_()
                self.take("=>")
                if occ != (0, None) or rule.members or rule.generic:
                    raise SchemaError(f"line {line}: only a lone `* key => value` is supported")
                rule.generic = (key, self.type_())
            if self.peek()[1] == ",":
                self.take()
        self.take("}")
        return rule

    def array_body(self) -> ArrayRule:
        occ = self.occurrence()
        item = self.type_()
        if self.peek()[1] == ",":
            self.take()
        self.take("]")
        lo, hi = occ if occ is not None else (1, 1)
        return ArrayRule(item, lo, hi)


class Schema:
    """The compiled rules of one CDDL text, by name."""

    def __init__(self, text: str) -> None:
        self.rules: dict[str, Validator] = {}
        _Parser(text, self).rules()
        for name, rule in self.rules.items():
            self._check_refs(rule, name)

    def _check_refs(self, v: Validator, where: str) -> None:
        if isinstance(v, Ref):
            if v.name not in self.rules:
                raise SchemaError(f"rule {where!r} refers to undefined {v.name!r}")
        elif isinstance(v, Choice):
            for o in v.options:
                self._check_refs(o, where)
        elif isinstance(v, MapRule):
            for mv, _ in v.members.values():
                self._check_refs(mv, where)
            if v.generic:
                self._check_refs(v.generic[0], where)
                self._check_refs(v.generic[1], where)
        elif isinstance(v, ArrayRule):
            self._check_refs(v.item, where)

    def resolve(self, name: str) -> Validator:
        v = self.rules[name]
        while isinstance(v, Ref):
            v = self.rules[v.name]
        return v

    def check(self, rule: str, value: Any) -> None:
        """Validate ``value`` against any named rule, not only a message (the migration
        state's ``vm-state``, say).

        Raises:
            SchemaError: no rule of that name.
            ValidationError: ``value`` does not match; its ``path`` starts below the
                rule (``vcpu[0].lapic.timer``), empty for the value itself.
        """
        if rule not in self.rules:
            raise SchemaError(f"no rule {rule!r} in the schema")
        self.rules[rule].check(value, "")

    def message_rules(self, root: str = "message") -> dict[str, MapRule]:
        """The map rules the root choice is made of, by rule name."""
        root_rule = self.rules[root]
        options = root_rule.options if isinstance(root_rule, Choice) else [root_rule]
        out: dict[str, MapRule] = {}
        for option in options:
            if not isinstance(option, Ref):
                raise SchemaError(f"{root!r} must be a choice of rule names")
            rule = self.resolve(option.name)
            if not isinstance(rule, MapRule):
                raise SchemaError(f"message rule {option.name!r} is not a map")
            out[option.name] = rule
        return out


class _PredicateCompiler:
    """Compiles a validator into one Python function ``pred(value) -> bool``.

    The validators above walk objects and build error texts; that is what a rejection
    needs, but a well-formed message (nearly all of them) only needs a yes.  The codec
    runs the compiled predicate on every message and calls the validator only when the
    predicate says no, to name the problem.  The predicate is generated source, compiled
    once per rule when the schema loads, so each message costs a handful of type and
    range tests.  It must accept exactly what the validator accepts: the codec treats a
    disagreement as a bug, and tests/test_schema.py compares both on generated and
    mutated values.
    """

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.lines: list[str] = []
        self.names: dict[int, str] = {}
        self.counter = 0

    def fresh(self) -> str:
        self.counter += 1
        return f"_p{self.counter}"

    def expr(self, v: Validator, x: str) -> str:
        """A boolean expression testing variable ``x`` against ``v``."""
        if isinstance(v, Ref):
            return self.expr(self.schema.rules[v.name], x)
        if isinstance(v, IntRange):
            if v.lo == v.hi:
                return f"(type({x}) is int and {x} == {v.lo})"
            return f"(type({x}) is int and {v.lo} <= {x} <= {v.hi})"
        if isinstance(v, BoolType):
            return f"(type({x}) is bool)"
        if isinstance(v, StrType):
            size = f"len({x})" if v.kind is bytes else f"len({x}.encode())"
            kind = "bytes" if v.kind is bytes else "str"
            hi = f" <= {v.max_size}" if v.max_size is not None else ""
            return f"(type({x}) is {kind} and {v.min_size} <= {size}{hi})"
        if isinstance(v, Choice):
            literals = [o.lo for o in v.options if isinstance(o, IntRange) and o.lo == o.hi]
            if len(literals) == len(v.options):
                return f"(type({x}) is int and {x} in {tuple(literals)!r})"
            return "(" + " or ".join(self.expr(o, x) for o in v.options) + ")"
        return f"{self.function(v)}({x})"

    def function(self, v: Validator) -> str:
        """The name of a generated function for a map or array validator."""
        if id(v) in self.names:
            return self.names[id(v)]
        name = self.fresh()
        self.names[id(v)] = name
        body: list[str] = [f"def {name}(v):"]
        if isinstance(v, MapRule):
            body.append("    if type(v) is not dict: return False")
            if v.generic is not None:
                key_v, val_v = v.generic
                body.append("    for k, i in v.items():")
                body.append(
                    f"        if not ({self.expr(key_v, 'k')} and {self.expr(val_v, 'i')}):"
                )
                body.append("            return False")
                body.append("    return True")
            else:
                body.append("    n = 0")
                for key, (mv, optional) in v.members.items():
                    body.append(f"    if {key!r} in v:")
                    body.append(f"        x = v[{key!r}]")
                    body.append(f"        if not {self.expr(mv, 'x')}: return False")
                    body.append("        n += 1")
                    if not optional:
                        body.append("    else:")
                        body.append("        return False")
                body.append("    return n == len(v)")
        elif isinstance(v, ArrayRule):
            body.append("    if type(v) is not list: return False")
            hi = f" <= {v.max_items}" if v.max_items is not None else ""
            body.append(f"    if not {v.min_items} <= len(v){hi}: return False")
            body.append("    for x in v:")
            body.append(f"        if not {self.expr(v.item, 'x')}: return False")
            body.append("    return True")
        else:  # pragma: no cover - every validator kind is handled above
            raise SchemaError(f"cannot compile {type(v).__name__}")
        self.lines.extend(body)
        self.lines.append("")
        return name


def compile_predicate(schema: Schema, v: Validator) -> Any:
    """``pred(value) -> bool``: True exactly when ``v.check(value, ...)`` passes."""
    compiler = _PredicateCompiler(schema)
    top = compiler.fresh()
    expr = compiler.expr(v, "v")  # generates the helper functions first
    compiler.lines.append(f"def {top}(v):")
    compiler.lines.append(f"    return {expr}")
    namespace: dict[str, Any] = {}
    exec(compile("\n".join(compiler.lines), f"<vtick.cddl {top}>", "exec"), namespace)  # noqa: S102
    return namespace[top]


SCHEMA_FILE = "vtick.cddl"


def schema_text() -> str:
    """The text of the normative schema shipped in this package."""
    return resources.files("vtick.proto").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")


def load_schema() -> Schema:
    return Schema(schema_text())
