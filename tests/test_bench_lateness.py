"""``vtick bench lateness``: a short real run prints every path and every ratio line."""

from __future__ import annotations

import re

import pytest

from vtick.host.bench import lateness


def test_a_short_bench_prints_each_path_and_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    # sparse: one timer per vCPU 2..5 ms ahead, so even a loaded machine keeps up
    assert lateness.run_lateness_bench(1, 0.6, 1, 1, 2_000_000, 5_000_000) == 0
    out = capsys.readouterr().out
    for path in lateness.PATHS:
        row = re.search(rf"^{re.escape(path)}\s+(\d+)\s+([\d.]+)\s+([\d.]+)", out, re.M)
        assert row, (path, out)
        assert int(row.group(1)) > 0, (path, out)
    for key in ("lateness_ratio", "lateness_ratio_pv_eoi"):
        for pct in (50, 99):
            line = re.search(rf"^{key}_p{pct} ([\d.]+) ", out, re.M)
            assert line, (key, pct, out)
            assert float(line.group(1)) > 0, (key, pct, out)


def test_the_pv_eoi_path_refuses_a_run_without_pv_eoi(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted: the PV EOI path loses its APIC ops (runs the mode's xAPIC); the bench
    must refuse rather than print xAPIC figures under the PV EOI name."""
    real = lateness.RunOptions

    def without_apic(**kw: object) -> object:
        kw["apic"] = None
        return real(**kw)  # type: ignore[arg-type]

    monkeypatch.setattr(lateness, "RunOptions", without_apic)
    with pytest.raises(RuntimeError, match="took no PV EOI"):
        lateness._vtick_block(0.4, 1, (1, 2_000_000, 5_000_000), "kvm-pv")
