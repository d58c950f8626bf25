"""``vtick guest`` (also ``python -m vtick.guest``): run one vCPU process.

The guest is a program of its own: ``vtick guest ...`` hands its arguments to this module
in a fresh interpreter, and the launcher starts vCPUs as ``python -m vtick.guest``, so the
guest never imports the host and the host never imports the guest.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import trio

from vtick.proto import cliargs

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vtick guest", description="Run one vCPU process.")
    p.add_argument("--connect", type=cliargs.url, required=True)
    p.add_argument(
        "--vcpu",
        type=cliargs.vcpu_list,
        required=True,
        metavar="N|A-B|LIST",
        help="the vCPU (or vCPUs: several run in this one process, each with its own link)",
    )
    p.add_argument(
        "--token-file",
        default=None,
        help=f"file holding the run token in hex (else ${cliargs.TOKEN_ENV})",
    )
    cliargs.preempt_arg(p)
    p.add_argument(
        "--clock-skew",
        type=int,
        default=0,
        metavar="NS",
        help="run this vCPU's clock NS ahead of CLOCK_MONOTONIC, as on another machine",
    )
    # issue 12: a clock that drifts, and the host's tracking of it
    p.add_argument(
        "--clock-drift-ppm",
        type=_drift_ppm,
        default=0,
        metavar="P",
        help="make this vCPU's clock run P parts per million fast (negative: slow), as "
        "another machine's oscillator (default: 0)",
    )
    p.add_argument(
        "--no-clock-tracking",
        action="store_true",
        help="keep the handshake's clock offset for the whole run and ignore the host's "
        "corrections (before issue 12; for comparison) (default: tracking on)",
    )
    return p


def _drift_ppm(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of ppm") from None
    if not -100_000 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"drift {text} ppm is beyond +-100000 ppm (10 %)")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from vtick.guest.vcpu import GuestConfig, run_guests

    if args.clock_skew:
        from vtick.proto.transport import set_clock_skew

        set_clock_skew(args.clock_skew)
    if args.clock_drift_ppm:
        from vtick.proto.transport import set_clock_drift

        set_clock_drift(round(args.clock_drift_ppm * 1000))
    token = cliargs.read_token(args.token_file)
    cfgs = [
        GuestConfig(
            connect=args.connect,
            vcpu=i,
            token=token,
            preempt_ns=dict(args.preempt),
            clock_tracking=not args.no_clock_tracking,
            synthetic_clock=bool(args.clock_skew or args.clock_drift_ppm),
        )
        for i in args.vcpu
    ]
    try:
        return trio.run(run_guests, cfgs)
    except KeyboardInterrupt:
        return 130
