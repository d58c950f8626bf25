"""``vtick fuzz``: reproducible frames from the schema, a clean run against vtick's host,
and a planted host bug that is caught, saved and reproduced by ``--replay``."""

from __future__ import annotations

import json
import subprocess
import sys

import pynng
import pytest
from hostproc import StandaloneHost, say_hello

from vtick.host.conformance.fuzz import FrameGenerator, percentile
from vtick.proto import messages as m
from vtick.proto.codec import decode, encode
from vtick.proto.errors import ProtocolError
from vtick.proto.transport import link_url

VTICK = [sys.executable, "-m", "vtick.host"]


def test_frames_are_reproducible_and_valid_unless_broken_on_purpose() -> None:
    runs = []
    for _ in range(2):
        gen = FrameGenerator(seed=5, vcpu=1, vcpus=4)
        items = [gen.next(seq, 0) for seq in range(1, 3001)]
        runs.append([(i.kind, i.rule, i.msg, i.data) for i in items])
        kinds = {i.kind for i in items}
        assert kinds == {"valid", "broken", "mutated"}
        for item in items:
            if item.kind == "valid":
                assert item.msg is not None
                assert decode(encode(item.msg, 1, 0, 1 << 30), 1 << 30).msg == item.msg
            elif item.kind == "broken":
                assert item.data is not None
                with pytest.raises(ProtocolError):
                    decode(item.data, 1 << 30)
        assert len({i.rule for i in items}) >= 15  # every weighted kind shows up
    assert runs[0] == runs[1]
    other = FrameGenerator(seed=6, vcpu=1, vcpus=4)
    assert [other.next(seq, 0).msg for seq in range(1, 50)] != [x[2] for x in runs[0][:49]]


def test_percentile() -> None:
    assert percentile([], 99) is None
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile([5], 50) == 5


def fuzz(*argv: str, timeout: float = 90) -> tuple[int, dict, str]:
    proc = subprocess.run([*VTICK, "fuzz", *argv], capture_output=True, text=True, timeout=timeout)
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        doc = {}
    return proc.returncode, doc, proc.stderr


#: the one host defect vtick fuzz finds today (test_the_host_writes_results_after_... below)
KNOWN = "the host wrote no results when it was stopped"


@pytest.mark.processes
def test_a_short_fuzz_run_against_vticks_host_is_clean(tmp_path, private_tmp) -> None:
    code, doc, err = fuzz("--messages", "1500", "--save", str(tmp_path / "saved"))
    assert doc["messages"] == 1500, err[-2000:]
    assert [f for f in doc["failures"] if not f.startswith(KNOWN)] == []
    assert code == (1 if doc["failures"] else 0)
    assert doc["host_bugs"] == 0
    assert any(k.startswith("error ") for k in doc["answers"]), doc["answers"]
    assert doc["answers"]["exit-reply"] > 0
    good = doc["well_behaved"]
    assert good["exits_before"] > 0
    assert good["exits_during"] > 0
    assert good["wrong_answers"] == []
    assert (tmp_path / "saved").exists() == bool(doc["failures"])
    assert list(private_tmp.iterdir()) == []


EMPTY_REPORT_BINARY_HDR = m.Report(
    events=0,
    early=0,
    spurious=0,
    exits={},
    exit_rtt_ns={},
    lateness_hdr=b"\xe8\x00",  # schema-valid bytes, not the base64 text of §2.4
    lateness_max=0,
    duration_ns=0,
)


@pytest.mark.processes
def test_the_host_writes_results_after_a_report_with_a_binary_histogram() -> None:
    """Found by vtick fuzz: Host.results decoded report.lateness_hdr as ASCII and the host
    died writing everyone's results; now the bad histogram is dropped and recorded."""
    host = StandaloneHost(1, 0.3, "--report-timeout", "2")
    try:
        with pynng.Pair0(dial=link_url(host.url, 0), recv_timeout=5000) as raw:
            assert isinstance(say_hello(raw, host.token, pid=901, vcpu=0), m.Welcome)
            while not isinstance(decode(raw.recv()).msg, m.Shutdown):
                pass
            raw.send(encode(EMPTY_REPORT_BINARY_HDR, 1, 1))
            raw.send(encode(m.Goodbye(), 2, 1))
            while not isinstance(decode(raw.recv()).msg, m.Goodbye):
                pass
        code, results, err = host.finish()
        v = results["vcpus"][0]
        assert v["guest"] is not None, err
        assert v["guest"]["lateness_hdr"] is None
        assert any("lateness_hdr is not a base64 HDR histogram" in e for e in v["link_errors"])
    finally:
        host.cleanup()


PLANTED = """
import sys
import vtick.host.server as server

original = server.VcpuLink._dispatch


async def planted(self, msg, data, pipe, now):
    if isinstance(msg, server.m.Ping):  # a planted bug: any ping breaks the frame handler
        raise RuntimeError("planted bug")
    return await original(self, msg, data, pipe, now)


server.VcpuLink._dispatch = planted
from vtick.host.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.processes
def test_a_planted_host_bug_is_caught_saved_and_replayed(tmp_path, private_tmp) -> None:
    script = tmp_path / "planted.py"
    script.write_text(PLANTED)
    cmd = (
        f"{sys.executable} {script} host --listen {{url}} --vcpus {{vcpus}} --duration "
        "{duration} --connect-timeout {duration} --results {results}"
    )
    saved = tmp_path / "saved"
    code, doc, err = fuzz("--messages", "3000", "--host-cmd", cmd, "--save", str(saved))
    assert code == 1
    assert "INTERNAL" in doc["failures"][0], doc["failures"]
    (failure,) = saved.iterdir()
    assert str(failure) == doc["saved"]
    frames = json.loads(failure.read_text())["links"][0]["frames"]
    assert frames
    assert any(decode_kind(f) == "ping" for f in frames)
    code, replayed, _ = fuzz("--replay", str(failure), "--host-cmd", cmd)
    assert code == 1
    assert replayed["failures"], replayed
    code, clean, _ = fuzz("--replay", str(failure))  # vtick's own host: no such bug
    assert [f for f in clean["failures"] if not f.startswith(KNOWN)] == [], clean
    assert code == (1 if clean["failures"] else 0)
    assert list(private_tmp.iterdir()) == []


def decode_kind(text: str) -> str | None:
    try:
        return decode(bytes.fromhex(text), 1 << 30).msg.RULE
    except ProtocolError:
        return None


def test_bad_fuzz_command_lines_fail_in_one_line(tmp_path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    for argv, needle in [
        (["--replay", str(bad)], "not a vtick fuzz failure file"),
        (["--host-cmd", "no placeholder"], "must contain {url}"),
        (["--messages", "0"], "must be at least 1"),
    ]:
        proc = subprocess.run([*VTICK, "fuzz", *argv], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2
        assert needle in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
