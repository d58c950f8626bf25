"""``--explain`` (issue 15) on synthetic event streams with known answers: each late
timer's lateness splits into its parts along the path, and the blocker is named."""

from __future__ import annotations

from typing import Any

from test_chaos_checkers import EPOCH, MS, H

from vtick.host.chaos.explain import PARTS, explain
from vtick.host.lab.report import print_explain

US = 1_000


def chain(
    h: H,
    vcpu: int,
    arm: int,
    expires_ms: float,
    device_ms: float,
    fired_ms: float,
    injected_ms: float,
    arrived_ms: float,
    handler_ms: float,
    ran_ms: float,
) -> None:
    """One timer's whole trip, each point given."""
    timer = f"{vcpu}.{arm}"
    seq = 100 + arm
    expires = int(expires_ms * MS)
    h.add(expires_ms - 1, vcpu, "invoke", "timer-arm", timer=timer, expires=expires,
          expires_host=EPOCH + expires, incarnation=0)  # fmt: skip
    h.add(fired_ms, vcpu, "info", "host-timer-fire", timer=timer, origin=arm,
          expiry=EPOCH + int(device_ms * MS))  # fmt: skip
    h.add(injected_ms, vcpu, "info", "inject", seq=seq, vector=0xEC, timer=timer, ipis=[],
          generation=0)  # fmt: skip
    handled = EPOCH + int(handler_ms * MS)
    h.add(arrived_ms, vcpu, "ok", "irq", seq=seq, vector=0xEC, handled=handled, host_time=0,
          pv_eoi=False, generation=0)  # fmt: skip
    h.add(ran_ms, vcpu, "ok", "timer-fire", timer=timer, expires=expires,
          expires_host=EPOCH + expires, ran=int(ran_ms * MS),
          late_ns=int((ran_ms - expires_ms) * MS), programmed_host=None, irq=seq,
          generation=0)  # fmt: skip


def test_each_part_is_the_gap_between_two_points_of_the_path() -> None:
    h = H()
    h.start(1)
    # expiry 100, device programmed for 101 (+1), fired 103 (+2), injected 103.5 (+0.5),
    # arrived 104 (+0.5), handler 108 (+4), callback 108.25 (+0.25): 8.25 ms late
    chain(h, 0, 1, 100, 101, 103, 103.5, 104, 108, 108.25)
    out = explain(h.events())
    assert out["events"] == 1
    (worst,) = out["worst"]
    assert worst["late_ns"] == 8_250 * US
    assert worst["parts"] == {
        "programmed late": 1_000 * US,
        "host timer": 2_000 * US,
        "host handling": 500 * US,
        "transit": 500 * US,
        "guest until handler": 4_000 * US,
        "handler": 250 * US,
    }
    assert sum(worst["parts"].values()) == worst["late_ns"]
    assert worst["points_ktime"][0] == 100 * MS
    assert out["mean_ns"] == worst["parts"]


def test_the_blocker_of_a_guest_busy_in_an_exit_is_named() -> None:
    h = H()
    h.start(1)
    h.add(103.9, 0, "info", "exit", seq=40, kind="hypercall", rtt_ns=4 * MS, host_ns=3_000,
          timer=None, ipi=None, generation=0, incarnation=0)  # fmt: skip
    chain(h, 0, 1, 100, 100, 100.1, 100.2, 100.3, 108, 108.1)
    (worst,) = explain(h.events())["worst"]
    assert max(PARTS, key=lambda p: worst["parts"][p]) == "guest until handler"
    assert worst["blocker"] == "vCPU 0 was busy in a hypercall exit (4.0 ms)"


def test_the_blocker_of_a_host_busy_with_another_vcpu_is_named() -> None:
    h = H()
    h.start(2)
    h.add(100.5, 1, "info", "host-exit", seq=9, kind="mmio-write", handling_ns=5 * MS)
    chain(h, 0, 1, 100, 100, 106, 106.1, 106.2, 106.3, 106.4)
    (worst,) = explain(h.events())["worst"]
    assert worst["parts"]["host timer"] == 6 * MS
    assert worst["blocker"] == "the host was busy with vCPU 1's mmio-write exit (5.0 ms)"


def test_a_stale_relative_delta_is_named_with_its_window() -> None:
    h = H()
    h.start(1)
    h.fault("window", 0, 99.0, 102.5, pattern="clockevents.delta_to_device")
    chain(h, 0, 1, 100, 103, 103, 103.1, 103.2, 103.3, 103.4)
    (worst,) = explain(h.events())["worst"]
    assert worst["parts"]["programmed late"] == 3 * MS
    assert worst["blocker"].startswith(
        "vCPU 0 was preempted at clockevents.delta_to_device between computing"
    )
    assert "the relative delta went stale" in worst["blocker"]


def test_a_stopped_vcpu_and_a_retransmission_are_named() -> None:
    h = H(faults=("stop",))
    h.start(2)
    h.fault("stop", 0, 100.5, 150)
    chain(h, 0, 1, 100, 100, 100.1, 100.2, 100.3, 150.5, 150.6)
    chain(h, 1, 2, 200, 200, 200.1, 200.2, 700.2, 700.3, 700.4)
    worst = {w["vcpu"]: w for w in explain(h.events())["worst"]}
    assert worst[0]["blocker"] == "vCPU 0 was stopped (SIGSTOP) (50.2 ms)"
    assert worst[1]["blocker"] == "a retransmission on vCPU 1's link (500.0 ms)"


def test_a_callback_without_an_interrupt_is_all_guest() -> None:
    h = H(mode="pv-future")
    h.start(1)
    h.add(99, 0, "invoke", "timer-arm", timer="0.5", expires=100 * MS,
          expires_host=EPOCH + 100 * MS, incarnation=0)  # fmt: skip
    h.add(102, 0, "ok", "timer-fire", timer="0.5", expires=100 * MS, expires_host=EPOCH + 100 * MS,
          ran=102 * MS, late_ns=2 * MS, programmed_host=None, irq=None, generation=0)  # fmt: skip
    (worst,) = explain(h.events())["worst"]
    assert worst["parts"]["guest until handler"] == 2 * MS
    assert "without an interrupt" in worst["blocker"]


def test_the_worst_are_one_per_interrupt_and_ordered() -> None:
    h = H()
    h.start(1)
    for i, late in enumerate([1, 5, 3, 7]):
        base = 100 * (i + 1)
        chain(h, 0, i + 1, base, base, base, base, base, base, base + late)
    out = explain(h.events(), worst=3)
    assert [w["late_ns"] for w in out["worst"]] == [7 * MS, 5 * MS, 3 * MS]


def test_the_explanation_prints_within_80_columns(capsys: Any) -> None:
    from rich.console import Console

    h = H()
    h.start(1)
    chain(h, 0, 1, 100, 101, 103, 103.5, 104, 108, 108.25)
    campaign = {"runs": [{"family": "timer", "name": "pv-ktime",
                          "results": {"explain": explain(h.events())}}]}  # fmt: skip
    console = Console(width=80, force_terminal=False, color_system=None)
    print_explain(campaign, console)
    out = capsys.readouterr().out
    assert "timer 0.1 on vCPU 0: 8.25ms late" in out
    assert "guest 4.00ms (48%)" in out
    assert "blocker:" in out
    assert max(len(line) for line in out.splitlines()) <= 80
