"""``vtick compare``: the differences between two ``vtick run`` results files."""

from __future__ import annotations

import json
import sys

from vtick.host.lab.report import print_compare

__all__ = ["compare_main"]


def compare_main(a: str, b: str) -> int:
    """``vtick compare A B``: print the differences between two results files."""

    docs = []
    for path in (a, b):
        try:
            with open(path) as fh:
                doc = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"vtick compare: {path}: {exc}", file=sys.stderr)
            return 2
        if not isinstance(doc, dict) or doc.get("vtick") != 2 or "runs" not in doc:
            print(f"vtick compare: {path} is not a vtick run results file", file=sys.stderr)
            return 2
        docs.append(doc)
    print_compare(docs[0], docs[1], (a, b))
    return 0
