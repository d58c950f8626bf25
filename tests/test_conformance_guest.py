"""``vtick conformance guest``: vtick's guest passes against the scripted host, and a guest
with a planted bug (no retransmission) fails exactly the case that checks it."""

from __future__ import annotations

import io
import json
import sys

import pytest

from vtick.host.cli import _parser
from vtick.host.conformance import case as c
from vtick.host.conformance import guestside as g
from vtick.host.conformance import report as rep
from vtick.proto import messages as m
from vtick.proto.codec import encode


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    args = _parser().parse_args(["conformance", "guest", *argv])
    return g.conformance_guest_main(args, out), out.getvalue()


@pytest.mark.processes
def test_vticks_guest_passes(tmp_path, private_tmp) -> None:
    report = tmp_path / "guest.json"
    code, tap = run("--modes", "pv-ktime,lapic-xapic", "--json", str(report))
    doc = json.loads(report.read_text())
    assert rep.check_json_shape(doc) == []
    assert [x["id"] for x in doc["cases"] if x["outcome"] != "pass"] == [], tap[-3000:]
    assert code == 0
    assert doc["summary"]["total"] == 2 * len(g.GUEST_CHECKS)
    assert list(private_tmp.iterdir()) == []


PLANTED = """
import sys
from vtick.proto import link

link.Link.poll = lambda self, now: None  # a planted bug: this guest never retransmits
from vtick.guest.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.processes
def test_a_guest_that_never_retransmits_fails_the_retransmit_case(tmp_path, private_tmp) -> None:
    script = tmp_path / "planted_guest.py"
    script.write_text(PLANTED)
    report = tmp_path / "guest.json"
    code, tap = run(
        "--modes",
        "pv-ktime",
        "--guest-cmd",
        f"{sys.executable} {script} --connect {{url}} --vcpu {{vcpu}}",
        "--json",
        str(report),
    )
    doc = json.loads(report.read_text())
    failed = {x["id"] for x in doc["cases"] if x["outcome"] == "fail"}
    assert failed == {"guest.retransmit.pv-ktime"}, tap[-3000:]
    assert code == 1


def test_the_checks_judge_a_hand_written_trace() -> None:
    """Pure: a trace in which the guest sends a second exit while one is outstanding."""
    trace = g.GuestTrace(mode="pv-ktime", vcpu=0, token=bytes(32))

    def rec(direction: str, msg: m.Message, seq: int, ack: int = 0) -> None:
        data = encode(msg, seq, ack)
        trace.records.append(g.Record(len(trace.records), direction, data, msg, seq, ack))

    rec("recv", m.ExitMsrRead(msr=0x1B), 1)
    rec("recv", m.ExitMsrRead(msr=0x1B), 2)  # the bug: exit 1 is still outstanding
    rec("send", m.ExitReply(re=1, value=0, fault=0, host_ns=0), 1, 2)
    (one_exit,) = [x for x in g.guest_cases(trace) if x.id == "guest.one-exit.pv-ktime"]
    (result,) = g.judge_cases([one_exit], False, trace)
    assert result.outcome is c.Outcome.FAIL
    assert "exit s=2 while s=1 was outstanding" in result.reason
