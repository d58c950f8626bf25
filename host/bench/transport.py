"""``vtick bench transport``: what one exit round trip costs, against the floors under it.

Four paths, each between two real processes, measured in short alternating blocks within
one run (each round runs one block of every path, in a rotated order), so a change of
background load in the middle biases no ratio:

* ``vtick exit``: the guest program ``vtick.guest.exitbench`` acts as a vCPU (the real
  guest link, codec and trio driver) against a real ``vtick host`` process; each sample
  is one ``exit-hypercall`` -> ``exit-reply`` round trip through the host's real dispatch;
* ``trio + pynng``: the same CBOR frame bounced off an echo process, trio on both ends,
  waiting with ``wait_readable`` on nng's receive fd and sending without blocking: the
  floor of the stack vtick is built on;
* ``pynng blocking``: the same over a bare Pair0 socket with blocking calls: nng's floor;
* ``AF_UNIX socketpair``: the same over a SOCK_SEQPACKET socketpair: the kernel's floor.

Every client and server decodes and re-encodes the frame with cbor2.  Clients run in
their own processes, take ``N`` on stdin, do ``N`` round trips and answer one JSON line
(an HDR histogram and the CPU time they used); the server's CPU time is read from
``/proc/PID/stat`` around each block.  Printed: one row per path (median, p99, CPU us
per round trip on each side) and one line per ratio, ``ratio_unix``, ``ratio_nng`` and
``ratio_trio_nng`` (vtick's median over that path's median).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import cbor2
from hdrh.histogram import HdrHistogram

from vtick.proto import messages as m
from vtick.proto.codec import encode

__all__ = ["run_transport_bench"]

BENCH_NR = 0x5654_00FF  # an unclaimed hypercall: the host's dispatch answers -KVM_ENOSYS
_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
_SELF = [sys.executable, "-m", "vtick.host.bench.transport"]


def _payload() -> bytes:
    return encode(m.ExitHypercall(nr=BENCH_NR, args=[1, 2, 3, 4]), 1, 0)


def _hist() -> HdrHistogram:
    return HdrHistogram(1, 10_000_000_000, 3)


def _cpu_ns(pid: int) -> int:
    """User + system CPU time of process ``pid`` (clock ticks, as /proc reports them)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * _TICK_NS


# ---------------------------------------------------------------------- child programs


def _echo_unix(fd: int) -> None:
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


def _echo_trio(url: str) -> None:
    import pynng
    import trio

    async def main() -> None:
        with pynng.Pair0(listen=url, recv_max_size=65536) as sock:
            print("READY", flush=True)
            fd = sock.recv_fd
            while True:
                try:
                    data = sock.recv(block=False)
                except pynng.TryAgain:
                    await trio.lowlevel.wait_readable(fd)
                    continue
                if data == b"\x00":
                    return
                reply = cbor2.dumps(cbor2.loads(data))
                try:
                    sock.send(reply, block=False)
                except pynng.TryAgain:
                    await sock.asend(reply)

    trio.run(main)


def _serve_blocks(round_trip: object) -> None:
    """The client side of every floor: ``N`` on stdin -> N round trips -> one JSON line."""
    assert callable(round_trip)
    for line in sys.stdin:
        if not line.strip() or line.strip() == "quit":
            return
        hist = _hist()
        cpu0 = time.process_time_ns()
        for _ in range(int(line)):
            t0 = time.perf_counter_ns()
            round_trip()
            hist.record_value(time.perf_counter_ns() - t0)
        cpu = time.process_time_ns() - cpu0
        print(json.dumps({"rtt": hist.encode().decode("ascii"), "cpu_ns": cpu}), flush=True)


def _client_unix() -> None:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    echo = subprocess.Popen([*_SELF, "echo-unix", str(child.fileno())], pass_fds=[child.fileno()])
    child.close()
    payload = _payload()

    def round_trip() -> None:
        parent.send(payload)
        cbor2.loads(parent.recv(65536))

    print(json.dumps({"server_pid": echo.pid}), flush=True)
    try:
        _serve_blocks(round_trip)
    finally:
        parent.close()
        echo.wait(timeout=10)


def _client_nng(url: str) -> None:
    import pynng

    payload = _payload()
    with pynng.Pair0(dial=url, recv_max_size=65536) as sock:

        def round_trip() -> None:
            sock.send(payload)
            cbor2.loads(sock.recv())

        print(json.dumps({}), flush=True)
        _serve_blocks(round_trip)
        sock.send(b"\x00")
        time.sleep(0.05)


def _client_trio(url: str) -> None:
    import pynng
    import trio

    payload = _payload()

    async def main() -> None:
        with pynng.Pair0(dial=url, recv_max_size=65536) as sock:
            fd = sock.recv_fd
            print(json.dumps({}), flush=True)
            stdin = trio.lowlevel.FdStream(os.dup(0))
            buf = b""
            while True:
                while b"\n" not in buf:
                    chunk = await stdin.receive_some(100)
                    if not chunk:
                        return
                    buf += chunk
                line, buf = buf.split(b"\n", 1)
                if line.strip() in (b"", b"quit"):
                    break
                hist = _hist()
                cpu0 = time.process_time_ns()
                for _ in range(int(line)):
                    t0 = time.perf_counter_ns()
                    try:
                        sock.send(payload, block=False)
                    except pynng.TryAgain:
                        await sock.asend(payload)
                    while True:
                        try:
                            data = sock.recv(block=False)
                            break
                        except pynng.TryAgain:
                            await trio.lowlevel.wait_readable(fd)
                    cbor2.loads(data)
                    hist.record_value(time.perf_counter_ns() - t0)
                cpu = time.process_time_ns() - cpu0
                out = {"rtt": hist.encode().decode("ascii"), "cpu_ns": cpu}
                print(json.dumps(out), flush=True)
            sock.send(b"\x00")
            await trio.sleep(0.05)

    trio.run(main)


