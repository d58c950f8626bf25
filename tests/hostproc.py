"""A standalone ``vtick host`` process and a raw Pair0 client for process tests."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pynng

from vtick.proto import messages as m
from vtick.proto.codec import decode, encode

__all__ = [
    "VTICK",
    "StandaloneHost",
    "alive",
    "children_of",
    "cmdline",
    "free_ports",
    "raw_hello",
    "say_hello",
]

VTICK = [sys.executable, "-m", "vtick.host"]


class StandaloneHost:
    """``vtick host`` in a private 0700 directory, with its token in the environment."""

    def __init__(self, vcpus: int, duration: float, *extra: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="vtick-test-")
        self.url = f"ipc://{self.dir}/link"
        self.token = secrets.token_bytes(32)
        self.results = os.path.join(self.dir, "results.json")
        self.env = dict(os.environ, VTICK_TOKEN=self.token.hex())
        self.proc = subprocess.Popen(
            [
                *VTICK,
                "host",
                "--listen",
                self.url,
                "--vcpus",
                str(vcpus),
                "--duration",
                str(duration),
                "--results",
                self.results,
                *extra,
            ],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().startswith("READY")

    def guest(self, vcpu: int | str, token: bytes | None = None, *extra: str) -> subprocess.Popen:
        env = dict(self.env, VTICK_TOKEN=(token or self.token).hex())
        return subprocess.Popen(
            [*VTICK, "guest", "--connect", self.url, "--vcpu", str(vcpu), *extra],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_connected(self, vcpu: int, timeout: float = 30) -> None:
        """Until a peer holds vCPU ``vcpu``'s link: its socket file has a connected entry
        in /proc/net/unix (state 03), so a test needs no guess of how long a guest takes
        to start on a loaded machine."""
        path = f"{self.url.removeprefix('ipc://')}.{vcpu}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open("/proc/net/unix") as fh:
                if any(
                    line.split()[5] == "03" and line.rstrip().endswith(" " + path)
                    for line in fh
                    if len(line.split()) >= 8
                ):
                    return
            time.sleep(0.05)
        raise AssertionError(f"no peer connected to vCPU {vcpu}'s link within {timeout} s")

    def finish(self, timeout: float = 40) -> tuple[int, dict, str]:
        _, err = self.proc.communicate(timeout=timeout)
        with open(self.results) as fh:
            results = json.load(fh)
        return self.proc.returncode, results, err

    def cleanup(self) -> None:
        killed = self.proc.poll() is None
        if killed:  # the test failed early; a SIGKILLed host cannot tidy up
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.communicate()
        leftovers = [n for n in os.listdir(self.dir) if n != "results.json"]
        shutil.rmtree(self.dir)
        if not killed:
            assert leftovers == [], f"host left behind {leftovers}"


def raw_hello(
    token: bytes, pid: int, resume: int | None = None, vcpu: int = 0, ack: int = 0
) -> bytes:
    """A hello frame as a vCPU sends it (``ack``: its cumulative acknowledgement)."""
    hello = m.Hello(version=1, features=3, vcpu=vcpu, token=token, pid=pid, resume=resume)
    return encode(hello, 0, ack)


def say_hello(raw: pynng.Pair0, token: bytes, pid: int, vcpu: int) -> m.Message:
    """Send hello until answered, as a vCPU does: a hello sent into a pipe that Pair0 then
    rejects (the host had not dropped the previous pipe yet) is lost without an error."""
    raw.recv_timeout = 300
    try:
        for _ in range(30):
            raw.send(raw_hello(token, pid=pid, vcpu=vcpu))
            try:
                return decode(raw.recv()).msg
            except pynng.Timeout:
                continue
    finally:
        raw.recv_timeout = 5000
    raise AssertionError("no answer to hello")


def children_of(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError), open(stat) as fh:
            fields = fh.read().rsplit(") ", 1)[1].split()
            if int(fields[1]) == pid:
                out.append(int(stat.split("/")[2]))
    return out


def cmdline(pid: int) -> str:
    """Process ``pid``'s command line, arguments separated by spaces ("" if it is gone)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().replace(b"\0", b" ").decode()
    return ""


def alive(pid: int) -> bool:
    """Is process ``pid`` running?  A zombie is dead for our purposes."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def free_ports(n: int) -> int:
    """A base port with ``n`` free ports after it on loopback (probed, best effort)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            for p in range(base, base + n):
                with socket.socket() as t:
                    t.bind(("127.0.0.1", p))
        except OSError:
            continue
        return base
    raise AssertionError("no free port range")
