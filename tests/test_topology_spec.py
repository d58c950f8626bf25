"""The topology file: what it means, and a clear one-line error for every mistake."""

from __future__ import annotations

import os

import pytest

from vtick.host.topology.spec import DEFAULT_PORT, TopologyError, load, loads

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "topologies")

NETNS = """
allow_insecure_tcp = true
[machines.h]
netns = "vt-h"
create = true
address = "10.77.0.1/24"
[machines.g]
netns = "vt-g"
create = true
address = "10.77.0.2/24"
[[veths]]
ends = ["h", "g"]
"""


def error(text: str) -> str:
    with pytest.raises(TopologyError) as info:
        loads(text, "t.toml")
    line = str(info.value)
    assert "\n" not in line
    assert line.startswith("t.toml: ")
    return line


def test_shipped_examples_parse():
    two = load(os.path.join(DOCS, "two-vms.toml"))
    assert [vm.name for vm in two.vms] == ["pv", "lapic"]
    assert all(vm.transport == "ipc" and vm.vcpus == 4 for vm in two.vms)
    assert two.alone
    assert two.needs_root() == []
    ns = load(os.path.join(DOCS, "netns.toml"))
    vm = ns.vms[0]
    assert (vm.host, vm.transport, vm.port) == ("h", "tcp", 5600)
    assert vm.placement == dict.fromkeys(range(4), "g")
    assert ns.listen_url(vm) == "tcp://10.77.0.1:5600"
    assert len(ns.needs_root()) == 2


def test_defaults_one_local_machine_and_ipc():
    topo = loads("[[vms]]\nvcpus = 2\n")
    vm = topo.vms[0]
    assert list(topo.machines) == ["local"]
    assert (vm.name, vm.host, vm.transport, vm.mode) == ("vm0", "local", "ipc", "pv-ktime")
    assert vm.placement == {0: "local", 1: "local"}
    assert topo.listen_url(vm, "/run/x") == "ipc:///run/x/vm0.link"
    assert not topo.alone  # one VM: nothing to compare against