# ---------------------------------------------------------------------- the controller


@dataclass
class _Path:
    name: str
    client: subprocess.Popen[str]
    server_pid: int
    hist: HdrHistogram = field(default_factory=_hist)
    client_cpu_ns: int = 0
    server_cpu_ns: int = 0
    samples: int = 0

    def block(self, count: int, record: bool) -> None:
        assert self.client.stdin is not None
        assert self.client.stdout is not None
        server0 = _cpu_ns(self.server_pid)
        self.client.stdin.write(f"{count}\n")
        self.client.stdin.flush()
        line = self.client.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: client exited ({self.client.wait()})")
        reply = json.loads(line)
        if record:
            self.server_cpu_ns += _cpu_ns(self.server_pid) - server0
            self.client_cpu_ns += reply["cpu_ns"]
            self.samples += count
            self.hist.add(HdrHistogram.decode(reply["rtt"].encode("ascii")))

    def median_us(self) -> float:
        return self.hist.get_value_at_percentile(50) / 1000


def _start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def _ready(proc: subprocess.Popen[str], what: str) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{what} did not start (status {proc.wait()})")
    return line


def run_transport_bench(count: int = 5000, warmup: int = 500, block: int = 250) -> int:
    """Measure every path in interleaved blocks; print the table and the ratios."""
    procs: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory(prefix="vtick-bench-") as run_dir:
        try:
            token = secrets.token_bytes(32)
            env = dict(os.environ, VTICK_TOKEN=token.hex(), VTICK_PARENT_PID=str(os.getpid()))
            host = _start(
                [sys.executable, "-m", "vtick.host", "host", "--listen", f"ipc://{run_dir}/link",
                 "--vcpus", "1", "--duration", "86400", "--connect-timeout", "60"],
                env,
            )  # fmt: skip
            procs.append(host)
            if not _ready(host, "vtick host").startswith("READY"):
                raise RuntimeError("vtick host did not say READY")
            echo_nng = _start([*_SELF, "echo-nng", f"ipc://{run_dir}/nng"])
            echo_trio = _start([*_SELF, "echo-trio", f"ipc://{run_dir}/trio"])
            procs += [echo_nng, echo_trio]
            _ready(echo_nng, "nng echo")
            _ready(echo_trio, "trio echo")
            clients = {
                "vtick exit": _start(
                    [sys.executable, "-m", "vtick.guest.exitbench", "--connect",
                     f"ipc://{run_dir}/link", "--nr", str(BENCH_NR), "--serve"],
                    env,
                ),
                "trio + pynng echo": _start([*_SELF, "client-trio", f"ipc://{run_dir}/trio"]),
                "pynng blocking echo": _start([*_SELF, "client-nng", f"ipc://{run_dir}/nng"]),
                "AF_UNIX socketpair echo": _start([*_SELF, "client-unix"]),
            }  # fmt: skip
            procs += list(clients.values())
            servers = {
                "vtick exit": host.pid,
                "trio + pynng echo": echo_trio.pid,
                "pynng blocking echo": echo_nng.pid,
            }
            paths = []
            for name, client in clients.items():
                hello = json.loads(_ready(client, name))
                paths.append(_Path(name, client, servers.get(name) or hello["server_pid"]))
            rounds = max(1, count // block)
            print(
                f"vtick bench transport: {rounds} rounds x {block} round trips per path, "
                f"interleaved (order rotates each round), after {warmup} warm-up each; "
                f"{os.cpu_count()} CPUs",
                flush=True,
            )
            for path in paths:
                path.block(warmup, record=False)
            for r in range(rounds):
                for i in range(len(paths)):
                    paths[(r + i) % len(paths)].block(block, record=True)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                for pipe in (proc.stdin, proc.stdout):
                    if pipe is not None:
                        with contextlib.suppress(OSError):  # a killed reader: broken pipe
                            pipe.close()
    print(
        f"{'path':<26} {'median us':>10} {'p99 us':>10} {'client cpu us':>14} {'server cpu us':>14}"
    )
    for p in paths:
        print(
            f"{p.name:<26} {p.median_us():>10.1f} "
            f"{p.hist.get_value_at_percentile(99) / 1000:>10.1f} "
            f"{p.client_cpu_ns / p.samples / 1000:>14.1f} "
            f"{p.server_cpu_ns / p.samples / 1000:>14.1f}"
        )
    vtick = paths[0]
    for key, path in (
        ("ratio_unix", paths[3]),
        ("ratio_nng", paths[2]),
        ("ratio_trio_nng", paths[1]),
    ):
        print(
            f"{key} {vtick.median_us() / path.median_us():.2f} "
            f"(vtick exit median / {path.name} median)"
        )
    print(
        f"cpu_us_per_exit guest {vtick.client_cpu_ns / vtick.samples / 1000:.1f} "
        f"host {vtick.server_cpu_ns / vtick.samples / 1000:.1f}"
    )
    return 0


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "echo-unix":
        _echo_unix(int(sys.argv[2]))
    elif cmd == "echo-nng":
        _echo_nng(sys.argv[2])
    elif cmd == "echo-trio":
        _echo_trio(sys.argv[2])
    elif cmd == "client-unix":
        _client_unix()
    elif cmd == "client-nng":
        _client_nng(sys.argv[2])
    elif cmd == "client-trio":
        _client_trio(sys.argv[2])
    else:
        raise SystemExit(f"unknown mode {cmd!r}")
