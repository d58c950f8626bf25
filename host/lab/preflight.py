"""Mistakes caught before the run: the checks ``vtick run`` and ``vtick host`` make after
parsing their options and before any process starts or any file is written.

A mistake found after the run has started costs the user the whole run (a results file
that cannot be written after every path ran, a port in use found by the seventh host) and
usually arrives as a traceback or a vCPU's exit status.  So each check here raises
:class:`UsageError` with one line that names the option, the value and what would be
accepted; the command line prints it and exits with status 2 (the usage-error status of
argparse and of most Unix tools).  The checks are cheap and leave nothing behind: a port
is probed by binding it for a moment (with SO_REUSEADDR, as nng's listener does, so a
connection in TIME_WAIT is not mistaken for a user), a path by looking at its directory.

They cannot be airtight (a port can be taken between the check and the host's listen);
what they guarantee is that the common mistakes never start a run.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterable, Mapping

from vtick.proto.catalog import WORKLOAD_PARAMS
from vtick.proto.transport import ipc_path, link_url

__all__ = [
    "UsageError",
    "check_listen",
    "check_output_dir",
    "check_output_file",
    "check_params",
    "check_distinct",
    "param_help",
]


class UsageError(Exception):
    """A mistake in the command line, told in one line."""


def param_help() -> str:
    """Every ``--param`` name with its default, range and meaning, for ``--help`` (which
    formats with %, hence the doubling)."""
    return "; ".join(
        f"{name} (default {p.default}, {p.lowest}..{p.highest}, {'/'.join(p.workloads)}: "
        f"{p.meaning})"
        for name, p in WORKLOAD_PARAMS.items()
    ).replace("%", "%%")


def check_params(params: Mapping[str, int], workloads: Iterable[str]) -> None:
    """Names, ranges and the timer storm's ``min_ns < max_ns``, for the workloads a run
    uses.  A parameter that none of them reads is a mistake too (it would change
    nothing, silently)."""
    used = set(workloads)
    for name, value in params.items():
        spec = WORKLOAD_PARAMS.get(name)
        if spec is None:
            raise UsageError(
                f"--param {name}={value}: unknown parameter; known: {', '.join(WORKLOAD_PARAMS)}"
            )
        if not spec.lowest <= value <= spec.highest:
            raise UsageError(
                f"--param {name}={value}: must be {spec.lowest}..{spec.highest} ({spec.meaning})"
            )
        if not used & set(spec.workloads):
            readers = " and ".join(spec.workloads)
            verb = "workloads read" if len(spec.workloads) > 1 else "workload reads"
            raise UsageError(
                f"--param {name}={value}: only the {readers} {verb} it, and this run uses "
                f"{', '.join(sorted(used)) or 'none'}"
            )
    lo = params.get("min_ns", WORKLOAD_PARAMS["min_ns"].default)
    hi = params.get("max_ns", WORKLOAD_PARAMS["max_ns"].default)
    if used & {"timers", "mixed"} and lo >= hi:
        raise UsageError(
            f"--param min_ns={lo} must be below max_ns={hi} (timer delays are drawn from "
            "[min_ns, max_ns))"
        )


def check_output_file(path: str, option: str) -> None:
    """``path`` can be written: not a directory, in a directory that exists and that this
    user may write (checked before the run, not after every path ran)."""
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a directory, expected a file name")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{option} {path}: exists and is not writable")
    _check_parent(path, option)


def check_output_dir(path: str, option: str) -> None:
    """``path`` is a writable directory or can be created as one."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UsageError(f"{option} {path}: exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"{option} {path}: directory is not writable")
        return
    _check_parent(path, option)


def _check_parent(path: str, option: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{option} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: directory {parent} is not writable")


def check_distinct(outputs: Mapping[str, str | None]) -> None:
    """No two output options name the same file (the second would overwrite the first)."""
    seen: dict[str, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        real = os.path.realpath(path)
        if real in seen:
            raise UsageError(f"{seen[real]} and {option} both name {path}")
        seen[real] = option


def check_listen(url: str, vcpus: int) -> None:
    """Every vCPU's address derives from ``url`` and can be listened on now.

    tcp: ports PORT..PORT+N-1 exist, are free and the address is one of this machine's.
    ipc: the socket's directory exists and is writable, and no one listens there yet.
    """
    try:
        urls = [link_url(url, i) for i in range(vcpus)]
    except ValueError as exc:
        raise UsageError(f"--listen: {exc} (with --vcpus {vcpus})") from None
    for i, one in enumerate(urls):
        if one.startswith("tcp://"):
            _probe_tcp(url, one, i)
        elif (path := ipc_path(one)) is not None:
            _probe_ipc(url, path, i)


def _probe_tcp(base: str, url: str, vcpu: int) -> None:
    host, _, port_text = url.removeprefix("tcp://").rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port_text), type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"--listen {base}: cannot resolve {host!r}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                why = f"port {port_text} (vCPU {vcpu}) is in use"
            elif exc.errno == errno.EADDRNOTAVAIL:
                why = f"{host} is not an address of this machine"
            else:
                why = f"cannot listen on port {port_text} (vCPU {vcpu}): {exc.strerror}"
            raise UsageError(f"--listen {base}: {why}") from None


def _probe_ipc(base: str, path: str, vcpu: int) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"--listen {base}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--listen {base}: directory {parent} is not writable")
    if os.path.exists(path):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(path)
            except OSError:
                return  # a stale socket file: the listener replaces it
        raise UsageError(f"--listen {base}: {path} (vCPU {vcpu}) is in use by another host")
