"""The suite's reports: TAP 13 on stdout, a JSON document, JUnit XML and one HTML page.

Pure functions from a :class:`Report` to text; the caller writes the files.  The JSON
shape is documented in ``docs/conformance.md`` (``"vtick_conformance": 1``) and checked
by :func:`check_json_shape`, which the tests also run on every JSON the suite writes.
"""

from __future__ import annotations

import html
import json
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from vtick.host.conformance.case import CaseResult, Level, Outcome

__all__ = [
    "FORMAT_VERSION",
    "Report",
    "check_json_shape",
    "to_html",
    "to_json",
    "to_junit",
    "to_tap",
]

FORMAT_VERSION = 1
OUTCOMES = [o.value for o in Outcome]


@dataclass
class Report:
    """One run of a suite against one target."""

    side: str  # "host" or "guest"
    target: dict[str, Any]
    results: list[CaseResult]
    strict: bool
    started: str
    duration_ns: int
    extra: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        counted = Counter(r.outcome.value for r in self.results)
        return {name: counted.get(name, 0) for name in OUTCOMES}

    @property
    def ok(self) -> bool:
        """Every MUST passed (and, under --strict, every SHOULD); no harness errors."""
        return not any(r.outcome in (Outcome.FAIL, Outcome.ERROR) for r in self.results)


def _result_dict(result: CaseResult) -> dict[str, Any]:
    case = result.case
    return {
        "id": case.id,
        "title": case.title,
        "suite": case.suite,
        "level": case.level.value,
        "rule": case.rule,
        "outcome": result.outcome.value,
        "reason": result.reason,
        "duration_ms": round(result.duration_ns / 1e6, 3),
        "evidence": {
            "checks": [
                {"what": c.what, "ok": c.ok, "expected": c.expected, "observed": c.observed}
                for c in result.checks
            ],
            "notes": list(result.notes),
            "frames": [_frame(f) for f in result.frames],
        },
    }


def _frame(record: dict[str, Any]) -> dict[str, Any]:
    out = {"t_us": round(record["t"] / 1000, 1)}
    out |= {k: v for k, v in record.items() if k != "t"}
    return out


def to_json(report: Report) -> str:
    doc = {
        "vtick_conformance": FORMAT_VERSION,
        "side": report.side,
        "target": report.target,
        "strict": report.strict,
        "started": report.started,
        "duration_s": round(report.duration_ns / 1e9, 3),
        "summary": {"total": len(report.results), **report.counts(), "ok": report.ok},
        "cases": [_result_dict(r) for r in report.results],
        **report.extra,
    }
    return json.dumps(doc, indent=1, sort_keys=False) + "\n"


