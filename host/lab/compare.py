"""``vtick compare``: the differences between two ``vtick run`` results files.

Both files are validated before anything is printed: each must be UTF-8 JSON holding a
``vtick run`` document (``docs/measurement.md``: ``vtick`` 2, a ``config`` object, a
``runs`` list whose entries name their family and path and carry either ``metrics`` or
an ``error``).  A file that is not is refused with one line naming the file and the
first thing wrong, status 2.  Then the comparison says first how the two runs were
configured differently (1 vCPU against 16 measures something else), then compares every
path measured in both, and lists the paths only one of them has.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from vtick.host.lab.report import print_compare

__all__ = ["compare_main", "load_results", "BadResults"]


class BadResults(Exception):
    """Not a ``vtick run`` results file; the message says what is wrong."""


def _check(doc: Any) -> None:
    if not isinstance(doc, dict):
        raise BadResults("not a JSON object")
    if doc.get("vtick") != 2:
        raise BadResults(f'"vtick" is {doc.get("vtick")!r}, expected 2 (a vtick run file)')
    if not isinstance(doc.get("config"), dict):
        raise BadResults('"config" is missing or not an object')
    runs = doc.get("runs")
    if not isinstance(runs, list):
        raise BadResults(f'"runs" is {type(runs).__name__}, expected a list')
    for i, run in enumerate(runs):
        where = f"runs[{i}]"
        if not isinstance(run, dict):
            raise BadResults(f"{where} is not an object")
        for key in ("family", "name"):
            if not isinstance(run.get(key), str):
                raise BadResults(f'{where}."{key}" is missing or not a string')
        if "metrics" in run:
            if not isinstance(run["metrics"], dict):
                raise BadResults(f'{where}."metrics" is not an object')
            for key, value in run["metrics"].items():
                if key.endswith(("_per_event", "_per_s")) and not (
                    value is None or isinstance(value, int | float)
                ):
                    raise BadResults(f'{where}.metrics."{key}" is not a number')
        elif not isinstance(run.get("error"), str):
            raise BadResults(f'{where} has neither "metrics" nor "error"')


def load_results(path: str) -> dict[str, Any]:
    """Read and validate one results file.

    Raises:
        BadResults: unreadable, not UTF-8, not JSON, or not a vtick run document.
    """
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise BadResults(exc.strerror or str(exc)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadResults(f"not UTF-8 text (byte {exc.start})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadResults(f"not JSON: {exc}") from None
    _check(doc)
    return doc


def compare_main(a: str, b: str) -> int:
    """``vtick compare A B``: print the differences between two results files."""
    docs = []
    for path in (a, b):
        try:
            docs.append(load_results(path))
        except BadResults as exc:
            print(f"vtick compare: {path}: {exc}", file=sys.stderr)
            return 2
    print_compare(docs[0], docs[1], (a, b))
    return 0
