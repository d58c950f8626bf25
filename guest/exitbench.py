"""The vCPU end of ``vtick bench transport``: time exit round trips against a real host.

``python -m vtick.guest.exitbench --connect URL --count N --warmup W --nr NR`` connects as
vCPU 0 through the real guest link, codec and trio driver (``GuestVcpu``), sends ``N + W``
``exit-hypercall`` exits with hypercall number ``NR`` and prints one JSON line on stdout:
``{"rtt": HDR, "host": HDR}``, each an HDR histogram (V2 compressed, base64) of the round
trip and of the host's own handling time per exit, in ns.  The token comes from
``$VTICK_TOKEN``; ``$VTICK_NNG_RECV`` picks the receive method as for any vCPU.

It is a separate process (not a function the benchmark imports) because the host never
imports the guest: the benchmark starts a host and this program, as a run does.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import trio
from hdrh.histogram import HdrHistogram

from vtick.guest.vcpu import GuestConfig, GuestVcpu
from vtick.proto import cliargs
from vtick.proto import messages as m

__all__ = ["main"]


async def _measure(url: str, token: bytes, count: int, warmup: int, nr: int) -> dict[str, str]:
    rtt = HdrHistogram(1, 10_000_000_000, 3)
    host_side = HdrHistogram(1, 10_000_000_000, 3)
    vcpu = GuestVcpu(GuestConfig(connect=url, vcpu=0, token=token))
    async with trio.open_nursery() as nursery:
        await vcpu.connect(nursery)
        msg = m.ExitHypercall(nr=nr, args=[1, 2, 3, 4])
        for i in range(warmup + count):
            t0 = time.perf_counter_ns()
            reply = await vcpu.exit(msg)
            if i >= warmup:
                rtt.record_value(time.perf_counter_ns() - t0)
                host_side.record_value(max(1, reply.host_ns))
        nursery.cancel_scope.cancel()
    vcpu.ep.close()
    return {"rtt": rtt.encode().decode("ascii"), "host": host_side.encode().decode("ascii")}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtick.guest.exitbench")
    p.add_argument("--connect", type=cliargs.url, required=True)
    p.add_argument("--count", type=cliargs.positive_int, required=True)
    p.add_argument("--warmup", type=cliargs.nonneg_int, default=0)
    p.add_argument("--nr", type=cliargs.nonneg_int, required=True)
    args = p.parse_args(argv)
    token = cliargs.read_token(None)
    out = trio.run(_measure, args.connect, token, args.count, args.warmup, args.nr)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
