"""The chaos checkers on hand-written histories: a clean history passes every checker,
and each planted violation is caught by the right checker with the right event indices.

Histories are built as ``history.py`` writes them (``docs/chaos.md``); times are host ns
with the host's start (guest ktime 0) at ``EPOCH``.
"""

from __future__ import annotations

from typing import Any

import pytest

from vtick.host.chaos.checkers import (
    CHECKERS,
    UNKNOWN,
    CheckOptions,
    check_history,
    overall,
)

EPOCH = 1_000_000_000_000
MS = 1_000_000
Ev = dict[str, Any]


def ix(*events: Ev) -> list[int]:
    return [e["index"] for e in events]


class H:
    """A history under construction: add events in time order, then ``events()``."""

    def __init__(self, mode: str = "pv-ktime", faults: tuple[str, ...] = (), vcpus: int = 2):
        config = {"mode": mode, "faults": list(faults), "vcpus": vcpus, "seed": 1}
        run = {"config": config, "run_start": EPOCH + 10 * MS, "ktime_epoch": EPOCH}
        self._events: list[dict[str, Any]] = [
            {"index": 0, "time": EPOCH, "vcpu": None, "type": "info", "f": "run", "value": run}
        ]

    def add(self, ms: float, vcpu: int | None, typ: str, f: str, **value: Any) -> Ev:
        event = {"index": -1, "time": EPOCH + int(ms * MS), "vcpu": vcpu, "type": typ, "f": f,
                 "value": value}  # fmt: skip
        self._events.append(event)
        return event

    def events(self) -> list[dict[str, Any]]:
        """In time order (stable), indexed as history.py indexes them."""
        self._events.sort(key=lambda e: e["time"])
        for i, e in enumerate(self._events):
            e["index"] = i
        return self._events

    # ---- building blocks

    def start(self, vcpus: int = 2) -> None:
        self.add(10, None, "info", "run-start")
        for v in range(vcpus):
            self.add(10, v, "info", "session", session=100 + v, pid=200 + v, kind="new",
                     generation=0, lost=None)  # fmt: skip
            self.add(10, v, "info", "lapic-base", eois=0, injected=0)
            self.add(11, v, "info", "workload-start", incarnation=0, pid=200 + v)

    def timer(self, vcpu: int, arm: int, expires_ms: float, ran_ms: float | None) -> tuple[Ev, ...]:
        """A timer armed at arm_ms, its programming exit, host timer, injection, irq and
        callback; returns the indices (arm, exit, host arm, host fire, inject, irq, fire)."""
        timer = f"{vcpu}.{arm}"
        at = expires_ms - 1
        expires = int(expires_ms * MS)
        idx = [
            self.add(at, vcpu, "invoke", "timer-arm", timer=timer, expires=expires,
                     expires_host=EPOCH + expires, incarnation=0),
            self.add(at + 0.01, vcpu, "info", "exit", seq=arm, kind="hypercall", rtt_ns=50_000,
                     host_ns=3_000, timer=timer, ipi=None, generation=0, incarnation=0),
            self.add(at + 0.02, vcpu, "info", "host-timer-arm", timer=timer, origin=arm,
                     expiry=EPOCH + expires),
        ]  # fmt: skip
        if ran_ms is None:
            return tuple(idx)
        seq = 1000 + arm
        idx += [
            self.add(expires_ms, vcpu, "info", "host-timer-fire", timer=timer, origin=arm,
                     expiry=EPOCH + expires),
            self.add(expires_ms + 0.01, vcpu, "info", "inject", seq=seq, vector=0xEC,
                     timer=timer, ipis=[], generation=0),
            self.add(expires_ms + 0.02, vcpu, "ok", "irq", seq=seq, vector=0xEC,
                     handled=EPOCH + int((ran_ms - 0.001) * MS), host_time=0, pv_eoi=False,
                     generation=0),
            self.add(ran_ms, vcpu, "ok", "timer-fire", timer=timer, expires=expires,
                     expires_host=EPOCH + expires, ran=int(ran_ms * MS),
                     late_ns=int(ran_ms * MS) - expires, programmed_host=None, irq=seq,
                     generation=0),
        ]  # fmt: skip
        return tuple(idx)

    def call(self, src: int, target: int, n: int, at_ms: float, outcome: str = "ok") -> Ev:
        """A csd queued, its IPI sent, delivered, injected, handled, the csd run, the wait
        done; returns the csd-wait index."""
        csd, ipi = f"{src}.{n}", f"{src}.{n}"
        seq = 5000 + n
        self.add(at_ms, src, "invoke", "csd-queue", csd=csd, target=target, wait=True)
        self.add(at_ms + 0.01, src, "invoke", "ipi-send", ipi=ipi, vector=0xFB, targets=[target])
        self.add(at_ms + 0.02, src, "info", "exit", seq=n, kind="msr-write", rtt_ns=40_000,
                 host_ns=2_000, timer=None, ipi=ipi, generation=0, incarnation=0)  # fmt: skip
        self.add(at_ms + 0.03, target, "info", "ipi-deliver", ipi=ipi, src=src, vector=0xFB,
                 outcome="accepted")  # fmt: skip
        self.add(at_ms + 0.04, target, "info", "inject", seq=seq, vector=0xFB, timer=None,
                 ipis=[ipi], generation=0)  # fmt: skip
        self.add(at_ms + 0.05, target, "ok", "irq", seq=seq, vector=0xFB,
                 handled=EPOCH + int((at_ms + 0.06) * MS), host_time=0, pv_eoi=False,
                 generation=0)  # fmt: skip
        self.add(at_ms + 0.06, target, "ok", "ipi-handle", ipi=ipi, vector=0xFB, seq=seq,
                 generation=0)  # fmt: skip
        if outcome == "ok":
            self.add(at_ms + 0.07, target, "ok", "csd-run", csd=csd, src=src)
        typ = {"ok": "ok", "error": "fail", "cut off": "info"}[outcome]
        return self.add(at_ms + 0.08, src, typ, "csd-wait", csd=csd, target=target,
                        outcome=outcome)  # fmt: skip

    def fault(
        self, kind: str, target: int, a_ms: float, b_ms: float, fid: int = 1, pattern: str = ""
    ) -> None:
        value = {"fault": fid, "kind": kind, "target": target, "pattern": pattern}
        self.add(a_ms, None if target < 0 else target, "invoke", "fault", **value)
        self.add(b_ms, None if target < 0 else target, "ok", "fault", **value)

    def finish(self, vcpus: int = 2, eois: int = 1, end_ms: float = 500) -> None:
        self.add(end_ms, None, "info", "run-end")
        for v in range(vcpus):
            self.add(end_ms + 1, v, "info", "workload-end", incarnation=0, pid=200 + v,
                     eois=eois, pv_eoi_unreported=0, irqs_handled=eois, generation=0)  # fmt: skip
        for v in range(vcpus):
            self.add(end_ms + 5, v, "info", "lapic-end", isr=[], irr=[], eois=eois,
                     injected=eois, sessions=1)  # fmt: skip


