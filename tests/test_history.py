"""The chaos history: event logs that survive SIGKILL, and the merge into one history
whose operations are tied together by ids (timer arming, exit and injection numbers),
with guest ktime moved to host ns through the kvmclock parameters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import pytest

from vtick.host.chaos.history import HistoryError, build_history, read_history, write_history
from vtick.host.chaos.nemesis import FaultOp
from vtick.host.chaos.orchestrator import ChaosOptions, Execution
from vtick.proto import eventlog as ev
from vtick.proto.eventlog import EventLog, LogContents, read_log
from vtick.proto.pvclock import TscModel

EPOCH = 5_000_000_000
KHZ = 2_500_000


def test_a_log_reads_back_what_was_written_and_grows(tmp_path) -> None:
    path = str(tmp_path / "log")
    log = EventLog(path, {"role": "test"}, capacity=4)
    slots = [log.add(ev.G_ARM, 10 * i, i, 100 * i) for i in range(1000)]
    log.patch(slots[3], 4, 77)
    log.close()
    contents = read_log(path)
    assert contents.header == {"role": "test"}
    assert len(contents.records) == 1000
    assert contents.records[3] == (ev.G_ARM, 30, 3, 300, 77, 0, 0, 0)
    assert contents.records[999][:4] == (ev.G_ARM, 9990, 999, 99900)
    assert log.add(ev.G_ARM, 1) == -1  # closed: nothing more


def test_a_killed_writer_keeps_every_record_it_wrote(tmp_path) -> None:
    """SIGKILL mid-run (the crash fault): the mapped pages outlive the process."""
    path = tmp_path / "vcpu.log"
    code = (
        "import os, signal\n"
        "from vtick.proto.eventlog import EventLog\n"
        f"log = EventLog({str(path)!r}, {{'role': 'guest'}}, capacity=16)\n"
        "for i in range(5000):\n"
        "    log.add(3, i, i)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=30)
    assert proc.returncode == -signal.SIGKILL
    records = read_log(str(path)).records
    assert len(records) == 5000
    assert records[-1][:3] == (3, 4999, 4999)


def test_an_anonymous_log_is_read_through_the_parents_descriptor(tmp_path) -> None:
    """The orchestrator's way: a memfd handed to a child that is SIGKILLed; nothing in
    any directory, and the parent reads every record back."""
    fd = ev.anonymous_fd("test")
    try:
        plan = json.dumps({"record_fd": fd, "windows": []})
        code = (
            "import os, signal\n"
            "from vtick.proto.eventlog import EventLog, load_plan, record_target\n"
            "log = EventLog(record_target(load_plan()), {'role': 'guest'}, capacity=8)\n"
            "for i in range(3000):\n"
            "    log.add(3, i, i)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code],
            env=dict(os.environ, **{ev.PLAN_ENV: plan}),
            pass_fds=(fd,),
            cwd=tmp_path,
            timeout=30,
        )
        assert proc.returncode == -signal.SIGKILL
        contents = read_log(fd)
        assert contents.header == {"role": "guest"}
        assert [r[2] for r in contents.records] == list(range(3000))
        assert list(tmp_path.iterdir()) == []
    finally:
        os.close(fd)


def test_a_plan_names_where_each_vcpu_records(monkeypatch, tmp_path) -> None:
    assert ev.record_target(None) is None
    assert ev.record_target({"record_fd": 7}) == 7
    assert ev.record_target({"record_fds": {"2": 9}}, vcpu=2) == 9
    assert ev.record_target({"record": "/x/vcpu{vcpu}.log"}, vcpu=3) == "/x/vcpu3.log"
    monkeypatch.setenv(ev.PLAN_ENV, '{"record_fd": 5}')
    assert ev.load_plan() == {"record_fd": 5}
    path = tmp_path / "plan.json"
    path.write_text('{"record": "y"}')
    monkeypatch.setenv(ev.PLAN_ENV, str(path))
    assert ev.load_plan() == {"record": "y"}
    path.write_text("[1]")
    with pytest.raises(ValueError, match="not a JSON object"):
        ev.load_plan()


def test_something_that_is_not_a_log_is_refused(tmp_path) -> None:
    path = tmp_path / "x"
    path.write_bytes(b"hello" * 1000)
    with pytest.raises(ValueError, match="not a vtick event log"):
        read_log(str(path))


# ------------------------------------------------------------------ building a history


def _guest(records: list[tuple[int, ...]], vcpu: int, inc: int = 0) -> LogContents:
    header = {"role": "guest", "vcpu": vcpu, "pid": 100 + vcpu + 10 * inc, "incarnation": inc}
    return LogContents(header, [tuple(r) + (0,) * (8 - len(r)) for r in records])


def _host(records: list[tuple[int, ...]]) -> LogContents:
    return LogContents({"role": "host"}, [tuple(r) + (0,) * (8 - len(r)) for r in records])


def _clock_records(session: int, vcpu: int) -> list[tuple[int, ...]]:
    model = TscModel(KHZ, EPOCH, EPOCH)
    info = model.publish(EPOCH + 1_000_000, 2)
    return [
        (ev.G_SESSION, 0, session, KHZ, EPOCH, 0, vcpu, 100 + vcpu),
        (ev.G_CLOCK, 0, info.version, info.tsc_timestamp, info.system_time,
         info.tsc_to_system_mul, info.tsc_shift, info.flags),
    ]  # fmt: skip


def _execution(**kw: Any) -> Execution:
    opts = ChaosOptions(seed=3, mode="pv-ktime", ipi="pv", vcpus=2, faults=("stop",))
    ex = Execution(opts, schedule=[FaultOp(1, "stop", 1, 1, 2, pattern="rr")], run_start=EPOCH)
    for k, v in kw.items():
        setattr(ex, k, v)
    return ex


def _by_f(history: list[dict[str, Any]], f: str) -> list[dict[str, Any]]:
    return [e for e in history if e["f"] == f]


def test_the_merge_ties_host_records_to_guest_ids_by_exit_and_inject_numbers() -> None:
    """vCPU 0 arms timer 7 (exit 5 programs it) and sends IPI 3 (exit 6) to vCPU 1; the
    host's records name exits 5 and 6 and injection 9 on vCPU 1; the history names the
    timer and the IPI in every one of them."""
    guest0 = _guest(
        _clock_records(11, 0)
        + [
            (ev.G_START, 1_000),
            (ev.G_ARM, 2_000, 7, 900_000),
            (ev.G_EXIT, 2_100, 5, 6, 40_000, 3_000, 7, 0),  # hypercall programming timer 7
            (ev.G_IPI_SEND, 3_000, 3, 0xFB, 0b10),
            (ev.G_EXIT, 3_100, 6, 3, 40_000, 3_000, 0, 3),  # msr-write sending IPI 3
            (ev.G_FIRE, 905_000, 7, 900_000, 2_000, 8),
        ],
        vcpu=0,
    )
    guest1 = _guest(
        _clock_records(12, 1) + [(ev.G_IRQ, 50_000, 9, 0xFB, 60_000, EPOCH + 45_000, 0)],
        vcpu=1,
    )
    host = _host(
        [
            (ev.H_SESSION, EPOCH, 0, 11, 100, ev.SESSION_NEW),
            (ev.H_SESSION, EPOCH, 1, 12, 101, ev.SESSION_NEW),
            (ev.H_RUN_START, EPOCH + 500),
            (ev.H_TARM, EPOCH + 2_200, 0, 5, EPOCH + 900_000),
            (ev.H_IPI, EPOCH + 3_200, 0, 0, 6, 1, 0xFB, ev.IPI_ACCEPTED),
            (ev.H_INJECT, EPOCH + 45_000, 1, 9, 0xFB, 0, 1),
            (ev.H_INJECT_IPI, EPOCH + 45_000, 1, 9, 0, 0, 6),
            (ev.H_TFIRE, EPOCH + 900_100, 0, 5, EPOCH + 900_000),
            (ev.H_INJECT, EPOCH + 900_200, 0, 8, 0xEC, 5, 0),
        ]
    )
    history = build_history(_execution(host_log=host, guest_logs=[guest0, guest1]))
    assert history[0]["f"] == "run"
    assert history[0]["value"]["ktime_epoch"] == EPOCH
    assert [e["index"] for e in history] == list(range(len(history)))
    assert [e["time"] for e in history] == sorted(e["time"] for e in history)
    (arm,) = _by_f(history, "host-timer-arm")
    assert arm["value"]["timer"] == "0.7"
    (fire,) = _by_f(history, "host-timer-fire")
    assert fire["value"]["timer"] == "0.7"
    timer_inject = next(e for e in _by_f(history, "inject") if e["vcpu"] == 0)
    assert timer_inject["value"]["timer"] == "0.7"
    (deliver,) = _by_f(history, "ipi-deliver")
    assert (deliver["vcpu"], deliver["value"]["ipi"], deliver["value"]["outcome"]) == (
        1,
        "0.3",
        "accepted",
    )
    ipi_inject = next(e for e in _by_f(history, "inject") if e["vcpu"] == 1)
    assert ipi_inject["value"]["ipis"] == ["0.3"]
    (handle,) = _by_f(history, "ipi-handle")
    assert (handle["vcpu"], handle["value"]["ipi"]) == (1, "0.3")
    (send,) = _by_f(history, "ipi-send")
    assert send["value"]["targets"] == [1]
    (timer_fire,) = _by_f(history, "timer-fire")
    assert timer_fire["value"]["late_ns"] == 5_000
    assert timer_fire["value"]["irq"] == 8


def test_guest_ktime_becomes_host_ns_through_the_kvmclock_parameters() -> None:
    model = TscModel(KHZ, EPOCH, EPOCH)
    info = model.publish(EPOCH + 1_000_000, 2)
    ktimes = [1_000_003, 123_456_789, 2_000_000_001]
    guest = _guest(
        _clock_records(11, 0) + [(ev.G_ARM, k, i + 1, k) for i, k in enumerate(ktimes)], vcpu=0
    )
    history = build_history(_execution(host_log=_host([]), guest_logs=[guest]))
    arms = _by_f(history, "timer-arm")
    for k, e in zip(ktimes, arms, strict=True):
        exact = model.host_ns_for_ktime(info, k)
        assert exact is not None
        assert abs(e["time"] - exact) <= 2
        assert abs(e["value"]["expires_host"] - exact) <= 2


def test_a_restarted_process_joins_its_own_session() -> None:
    """Exit numbers restart in a new session: host records after the second hello belong
    to generation 1, and so do the new process's exits."""
    first = _guest(_clock_records(11, 0) + [(ev.G_EXIT, 2_000, 1, 6, 40_000, 1, 7, 0)], vcpu=0)
    second = _guest(
        _clock_records(21, 0) + [(ev.G_EXIT, 9_000, 1, 6, 40_000, 1, 1_000_000_002, 0)],
        vcpu=0,
        inc=1,
    )
    host = _host(
        [
            (ev.H_SESSION, EPOCH, 0, 11, 100, ev.SESSION_NEW),
            (ev.H_TARM, EPOCH + 2_500, 0, 1, EPOCH + 10_000),
            (ev.H_SESSION, EPOCH + 8_000, 0, 21, 110, ev.SESSION_NEW, 40, 42),
            (ev.H_TARM, EPOCH + 9_500, 0, 1, EPOCH + 20_000),
        ]
    )
    history = build_history(_execution(host_log=host, guest_logs=[first, second]))
    arms = _by_f(history, "host-timer-arm")
    assert [a["value"]["timer"] for a in arms] == ["0.7", "0.1000000002"]
    sessions = _by_f(history, "session")
    assert [s["value"]["generation"] for s in sessions] == [0, 1]
    assert sessions[1]["value"]["lost"] == [40, 42]


def test_a_history_round_trips_through_its_file(tmp_path) -> None:
    history = build_history(_execution(host_log=_host([(ev.H_RUN_START, EPOCH)])))
    path = str(tmp_path / "history.jsonl")
    size = write_history(history, path)
    assert size == os.path.getsize(path)
    assert read_history(path) == json.loads(json.dumps(history))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\xff\xfe", "not UTF-8"),
        (b'{"index": 0}\n', "not a history event"),
        (b"{nope\n", "line 1|:1: not JSON"),
        (b'{"index": 0, "time": 1, "type": "info", "f": "exit"}\n', "no run event"),
    ],
)
def test_a_bad_history_file_is_refused_in_one_line(tmp_path, content: bytes, match: str) -> None:
    path = tmp_path / "history.jsonl"
    path.write_bytes(content)
    with pytest.raises(HistoryError, match=match):
        read_history(str(path))
