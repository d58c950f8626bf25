"""Across a real network boundary on one machine: a host in one Linux network namespace and
its vCPUs in another, joined by a veth pair, over tcp.  Needs root and iproute2."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from vtick.host.topology.netns import existing_namespaces

pytestmark = [
    pytest.mark.processes,
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2's ip(8) is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CAP_SYS_ADMIN)"),
]

VTICK = [sys.executable, "-m", "vtick.host"]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def two_namespaces():
    """Two fresh namespaces, loopback up, joined by a veth pair created inside them (the
    test's own namespace gets nothing), addresses in a private /24; all removed after."""
    tag = f"{os.getpid() % 10000}{random.randrange(100)}"
    names = (f"vth{tag}", f"vtg{tag}")
    subnet = f"10.{random.randrange(200, 250)}.{random.randrange(256)}"
    made: list[str] = []
    try:
        for ns in names:
            ip("netns", "add", ns)
            made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", "vt0", "netns", names[0], "type", "veth", "peer", "name", "vt1",
           "netns", names[1])  # fmt: skip
        for i, ns in enumerate(names):
            ip("-n", ns, "addr", "add", f"{subnet}.{i + 1}/24", "dev", f"vt{i}")
            ip("-n", ns, "link", "set", f"vt{i}", "up")
        yield names, subnet
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    assert not set(names) & existing_namespaces()


def test_host_and_vcpus_in_different_namespaces_over_tcp(tmp_path, two_namespaces):
    (h, g), subnet = two_namespaces
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    topo = tmp_path / "ns.toml"
    topo.write_text(
        "duration = 0.8\nallow_insecure_tcp = true\n"
        f'[machines.h]\nnetns = "{h}"\naddress = "{subnet}.1"\n'
        f'[machines.g]\nnetns = "{g}"\naddress = "{subnet}.2"\n'
        '[[vms]]\nname = "vm"\nhost = "h"\nvcpus = 2\nplace = { g = "0-1" }\nport = 5600\n'
    )
    out = tmp_path / "r.json"
    done = subprocess.run(
        [*VTICK, "run", "--topology", str(topo), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, TMPDIR=str(scratch)),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    vm = json.loads(out.read_text())["vms"][0]
    assert vm["url"] == f"tcp://{subnet}.1:5600"
    assert vm["placement"] == {"g": [0, 1]}
    assert vm["metrics"]["events"] > 0
    assert vm["metrics"]["link_errors"] == []
    # the vCPUs really were in the other namespace: the host saw them over the veth
    assert all(v["guest"] is not None for v in vm["results"]["vcpus"])
    # one kernel, one CLOCK_MONOTONIC: the tracking sees one clock
    assert all(link["one_clock"] for link in vm["clock"])
    assert os.listdir(scratch) == []


def test_vtick_creates_and_removes_its_namespaces(tmp_path):
    tag = f"{os.getpid() % 10000}{random.randrange(100)}"
    h, g = f"vch{tag}", f"vcg{tag}"
    subnet = f"10.{random.randrange(200, 250)}.{random.randrange(256)}"
    topo = tmp_path / "ns.toml"
    topo.write_text(
        "allow_insecure_tcp = true\n"
        f'[machines.h]\nnetns = "{h}"\ncreate = true\naddress = "{subnet}.1/24"\n'
        f'[machines.g]\nnetns = "{g}"\ncreate = true\naddress = "{subnet}.2/24"\n'
        '[[veths]]\nends = ["h", "g"]\n'
        '[[vms]]\nhost = "h"\nvcpus = 2\nplace = { g = "0-1" }\n'
    )
    try:
        done = subprocess.run(
            [*VTICK, "topology", "check", str(topo)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"netns {h} (created)" in done.stdout
        assert f"free: {subnet}.1:5600-5601" in done.stdout
        assert "one clock" in done.stdout
        assert not {h, g} & existing_namespaces()
        # a namespace that exists already is refused, and left alone
        ip("netns", "add", h)
        done = subprocess.run(
            [*VTICK, "topology", "check", str(topo)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 1
        assert f"network namespace {h} exists already" in done.stdout
        assert h in existing_namespaces()
    finally:
        for ns in (h, g):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