def clean() -> H:
    h = H()
    h.start()
    h.timer(0, 1, 100, 100.05)
    h.timer(1, 1, 101, 101.05)
    h.call(0, 1, 7, 200)
    h.finish()
    return h


def verdict(h: H, name: str, **opts: Any) -> Any:
    return check_history(h.events(), CheckOptions(**opts), only=[name])[name]


def test_a_clean_history_is_valid_for_every_checker() -> None:
    verdicts = check_history(clean().events())
    assert set(verdicts) == set(CHECKERS)
    for name, v in verdicts.items():
        assert v.valid is True, (name, v.first, v.notes)
        assert v.violations == 0
    assert overall(verdicts) is True
    assert verdicts["timer-once"].counts["fired"] == 2
    assert verdicts["ipi-once"].counts["handled once"] == 1


def test_an_early_callback_is_caught_with_its_arm_and_fire() -> None:
    h = H()
    h.start()
    idx = h.timer(0, 17, 1000.2, 1000.15)
    h.finish(eois=1)
    v = verdict(h, "timer-not-early")
    assert v.valid is False
    assert v.first["indices"] == ix(idx[0], idx[-1])
    assert v.first["message"] == (
        "timer 0.17 armed for 1.000200 s fired at 1.000150 s, 50 us early"
    )


def test_a_host_timer_firing_before_its_device_expiry_is_caught() -> None:
    h = H()
    h.start()
    arm = h.add(50, 0, "info", "host-timer-arm", timer="0.3", origin=3, expiry=EPOCH + 100 * MS)
    fire = h.add(99.8, 0, "info", "host-timer-fire", timer="0.3", origin=3, expiry=EPOCH + 100 * MS)
    v = verdict(h, "timer-not-early")
    assert v.valid is False
    assert v.first["indices"] == ix(arm, fire)
    assert "200 us early" in v.first["message"]


