"""Command-line argument types and the run token, shared by ``vtick host`` and ``vtick guest``.

Both programs take the same kinds of values (URLs, counts, durations, ``NAME=INT``
parameters, preemption points) and read the run's token the same way, so the parsing
lives here once.  Each type raises ``argparse.ArgumentTypeError`` with a one-line reason,
which argparse prints before any work starts.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from vtick.proto.catalog import PREEMPTION_POINTS
from vtick.proto.transport import link_url

__all__ = [
    "TOKEN_ENV",
    "duration",
    "int_at_least",
    "nonneg_int",
    "param",
    "positive_int",
    "preempt",
    "preempt_arg",
    "read_token",
    "url",
    "vcpu_list",
    "vcpu_ranges",
]

#: the environment variable that carries the run token (never the command line)
TOKEN_ENV = "VTICK_TOKEN"


def int_at_least(lowest: int) -> Callable[[str], int]:
    """An argparse type: an integer (any base prefix) no smaller than ``lowest``."""

    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {lowest}")
        return value

    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def vcpu_list(text: str) -> list[int]:
    """An argparse type: vCPU indexes as ``N``, ``A-B`` (inclusive) or a comma list of both."""
    out: list[int] = []
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        try:
            lo = int(first, 0)
            hi = int(last, 0) if sep else lo
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected N, A-B or a comma list of them"
            ) from None
        if lo < 0 or hi < lo:
            raise argparse.ArgumentTypeError(f"{text!r}: {part.strip()!r} is not a range")
        out.extend(range(lo, hi + 1))
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"{text!r} names a vCPU twice")
    return out


def vcpu_ranges(values: list[int], sep: str = ",") -> str:
    """The inverse of :func:`vcpu_list` for sorted indexes: [0, 1, 2, 5] -> '0-2,5'
    ('-' for none)."""
    if not values:
        return "-"
    parts: list[str] = []
    start = prev = values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return sep.join(parts)


def duration(text: str) -> float:
    """An argparse type: seconds in (0, 86400]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 24 * 3600:
        raise argparse.ArgumentTypeError(f"duration {text!r} must be in (0, 86400] seconds")
    return value


def url(text: str) -> str:
    """An argparse type: a base URL from which every vCPU's link address derives."""
    try:
        link_url(text, 0)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def param(text: str) -> tuple[str, int]:
    """An argparse type: ``NAME=INTEGER``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=INTEGER")
    try:
        return key, int(value, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not an integer") from None


def preempt(text: str) -> tuple[str, int]:
    """An argparse type: ``POINT=NS`` with a known preemption point and 0..10 s."""
    name, sep, value = text.partition("=")
    if not sep or name not in PREEMPTION_POINTS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected POINT=NS with POINT one of {', '.join(PREEMPTION_POINTS)}"
        )
    try:
        ns = int(value, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not an integer") from None
    if not 0 <= ns <= 10 * 10**9:
        raise argparse.ArgumentTypeError(f"{text!r}: delay must be 0..10 s in ns")
    return name, ns


def preempt_arg(p: argparse.ArgumentParser) -> None:
    """Add ``--preempt POINT=NS`` (repeatable) to ``p``."""
    p.add_argument(
        "--preempt",
        type=preempt,
        action="append",
        default=[],
        metavar="POINT=NS",
        help="preempt the vCPU for NS ns every time it passes POINT: "
        + ", ".join(PREEMPTION_POINTS)
        + " (repeatable; default: none)",
    )


def read_token(token_file: str | None) -> bytes:
    """The run token from a 0600 file or the environment; SystemExit with one line if bad."""
    if token_file:
        try:
            st = os.stat(token_file)
        except OSError as exc:
            raise SystemExit(f"vtick: {token_file}: {exc.strerror}") from None
        if st.st_mode & 0o077:
            raise SystemExit(f"vtick: {token_file} is readable by others; chmod 600 it")
        with open(token_file) as fh:
            text = fh.read().strip()
    else:
        text = os.environ.get(TOKEN_ENV, "")
        if not text:
            raise SystemExit(f"vtick: no token: set ${TOKEN_ENV} or pass --token-file")
    try:
        token = bytes.fromhex(text)
    except ValueError:
        raise SystemExit("vtick: the token must be 64 hex digits") from None
    if len(token) != 32:
        raise SystemExit("vtick: the token must be 64 hex digits")
    return token
