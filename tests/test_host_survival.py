"""The host never dies from what a vCPU sends.

One regression test per defect found by a black-box fuzzer written from
docs/protocol.md (each failed on the code before its fix), plus the guards that make the
class impossible:

1. a resume hello acknowledging more than the host sent killed the host;
2. a PV timer hypercall with an unreachable expiry (KTIME_MAX) hung it at 100 % CPU;
3. an MMIO read of 16 bytes from a disabled APIC page killed it (a reply value beyond
   64 bits, encoded outside the guard);
4. nng segfaults while vCPUs drop and re-dial pipes (tests/test_pipe_soak.py).

Pure tests drive ``Machine.handle_exit`` and the time conversions with values at the
edges under hypothesis, each call bounded by a timer signal so that a hang fails the test
instead of stalling the suite.  Process tests talk to a real ``vtick host`` through a raw
Pair0 socket while a well-behaved vCPU is served on another link.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import pynng
import pytest
from hostproc import StandaloneHost, children_of, cmdline, raw_hello, say_hello
from hypothesis import given, settings
from hypothesis import strategies as st
from test_machine_fuzz import machine_with_everything

from vtick.proto import messages as m
from vtick.proto.abi import Hypercall
from vtick.proto.codec import decode, encode
from vtick.proto.errors import ErrorCode, ProtocolError
from vtick.proto.link import Link
from vtick.proto.pvclock import TscModel
from vtick.proto.transport import link_url

KTIME_MAX = (1 << 63) - 1
#: beyond what a 64-bit TSC at 2.5 GHz reaches (2**64 cycles = 7.378e18 ns)
FAR = 7_380_000_000_000_000_000
#: values at the edges of every integer field a frame can carry
EDGES = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]
EDGE_U64 = st.one_of(st.sampled_from(EDGES), st.integers(0, 2**64 - 1))
#: every size a u8 field can carry; the codec admits only the architectural ones
SIZES = st.integers(0, 255)


@contextlib.contextmanager
def bounded(seconds: float) -> Iterator[None]:
    """Fail (rather than hang) if the body runs longer than ``seconds``."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"did not return within {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def reply_frame(result_value: int, fault: int) -> bytes:
    """What the server would send: the reply must be encodable for any exit."""
    return encode(m.ExitReply(re=1, value=result_value, fault=fault, host_ns=0), 1, 0)


# ---------------------------------------------------------------------- defect 2: far expiries


@pytest.mark.parametrize("khz", [1, 1_000, 2_500_000, 4_294_967_295])
@pytest.mark.parametrize("ktime", [KTIME_MAX, 7_378_697_629_483_820_646, 2**63, 2**64 - 1])
def test_unreachable_ktime_is_never_and_returns_at_once(khz: int, ktime: int) -> None:
    tsc = TscModel(tsc_khz=khz, tsc_epoch=5, ktime_epoch=5)
    info = tsc.publish(10**9, 2)
    with bounded(2):
        when = tsc.host_ns_for_ktime(info, ktime)
    if when is not None:  # reachable: never early, and the ns before is too early
        assert info.ktime(tsc.tsc(when)) >= ktime
        assert info.ktime(tsc.tsc(when - 1)) < ktime


@settings(max_examples=300)
@given(khz=st.integers(1, 2**32 - 1), at=st.integers(0, 2**40), ktime=EDGE_U64)
def test_host_ns_for_ktime_is_bounded_exact_or_never(khz: int, at: int, ktime: int) -> None:
    tsc = TscModel(tsc_khz=khz, tsc_epoch=0, ktime_epoch=0)
    info = tsc.publish(at, 2)
    with bounded(2):
        when = tsc.host_ns_for_ktime(info, ktime)
    start = tsc.host_ns_for_tsc(info.tsc_timestamp)
    if when is None:
        # no host time while the 64-bit TSC counts reaches it
        assert info.ktime(2**64 - 1) < ktime or ktime > info.ktime(tsc.tsc(start)) + 2**63
        return
    assert when >= start
    assert info.ktime(tsc.tsc(when)) >= ktime
    if when > start:
        assert info.ktime(tsc.tsc(when - 1)) < ktime


@pytest.mark.parametrize(
    ("nr", "a0"),
    [
        (Hypercall.VTICK_SET_NEXT_KTIME, KTIME_MAX),
        (Hypercall.VTICK_SET_NEXT_KTIME, 2**64 - 1),
        (Hypercall.VTICK_SET_NEXT_KTIME, 7_380_000_000_000_000_000),
        (Hypercall.VTICK_SET_NEXT_DELTA, 7_380_000_000_000_000_000),
        (Hypercall.VTICK_SET_NEXT_DELTA, KTIME_MAX),
    ],
)
def test_pv_timer_far_expiry_disarms_like_ktime_max(nr: int, a0: int) -> None:
    machine = machine_with_everything(1)
    now = 1_000_000
    with bounded(2):
        machine.handle_exit(
            0, 1, m.ExitHypercall(nr=Hypercall.VTICK_SET_NEXT_DELTA, args=[10**6]), now, False
        )
        assert machine.next_deadline() is not None
        result = machine.handle_exit(0, 2, m.ExitHypercall(nr=nr, args=[a0]), now, False)
    assert result.value == 0
    assert result.fault == 0
    # KTIME_MAX means "never": the earlier expiry is replaced, nothing stays armed
    assert machine.next_deadline() is None


# ---------------------------------------------------------------------- defect 3: access sizes


def test_disabled_apic_wide_read_is_refused_at_decode() -> None:
    frame = bytes.fromhex("a5616b10617302616101636770611afee000306473697a6510")
    with pytest.raises(ProtocolError) as err:
        decode(frame)
    assert err.value.code == ErrorCode.BAD_FIELD
    assert "size" in str(err.value)


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_disabled_apic_reads_all_ones_of_its_size(size: int) -> None:
    machine = machine_with_everything(1)
    machine.handle_exit(0, 1, m.ExitMsrWrite(msr=0x1B, value=0xFEE00000), 0, False)
    result = machine.handle_exit(0, 2, m.ExitMmioRead(gpa=0xFEE00030, size=size), 0, False)
    assert result.value == (1 << (8 * size)) - 1
    reply_frame(result.value, result.fault)


@pytest.mark.parametrize(
    ("msg", "ok"),
    [(m.ExitMmioRead(gpa=0, size=s), s in (1, 2, 4, 8)) for s in (0, 1, 2, 3, 4, 5, 8, 9, 16, 255)]
    + [(m.ExitPioIn(port=0x40, size=s), s in (1, 2, 4)) for s in (0, 1, 2, 3, 4, 8, 255)],
)
def test_access_sizes_are_one_rule_at_the_codec(msg: m.Message, ok: bool) -> None:
    if ok:
        assert decode(encode(msg, 1, 0)).msg == msg
    else:
        with pytest.raises(ProtocolError):
            encode(msg, 1, 0)


# ---------------------------------------------------------------------- the class: any exit


EDGE_EXITS = st.one_of(
    st.builds(m.ExitMsrRead, msr=st.sampled_from([0x1B, 0x6E0, 0x4B564D00, 0x830, 0x838, 0])),
    st.builds(
        m.ExitMsrWrite,
        msr=st.sampled_from([0x1B, 0x6E0, 0x4B564D00, 0x4B564D04, 0x830, 0x838]),
        value=EDGE_U64,
    ),
    st.builds(
        m.ExitMmioRead, gpa=st.sampled_from([0xFEE00030, 0xFEE00390, 0xFEE00FF8, 0]), size=SIZES
    ),
    st.builds(
        m.ExitMmioWrite,
        gpa=st.sampled_from([0xFEE00300, 0xFEE00380, 0xFEE00320, 0xFEE00FFF]),
        size=SIZES,
        value=EDGE_U64,
    ),
    st.builds(m.ExitPioIn, port=st.sampled_from([0x40, 0x43, 0x61, 0xFFFF]), size=SIZES),
    st.builds(
        m.ExitPioOut,
        port=st.sampled_from([0x40, 0x43, 0x61]),
        size=SIZES,
        value=st.sampled_from([0, 0xFF, 0xFFFF, 2**32 - 1]),
    ),
    st.builds(
        m.ExitHypercall,
        nr=st.sampled_from([int(h) for h in Hypercall]),
        args=st.lists(st.one_of(st.sampled_from(EDGES), st.sampled_from([0, 1])), max_size=4),
    ),
)


@settings(max_examples=500)
@given(steps=st.lists(st.tuples(st.integers(0, 10**7), EDGE_EXITS), min_size=1, max_size=12))
def test_exits_at_the_edges_get_an_architectural_answer_quickly(steps) -> None:
    """Every frame the codec admits is answered at once with an encodable reply."""
    machine = machine_with_everything(2)
    machine.handle_exit(0, 1, m.ExitMsrWrite(msr=0x1B, value=0xFEE00000), 0, False)  # EN clear
    now = 1_000_000
    for seq, (dt, msg) in enumerate(steps, 2):
        now += dt
        try:
            frame = encode(msg, seq, 0)
        except ProtocolError:
            continue  # the codec refuses it on both sides: the host never sees it
        msg = decode(frame).msg
        with bounded(2):
            result = machine.handle_exit(seq % 2, seq, msg, now, unseen=False)
            reply_frame(result.value, result.fault)
            due = machine.next_deadline()
            if due is not None and due <= now:
                machine.on_timer(now)
        machine.take_actions()


# ---------------------------------------------------------------------- defect 1: resume acks


@settings(max_examples=200)
@given(sent=st.integers(0, 5), ack=EDGE_U64)
def test_resume_with_any_ack_raises_only_a_protocol_error(sent: int, ack: int) -> None:
    link = Link(name="host")
    for i in range(sent):
        link.send(m.Shutdown(reason=f"message {i}"), 0)
    if ack <= sent:
        link.resume(ack, 1)
        assert link.unacked() == sent - ack
    else:
        with pytest.raises(ProtocolError) as err:
            link.check_peer_ack(ack)
        assert err.value.code == ErrorCode.UNEXPECTED
        with pytest.raises(ProtocolError):
            link.resume(ack, 1)
        assert link.unacked() == sent  # nothing was changed


def _session(url: str, token: bytes, vcpu: int) -> tuple[pynng.Pair0, int]:
    raw = pynng.Pair0(dial=link_url(url, vcpu), recv_timeout=5000)
    welcome = say_hello(raw, token, pid=4242, vcpu=vcpu)
    assert isinstance(welcome, m.Welcome)
    return raw, welcome.session


def _next_non_welcome(raw: pynng.Pair0) -> m.Message:
    while True:
        msg = decode(raw.recv()).msg
        if not isinstance(msg, m.Welcome | m.Pvclock | m.Ack):
            return msg


@pytest.mark.processes
def test_resume_acking_beyond_what_was_sent_gets_an_error_and_the_host_serves_on() -> None:
    host = StandaloneHost(2, 1.0, "--report-timeout", "1")
    try:
        raw, session = _session(host.url, host.token, 1)
        raw.close()
        with pynng.Pair0(dial=link_url(host.url, 1), recv_timeout=5000) as again:
            reply = None
            for _ in range(30):  # Pair0 may still hold the old pipe: repeat as a vCPU does
                again.send(raw_hello(host.token, 4242, resume=session, vcpu=1, ack=5))
                try:
                    reply = decode(again.recv()).msg
                    break
                except pynng.Timeout:
                    continue
            assert isinstance(reply, m.Error), reply
            assert reply.code == ErrorCode.UNEXPECTED
            assert "acknowledges 5" in reply.reason
        good = host.guest(0)
        code, results, err = host.finish()
        good.communicate(timeout=20)
        assert good.returncode == 0
        v0, v1 = results["vcpus"]
        assert v0["guest"]["events"] > 0
        assert v0["link_errors"] == []
        assert any("acknowledges 5" in e for e in v1["link_errors"])
    finally:
        host.cleanup()


@pytest.mark.processes
def test_hostile_exits_are_answered_and_the_host_serves_on() -> None:
    """Defects 2 and 3 over a real link: KTIME_MAX, a far delta, a 16-byte APIC read."""
    host = StandaloneHost(2, 1.0, "--report-timeout", "1")
    try:
        raw, _ = _session(host.url, host.token, 1)
        with raw:
            frames = [
                bytes.fromhex("a5616b16617301616100626e721a565400016461726773811b7fffffffffffffff"),
                encode(
                    m.ExitHypercall(
                        nr=Hypercall.VTICK_SET_NEXT_DELTA, args=[7_380_000_000_000_000_000]
                    ),
                    2,
                    0,
                ),
                encode(m.ExitMsrWrite(msr=0x1B, value=0xFEE00000), 3, 0),
                encode(m.ExitMmioRead(gpa=0xFEE00030, size=8), 4, 0),
            ]
            for seq, frame in enumerate(frames, 1):
                raw.send(frame)
                reply = _next_non_welcome(raw)
                assert isinstance(reply, m.ExitReply), reply
                assert reply.re == seq
                assert reply.fault == 0
            assert reply.value == 2**64 - 1
            raw.send(bytes.fromhex("a5616b10617305616100636770611afee000306473697a6510"))
            reply = _next_non_welcome(raw)
            assert isinstance(reply, m.Error)
            assert reply.code == ErrorCode.BAD_FIELD
        good = host.guest(0)
        code, results, err = host.finish()
        good.communicate(timeout=20)
        assert good.returncode == 0
        assert results["vcpus"][0]["guest"]["events"] > 0
    finally:
        host.cleanup()


# ---------------------------------------------------------------------- a hung host is visible


@pytest.mark.processes
async def test_a_host_that_stops_answering_is_named_and_cleaned_up(tmp_path, monkeypatch) -> None:
    """A stopped (or spinning) host must not hang the run: the launcher names it and its
    cleanup (SIGCONT, SIGTERM, SIGKILL) leaves no process and no directory behind."""
    import os

    import trio

    from vtick.host.lab.launcher import RunFailed, RunOptions, launch

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr("tempfile.tempdir", str(tmp))
    stopped: list[int] = []

    async def stop_the_host() -> None:
        while not stopped:
            await trio.sleep(0.1)
            pid = _child_host(os.getpid())
            # once its link's socket exists the host is listening (READY follows at
            # once): stopping it earlier would test the READY timeout instead
            if pid is not None and list(tmp.glob("vtick-*/link.0")):
                await trio.sleep(0.3)
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)

    opts = RunOptions(vcpus=1, duration_s=0.5, host_grace_s=2.0)
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_the_host)
            with pytest.raises(RunFailed) as err:
                await launch(opts, str(tmp_path / "r.json"))
    assert stopped
    assert "stopped answering" in str(err.value)
    with contextlib.suppress(ProcessLookupError):
        os.kill(stopped[0], 0)
        raise AssertionError("the stopped host outlived the run")
    assert list(tmp.iterdir()) == []


def _child_host(parent: int) -> int | None:
    """The pid of ``parent``'s ``vtick host`` child, if it has one yet."""
    return next((p for p in children_of(parent) if "vtick.host host" in cmdline(p)), None)
