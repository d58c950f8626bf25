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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from vtick.guest.vcpu import GuestConfig, run_guests

    if args.clock_skew:
        from vtick.proto.transport import set_clock_skew

        set_clock_skew(args.clock_skew)
    token = cliargs.read_token(args.token_file)
    cfgs = [
        GuestConfig(connect=args.connect, vcpu=i, token=token, preempt_ns=dict(args.preempt))
        for i in args.vcpu
    ]
    try:
        return trio.run(run_guests, cfgs)
    except KeyboardInterrupt:
        return 130
