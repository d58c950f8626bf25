"""The vCPU end of ``vtick bench transport``: time exit round trips against a real host.

``python -m vtick.guest.exitbench --connect URL --nr NR --serve`` connects as vCPU 0
through the real guest link, codec and trio driver (``GuestVcpu``), prints one JSON line
(``{}``) once connected, then reads a count ``N`` per line on stdin; for each it sends
``N`` ``exit-hypercall`` exits with hypercall number ``NR`` and answers one JSON line:
``{"rtt": HDR, "host": HDR, "cpu_ns": CPU}``: HDR histograms (V2 compressed, base64) of
the round trip and of the host's own handling time per exit in ns, and the CPU time this
process used for the block.  ``quit`` or end of input disconnects.  The token comes from
``$VTICK_TOKEN``; ``$VTICK_NNG_RECV`` picks the receive method as for any vCPU.

It is a separate program (not a function the benchmark imports) because the host never
imports the guest: the benchmark starts a host and this program, as a run does, and
drives it in blocks so that its paths can be interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence

import trio
from hdrh.histogram import HdrHistogram

from vtick.guest.vcpu import GuestConfig, GuestVcpu
from vtick.proto import cliargs
from vtick.proto import messages as m

__all__ = ["main"]


async def _serve(url: str, token: bytes, nr: int) -> None:
    vcpu = GuestVcpu(GuestConfig(connect=url, vcpu=0, token=token))
    stdin = trio.lowlevel.FdStream(os.dup(0))
    msg = m.ExitHypercall(nr=nr, args=[1, 2, 3, 4])
    async with trio.open_nursery() as nursery:
        await vcpu.connect(nursery)
        print(json.dumps({}), flush=True)
        buf = b""
        while True:
            while b"\n" not in buf:
                chunk = await stdin.receive_some(100)
                if not chunk:
                    buf = b"quit\n"
                    break
                buf += chunk
            line, buf = buf.split(b"\n", 1)
            if line.strip() in (b"", b"quit"):
                break
            rtt = HdrHistogram(1, 10_000_000_000, 3)
            host_side = HdrHistogram(1, 10_000_000_000, 3)
            # the host's times go into their histogram after the block: in the loop they
            # would add a second histogram update per round trip that the echo clients,
            # which record only their round trip, do not pay
            host_ns: list[int] = []
            cpu0 = time.process_time_ns()
            for _ in range(int(line)):
                t0 = time.perf_counter_ns()
                reply = await vcpu.exit(msg)
                rtt.record_value(time.perf_counter_ns() - t0)
                host_ns.append(reply.host_ns)
            cpu_ns = time.process_time_ns() - cpu0
            for ns in host_ns:
                host_side.record_value(max(1, ns))
            out = {
                "rtt": rtt.encode().decode("ascii"),
                "host": host_side.encode().decode("ascii"),
                "cpu_ns": cpu_ns,
            }
            print(json.dumps(out), flush=True)
            vcpu.give_rx()  # the receive loop takes what arrives while stdin is read
        nursery.cancel_scope.cancel()
    if vcpu.ep is not None:
        vcpu.ep.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtick.guest.exitbench")
    p.add_argument("--connect", type=cliargs.url, required=True)
    p.add_argument("--nr", type=cliargs.nonneg_int, required=True)
    p.add_argument("--serve", action="store_true", help="take block sizes on stdin")
    args = p.parse_args(argv)
    token = cliargs.read_token(None)
    trio.run(_serve, args.connect, token, args.nr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
