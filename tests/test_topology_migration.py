"""Live migration as a topology step (issues 12 and 13): the spec keys, the merged
results and their report (pure), and real moves between machines of a topology: two
network namespaces over tcp (root), and two local machines over tcp loopback."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
import uuid

import pytest
from hostproc import free_ports
from rich.console import Console
from test_topology_spec import error

from vtick.host.migration.results import merge_migration, moved
from vtick.host.topology import check
from vtick.host.topology.certs import make_pair
from vtick.host.topology.netns import existing_namespaces
from vtick.host.topology.report import migration_table
from vtick.host.topology.spec import Migration, load, loads

VTICK = [sys.executable, "-m", "vtick.host"]
DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "topologies")

NETNS = """
allow_insecure_tcp = true
[machines.a]
netns = "vt-a"
create = true
address = "10.77.0.1/24"
[machines.b]
netns = "vt-b"
create = true
address = "10.77.0.2/24"
[[veths]]
ends = ["a", "b"]
"""


# ---------------------------------------------------------------------- the spec


def test_a_move_between_namespaces_goes_over_tcp_on_the_destination():
    topo = loads(
        NETNS + '[[vms]]\nname = "v"\nhost = "a"\nvcpus = 2\nmigrate_at = 0.5\nmigrate_to = "b"\n'
    )
    vm = topo.vms[0]
    assert vm.transport == "ipc"  # before the move everything is on a
    assert vm.migration == Migration(at_s=0.5, to="b", transport="tcp", port=5600)
    assert vm.machines() == ["a", "b"]
    assert topo.used_machines() == ["a", "b"]  # b gets an agent for the destination
    assert vm.vcpus_on("b") == []
    assert topo.migration_urls(vm) == ("tcp://10.77.0.2:5600", "tcp://10.77.0.2:5602")
    # the preflight checks the destination's ports too: links and incoming channel
    assert check._ports_for(topo, "b") == {"10.77.0.2": [5600, 5601, 5602]}
    assert check._ports_for(topo, "a") == {}


def test_a_move_on_one_machine_keeps_ipc_or_takes_other_ports():
    ipc = loads('[[vms]]\nname = "v"\nvcpus = 2\nmigrate_at = 1\nmigrate_to = "local"\n').vms[0]
    assert ipc.migration == Migration(at_s=1.0, to="local", transport="ipc", port=None)
    topo = loads(
        '[[vms]]\nname = "v"\nvcpus = 2\ntransport = "tcp"\nmigrate_at = 1\nmigrate_to = "local"\n'
        '[[vms]]\nname = "w"\nvcpus = 1\ntransport = "tcp"\n'
    )
    v, w = topo.vms
    assert (v.port, v.migration and v.migration.port, w.port) == (5600, 5602, 5605)
    assert topo.migration_urls(v, "/r") == ("tcp://127.0.0.1:5602", "tcp://127.0.0.1:5604")
    one = loads('[[vms]]\nvcpus = 1\nmigrate_at = 1\nmigrate_to = "local"\n')
    assert one.migration_urls(one.vms[0], "/r") == (
        "ipc:///r/vm0.dest.link",
        "ipc:///r/vm0.incoming",
    )


def test_shipped_migration_examples_parse():
    ns = load(os.path.join(DOCS, "migrate.toml"))
    vm = ns.vms[0]
    assert (vm.host, vm.transport, vm.vcpus) == ("src", "ipc", 2)
    assert vm.migration == Migration(at_s=0.9, to="dst", transport="tcp", port=5600)
    assert len(ns.needs_root()) == 2
    local = load(os.path.join(DOCS, "migrate-local.toml"))
    vm = local.vms[0]
    assert (vm.transport, vm.port) == ("tcp", 5600)
    assert vm.migration == Migration(at_s=0.9, to="b", transport="tcp", port=5610)
    assert local.needs_root() == []


VM_AB = NETNS + '[[vms]]\nname = "v"\nhost = "a"\nvcpus = 2\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            VM_AB + 'migrate_at = 0.5\nmigrate_to = "c"\n',
            "vms[0] (v).migrate_to: no machine 'c' (machines: a, b)",
        ),
        (
            VM_AB + 'migrate_at = 1.8\nmigrate_to = "b"\n',
            "vms[0] (v).migrate_at: 1.8 s is not inside the run's duration: give 0 < "
            "migrate_at < 1.8",
        ),
        (
            "duration = 3\n" + VM_AB + 'migrate_at = 0\nmigrate_to = "b"\n',
            "vms[0] (v).migrate_at: 0 s is not inside the run's duration: give 0 < migrate_at < 3",
        ),
        (
            VM_AB + 'migrate_at = -1\nmigrate_to = "b"\n',
            "vms[0] (v).migrate_at: -1 s is not inside",
        ),
        (VM_AB + "migrate_at = 1\n", "vms[0] (v): migrate_at and migrate_to go together: add "),
        (VM_AB + 'migrate_to = "b"\n', "migrate_at and migrate_to go together: add migrate_at"),
        (
            VM_AB + 'migrate_at = "soon"\nmigrate_to = "b"\n',
            "vms[0] (v).migrate_at: expected seconds, got 'soon'",
        ),
        (VM_AB + "migrate_port = 6000\n", "migrate_port: only with migrate_at and migrate_to"),
        (
            VM_AB + 'migrate_at = 1\nmigrate_to = "a"\nmigrate_port = 6000\n',
            "vms[0] (v).migrate_port: an ipc move has no ports",
        ),
        (
            VM_AB + 'migrate_at = 1\nmigrate_to = "b"\nmigrate_port = 65535\n',
            "vms[0] (v).migrate_port: 65535+2 is beyond 65535",
        ),
        (
            VM_AB + 'migrate_at = 1\nmigrate_tu = "b"\n',
            "vms[0] (v): unknown key 'migrate_tu'",
        ),
        (  # the destination's range against the VM's own, on one machine
            VM_AB + 'transport = "tcp"\nport = 6000\nmigrate_at = 1\nmigrate_to = "a"\n'
            "migrate_port = 6001\n",
            "vms (v): port 6001 clashes with VM v on machine a: v's migration destination "
            "uses 6001..6003, v 6000..6001",
        ),
        (  # another VM against a destination on the destination's machine
            VM_AB + 'migrate_at = 1\nmigrate_to = "b"\nmigrate_port = 6000\n'
            '[[vms]]\nname = "w"\nhost = "b"\nvcpus = 1\nport = 6002\nplace = { a = "0" }\n',
            "vms (w): port 6002 clashes with v's migration destination on machine b: w uses "
            "6002..6002, v's migration destination 6000..6002",
        ),
        (  # nothing to reach the destination at
            '[machines.a]\n[machines.b]\n[[vms]]\nname = "v"\nhost = "a"\nvcpus = 1\n'
            'migrate_at = 1\nmigrate_to = "b"\n',
            "vms[0] (v): it migrates to machine b over tcp: give machines.b an address",
        ),
        (  # clear text beyond loopback
            NETNS.replace("allow_insecure_tcp = true\n", "")
            + '[[vms]]\nname = "v"\nhost = "a"\nvcpus = 1\nmigrate_at = 1\nmigrate_to = "b"\n',
            "vms (v): tcp on 10.77.0.2 (its destination) carries the token and every exit in "
            "clear text",
        ),
    ],
)
def test_mistakes_in_a_migration_are_one_line(text, expected):
    assert expected in error(text)


def test_an_ipc_vm_takes_up_tls_on_the_way(tmp_path):
    ipc_move = loads(  # the clash check does not count an ipc move's ports
        '[[vms]]\nvcpus = 2\nmigrate_at = 1\nmigrate_to = "local"\n'
        '[[vms]]\nname = "w"\nvcpus = 2\ntransport = "tcp"\nport = 5600\n'
    )
    assert ipc_move.vms[1].port == 5600
    make_pair(str(tmp_path), [], 30)
    tls = f'[tls]\ncert = "{tmp_path}/vtick-cert.pem"\nkey = "{tmp_path}/vtick-key.pem"\n'
    # the vCPUs' ipc sockets get a TLS configuration when they redial
    # (PairEndpoint.redial), so an ipc VM may move to another machine over tls
    moved = loads(VM_AB + 'migrate_at = 1\nmigrate_to = "b"\n' + tls).vms[0]
    assert moved.migration is not None
    assert moved.migration.transport == "tls"
    topo = loads(VM_AB + 'transport = "tls"\nmigrate_at = 1\nmigrate_to = "b"\n' + tls)
    vm = topo.vms[0]
    assert vm.migration is not None
    assert vm.migration.transport == "tls"
    assert topo.migration_urls(vm) == ("tls+tcp://10.77.0.2:5600", "tls+tcp://10.77.0.2:5602")


# ---------------------------------------------------------------------- results, report


def test_merged_results_are_the_destinations_after_a_move():
    source = {
        "ok": True,
        "wall_ns": 5,
        "migration": {"role": "source", "ok": True, "to": "tcp://x:1"},
        "vcpus": [{"vcpu": 0, "host_exits": 7, "link_errors": [], "other": 1}],
    }
    dest = {"ok": True, "migration": {"role": "destination"}, "blackout_ns": 9}
    assert moved(source)
    assert not moved({"migration": {"ok": False}})
    assert not moved(None)
    merged = merge_migration(source, dest)
    assert merged is dest
    assert merged["migration"]["source"] == {
        "record": source["migration"],
        "ok": True,
        "wall_ns": 5,
        "vcpus": [
            {"vcpu": 0, "host_exits": 7, "link_errors": [], "frozen_frames": None, "link": None}
        ],
    }
    assert not merge_migration(dict(source, ok=False), {"ok": True})["ok"]
    failed = {"ok": True, "migration": {"role": "source", "ok": False, "error": "refused"}}
    assert merge_migration(failed, dest) is failed  # never moved: the source's alone
    assert merge_migration(source, None) is source


def test_the_report_shows_the_blackout_or_why_the_move_failed():
    mig = {"at_s": 0.9, "to": "b", "transport": "tcp"}
    vms = [
        {
            "name": "moved",
            "host": "a",
            "migration": mig,
            "results": {
                "migration": {"role": "destination"},
                "blackout_ns": 13_600_000,
                "blackout_phases_ns": {"freeze_to_ready": 8_410_000, "ready_to_resumed": 4_060_000},
                "blackout_state_bytes": 3523,
                "blackout_late_timers": 5,
                "blackout_late_max_ns": 20_000_000,
            },
        },
        {
            "name": "stayed",
            "host": "a",
            "migration": mig,
            "results": {"migration": {"role": "source", "ok": False, "error": "no answer"}},
        },
        {"name": "still", "host": "a"},
    ]
    table = migration_table(vms)
    assert table is not None
    out = io.StringIO()
    Console(file=out, width=200).print(table)
    text = out.getvalue()
    assert "a -> b (tcp)" in text
    for figure in ("13.6ms", "8.41ms", "4.06ms", "3.5 KB", "20.0ms"):
        assert figure in text
    assert "no: no answer" in text
    assert "still" not in text
    assert migration_table([{"name": "x"}]) is None


# ---------------------------------------------------------------------- real moves


def _leftover_processes(marker: str) -> list[int]:
    """Processes that carry ``marker`` in their environment (every one the run started)."""
    found = []
    needle = marker.encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if needle in fh.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def _run(topo_text: str, tmp_path) -> tuple[subprocess.CompletedProcess, dict, str]:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    topo = tmp_path / "m.toml"
    topo.write_text(topo_text)
    out = tmp_path / "r.json"
    marker = f"vtick-test-{uuid.uuid4().hex}"
    done = subprocess.run(
        [*VTICK, "run", "--topology", str(topo), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=90,
        env=dict(os.environ, TMPDIR=str(scratch), VTICK_TEST_MARKER=marker),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert os.listdir(scratch) == []  # agents' run directories, sockets, results: gone
    assert _leftover_processes(marker) == []
    return done, json.loads(out.read_text()), marker


def _check_moved(doc: dict, vcpus: int) -> dict:
    assert doc["ok"]
    vm = doc["vms"][0]
    assert vm["ok"], vm.get("error") or vm["metrics"].get("problems")
    res = vm["results"]
    mig = res["migration"]
    assert mig["role"] == "destination"
    assert mig["source"]["record"]["ok"] is True
    assert mig["source"]["ok"] is True
    assert res["blackout_ns"] > 0
    assert all(b is not None and b > 0 for b in res["blackout_resume_ns"])
    assert len(res["vcpus"]) == vcpus
    for v in res["vcpus"]:
        assert v["guest"]["counters"]["migrations"] == 1, v["vcpu"]  # every vCPU resumed
        assert v["link_errors"] == []
    assert all(v["link_errors"] == [] for v in mig["source"]["vcpus"])
    assert vm["metrics"]["link_errors"] == []
    assert vm["metrics"]["events"] > 0
    return vm


@pytest.mark.processes
@pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2's ip(8) is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CAP_SYS_ADMIN)")
def test_a_vm_moves_between_two_namespaces_over_tcp(tmp_path):
    tag = f"{os.getpid() % 10000}{random.randrange(100)}"
    src, dst = f"vtms{tag}", f"vtmd{tag}"
    subnet = f"10.{random.randrange(200, 250)}.{random.randrange(256)}"
    text = (
        "duration = 1.4\nallow_insecure_tcp = true\n"
        f'[machines.src]\nnetns = "{src}"\ncreate = true\naddress = "{subnet}.1/24"\n'
        f'[machines.dst]\nnetns = "{dst}"\ncreate = true\naddress = "{subnet}.2/24"\n'
        '[[veths]]\nends = ["src", "dst"]\n'
        '[[vms]]\nname = "vm"\nhost = "src"\nvcpus = 2\nmode = "pv-ktime"\n'
        'migrate_at = 0.6\nmigrate_to = "dst"\nmigrate_port = 5700\n'
    )
    try:
        done, doc, _ = _run(text, tmp_path)
    finally:
        left = {src, dst} & existing_namespaces()
        for ns in left:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    assert not left, f"namespaces left behind: {left}"
    vm = _check_moved(doc, 2)
    assert vm["transport"] == "ipc"  # before the move: host and vCPUs on src
    assert vm["migration"]["url"] == f"tcp://{subnet}.2:5700"
    record = vm["results"]["migration"]["source"]["record"]
    assert record["to"] == f"tcp://{subnet}.2:5702"  # the incoming channel, across the veth
    assert record["listen"] == f"tcp://{subnet}.2:5700"
    assert "Migrations (issue 13)" in done.stdout
    assert "src -> dst (tcp)" in done.stdout


@pytest.mark.processes
def test_a_vm_moves_between_two_local_machines_over_tcp_loopback(tmp_path):
    port = free_ports(5)
    text = (
        "duration = 1.2\n"
        '[machines.a]\naddress = "127.0.0.1"\n[machines.b]\naddress = "127.0.0.1"\n'
        f'[[vms]]\nname = "vm"\nhost = "a"\nvcpus = 2\ntransport = "tcp"\nport = {port}\n'
        f'migrate_at = 0.5\nmigrate_to = "b"\nmigrate_port = {port + 2}\n'
    )
    done, doc, _ = _run(text, tmp_path)
    vm = _check_moved(doc, 2)
    assert vm["url"] == f"tcp://127.0.0.1:{port}"
    assert vm["migration"]["incoming"] == f"tcp://127.0.0.1:{port + 4}"
    assert sorted(doc["agents"]) == ["a", "b"]
