"""``vtick conformance host``: the suite passes vtick's host, fails each planted bug on the
right cases, judges pure scripts correctly, and writes reports that parse.

Pure tests drive case scripts with canned answers (a case is a generator of operations,
so an out-of-order answer is a planted bug the checker must catch without any socket).
Process tests run the real suite against ``python -m vtick.host`` over ipc.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import pytest
from hostproc import alive, children_of, cmdline

from vtick.host.cli import _parser
from vtick.host.conformance import case as c
from vtick.host.conformance import report as rep
from vtick.host.conformance.cases_lapic import X2APIC_MSRS, x2apic_access
from vtick.host.conformance.hostsuite import HOST_CASES
from vtick.host.conformance.main import conformance_host_main
from vtick.host.mutations import MUTATIONS
from vtick.proto import messages as m

BY_ID = {case.id: case for case in HOST_CASES}


# ---------------------------------------------------------------------- the model, pure


def test_case_ids_are_unique_stable_and_cite_their_rule() -> None:
    assert len(BY_ID) == len(HOST_CASES) > 200
    for case in HOST_CASES:
        assert case.id == case.id.lower()
        assert " " not in case.id
        assert case.rule, case.id
        assert "protocol.md" in case.rule or "SDM" in case.rule or "KVM" in case.rule, case.id
    # the ids the issue names
    for wanted in ("lapic.timer.tdcr.3", "x2apic.msr.gp.0x80a", "link.replay.icr"):
        assert wanted in BY_ID


def test_every_section_a_case_cites_exists_in_the_protocol_document() -> None:
    from vtick.host.conformance.guestside import GUEST_CHECKS

    root = pathlib.Path(__file__).resolve().parent.parent
    text = (root / "docs" / "protocol.md").read_text()
    headings = set(re.findall(r"^#+ (\d+(?:\.\d+)?)[ .]", text, re.MULTILINE))
    cited = {s for case in HOST_CASES for s in re.findall(r"§(\d+(?:\.\d+)?)", case.rule)}
    cited |= {s for check in GUEST_CHECKS for s in re.findall(r"§(\d+(?:\.\d+)?)", check[3])}
    assert cited - headings == set()
    assert {"3.4", "3.7", "4.2"} <= cited  # the three defects' rules are cited
    doc = (root / "docs" / "conformance.md").read_text()
    for suite in {case.suite for case in HOST_CASES}:
        assert f"`{suite}." in doc, f"docs/conformance.md does not list suite {suite}"


@pytest.mark.parametrize(
    ("level", "strict", "expected"),
    [
        (c.Level.MUST, False, c.Outcome.FAIL),
        (c.Level.SHOULD, False, c.Outcome.NON_STRICT),
        (c.Level.SHOULD, True, c.Outcome.FAIL),
        (c.Level.MAY, True, c.Outcome.NON_STRICT),
    ],
)
def test_a_failed_check_is_judged_by_level(level, strict, expected) -> None:
    checks = [c.Check("a", True, "1", "1"), c.Check("b", False, "2", "3")]
    outcome, reason = c.judge(level, checks, strict)
    assert outcome is expected
    assert reason == "b: expected 2, observed 3"
    assert c.judge(level, checks[:1], strict) == (c.Outcome.PASS, "")


def test_case_selection_by_prefix_and_glob_and_a_clear_error() -> None:
    chosen = c.select(HOST_CASES, "lapic.timer.tdcr,link.replay.*")
    assert [x.id for x in chosen][-1] == "link.replay.icr" or "link.replay.icr" in {
        x.id for x in chosen
    }
    assert {x.id for x in chosen} == {f"lapic.timer.tdcr.{v}" for v in "012389ab"} | {
        "link.replay.icr"
    }
    with pytest.raises(ValueError, match="'nothing.here' matches no case"):
        c.select(HOST_CASES, "nothing.here")


def drive(
    case_id: str, answer: Callable[[c.Op], Any], vcpus: int = 4
) -> tuple[c.Outcome, list[c.Check]]:
    """Run a case script against canned answers (no sockets), judge it as the runner does."""
    ctx = c.Ctx(vcpus=vcpus)
    script = BY_ID[case_id].script(ctx)
    value: Any = None
    try:
        while True:
            value = answer(script.send(value))
    except StopIteration:
        pass
    except c.Abort:
        pass
    return c.judge(BY_ID[case_id].level, ctx.checks, False)[0], ctx.checks


WELCOME = m.Welcome(
    version=1,
    features=c.ALL_FEATURES,
    vcpu=1,
    vcpus=4,
    session=7,
    max_message=65536,
    tsc_khz=2_500_000,
    tsc_epoch=1_000,
    pvclock={
        "version": 2,
        "tsc_timestamp": 0,
        "system_time": 0,
        "tsc_to_system_mul": 0xCCCCCCCC,
        "tsc_shift": -1,
        "flags": 5,
    },
    workload="timers",
    seed=1,
)


def canned(inject_before_reply: bool) -> Callable[[c.Op], Any]:
    """A host that answers every exit with 0 and raises vector 0xec on the TSC_DEADLINE
    write, either before its reply (right) or after it (the defect issue 11 found)."""
    later: list[c.Arrival] = []

    def answer(op: c.Op) -> Any:
        if isinstance(op, c.Session):
            return WELCOME
        if isinstance(op, c.Exit):
            during: tuple[c.Arrival, ...] = ()
            if isinstance(op.msg, m.ExitMsrWrite) and op.msg.msr == 0x6E0:
                inject = c.Arrival(0, 10, m.Inject(vector=0xEC, host_time=10), 3, 3, b"")
                if inject_before_reply:
                    during = (inject,)
                else:
                    later.append(inject)
            reply = m.ExitReply(re=1, value=0, fault=0, host_ns=0)
            return c.ExitDone(1, 0, reply, 20, during)
        return None

    return answer


@pytest.mark.parametrize("right_order", [True, False])
def test_the_tscdeadline_case_catches_a_reply_before_its_interrupt(right_order: bool) -> None:
    outcome, checks = drive("lapic.tscdeadline.past", canned(right_order))
    assert outcome is (c.Outcome.PASS if right_order else c.Outcome.FAIL)
    assert any("before the WRMSR" in x.what for x in checks)


def test_an_unanswered_exit_fails_the_case_with_evidence() -> None:
    def silent(op: c.Op) -> Any:
        if isinstance(op, c.Session):
            return WELCOME
        if isinstance(op, c.Exit):
            return c.ExitDone(1, 0, None, None, ())
        return None

    outcome, checks = drive("lapic.esr", silent)
    assert outcome is c.Outcome.FAIL
    assert checks[-1].observed == "no reply within 2 s"


def test_a_feature_not_offered_makes_the_case_unsupported() -> None:
    ctx = c.Ctx(vcpus=4, features=0)
    with pytest.raises(c.Unsupported):
        next(BY_ID["pv.eoi"].script(ctx))


# ---------------------------------------------------------------------- reports, pure


def sample_report() -> rep.Report:
    results = []
    for outcome, level in [
        (c.Outcome.PASS, c.Level.MUST),
        (c.Outcome.FAIL, c.Level.MUST),
        (c.Outcome.NON_STRICT, c.Level.SHOULD),
        (c.Outcome.UNSUPPORTED, c.Level.MUST),
        (c.Outcome.ERROR, c.Level.MAY),
    ]:
        case = c.Case(f"demo.{outcome.value}", "a <demo> & case", level, "protocol.md §1", None)  # type: ignore[arg-type]
        checks = [c.Check("what", outcome is c.Outcome.PASS, "x", "y")]
        frames = [{"t": 1500, "peer": "vCPU 0", "dir": "send", "frame": "hello {}", "s": 0}]
        results.append(c.CaseResult(case, outcome, "why", checks, ["a note"], frames, 2_000_000))
    return rep.Report("host", {"url": "ipc:///x"}, results, False, "2026-01-01T00:00:00", 10**9)


def test_reports_have_their_documented_shapes() -> None:
    report = sample_report()
    doc = json.loads(rep.to_json(report))
    assert rep.check_json_shape(doc) == []
    assert doc["summary"] == {
        "total": 5,
        "pass": 1,
        "fail": 1,
        "non-strict": 1,
        "unsupported": 1,
        "error": 1,
        "ok": False,
    }
    broken = dict(doc, summary={"total": 5})
    assert rep.check_json_shape(broken)  # the shape check itself catches a bad document
    root = ET.fromstring(rep.to_junit(report))
    (suite,) = root.findall("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("5", "1", "1")
    assert suite.get("skipped") == "1"
    tap = rep.to_tap(report).splitlines()
    assert tap[:2] == ["TAP version 13", "1..5"]
    assert tap[2] == "ok 1 - demo.pass - a <demo> & case"
    assert any(line.startswith("not ok 3") and "# TODO non-strict" in line for line in tap)
    assert any(line.startswith("ok 4") and "# SKIP unsupported" in line for line in tap)
    page = rep.to_html(report)
    assert "a &lt;demo&gt; &amp; case" in page
    assert "<demo>" not in page
    assert "src=" not in page
    assert "http" not in page


# ---------------------------------------------------------------------- against vtick's host


def run_suite(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    args = _parser().parse_args(["conformance", "host", *argv])
    return conformance_host_main(args, out), out.getvalue()


@pytest.mark.processes
def test_vticks_host_passes_the_whole_suite_and_the_reports_parse(tmp_path, private_tmp) -> None:
    paths = {kind: str(tmp_path / f"report.{kind}") for kind in ("json", "xml", "html")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vtick.host",
            "conformance",
            "host",
            "--json",
            paths["json"],
            "--junit",
            paths["xml"],
            "--html",
            paths["html"],
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    doc = json.loads(pathlib.Path(paths["json"]).read_text())
    failed = [(x["id"], x["outcome"], x["reason"]) for x in doc["cases"] if x["outcome"] != "pass"]
    assert failed == [], proc.stderr[-2000:]
    assert proc.returncode == 0
    assert rep.check_json_shape(doc) == []
    assert doc["summary"]["total"] == len(HOST_CASES)
    assert proc.stdout.startswith(f"TAP version 13\n1..{len(HOST_CASES)}\n")
    root = ET.parse(paths["xml"]).getroot()
    assert sum(int(s.get("tests", 0)) for s in root) == len(HOST_CASES)
    page = pathlib.Path(paths["html"]).read_text()
    assert page.count("<section id=") == len(HOST_CASES)
    assert os.listdir(private_tmp) == []  # the host's directory is gone


def expected_failures(mutation: str) -> set[str]:
    """What each planted bug must fail (and nothing else in the suites it is run on)."""
    if mutation == "ignore-tdcr":
        return {f"lapic.timer.tdcr.{v}" for v in "12389ab"}  # divide-by-2 still passes
    if mutation == "x2apic-no-gp":
        partial = {
            f"x2apic.msr.gp.{msr:#x}" for msr in X2APIC_MSRS if x2apic_access(msr) != (True, True)
        }
        return partial | {
            f"x2apic.msr.gp.{x}" for x in ("beyond", "esr-nonzero", "self-ipi-reserved")
        }
    return {
        "pvclock-odd-version": {"pv.kvmclock.publish"},
        "periodic-no-clamp": {"lapic.timer.periodic.min-period"},
        "replay-executes": {"link.duplicate", "link.replay.icr"},
        "online-mask-stale": {"ipi.online-mask"},
    }[mutation]


#: the suites each mutation is run against (the whole suite, for each of them, is in
#: docs/conformance.md: the same mapping, measured by hand)
SUITES = {
    "ignore-tdcr": "lapic",
    "x2apic-no-gp": "x2apic,apicbase",
    "pvclock-odd-version": "pv",
    "periodic-no-clamp": "lapic.timer,lapic.tscdeadline",
    "replay-executes": "link",
    "online-mask-stale": "ipi",
}


@pytest.mark.processes
@pytest.mark.parametrize("mutation", sorted(SUITES))
def test_each_planted_bug_fails_exactly_its_cases(mutation: str, tmp_path, private_tmp) -> None:
    assert mutation in MUTATIONS
    report = str(tmp_path / "r.json")
    code, tap = run_suite("--mutate", mutation, "--cases", SUITES[mutation], "--json", report)
    doc = json.loads(pathlib.Path(report).read_text())
    failed = {x["id"] for x in doc["cases"] if x["outcome"] == "fail"}
    assert failed == expected_failures(mutation), tap[-3000:]
    assert not [x["id"] for x in doc["cases"] if x["outcome"] == "error"]
    assert code == 1
    assert doc["target"]["mutations"] == [mutation]


def test_bad_command_lines_fail_in_one_line_before_any_work(capsys, tmp_path) -> None:
    for argv, needle in [
        (["--cases", "no.such"], "matches no case"),
        (["--host-cmd", "vtick host"], "must contain {url}"),
        (["--json", str(tmp_path / "missing" / "r.json")], "does not exist"),
        (["--connect", "ipc:///x", "--mutate", "ignore-tdcr"], "--mutate applies"),
    ]:
        code, _ = run_suite(*argv)
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert needle in err
        assert "\n" not in err


@pytest.mark.processes
def test_the_suite_runs_against_a_host_it_did_not_start(monkeypatch) -> None:
    from hostproc import StandaloneHost

    host = StandaloneHost(2, 30.0)
    try:
        monkeypatch.setenv("VTICK_TOKEN", host.token.hex())
        code, tap = run_suite(
            "--connect", host.url, "--cases", "handshake.welcome,ipi.fixed,shutdown"
        )
        assert code == 0, tap
        lines = [line for line in tap.splitlines() if line.startswith(("ok", "not ok"))]
        assert len(lines) == 4
        assert all(line.startswith("ok") for line in lines)
        assert (
            sum("# SKIP unsupported" in line for line in lines) == 2
        )  # shutdown needs its own host
    finally:
        host.cleanup()


@pytest.mark.processes
def test_a_runner_killed_with_sigkill_leaves_no_host_behind(private_tmp) -> None:
    """The host ``vtick conformance host`` starts (for a day: the suite decides when it
    ends) watches its runner: a runner killed outright takes its host along."""
    runner = subprocess.Popen(
        [sys.executable, "-m", "vtick.host", "conformance", "host"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        hosts: list[int] = []
        while not hosts and time.monotonic() < deadline:
            time.sleep(0.05)
            hosts = [p for p in children_of(runner.pid) if " host --listen " in cmdline(p)]
        assert hosts, "the runner started no host"
        # it watches the runner's pid (an idle host writes nothing, so a broken stderr
        # pipe would never tell it)
        environ = pathlib.Path(f"/proc/{hosts[0]}/environ").read_bytes().split(b"\0")
        assert f"VTICK_PARENT_PID={runner.pid}".encode() in environ
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait()
        deadline = time.monotonic() + 10
        while alive(hosts[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(hosts[0]), cmdline(hosts[0])
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
