"""Mistakes caught before the run (issue 15): each one line on stderr, exit status 2, and
no process started.  Run in-process: ``vtick.host.cli.main`` returns (or argparse exits)
before the campaign, which is replaced by a tripwire to prove it never starts."""

from __future__ import annotations

import argparse
import json
import os
import socket

import pytest

from vtick.host import cli
from vtick.host.exitcost import load_profile
from vtick.host.lab import campaign as campaign_module
from vtick.host.lab.compare import compare_main


@pytest.fixture(autouse=True)
def tripwire(monkeypatch):
    """Starting a campaign (or a host) fails the test: validation must come first."""

    async def started(*args, **kwargs):
        raise AssertionError("a run started despite a bad command line")

    monkeypatch.setattr(campaign_module, "run_campaign", started)
    monkeypatch.setattr("vtick.host.server.serve", started)
    monkeypatch.setenv("VTICK_TOKEN", "00" * 32)


def refused(capsys, *argv: str) -> str:
    """Run ``vtick argv``; assert status 2 and one line on stderr; return that line."""
    try:
        status = cli.main(list(argv))
    except SystemExit as exc:
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_workload_parameters_are_checked_by_name_and_range(capsys):
    assert "unknown parameter" in refused(capsys, "run", "--param", "foo=1")
    assert "timers=0: must be 1..4096" in refused(capsys, "run", "--param", "timers=0")
    line = refused(capsys, "run", "--param", "min_ns=5000000", "--param", "max_ns=1000000")
    assert "min_ns=5000000 must be below max_ns=1000000" in line
    assert "min_ns=3000000 must be below max_ns=2000000" in refused(
        capsys, "run", "--param", "min_ns=3000000"
    )  # against the default max_ns
    line = refused(capsys, "run", "--ipi", "none", "--param", "pause_ns=5")
    assert "only the ipi workload reads it" in line
    host = ("host", "--listen", "ipc:///tmp/x", "--vcpus", "1")
    assert "unknown parameter" in refused(capsys, *host, "--param", "foo=1")


def test_output_paths_are_checked_before_the_run(capsys, tmp_path):
    missing = "/nonexistent-vtick-dir/r.json"
    for option in ("--json", "--trace", "--histogram"):
        line = refused(capsys, "run", option, missing)
        assert line.startswith(f"vtick run: {option} {missing}: directory")
    assert "does not exist" in refused(capsys, "run", "--plots", "/nonexistent-vtick-dir/p")
    assert "is a directory" in refused(capsys, "run", "--json", str(tmp_path))
    same = str(tmp_path / "x.json")
    assert "both name" in refused(capsys, "run", "--json", same, "--trace", same)


def test_listen_addresses_are_checked_before_the_run(capsys, tmp_path):
    line = refused(capsys, "run", "--listen", "tcp://127.0.0.1:65534", "--vcpus", "4")
    assert "beyond 65535" in line
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = refused(capsys, "run", "--listen", f"tcp://127.0.0.1:{port - 1}", "--vcpus", "2")
        assert f"port {port} (vCPU 1) is in use" in line
        line = refused(capsys, "host", "--listen", f"tcp://127.0.0.1:{port}", "--vcpus", "1")
        assert "is in use" in line
    line = refused(capsys, "run", "--listen", "tcp://192.0.2.1:5600", "--vcpus", "1")
    assert "not an address of this machine" in line
    line = refused(capsys, "run", "--listen", f"ipc://{tmp_path}/nodir/link")
    assert "does not exist" in line


def test_exit_cost_profiles_are_read_strictly(capsys, tmp_path):
    typo = tmp_path / "typo.toml"
    typo.write_text('name = "t"\n[cost_ns]\n"mmio-write" = 11000\n')
    line = refused(capsys, "run", "--exit-cost", str(typo))
    assert str(typo) in line
    assert "'cost_ns'" in line
    key = tmp_path / "key.toml"
    key.write_text('[costs_ns]\n"mmio-wirte" = 11000\n')
    assert "costs_ns.mmio-wirte" in refused(capsys, "run", "--exit-cost", str(key))
    reason = tmp_path / "reason.toml"
    reason.write_text('[reasons_ns]\n"wrmsr 80b" = 0\n')
    assert "is not an exit reason" in refused(capsys, "run", "--exit-cost", str(reason))
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'name = "caf\xe9"\n')
    line = refused(capsys, "run", "--exit-cost", str(latin))
    assert str(latin) in line
    assert "not UTF-8" in line
    for shipped in ("kvm-2011-xapic", "x2apic", "apicv"):
        assert load_profile(shipped).costs_ns  # the shipped ones pass the strict reading


def test_absurd_values_and_duplicates_are_refused(capsys):
    assert "given twice" in refused(capsys, "run", "--modes", "pv-ktime,pv-ktime")
    assert "given twice" in refused(capsys, "run", "--ipi", "pv,x2apic,pv")
    assert "out of range 100..10000" in refused(capsys, "run", "--hz", "1000000")
    assert "too short" in refused(capsys, "run", "--duration", "1e-9")
    line = refused(capsys, "run", "--vcpus", "1", "--ipi", "pv")
    assert "needs at least 2 vCPUs" in line
    assert "nothing to run" in refused(capsys, "run", "--modes", "none", "--ipi", "none")


