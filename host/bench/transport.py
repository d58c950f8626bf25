"""``vtick bench transport``: what one exit round trip costs, against a raw socket baseline.

Three paths, measured in the same run, each between two real processes:

* ``vtick exit``: the guest program ``vtick.guest.exitbench`` acts as a vCPU (the real
  guest link, codec and trio driver) against a real ``vtick host`` process; each sample is one
  ``exit-hypercall`` -> ``exit-reply`` round trip through the host's real dispatch.
  Measured twice: receiving with trio's ``wait_readable`` on nng's notification fd
  (vtick's default) and with pynng's ``arecv``, on both ends.
* ``pynng Pair0 (blocking)``: the same CBOR payload bounced off an echo process over a
  bare Pair0 socket with blocking calls: nng's own floor, without vtick's layers.
* ``AF_UNIX socketpair``: the same payload over a raw SOCK_SEQPACKET socketpair, echoed
  by a child that decodes and re-encodes it: the kernel's floor.

The ``ratio`` line is vtick's median over the socketpair median.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time

import cbor2
import trio
from hdrh.histogram import HdrHistogram

from vtick.proto import messages as m
from vtick.proto.codec import encode

__all__ = ["run_transport_bench"]

BENCH_NR = 0x5654_00FF  # an unclaimed hypercall: the host's dispatch answers -KVM_ENOSYS


def _payload() -> bytes:
    return encode(m.ExitHypercall(nr=BENCH_NR, args=[1, 2, 3, 4]), 1, 0)


def _hist() -> HdrHistogram:
    return HdrHistogram(1, 10_000_000_000, 3)


def _stats(h: HdrHistogram) -> tuple[float, float]:
    return h.get_value_at_percentile(50) / 1000, h.get_value_at_percentile(99) / 1000


# ---------------------------------------------------------------------- echo children


def _echo_socketpair(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    while True:
        data = sock.recv(65536)
        if not data:
            return
        sock.send(cbor2.dumps(cbor2.loads(data)))


def _echo_nng(url: str) -> None:
    import pynng

    with pynng.Pair0(listen=url, recv_max_size=65536) as sock:
        print("READY", flush=True)
        while True:
            data = sock.recv()
            if data == b"\x00":
                return
            sock.send(cbor2.dumps(cbor2.loads(data)))


# ---------------------------------------------------------------------- measurements


def _bench_socketpair(count: int, warmup: int) -> HdrHistogram:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vtick.host.bench.transport",
            "echo-socketpair",
            str(child.fileno()),
        ],
        pass_fds=[child.fileno()],
    )
    child.close()
    hist = _hist()
    payload = _payload()
    try:
        for i in range(warmup + count):
            t0 = time.perf_counter_ns()
            parent.send(payload)
            reply = parent.recv(65536)
            cbor2.loads(reply)
            if i >= warmup:
                hist.record_value(time.perf_counter_ns() - t0)
    finally:
        parent.close()
        proc.wait(timeout=10)
    return hist


def _bench_nng(count: int, warmup: int, run_dir: str) -> HdrHistogram:
    import pynng

    url = f"ipc://{run_dir}/echo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vtick.host.bench.transport", "echo-nng", url],
        stdout=subprocess.PIPE,
    )
    hist = _hist()
    payload = _payload()
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        with pynng.Pair0(dial=url, recv_max_size=65536) as sock:
            for i in range(warmup + count):
                t0 = time.perf_counter_ns()
                sock.send(payload)
                cbor2.loads(sock.recv())
                if i >= warmup:
                    hist.record_value(time.perf_counter_ns() - t0)
            sock.send(b"\x00")
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    return hist


async def _bench_vtick(
    count: int, warmup: int, run_dir: str, recv_method: str
) -> tuple[HdrHistogram, HdrHistogram]:
    from vtick.proto.transport import RECV_METHOD_ENV

    token = secrets.token_bytes(32)
    url = f"ipc://{run_dir}/link-{recv_method}"
    env = dict(os.environ, VTICK_TOKEN=token.hex(), VTICK_PARENT_PID=str(os.getpid()))
    env[RECV_METHOD_ENV] = recv_method
    host = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "vtick.host",
            "host",
            "--listen",
            url,
            "--vcpus",
            "1",
            "--duration",
            "86400",
        ],
        env=env,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert host.stdout is not None
        with trio.fail_after(15):
            line = await host.stdout.receive_some(100)
        if not line.startswith(b"READY"):
            raise RuntimeError(f"host did not start: {line!r}")
        # the vCPU end is the real guest program (the host never imports the guest)
        guest = await trio.run_process(
            [
                sys.executable,
                "-m",
                "vtick.guest.exitbench",
                "--connect",
                url,
                "--count",
                str(count),
                "--warmup",
                str(warmup),
                "--nr",
                str(BENCH_NR),
            ],
            env=env,
            capture_stdout=True,
        )
        hists = json.loads(guest.stdout)
        rtt = HdrHistogram.decode(hists["rtt"])
        host_side = HdrHistogram.decode(hists["host"])
    finally:
        if host.returncode is None:
            os.killpg(host.pid, signal.SIGKILL)
        await host.wait()
    return rtt, host_side


def run_transport_bench(count: int = 5000, warmup: int = 500) -> int:
    """Measure all three paths and print the table and the ratio."""
    with tempfile.TemporaryDirectory(prefix="vtick-bench-") as run_dir:
        print(
            f"vtick bench transport: {count} round trips per path after {warmup} warm-up, "
            f"{os.cpu_count()} CPUs",
            flush=True,
        )
        vtick_rtt, vtick_host = trio.run(_bench_vtick, count, warmup, run_dir, "fd")
        arecv_rtt, _ = trio.run(_bench_vtick, count, warmup, run_dir, "arecv")
        nng = _bench_nng(count, warmup, run_dir)
        raw = _bench_socketpair(count, warmup)
    rows = [
        ("vtick exit (guest->host->guest)", vtick_rtt),
        ("  of which host handling", vtick_host),
        ("vtick exit, pynng arecv instead", arecv_rtt),
        ("pynng Pair0 blocking echo", nng),
        ("AF_UNIX socketpair echo", raw),
    ]
    print(f"{'path':<34} {'median us':>10} {'p99 us':>10}")
    for name, hist in rows:
        p50, p99 = _stats(hist)
        print(f"{name:<34} {p50:>10.1f} {p99:>10.1f}")
    ratio = _stats(vtick_rtt)[0] / _stats(raw)[0]
    print(f"ratio {ratio:.2f} (vtick exit median / AF_UNIX socketpair median)")
    print(
        f"ratio_nng {_stats(vtick_rtt)[0] / _stats(nng)[0]:.2f} "
        "(vtick exit median / bare pynng median)"
    )
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "echo-socketpair":
        _echo_socketpair(int(sys.argv[2]))
    elif sys.argv[1] == "echo-nng":
        _echo_nng(sys.argv[2])