@pytest.mark.parametrize(("mode", "caught"), [("pv-ktime", True), ("lapic-xapic", False)])
def test_an_injection_before_the_guest_expiry_counts_in_absolute_modes_only(
    mode: str, caught: bool
) -> None:
    """LAPIC one-shot modes may see an early device interrupt (calibration error), the
    absolute ones never."""
    h = H(mode=mode)
    h.start()
    arm = h.add(50, 0, "invoke", "timer-arm", timer="0.4", expires=100 * MS,
                expires_host=EPOCH + 100 * MS, incarnation=0)  # fmt: skip
    inj = h.add(99.9, 0, "info", "inject", seq=9, vector=0xEC, timer="0.4", ipis=[], generation=0)
    v = verdict(h, "timer-not-early")
    assert (v.valid is False) is caught
    if caught:
        assert v.first["indices"] == ix(arm, inj)


def test_a_timer_that_never_fires_is_lost_unless_the_run_ended_first() -> None:
    h = H()
    h.start()
    lost = h.timer(0, 5, 100, None)
    h.timer(1, 6, 499.9, None)  # due as the run ended: not lost
    h.finish(eois=0)
    v = verdict(h, "timer-once")
    assert v.valid is False
    assert v.violations == 1
    assert v.first["indices"] == ix(lost[0])
    assert v.first["message"].startswith("timer 0.5 armed for 0.100000 s never fired")
    assert v.counts["the run ended first"] == 1


def test_a_timer_of_a_crashed_process_is_accounted_for_not_lost() -> None:
    h = H(faults=("crash",))
    h.start()
    h.timer(0, 5, 100, None)
    h.add(150, 0, "invoke", "fault", fault=1, kind="crash", target=0, pattern="", pid=200)
    h.add(170, 0, "ok", "fault", fault=1, kind="crash", target=0, pattern="", pid=200, new_pid=300)
    h.finish(vcpus=1, eois=0)
    v = verdict(h, "timer-once")
    assert v.valid is True
    assert v.counts["crashed (accounted for)"] == 1


def test_a_programming_injected_twice_is_a_doubled_timer() -> None:
    h = H()
    h.start()
    idx = h.timer(0, 8, 100, 100.05)
    again = h.add(100.2, 0, "info", "inject", seq=1500, vector=0xEC, timer="0.8", ipis=[],
                  generation=0)  # fmt: skip
    v = verdict(h, "timer-once")
    assert v.valid is False
    assert v.first["indices"] == ix(idx[4], again)
    assert "programmed 1 time(s)" in v.first["message"]


def test_a_periodic_tick_may_inject_one_programming_many_times() -> None:
    h = H(mode="lapic-periodic")
    h.start()
    h.timer(0, 8, 100, 100.05)
    h.add(101, 0, "info", "inject", seq=1501, vector=0xEC, timer="0.8", ipis=[], generation=0)
    assert verdict(h, "timer-once").valid is True


def test_a_cancelled_timer_that_fires_is_caught() -> None:
    h = H()
    h.start()
    idx = h.timer(0, 9, 100, 100.05)
    cancel = h.add(100.04, 0, "ok", "timer-cancel", timer="0.9", reason="cancelled")
    v = verdict(h, "cancelled-never-fires")
    assert v.valid is False
    assert v.first["indices"] == ix(cancel, idx[-1])
    assert "was cancelled" in v.first["message"]


def test_an_ipi_that_reaches_no_lapic_is_caught() -> None:
    h = H()
    h.start()
    send = h.add(50, 0, "invoke", "ipi-send", ipi="0.3", vector=0xFC, targets=[1])
    h.add(50.01, 0, "info", "exit", seq=3, kind="msr-write", rtt_ns=40_000, host_ns=2_000,
          timer=None, ipi="0.3", generation=0, incarnation=0)  # fmt: skip
    h.finish(eois=0)
    v = verdict(h, "ipi-once")
    assert v.valid is False
    assert v.first["indices"] == ix(send)
    assert "reached no LAPIC" in v.first["message"]


def test_an_ipi_whose_sender_exit_was_never_answered_is_not_blamed() -> None:
    h = H()
    h.start()
    h.add(50, 0, "invoke", "ipi-send", ipi="0.3", vector=0xFC, targets=[1])
    h.add(50.01, 0, "info", "exit", seq=3, kind="msr-write", rtt_ns=None, host_ns=None,
          timer=None, ipi="0.3", generation=0, incarnation=0)  # fmt: skip
    assert verdict(h, "ipi-once").valid is True


