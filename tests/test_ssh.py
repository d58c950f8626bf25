"""Reaching a machine over ssh: a real sshd the test starts itself (its own host key and
authorized_keys, loopback, a free port), vtick's vCPUs started there by the agent that
ssh runs; and the one-line errors for an unreachable machine and another vtick."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

VTICK = [sys.executable, "-m", "vtick.host"]
SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)

pytestmark = pytest.mark.processes

needs_sshd = pytest.mark.skipif(
    SSHD is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None,
    reason="openssh-server and openssh-client are not installed (scripts/test installs them)",
)
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="sshd must run as root to accept a login (UsePAM no)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30
    )
    return (path.parent / (path.name + ".pub")).read_text().strip()


def ssh_machine(user: str, port: int, key, known, python: str) -> str:
    return (
        f'[machines.far]\nssh = {{ host = "127.0.0.1", user = "{user}", port = {port}, '
        f'key = "{key}", known_hosts = "{known}" }}\npython = "{python}"\n'
    )


@pytest.fixture
def sshd(tmp_path):
    """sshd on 127.0.0.1:PORT with its own keys and config; stopped and removed after."""
    d = tmp_path / "sshd"
    d.mkdir(mode=0o700)
    host_pub = keygen(d / "host_key")
    client_pub = keygen(d / "client_key")
    (d / "authorized_keys").write_text(client_pub + "\n")
    port = free_port()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub}\n")
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1:{port}\n"
        f"HostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
        f"PidFile {d / 'sshd.pid'}\n"
        "UsePAM no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nStrictModes no\nUseDNS no\nLogLevel ERROR\n"
        "X11Forwarding no\nAllowTcpForwarding no\n"
    )
    made_privsep = False
    if not os.path.isdir("/run/sshd"):  # sshd's compiled-in privilege separation dir
        os.makedirs("/run/sshd", mode=0o755)
        made_privsep = True
    proc = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise AssertionError(f"sshd exited: {proc.stderr.read() if proc.stderr else ''}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield {"port": port, "key": d / "client_key", "known": d / "known_hosts", "dir": d}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        if made_privsep:
            with contextlib.suppress(OSError):
                os.rmdir("/run/sshd")


def cmdlines_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
            if text in cmd:
                found.append(cmd)
    return found


@needs_sshd
@needs_root
def test_vcpus_on_a_machine_reached_over_ssh(tmp_path, sshd):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    topo = tmp_path / "ssh.toml"
    topo.write_text(
        "duration = 0.8\n"
        '[machines.here]\naddress = "127.0.0.1"\n'
        + ssh_machine("root", sshd["port"], sshd["key"], sshd["known"], sys.executable)
        + '[[vms]]\nname = "vm"\nhost = "here"\nvcpus = 2\nplace = { far = "0-1" }\n'
    )
    check = subprocess.run(
        [*VTICK, "topology", "check", str(topo)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, TMPDIR=str(scratch)),
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"ssh root@127.0.0.1:{sshd['port']}" in check.stdout
    out = tmp_path / "r.json"
    done = subprocess.run(
        [*VTICK, "run", "--topology", str(topo), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, TMPDIR=str(scratch)),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    vm = doc["vms"][0]
    assert vm["url"].startswith("tcp://127.0.0.1:")
    assert vm["metrics"]["events"] > 0
    far = doc["agents"]["far"]
    assert far["uid"] == 0
    # the remote agent (its TMPDIR is sshd's, not ours) removed its run directory
    assert not os.path.exists(far["run_dir"])
    assert os.listdir(scratch) == []
    assert cmdlines_mentioning(str(sshd["key"])) == []  # no ssh master left running


def test_an_unreachable_machine_is_one_line(tmp_path):
    port = free_port()  # nothing listens there
    key = tmp_path / "k"
    key.write_text("not used\n")
    topo = tmp_path / "far.toml"
    topo.write_text(
        '[machines.here]\naddress = "127.0.0.1"\n'
        + ssh_machine("root", port, key, key, "python3")
        + '[[vms]]\nhost = "here"\nvcpus = 1\nplace = { far = "0" }\n'
    )
    if shutil.which("ssh") is None:
        pytest.skip("openssh-client is not installed")
    done = subprocess.run(
        [*VTICK, "run", "--topology", str(topo), "--json", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"vtick run: machine far (ssh root@127.0.0.1:{port}): unreachable: ")
    assert "Connection refused" in last
    assert not (tmp_path / "r.json").exists()


@needs_sshd
@needs_root
def test_another_vtick_version_is_refused(tmp_path, sshd):
    fake = tmp_path / "fake-python"
    fake.write_text(
        "#!/bin/sh\n"
        'echo \'{"event": "hello", "vtick": "0.0.0-other", "python": "3.11.0", "pid": 1, '
        '"run_dir": "/nonexistent"}\'\n'
        "cat > /dev/null\n"
    )
    fake.chmod(0o755)
    topo = tmp_path / "far.toml"
    topo.write_text(
        '[machines.here]\naddress = "127.0.0.1"\n'
        + ssh_machine("root", sshd["port"], sshd["key"], sshd["known"], str(fake))
        + '[[vms]]\nhost = "here"\nvcpus = 1\nplace = { far = "0" }\n'
    )
    done = subprocess.run(
        [*VTICK, "run", "--topology", str(topo), "--json", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert f"machine far (ssh root@127.0.0.1:{sshd['port']}): vtick 0.0.0-other there" in last
    assert "install the same vtick on every machine" in last


@needs_sshd
@needs_root
@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="no system python3")
def test_a_machine_without_vtick_is_one_line(tmp_path, sshd):
    probe = subprocess.run(["/usr/bin/python3", "-c", "import vtick.host"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("the system python3 has vtick installed")
    topo = tmp_path / "far.toml"
    topo.write_text(
        '[machines.here]\naddress = "127.0.0.1"\n'
        + ssh_machine("root", sshd["port"], sshd["key"], sshd["known"], "/usr/bin/python3")
        + '[[vms]]\nhost = "here"\nvcpus = 1\nplace = { far = "0" }\n'
    )
    done = subprocess.run(
        [*VTICK, "topology", "check", str(topo)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "vtick is not installed for /usr/bin/python3 there" in done.stdout.replace("\n", " ")
    assert "not ready: far" in done.stdout
