"""``vtick bench transport``: a short real run measures every path and prints the ratios."""

from __future__ import annotations

import re

import pytest

from vtick.host.bench import transport


def test_a_short_bench_prints_every_path_ratio_and_cpu(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert transport.run_transport_bench(count=120, warmup=20, block=40) == 0
    out = capsys.readouterr().out
    names = ("vtick exit", "trio + pynng echo", "pynng blocking echo", "AF_UNIX socketpair echo")
    for name in names:
        row = re.search(
            rf"^{re.escape(name)}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M
        )
        assert row, (name, out)
        median, p99, client_cpu, _server_cpu = (float(g) for g in row.groups())
        assert 0 < median <= p99, (name, out)
        assert client_cpu > 0, (name, out)
    for key in ("ratio_unix", "ratio_nng", "ratio_trio_nng"):
        line = re.search(rf"^{key} ([\d.]+) ", out, re.M)
        assert line, (key, out)
        assert float(line.group(1)) > 0, (key, out)
    cpu = re.search(r"^cpu_us_per_exit guest ([\d.]+) host ([\d.]+)$", out, re.M)
    assert cpu, out
    assert float(cpu.group(1)) > 0, out
    assert float(cpu.group(2)) > 0, out