def test_version_and_every_option_says_its_default(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("vtick ")
    parser = cli._parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    mine = {"run": subs.choices["run"], "host": subs.choices["host"]}
    bench = next(
        a for a in subs.choices["bench"]._actions if isinstance(a, argparse._SubParsersAction)
    )
    mine |= {f"bench {n}": p for n, p in bench.choices.items()}
    for name, sub in mine.items():
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            if isinstance(action, argparse._HelpAction):
                continue
            text = action.help or ""
            assert "default" in text or "required" in text, (name, action.option_strings)
    host_help = subs.choices["host"].format_help()
    for word in ("timers", "tick", "ipi", "mixed", "pause_ns", "ipi_every_ns", "churn_pct"):
        assert word in host_help


# ---------------------------------------------------------------------- vtick compare


def _doc(vcpus: int = 4, runs: list | None = None) -> dict:
    return {
        "vtick": 2,
        "config": {"vcpus": vcpus, "duration_s": 1.8, "modes": [], "ipis": []},
        "environment": {},
        "runs": runs
        if runs is not None
        else [{"family": "timer", "name": "pv-ktime", "metrics": {"events_per_s": 10.0}}],
    }


def test_compare_validates_each_document(capsys, tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_doc()))
    cases = {
        "latin.json": (b"\xff\xfe{", "not UTF-8"),
        "oops.json": (b'{"vtick": 2, "config": {}, "runs": "oops"}', '"runs" is str'),
        "old.json": (b'{"vtick": 1, "runs": []}', '"vtick" is 1'),
        "entry.json": (json.dumps(_doc(runs=[{"family": "timer"}])).encode(), '"name"'),
        "half.json": (json.dumps(_doc(runs=[{"family": "t", "name": "x"}])).encode(), "neither"),
    }
    for name, (data, needle) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert compare_main(str(good), str(tmp_path / name)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1
        assert name in err[0]
        assert needle in err[0]


def test_compare_shows_configuration_differences_first_and_unmatched_paths(capsys, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    both = {"family": "timer", "name": "pv-ktime", "metrics": {"events_per_s": 10.0}}
    a.write_text(json.dumps(_doc(1, [both, {"family": "ipi", "name": "pv", "error": "x"}])))
    b.write_text(
        json.dumps(
            _doc(16, [both, {"family": "timer", "name": "vmi", "metrics": {"events_per_s": 1.0}}])
        )
    )
    assert compare_main(str(a), str(b)) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "configured differently" in out
    assert "vcpus: 1 -> 16" in out
    assert out.index("configured differently") < out.index("events/s")
    assert f"only in {b}" in out
    assert "timer/vmi" in out


# ---------------------------------------------------------------------- --histogram


def test_histograms_have_cyclictest_json_shape(tmp_path):
    from test_report import campaign, results, run, vcpu

    from vtick.host.lab.histogram import histogram_paths, write_histograms

    doc = campaign(
        run("timer", "pv-ktime", results(vcpu(0, late=[1_500, 1_700, 42_000]), vcpu(1))),
        run("timer", "vmi", results(vcpu(0), vcpu(1))),
    )
    doc["environment"] = {"started": "2026-12-01T17:00:00+0000", "versions": {"vtick": "0.1.0"}}
    written = write_histograms(doc, str(tmp_path / "lat.json"), "vtick run --histogram lat.json")
    assert written == [str(tmp_path / "lat.pv-ktime.json"), str(tmp_path / "lat.vmi.json")]
    hist = json.loads((tmp_path / "lat.pv-ktime.json").read_text())
    for key in ("file_version", "cmdline", "start_time", "end_time", "return_code", "sysinfo"):
        assert key in hist
    assert not any(k.endswith(":") for k in hist), "cyclictest's stray-colon keys not copied"
    assert hist["num_threads"] == 2
    assert hist["resolution_in_ns"] == 0
    assert hist["start_time"] == "Tue, 01 Dec 2026 17:00:00 +0000"
    thread = hist["thread"]["0"]
    assert thread["histogram"] == {"1": 2, "42": 1}  # 1 us buckets, non-empty only
    assert thread["cycles"] == 3
    assert (thread["min"], thread["max"], thread["cpu"], thread["node"]) == (1, 42, 0, 0)
    assert set(hist["sysinfo"]) >= {"sysname", "release", "machine", "realtime"}
    assert histogram_paths("h.json", ["pv-ktime"]) == {"pv-ktime": "h.json"}
    assert os.path.basename(written[1]) == "lat.vmi.json"


def test_vcpu_ranges_is_the_inverse_of_vcpu_list() -> None:
    from vtick.proto.cliargs import vcpu_list, vcpu_ranges

    for cpus in ([0], [0, 1, 2, 5], [3, 7, 8, 9, 11], list(range(16, 32))):
        assert vcpu_list(vcpu_ranges(cpus)) == cpus
    assert vcpu_ranges([0, 1, 2, 5]) == "0-2,5"
    assert vcpu_ranges([0, 1, 2, 5], ", ") == "0-2, 5"
    assert vcpu_ranges([]) == "-"
