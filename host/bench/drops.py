"""``vtick bench drops``: abrupt pipe drops against vtick's Pair0 endpoint, N in a row.

The host once died with SIGSEGV inside nng while vCPUs dropped and re-dialed their pipes
(issue 14, defect 4).  The cause is in nng's Pair0 (1.6 to 1.11 at least): a read that
completes after its pipe was stopped sets the socket's "message ready" flag again, and
the next receive takes the message from a NULL pipe.  ``proto/transport.py`` works
around it with a socket receive buffer (see ``PairEndpoint.__init__``).

This benchmark reproduces the pattern with real processes: a listener built on
``PairEndpoint`` (the host's receive path: fd wait, non-blocking ``recv_msg``, pipe
events, an answer to every frame, and optionally closing every K-th frame's pipe as
``_raw_reply`` does) and a dialer process that dials, has its first frame answered,
sends a burst, closes its socket with frames in flight, and dials again, ``drops``
times.  ``--undo-fix`` sets the receive buffer back to nng's default of 0: the code as
it was, which crashes within a few hundred drops.  Prints ``OK drops=N ...`` or the
listener's exit status (-11: SIGSEGV).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import struct
import subprocess
import sys
import tempfile
import threading
import time

__all__ = ["run_drops_bench", "soak"]

_SELF = [sys.executable, "-X", "faulthandler", "-m", "vtick.host.bench.drops"]


def _listen(url: str, drops: int, lclose: int, undo_fix: bool, seed: int) -> int:
    """The listener process: returns the dialer's exit status."""
    import pynng
    import trio

    from vtick.proto.transport import PairEndpoint

    stats = {"frames": 0, "added": 0, "removed": 0, "closed": 0}

    async def main() -> int:
        ep = PairEndpoint.listen(url, 1 << 16)
        if undo_fix:
            ep.sock.recv_buffer_size = 0  # nng's default: the code before the fix
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ep.run_sender)

            async def count_events() -> None:
                async for event in ep.pipe_events:
                    stats["added" if event.added else "removed"] += 1

            async def receive() -> None:
                while True:
                    try:
                        data, pipe = await ep.recv()
                    except pynng.Closed:
                        return
                    stats["frames"] += 1
                    ep.send([b"ack" + data[:8]])
                    if lclose and stats["frames"] % lclose == 0:
                        with contextlib.suppress(Exception):
                            pipe.close()
                            stats["closed"] += 1

            nursery.start_soon(count_events)
            nursery.start_soon(receive)
            dialer = await trio.lowlevel.open_process([*_SELF, "dial", url, str(drops), str(seed)])
            status = await dialer.wait()
            await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        ep.close()
        return status

    t0 = time.monotonic()
    status = trio.run(main)
    print(f"OK drops={drops} dialer_status={status} {stats} {time.monotonic() - t0:.1f}s")
    return status


def _dial(url: str, drops: int, seed: int) -> int:
    """The dialer process: dial, be answered, send a burst, drop abruptly; ``drops`` times."""
    import pynng

    rng = random.Random(seed)
    parent = os.getppid()
    done = 0
    while done < drops:
        up = threading.Event()
        # the dialer's own socket needs the same receive buffer (the same nng bug)
        sock = pynng.Pair0(reconnect_time_min=1, reconnect_time_max=10, recv_buffer_size=8192)
        sock.add_post_pipe_connect_cb(lambda _pipe, up=up: up.set())
        sock.dial(url, block=False)
        while not up.wait(0.05):
            if os.getppid() != parent:
                return 3  # the listener died
        frames = [struct.pack("<II", done, k) + b"x" * 40 for k in range(rng.randint(1, 50))]
        with contextlib.suppress(pynng.TryAgain, pynng.Closed):
            sock.send(frames[0], block=False)
        deadline = time.monotonic() + 1.0
        answered = False
        while time.monotonic() < deadline:  # polled: the listener reads this pipe now
            try:
                sock.recv(block=False)
                answered = True
                break
            except pynng.TryAgain:
                time.sleep(0.0002)
        for frame in frames[1:]:
            with contextlib.suppress(pynng.TryAgain, pynng.Closed):
                sock.send(frame, block=False)
        sock.close()  # with frames in flight
        done += answered
    print(f"dialer: drops={done}", file=sys.stderr, flush=True)
    return 0


def soak(drops: int, lclose: int = 0, undo_fix: bool = False, seed: int = 1) -> tuple[int, str]:
    """Run the listener in a child process: (its exit status, its stdout)."""
    with tempfile.TemporaryDirectory(prefix="vtick-drops-") as run_dir:
        proc = subprocess.run(
            [*_SELF, "listen", f"ipc://{run_dir}/l", str(drops), str(lclose), str(int(undo_fix)),
             str(seed)],
            capture_output=True,
            text=True,
            timeout=30 + drops * 0.05,
        )  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr[-2000:]


def run_drops_bench(
    drops: int = 20_000, runs: int = 1, lclose: int = 0, undo_fix: bool = False
) -> int:
    print(
        f"vtick bench drops: {runs} run(s) of {drops} abrupt pipe drops"
        f"{f', the listener closing every {lclose}th frame pipe' if lclose else ''}"
        f"{', receive buffer 0 (the code before the fix)' if undo_fix else ''}",
        flush=True,
    )
    crashed = 0
    for run in range(runs):
        t0 = time.monotonic()
        status, out = soak(drops, lclose, undo_fix, seed=run + 1)
        line = next((ln for ln in out.splitlines() if ln.startswith("OK ")), "")
        if status != 0:
            crashed += 1
            print(f"  run {run + 1}: listener exited {status} (-11 = SIGSEGV) after "
                  f"{time.monotonic() - t0:.1f} s", flush=True)  # fmt: skip
        else:
            print(f"  run {run + 1}: {line}", flush=True)
    print(f"crashed {crashed} of {runs}")
    return 1 if crashed else 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m vtick.host.bench.drops")
    p.add_argument("role", choices=["listen", "dial"])
    p.add_argument("rest", nargs="*")
    args = p.parse_args(argv)
    if args.role == "listen":
        url, drops, lclose, undo, seed = args.rest
        return _listen(url, int(drops), int(lclose), bool(int(undo)), int(seed))
    url, drops, seed = args.rest
    return _dial(url, int(drops), int(seed))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
