"""``vtick bench scale``'s figures for one small size, from a real run: the host's CPU per
exit comes from the host process's own CPU time, memory from each vCPU process."""

from __future__ import annotations

import pathlib

import pytest

from vtick.host.bench.scale import _one

pytestmark = pytest.mark.processes


def test_one_size_reports_host_cpu_per_exit_and_memory_per_process(
    private_tmp: pathlib.Path,
) -> None:
    row = _one(2, 2, 0.6)  # two vCPUs packed in one process
    assert "error" not in row, row
    assert row["ok"]
    # real CPU, not the model's handling time alone: at least a few us per exit
    assert row["host_cpu_us_per_exit"] is not None
    assert row["host_cpu_us_per_exit"] > 5  # receive, decode, handle, encode, send
    assert row["host_us_per_exit"] > 0
    # one process: its memory once, a Python interpreter's worth at least
    assert row["rss_mb"] > 8
    assert row["rss_mb"] >= row["pss_mb"] > 0
    assert row["rss_mb"] >= row["private_mb"] > 0
    assert list(private_tmp.iterdir()) == []