def test_an_ipi_injected_but_never_handled_by_a_live_target_is_caught() -> None:
    h = H()
    h.start()
    send = h.add(50, 0, "invoke", "ipi-send", ipi="0.4", vector=0xFC, targets=[1])
    h.add(50.03, 1, "info", "ipi-deliver", ipi="0.4", src=0, vector=0xFC, outcome="accepted")
    inj = h.add(50.04, 1, "info", "inject", seq=77, vector=0xFC, timer=None, ipis=["0.4"],
                generation=0)  # fmt: skip
    h.finish(eois=0, end_ms=900)
    v = verdict(h, "ipi-once")
    assert v.valid is False
    assert v.first["indices"] == ix(send, inj)


def test_a_failed_call_is_fine_only_if_its_target_was_stopped() -> None:
    h = H(faults=("stop",))
    h.start()
    bad = h.call(0, 1, 1, 100, outcome="error")
    h.fault("stop", 1, 300, 1400)
    excused = h.call(0, 1, 2, 1300, outcome="error")
    h.finish(eois=2, end_ms=1500)
    v = verdict(h, "call-completes")
    assert v.valid is False
    assert v.violations == 1
    assert v.first["indices"][-1] == bad["index"]
    assert excused is not bad
    assert v.counts["failed with its target (or itself) stopped or crashed"] == 1


def test_a_csd_that_runs_twice_is_caught() -> None:
    h = H()
    h.start()
    h.call(0, 1, 1, 100)
    second = h.add(101, 1, "ok", "csd-run", csd="0.1", src=0)
    v = verdict(h, "call-completes")
    assert v.valid is False
    assert v.first["indices"][-1] == second["index"]


def test_a_lost_eoi_is_caught_by_the_lapic_check() -> None:
    h = clean()
    events = h.events()
    end = next(e for e in events if e["f"] == "lapic-end" and e["vcpu"] == 1)
    end["value"] |= {"eois": 0, "isr": [0xEC]}  # the guest did 1 EOI, the LAPIC cleared none
    v = check_history(events, only=["lapic-consistent"])["lapic-consistent"]
    assert v.valid is False
    done = next(e for e in events if e["f"] == "workload-end" and e["vcpu"] == 1)
    assert v.first["indices"] == [done["index"], end["index"]]
    assert "1 EOI(s) lost" in v.first["message"]


def test_injections_must_equal_eois_plus_vectors_in_service() -> None:
    h = clean()
    events = h.events()
    end = next(e for e in events if e["f"] == "lapic-end" and e["vcpu"] == 0)
    end["value"] |= {"injected": 3}  # 3 injected, 1 EOI, nothing in service
    v = check_history(events, only=["lapic-consistent"])["lapic-consistent"]
    assert v.valid is False
    assert "3 interrupts injected but 1 EOIs" in v.first["message"]


def test_an_unanswered_exit_without_a_link_error_is_silent_loss() -> None:
    h = H()
    h.start()
    lost = h.add(50, 0, "info", "exit", seq=12, kind="hypercall", rtt_ns=None, host_ns=None,
                 timer=None, ipi=None, generation=0, incarnation=0)  # fmt: skip
    v = verdict(h, "no-silent-loss")
    assert v.valid is False
    assert v.first["indices"] == ix(lost)
    h.add(60, 0, "info", "link-error")  # reported: not silent
    assert verdict(h, "no-silent-loss").valid is True


def test_an_injection_that_never_arrives_is_silent_loss() -> None:
    h = H()
    h.start()
    inj = h.add(50, 1, "info", "inject", seq=33, vector=0xEC, timer=None, ipis=[], generation=0)
    h.finish(eois=0)
    v = verdict(h, "no-silent-loss")
    assert v.valid is False
    assert v.first["indices"] == ix(inj)


def test_lateness_beyond_the_bound_must_overlap_a_fault_or_a_stall() -> None:
    h = H(faults=("stop",))
    h.start()
    late = h.timer(0, 1, 100, 400)  # 300 ms late, nothing on vCPU 0
    h.fault("stop", 1, 500, 900)
    h.timer(1, 2, 600, 950)  # 350 ms late, vCPU 1 stopped meanwhile: explained
    h.finish(eois=1, end_ms=1000)
    v = verdict(h, "lateness-explained", late_bound_ns=250 * MS)
    assert v.valid is False
    assert v.violations == 1
    assert v.first["indices"] == ix(late[-1])
    assert v.counts["explained by stop"] == 1
    assert verdict(h, "lateness-explained", late_bound_ns=400 * MS).valid is True


