"""The three defects issue 11 found with a client written from docs/protocol.md alone.

Each test failed on the host before its fix; each defect is also caught by conformance
cases (``handshake.stranger.*`` and ``handshake.not-hello``; ``lapic.tscdeadline.past``,
``lapic.tpr.lower``, ``ipi.self``, ``pv.timer.past`` and the others that look at
``ExitDone.during``; ``shutdown.late-hello``), which tests/test_conformance.py runs.

(a) a frame that is not a hello, on a link whose vCPU process has left, was dropped in
    silence; (b) the exit reply went out before the interrupt the exit caused; (c) a
    late hello after a clean goodbye recorded "session replaced" and failed the run.
"""

from __future__ import annotations

import pynng
import pytest
from hostproc import StandaloneHost, raw_hello, say_hello

from vtick.proto import apicdef as r
from vtick.proto import messages as m
from vtick.proto.codec import decode, encode
from vtick.proto.errors import ErrorCode
from vtick.proto.transport import link_url

pytestmark = pytest.mark.processes

EMPTY_REPORT = m.Report(
    events=0,
    early=0,
    spurious=0,
    exits={},
    exit_rtt_ns={},
    lateness_hdr=b"",
    lateness_max=0,
    duration_ns=0,
)


def _until_answer(sock: pynng.Pair0, frame: bytes, tries: int = 15) -> m.Message | None:
    """Send ``frame`` every 200 ms until the host answers (Pair0 may still be rejecting
    the new pipe while the host has not dropped the old one)."""
    sock.recv_timeout = 200
    for _ in range(tries):
        sock.send(frame)
        try:
            return decode(sock.recv()).msg
        except pynng.Timeout:
            continue
    return None


def test_a_strangers_bad_frames_after_the_process_left_are_refused() -> None:
    host = StandaloneHost(2, 1.0, "--report-timeout", "1")
    try:
        with pynng.Pair0(dial=link_url(host.url, 1), recv_timeout=3000) as first:
            assert isinstance(say_hello(first, host.token, pid=501, vcpu=1), m.Welcome)
        # vCPU 1's process has left; a stranger dials its link
        with pynng.Pair0(dial=link_url(host.url, 1)) as stranger:
            answer = _until_answer(stranger, b"\xff\xfe\xfd")
            assert isinstance(answer, m.Refuse), answer
            assert answer.code == ErrorCode.BAD_CBOR
            short = raw_hello(host.token, pid=502, vcpu=1)
        with pynng.Pair0(dial=link_url(host.url, 1)) as stranger:
            # a hello with a 16-byte token fails the schema: refused too
            bad = short.replace(b"\x58\x20" + host.token, b"\x50" + host.token[:16])
            answer = _until_answer(stranger, bad)
            assert isinstance(answer, m.Refuse), answer
            assert answer.code == ErrorCode.BAD_FIELD
        # the stranger is gone: the real vCPU processes are welcomed and served
        good = [host.guest(0), host.guest(1)]
        _, results, _ = host.finish()
        for proc in good:
            proc.communicate(timeout=20)
            assert proc.returncode == 0
        v1 = results["vcpus"][1]
        assert v1["bad_messages"] == 2
        assert v1["guest"]["events"] > 0
    finally:
        host.cleanup()


def test_b_the_interrupt_an_exit_causes_goes_out_before_its_reply() -> None:
    host = StandaloneHost(1, 1.0, "--report-timeout", "1")
    try:
        with pynng.Pair0(dial=link_url(host.url, 0), recv_timeout=3000) as raw:
            assert isinstance(say_hello(raw, host.token, pid=601, vcpu=0), m.Welcome)
            exits = [
                m.ExitMmioWrite(gpa=r.APIC_DEFAULT_BASE + r.APIC_SPIV, size=4, value=0x1FF),
                m.ExitMmioWrite(
                    gpa=r.APIC_DEFAULT_BASE + r.APIC_LVTT,
                    size=4,
                    value=r.APIC_LVT_TIMER_TSCDEADLINE | 0xEC,
                ),
                m.ExitMsrWrite(msr=r.MSR_IA32_TSC_DEADLINE, value=1),  # long past
            ]
            seen: list[m.Message] = []
            for seq, exit_msg in enumerate(exits, 1):
                raw.send(encode(exit_msg, seq, len(seen)))
                while True:
                    frame = decode(raw.recv())
                    if frame.msg.SEQUENCED:
                        seen.append(frame.msg)
                    if isinstance(frame.msg, m.ExitReply) and frame.msg.re == seq:
                        break
            kinds = [msg.RULE for msg in seen]
            assert kinds == ["exit-reply", "exit-reply", "inject", "exit-reply"], kinds
            inject = seen[2]
            assert isinstance(inject, m.Inject)
            assert inject.vector == 0xEC
        host.guest(0).communicate(timeout=20)
        host.finish()
    finally:
        host.cleanup()


def test_c_a_late_hello_after_a_clean_goodbye_keeps_the_run_clean() -> None:
    host = StandaloneHost(1, 0.3, "--report-timeout", "2")
    try:
        with pynng.Pair0(dial=link_url(host.url, 0), recv_timeout=5000) as raw:
            assert isinstance(say_hello(raw, host.token, pid=701, vcpu=0), m.Welcome)
            got = 0
            while True:  # wait for the end of the run
                frame = decode(raw.recv())
                got = max(got, frame.seq if frame.msg.SEQUENCED else got)
                if isinstance(frame.msg, m.Shutdown):
                    break
            raw.send(encode(EMPTY_REPORT, 1, got))
            raw.send(encode(m.Goodbye(), 2, got))
            while not isinstance(decode(raw.recv()).msg, m.Goodbye):
                pass
            # the host's goodbye is not acknowledged yet, so the host is still there:
            # a new process says hello on the same link
            raw.send(raw_hello(host.token, pid=702, vcpu=0))
            answer = decode(raw.recv()).msg
            assert isinstance(answer, m.Refuse), answer
            assert answer.code == ErrorCode.SHUTTING_DOWN
        code, results, err = host.finish()
        assert results["vcpus"][0]["link_errors"] == [], results["vcpus"][0]["link_errors"]
        assert results["ok"] is True
        assert code == 0, err
    finally:
        host.cleanup()
