"""The host and vCPU processes freeze what their imports built before the run."""

from __future__ import annotations

import gc
import subprocess
import sys

from vtick.proto.lifecycle import freeze_startup_objects


def test_freezing_moves_the_startup_objects_out_of_the_collectors_sight() -> None:
    assert gc.get_freeze_count() == 0  # nothing in the test process froze before
    try:
        frozen = freeze_startup_objects()
        assert frozen > 1000  # pytest and vtick's modules, at least
        assert gc.get_freeze_count() >= frozen
        # a later full collection no longer traverses them
        assert len(gc.get_objects(generation=2)) < frozen
    finally:
        gc.unfreeze()


def test_a_vcpu_process_freezes_before_it_runs() -> None:
    """guest/cli.py calls it after its imports and before ``trio.run`` (stubbed here:
    nothing connects); a spy reports what it froze."""
    code = (
        "import gc, sys\n"
        "from vtick.guest import cli\n"
        "import vtick.proto.lifecycle as lc\n"
        "real = lc.freeze_startup_objects\n"
        "def spy():\n"
        "    n = real()\n"
        "    print('frozen', n, gc.get_freeze_count(), flush=True)\n"
        "    return n\n"
        "lc.freeze_startup_objects = spy\n"
        "import trio\n"
        "trio.run = lambda *a, **k: 0\n"
        "sys.exit(cli.main(['--connect', 'ipc:///nonexistent/x', '--vcpu', '0']))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={"VTICK_TOKEN": "00" * 32, "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    assert words[0] == "frozen", out.stdout
    assert int(words[1]) > 10_000, out.stdout  # the guest's imports were done
    assert int(words[2]) >= int(words[1]), out.stdout
