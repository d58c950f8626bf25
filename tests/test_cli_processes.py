"""Issue 15 over real processes: an interrupted ``vtick run`` keeps what finished; a
second vCPU process on a taken link is refused at once on both sides; a vCPU that gets
no welcome names the address it dialled.  Short, bounded, and each checks it left no
process and no file behind."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import trio
from hostproc import VTICK, StandaloneHost, alive, children_of, cmdline

from vtick.guest.vcpu import GuestConfig, GuestFatal, GuestVcpu

pytestmark = pytest.mark.processes


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_during_a_later_path_keeps_the_finished_ones(
    tmp_path, private_tmp, sig, status
) -> None:
    out = tmp_path / "r.json"
    launcher = subprocess.Popen(
        [*VTICK, "run", "--vcpus", "2", "--duration", "0.8", "--modes", "pv-ktime,lapic-xapic",
         "--ipi", "none", "--json", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    family: set[int] = set()
    try:
        deadline = time.monotonic() + 30
        second = False
        while not second and time.monotonic() < deadline:
            time.sleep(0.1)
            for pid in children_of(launcher.pid):
                family.add(pid)
                second |= "--mode lapic-xapic" in cmdline(pid)
        assert second, "the second path never started"
        time.sleep(0.3)
        family.update(children_of(launcher.pid))
        launcher.send_signal(sig)
        stdout, stderr = launcher.communicate(timeout=30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode == status, stderr
    doc = json.loads(out.read_text())
    assert [r["name"] for r in doc["runs"]] == ["pv-ktime"]
    assert doc["runs"][0]["metrics"]["events"] > 0
    assert doc["interrupted"] == sig.name
    assert "pv-ktime" in stdout
    assert f"INTERRUPTED ({sig.name}) after 1 of 2 paths" in " ".join(stdout.split())
    time.sleep(0.2)
    assert [p for p in family if alive(p)] == [], "orphaned processes"
    assert list(private_tmp.iterdir()) == [], "temporary files left behind"


def test_a_second_process_on_a_taken_vcpu_is_refused_at_once_on_both_sides() -> None:
    host = StandaloneHost(1, 4.0)  # still running when the second gives up (~1 s)
    try:
        first = host.guest(0)
        time.sleep(0.8)  # connected and running
        started = time.monotonic()
        second = host.guest(0)
        _, err = second.communicate(timeout=15)
        waited = time.monotonic() - started
        assert second.returncode == 3, err
        assert "another process holds vCPU 0's link" in err
        assert f"{host.url}.0" in err  # the address it dialled
        assert waited < 5, f"refused after {waited:.1f} s, not at once"
        code, results, host_err = host.finish()
        first.communicate(timeout=20)
        assert first.returncode == 0
        assert code == 0  # the first vCPU's run is unharmed
        assert "second peer turned away: the link is taken" in host_err
        refused = results["vcpus"][0]["refused"]
        assert refused.get("second peer turned away: the link is taken", 0) >= 1
    finally:
        host.cleanup()


async def test_no_welcome_names_the_address_dialled(tmp_path) -> None:
    base = f"ipc://{tmp_path}/nobody"
    vcpu = GuestVcpu(GuestConfig(connect=base, vcpu=3, token=bytes(32), handshake_timeout_s=0.3))
    fatal: list[GuestFatal] = []
    with trio.fail_after(10):
        try:
            async with trio.open_nursery() as nursery:
                await vcpu.connect(nursery)
        except* GuestFatal as group:
            fatal.extend(e for e in group.exceptions if isinstance(e, GuestFatal))
    assert vcpu.ep is not None
    vcpu.ep.close()
    assert [f.status for f in fatal] == [2]
    assert f"no welcome from {base}.3 within" in str(fatal[0])