def test_placement_across_machines_picks_tcp_and_free_ports():
    topo = loads(
        NETNS
        + """
[[vms]]
name = "a"
host = "h"
vcpus = 3
place = { h = "0", g = "1-2" }
[[vms]]
name = "b"
host = "h"
vcpus = 2
place = { g = [0, 1] }
[[vms]]
name = "c"
host = "h"
vcpus = 2
port = 5601
place = { g = "0,1" }
"""
    )
    a, b, c = topo.vms
    assert (a.transport, b.transport) == ("tcp", "tcp")
    assert a.vcpus_on("g") == [1, 2]
    assert a.machines() == ["h", "g"]
    # c asked for 5601..5602 first; a and b get free ranges around it
    assert c.port == 5601
    assert a.port == 5603
    assert b.port == 5606
    assert a.port is not None
    assert a.port >= DEFAULT_PORT
    assert topo.used_machines() == ["h", "g"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[[vms]]\nvcpu = 2\n", "vms[0] (vm0): unknown key 'vcpu' (known: name, host, vcpus"),
        ("duraton = 1\n[[vms]]\n", "top level: unknown key 'duraton'"),
        ('[[vms]]\nhost = "lcoal"\n', "vms[0] (vm0).host: no machine 'lcoal' (machines: local)"),
        (
            '[[vms]]\nvcpus = 2\nplace = { nowhere = "0-1" }\n',
            "vms[0] (vm0).place: no machine 'nowhere'",
        ),
        (
            NETNS + '[[vms]]\nhost = "h"\nvcpus = 4\nplace = { h = "0-2", g = "2-3" }\n',
            "vms[0] (vm0).place: vCPU 2 placed twice (on h and on g)",
        ),
        (
            NETNS + '[[vms]]\nhost = "h"\nvcpus = 4\nplace = { g = "0-1" }\n',
            "vms[0] (vm0).place: vCPU 2-3 placed nowhere (vcpus = 4)",
        ),
        (
            NETNS + '[[vms]]\nhost = "h"\nvcpus = 2\nplace = { g = "0-2" }\n',
            "vms[0] (vm0).place.g: vCPU 2 is beyond vcpus = 2",
        ),
        (
            NETNS
            + '[[vms]]\nname = "a"\nhost = "h"\nvcpus = 4\nport = 6000\nplace = { g = "0-3" }\n'
            + '[[vms]]\nname = "b"\nhost = "h"\nvcpus = 2\nport = 6003\nplace = { g = "0-1" }\n',
            "vms (b): port 6003 clashes with VM a on machine h: b uses 6003..6004, a 6000..6003",
        ),
        (
            NETNS + '[[vms]]\nhost = "h"\ntransport = "ipc"\nplace = { g = "0-3" }\n',
            "ipc cannot cross machines (vCPUs on g, host on h): use tcp or tls",
        ),
        (
            NETNS + '[[vms]]\nhost = "h"\ntransport = "tls"\nplace = { g = "0-3" }\n',
            "vms[0] (vm0).transport: tls needs a [tls] table with cert and key",
        ),
        ('[[vms]]\nmode = "pv-fast"\n', "vms[0] (vm0).mode: 'pv-fast': choose from lapic-xapic"),
        ("[[vms]]\nvcpus = 0\n", "vms[0] (vm0).vcpus: 0 is out of range 1..1024"),
        ('[[vms]]\nvcpus = "four"\n', "vms[0] (vm0).vcpus: expected an integer, got 'four'"),
        ("[[vms]]\nvcpus = true\n", "vms[0] (vm0).vcpus: expected an integer, got True"),
        ("[[vms]]\nparams = { timer = 3 }\n", "unknown parameter 'timer'"),
        (
            '[[vms]]\nworkload = "ipi"\nparams = { min_ns = 5 }\n',
            "vms[0] (vm0).params.min_ns: 5 is out of range",
        ),
        ('[[vms]]\nname = "a"\n[[vms]]\nname = "a"\n', "vms: VM name 'a' used twice"),
        ("x = [", "not valid TOML"),
        ("duration = 1\n", "top level: no VM: add at least one [[vms]] table"),
        (
            "[machines.a]\n[machines.b]\n[[vms]]\nvcpus = 1\n",
            "vms[0] (vm0): say which machine runs its host: host = (machines: a, b)",
        ),
        (
            '[machines.h]\nnetns = "x"\nssh = "root@h"\n[[vms]]\n',
            "machines.h: netns and ssh together",
        ),
        ("[machines.h]\ncreate = true\n[[vms]]\n", "machines.h.create: only a netns machine"),
        (
            '[machines.h]\nnetns = "x"\ncreate = true\n[[vms]]\n',
            'machines.h: a created namespace needs address = "IP/PREFIX"',
        ),
        (
            '[machines.h]\naddress = "10.0.0.300"\n[[vms]]\n',
            "machines.h.address: '10.0.0.300' is not an IP address",
        ),
        (
            '[machines.h]\naddress = "0.0.0.0"\n[[vms]]\n',
            "machines.h.address: 0.0.0.0: name one address, not every one",
        ),
        (
            '[machines.h]\nssh = { host = "h", prot = 22 }\n[[vms]]\n',
            "machines.h.ssh: unknown key 'prot'",
        ),
        (
            '[machines.h]\nssh = { host = "h", key = "/nonexistent/key" }\n[[vms]]\n',
            "machines.h.ssh.key: /nonexistent/key: no such file",
        ),
        (
            NETNS.replace("allow_insecure_tcp = true", "")
            + '[[vms]]\nhost = "h"\nplace = { g = "0-3" }\n',
            "tcp on 10.77.0.1 carries the token and every exit in clear text",
        ),
        (
            '[machines.a]\n[machines.b]\naddress = "10.1.1.1"\n[[veths]]\nends = ["a", "b"]\n'
            '[[vms]]\nhost = "a"\n',
            "veths[0].ends: machine a is not a namespace vtick creates",
        ),
    ],
)
def test_every_mistake_is_one_line(text, expected):
    assert expected in error(text)


def test_a_missing_file_and_tls_files_are_checked(tmp_path):
    with pytest.raises(TopologyError, match="No such file"):
        load(str(tmp_path / "none.toml"))
    cert = tmp_path / "c.pem"
    cert.write_text("not a certificate\n")
    key = tmp_path / "k.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    path = tmp_path / "t.toml"
    path.write_text('[tls]\ncert = "c.pem"\nkey = "k.pem"\n[[vms]]\n')
    with pytest.raises(TopologyError, match="no PEM certificate"):
        load(str(path))
