"""``vtick chaos`` end to end, with real host and vCPU processes over real sockets.

One short run per fault kind must be valid (no violation, every fault kind covered);
each planted bug (``--mutate``) must make the run invalid with its invariant named;
``vtick analyze`` re-checks a stored run; nothing is left behind, also after Ctrl-C.
Runs are 2 vCPUs for 1.2 s; the whole file takes about 40 s on a loaded 2-core machine.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import time

import pytest
from hostproc import VTICK

from vtick.host.mutations import MUTATIONS

pytestmark = pytest.mark.processes

TIMEOUT_S = 60


def _chaos(out: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VTICK, "chaos", "--runs", "1", "--vcpus", "2", "--duration", "1.2",
         "--out", str(out), "--keep", "all", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )  # fmt: skip


def _verdict(out: pathlib.Path) -> dict:
    (run,) = sorted(out.glob("run-*"))
    return json.loads((run / "verdict.json").read_text())


def _no_leftovers(tmp: pathlib.Path) -> None:
    assert sorted(p.name for p in tmp.iterdir()) == []


@pytest.mark.parametrize("kind", ["stop", "host-stop", "window", "crash", "link"])
def test_a_short_run_per_fault_kind_is_valid(
    kind: str, tmp_path: pathlib.Path, private_tmp: pathlib.Path
) -> None:
    out = tmp_path / "out"
    proc = _chaos(out, "--faults", kind, "--modes", "pv-ktime", "--ipi", "x2apic", "--seed", "3")
    verdict = _verdict(out)
    bad = {
        name: c["first"]["message"] if c["first"] else c["notes"]
        for name, c in verdict["checkers"].items()
        if c["valid"] is not True
    }
    assert proc.returncode == 0, (bad, proc.stdout[-2000:], proc.stderr[-2000:])
    assert verdict["valid"] is True
    assert verdict["faults"].get(kind, 0) >= 1
    coverage = verdict["checkers"]["coverage"]["counts"]
    assert coverage[f"{kind}: overlapping timers or IPIs"] >= 1
    assert all(c["violations"] == 0 for c in verdict["checkers"].values())
    assert (out / "run-3" / "history.jsonl").exists()
    _no_leftovers(private_tmp)


@pytest.mark.parametrize(
    ("mutation", "invariant"),
    [
        ("early-timer", "timer-not-early"),
        ("double-fire", "timer-once"),
        ("drop-ipi", "ipi-once"),
        ("lost-eoi", "lapic-consistent"),
        ("ack-before-exec", "no-silent-loss"),
    ],
)
def test_each_planted_bug_is_caught_by_its_invariant(
    mutation: str, invariant: str, tmp_path: pathlib.Path, private_tmp: pathlib.Path
) -> None:
    assert invariant in MUTATIONS[mutation].caught_by
    out = tmp_path / "out"
    # an early host timer shows only when the host wakes for it sooner than it is due:
    # timers 3..10 ms ahead give the 1 ms of planted earliness room on a loaded machine
    room = ["--param", "min_ns=3000000", "--param", "max_ns=10000000"]
    proc = _chaos(
        out, "--faults", "none", "--modes", "pv-ktime", "--ipi", "x2apic", "--mutate", mutation,
        *(room if mutation == "early-timer" else []),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-2000:]
    verdict = _verdict(out)
    assert verdict["checkers"][invariant]["valid"] is False
    assert f"{invariant}: INVALID" in proc.stdout
    assert f"--mutate {mutation}" in proc.stdout  # the reproduction command
    assert "MUTATION ACTIVE" in proc.stdout
    _no_leftovers(private_tmp)


def test_analyze_rechecks_a_stored_run_and_exits_the_same_way(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out"
    proc = _chaos(out, "--faults", "none", "--modes", "pv-ktime", "--ipi", "pv", "--mutate",
                  "drop-ipi")  # fmt: skip
    assert proc.returncode == 1
    (run,) = sorted(out.glob("run-*"))
    again = subprocess.run(
        [*VTICK, "analyze", str(run)], capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert again.returncode == 1, again.stdout
    assert "ipi-once" in again.stdout
    assert "INVALID" in again.stdout
    history = (run / "history.jsonl").read_text().splitlines()
    # drop the IPI sends: what is left is a history the checkers find valid for IPIs
    kept = [line for line in history if '"f":"ipi-send"' not in line]
    clean = tmp_path / "clean.jsonl"
    clean.write_text("\n".join(kept) + "\n")
    only = subprocess.run(
        [*VTICK, "analyze", str(clean)], capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert "ipi-once               valid" in only.stdout, only.stdout
    missing = subprocess.run(
        [*VTICK, "analyze", str(tmp_path / "nowhere")], capture_output=True, text=True
    )
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1


def test_ctrl_c_stops_the_runs_and_leaves_nothing_behind(
    tmp_path: pathlib.Path, private_tmp: pathlib.Path
) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [*VTICK, "chaos", "--runs", "3", "--vcpus", "2", "--duration", "3", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.5)  # in the middle of the first run, faults on
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 128 + signal.SIGINT, stdout
    assert "interrupted by SIGINT" in stdout
    _no_leftovers(private_tmp)
    leftover = subprocess.run(["pgrep", "-f", f"{private_tmp}"], capture_output=True, text=True)
    assert leftover.stdout == ""


def test_mistakes_are_caught_in_one_line_before_anything_runs(tmp_path: pathlib.Path) -> None:
    for args, words in [
        (["--duration", "0.5"], "at least 1 s"),
        (["--faults", "nap"], "choose from"),
        (["--vcpus", "64"], "1..32"),
        (["--out", "/proc/nope/x"], "--out"),
        (["--mutate", "nope"], "unknown mutation"),
        (["--param", "timers=0"], "timers"),
    ]:
        proc = subprocess.run(
            [*VTICK, "chaos", "--out", str(tmp_path / "o"), *args],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        assert proc.returncode == 2, (args, proc.stderr)
        assert words in proc.stderr, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1, proc.stderr
    assert not os.path.exists(tmp_path / "o")


def test_run_explain_breaks_down_the_worst_timers(
    tmp_path: pathlib.Path, private_tmp: pathlib.Path
) -> None:
    """``vtick run --explain`` (issue 15) records the path's events, prints the worst
    timers with their parts and blocker, keeps the breakdown in the results, and leaves
    no event log behind."""
    results = tmp_path / "r.json"
    proc = subprocess.run(
        [*VTICK, "run", "--modes", "pv-delta", "--ipi", "none", "--vcpus", "2", "--duration",
         "0.6", "--explain", "--json", str(results),
         "--preempt", "clockevents.delta_to_device=3000000"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Late timers explained" in proc.stdout
    assert "blocker:" in proc.stdout
    (run,) = json.loads(results.read_text())["runs"]
    explained = run["results"]["explain"]
    assert explained["events"] > 100
    assert explained["worst"]
    # pv-delta passes the window with a stale relative delta: programming is late.  The
    # worst timers are the ones the 3 ms window delayed; over all events the share
    # varies with how the timers batch (0.1-3 ms seen, against about 0.015 ms
    # without the window), so the mean is only required to show it at all
    assert explained["worst_mean_ns"]["programmed late"] > 1_000_000
    assert explained["mean_ns"]["programmed late"] > 50_000
    assert run["results"]["cleanup"]["ipc_leftovers"] == []
    _no_leftovers(private_tmp)


def _ours(tmp: pathlib.Path) -> dict[int, str]:
    """pid -> state of every process whose command line names our private TMPDIR."""
    found = {}
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(") ", 1)[1][0]
        except OSError:
            continue
        if str(tmp) in cmdline and state != "Z":
            found[int(proc.name)] = state
    return found


def test_a_killed_chaos_leaves_no_stopped_process_behind(
    tmp_path: pathlib.Path, private_tmp: pathlib.Path
) -> None:
    """SIGKILL of ``vtick chaos`` while it holds a vCPU stopped: the guardian continues it
    and ends every process; the logs were never in a directory."""
    proc = subprocess.Popen(
        [*VTICK, "chaos", "--runs", "1", "--vcpus", "2", "--duration", "6", "--faults",
         "stop", "--seed", "4", "--out", str(tmp_path / "out")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "T" not in _ours(private_tmp).values():
            time.sleep(0.005)
        assert "T" in _ours(private_tmp).values(), "no vCPU was ever seen stopped"
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _ours(private_tmp):
        time.sleep(0.1)
    assert _ours(private_tmp) == {}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and list(private_tmp.iterdir()):
        time.sleep(0.1)
    _no_leftovers(private_tmp)