def test_a_watchdog_stall_explains_lateness() -> None:
    h = H()
    h.start()
    h.add(150, 0, "info", "stall", gap_ns=300 * MS, end=EPOCH + 450 * MS)
    h.timer(0, 1, 200, 460)
    assert verdict(h, "lateness-explained").valid is True


def test_coverage_is_unknown_when_a_fault_kind_never_touched_anything() -> None:
    h = H(faults=("stop", "crash"))
    h.start()
    h.timer(0, 1, 100, 100.05)
    h.fault("stop", 0, 90, 95)  # timer 0.1 armed at 99 ms: the stop came before it
    v = verdict(h, "coverage")
    assert v.valid == UNKNOWN
    assert any("stop never overlapped" in n for n in v.notes)
    assert any("crash never happened" in n for n in v.notes)


def test_coverage_is_valid_when_every_kind_overlapped_armed_timers() -> None:
    h = H(faults=("stop",))
    h.start()
    h.add(50, 0, "invoke", "timer-arm", timer="0.1", expires=100 * MS,
          expires_host=EPOCH + 100 * MS, incarnation=0)  # fmt: skip
    h.fault("stop", 0, 60, 70)
    assert verdict(h, "coverage").valid is True


def test_exposure_counts_the_operations_a_fault_was_on_for() -> None:
    h = H(faults=("stop",))
    h.start()
    h.timer(0, 1, 100, 100.05)
    h.fault("stop", 1, 150, 250)
    h.timer(1, 2, 200, 260)
    h.finish()
    v = verdict(h, "timer-not-early")
    assert v.exposure["stop"] == 1
    assert v.exposure["none"] == 1


def test_a_run_that_did_not_complete_is_unknown_not_valid() -> None:
    h = clean()
    events = h.events()
    events[0]["value"]["failure"] = "the run never started"
    verdicts = check_history(events)
    assert overall(verdicts) == UNKNOWN


def test_the_checkers_are_linear_in_the_history() -> None:
    """Four times the history takes about four times as long (not sixteen)."""

    def build(n: int) -> list[dict[str, Any]]:
        h = H()
        h.start()
        for i in range(n):
            h.timer(i % 2, i + 1, 100 + i, 100.05 + i)
        h.finish(eois=n, end_ms=100 + n + 1)
        return h.events()

    small, big = build(2000), build(8000)
    timings = []
    for events in (small, big):
        best = min(_timed(check_history, events) for _ in range(3))
        timings.append(best)
    assert timings[1] < 8 * timings[0], timings  # 4x the events


def _timed(fn: Any, *args: Any) -> float:
    import time

    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def test_what_a_stall_held_up_until_the_run_ended_is_cut_off_not_lost() -> None:
    """A vCPU starved near the end of the run: its due timer and its pending IPI are
    cut off by the run's end, as lateness-explained would have accepted them late."""
    h = H()
    h.start()
    h.timer(0, 5, 100, None)  # due at 100 ms, far before the end...
    h.add(300, 1, "invoke", "ipi-send", ipi="1.3", vector=0xFC, targets=[0])
    h.add(300.01, 1, "info", "exit", seq=3, kind="msr-write", rtt_ns=40_000, host_ns=2_000,
          timer=None, ipi="1.3", generation=0, incarnation=0)  # fmt: skip
    h.add(300.03, 0, "info", "ipi-deliver", ipi="1.3", src=1, vector=0xFC, outcome="accepted")
    h.add(300.04, 0, "info", "inject", seq=77, vector=0xFC, timer=None, ipis=["1.3"],
          generation=0)  # fmt: skip
    h.add(300.05, 0, "ok", "irq", seq=77, vector=0xFC, handled=None, host_time=0, pv_eoi=False,
          generation=0)  # fmt: skip
    h.add(350, 0, "info", "stall", gap_ns=400 * MS, end=EPOCH + 750 * MS)  # ...but starved
    h.finish(eois=0, end_ms=900)
    assert verdict(h, "timer-once").valid is True
    assert verdict(h, "timer-once").counts["delayed by a fault or a stall, then the run ended"] == 1
    ipi = verdict(h, "ipi-once")
    assert ipi.valid is True
    assert ipi.checked == 1
    # the same without the stall: both are violations
    h._events = [e for e in h._events if e["f"] != "stall"]
    assert verdict(h, "timer-once").valid is False
    assert verdict(h, "ipi-once").valid is False