def check_json_shape(doc: dict[str, Any]) -> list[str]:
    """Problems with a report's JSON against its documented shape (empty = fine)."""
    problems: list[str] = []

    def need(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> None:
        if key not in obj:
            problems.append(f"{where}: missing {key!r}")
        elif not isinstance(obj[key], kind):
            problems.append(f"{where}.{key}: {type(obj[key]).__name__}, not {kind}")

    need(doc, "vtick_conformance", int, "report")
    need(doc, "side", str, "report")
    need(doc, "target", dict, "report")
    need(doc, "strict", bool, "report")
    need(doc, "started", str, "report")
    need(doc, "duration_s", (int, float), "report")
    need(doc, "summary", dict, "report")
    need(doc, "cases", list, "report")
    summary = doc.get("summary", {})
    for key in ["total", *OUTCOMES]:
        need(summary, key, int, "summary")
    need(summary, "ok", bool, "summary")
    if isinstance(doc.get("cases"), list):
        if summary.get("total") != len(doc["cases"]):
            problems.append("summary.total differs from the number of cases")
        for i, case in enumerate(doc["cases"]):
            where = f"cases[{i}]"
            for key in ("id", "title", "suite", "level", "rule", "outcome", "reason"):
                need(case, key, str, where)
            need(case, "duration_ms", (int, float), where)
            need(case, "evidence", dict, where)
            if case.get("level") not in [lv.value for lv in Level]:
                problems.append(f"{where}.level: {case.get('level')!r}")
            if case.get("outcome") not in OUTCOMES:
                problems.append(f"{where}.outcome: {case.get('outcome')!r}")
            evidence = case.get("evidence", {})
            need(evidence, "checks", list, f"{where}.evidence")
            need(evidence, "notes", list, f"{where}.evidence")
            need(evidence, "frames", list, f"{where}.evidence")
            for j, check in enumerate(evidence.get("checks", [])):
                for key in ("what", "expected", "observed"):
                    need(check, key, str, f"{where}.evidence.checks[{j}]")
                need(check, "ok", bool, f"{where}.evidence.checks[{j}]")
    return problems


# ---------------------------------------------------------------------- TAP


def _yaml_text(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid YAML flow scalar


def tap_line(number: int, result: CaseResult) -> str:
    """One TAP 13 test line (plus a YAML block for anything that did not pass)."""
    case = result.case
    name = f"{case.id} - {case.title}"
    outcome = result.outcome
    if outcome is Outcome.PASS:
        return f"ok {number} - {name}"
    if outcome is Outcome.UNSUPPORTED:
        return f"ok {number} - {name} # SKIP unsupported: {result.reason}"
    directive = f" # TODO non-strict ({case.level.value})" if outcome is Outcome.NON_STRICT else ""
    lines = [f"not ok {number} - {name}{directive}", "  ---"]
    lines.append(f"  outcome: {outcome.value}")
    lines.append(f"  level: {case.level.value}")
    lines.append(f"  rule: {_yaml_text(case.rule)}")
    lines.append(f"  reason: {_yaml_text(result.reason)}")
    failed = [c for c in result.checks if not c.ok]
    if failed:
        lines.append("  failed:")
        for c in failed:
            lines.append(f"    - what: {_yaml_text(c.what)}")
            lines.append(f"      expected: {_yaml_text(c.expected)}")
            lines.append(f"      observed: {_yaml_text(c.observed)}")
    lines.append("  ...")
    return "\n".join(lines)


def tap_header(total: int) -> str:
    return f"TAP version 13\n1..{total}"


def tap_footer(report: Report) -> str:
    counts = report.counts()
    shown = ", ".join(f"{n} {k}" for k, n in counts.items())
    return f"# {len(report.results)} cases: {shown}; {report.duration_ns / 1e9:.1f} s"


def to_tap(report: Report) -> str:
    lines = [tap_header(len(report.results))]
    lines += [tap_line(i, r) for i, r in enumerate(report.results, 1)]
    lines.append(tap_footer(report))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- JUnit


def _evidence_text(result: CaseResult) -> str:
    lines = [f"{result.case.id} [{result.case.level.value}] {result.case.rule}"]
    for c in result.checks:
        lines.append(
            f"  {'ok ' if c.ok else 'NOT'} {c.what}: expected {c.expected}, observed {c.observed}"
        )
    for note in result.notes:
        lines.append(f"  note: {note}")
    for f in result.frames:
        lines.append(
            f"  {f['t'] / 1000:10.1f} us {f['peer']:>8} {f['dir']:>4} {f.get('frame', '')}"
        )
    return "\n".join(lines)


def to_junit(report: Report) -> str:
    """JUnit XML: one testsuite per suite; fail -> <failure>, error -> <error>,
    unsupported -> <skipped>; non-strict passes with its deviation in <system-out>."""
    root = ET.Element("testsuites", name=f"vtick conformance {report.side}")
    suites: dict[str, list[CaseResult]] = {}
    for result in report.results:
        suites.setdefault(result.case.suite, []).append(result)
    for suite, results in suites.items():
        counted = Counter(r.outcome for r in results)
        element = ET.SubElement(
            root,
            "testsuite",
            name=f"vtick.conformance.{report.side}.{suite}",
            tests=str(len(results)),
            failures=str(counted[Outcome.FAIL]),
            errors=str(counted[Outcome.ERROR]),
            skipped=str(counted[Outcome.UNSUPPORTED]),
            time=f"{sum(r.duration_ns for r in results) / 1e9:.3f}",
        )
        for result in results:
            case = ET.SubElement(
                element,
                "testcase",
                classname=f"vtick.conformance.{report.side}.{suite}",
                name=result.case.id,
                time=f"{result.duration_ns / 1e9:.3f}",
            )
            if result.outcome is Outcome.FAIL:
                ET.SubElement(
                    case, "failure", message=result.reason, type="fail"
                ).text = _evidence_text(result)
            elif result.outcome is Outcome.ERROR:
                ET.SubElement(
                    case, "error", message=result.reason, type="error"
                ).text = _evidence_text(result)
            elif result.outcome is Outcome.UNSUPPORTED:
                ET.SubElement(case, "skipped", message=f"unsupported: {result.reason}")
            out = ET.SubElement(case, "system-out")
            prefix = (
                f"NON-STRICT: {result.reason}\n" if result.outcome is Outcome.NON_STRICT else ""
            )
            out.text = prefix + _evidence_text(result)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# ---------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
.pass{background:#dfd}.fail{background:#fcc}.non-strict{background:#ffd}
.unsupported{background:#eee}.error{background:#f9c}
pre{background:#f6f6f6;padding:6px;overflow-x:auto;font-size:12px}
section{border-top:1px solid #aaa;margin-top:1.5em}h2{font-size:16px}
"""


def to_html(report: Report) -> str:
    """One self-contained page: a summary, an index of cases, a section per case."""
    e = html.escape
    counts = report.counts()
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>vtick conformance {e(report.side)}</title><style>{_CSS}</style></head><body>",
        f"<h1>vtick conformance {e(report.side)}</h1>",
        f"<p>{e(report.started)}, {report.duration_ns / 1e9:.1f} s, "
        f"{'strict' if report.strict else 'not strict'}; target "
        f"<code>{e(json.dumps(report.target))}</code></p>",
        "<table><tr>"
        + "".join(f"<th>{k}</th>" for k in counts)
        + "</tr><tr>"
        + "".join(f'<td class="{k}">{n}</td>' for k, n in counts.items())
        + "</tr></table>",
        f"<p>Result: <b>{'every MUST passed' if report.ok else 'NOT CONFORMANT'}</b></p>",
        "<h2>Cases</h2><table><tr><th>id</th><th>level</th><th>outcome</th><th>title</th></tr>",
    ]
    for result in report.results:
        case = result.case
        out.append(
            f'<tr class="{result.outcome.value}"><td><a href="#{e(case.id)}">{e(case.id)}</a></td>'
            f"<td>{case.level.value}</td><td>{result.outcome.value}</td><td>{e(case.title)}</td></tr>"
        )
    out.append("</table>")
    for result in report.results:
        case = result.case
        out.append(
            f'<section id="{e(case.id)}"><h2 class="{result.outcome.value}">'
            f"{e(case.id)}: {result.outcome.value}</h2>"
        )
        out.append(
            f"<p>{e(case.title)}<br>Level {case.level.value}; rule: {e(case.rule)}; "
            f"{result.duration_ns / 1e6:.1f} ms</p>"
        )
        if result.reason:
            out.append(f"<p><b>{e(result.reason)}</b></p>")
        if result.checks:
            out.append("<table><tr><th></th><th>check</th><th>expected</th><th>observed</th></tr>")
            for c in result.checks:
                out.append(
                    f'<tr class="{"pass" if c.ok else "fail"}"><td>{"ok" if c.ok else "FAIL"}</td>'
                    f"<td>{e(c.what)}</td><td>{e(c.expected)}</td><td>{e(c.observed)}</td></tr>"
                )
            out.append("</table>")
        for note in result.notes:
            out.append(f"<pre>{e(note)}</pre>")
        if result.frames:
            rows = [
                f"{f['t'] / 1000:10.1f} us {f['peer']:>8} {f['dir']:>4} {f.get('frame', '')}"
                for f in result.frames
            ]
            out.append(
                "<details><summary>frames</summary><pre>" + e("\n".join(rows)) + "</pre></details>"
            )
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
