"""``vtick run --topology``, ``vtick topology check/certs``, TLS links and the host's
refusal of clear-text tcp beyond loopback, with real processes."""

from __future__ import annotations

import json
import os
import secrets
import signal
import stat
import subprocess
import sys

import pynng
import pytest
from hostproc import free_ports

from vtick.host.topology import check, netns
from vtick.proto import messages as m
from vtick.proto.codec import decode, encode
from vtick.proto.errors import ErrorCode

VTICK = [sys.executable, "-m", "vtick.host"]
DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "topologies")


def vtick(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*VTICK, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def tmpdir_env(tmp_path):
    """A private TMPDIR for the processes: whatever they leave there is seen."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    return scratch, dict(os.environ, TMPDIR=str(scratch))


@pytest.mark.processes
def test_two_vms_run_alone_then_together_and_report_each(tmp_path, tmpdir_env):
    scratch, env = tmpdir_env
    topo = tmp_path / "two.toml"
    topo.write_text(
        "duration = 0.6\n"
        '[[vms]]\nname = "a"\nvcpus = 2\nmode = "pv-ktime"\n'
        '[[vms]]\nname = "b"\nvcpus = 2\nmode = "lapic-xapic"\nseed = 2\n'
    )
    out = tmp_path / "r.json"
    done = vtick("run", "--topology", str(topo), "--json", str(out), env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["ok"]
    assert [vm["name"] for vm in doc["vms"]] == ["a", "b"]
    for vm in doc["vms"]:
        assert vm["ok"]
        assert vm["transport"] == "ipc"
        assert vm["metrics"]["events"] > 0
        assert vm["alone"]["metrics"]["events"] > 0
        assert set(vm["slowdown"]) == {
            "events_per_s",
            "lateness_p99",
            "host_us_per_event",
            "exit_rtt",
        }
        assert vm["slowdown"]["events_per_s"] > 0
        assert all(link["one_clock"] for link in vm["clock"])  # one machine, one clock
    assert doc["vms"][1]["config"]["mode"] == "lapic-xapic"
    assert "How much the VMs slowed each other" in done.stdout
    assert "VM a: pv-ktime timers, 2 vCPUs; host on local; vCPU 0-1 on local; ipc" in done.stdout
    assert os.listdir(scratch) == []  # agents' run directories and sockets all gone


def test_topology_run_refuses_options_it_does_not_use(tmp_path):
    done = vtick("run", "--topology", os.path.join(DOCS, "two-vms.toml"), "--vcpus", "8")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "vtick run: --vcpus: not used with --topology (the file says what each VM runs); "
        "only --json and --wide go with it"
    )
    bad = tmp_path / "bad.toml"
    bad.write_text('[[vms]]\nhost = "nowhere"\n')
    done = vtick("run", "--topology", str(bad))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "no machine 'nowhere'" in done.stderr


def test_check_explains_that_namespaces_need_root(monkeypatch, capsys):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    status = check.check_main(os.path.join(DOCS, "netns.toml"))
    out = capsys.readouterr().out
    assert status == 1
    assert "needs root" in out
    assert "CAP_SYS_ADMIN" in out
    assert "not ready: h, g" in out


def test_certs_are_made_once_and_private(tmp_path):
    d = tmp_path / "tls"
    done = vtick("topology", "certs", str(d), "--name", "127.0.0.1")
    assert done.returncode == 0, done.stderr
    key, cert = d / "vtick-key.pem", d / "vtick-cert.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "BEGIN CERTIFICATE" in cert.read_text()
    again = vtick("topology", "certs", str(d))
    assert again.returncode == 2
    assert "already holds" in again.stderr
    assert vtick("topology", "certs", str(d), "--name", "a b").returncode == 2


@pytest.mark.processes
def test_tls_link_runs_and_the_token_is_still_required(tmp_path, tmpdir_env):
    scratch, env = tmpdir_env
    certs = tmp_path / "tls"
    assert vtick("topology", "certs", str(certs)).returncode == 0
    port = free_ports(2)
    topo = tmp_path / "tls.toml"
    topo.write_text(
        f'duration = 0.5\n[tls]\ncert = "{certs}/vtick-cert.pem"\nkey = "{certs}/vtick-key.pem"\n'
        f'[[vms]]\nname = "t"\nvcpus = 1\ntransport = "tls"\nport = {port}\n'
    )
    out = tmp_path / "r.json"
    done = vtick("run", "--topology", str(topo), "--json", str(out), env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["vms"][0]["url"] == f"tls+tcp://127.0.0.1:{port}"
    assert doc["vms"][0]["metrics"]["events"] > 0
    assert os.listdir(scratch) == []
    # a host on tls+tcp:// with a peer that has the certificate but not the token
    token = secrets.token_bytes(32)
    host_env = dict(
        env,
        VTICK_TOKEN=token.hex(),
        VTICK_TLS_CERT=str(certs / "vtick-cert.pem"),
        VTICK_TLS_KEY=str(certs / "vtick-key.pem"),
    )
    host = subprocess.Popen(
        [*VTICK, "host", "--listen", f"tls+tcp://127.0.0.1:{port + 1}", "--vcpus", "1"],
        env=host_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert host.stdout is not None
        assert host.stdout.readline().startswith("READY")
        tls = pynng.TLSConfig(
            pynng.TLSConfig.MODE_CLIENT,
            ca_string=(certs / "vtick-cert.pem").read_text(),
            server_name="vtick",
        )
        with pynng.Pair0(tls_config=tls, recv_timeout=5000) as raw:
            raw.dial(f"tls+tcp://127.0.0.1:{port + 1}", block=True)
            hello = m.Hello(version=1, features=3, vcpu=0, token=secrets.token_bytes(32), pid=1)
            raw.send(encode(hello, 0, 0))
            answer = decode(raw.recv()).msg
        assert isinstance(answer, m.Refuse)
        assert answer.code == ErrorCode.BAD_TOKEN
    finally:
        os.killpg(host.pid, signal.SIGTERM)
        host.communicate(timeout=20)


def test_clear_text_tcp_beyond_loopback_is_refused_unless_asked(tmp_path):
    port = free_ports(1)
    url = f"tcp://0.0.0.0:{port}"
    done = vtick(
        "host", "--listen", url, "--vcpus", "1", env=dict(os.environ, VTICK_TOKEN="00" * 32)
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"vtick host: {url} would carry the token and every exit in clear text beyond "
        "loopback: listen on 127.0.0.1, use tls+tcp:// (certificates: vtick topology "
        "certs DIR), or pass --allow-insecure-tcp on a network you trust"
    )
    done = vtick("run", "--listen", url, "--vcpus", "1", "--json", str(tmp_path / "r.json"))
    assert done.returncode == 2
    assert done.stderr.startswith(f"vtick run: --listen {url} would carry the token")
    host = subprocess.Popen(
        [*VTICK, "host", "--listen", url, "--vcpus", "1", "--allow-insecure-tcp"],
        env=dict(os.environ, VTICK_TOKEN="00" * 32),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert host.stdout is not None
        assert host.stdout.readline().startswith("READY")
    finally:
        os.killpg(host.pid, signal.SIGTERM)
        host.communicate(timeout=20)
    assert not os.path.exists(tmp_path / "r.json")
